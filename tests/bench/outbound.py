"""Outbound relay benchmark (issue 4): postroom side by side with Postfix.

    python3 tests/bench/outbound.py [--quick] [--repeat N] [--no-postfix]
                                    [--profile DIR] [--cprofile DIR] [--nice N]
                                    [--write-docs]

Postfix's ``/usr/sbin/smtp-sink`` listens on a loopback port and counts the
messages it receives (``-c``: one counter update per final ".", unbuffered).
Each system relays N 5 KB messages (one remote recipient each,
``rcptN@sink.example``) sent by 10 concurrent client sessions that reuse
their connections:

- postroom: a node (tests/support/node.py) with ``outbound.relay_host`` =
  the sink, ``outbound.tls = "opportunistic"`` (smtp-sink has no STARTTLS);
  the clients submit on port 587 with STARTTLS and ``AUTH PLAIN`` as
  user0@bench.test.  Three configurations, each on a fresh node: no DKIM key
  (signing off), RSA-2048 + Ed25519 keys from ``postroom dkim generate`` with
  ``[dkim] fast_rsa = true`` (the default) and with ``fast_rsa = false``
  (dkimpy's pure-Python RSA).
- Postfix: a private instance (``postfix -c DIR``, helpers of
  tests/bench/peers.py) with ``relayhost = [127.0.0.1]:SINKPORT``, receiving
  plain SMTP from loopback (``mynetworks = 127.0.0.0/8``, no TLS, no AUTH).

The client first opens every session (TCP, STARTTLS, and AUTH on postroom,
which Postfix's relay from mynetworks does not ask for), then sends.  "Relay
rate" is N / (time from the first transaction until smtp-sink has counted
the N-th message): end-to-end, durable queueing included on both sides.
"Accepted/s" is the rate of 250 replies to the end of data.  Server CPU is
the postroom process alone (its etcd aside), or every process under the
Postfix master, over the same interval, per message; the CPU spent while
the sessions were set up (TLS handshakes, postroom's argon2id AUTH) is
reported apart, per session.  A warm-up
batch goes through each system before it is measured.

The client (``outbound.py client ...``) runs as its own process with one
thread per session (smtplib), so its CPU is reported apart.  Every process
started is stopped by PID (``postfix -c DIR stop`` for Postfix), and the
temp directory removed, on success, error or Ctrl-C.

``--cprofile DIR`` runs cProfile in the node during the first measured run
of each mode (a ``sitecustomize`` hook: SIGUSR1 starts the profiler in the
node's main thread, where every greenlet runs; SIGUSR2 writes the stats).
Its clock is the main thread's CPU time (``time.thread_time``), so waiting in
a greenlet switch counts nothing and the threadpool's CPU (SQLite, fsync,
blob writes) is not in it.  The summary lists the top functions by own and
cumulative time (cumulative figures of functions that switch greenlets
include what other greenlets ran meanwhile: read the own-time table
first).  The profiler slows the node, so a profiled run's rates and CPU
figures are not comparable with others; CPU per message comes from
unprofiled runs.
"""

from __future__ import annotations

import argparse
import datetime
import email.utils
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.bench import peers  # noqa: E402
from tests.bench import profile as pyspy  # noqa: E402
from tests.support.etcd import free_port  # noqa: E402
from tests.support.node import NodeProcess, to_toml  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Outbound relay (issue 4)"
READING = "### Reading the outbound figures"
DKIM_COST = Path(__file__).with_name("dkim_cost.py")
SINK = "/usr/sbin/smtp-sink"
DOMAIN = "bench.test"
SENDER = f"user0@{DOMAIN}"
PASSWORD = "bench-pw-1234"
REMOTE = "sink.example"
SESSIONS = 10
MESSAGE_SIZE = 5 * 1024
WARMUP = 30
# Postfix's default_destination_concurrency_limit; postroom gets the same.
CONCURRENCY = 20
RELAY_DEADLINE = 600.0  # seconds for the sink to see every accepted message
LOADAVG: list[float] = []

CLK_TCK = os.sysconf("SC_CLK_TCK")

# Loaded as sitecustomize by the node under --cprofile (only for `... serve`).
CPROFILE_HOOK = """\
import os, signal, sys
_out = os.environ.get("POSTROOM_BENCH_CPROFILE")
if _out and sys.argv[-1:] == ["serve"]:
    import cProfile, time
    _prof = cProfile.Profile(time.thread_time)  # CPU of the main thread, not wall time
    def _start(signum, frame):
        _prof.enable()
    def _stop(signum, frame):
        _prof.disable()
        _prof.dump_stats(_out + ".tmp")
        os.replace(_out + ".tmp", _out)
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
"""


