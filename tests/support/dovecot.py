"""A private Dovecot IMAP server for tests (differential checks against postroom).

It runs from its own configuration, base_dir and state directory under one
temporary directory, listens on a free loopback port, stores mail as Maildir
there, and never touches the system instance (``dovecot -c FILE``).  Users are
in a passwd-file with PLAIN passwords; plaintext login is allowed because the
listener is loopback only.  When the tests run as root, mail processes run as
the ``mail`` user (Dovecot refuses UID 0 for mail access); otherwise every
service runs as the current user.  Stopped by the master's PID.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DOVECOT = "/usr/sbin/dovecot"
START_DEADLINE = 30.0
STOP_DEADLINE = 20.0

CONF = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{root}/mail/%u
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
last_valid_uid = 0
first_valid_gid = {gid}
default_internal_user = {internal}
default_internal_group = {internal_group}
default_login_user = {internal}
imap_max_line_length = 1M
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (no pytest import, so benchmarks can use this too)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def available() -> bool:
    """True when Debian's dovecot-imapd is installed."""
    return shutil.which("dovecot") is not None and os.path.exists("/usr/lib/dovecot/imap")


class DovecotServer:
    """One private Dovecot serving IMAP on 127.0.0.1:``port``.

    ``root`` must exist, and its ancestors must be traversable by the mail
    and dovecot users (``tempfile`` makes 0700 directories: chmod them).
    """

    host = "127.0.0.1"

    def __init__(self, root: Path, users: dict[str, str]) -> None:
        self.root = Path(root)
        self.users = users
        self.port = free_port()
        self.conf = self.root / "dovecot.conf"
        self.started = False

    def _write_config(self) -> None:
        if os.geteuid() == 0:
            mail = pwd.getpwnam("mail")
            uid, gid, internal, internal_group = mail.pw_uid, mail.pw_gid, "dovecot", "dovecot"
        else:
            uid, gid = os.getuid(), os.getgid()
            internal = pwd.getpwuid(uid).pw_name
            internal_group = grp.getgrgid(gid).gr_name
        os.chmod(self.root, 0o755)  # the mail user must traverse it
        for d in ("mail", "state"):
            (self.root / d).mkdir(mode=0o755, exist_ok=True)
        os.chown(self.root / "mail", uid, gid)
        self.conf.write_text(
            CONF.format(root=self.root, uid=uid, gid=gid, internal=internal,
                        internal_group=internal_group, imap=self.port)
        )
        (self.root / "users").write_text(
            "".join(
                f"{u}:{{PLAIN}}{pw}:{uid}:{gid}::{self.root / 'mail' / u}::\n"
                for u, pw in self.users.items()
            )
        )

    def start(self) -> None:
        self._write_config()
        # The daemonized master inherits stdout/stderr: never hand it a pipe.
        with open(self.root / "start.err", "wb") as err:
            result = subprocess.run(
                [DOVECOT, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, timeout=30,
            )
        if result.returncode != 0:
            errors = (self.root / "start.err").read_text(errors="replace")
            raise RuntimeError(f"dovecot failed to start: {errors}\n{self.log_tail()}")
        self.started = True
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((self.host, self.port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"dovecot did not listen on {self.host}:{self.port}\n{self.log_tail()}")

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "run" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """SIGTERM the master (it stops its children), SIGKILL after a deadline."""
        if not self.started:
            return
        self.started = False
        pid = self.master_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_DEADLINE
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "dovecot.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(text[-lines:])
