"""Shared set-up of the IMAP benchmarks (not a test module): a postroom node
with preloaded mailboxes, and a private Dovecot (IMAP only) with the same mail.

postroom mailboxes are filled through the intents ``MailStore.append``
submits (the committer logs and applies one append op per message), with
the per-body work (parse, text extraction, blob write) done once per
distinct body.  Dovecot gets the same messages as Maildir files.
The caller runs under gevent (monkey-patched) and stops what it started.
"""

from __future__ import annotations

import functools
import os
import pwd
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from storage import fts
from storage import shard as ops
from storage.mailstore import MailStore
from storage.mime import parse_metadata
from tests.bench import peers
from tests.support.node import NodeProcess

DOMAIN = "bench.test"
PASSWORD = "bench-pw-1234"
SHARDS = 16  # the node's default


def users(n: int) -> list[str]:
    return [f"user{i}@{DOMAIN}" for i in range(n)]


def body(i: int, subject: bytes | None = None, to: bytes = b"someone@bench.test") -> bytes:
    """Bench message i (2-4 KB); the subject defaults to "bench message i about topic i%17"."""
    filler = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit %d.\r\n" % i) * (
        30 + i % 30
    )
    if subject is None:
        subject = b"bench message %d about topic %d" % (i, i % 17)
    return (
        b"From: Sender %d <sender%d@example.test>\r\n"
        b"To: %s\r\n"
        b"Subject: %s\r\n"
        b"Date: Mon, 7 Feb 2022 21:52:25 -0800\r\n"
        b"Message-ID: <%d@bench.test>\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"\r\n" % (i, i, to, subject, i)
    ) + filler


def flags_for(i: int) -> list[str]:
    flags = []
    if i % 2 == 0:
        flags.append("\\Seen")
    if i % 7 == 0:
        flags.append("\\Flagged")
    if i % 50 == 0:
        flags.append("$Label1")
    return sorted(flags)


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def make_node(base: Path, accounts: list[str], overrides: dict | None = None) -> NodeProcess:
    """A node with bench.test and the accounts (started, then stopped)."""
    settings = {"storage": {"shards": SHARDS}}
    for k, v in (overrides or {}).items():
        settings.setdefault(k, {}).update(v)
    node = NodeProcess(base, settings)
    node.start()
    try:
        node.cli("domain", "add", DOMAIN, check=True)
        proc = subprocess.run(
            ["python3", str(Path(__file__).with_name("provision_cheap.py")), str(node.config_path),
             *accounts],
            input=PASSWORD + "\n", text=True, capture_output=True, env=node.env, timeout=600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"provision failed: {proc.stderr[-2000:]}")
    finally:
        node.stop()
    return node


def fill(store: MailStore, accounts: list[str], count: int, bodies: list[bytes], *,
         flags: Callable[[int], list[str]] = lambda i: [],
         internaldate: Callable[[int], float] = lambda i: 1.6e9 + i,
         start: int = 0, batch: int = 4000) -> float:
    """Append ``count`` messages to each account's INBOX of an open store;
    returns the seconds the appends took.

    Message i (from ``start``) gets ``bodies[i % len(bodies)]``,
    ``flags(i)`` and ``internaldate(i)``; accounts take turns.  The work per
    distinct body (parse, text extraction, blob write) is done once; each
    message is still its own append op, submitted as the intent
    ``MailStore.append`` submits, many at a time to the group committers.
    The one account preloader of the IMAP benchmarks."""
    metas = [parse_metadata(b) for b in bodies]
    docs = [(fts.extract(b, m),) for b, m in zip(bodies, metas, strict=True)]
    blobs = [store.blobs.put(b) for b in bodies]
    for acct in accounts:
        store.ensure_account(acct)
    t0 = time.perf_counter()
    total = len(accounts) * count
    for lo in range(0, total, batch):
        pending = []
        for n in range(lo, min(total, lo + batch)):
            acct, i = accounts[n % len(accounts)], start + n // len(accounts)
            k = i % len(bodies)
            pending.append(store.committer_for(acct).submit_nowait(functools.partial(
                ops.intent_append, account=acct, mailbox="INBOX", blob=blobs[k],
                size=len(bodies[k]), flags=sorted(flags(i)), internaldate=internaldate(i),
                meta=metas[k], search_doc=docs[k],
            )))
        for p in pending:
            p.get()
    return time.perf_counter() - t0


