"""A real single-member etcd for tests, started by PID on free loopback ports.

Usage from a conftest::

    from tests.support.etcd import etcd_server  # noqa: F401  (a pytest fixture)

or directly: ``with EtcdServer(tmp_path) as srv: srv.client_url``.

The process runs under ``setpriv --pdeathsig KILL`` so it dies with the test
process even if teardown never runs.  Readiness is ``GET /health`` polled with
a deadline; nothing sleeps to wait.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ETCD_BINARY_CANDIDATES = ("etcd", "/usr/bin/etcd")


def find_etcd() -> str | None:
    """Path of an etcd binary, or None (Debian package: etcd-server)."""
    for candidate in ETCD_BINARY_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


_GIVEN: set[int] = set()  # ports free_port handed out in this process


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on host (the kernel picks it), never
    one this process got before (the kernel may pick a just-closed port again,
    and a node binding it later would find it taken by another listener)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def terminate(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Stop a test's server process: SIGTERM, SIGKILL after ``timeout``, reap."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_healthy(client_url: str, deadline: float, proc: subprocess.Popen | None = None) -> None:
    """Poll /health until {"health": "true"} or raise TimeoutError at deadline."""
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"etcd exited early with status {proc.returncode}")
        try:
            with urllib.request.urlopen(client_url + "/health", timeout=0.5) as resp:
                body = json.loads(resp.read() or b"{}")
                if body.get("health") == "true":
                    return
                last = repr(body)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = str(exc)
        # Poll interval only; readiness is decided by /health, not by the sleep.
        time.sleep(0.02)
    raise TimeoutError(f"etcd at {client_url} not healthy before deadline: {last}")


class EtcdServer:
    """One etcd member on 127.0.0.1 with its own temp data dir."""

    def __init__(self, base_dir: Path | None = None, host: str = "127.0.0.1") -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="postroom-etcd-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self.proc: subprocess.Popen | None = None
        binary = find_etcd()
        if binary is None:
            raise RuntimeError("etcd binary not found (install the Debian package etcd-server)")
        self.binary = binary

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart, same ports and data) and wait for /health."""
        data_dir = self.base_dir / "data"
        argv = [
            self.binary,
            "--name", "m1",
            "--data-dir", str(data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"m1={self.peer_url}",
            "--initial-cluster-state", "new",
            # One member: it elects itself after the election timeout (1 s by
            # default, up to 2 s); 200 ms makes each start/restart that much
            # shorter.  No peer exists to miss a heartbeat.
            "--heartbeat-interval", "20", "--election-timeout", "200",
        ]  # fmt: skip
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", *argv]
        log = open(self.base_dir / "etcd.log", "ab")  # noqa: SIM115 (closed in stop)
        try:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        wait_healthy(self.client_url, time.monotonic() + timeout, self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after the deadline; waits for the PID."""
        proc, self.proc = self.proc, None
        terminate(proc, timeout)

    def kill(self) -> None:
        """SIGKILL now (a crash) and reap."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def skip_without_etcd() -> None:
    if find_etcd() is None:
        pytest.skip("etcd binary not installed (Debian package etcd-server)")


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh real etcd per test (about 0.2 s to start)."""
    skip_without_etcd()
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.close()


REPO = Path(__file__).resolve().parents[2]


def run_patched(module: str, function: str, *args: str, timeout: float = 120.0) -> str:
    """Run module.function(*args) in a fresh gevent-monkey-patched Python.

    The etcd session's watches and lease refresher are greenlets: they need
    the process to be patched first thing, which a pytest process is not.
    Fails the calling test with the child's output when the child fails;
    returns its stdout otherwise.
    """
    code = (
        "from node.launch import patch; patch()\n"
        "import importlib, sys\n"
        f"getattr(importlib.import_module({module!r}), {function!r})(*sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        pytest.fail(
            f"{module}.{function} failed (status {result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}",
            pytrace=False,
        )
    return result.stdout
