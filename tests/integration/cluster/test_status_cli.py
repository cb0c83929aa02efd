"""`postroom status` (cluster view) and `postroom node drain|undrain` against a
real etcd holding cluster records written by the test (docs/cluster.md keys).

No node runs: the commands read etcd only.  Members are written under a
real lease, as nodes write them, so "primary alive" is decided the way the
controller decides it (member present, lease equal to primary_lease).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.etcd import EtcdSession
from tests.support.etcd import REPO, EtcdServer

PREFIX = "/statuscli"


def _run(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("POSTROOM_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "node", "--config", str(config), *args],
        capture_output=True, text=True, cwd=str(REPO), env=env, timeout=60,
    )


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> Iterator[EtcdSession]:
    session = EtcdSession([etcd_server.client_url], PREFIX, lease_ttl=60)
    session.start()  # a lease for the member keys, like a node's
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def config(etcd_server: EtcdServer, tmp_path: Path) -> Path:
    path = tmp_path / "postroom.toml"
    path.write_text(f'[etcd]\nendpoints = ["{etcd_server.client_url}"]\nprefix = "{PREFIX}"\n')
    return path


def _shard(primary: str | None, lease: int, replicas: list[str], isr: list[str],
           epoch: int = 1, transfer_to: str | None = None) -> dict:
    return {"epoch": epoch, "primary": primary, "primary_lease": lease,
            "replicas": replicas, "isr": isr, "transfer_to": transfer_to}


def _write_cluster(etcd: EtcdSession) -> int:
    """Three members n1..n3 under our lease, 3 shards led by n1, n2, n3."""
    lease = etcd.lease_id
    etcd.put("/cluster/meta", {"id": "c-test", "shards": 3, "replication_factor": 3,
                               "created": time.time()})
    for i in (1, 2, 3):
        etcd.put(f"/members/n{i}", {
            "node_id": f"n{i}", "version": "0.1.0", "hostname": f"n{i}.test", "pid": 100 + i,
            "labels": {"host": f"h{i}", "zone": f"z{i}"}, "rpc": f"127.0.0.{i + 1}:7400",
            "listeners": {"smtp": [f"127.0.0.{i + 1}:25"]}, "lease": lease,
            "started": time.time() - 3600 * i,
        }, lease=True)
    everyone = ["n1", "n2", "n3"]
    for n, primary in enumerate(everyone):
        etcd.put(f"/shards/{n:04d}", _shard(primary, lease, everyone, everyone, epoch=n + 1))
    etcd.put("/controller", {"node": "n2", "lease": lease})
    etcd.put("/positions/n1", {"shards": {"0": [40, 1], "1": [30, 2], "2": [19, 3]}, "ts": 1.0})
    etcd.put("/positions/n2", {"shards": {"0": [37, 1], "1": [30, 2], "2": [20, 3]}, "ts": 1.0})
    etcd.put("/positions/n3", {"shards": {"0": [40, 1], "1": [25, 2], "2": [20, 3]}, "ts": 1.0})
    return lease


def test_status_shows_the_cluster(etcd: EtcdSession, config: Path) -> None:
    _write_cluster(etcd)
    result = _run(config, "status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cluster: c-test  shards: 3  replication factor: 3  controller: n2" in out
    assert "members: 3" in out
    assert "shards: 3, without primary: 0" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    # members: name, rpc, version, labels, age, pid, draining
    assert rows["n3"][1:4] == ["127.0.0.4:7400", "0.1.0", "host=h3,zone=z3"]
    assert rows["n3"][4].startswith("3h")
    # shards: epoch, primary, replicas, isr, transfer, primary's index, lag per replica
    assert rows["0000"][1:] == ["1", "n1", "n1,n2,n3", "n1,n2,n3", "-", "40", "n2=3", "n3=0"]
    assert rows["0001"][1:] == ["2", "n2", "n1,n2,n3", "n1,n2,n3", "-", "30", "n1=0", "n3=5"]
    assert rows["0002"][6:] == ["20", "n1=1", "n2=0"]
    assert "draining" not in out.split("shards:")[-1]


def test_status_json(etcd: EtcdSession, config: Path) -> None:
    lease = _write_cluster(etcd)
    etcd.put("/drain/n3", {"requested": time.time()})
    result = _run(config, "status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["controller"] == "n2"
    assert data["without_primary"] == []
    assert data["draining"] == ["n3"]
    assert [m["name"] for m in data["members"]] == ["n1", "n2", "n3"]
    assert {m["name"]: m["draining"] for m in data["members"]} == {
        "n1": False, "n2": False, "n3": True}
    assert all(m["lease"] == lease for m in data["members"])
    shard0 = data["shards"][0]
    assert shard0["primary"] == "n1" and shard0["primary_alive"] is True
    assert shard0["position"] == [40, 1]
    assert shard0["lag"] == {"n2": 3, "n3": 0}


def test_status_exits_1_when_a_shard_has_no_live_primary(
        etcd: EtcdSession, config: Path) -> None:
    lease = _write_cluster(etcd)
    everyone = ["n1", "n2", "n3"]
    # shard 1: its primary restarted (member lease differs from primary_lease)
    etcd.put("/shards/0001", _shard("n2", lease + 1, everyone, everyone, epoch=2))
    # shard 2: failover found no ISR member alive
    etcd.put("/shards/0002", _shard(None, 0, everyone, ["n9"], epoch=4))
    result = _run(config, "status")
    assert result.returncode == 1
    assert "without primary: 2 (0001, 0002)" in result.stdout
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert "n2 (gone)" in rows["0001"]
    assert "(none)" in rows["0002"]
    data = json.loads(_run(config, "status", "--json").stdout)
    assert data["without_primary"] == [1, 2]
    etcd.delete("/shards/0002")  # no record at all also counts
    etcd.put("/shards/0001", _shard("n2", lease, everyone, everyone, epoch=3))
    result = _run(config, "status", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["without_primary"] == [2]


def test_drain_writes_the_key_and_undrain_removes_it(etcd: EtcdSession, config: Path) -> None:
    _write_cluster(etcd)
    before = time.time()
    result = _run(config, "node", "drain", "n3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "n3: draining\n"
    record = etcd.get("/drain/n3")
    assert record is not None and record.value["requested"] >= before - 1
    status = _run(config, "status")
    assert "draining: n3" in status.stdout
    assert "leads 1, holds 3" in status.stdout
    assert _run(config, "node", "drain", "nobody").stdout == (
        "nobody: draining (not a live member now)\n")
    result = _run(config, "node", "undrain", "n3")
    assert (result.returncode, result.stdout) == (0, "n3: no longer draining\n")
    assert etcd.get("/drain/n3") is None
    assert _run(config, "node", "undrain", "n3").stdout == "n3: was not draining\n"
    bad = _run(config, "node", "drain", "a/b")
    assert bad.returncode == 1 and bad.stderr.startswith("postroom: error: bad member name")


def test_drain_wait_returns_once_the_node_holds_nothing(
        etcd: EtcdSession, config: Path) -> None:
    lease = _write_cluster(etcd)
    timed_out = _run(config, "node", "drain", "n3", "--wait", "--timeout", "1")
    assert timed_out.returncode == 1
    assert "n3: leads 1 shard(s), holds 3 replica(s)" in timed_out.stdout
    assert timed_out.stderr.strip() == "n3: not drained after 1 s"

    env = dict(os.environ)
    env.pop("POSTROOM_CONFIG", None)
    waiter = subprocess.Popen(
        [sys.executable, "-m", "node", "--config", str(config), "node", "drain", "n3", "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=env)
    try:
        first = waiter.stdout.readline() + waiter.stdout.readline()
        assert "leads 1 shard(s), holds 3 replica(s)" in first
        assert waiter.poll() is None
        # What the controller and the primaries would do, step by step.
        etcd.put("/shards/0002", _shard("n3", lease, ["n1", "n2", "n3"], ["n1", "n2", "n3"],
                                        epoch=3, transfer_to="n1"))
        etcd.put("/shards/0002", _shard("n1", lease, ["n1", "n2", "n3"], ["n1", "n2", "n3"],
                                        epoch=4))
        for n, primary in enumerate(["n1", "n2", "n1"]):
            assert waiter.poll() is None, waiter.communicate()
            etcd.put(f"/shards/{n:04d}", _shard(primary, lease, ["n1", "n2"], ["n1", "n2"],
                                                epoch=5))
        out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 0, err
    assert out.rstrip().endswith("n3: drained (leads nothing, holds no replica)")


def test_status_needs_no_local_node_and_reports_etcd_errors(tmp_path: Path) -> None:
    path = tmp_path / "postroom.toml"
    path.write_text('[etcd]\nendpoints = ["http://127.0.0.1:9"]\n')
    result = _run(path, "status", "--json")
    assert result.returncode == 1
    assert result.stderr.startswith("postroom: error: etcd unavailable")
    assert len(result.stderr.splitlines()) == 1
