"""Failover drills: ``postroom drill failover`` (load, fault, checker, report).

Theory of operation
-------------------
A drill runs against a live cluster from any machine with the etcd settings
and a cluster certificate (for node-to-node RPC):

1. **Accounts.**  Temporary accounts ``drill-<run>-<i>@<a local domain>``
   with random passwords, at least one on every shard (so every node leads
   some of the traffic), removed at the end.
2. **Load.**  SMTP senders deliver to the members' SMTP listeners (from
   their /members/ records).  Every message carries a unique Message-ID and
   is sent once, never retried: it is *acknowledged* only on 250.  IMAP
   clients (one account each) SELECT with CONDSTORE, APPEND, UID FETCH what
   is new and STORE a flag, and record every UIDVALIDITY, UID and MODSEQ
   they see, with the monotonic time each command was sent and answered.
3. **Fault.**  For a node target the RPC ``drill.fault`` makes the node
   SIGKILL itself or SIGSTOP itself for a while (:func:`register_fault_handler`,
   served by every node); for ``etcd-member`` the leader is found through
   maintenance/status on each endpoint and SIGKILLed if it runs on this host.
4. **RTO** = time from the fault until every shard has a live primary again
   *and* a probe message to an account of every shard got 250.
5. **Checker** (after the load stops and /positions/ show every replica
   caught up): every acknowledged message is in its mailbox exactly once
   (lost and duplicated must both be 0); a message acknowledged before another
   was sent has the smaller UID; a UID seen once always names the same
   message; UIDVALIDITY never changes; HIGHESTMODSEQ, UIDNEXT and each
   message's MODSEQ never go back in real-time order; the last acknowledged
   flag change of each message holds; and ``repl.digest`` of every replica of
   a shard is equal at the same position.

The load runs in threads (greenlets once the process is monkey-patched, as
``python -m node`` is; real threads in a test process), so the same code
serves the CLI and the chaos tests.  etcd and RPC calls stay on the calling
thread.
"""

from __future__ import annotations

import bisect
import email.utils
import ipaddress
import itertools
import logging
import os
import random
import re
import secrets
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import gevent

from cluster.etcd import EtcdError
from node.statuscli import ClusterSnapshot, read_snapshot

log = logging.getLogger(__name__)

FAULT_DELAY = 0.2  # seconds between answering drill.fault and the fault itself
MAX_FREEZE = 3600.0


class DrillError(Exception):
    """The drill cannot run or cannot finish (one line for the operator)."""


def fault_command(pid: int, duration: float, delay: float = FAULT_DELAY) -> list[str]:
    """The detached shell that freezes ``pid`` for ``duration`` seconds."""
    return ["sh", "-c", f"sleep {delay:.3f}; kill -STOP {pid}; sleep {duration:.3f}; "
            f"kill -CONT {pid}"]


