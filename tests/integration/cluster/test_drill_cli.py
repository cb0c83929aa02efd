"""`postroom drill failover` and `postroom status` against a real 3-node cluster
(tests/support/cluster.py), plus the drill's checker on known histories.

The checker tests feed ``cluster.drill.check`` ledgers and final mailboxes
with one planted violation each (and one clean history), so a checker that
stopped seeing a violation fails here before it can pass a bad cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import drill
from tests.support.cluster import ClusterHarness
from tests.support.etcd import REPO, EtcdServer

A = "a@example.test"


def _ledger(*deliveries: drill.Delivery) -> drill.Ledger:
    ledger = drill.Ledger("t")
    ledger.deliveries.extend(deliveries)
    return ledger


def _delivery(msgid: str, start: float, end: float, acked: bool = True,
              uid: int | None = None) -> drill.Delivery:
    return drill.Delivery(f"<{msgid}>", (A,), "test", start, end, acked, "250", uid)


def _final(*messages: tuple[int, str], highestmodseq: int = 100, uidnext: int = 50,
           flagged: frozenset[int] = frozenset()) -> dict[str, drill.MailboxState]:
    rows = [(uid, f"<{m}>", uid + 10, uid in flagged) for uid, m in messages]
    return {A: drill.MailboxState(A, 7, highestmodseq, uidnext, rows)}


def test_checker_passes_a_clean_history() -> None:
    ledger = _ledger(_delivery("m1", 0, 1), _delivery("m2", 1.5, 2, uid=2),
                     _delivery("m3", 0.5, 3), _delivery("m4", 3, 3.5, acked=False))
    ledger.observations.append(drill.Observation(A, 0, 2.1, 2.2, 7, 12, 3, {1: "<m1>"}, {1: 11}))
    ledger.stores.append(drill.FlagStore(A, 2, True, 2.5, acked=True))
    result = drill.check(ledger, _final((1, "m1"), (2, "m2"), (3, "m3"), flagged=frozenset({2})))
    assert result.violations == []
    assert (result.acked, result.unacked, result.unacked_present) == (3, 1, 0)
    assert result.to_json()["lost"] == 0 and result.to_json()["duplicated"] == 0


def test_checker_finds_lost_and_duplicated_messages() -> None:
    ledger = _ledger(_delivery("m1", 0, 1), _delivery("m2", 1, 2), _delivery("m3", 2, 3, False),
                     _delivery("m4", 3, 4, False))
    result = drill.check(ledger, _final((1, "m1"), (2, "m1"), (3, "m4")))
    assert [x.split()[1] for x in result.lost] == ["<m2>"]  # m3 was never acknowledged
    assert result.duplicated == [f"{A} <m1> at UIDs [1, 2]"]
    assert result.unacked_present == 1


def test_checker_finds_uids_out_of_acknowledgement_order() -> None:
    # m2 was sent after m1 got its 250, yet has the smaller UID
    ledger = _ledger(_delivery("m1", 0, 1), _delivery("m2", 2, 3))
    result = drill.check(ledger, _final((5, "m1"), (4, "m2")))
    assert len(result.uid_violations) == 1 and "<m2>: UID 4 not above UID 5" in \
        result.uid_violations[0]
    # concurrent deliveries may commit in either order
    concurrent = _ledger(_delivery("m1", 0, 1), _delivery("m2", 0.5, 3))
    assert drill.check(concurrent, _final((5, "m1"), (4, "m2"))).violations == []
    appended = _ledger(_delivery("m1", 0, 1, uid=3))
    assert "APPENDUID 3 but now UID 1" in drill.check(appended, _final((1, "m1"))).violations[0]


def test_checker_finds_reused_uids_and_modseq_going_back() -> None:
    ledger = _ledger(_delivery("m1", 0, 1), _delivery("m2", 1, 2))
    ledger.observations += [
        drill.Observation(A, 0, 2, 2.1, 7, 0, 0, {1: "<m9>"}),  # UID 1 named another message
        drill.Observation(A, 0, 3, 3.1, 7, 90, 10),
        drill.Observation(A, 1, 4, 4.1, 7, 80, 10),  # read after 90 was seen: went back
        drill.Observation(A, 1, 3.05, 3.2, 7, 70, 10),  # concurrent with the 90: fine
        drill.Observation(A, 0, 5, 5.1, 8, 0, 0),  # UIDVALIDITY changed
        drill.Observation(A, 0, 6, 6.1, 7, 0, 0, {}, {2: 40}),  # MODSEQ of UID 2 was 40 > 12
    ]
    result = drill.check(ledger, _final((1, "m1"), (2, "m2"), highestmodseq=95))
    assert any("UID 1 was <m9>, now <m1>" in v for v in result.uid_violations)
    assert any("UIDVALIDITY 8 seen, now 7" in v for v in result.uid_violations)
    assert result.modseq_violations == [
        f"{A}: MODSEQ of UID 2 went back from 40 to 12",
        f"{A}: HIGHESTMODSEQ went back from 90 to 80",
    ]
    lower = drill.check(ledger, _final((1, "m1"), (2, "m2"), highestmodseq=85))
    assert f"{A}: HIGHESTMODSEQ went back from 90 to 85" in lower.modseq_violations


def test_checker_finds_a_lost_flag_change() -> None:
    ledger = _ledger(_delivery("m1", 0, 1))
    ledger.stores += [drill.FlagStore(A, 1, False, 1.0, True), drill.FlagStore(A, 1, True, 2.0, True)]
    assert drill.check(ledger, _final((1, "m1"))).flag_violations == [
        f"{A}: UID 1 acknowledged \\Flagged=True, shows False"]
    ledger.stores.append(drill.FlagStore(A, 1, False, 3.0, acked=False))  # outcome unknown
    assert drill.check(ledger, _final((1, "m1"))).flag_violations == []


def test_pid_listening_finds_a_real_process(etcd_server: EtcdServer) -> None:
    assert etcd_server.proc is not None
    assert drill.pid_listening("127.0.0.1", etcd_server.client_port) == etcd_server.proc.pid
    assert drill.pid_listening("127.0.0.9", etcd_server.client_port) is None


# -- against the running cluster ------------------------------------------------


def _postroom(harness: ClusterHarness, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("POSTROOM_CONFIG", None)
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "node", "--config", str(harness.node(0).config_path), *args],
        capture_output=True, text=True, cwd=str(REPO), env=env, timeout=timeout)


def test_status_shows_every_shard_with_a_primary(cluster: ClusterHarness) -> None:
    cluster.wait_until(cluster.all_shards_led, 60, "every shard led")
    result = _postroom(cluster, "status")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"shards: {cluster.shards}, without primary: 0" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"  \d{4} ", line)]
    assert len(rows) == cluster.shards
    names = {n.name for n in cluster.nodes}
    assert all(row[2] in names for row in rows), result.stdout
    data = json.loads(_postroom(cluster, "status", "--json").stdout)
    assert data["without_primary"] == [] and data["controller"] in names
    assert sorted(m["name"] for m in data["members"]) == sorted(names)
    assert all(m["labels"]["host"] and m["rpc"] for m in data["members"])


def _state(pid: int) -> str:
    """The process state letter from /proc/PID/stat (T = stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def test_fault_rpc_freezes_a_node_and_refuses_bad_requests(cluster: ClusterHarness) -> None:
    from cluster import ca, rpc

    node = cluster.node(2)
    client = rpc.RpcClient(ca.client_context(Path(cluster.node(0).data_dir) / "cluster"))
    try:
        for args in ({"kind": "bogus"}, {"kind": "freeze", "duration": 0},
                     {"kind": "freeze", "duration": 7200}):
            with pytest.raises(rpc.RpcError) as refused:
                client.call(node.rpc_address, "drill.fault", args)
            assert refused.value.kind == "ValueError"
        assert node.pid is not None and _state(node.pid) != "T"
        answer, _ = client.call(node.rpc_address, "drill.fault",
                                {"kind": "freeze", "duration": 1.0})
        assert answer["pid"] == node.pid and answer["kind"] == "freeze"
        cluster.wait_until(lambda: _state(node.pid) == "T", 10, "the node stopped")
        cluster.wait_until(lambda: _state(node.pid) != "T", 20, "the node running again")
    finally:
        client.close()


def test_drain_under_load_moves_everything_and_loses_nothing(cluster: ClusterHarness) -> None:
    from cluster import ca, rpc
    from cluster.directory import EtcdDirectory
    from node.statuscli import read_snapshot

    full = cluster.fully_replicated

    cluster.wait_until(lambda: full(True), 60, "a fully replicated cluster")
    ledger = drill.Ledger("drain")
    accounts = drill.DrillAccounts(EtcdDirectory(cluster.session), "drain")
    load = drill.Load(ledger, accounts.create(cluster.shards, 4), senders=10, imap_clients=4)
    client = rpc.RpcClient(ca.client_context(Path(cluster.node(0).data_dir) / "cluster"))
    try:
        load.set_nodes(drill.endpoints(read_snapshot(cluster.session)))
        load.start()
        drained = _postroom(cluster, "node", "drain", "n2", "--wait", "--timeout", "120",
                            timeout=180)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert drained.stdout.rstrip().endswith("n2: drained (leads nothing, holds no replica)")
        snap = read_snapshot(cluster.session)
        assert snap.holdings("n2") == ([], [])
        assert all(len(r["isr"]) == 2 for r in snap.shards.values())
        undrained = _postroom(cluster, "node", "undrain", "n2")
        assert undrained.stdout == "n2: no longer draining\n"
        cluster.wait_until(lambda: full(False), 120, "n2 holding replicas again")
        load.stop()
        cluster.wait_until(lambda: full(True), 60, "every replica caught up")
        finals = drill.collect_mailboxes(accounts.passwords, drill.endpoints(snap),
                                         time.monotonic() + 60)
        result = drill.check(ledger, finals)
        assert result.acked > 20 and result.violations == [], result.violations[:20]
        digests, violations = drill.check_replicas(
            cluster.session, lambda a, m, x: client.call(a, m, x)[0], time.monotonic() + 60)
        assert violations == [] and len(digests) == cluster.shards
    finally:
        load.stop()
        client.close()
        accounts.remove()
        _postroom(cluster, "node", "undrain", "n2")


def test_drill_failover_primary(cluster: ClusterHarness, tmp_path: Path) -> None:
    cluster.wait_until(cluster.all_shards_led, 60, "every shard led")
    result = _postroom(cluster, "drill", "failover", "--target", "primary", "--duration", "6",
                       "--senders", "20", "--imap-clients", "10", timeout=400)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr + cluster.log_tails()
    assert re.search(r"^RTO: \d+\.\d\d s$", result.stdout, re.MULTILINE)
    assert "lost: 0  duplicated: 0" in result.stdout
    assert "UIDs monotonic: yes  MODSEQ monotonic: yes  flags kept: yes" in result.stdout
    assert "replicas byte-identical: yes" in result.stdout
    assert result.stdout.rstrip().endswith("result: PASS")
    acked = int(re.search(r"acknowledged: (\d+)", result.stdout).group(1))
    assert acked > 50
    # the drill's accounts are gone again
    users = _postroom(cluster, "user", "list").stdout
    assert "drill-" not in users