def preload(mail_dir: Path, accounts: list[str], per_account: int, distinct: int = 200,
            start: int = 0) -> float:
    """Append per_account bench messages to each account's INBOX; returns seconds."""
    store = MailStore(mail_dir, SHARDS, fsync=False, group_commit_max=512)
    store.open()
    try:
        return fill(store, accounts, per_account, [body(i) for i in range(distinct)],
                    flags=flags_for, start=start)
    finally:
        store.close()


DOVECOT_CONF = """\
base_dir = {root}/dovecot-run
state_dir = {root}/dovecot-state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{root}/mail/%u
mail_fsync = always
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
first_valid_gid = {gid}
default_process_limit = {procs}
default_client_limit = {clients}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/dovecot-users
}}
userdb {{
  driver = passwd-file
  args = {root}/dovecot-users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 2
  client_limit = {clients}
}}
service imap {{
  process_limit = {procs}
}}
service anvil {{
  client_limit = {clients}
}}
service auth {{
  client_limit = {clients}
}}
protocol imap {{
  mail_max_userip_connections = {clients}
}}
"""


class Dovecot:
    """A private Dovecot 2.3 serving IMAP only (one imap process per session,
    its default; login processes in high-performance mode), Maildir with
    mail_fsync = always, stopped with ``doveadm -c FILE stop``."""

    def __init__(self, root: Path, accounts: list[str], max_sessions: int = 3000) -> None:
        self.root = Path(root)
        self.accounts = accounts
        self.port = peers.free_port()
        self.conf = self.root / "dovecot.conf"
        self.mail_dir = self.root / "mail"
        self.max_sessions = max_sessions
        self.started = False

    def preload(self, per_account: int, distinct: int = 200) -> None:
        """The same messages as preload(), as Maildir files (cur/, flags in the name)."""
        mail = pwd.getpwnam("mail")
        self.root.mkdir(parents=True, exist_ok=True)
        bodies = [body(i) for i in range(distinct)]
        for acct in self.accounts:
            base = self.mail_dir / acct
            for folder in ("", ".Sent", ".Drafts", ".Trash", ".Junk", ".Archive"):
                for sub in ("cur", "new", "tmp"):  # postroom's default folders, as Maildir++
                    (base / folder / sub).mkdir(parents=True, exist_ok=True)
            for i in range(per_account):
                letters = "".join(
                    c for f, c in (("\\Flagged", "F"), ("\\Seen", "S")) if f in flags_for(i)
                )
                name = base / "cur" / f"{1600000000 + i}.M{i}P1.bench:2,{letters}"
                name.write_bytes(bodies[i % distinct])
                os.utime(name, (1.6e9 + i, 1.6e9 + i))
        for dirpath, _dirs, files in os.walk(self.mail_dir):
            os.chown(dirpath, mail.pw_uid, mail.pw_gid)
            for f in files:
                os.chown(os.path.join(dirpath, f), mail.pw_uid, mail.pw_gid)

    def start(self) -> None:
        mail = pwd.getpwnam("mail")
        os.chmod(self.root.parent, 0o755)  # dovecot's auth user must traverse it
        os.chmod(self.root, 0o755)
        for d in ("mail", "dovecot-state"):
            (self.root / d).mkdir(mode=0o755, exist_ok=True)
        os.chown(self.mail_dir, mail.pw_uid, mail.pw_gid)
        self.conf.write_text(DOVECOT_CONF.format(
            root=self.root, imap=self.port, uid=mail.pw_uid, gid=mail.pw_gid,
            procs=self.max_sessions + 50, clients=self.max_sessions * 4 + 100,
        ))
        (self.root / "dovecot-users").write_text("".join(
            f"{u}:{{PLAIN}}{PASSWORD}:{mail.pw_uid}:{mail.pw_gid}::{self.mail_dir / u}::\n"
            for u in self.accounts
        ))
        subprocess.run([peers.DOVECOT, "-c", str(self.conf)], check=True, timeout=30)
        self.started = True
        peers.wait_port(self.port, time.monotonic() + peers.START_DEADLINE, "dovecot imap")

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "dovecot-run" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if not self.started:
            return
        subprocess.run([peers.DOVEADM, "-c", str(self.conf), "stop"], capture_output=True,
                       timeout=60)
        pid = self.master_pid()
        deadline = time.monotonic() + 20
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.started = False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(
                (self.root / "dovecot.log").read_text(errors="replace").splitlines()[-lines:]
            )
        except FileNotFoundError:
            return ""


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack += children.get(pid, [])
    return out


def memory_mb(pids: list[int]) -> tuple[float, float]:
    """(sum of RSS, sum of PSS) in MB over the processes (PSS splits shared pages)."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024