def _fault(peer: str, args: dict, attachments: list[bytes]) -> tuple[dict, list[bytes]]:
    """drill.fault {kind: "kill" | "freeze", duration}: answer, then do it."""
    kind = args.get("kind")
    pid = os.getpid()
    if kind == "kill":
        log.warning("drill: SIGKILL of this node (pid %d) requested by %s", pid, peer)
        gevent.spawn_later(FAULT_DELAY, os.kill, pid, signal.SIGKILL)
        return {"pid": pid, "kind": kind, "delay": FAULT_DELAY}, []
    if kind == "freeze":
        duration = float(args.get("duration", 0))
        if not 0 < duration <= MAX_FREEZE:
            raise ValueError(f"freeze duration must be in (0, {MAX_FREEZE:.0f}] seconds")
        log.warning("drill: freeze of this node (pid %d) for %.1f s requested by %s",
                    pid, duration, peer)
        subprocess.Popen(fault_command(pid, duration), start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        return {"pid": pid, "kind": kind, "delay": FAULT_DELAY, "duration": duration}, []
    raise ValueError(f"unknown fault kind {kind!r} (kill or freeze)")


def register_fault_handler(rpc_server) -> None:
    """Serve ``drill.fault`` on this node's RPC server (node/app.py calls it)."""
    rpc_server.register("drill.fault", _fault)


# ---------------------------------------------------------------- the ledger

MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
DRILL_DOMAIN = "postroom.drill"  # Message-ID right-hand side and envelope sender domain


@dataclass
class Delivery:
    """One message handed to the cluster once (SMTP DATA or IMAP APPEND)."""

    msgid: str
    accounts: tuple[str, ...]
    via: str  # "smtp 127.0.0.2:25", "imap 127.0.0.3:143", "probe ..."
    start: float  # monotonic, before the first command of this message
    end: float = 0.0  # monotonic, when the final answer arrived (0: none)
    acked: bool = False  # 250 after DATA, OK after APPEND
    reply: str = ""
    uid: int | None = None  # APPENDUID


@dataclass
class Observation:
    """What one IMAP client saw of its account's INBOX during one command."""

    account: str
    client: int
    start: float
    end: float
    uidvalidity: int = 0
    highestmodseq: int = 0
    uidnext: int = 0
    uids: dict[int, str] = field(default_factory=dict)  # uid -> Message-ID
    modseqs: dict[int, int] = field(default_factory=dict)  # uid -> MODSEQ


@dataclass
class FlagStore:
    """An IMAP STORE of \\Flagged on one message; acked on OK."""

    account: str
    uid: int
    flagged: bool
    start: float
    acked: bool = False


class Ledger:
    """Everything the load did and saw; safe to use from many threads."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self.deliveries: list[Delivery] = []
        self.observations: list[Observation] = []
        self.stores: list[FlagStore] = []
        self.errors: Counter[str] = Counter()

    def new_delivery(self, accounts: tuple[str, ...], via: str) -> Delivery:
        msgid = f"<drill.{self.run_id}.{next(self._seq)}@{DRILL_DOMAIN}>"
        delivery = Delivery(msgid, accounts, via, time.monotonic())
        with self._lock:
            self.deliveries.append(delivery)
        return delivery

    def observe(self, observation: Observation) -> None:
        with self._lock:
            self.observations.append(observation)

    def stored(self, store: FlagStore) -> None:
        with self._lock:
            self.stores.append(store)

    def error(self, what: str) -> None:
        with self._lock:
            self.errors[what] += 1

    def acked(self) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.acked]


def message_bytes(delivery: Delivery, size: int = 1500) -> bytes:
    """A small RFC 5322 message carrying the delivery's unique Message-ID."""
    body_line = (delivery.msgid.strip("<>") + " ").encode() * 4
    lines = [body_line[:76]] * max(1, size // 78)
    head = (
        f"From: drill <drill@{DRILL_DOMAIN}>\r\n"
        f"To: {', '.join(delivery.accounts)}\r\n"
        f"Subject: failover drill {delivery.msgid}\r\n"
        f"Date: {email.utils.formatdate()}\r\n"
        f"Message-ID: {delivery.msgid}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    return head + b"\r\n".join(lines) + b"\r\n"


# ---------------------------------------------------------------- a tiny IMAP client


class ImapError(Exception):
    """A NO/BAD answer, a BYE, or a broken connection."""


class ImapClient:
    """Just enough IMAP4rev1 + CONDSTORE for the drill, on a real socket.

    Responses come back with their literals inlined.  STARTTLS is used when
    the server disables LOGIN in plaintext; the drill talks to its own
    cluster, so the certificate is not verified (``tls_context`` to change).
    """

    LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")

    def __init__(self, address: str, timeout: float = 10.0,
                 tls_context: ssl.SSLContext | None = None) -> None:
        host, port = split_hostport(address)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.tags = itertools.count(1)
        self.tls_context = tls_context
        greeting = self._response()
        if not greeting.startswith(b"* OK"):
            self.close()
            raise ImapError(f"greeting: {greeting[:200]!r}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ImapError("connection closed by the server")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ImapError("connection closed by the server")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _response(self) -> bytes:
        out = self._line()
        while (m := self.LITERAL.search(out)) is not None:
            out += self._exact(int(m.group(1)))
            out += self._line()
        return out

    def command(self, text: str, literal: bytes | None = None) -> tuple[list[bytes], bytes]:
        """Send one command; (untagged responses, tagged OK line) or ImapError."""
        tag = f"d{next(self.tags)}".encode()
        if literal is None:
            self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        else:
            self.sock.sendall(tag + b" " + text.encode() + f" {{{len(literal)}}}\r\n".encode())
            line = self._response()
            if not line.startswith(b"+"):
                raise ImapError(f"{text.split()[0]}: {line[:200]!r}")
            self.sock.sendall(literal + b"\r\n")
        untagged: list[bytes] = []
        while True:
            line = self._response()
            if line.startswith(tag + b" "):
                if line[len(tag) + 1:].startswith(b"OK"):
                    return untagged, line
                raise ImapError(f"{text.split()[0]}: {line[len(tag) + 1:].strip()[:200]!r}")
            if line.startswith(b"* BYE"):
                raise ImapError(f"BYE: {line.strip()[:200]!r}")
            untagged.append(line)

    def login(self, user: str, password: str) -> None:
        untagged, _ = self.command("CAPABILITY")
        caps = b" ".join(untagged).upper()
        if b"LOGINDISABLED" in caps and b"STARTTLS" in caps:
            self.command("STARTTLS")
            context = self.tls_context or _unverified_context()
            self.sock = context.wrap_socket(self.sock, server_hostname=None)
            self.buf = b""
        self.command(f"LOGIN {_quote(user)} {_quote(password)}")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def split_hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


CODE = re.compile(rb"\[(UIDVALIDITY|HIGHESTMODSEQ|UIDNEXT) (\d+)\]")
APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")
FETCH_UID = re.compile(rb"\bUID (\d+)")
FETCH_MODSEQ = re.compile(rb"\bMODSEQ \((\d+)\)")
FETCH_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")


def select(client: ImapClient, readonly: bool = False) -> dict[str, int]:
    """SELECT/EXAMINE INBOX (CONDSTORE) -> {"UIDVALIDITY", "HIGHESTMODSEQ", "UIDNEXT"}."""
    untagged, tagged = client.command(f"{'EXAMINE' if readonly else 'SELECT'} INBOX (CONDSTORE)")
    codes: dict[str, int] = {}
    for line in [*untagged, tagged]:
        for name, value in CODE.findall(line):
            codes[name.decode()] = int(value)
    return codes


def fetch_messages(client: ImapClient, first_uid: int) -> list[tuple[int, str, int, bool]]:
    """(uid, Message-ID, MODSEQ, \\Flagged) of every message with uid >= first_uid."""
    untagged, _ = client.command(
        f"UID FETCH {first_uid}:* (UID MODSEQ FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    out = []
    for line in untagged:
        uid = FETCH_UID.search(line)
        if not line.startswith(b"* ") or b" FETCH " not in line[:40] or uid is None:
            continue
        if int(uid.group(1)) < first_uid:  # n:* always answers the last message
            continue
        if b"BODY[HEADER.FIELDS" not in line.upper():
            continue  # an unsolicited FETCH (another session's flag change): no header
        msgid = MESSAGE_ID.search(line)
        modseq = FETCH_MODSEQ.search(line)
        flags = FETCH_FLAGS.search(line)
        out.append((
            int(uid.group(1)),
            msgid.group(1).decode("ascii", "replace") if msgid else "",
            int(modseq.group(1)) if modseq else 0,
            bool(flags and b"\\FLAGGED" in flags.group(1).upper()),
        ))
    return out


# ---------------------------------------------------------------- the load


@dataclass(frozen=True)
class Endpoint:
    """A member's client listeners, from its /members/ record."""

    name: str
    smtp: str | None
    imap: str | None


def endpoints(snap: ClusterSnapshot) -> list[Endpoint]:
    """The SMTP and IMAP listeners of every live member."""
    out = []
    for name, record in sorted(snap.members.items()):
        listeners = record.get("listeners") or {}
        rpc_host = split_hostport(record["rpc"])[0] if record.get("rpc") else "127.0.0.1"
        pick = {}
        for kind in ("smtp", "imap"):
            addrs = listeners.get(kind) or [] if isinstance(listeners, dict) else []
            pick[kind] = _reachable(addrs[0], rpc_host) if addrs else None
        out.append(Endpoint(name, pick["smtp"], pick["imap"]))
    return out


def _reachable(address: str, fallback_host: str) -> str:
    """A wildcard listen address (0.0.0.0, ::) is dialled at the member's RPC host."""
    host, port = split_hostport(address)
    if host in ("0.0.0.0", "::", ""):
        host = fallback_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Load:
    """SMTP senders and IMAP clients in threads (greenlets once monkey-patched).

    Senders send each message once to one node's SMTP listener (rotating
    over the nodes) and count it acknowledged only on 250; they never retry
    a message.  Each IMAP client owns one account: SELECT (CONDSTORE), APPEND,
    UID FETCH of what is new, STORE of \\Flagged on a known message; on any
    error it reconnects to the next node.
    """

    def __init__(self, ledger: Ledger, accounts: dict[str, str], senders: int,
                 imap_clients: int, pause: float = 0.05, timeout: float = 5.0) -> None:
        self.ledger = ledger
        self.accounts = accounts
        self.names = sorted(accounts)
        self.senders = senders
        self.imap_clients = imap_clients
        self.pause = pause
        self.timeout = timeout
        self.nodes: list[Endpoint] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def set_nodes(self, nodes: list[Endpoint]) -> None:
        self.nodes = list(nodes)

    def start(self) -> None:
        for i in range(self.senders):
            self._spawn(self._sender, i)
        for i in range(self.imap_clients):
            self._spawn(self._imap_client, i)

    def _spawn(self, fn, i: int) -> None:
        thread = threading.Thread(target=fn, args=(i,), daemon=True, name=f"drill-{fn.__name__}-{i}")
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    def _node(self, i: int, kind: str) -> str | None:
        nodes = [getattr(n, kind) for n in self.nodes if getattr(n, kind)]
        return nodes[i % len(nodes)] if nodes else None

    def _sender(self, i: int) -> None:
        rng = random.Random(f"{self.ledger.run_id}-s{i}")
        turn = i
        while not self._stop.is_set():
            address = self._node(turn, "smtp")
            turn += 1
            if address is None:
                self._stop.wait(0.2)
                continue
            try:
                with smtplib.SMTP(*split_hostport(address), local_hostname=f"drill.{DRILL_DOMAIN}",
                                  timeout=self.timeout) as smtp:
                    smtp.ehlo()
                    while not self._stop.is_set():
                        count = 2 if rng.random() < 0.2 else 1
                        to = tuple(rng.sample(self.names, min(count, len(self.names))))
                        if not send_once(smtp, self.ledger, to, f"smtp {address}")[1]:
                            break
                        self._stop.wait(self.pause)
            except (OSError, smtplib.SMTPException) as exc:
                self.ledger.error(f"smtp {type(exc).__name__}")
                self._stop.wait(0.2)

    def _imap_client(self, i: int) -> None:
        account = self.names[i % len(self.names)]
        session = ImapSession(self.ledger, account, self.accounts[account], i)
        turn = i
        while not self._stop.is_set():
            address = self._node(turn, "imap")
            turn += 1
            if address is None:
                self._stop.wait(0.2)
                continue
            try:
                session.connect(address, self.timeout)
                while not self._stop.is_set():
                    session.round()
                    self._stop.wait(self.pause)
            except (OSError, ImapError, ValueError) as exc:
                self.ledger.error(f"imap {type(exc).__name__}")
                self._stop.wait(0.3)
            finally:
                session.close()


def send_once(smtp: smtplib.SMTP, ledger: Ledger, to: tuple[str, ...],
              via: str) -> tuple[Delivery, bool]:
    """Send one new message, never again; (its delivery, keep the connection)."""
    delivery = ledger.new_delivery(to, via)
    try:
        code, reply = smtp.mail(f"drill@{DRILL_DOMAIN}")
        for rcpt in to if code == 250 else ():
            code, reply = smtp.rcpt(rcpt)
            if code not in (250, 251):
                break
        if code not in (250, 251):
            delivery.reply = f"{code} {reply.decode(errors='replace')[:100]}"
            ledger.error(f"smtp envelope {code}")
            smtp.rset()
            return delivery, code != 421
        code, reply = smtp.data(message_bytes(delivery))
    except smtplib.SMTPResponseException as exc:
        delivery.end, delivery.reply = time.monotonic(), str(exc.smtp_code)
        ledger.error(f"smtp {exc.smtp_code}")
        return delivery, exc.smtp_code != 421
    except (OSError, smtplib.SMTPException) as exc:
        delivery.reply = type(exc).__name__
        ledger.error(f"smtp {type(exc).__name__}")
        return delivery, False
    delivery.end = time.monotonic()
    delivery.acked = code == 250
    delivery.reply = f"{code} {reply.decode(errors='replace')[:100]}"
    if not delivery.acked:
        ledger.error(f"smtp DATA {code}")
    return delivery, code != 421


class ImapSession:
    """One IMAP client's rounds against its own account (see Load)."""

    def __init__(self, ledger: Ledger, account: str, password: str, index: int) -> None:
        self.ledger = ledger
        self.account = account
        self.password = password
        self.index = index
        self.client: ImapClient | None = None
        self.next_uid = 1
        self.known: list[int] = []
        self.via = ""

    def connect(self, address: str, timeout: float) -> None:
        self.client = ImapClient(address, timeout)
        self.via = f"imap {address}"
        self.client.login(self.account, self.password)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def round(self) -> None:
        assert self.client is not None
        start = time.monotonic()
        codes = select(self.client)
        self.ledger.observe(Observation(
            self.account, self.index, start, time.monotonic(), codes.get("UIDVALIDITY", 0),
            codes.get("HIGHESTMODSEQ", 0), codes.get("UIDNEXT", 0)))
        self._append()
        self._fetch_new()
        if self.known:
            self._store(random.choice(self.known[-50:]))

    def _append(self) -> None:
        assert self.client is not None
        delivery = self.ledger.new_delivery((self.account,), self.via)
        raw = message_bytes(delivery, 600)
        try:
            _, tagged = self.client.command("APPEND INBOX ()", raw)
        except ImapError as exc:
            delivery.reply = str(exc)[:120]
            raise
        delivery.end, delivery.acked = time.monotonic(), True
        delivery.reply = "OK"
        found = APPENDUID.search(tagged)
        if found:
            delivery.uid = int(found.group(2))

    def _fetch_new(self) -> None:
        assert self.client is not None
        start = time.monotonic()
        rows = fetch_messages(self.client, self.next_uid)
        seen = Observation(self.account, self.index, start, time.monotonic())
        for uid, msgid, modseq, _ in rows:
            seen.uids[uid] = msgid
            seen.modseqs[uid] = modseq
            self.known.append(uid)
            self.next_uid = max(self.next_uid, uid + 1)
        self.ledger.observe(seen)

    def _store(self, uid: int) -> None:
        assert self.client is not None
        flagged = random.random() < 0.5
        store = FlagStore(self.account, uid, flagged, time.monotonic())
        self.ledger.stored(store)
        sign = "+" if flagged else "-"
        start = time.monotonic()
        untagged, _ = self.client.command(f"UID STORE {uid} {sign}FLAGS (\\Flagged)")
        store.acked = True
        seen = Observation(self.account, self.index, start, time.monotonic())
        for line in untagged:
            got, modseq = FETCH_UID.search(line), FETCH_MODSEQ.search(line)
            if got and modseq:
                seen.modseqs[int(got.group(1))] = int(modseq.group(1))
        self.ledger.observe(seen)


# ---------------------------------------------------------------- the checker


@dataclass
class MailboxState:
    """An account's INBOX as read after the drill (EXAMINE + UID FETCH 1:*)."""

    account: str
    uidvalidity: int
    highestmodseq: int
    uidnext: int
    messages: list[tuple[int, str, int, bool]]  # (uid, Message-ID, MODSEQ, \Flagged)


def read_mailbox(address: str, account: str, password: str, timeout: float = 30.0) -> MailboxState:
    client = ImapClient(address, timeout)
    try:
        client.login(account, password)
        codes = select(client, readonly=True)
        messages = fetch_messages(client, 1)
        return MailboxState(account, codes.get("UIDVALIDITY", 0), codes.get("HIGHESTMODSEQ", 0),
                            codes.get("UIDNEXT", 0), messages)
    finally:
        client.close()


def collect_mailboxes(accounts: dict[str, str], nodes: list[Endpoint],
                      deadline: float) -> dict[str, MailboxState]:
    """Every account's final INBOX, through any node (retried until deadline)."""
    out: dict[str, MailboxState] = {}
    imap = [n.imap for n in nodes if n.imap]
    turn = 0
    last = ""
    for account in sorted(accounts):
        while account not in out:
            if not imap:
                raise DrillError("no member has an IMAP listener")
            try:
                out[account] = read_mailbox(imap[turn % len(imap)], account, accounts[account])
            except (OSError, ImapError) as exc:
                last = f"{account}: {exc}"
                turn += 1
                if time.monotonic() >= deadline:
                    raise DrillError(f"cannot read the mailboxes: {last}") from None
                time.sleep(0.3)
    return out


@dataclass
class CheckResult:
    """The checker's verdict over the ledger and the final mailboxes."""

    acked: int = 0
    unacked: int = 0
    unacked_present: int = 0  # committed although the client never saw the answer
    lost: list[str] = field(default_factory=list)  # "account Message-ID"
    duplicated: list[str] = field(default_factory=list)
    uid_violations: list[str] = field(default_factory=list)
    modseq_violations: list[str] = field(default_factory=list)
    flag_violations: list[str] = field(default_factory=list)

    @property
    def violations(self) -> list[str]:
        return [
            *(f"lost: {x}" for x in self.lost),
            *(f"duplicated: {x}" for x in self.duplicated),
            *self.uid_violations, *self.modseq_violations, *self.flag_violations,
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "acked": self.acked, "unacked": self.unacked, "unacked_present": self.unacked_present,
            "lost": len(self.lost), "duplicated": len(self.duplicated),
            "uid_monotonic": not self.uid_violations,
            "modseq_monotonic": not self.modseq_violations,
            "flags_kept": not self.flag_violations,
            "violations": self.violations[:200],
        }


def check(ledger: Ledger, finals: dict[str, MailboxState]) -> CheckResult:
    """Every acknowledged message exactly once; UIDs and MODSEQs monotonic."""
    result = CheckResult()
    where = {a: _positions_by_msgid(state) for a, state in finals.items()}
    check_delivered(ledger.deliveries, where, result)
    check_uid_order(ledger.deliveries, where, result)
    check_observations(ledger.observations, finals, result)
    check_flags(ledger.stores, finals, result)
    return result


def _positions_by_msgid(state: MailboxState) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for uid, msgid, _, _ in state.messages:
        out[msgid].append(uid)
    return out


def check_delivered(deliveries: list[Delivery], where: dict[str, dict[str, list[int]]],
                    result: CheckResult) -> None:
    """Lost = acknowledged and absent; duplicated = any drill message twice."""
    for d in deliveries:
        for account in d.accounts:
            uids = where.get(account, {}).get(d.msgid, [])
            if d.acked:
                result.acked += 1
                if not uids:
                    result.lost.append(f"{account} {d.msgid} (via {d.via}, {d.reply})")
            else:
                result.unacked += 1
                result.unacked_present += bool(uids)
            if len(uids) > 1:
                result.duplicated.append(f"{account} {d.msgid} at UIDs {uids}")


def check_uid_order(deliveries: list[Delivery], where: dict[str, dict[str, list[int]]],
                    result: CheckResult) -> None:
    """A message acknowledged before another was sent has the smaller UID, and
    an APPENDUID names the UID the message still has."""
    per_account: dict[str, list[tuple[Delivery, int]]] = defaultdict(list)
    for d in deliveries:
        for account in d.accounts:
            uids = where.get(account, {}).get(d.msgid, [])
            if d.acked and len(uids) == 1:
                per_account[account].append((d, uids[0]))
                if d.uid is not None and d.uid != uids[0]:
                    result.uid_violations.append(
                        f"{account} {d.msgid}: APPENDUID {d.uid} but now UID {uids[0]}")
    for account, items in per_account.items():
        by_end = sorted(items, key=lambda x: x[0].end)
        ends = [d.end for d, _ in by_end]
        best_uid = list(itertools.accumulate((u for _, u in by_end), max))
        for d, uid in items:
            before = bisect.bisect_left(ends, d.start)  # acked before d was sent
            if before and best_uid[before - 1] >= uid:
                result.uid_violations.append(
                    f"{account} {d.msgid}: UID {uid} not above UID {best_uid[before - 1]}"
                    " of a message acknowledged before it was sent")


def check_observations(observations: list[Observation], finals: dict[str, MailboxState],
                       result: CheckResult) -> None:
    """UIDs never reused or moved, UIDVALIDITY fixed, HIGHESTMODSEQ/UIDNEXT and
    per-message MODSEQ never go back (in real time order)."""
    by_account: dict[str, list[Observation]] = defaultdict(list)
    for o in observations:
        by_account[o.account].append(o)
    for account, items in by_account.items():
        final = finals.get(account)
        if final is None:
            continue
        now = {uid: (msgid, modseq) for uid, msgid, modseq, _ in final.messages}
        for o in items:
            if o.uidvalidity and o.uidvalidity != final.uidvalidity:
                result.uid_violations.append(
                    f"{account}: UIDVALIDITY {o.uidvalidity} seen, now {final.uidvalidity}")
            for uid, msgid in o.uids.items():
                if uid not in now or now[uid][0] != msgid:
                    result.uid_violations.append(
                        f"{account}: UID {uid} was {msgid}, now {now.get(uid, ('nothing',))[0]}")
            for uid, modseq in o.modseqs.items():
                if uid in now and now[uid][1] < modseq:
                    result.modseq_violations.append(
                        f"{account}: MODSEQ of UID {uid} went back from {modseq} to {now[uid][1]}")
        end = time.monotonic() + 1e9
        states = [o for o in items if o.highestmodseq or o.uidnext]
        states.append(Observation(account, -1, end, end, final.uidvalidity,
                                  final.highestmodseq, final.uidnext))
        _never_back(account, "HIGHESTMODSEQ", [(o.start, o.end, o.highestmodseq) for o in states],
                    result.modseq_violations)
        _never_back(account, "UIDNEXT", [(o.start, o.end, o.uidnext) for o in states],
                    result.uid_violations)


def _never_back(account: str, what: str, items: list[tuple[float, float, int]],
                out: list[str]) -> None:
    """A value read after another read completed is never smaller."""
    items = [i for i in items if i[2]]
    by_end = sorted(items, key=lambda x: x[1])
    ends = [i[1] for i in by_end]
    best = list(itertools.accumulate((i[2] for i in by_end), max))
    for start, _, value in items:
        before = bisect.bisect_left(ends, start)
        if before and best[before - 1] > value:
            out.append(f"{account}: {what} went back from {best[before - 1]} to {value}")


def check_flags(stores: list[FlagStore], finals: dict[str, MailboxState],
                result: CheckResult) -> None:
    """The last acknowledged \\Flagged change of a message is what it shows
    (when no unacknowledged change of it came after)."""
    last: dict[tuple[str, int], FlagStore] = {}
    for store in sorted(stores, key=lambda s: s.start):
        last[(store.account, store.uid)] = store
    for (account, uid), store in last.items():
        final = finals.get(account)
        if not store.acked or final is None:
            continue
        flagged = {u: f for u, _, _, f in final.messages}
        if uid in flagged and flagged[uid] != store.flagged:
            result.flag_violations.append(
                f"{account}: UID {uid} acknowledged \\Flagged={store.flagged}, shows {flagged[uid]}")


# ---------------------------------------------------------------- replicas


def wait_caught_up(session, deadline: float) -> ClusterSnapshot:
    """Until every shard has a live primary and every live replica is in the
    ISR at the primary's position (from /positions/); DrillError at deadline."""
    while True:
        try:
            snap = read_snapshot(session)
            pending = lagging(snap)
        except EtcdError as exc:
            pending = [f"etcd: {exc}"]
        if not pending:
            return snap
        if time.monotonic() >= deadline:
            raise DrillError("replicas did not catch up: " + "; ".join(pending[:8]))
        time.sleep(0.5)


def lagging(snap: ClusterSnapshot) -> list[str]:
    """Why the cluster is not fully caught up (empty when it is)."""
    out = []
    for n in range(snap.shard_count):
        record = snap.shards.get(n) or {}
        primary = snap.primary(n)
        if primary is None:
            out.append(f"shard {n}: no primary")
            continue
        live = [r for r in record.get("replicas") or [] if r in snap.members]
        missing = [r for r in live if r not in (record.get("isr") or [])]
        if missing:
            out.append(f"shard {n}: {','.join(missing)} not in the ISR")
        elif not snap.caught_up(n, live):
            out.append(f"shard {n}: positions differ")
    return out


def check_replicas(session, rpc_call: Callable[[str, str, dict], dict],
                   deadline: float) -> tuple[dict[int, dict], list[str]]:
    """repl.digest on every live replica of every shard at one position.

    Returns ({shard: {node: [last, digest]}}, violations).  Replicas still at
    different positions are asked again until the deadline.
    """
    digests: dict[int, dict] = {}
    violations: list[str] = []
    snap = read_snapshot(session)
    for n in range(snap.shard_count):
        while True:
            answers, problem = _digests(snap, n, rpc_call)
            lasts = {tuple(a["last"]) for a in answers.values()}
            if problem is None and len(lasts) == 1:
                digests[n] = {r: [a["last"], a["digest"]] for r, a in answers.items()}
                if len({a["digest"] for a in answers.values()}) > 1:
                    violations.append(f"shard {n}: replicas differ at {lasts.pop()}: "
                                      + ", ".join(f"{r}={a['digest'][:12]}"
                                                  for r, a in sorted(answers.items())))
                break
            if time.monotonic() >= deadline:
                violations.append(f"shard {n}: no common position: "
                                  + (problem or ", ".join(f"{r}={a['last']}"
                                                          for r, a in sorted(answers.items()))))
                break
            time.sleep(0.5)
            snap = read_snapshot(session)
    return digests, violations


def _digests(snap: ClusterSnapshot, n: int,
             rpc_call: Callable[[str, str, dict], dict]) -> tuple[dict[str, dict], str | None]:
    record = snap.shards.get(n) or {}
    answers: dict[str, dict] = {}
    for replica in record.get("replicas") or []:
        member = snap.members.get(replica)
        if member is None or not member.get("rpc"):
            continue
        try:
            answers[replica] = rpc_call(member["rpc"], "repl.digest", {"shard": n})
        except Exception as exc:  # RpcError and friends: ask again
            return answers, f"{replica}: {type(exc).__name__}: {exc}"
    if not answers:
        return answers, "no live replica"
    return answers, None


# ---------------------------------------------------------------- faults


def pid_listening(host: str, port: int) -> int | None:
    """PID of the local process listening on host:port (via /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port and _proc_addr_matches(addr, host):
                inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return int(pid)
            except OSError:
                continue
    return None


def _proc_addr_matches(hexaddr: str, host: str) -> bool:
    """/proc/net/tcp's little-endian hex address vs a dotted (or v6) host."""
    try:
        packed = bytes.fromhex(hexaddr)
        if len(packed) == 4:
            ip = ipaddress.ip_address(packed[::-1])
        else:
            ip = ipaddress.ip_address(b"".join(packed[i:i + 4][::-1] for i in range(0, 16, 4)))
        wanted = ipaddress.ip_address(socket.gethostbyname(host) if ":" not in host else host)
    except (ValueError, OSError):
        return False
    return ip == wanted or ip.is_unspecified


def etcd_leader(endpoint_status: Callable[[str], dict], endpoints: list[str]) -> str:
    """The endpoint whose member is the etcd leader (maintenance/status on each)."""
    errors = []
    for endpoint in endpoints:
        try:
            status = endpoint_status(endpoint)
        except EtcdError as exc:
            errors.append(f"{endpoint}: {exc}")
            continue
        member = str(status.get("header", {}).get("member_id", ""))
        if member and member == str(status.get("leader", "")):
            return endpoint
    raise DrillError("no etcd endpoint says it is the leader" +
                     (f" ({'; '.join(errors)})" if errors else ""))


def kill_etcd_leader(endpoint_status: Callable[[str], dict], endpoints: list[str]) -> dict:
    """SIGKILL the etcd leader's process if it runs on this host."""
    endpoint = etcd_leader(endpoint_status, endpoints)
    parts = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
    host, port = parts.hostname or "127.0.0.1", parts.port or 2379
    pid = pid_listening(host, port)
    if pid is None:
        raise DrillError(f"the etcd leader {endpoint} does not run on this host (or its process"
                         " is not visible to this user): cannot kill it from here")
    os.kill(pid, signal.SIGKILL)
    return {"endpoint": endpoint, "pid": pid}


def choose_target(snap: ClusterSnapshot, target: str, first_account: str) -> str:
    """The member a node-target drill faults (see the module docstring)."""
    shard = shard_of(first_account, snap.shard_count)
    record = snap.shards.get(shard) or {}
    if target == "primary":
        name = snap.primary(shard)
    elif target == "follower":
        followers = [r for r in record.get("isr") or [] if r != record.get("primary")]
        name = followers[0] if followers else None
    elif target == "controller":
        name = snap.controller
    else:
        raise DrillError(f"unknown node target {target!r}")
    if not name or name not in snap.members:
        raise DrillError(f"no live {target} to fault (shard {shard}: {record or 'no record'})")
    return name


# ---------------------------------------------------------------- accounts


class DrillAccounts:
    """Temporary accounts, at least one on every shard, removed by ``remove()``."""

    def __init__(self, directory, run_id: str) -> None:
        self.directory = directory
        self.run_id = run_id
        self.passwords: dict[str, str] = {}
        self.domain = ""
        self.own_domain = False

    def create(self, shards: int, at_least: int) -> dict[str, str]:
        domains = self.directory.list_domains()
        if domains:
            self.domain = domains[0]
        else:
            self.domain = self.directory.add_domain(f"drill-{self.run_id}.invalid")
            self.own_domain = True
        covered: set[int] = set()
        for i in range(max(64, shards * 64)):
            if len(covered) >= shards and len(self.passwords) >= at_least:
                break
            address = f"drill-{self.run_id}-{i}@{self.domain}"
            shard = shard_of(address, shards)
            if shard in covered and len(self.passwords) >= at_least and len(covered) < shards:
                continue
            password = secrets.token_urlsafe(18)
            self.passwords[self.directory.add_user(address, password)] = password
            covered.add(shard)
        return dict(self.passwords)

    def by_shard(self, shards: int) -> dict[int, str]:
        out: dict[int, str] = {}
        for account in sorted(self.passwords):
            out.setdefault(shard_of(account, shards), account)
        return out

    def remove(self) -> list[str]:
        """Delete the accounts (and a domain made for the drill); returns problems."""
        problems = []
        for account in list(self.passwords):
            try:
                self.directory.remove_user(account)
            except Exception as exc:  # keep removing the others
                problems.append(f"{account}: {exc}")
        if self.own_domain:
            try:
                self.directory.remove_domain(self.domain)
            except Exception as exc:
                problems.append(f"{self.domain}: {exc}")
        return problems


def shard_of(account: str, shards: int) -> int:
    from storage.mailstore import shard_of as store_shard_of

    return store_shard_of(account.lower(), shards) if shards > 0 else 0


# ---------------------------------------------------------------- RTO


PROBE_TIMEOUT = 2.0  # seconds per probe message before the next one is sent


class Prober:
    """One thread per shard sending probe messages (each new, each once) to
    an account of that shard through the current entry nodes, until one gets
    250; ``served[shard]`` is the monotonic time of that answer."""

    def __init__(self, ledger: Ledger, by_shard: dict[int, str],
                 timeout: float = PROBE_TIMEOUT) -> None:
        self.ledger = ledger
        self.by_shard = by_shard
        self.timeout = timeout
        self.nodes: list[Endpoint] = []
        self.served: dict[int, float] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._probe, args=(i, shard, account),
                                          daemon=True, name=f"drill-probe-{shard}")
                         for i, (shard, account) in enumerate(sorted(by_shard.items()))]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout * 3)

    def _probe(self, turn: int, shard: int, account: str) -> None:
        while not self._stop.is_set():
            smtp = [n.smtp for n in self.nodes if n.smtp]
            if smtp:
                address = smtp[turn % len(smtp)]
                turn += 1
                try:
                    with smtplib.SMTP(*split_hostport(address), timeout=self.timeout,
                                      local_hostname=f"probe.{DRILL_DOMAIN}") as conn:
                        conn.ehlo()
                        delivery, _ = send_once(conn, self.ledger, (account,), f"probe {address}")
                    if delivery.acked:
                        self.served[shard] = delivery.end
                        return
                except (OSError, smtplib.SMTPException):
                    self.ledger.error("probe connect")
            self._stop.wait(0.2)


def wait_for_rto(session, ledger: Ledger, by_shard: dict[int, str], t_fault: float,
                 deadline: float, exclude: str | None = None,
                 on_snapshot: Callable[[ClusterSnapshot], None] | None = None) -> float | None:
    """Seconds from t_fault until every shard has a live primary and a probe
    delivery to an account of every shard got 250 (None: not before deadline).
    Probes enter through members other than ``exclude`` (the faulted node)."""
    prober = Prober(ledger, by_shard)
    led_at = None
    started = False
    try:
        while time.monotonic() < deadline:
            try:
                snap = read_snapshot(session)
            except EtcdError:
                time.sleep(0.2)
                continue
            if on_snapshot is not None:
                on_snapshot(snap)
            prober.nodes = [n for n in endpoints(snap) if n.name != exclude]
            if not started:
                prober.start()
                started = True
            led_at = None if snap.leaderless() else (led_at or time.monotonic())
            if led_at is not None and len(prober.served) == len(by_shard):
                return max(led_at, *prober.served.values()) - t_fault
            time.sleep(0.2)
        return None
    finally:
        prober.stop()


def wait_refused(address: str, deadline: float) -> bool:
    """True once nothing accepts connections at address (a killed node)."""
    host, port = split_hostport(address)
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
        except OSError:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- the drill


@dataclass
class DrillOptions:
    target: str = "primary"  # primary | follower | controller | etcd-member
    fault: str = "kill"  # kill | freeze (node targets)
    freeze: float = 0.0  # seconds frozen; 0: twice the lease TTL plus one
    duration: float = 20.0  # seconds of load; the fault comes after a third of it
    senders: int = 20
    imap_clients: int = 10
    settle: float = 90.0  # seconds for recovery, catch-up and reading back, each
    pause: float = 0.05  # seconds between one client's operations


@dataclass
class DrillReport:
    run_id: str
    target: str
    fault: str
    victim: str = ""
    fault_at: float = 0.0  # seconds after the load started
    rto: float | None = None
    check: CheckResult | None = None
    digests: dict[int, dict] = field(default_factory=dict)
    replica_violations: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    load_errors: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.rto is not None and self.check is not None and not self.check.violations
                and not self.replica_violations and not self.problems)

    def to_json(self) -> dict[str, Any]:
        check = self.check.to_json() if self.check else None
        return {
            "run": self.run_id, "target": self.target, "fault": self.fault,
            "victim": self.victim, "fault_at": round(self.fault_at, 3),
            "rto": None if self.rto is None else round(self.rto, 3),
            "check": check,
            "lost": check["lost"] if check else None,
            "duplicated": check["duplicated"] if check else None,
            "replicas_identical": not self.replica_violations and bool(self.digests),
            "replica_violations": self.replica_violations,
            "shards_digested": len(self.digests),
            "problems": self.problems, "load_errors": self.load_errors, "ok": self.ok,
        }

    def lines(self) -> list[str]:
        yes = {True: "yes", False: "NO"}
        out = [f"drill {self.run_id}: target {self.target} ({self.victim or '?'}, {self.fault})"
               f" after {self.fault_at:.1f} s of load"]
        out.append(f"RTO: {self.rto:.2f} s" if self.rto is not None
                   else "RTO: not recovered before the deadline")
        c = self.check
        if c is not None:
            out.append(f"acknowledged: {c.acked}  unacknowledged: {c.unacked}"
                       f" ({c.unacked_present} of them committed anyway)")
            out.append(f"lost: {len(c.lost)}  duplicated: {len(c.duplicated)}")
            out.append(f"UIDs monotonic: {yes[not c.uid_violations]}  MODSEQ monotonic:"
                       f" {yes[not c.modseq_violations]}  flags kept: {yes[not c.flag_violations]}")
            out += [f"  violation: {v}" for v in c.violations[:50]]
        out.append(f"replicas byte-identical: {yes[not self.replica_violations]}"
                   f" ({len(self.digests)} shards digested)")
        out += [f"  replica: {v}" for v in self.replica_violations]
        out += [f"problem: {p}" for p in self.problems]
        if self.load_errors:
            out.append("load errors (expected around the fault): " + ", ".join(
                f"{k} x{v}" for k, v in sorted(self.load_errors.items())))
        out.append(f"result: {'PASS' if self.ok else 'FAIL'}")
        return out


class Drill:
    """One failover drill (see DrillOptions); ``run()`` returns the report."""

    def __init__(self, session, directory, options: DrillOptions,
                 rpc_call: Callable[[str, str, dict], dict],
                 endpoint_status: Callable[[str], dict], etcd_endpoints: list[str],
                 lease_ttl: float, progress: Callable[[str], None] = lambda _: None) -> None:
        self.session = session
        self.options = options
        self.rpc_call = rpc_call
        self.endpoint_status = endpoint_status
        self.etcd_endpoints = etcd_endpoints
        self.lease_ttl = lease_ttl
        self.progress = progress
        self.run_id = secrets.token_hex(3)
        self.ledger = Ledger(self.run_id)
        self.thaw_at = 0.0
        self.accounts = DrillAccounts(directory, self.run_id)
        self.report = DrillReport(self.run_id, options.target,
                                  "kill" if options.target == "etcd-member" else options.fault)

    def run(self) -> DrillReport:
        snap = read_snapshot(self.session)
        if snap.meta is None:
            raise DrillError("etcd holds no cluster (postroom cluster init)")
        if snap.leaderless():
            raise DrillError(f"shards without a primary before the drill: {snap.leaderless()}")
        try:
            self._run(snap)
        finally:
            self.report.problems += [f"cleanup: {p}" for p in self.accounts.remove()]
        return self.report

    def _run(self, snap: ClusterSnapshot) -> None:
        o = self.options
        passwords = self.accounts.create(snap.shard_count, max(1, o.imap_clients))
        by_shard = self.accounts.by_shard(snap.shard_count)
        self.progress(f"{len(passwords)} drill accounts on {len(by_shard)} shards")
        load = Load(self.ledger, passwords, o.senders, o.imap_clients, o.pause)
        load.set_nodes(endpoints(snap))
        started = time.monotonic()
        load.start()
        try:
            self._refresh_until(load, started + o.duration / 3)
            t_fault = self._inject(read_snapshot(self.session), sorted(passwords)[0])
            self.report.fault_at = t_fault - started
            self.progress(f"fault injected on {self.report.victim}")
            exclude = self.report.victim if o.target != "etcd-member" else None
            self.report.rto = wait_for_rto(
                self.session, self.ledger, by_shard, t_fault, t_fault + o.settle, exclude,
                lambda s: load.set_nodes(endpoints(s)))
            rto = self.report.rto
            self.progress("RTO " + ("not reached" if rto is None else f"{rto:.2f} s"))
            self._refresh_until(load, max(started + o.duration, time.monotonic() + 2))
        finally:
            load.stop()
        self.report.load_errors = dict(self.ledger.errors)
        self._verify()

    def _refresh_until(self, load: Load, until: float) -> None:
        while time.monotonic() < until:
            try:
                load.set_nodes(endpoints(read_snapshot(self.session)))
            except EtcdError:
                pass
            time.sleep(min(0.5, max(0.0, until - time.monotonic())))

    def _inject(self, snap: ClusterSnapshot, first_account: str) -> float:
        o = self.options
        if o.target == "etcd-member":
            detail = kill_etcd_leader(self.endpoint_status, self.etcd_endpoints)
            self.report.victim = f"etcd {detail['endpoint']} (pid {detail['pid']})"
            return time.monotonic()
        victim = choose_target(snap, o.target, first_account)
        self.report.victim = victim
        address = snap.members[victim]["rpc"]
        freeze = o.freeze or 2 * self.lease_ttl + 1
        answer = self.rpc_call(address, "drill.fault", {"kind": o.fault, "duration": freeze})
        t_fault = time.monotonic() + float(answer.get("delay", 0))
        time.sleep(max(0.0, t_fault - time.monotonic()))
        if o.fault == "kill" and not wait_refused(address, time.monotonic() + 10):
            self.report.problems.append(f"{victim} still accepts connections after SIGKILL")
        if o.fault == "freeze":
            self.thaw_at = t_fault + freeze + 1.0
        return t_fault

    def _verify(self) -> None:
        o = self.options
        if o.fault == "freeze" and o.target != "etcd-member":
            self._wait_member(self.report.victim, self.thaw_at + o.settle)
        try:
            snap = wait_caught_up(self.session, time.monotonic() + o.settle)
        except DrillError as exc:
            self.report.problems.append(str(exc))
            snap = read_snapshot(self.session)
        self.progress("replicas caught up; reading every mailbox back")
        finals = collect_mailboxes(self.accounts.passwords, endpoints(snap),
                                   time.monotonic() + o.settle)
        self.report.check = check(self.ledger, finals)
        self.report.digests, self.report.replica_violations = check_replicas(
            self.session, self.rpc_call, time.monotonic() + o.settle)

    def _wait_member(self, name: str, deadline: float) -> None:
        """A frozen node must come back (new lease) and rejoin as a member."""
        while time.monotonic() < deadline:
            try:
                back = name in read_snapshot(self.session).members
                if back and time.monotonic() >= self.thaw_at:
                    return
            except EtcdError:
                pass
            time.sleep(0.5)
        self.report.problems.append(f"{name} did not rejoin the cluster after the freeze")
