"""cluster/embedded.py: a real etcd child process, started and stopped by PID."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.embedded import EmbeddedEtcd, EmbeddedEtcdError, check_health, find_binary
from cluster.etcd import EtcdSession
from tests.support.etcd import free_port, skip_without_etcd


def _urls() -> tuple[str, str]:
    return f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"


def test_start_stop_keeps_data(tmp_path: Path) -> None:
    skip_without_etcd()
    client, peer = _urls()
    etcd = EmbeddedEtcd(tmp_path, "", client, peer)
    etcd.start(timeout=30)
    try:
        assert check_health(client)
        assert (tmp_path / "etcd" / "member").is_dir()
        assert (tmp_path / "etcd.log").stat().st_size > 0
        EtcdSession([client], "/e", 5, 2.0).put("/k", "kept")
        pid = etcd.pid
        assert pid is not None
    finally:
        etcd.stop()
    assert not check_health(client)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    etcd.start(timeout=30)  # same data dir: the key survived
    try:
        assert EtcdSession([client], "/e", 5, 2.0).get("/k").value == "kept"
    finally:
        etcd.stop()


def test_refuses_a_taken_client_url(tmp_path: Path, etcd_server) -> None:
    etcd = EmbeddedEtcd(tmp_path, "", etcd_server.client_url, _urls()[1])
    with pytest.raises(EmbeddedEtcdError, match="already answers"):
        etcd.start(timeout=5)


def test_missing_binary_names_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(EmbeddedEtcdError, match="not found"):
        find_binary(str(tmp_path / "no-such-etcd"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("cluster.embedded.DEFAULT_BINARY", str(tmp_path / "etcd"))
    with pytest.raises(EmbeddedEtcdError, match="etcd-server"):
        find_binary("")


def test_etcd_that_exits_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "false-etcd"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    client, peer = _urls()
    with pytest.raises(EmbeddedEtcdError, match="status 3"):
        EmbeddedEtcd(tmp_path, str(fake), client, peer).start(timeout=10)
