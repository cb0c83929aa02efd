"""Load generator for the benchmarks: one process, N gevent sessions, raw sockets.

Run as its own process so that its CPU is apart from the server's and can be
reported (a client near 100 % of a core would make it the bottleneck):

    python3 tests/bench/loadgen.py smtp --addr 127.0.0.1:2525 --sessions 10 \
        --count 2000 --duration 20

Prints one JSON object on stdout: completed operations, failures, wall
seconds, client CPU seconds, latency percentiles.

The clients are deliberately minimal and cheap:

- SMTP uses PIPELINING (RFC 2920 §3.1) when the server offers it: MAIL, RCPT
  and DATA in one write, then the dot-terminated body (RFC 5321 §4.1.1.4);
  each session reuses its connection for many transactions.  Only a ``250``
  to the end of data counts as a delivery.
- POP3 logs in with USER/PASS (RFC 1939 §7) and issues RETR in turn over the
  maildrop (RFC 1939 §5); a response ends at CRLF.CRLF.
- IMAP logs in, SELECTs INBOX, learns the UIDs with UID SEARCH ALL and issues
  ``UID FETCH n BODY.PEEK[]`` (RFC 9051 §6.4.9, §6.4.5), reading literals by
  their announced size (RFC 9051 §4.3).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import gevent  # noqa: E402

MAX_LINE = 64 * 1024  # bound every reply line we buffer
IO_TIMEOUT = 60.0  # seconds; a stuck server fails the run instead of hanging it


class ProtocolFailure(Exception):
    """The server answered something the benchmark cannot continue from."""


class Conn:
    """A buffered line/literal reader over one TCP connection."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def _fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise ProtocolFailure("connection closed by server")
        self.buf += chunk

    def line(self) -> bytes:
        """One line including its CRLF."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                out = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return out
            if len(self.buf) > MAX_LINE:
                raise ProtocolFailure("reply line too long")
            start = len(self.buf)
            self._fill()

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def until(self, terminator: bytes) -> bytes:
        """Everything up to and including terminator."""
        start = 0
        while True:
            i = self.buf.find(terminator, start)
            if i >= 0:
                end = i + len(terminator)
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            start = max(0, len(self.buf) - len(terminator) + 1)
            self._fill()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass
class Stats:
    ok: int = 0
    failed: int = 0
    bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.failed += 1
        self.errors[what] = self.errors.get(what, 0) + 1


class Budget:
    """A fixed number of operations or a deadline, whichever comes first."""

    def __init__(self, count: int, duration: float) -> None:
        self.left = count
        self.deadline = time.monotonic() + duration

    def take(self) -> bool:
        if self.left <= 0 or time.monotonic() >= self.deadline:
            return False
        self.left -= 1
        return True


# ---------------------------------------------------------------- SMTP


def smtp_reply(conn: Conn) -> tuple[int, bytes]:
    """One (possibly multi-line) reply: (code, last line). RFC 5321 §4.2."""
    while True:
        line = conn.line()
        if len(line) < 4 or not line[:3].isdigit():
            raise ProtocolFailure(f"bad SMTP reply {line[:80]!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line
        # continuation lines are skipped; EHLO keywords are collected below


def smtp_ehlo(conn: Conn) -> set[bytes]:
    conn.send(b"EHLO loadgen.bench.test\r\n")
    keywords: set[bytes] = set()
    while True:
        line = conn.line()
        if not line.startswith(b"250"):
            raise ProtocolFailure(f"EHLO refused: {line[:80]!r}")
        keywords.add(line[4:].split(b" ")[0].strip().upper())
        if line[3:4] != b"-":
            return keywords


def make_message(n: int, size: int, rng: random.Random, to: str) -> bytes:
    """A unique ~size-byte RFC 5322 message, CRLF lines, no line starting with '.'."""
    header = (
        f"From: Bench Sender <sender@loadgen.bench.test>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: benchmark message {n}\r\n"
        f"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\n"
        f"Message-ID: <{os.getpid()}.{n}.{rng.getrandbits(64):x}@loadgen.bench.test>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
    lines = []
    total = len(header)
    while total < size:
        line = "x" + "".join(rng.choices(alphabet, k=71)) + "\r\n"
        lines.append(line)
        total += len(line)
    return header + "".join(lines).encode()


def smtp_session(args: argparse.Namespace, budget: Budget, stats: Stats, seed: int) -> None:
    rng = random.Random(seed)
    host, port = args.host, args.port
    conn = Conn(host, port)
    try:
        code, line = smtp_reply(conn)
        if code != 220:
            raise ProtocolFailure(f"greeting {line[:80]!r}")
        pipelining = b"PIPELINING" in smtp_ehlo(conn)
        bodies = [make_message(seed * 1000 + i, args.size, rng, "x") for i in range(8)]
        n = 0
        while budget.take():
            n += 1
            rcpt = f"user{rng.randrange(args.users)}@{args.domain}"
            # A unique first line keeps every message's content (and hash) distinct.
            body = b"X-Bench-Seq: %d.%d.%d\r\n" % (os.getpid(), seed, n) + bodies[n % 8]
            t0 = time.perf_counter()
            cmds = [
                "MAIL FROM:<sender@loadgen.bench.test>\r\n",
                f"RCPT TO:<{rcpt}>\r\n",
                "DATA\r\n",
            ]
            if pipelining:
                conn.send("".join(cmds).encode())
                replies = [smtp_reply(conn) for _ in cmds]
            else:
                replies = []
                for cmd in cmds:
                    conn.send(cmd.encode())
                    replies.append(smtp_reply(conn))
                    if replies[-1][0] >= 400:
                        break
            codes = [r[0] for r in replies]
            if codes[:2] != [250, 250] or len(codes) < 3 or codes[2] != 354:
                stats.error(f"envelope {codes}")
                if len(codes) == 3 and codes[2] == 354:
                    conn.send(b".\r\n")
                    smtp_reply(conn)
                conn.send(b"RSET\r\n")
                smtp_reply(conn)
                continue
            conn.send(body + b".\r\n")
            code, line = smtp_reply(conn)
            if code == 250:
                stats.ok += 1
                stats.bytes += len(body)
                stats.latencies.append(time.perf_counter() - t0)
            else:
                stats.error(f"data {code}")
        conn.send(b"QUIT\r\n")
        smtp_reply(conn)
    finally:
        conn.close()


# ---------------------------------------------------------------- POP3


def pop3_ok(conn: Conn) -> bytes:
    line = conn.line()
    if not line.startswith(b"+OK"):
        raise ProtocolFailure(f"POP3 error {line[:80]!r}")
    return line


def pop3_session(args: argparse.Namespace, budget: Budget, stats: Stats, index: int) -> None:
    conn = Conn(args.host, args.port)
    try:
        pop3_ok(conn)
        user = f"user{index % args.users}@{args.domain}"
        conn.send(f"USER {user}\r\n".encode())
        pop3_ok(conn)
        conn.send(f"PASS {args.password}\r\n".encode())
        pop3_ok(conn)
        conn.send(b"STAT\r\n")
        count = int(pop3_ok(conn).split()[1])
        if count == 0:
            raise ProtocolFailure(f"{user} has an empty maildrop")
        n = 0
        while budget.take():
            msg = n % count + 1
            n += 1
            t0 = time.perf_counter()
            conn.send(b"RETR %d\r\n" % msg)
            # The status line's CRLF plus the body's final CRLF.CRLF (RFC 1939 §3).
            resp = conn.until(b"\r\n.\r\n")
            if not resp.startswith(b"+OK"):
                stats.error("retr")
                continue
            stats.ok += 1
            stats.bytes += len(resp)
            stats.latencies.append(time.perf_counter() - t0)
        conn.send(b"QUIT\r\n")
        pop3_ok(conn)
    finally:
        conn.close()


# ---------------------------------------------------------------- IMAP

LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")


def imap_command(conn: Conn, tag: bytes, command: bytes) -> tuple[list[bytes], int]:
    """Send one command; returns (untagged lines, literal octets read)."""
    conn.send(tag + b" " + command + b"\r\n")
    untagged: list[bytes] = []
    octets = 0
    prefix = tag + b" "
    while True:
        line = conn.line()
        if line.startswith(prefix):
            if not line[len(prefix) :].startswith(b"OK"):
                raise ProtocolFailure(f"{command[:40]!r}: {line[:80]!r}")
            return untagged, octets
        m = LITERAL.search(line)
        while m:
            size = int(m.group(1))
            conn.exactly(size)
            octets += size
            line = conn.line()
            m = LITERAL.search(line)
        untagged.append(line)


def imap_session(args: argparse.Namespace, budget: Budget, stats: Stats, index: int) -> None:
    conn = Conn(args.host, args.port)
    try:
        greeting = conn.line()
        if not greeting.startswith(b"* OK"):
            raise ProtocolFailure(f"IMAP greeting {greeting[:80]!r}")
        user = f"user{index % args.users}@{args.domain}"
        imap_command(conn, b"a1", f'LOGIN "{user}" "{args.password}"'.encode())
        imap_command(conn, b"a2", b"SELECT INBOX")
        lines, _ = imap_command(conn, b"a3", b"UID SEARCH ALL")
        uids: list[int] = []
        for line in lines:
            if line.startswith(b"* SEARCH"):
                uids += [int(x) for x in line.split()[2:]]
        if not uids:
            raise ProtocolFailure(f"{user} has an empty INBOX")
        n = 0
        while budget.take():
            uid = uids[n % len(uids)]
            n += 1
            t0 = time.perf_counter()
            try:
                _, octets = imap_command(conn, b"f%d" % n, b"UID FETCH %d BODY.PEEK[]" % uid)
            except ProtocolFailure:
                stats.error("fetch")
                continue
            if octets == 0:
                stats.error("fetch without literal")
                continue
            stats.ok += 1
            stats.bytes += octets
            stats.latencies.append(time.perf_counter() - t0)
        imap_command(conn, b"z", b"LOGOUT")
    except ProtocolFailure:
        raise
    finally:
        conn.close()


# ---------------------------------------------------------------- driver

SESSIONS = {"smtp": smtp_session, "pop3": pop3_session, "imap": imap_session}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(SESSIONS))
    parser.add_argument("--addr", required=True, help="HOST:PORT")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--count", type=int, default=2000, help="operations in all")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds at most")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--domain", default="bench.test")
    parser.add_argument("--password", default="pw")
    parser.add_argument("--size", type=int, default=5120, help="SMTP message octets")
    parser.add_argument("--first", type=int, default=0, help="index of the first session")
    args = parser.parse_args(argv)
    host, _, port = args.addr.rpartition(":")
    args.host, args.port = host, int(port)

    budget = Budget(args.count, args.duration)
    stats = Stats()
    session = SESSIONS[args.kind]
    failures: list[str] = []

    def run(i: int) -> None:
        try:
            session(args, budget, stats, args.first + i)
        except (OSError, ProtocolFailure, ValueError) as exc:
            failures.append(f"session {args.first + i}: {exc!r}")

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    wall0 = time.time()
    gevent.joinall([gevent.spawn(run, i) for i in range(args.sessions)])
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    json.dump(
        {
            "kind": args.kind,
            "sessions": args.sessions,
            "ok": stats.ok,
            "failed": stats.failed,
            "errors": stats.errors,
            "session_failures": failures[:10],
            "bytes": stats.bytes,
            "start": wall0,
            "wall": wall,
            "cpu": cpu,
            "p50_ms": percentile(stats.latencies, 50) * 1000,
            "p99_ms": percentile(stats.latencies, 99) * 1000,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
