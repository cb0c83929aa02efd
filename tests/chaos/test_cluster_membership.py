"""Growing and shrinking a real cluster under load loses no acknowledged mail.

A real 3-member etcd (TLS + auth) and 3 postroom nodes on 127.0.0.2-4
(tests/support/cluster.py) under a load of SMTP senders and IMAP clients
(cluster/drill.py ``Load``: each message sent once, acknowledged only on 250
or APPEND OK) on temporary accounts covering every shard.  While the load
runs:

1. **Grow.**  A 4th node joins (``harness.add_node()``); the controller
   rebalances: every node ends up with a fair share of the replicas (8 shards
   x 3 over 4 nodes: 6 each), every replica is in its shard's ISR, and the
   new node leads some shards.  Every message acknowledged until then is
   present exactly once.
2. **Shrink.**  ``postroom node drain <an original node> --wait`` (the
   controller's node when it is an original one) returns once it leads
   nothing and holds no replica; the shards keep 3 replicas on the other
   nodes; then the node is stopped (and another node becomes controller).

At the end (load stopped, every replica caught up): every acknowledged
message is in its mailbox exactly once, read through IMAP on the remaining
nodes; UIDs ascend in acknowledgement order and are never reused;
UIDVALIDITY is fixed; HIGHESTMODSEQ, UIDNEXT and per-message MODSEQ never go
back; acknowledged flag changes hold; every replica of every shard has the
same ``repl.digest`` at the same position.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster import drill
from cluster.directory import EtcdDirectory
from node.statuscli import ClusterSnapshot, read_snapshot, render
from tests.support.cluster import ClusterHarness
from tests.support.node import REPO

pytestmark = pytest.mark.timeout(400)

SENDERS = 12
IMAP_CLIENTS = 5
REPLICATION = 3
SETTLE = 90.0  # deadline for a rebalance, a drain or catch-up
MIN_ACKED = 50  # less traffic than this proves nothing


@pytest.fixture(scope="module")
def harness(membership_cluster: ClusterHarness) -> ClusterHarness:
    """This module's own cluster (tests/support/cluster.py), settled: it grows
    and shrinks it."""
    membership_cluster.wait_until(lambda: _settled(membership_cluster), SETTLE,
                                  "a healthy 3-node cluster")
    return membership_cluster


@pytest.fixture(scope="module")
def rpc_call(harness: ClusterHarness) -> Iterator[Callable[[str, str, dict], dict]]:
    from cluster import ca, rpc

    client = rpc.RpcClient(ca.client_context(Path(harness.node(0).data_dir) / "cluster"))

    def call(address: str, method: str, args: dict) -> dict:
        return client.call(address, method, args, timeout=10.0)[0]

    yield call
    client.close()


def _snapshot(harness: ClusterHarness) -> ClusterSnapshot:
    return read_snapshot(harness.session)


def _settled(harness: ClusterHarness, names: set[str] | None = None,
             idle: bool = True) -> ClusterSnapshot | None:
    """The snapshot once the members are ``names`` (default: every running
    node), no move is pending, every shard has a live primary and 3 replicas,
    all in its ISR, and replica counts per member differ by at most one.
    ``idle`` (no load running): the replicas' positions are equal, too."""
    snap = _snapshot(harness)
    names = names if names is not None else {n.name for n in harness.nodes if n.running}
    if set(snap.members) != names or snap.leaderless() or snap.drain.keys() & names:
        return None
    if idle and drill.lagging(snap):
        return None
    for record in snap.shards.values():
        replicas = set(record.get("replicas") or [])
        if (len(replicas) != REPLICATION or replicas != set(record.get("isr") or [])
                or not replicas <= names or record.get("transfer_to")):
            return None
    counts = _replica_counts(snap)
    if set(counts) != names or max(counts.values()) - min(counts.values()) > 1:
        return None
    return snap


def _replica_counts(snap: ClusterSnapshot) -> Counter[str]:
    return Counter(r for record in snap.shards.values() for r in record.get("replicas") or [])


def _leads(snap: ClusterSnapshot) -> Counter[str]:
    return Counter(snap.primary(n) for n in range(snap.shard_count))