def log(msg: str) -> None:
    print(f"[outbound {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------ the client process


def make_message(index: int, size: int = MESSAGE_SIZE) -> bytes:
    """A ``size``-octet RFC 5322 message from SENDER to rcpt<index>@REMOTE,
    with the Date and Message-ID a mail client adds (RFC 5322 §3.6)."""
    head = (
        f"From: Bench <{SENDER}>\r\nTo: <rcpt{index}@{REMOTE}>\r\n"
        f"Subject: outbound bench {index}\r\nDate: {email.utils.formatdate()}\r\n"
        f"Message-ID: <{index}.{os.getpid()}@client.bench.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again. 0123456789\r\n"
    return head + (line * (size // len(line) + 1))[: max(0, size - len(head))]


def client_main(argv: list[str]) -> int:
    """Send --count messages over --sessions connections; print JSON on stdout.

    With --starttls each session does STARTTLS (RFC 3207) first, and with
    --password then AUTH PLAIN (RFC 4954, RFC 4616) before its transactions,
    as a mail client on port 587 does (the Postfix relay from mynetworks
    gets STARTTLS without AUTH).
    """
    p = argparse.ArgumentParser(prog="outbound.py client")
    p.add_argument("--addr", required=True)
    p.add_argument("--sessions", type=int, default=SESSIONS)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first", type=int, default=0, help="index of the first recipient")
    p.add_argument("--password")
    p.add_argument("--starttls", action="store_true")
    args = p.parse_args(argv)
    host, _, port = args.addr.rpartition(":")
    lock = threading.Lock()
    todo = iter(range(args.first, args.first + args.count))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE  # the node's self-signed loopback certificate

    def take() -> int | None:
        with lock:
            return next(todo, None)

    ready = threading.Barrier(args.sessions + 1)  # every session set up, and main
    go = threading.Event()

    def session() -> None:
        try:
            smtp = smtplib.SMTP(host, int(port), local_hostname="client.bench.test", timeout=60)
            if args.starttls:
                smtp.starttls(context=tls)
                smtp.ehlo()
            if args.password:
                smtp.user, smtp.password = SENDER, args.password
                smtp.auth("PLAIN", smtp.auth_plain)
        except (OSError, smtplib.SMTPException) as exc:
            with lock:
                errors[f"session: {type(exc).__name__}: {exc}"[:160]] = 1
            ready.wait()
            return
        ready.wait()
        go.wait()
        with smtp:
            while (i := take()) is not None:
                start = time.perf_counter()
                try:
                    smtp.sendmail(SENDER, [f"rcpt{i}@{REMOTE}"], make_message(i))
                except smtplib.SMTPException as exc:
                    with lock:
                        key = f"{type(exc).__name__}: {exc}"[:160]
                        errors[key] = errors.get(key, 0) + 1
                    if isinstance(exc, smtplib.SMTPServerDisconnected):
                        return
                    continue
                with lock:
                    latencies.append(time.perf_counter() - start)

    # Sessions are set up (TCP, STARTTLS, AUTH) first; then "ready" on stdout,
    # and the transactions start when the parent answers on stdin: it
    # measures session setup and message relay apart.
    threads = [threading.Thread(target=session) for _ in range(args.sessions)]
    for t in threads:
        t.start()
    ready.wait()
    print("ready", flush=True)
    sys.stdin.readline()
    cpu0 = time.process_time()
    start = time.time()
    go.set()
    for t in threads:
        t.join()
    end = time.time()
    latencies.sort()

    def pct(q: float) -> float:
        return 1000 * latencies[int(q * (len(latencies) - 1))] if latencies else 0.0

    print(json.dumps({
        "ok": len(latencies), "failed": args.count - len(latencies), "errors": errors,
        "start": start, "end": end, "cpu": time.process_time() - cpu0,
        "p50_ms": pct(0.5), "p99_ms": pct(0.99),
    }))  # fmt: skip
    return 0


# ------------------------------------------------------------ processes


class Sink:
    """``smtp-sink -c`` by PID; a reader thread keeps the message counter.

    smtp-sink prints ``sess=N quit=N mesg=N`` followed by CR after each
    session end, QUIT and final "." (unbuffered on a pipe); ``mesg`` is the
    number of transactions received, one per message here.
    """

    COUNTER = re.compile(rb"sess=(\d+) quit=\d+ mesg=(\d+)")

    def __init__(self, dump: Path) -> None:
        self.port = free_port()
        self.dump = dump
        self.proc: subprocess.Popen | None = None
        self.count = 0
        self.sessions = 0  # SMTP sessions ended so far
        self.changed = threading.Condition()
        self.reached: dict[int, float] = {}  # target -> wall time it was reached
        self.targets: set[int] = set()

    def start(self) -> None:
        self.dump.parent.mkdir(mode=0o777, exist_ok=True)
        os.chmod(self.dump.parent, 0o777)  # smtp-sink drops privileges to nobody as root
        cmd = [SINK, "-c", "-D", str(self.dump)]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"127.0.0.1:{self.port}", "256"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()
        peers.wait_port(self.port, time.monotonic() + 10, "smtp-sink")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        while chunk := os.read(fd, 65536):
            buf += chunk
            matches = list(self.COUNTER.finditer(buf))
            if not matches:
                continue
            last = matches[-1]
            now = time.time()
            buf = buf[last.end() :]
            with self.changed:
                self.sessions, self.count = int(last.group(1)), int(last.group(2))
                for t in [t for t in self.targets if self.count >= t]:
                    self.reached[t] = now
                    self.targets.discard(t)
                self.changed.notify_all()

    def wait_for(self, target: int, deadline: float) -> float | None:
        """Wall time at which the counter reached ``target``; None on timeout."""
        with self.changed:
            if self.count >= target:
                return self.reached.get(target, time.time())
            self.targets.add(target)
            while self.count < target:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    self.targets.discard(target)
                    return None
                self.changed.wait(min(left, 1.0))
            return self.reached.get(target, time.time())

    def last_message(self, window: int = 64 * 1024) -> bytes:
        """The last transaction in the dump file (smtp-sink's -D format)."""
        with open(self.dump, "rb") as f:
            f.seek(max(0, os.path.getsize(self.dump) - window))
            tail = f.read()
        start = tail.rfind(b"\nX-Client-Addr:")
        return tail[start + 1 :] if start >= 0 else tail

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/postfix-queue
data_directory = {root}/postfix-data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-relay-bench
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
myhostname = relay.bench.test
mydomain = relay.bench.test
myorigin = relay.bench.test
mydestination =
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink}
default_destination_concurrency_limit = {concurrency}
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtp_tls_security_level = none
biff = no
"""


TLSMGR = "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n"


def shared_certificate(root: Path) -> tuple[Path, Path]:
    """One ECDSA P-256 certificate and key (node/net/tls.py makes it) that
    postroom's submission port and Postfix's smtpd both present."""
    from node.net.tls import ensure_self_signed

    return ensure_self_signed(root / "shared-tls", "relay.bench.test")


class PostfixRelay:
    """A private Postfix (``postfix -c DIR``) relaying everything to the sink."""

    def __init__(self, root: Path, sink_port: int) -> None:
        self.root = root
        self.sink_port = sink_port
        self.port = free_port()
        self.etc = root / "postfix-etc"
        self.started = False

    def start(self) -> None:
        self.root.mkdir(parents=True)
        os.chmod(self.root, 0o755)  # the postfix user must traverse it
        self.etc.mkdir()
        cert, key = shared_certificate(self.root.parent)
        fmt = {"root": self.root, "sink": self.sink_port, "concurrency": CONCURRENCY,
               "cert": cert, "key": key}
        (self.etc / "main.cf").write_text(POSTFIX_MAIN_CF.format(**fmt))
        # peers.MASTER_CF is a full service table; lmtp stays unused here.
        # tlsmgr: smtpd's TLS needs it (without it: "no entropy for TLS key generation").
        (self.etc / "master.cf").write_text(peers.MASTER_CF.format(smtp=self.port) + TLSMGR)
        for d in ("postfix-queue", "postfix-data"):
            (self.root / d).mkdir(mode=0o755)
        owner = pwd.getpwnam("postfix")
        os.chown(self.root / "postfix-data", owner.pw_uid, owner.pw_gid)
        self.started = True  # a half-started master is stopped too
        r = subprocess.run([peers.POSTFIX, "-c", str(self.etc), "start"],
                           capture_output=True, timeout=60)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stderr.decode()}\n{self.log_tail()}")
        peers.wait_port(self.port, time.monotonic() + 30, "postfix smtpd")

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "postfix-data" / "master.lock").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu(self) -> float:
        pid = self.master_pid()
        return peers.tree_cpu([pid]) if pid else 0.0

    def stop(self) -> None:
        if not self.started:
            return
        pid = self.master_pid()
        subprocess.run([peers.POSTFIX, "-c", str(self.etc), "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        self.started = False
        deadline = time.monotonic() + 20
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.root / "postfix.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(text[-lines:])


class Clients:
    """Client processes, killed by PID on any exit path."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def run(self, addr: str, count: int, first: int, password: str | None,
            on_ready: Callable[[], None] = lambda: None) -> dict:  # fmt: skip
        """Run one client; ``on_ready`` is called once every session is set
        up, right before the transactions start."""
        cmd = [sys.executable, __file__, "client", "--addr", addr, "--count", str(count),
               "--first", str(first), "--sessions", str(SESSIONS), "--starttls"]  # fmt: skip
        if password:
            cmd += ["--password", password]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.procs.append(proc)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            if proc.stdout.readline().strip() == "ready":
                on_ready()
                proc.stdin.write("go\n")
                proc.stdin.flush()
            out, err = proc.communicate(timeout=RELAY_DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.procs.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"client failed ({proc.returncode}):\n{err[-2000:]}")
        return json.loads(out)

    def kill_all(self) -> None:
        for proc in list(self.procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------ measuring


@dataclass
class Measure:
    """One relay run of N messages through one system."""

    ok: int = 0
    failed: int = 0
    accepted_rate: float = 0.0  # 250s to end of data per second
    relay_rate: float = 0.0  # messages counted by smtp-sink per second, end to end
    relay_wall: float = 0.0
    server_cpu: float = 0.0
    main_cpu: float | None = None  # the node's main thread (postroom only)
    setup_cpu: float = 0.0  # server CPU while the sessions were set up (not in server_cpu)
    client_cpu: float = 0.0
    client_wall: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    sink_sessions: int = 0  # SMTP sessions the sink saw end during the run
    notes: list[str] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)

    @property
    def cpu_ms_per_msg(self) -> float:
        return 1000 * self.server_cpu / self.ok if self.ok else 0.0

    @property
    def main_ms_per_msg(self) -> float | None:
        if self.main_cpu is None or not self.ok:
            return None
        return 1000 * self.main_cpu / self.ok

    @property
    def client_cpu_pct(self) -> float:
        return 100 * self.client_cpu / self.client_wall if self.client_wall else 0.0


class Counter:
    """Recipient indexes, unique over the whole benchmark."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> int:
        first, self.next = self.next, self.next + n
        return first


def relay_run(sink: Sink, clients: Clients, counter: Counter, addr: str, count: int,
              password: str | None, cpu: Callable[[], float],
              main_cpu: Callable[[], float] | None = None) -> Measure:  # fmt: skip
    """Send ``count`` messages through ``addr``; wait until the sink has them all."""
    base, sessions0 = sink.count, sink.sessions
    setup0 = cpu()
    marks: dict[str, float] = {}

    def on_ready() -> None:  # sessions open: the relay measure starts here
        marks["cpu0"] = cpu()
        marks["main0"] = main_cpu() if main_cpu is not None else 0.0

    result = clients.run(addr, count, counter.take(count), password, on_ready)
    cpu0, main0 = marks.get("cpu0", setup0), marks.get("main0", 0.0)
    m = Measure(ok=result["ok"], failed=result["failed"], client_cpu=result["cpu"],
                p50_ms=result["p50_ms"], p99_ms=result["p99_ms"])  # fmt: skip
    m.client_wall = result["end"] - result["start"]
    m.accepted_rate = m.ok / m.client_wall if m.client_wall else 0.0
    if result["errors"]:
        m.notes.append(f"{m.failed} failed: {result['errors']}")
    done = sink.wait_for(base + m.ok, time.monotonic() + RELAY_DEADLINE)
    if done is None:
        m.notes.append(f"only {sink.count - base} of {m.ok} reached smtp-sink")
        done = time.time()
    m.relay_wall = done - result["start"]
    m.relay_rate = (sink.count - base if sink.count - base < m.ok else m.ok) / m.relay_wall
    m.server_cpu = cpu() - cpu0
    m.setup_cpu = cpu0 - setup0
    if main_cpu is not None:
        m.main_cpu = main_cpu() - main0
    m.sink_sessions = sink.sessions - sessions0
    return m


def check_signatures(message: bytes, keys: bool) -> None:
    """Signing on: an RSA and an Ed25519 DKIM-Signature (RFC 6376, RFC 8463); off: none."""
    found = set(re.findall(rb"(?im)^DKIM-Signature:.*?\ba=([a-z0-9-]+)", message, re.S))
    want = {b"rsa-sha256", b"ed25519-sha256"} if keys else set()
    if found != want:
        raise RuntimeError(
            f"relayed message has DKIM algorithms {sorted(found)}, "
            f"expected {sorted(want)}:\n{message[:1500]!r}"
        )


def median(measures: list[Measure]) -> Measure:
    ordered = sorted(measures, key=lambda m: m.relay_rate)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.runs = [m.relay_rate for m in measures]
    for m in measures:
        if m is not chosen:
            chosen.notes += m.notes
    return chosen


def process_cpu(pid: int) -> float:
    """utime + stime of one process (children excluded), seconds."""
    return _stat_cpu(f"/proc/{pid}/stat")


def main_thread_cpu(pid: int) -> float:
    """utime + stime of the process's main thread (where the hub and every
    greenlet run; the rest is the threadpool: SQLite, fsync, blob writes)."""
    return _stat_cpu(f"/proc/{pid}/task/{pid}/stat")


def _stat_cpu(path: str) -> float:
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cprofile_env(root: Path, out: Path) -> dict[str, str]:
    """Environment changes that make the next node load CPROFILE_HOOK."""
    hook = root / "cprofile-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(CPROFILE_HOOK)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook),
                                                         os.environ.get("PYTHONPATH")])),
            "POSTROOM_BENCH_CPROFILE": str(out)}


def cprofile_summary(path: Path, messages: int, top: int = 25) -> str:
    """The top functions of a cProfile dump, by own time and by cumulative time,
    in microseconds per relayed message."""
    import io
    import pstats

    stats = pstats.Stats(str(path))
    rows = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in rows.values())

    def name(func: tuple) -> str:
        file, line, fn = func
        file = file.replace(str(REPO) + "/", "")
        return f"{fn} ({Path(file).name}:{line})" if file.startswith("/") else f"{fn} ({file}:{line})"

    out = io.StringIO()
    out.write(f"profiled CPU in the main thread: {1e6 * total / max(1, messages):,.0f} us "
              f"per message ({messages} messages)\n\n")
    for title, key in (("own time", 2), ("cumulative time", 3)):
        out.write(f"| by {title} | calls/msg | own us/msg | cum us/msg |\n|---|---:|---:|---:|\n")
        ranked = sorted(rows.items(), key=lambda kv: kv[1][key], reverse=True)[:top]
        for func, (_, nc, tt, ct, _) in ranked:
            out.write(f"| {name(func)} | {nc / messages:.2f} | {1e6 * tt / messages:.1f} "
                      f"| {1e6 * ct / messages:.1f} |\n")
        out.write("\n")
    return out.getvalue()


def tree_pids(root: int) -> list[int]:
    """``root`` and every descendant process (Postfix's master and its daemons)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack += children.get(pid, [])
    return out


class Strace:
    """``strace -c -f`` attached to ``pids`` (and what they fork) until stop():
    the syscall counts of one run, written to ``output``."""

    def __init__(self, pids: list[int], output: Path) -> None:
        self.output = output
        cmd = ["strace", "-c", "-f", "-o", str(output)]
        for pid in pids:
            cmd += ["-p", str(pid)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # attaching takes a moment; the run starts after it

    def stop(self, messages: int) -> str:
        """Detach (SIGINT) and return the summary with calls per message."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return strace_summary(self.output, messages)


def strace_summary(path: Path, messages: int, top: int = 16) -> str:
    """The busiest syscalls of an ``strace -c`` file, per relayed message."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] not in ("total",):
            calls = int(parts[3])
            rows.append((calls, parts[-1], float(parts[1])))
    rows.sort(reverse=True)
    total = sum(c for c, _, _ in rows)
    out = [f"syscalls per message: {total / max(1, messages):.1f} ({messages} messages)", "",
           "| syscall | calls/msg | seconds (strace) |", "|---|---:|---:|"]
    out += [f"| {name} | {calls / max(1, messages):.2f} | {secs:.3f} |"
            for calls, name, secs in rows[:top]]
    fsyncs = sum(c for c, n, _ in rows if n in ("fsync", "fdatasync"))
    out += ["", f"fsync + fdatasync per message: {fsyncs / max(1, messages):.2f}", ""]
    return "\n".join(out)


def wait_file(path: Path, deadline: float) -> bool:
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# ------------------------------------------------------------ the systems

POSTROOM_MODES = {
    # name: (label, DKIM keys generated, [dkim] fast_rsa)
    "off": ("postroom, signing off (no key)", False, True),
    "fast": ("postroom, signing on: RSA (fast path) + Ed25519", True, True),
    "dkimpy": ("postroom, signing on: RSA (dkimpy) + Ed25519", True, False),
}


def bench_postroom(root: Path, label: str, keys: bool, fast_rsa: bool, sink: Sink,
                   clients: Clients, counter: Counter, count: int, repeat: int,
                   prof_dir: Path | None, cprof_dir: Path | None = None,
                   strace_dir: Path | None = None) -> tuple[Measure, str | None]:  # fmt: skip
    overrides = {
        "node": {"hostname": "mx.bench.test"},
        "outbound": {
            "relay_host": f"127.0.0.1:{sink.port}",
            "tls": "opportunistic",
            "max_connections_per_domain": CONCURRENCY,
            # No DNS in this benchmark (the relay host is an address): no
            # MTA-STS policy lookups against the unreachable test resolver.
            "mta_sts": False,
            "dane": False,
        },
        "dkim": {"sign": True, "fast_rsa": fast_rsa},
        "tls": dict(zip(("cert", "key"), map(str, shared_certificate(root.parent)), strict=True)),
    }
    node = NodeProcess(root, overrides)
    node.settings["storage"].pop("shards", None)  # the default a user gets
    node.config_path.write_text(to_toml(node.settings))
    log(f"{label}: starting node")
    cprof_out = None
    saved_env = dict(os.environ)
    if cprof_dir is not None:
        cprof_out = cprof_dir / f"postroom-{'keys' if keys else 'nokey'}-" \
            f"{'fast' if fast_rsa else 'dkimpy'}.pstats"  # fmt: skip
        cprof_out.unlink(missing_ok=True)
        os.environ.update(cprofile_env(root, cprof_out))
    try:
        node.start()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    profile_text = None
    try:
        assert node.proc is not None
        pid = node.proc.pid
        for args in (("domain", "add", DOMAIN),):
            r = node.cli(*args)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.strip()}")
        node.add_user(SENDER, PASSWORD)
        if keys:
            r = node.cli("dkim", "generate", DOMAIN)
            if r.returncode != 0:
                raise RuntimeError(f"dkim generate failed: {r.stderr.strip()}")
        addr = f"{node.host}:{node.ports['submission']}"

        def cpu() -> float:
            return process_cpu(pid)

        def main_cpu() -> float:
            return main_thread_cpu(pid)

        warm = relay_run(sink, clients, counter, addr, WARMUP, PASSWORD, cpu)
        if warm.ok != WARMUP or warm.notes:
            raise RuntimeError(f"warm-up failed: {warm.notes}")
        check_signatures(sink.last_message(), keys)
        runs = []
        for i in range(repeat):
            log(f"{label}: run {i + 1}/{repeat}, {count} messages")
            recorder = None
            if prof_dir is not None and i == 0:
                out = (
                    prof_dir / f"postroom-{'keys' if keys else 'nokey'}-"
                    f"{'fast' if fast_rsa else 'dkimpy'}.txt"
                )
                recorder = pyspy.Recorder(pid, out)
            profiling = cprof_out is not None and i == 0
            if profiling:
                os.kill(pid, signal.SIGUSR1)
            tracer = None
            if strace_dir is not None and i == 0:
                tracer = Strace([pid], strace_dir / f"postroom-{'keys' if keys else 'nokey'}-"
                                f"{'fast' if fast_rsa else 'dkimpy'}.strace")  # fmt: skip
            try:
                m = relay_run(sink, clients, counter, addr, count, PASSWORD, cpu, main_cpu)
                if profiling:
                    m.notes.append("this run was profiled with cProfile (slower)")
                if tracer is not None:
                    m.notes.append("this run was traced with strace (slower)")
                runs.append(m)
            finally:
                if tracer is not None:
                    profile_text = (profile_text or "") + tracer.stop(count)
                if recorder is not None:
                    recorder.stop()
                    profile_text = pyspy.summary(recorder.output)
                if profiling:
                    assert cprof_out is not None
                    os.kill(pid, signal.SIGUSR2)
                    if wait_file(cprof_out, time.monotonic() + 60):
                        text = cprofile_summary(cprof_out, count)
                        cprof_out.with_suffix(".txt").write_text(text)
                        profile_text = (profile_text or "") + text
                    else:
                        log(f"{label}: no cProfile output at {cprof_out}")
        return median(runs), profile_text
    except Exception:
        log(f"{label}: node log tail:\n" + node.log_tail(30))
        raise
    finally:
        if node.stop() is None:
            node.kill()


def bench_postfix(root: Path, sink: Sink, clients: Clients, counter: Counter, count: int,
                  repeat: int, strace_dir: Path | None = None) -> tuple[Measure, str | None]:  # fmt: skip
    relay = PostfixRelay(root, sink.port)
    log("Postfix: starting")
    try:
        relay.start()
        addr = f"127.0.0.1:{relay.port}"
        warm = relay_run(sink, clients, counter, addr, WARMUP, None, relay.cpu)
        if warm.ok != WARMUP or warm.notes:
            raise RuntimeError(f"warm-up failed: {warm.notes}")
        runs, text = [], None
        for i in range(repeat):
            log(f"Postfix: run {i + 1}/{repeat}, {count} messages")
            tracer = None
            if strace_dir is not None and i == 0 and relay.master_pid():
                tracer = Strace(tree_pids(relay.master_pid() or 0), strace_dir / "postfix.strace")
            try:
                m = relay_run(sink, clients, counter, addr, count, None, relay.cpu)
                if tracer is not None:
                    m.notes.append("this run was traced with strace (slower)")
                runs.append(m)
            finally:
                if tracer is not None:
                    text = tracer.stop(count)
        return median(runs), text
    except Exception:
        log("Postfix: log tail:\n" + relay.log_tail())
        raise
    finally:
        relay.stop()


# ------------------------------------------------------------ report


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "?"


def report(results: dict[str, Measure], command: str, profile_name: str,
           failures: list[str]) -> str:  # fmt: skip
    postfix = results.get("Postfix")
    out = [
        SECTION,
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}",
        f"- command: `{command}` ({profile_name})",
        "- load average before/after (other work on the machine skews figures): "
        + ", ".join(f"{a:.1f}" for a in LOADAVG),
        f"- workload: 5 KB messages, one recipient each (rcptN@{REMOTE}), {SESSIONS} client "
        "sessions reusing their connections; receiver: Postfix's smtp-sink on loopback",
        "- both: the clients do STARTTLS (TLS 1.3) with the same ECDSA P-256 certificate "
        "on both servers, then send over the session",
        "- postroom: submission port with STARTTLS + AUTH PLAIN (argon2id, once per "
        "session), `relay_host` = the sink, "
        f"`tls = \"opportunistic\"`, `max_connections_per_domain = {CONCURRENCY}`, default "
        "storage (16 shards, fsync on)",
        "- Postfix " + _version(["postconf", "-h", "mail_version"])
        + ": STARTTLS (`smtpd_tls_security_level = may`), relay allowed from mynetworks "
        "(no AUTH), `relayhost = [127.0.0.1]:PORT`, "
        f"`default_destination_concurrency_limit = {CONCURRENCY}`, queue files fsynced "
        "(Postfix's fixed behaviour)",
        "",
        "| system | relayed/s | accepted/s | relayed/s vs Postfix | server CPU ms/msg "
        "| main thread ms/msg | session setup CPU ms/session "
        "| p50 ms | p99 ms | failed | msgs per sink session | client CPU % "
        "| every run (relayed/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for label, m in results.items():
        ratio = f"{m.relay_rate / postfix.relay_rate:.2f}" if postfix and postfix.relay_rate \
            else "n/a"  # fmt: skip
        cpu_label = f"{m.cpu_ms_per_msg:.2f}" + (" (all processes)" if label == "Postfix" else "")
        out.append(
            f"| {label} | {m.relay_rate:,.0f} | {m.accepted_rate:,.0f} | {ratio} | {cpu_label} "
            f"| {'-' if m.main_ms_per_msg is None else f'{m.main_ms_per_msg:.2f}'} "
            f"| {1000 * m.setup_cpu / SESSIONS:.1f} "
            f"| {m.p50_ms:.1f} | {m.p99_ms:.1f} | {m.failed} "
            f"| {m.ok / max(1, m.sink_sessions):.1f} | {m.client_cpu_pct:.0f} "
            f"| {', '.join(f'{r:.0f}' for r in m.runs)} |"
        )
    off = results.get(POSTROOM_MODES["off"][0])
    if off:
        for label, _, _ in (POSTROOM_MODES["fast"], POSTROOM_MODES["dkimpy"]):
            on = results.get(label)
            if on and on.ok and off.ok:
                out.append("")
                out.append(
                    f"Cost of signing ({label.split(': ', 1)[1]}): "
                    f"{on.cpu_ms_per_msg - off.cpu_ms_per_msg:+.2f} ms CPU per message, "
                    f"relay rate x{on.relay_rate / off.relay_rate:.2f} of signing off."
                )
    notes = [f"{label}: {n}" for label, m in results.items() for n in m.notes] + failures
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def write_docs(section: str) -> None:
    """Replace (or append) the Outbound relay section of docs/benchmarks.md."""
    text = DOCS.read_text()
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        # The generated part ends at the next section or at the hand-written
        # reading notes (READING), which are kept.
        ends = [text.find(mark, start + len(SECTION)) for mark in ("\n## ", "\n" + READING)]
        end = min((e for e in ends if e >= 0), default=-1)
        text = text[:start] + section + ("" if end < 0 else text[end:])
    DOCS.write_text(text)


def dkim_cost() -> str:
    """The table of tests/bench/dkim_cost.py (CPU per DKIM signature), or why not."""
    r = subprocess.run([sys.executable, str(DKIM_COST)], capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    if r.returncode != 0:
        return f"(tests/bench/dkim_cost.py failed: {r.stderr.strip()[-500:]})\n"
    return r.stdout


# ------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 messages per run, not 2,000")
    parser.add_argument("--count", type=int, help="messages per run (overrides --quick)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="each run N times, the median reported")  # fmt: skip
    parser.add_argument(
        "--modes",
        default=",".join(POSTROOM_MODES),
        help="postroom configurations to run, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--no-dkim-cost", action="store_true",
                        help="skip tests/bench/dkim_cost.py")  # fmt: skip
    parser.add_argument("--no-postfix", action="store_true", help="postroom alone")
    parser.add_argument("--no-postroom", action="store_true", help="Postfix alone")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="py-spy the node during the first run of each mode")  # fmt: skip
    parser.add_argument("--cprofile", metavar="DIR", type=Path,
                        help="cProfile the node during the first run of each mode")  # fmt: skip
    parser.add_argument("--strace", metavar="DIR", type=Path,
                        help="count syscalls (strace -c -f) during the first run of each "
                             "system")  # fmt: skip
    parser.add_argument("--nice", type=int, default=0, metavar="N",
                        help="run everything at this niceness")  # fmt: skip
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f'replace the "{SECTION[3:]}" section of docs/benchmarks.md',
    )
    args = parser.parse_args(argv)
    if not set(args.modes.split(",")) <= set(POSTROOM_MODES):
        parser.error(f"--modes: choose among {', '.join(POSTROOM_MODES)}")
    if args.nice:
        os.nice(args.nice)
    count = args.count or (300 if args.quick else 2000)
    command = "python3 tests/bench/outbound.py " + shlex.join(argv)
    if args.profile:
        if not pyspy.available():
            parser.error("--profile needs py-spy")
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.cprofile:
        args.cprofile = args.cprofile.resolve()
        args.cprofile.mkdir(parents=True, exist_ok=True)
    if args.strace:
        if shutil.which("strace") is None:
            parser.error("--strace needs strace")
        args.strace = args.strace.resolve()
        args.strace.mkdir(parents=True, exist_ok=True)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    LOADAVG.append(os.getloadavg()[0])
    root = Path(tempfile.mkdtemp(prefix="postroom-outbound-"))
    os.chmod(root, 0o755)
    sink = Sink(root / "sink" / "dump")
    clients = Clients()
    counter = Counter()
    results: dict[str, Measure] = {}
    profiles: dict[str, str] = {}
    failures: list[str] = []
    try:
        sink.start()
        log(f"smtp-sink on 127.0.0.1:{sink.port}")
        if not args.no_postroom:
            for i, name in enumerate(args.modes.split(",")):
                label, keys, fast = POSTROOM_MODES[name]
                try:
                    m, prof = bench_postroom(
                        root / f"node{i}",
                        label,
                        keys,
                        fast,
                        sink,
                        clients,
                        counter,
                        count,
                        args.repeat,
                        args.profile,
                        args.cprofile,
                        args.strace,
                    )
                    results[label] = m
                    if prof:
                        profiles[label] = prof
                except Exception as exc:
                    log(f"{label}: FAILED: {exc}")
                    failures.append(f"{label} failed: {str(exc).splitlines()[0]}")
        if args.no_postfix:
            log("Postfix: skipped (--no-postfix)")
        elif not os.path.exists(peers.POSTFIX):
            log("Postfix: not installed")
        else:
            try:
                results["Postfix"], prof = bench_postfix(
                    root / "postfix", sink, clients, counter, count, args.repeat, args.strace
                )
                if prof:
                    profiles["Postfix"] = prof
            except Exception as exc:
                log(f"Postfix: FAILED: {exc}")
                failures.append(f"Postfix failed: {str(exc).splitlines()[0]}")
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        clients.kill_all()
        sink.stop()
        peers.remove_tree(root)
    LOADAVG.append(os.getloadavg()[0])
    if not args.no_dkim_cost:
        log("DKIM: CPU per signature (tests/bench/dkim_cost.py)")
        cost = dkim_cost()
    profile_name = f"{count} messages per run" + (
        f", median of {args.repeat} runs" if args.repeat > 1 else ""
    )
    section = report(results, command.strip(), profile_name, failures)
    if not args.no_dkim_cost:
        section += (
            "\nDKIM signing cost per signature, `python3 tests/bench/dkim_cost.py` "
            "(same machine, right after):\n\n" + cost
        )
    print(section)
    for label, text in profiles.items():
        print(f"### profile of the node, {label}\n\n{text}")
    if args.write_docs:
        write_docs(section)
        log(f"wrote {DOCS.relative_to(REPO)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
