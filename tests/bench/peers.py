"""Private Postfix + Dovecot instances on loopback, for side-by-side figures.

Postfix (SMTP, queue fsynced before 250) hands every message over LMTP to
Dovecot, which stores it in Maildir with ``mail_fsync = always``; Dovecot
also serves IMAP and POP3.  Both run from their own configuration and state
directories under one temporary directory, on free high loopback ports, and
never touch the system instances (``postfix -c DIR``, ``dovecot -c FILE``).

Postfix's ``250`` means "queued", not "in the mailbox": the benchmark also
measures when the last message reached Maildir (the newest file's mtime).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"
START_DEADLINE = 30.0


def installed() -> bool:
    """True when the Debian postfix and dovecot-{imapd,pop3d,lmtpd} are present."""
    return all(
        os.path.exists(p)
        for p in (
            POSTFIX,
            DOVECOT,
            DOVEADM,
            "/usr/lib/dovecot/imap",
            "/usr/lib/dovecot/pop3",
            "/usr/lib/dovecot/lmtp",
        )
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float, what: str) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port}")


MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{smtp} inet n -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/postfix-queue
data_directory = {root}/postfix-data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
myhostname = peer.bench.test
mydomain = peer.bench.test
myorigin = peer.bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
relayhost =
virtual_mailbox_domains = bench.test
virtual_mailbox_maps = texthash:{root}/postfix-vmailbox
virtual_transport = lmtp:inet:127.0.0.1:{lmtp}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_tls_security_level = none
smtp_tls_security_level = none
biff = no
"""

DOVECOT_CONF = """\
base_dir = {root}/dovecot-run
state_dir = {root}/dovecot-state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap pop3 lmtp
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
pop3_uidl_format = %08Xu%08Xv
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
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp}
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@bench.test
}}
"""


class PostfixDovecot:
    """Postfix -> LMTP -> Dovecot (Maildir, fsync always), IMAP and POP3 too."""

    def __init__(self, root: Path, users: list[str], password: str) -> None:
        self.root = Path(root)
        self.users = users
        self.password = password
        self.ports = {k: free_port() for k in ("smtp", "imap", "pop3", "lmtp")}
        self.postfix_dir = self.root / "postfix-etc"
        self.dovecot_conf = self.root / "dovecot.conf"
        self.mail_dir = self.root / "mail"
        self.postfix_started = False
        self.dovecot_started = False

    # -- configuration

    def _write_configs(self) -> None:
        mail = pwd.getpwnam("mail")
        os.chmod(self.root, 0o755)  # the postfix and mail users must traverse it
        self.postfix_dir.mkdir()
        fmt = {"root": self.root, **self.ports, "uid": mail.pw_uid, "gid": mail.pw_gid}
        (self.postfix_dir / "main.cf").write_text(MAIN_CF.format(**fmt))
        (self.postfix_dir / "master.cf").write_text(MASTER_CF.format(**fmt))
        (self.root / "postfix-vmailbox").write_text("".join(f"{u} ok\n" for u in self.users))
        self.dovecot_conf.write_text(DOVECOT_CONF.format(**fmt))
        (self.root / "dovecot-users").write_text(
            "".join(
                f"{u}:{{PLAIN}}{self.password}:{mail.pw_uid}:{mail.pw_gid}::{self.mail_dir / u}::\n"
                for u in self.users
            )
        )
        for d in ("mail", "dovecot-state", "postfix-queue", "postfix-data"):
            (self.root / d).mkdir(mode=0o755)
        os.chown(self.mail_dir, mail.pw_uid, mail.pw_gid)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.root / "postfix-data", postfix.pw_uid, postfix.pw_gid)

    # -- lifecycle

    def start(self) -> None:
        self._write_configs()
        deadline = time.monotonic() + START_DEADLINE
        subprocess.run([DOVECOT, "-c", str(self.dovecot_conf)], check=True, timeout=30)
        self.dovecot_started = True
        for name in ("lmtp", "imap", "pop3"):
            wait_port(self.ports[name], deadline, f"dovecot {name}")
        self.postfix_started = True  # a half-started master is stopped too
        result = subprocess.run(
            [POSTFIX, "-c", str(self.postfix_dir), "start"], timeout=60, capture_output=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed:\n{self.log_tail()}")
        wait_port(self.ports["smtp"], deadline, "postfix smtpd")

    def stop(self) -> None:
        """Stop both; safe to call twice and after a failed start."""
        if self.postfix_started:
            subprocess.run(
                [POSTFIX, "-c", str(self.postfix_dir), "stop"], capture_output=True, timeout=60
            )
            self.postfix_started = False
        if self.dovecot_started:
            subprocess.run(
                [DOVEADM, "-c", str(self.dovecot_conf), "stop"], capture_output=True, timeout=60
            )
            self._wait_dovecot_gone()
            self.dovecot_started = False

    def _wait_dovecot_gone(self) -> None:
        pidfile = self.root / "dovecot-run" / "master.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, 9)

    def master_pids(self) -> list[int]:
        """PIDs of the two master processes (their children are per-service)."""
        pids = []
        for path in (
            self.root / "postfix-data" / "master.lock",
            self.root / "dovecot-run" / "master.pid",
        ):
            try:
                pids.append(int(path.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        return pids

    # -- observation

    def cpu(self) -> float:
        """CPU seconds used so far by both masters and every descendant.

        A reaped child's time lands in its parent's cutime/cstime, a live one's
        in its own utime/stime, so the sum only grows and a delta between two
        calls is the peer's CPU over that interval.
        """
        return tree_cpu(self.master_pids())

    def delivered(self, with_mtime: bool = False) -> tuple[int, float]:
        """(messages in every Maildir, newest file mtime if with_mtime else 0).

        Counting needs only directory listings; the mtimes cost a stat per
        file, so they are read once, after the queue has drained.
        """
        count = 0
        newest = 0.0
        if not self.mail_dir.exists():
            return 0, 0.0
        for user in os.scandir(self.mail_dir):
            for sub in ("new", "cur"):
                try:
                    entries = os.scandir(os.path.join(user.path, sub))
                except FileNotFoundError:
                    continue
                with entries:
                    for e in entries:
                        count += 1
                        if with_mtime:
                            newest = max(newest, e.stat().st_mtime)
        return count, newest

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("postfix.log", "dovecot.log"):
            try:
                text = (self.root / name).read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                continue
            out.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(out)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu(roots: list[int]) -> float:
    """utime+stime+cutime+cstime of roots and all their descendants, seconds."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        times[pid] = sum(int(x) for x in fields[11:15]) / CLK_TCK
    total = 0.0
    stack = list(roots)
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack += children.get(pid, [])
    return total


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