class Traffic:
    """The load, kept pointed at the live members, and its checks."""

    def __init__(self, harness: ClusterHarness, rpc_call: Callable[[str, str, dict], dict]) -> None:
        self.harness = harness
        self.rpc_call = rpc_call
        run_id = os.urandom(3).hex()
        self.ledger = drill.Ledger(run_id)
        self.accounts = drill.DrillAccounts(EtcdDirectory(harness.session), run_id)
        self.load: drill.Load | None = None
        self.shards = _snapshot(harness).shard_count
        self.avoid: set[str] = set()  # members the load stops using (drained ones)

    def start(self) -> None:
        passwords = self.accounts.create(self.shards, IMAP_CLIENTS)
        self.load = drill.Load(self.ledger, passwords, SENDERS, IMAP_CLIENTS)
        self.refresh()
        self.load.start()

    def refresh(self) -> None:
        assert self.load is not None
        try:
            nodes = drill.endpoints(_snapshot(self.harness))
        except drill.EtcdError:
            return
        self.load.set_nodes([n for n in nodes if n.name not in self.avoid])

    def run(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self.refresh()
            time.sleep(0.3)

    def wait(self, predicate: Callable[[], object], what: str) -> object:
        """Wait for predicate (up to SETTLE s) while the load keeps running."""
        def check() -> object:
            self.refresh()
            return predicate()

        try:
            return self.harness.wait_until(check, SETTLE, what, interval=0.3)
        except TimeoutError:
            snap = _snapshot(self.harness)
            print("\n".join([*render(snap), *drill.lagging(snap)]))
            print(self.harness.log_tails(40))
            raise

    def check(self, final: bool) -> drill.CheckResult:
        """The checker over the mailboxes read now through the live members.

        Mid-run (``final`` False) it looks only at what finished before the
        reads began: deliveries and observations that ended earlier, no
        flag stores (one may land between the reads)."""
        before = time.monotonic()
        snap = _snapshot(self.harness)
        nodes = [n for n in drill.endpoints(snap) if n.name not in self.avoid]
        finals = drill.collect_mailboxes(self.accounts.passwords, nodes, before + SETTLE)
        ledger = self.ledger
        if not final:
            ledger = drill.Ledger(self.ledger.run_id)
            ledger.deliveries = [d for d in self.ledger.deliveries if 0 < d.end < before]
            ledger.observations = [o for o in self.ledger.observations if o.end < before]
        result = drill.check(ledger, finals)
        assert result.lost == [], result.lost[:20]
        assert result.duplicated == [], result.duplicated[:20]
        assert result.uid_violations == [], result.uid_violations[:20]
        assert result.modseq_violations == [], result.modseq_violations[:20]
        assert result.flag_violations == [], result.flag_violations[:20]
        return result

    def stop(self) -> None:
        if self.load is not None:
            self.load.stop()

    def close(self) -> None:
        self.stop()
        self.accounts.remove()


@pytest.fixture
def traffic(harness: ClusterHarness, rpc_call) -> Iterator[Traffic]:
    run = Traffic(harness, rpc_call)
    try:
        yield run
    finally:
        run.close()


def _drain(harness: ClusterHarness, name: str) -> subprocess.CompletedProcess:
    """`postroom node drain NAME --wait` as an operator runs it (another node's config)."""
    other = next(n for n in harness.nodes if n.name != name and n.running)
    return subprocess.run(
        [sys.executable, "-m", "node", "--config", str(other.config_path), "node", "drain", name,
         "--wait", "--timeout", str(SETTLE)],
        capture_output=True, text=True, cwd=str(REPO), env=other.env, timeout=SETTLE + 30)


def test_add_a_node_then_drain_one_under_load(harness: ClusterHarness, traffic: Traffic) -> None:
    original = {n.name for n in harness.nodes}
    traffic.start()
    traffic.run(3.0)

    # -- grow: a 4th node joins and gets its share --------------------------------
    new = harness.add_node()
    names = original | {new.name}
    traffic.wait(lambda: new.name in _snapshot(harness).members, "the new node a member")

    def rebalanced() -> ClusterSnapshot | None:
        snap = _settled(harness, names, idle=False)  # positions move under load
        return snap if snap is not None and _leads(snap)[new.name] > 0 else None

    snap = traffic.wait(rebalanced, "a rebalance onto the new node")
    assert isinstance(snap, ClusterSnapshot)
    counts = _replica_counts(snap)
    assert counts == {name: snap.shard_count * REPLICATION // len(names) for name in names}
    held = [n for n in range(snap.shard_count) if new.name in snap.shards[n]["replicas"]]
    assert all(new.name in snap.shards[n]["isr"] for n in held)
    assert {n for n in range(snap.shard_count) if snap.primary(n) == new.name} <= set(held)
    print(f"rebalanced: replicas {dict(counts)}, primaries {dict(_leads(snap))}")
    traffic.run(2.0)
    mid = traffic.check(final=False)
    assert mid.acked > 0, dict(traffic.ledger.errors)

    # -- shrink: drain an original node, then stop it ---------------------------------
    # the controller, if an original node leads it: its stop elects another
    controller = _snapshot(harness).controller
    victim = controller if controller in original else sorted(original)[0]
    drained = _drain(harness, victim)
    assert drained.returncode == 0, drained.stdout + drained.stderr + harness.log_tails(40)
    assert f"{victim}: drained (leads nothing, holds no replica)" in drained.stdout
    snap = _snapshot(harness)
    leads, holds = snap.holdings(victim)
    assert not leads and not holds, (leads, holds)
    assert all(len(r["replicas"]) == REPLICATION and victim not in r["replicas"]
               and victim not in r["isr"] and r["primary"] != victim
               for r in snap.shards.values()), snap.shards
    traffic.avoid.add(victim)
    traffic.run(1.0)
    harness.by_name(victim).terminate()
    harness.session.delete(f"/drain/{victim}")
    traffic.run(3.0)

    # -- at the end: nothing acknowledged lost, replicas identical ----------------------
    traffic.stop()
    rest = names - {victim}
    snap = traffic.wait(lambda: _settled(harness, rest), "the 3 remaining nodes caught up")
    assert isinstance(snap, ClusterSnapshot)
    assert _replica_counts(snap) == {name: snap.shard_count for name in rest}
    assert snap.controller in rest, snap.controller
    result = traffic.check(final=True)
    assert result.acked >= MIN_ACKED, (result.acked, dict(traffic.ledger.errors))
    digests, violations = drill.check_replicas(harness.session, traffic.rpc_call,
                                               time.monotonic() + SETTLE)
    assert violations == []
    assert sorted(digests) == list(range(snap.shard_count))
    for n, by_node in digests.items():
        assert set(by_node) == set(snap.shards[n]["replicas"]) and len(by_node) == REPLICATION
        assert len({(tuple(last), digest) for last, digest in by_node.values()}) == 1, by_node
    print(f"acknowledged {result.acked}, unacknowledged {result.unacked}"
          f" ({result.unacked_present} of them stored), errors {dict(traffic.ledger.errors)}")
