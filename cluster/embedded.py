"""A local single-member etcd for a node that has no etcd endpoints configured.

One node on one machine needs nothing else: the node starts ``etcd`` as a
child process with its data under ``<data_dir>/etcd`` and its log in
``<data_dir>/etcd.log``, waits for ``GET /health`` with a deadline, and stops
it (SIGTERM, then SIGKILL after a deadline) on shutdown.  On Linux the child
runs under ``setpriv --pdeathsig TERM`` so it never outlives the node, even
when the node is killed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_BINARY = "/usr/bin/etcd"


class EmbeddedEtcdError(RuntimeError):
    """The embedded etcd could not be started; the message says why, in one line."""


def find_binary(configured: str = "") -> str:
    """The etcd binary: configured path, else PATH, else /usr/bin/etcd."""
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise EmbeddedEtcdError(f"etcd binary not found or not executable: {configured}")
    found = shutil.which("etcd")
    if found:
        return found
    if os.path.isfile(DEFAULT_BINARY) and os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    raise EmbeddedEtcdError(
        "etcd binary not found (install the Debian package etcd-server, "
        "or set etcd.embedded_binary, or configure etcd.endpoints)"
    )


def check_health(client_url: str, timeout: float = 0.5) -> bool:
    """True when GET /health answers {"health": "true"}."""
    try:
        with urllib.request.urlopen(client_url.rstrip("/") + "/health", timeout=timeout) as r:
            return json.loads(r.read() or b"{}").get("health") == "true"
    except (OSError, urllib.error.URLError, ValueError):
        return False


class EmbeddedEtcd:
    """One etcd member on this machine, owned by this process."""

    def __init__(self, data_dir: Path, binary: str, client_url: str, peer_url: str) -> None:
        self.data_dir = Path(data_dir)
        self.binary = binary
        self.client_url = client_url.rstrip("/")
        self.peer_url = peer_url.rstrip("/")
        self.proc: subprocess.Popen | None = None

    @property
    def etcd_dir(self) -> Path:
        return self.data_dir / "etcd"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    def argv(self, binary: str) -> list[str]:
        argv = [
            binary,
            "--name", "postroom",
            "--data-dir", str(self.etcd_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"postroom={self.peer_url}",
            "--initial-cluster-state", "new",
        ]  # fmt: skip
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "TERM", *argv]
        return argv

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until healthy; raises EmbeddedEtcdError."""
        if self.proc is not None and self.proc.poll() is None:
            return
        binary = find_binary(self.binary)
        if check_health(self.client_url):
            raise EmbeddedEtcdError(
                f"something already answers at {self.client_url}; "
                "stop it or change etcd.embedded_client_url"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.etcd_dir.mkdir(mode=0o700, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            try:
                self.proc = subprocess.Popen(
                    self.argv(binary),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                )
            except OSError as exc:
                raise EmbeddedEtcdError(f"cannot run {binary}: {exc.strerror}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise EmbeddedEtcdError(
                    f"embedded etcd exited with status {code}; see {self.log_path}"
                )
            if check_health(self.client_url):
                log.info("embedded etcd healthy at %s (pid %d)", self.client_url, self.proc.pid)
                return
            time.sleep(0.05)  # poll interval; cooperative under gevent
        self.stop()
        raise EmbeddedEtcdError(
            f"embedded etcd not healthy within {timeout:g}s; see {self.log_path}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after timeout seconds; reaps the child."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("embedded etcd ignored SIGTERM for %gs; killing", timeout)
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None
