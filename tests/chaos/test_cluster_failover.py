"""Chaos on a real 3-node cluster under load, with the drill's checker.

A real 3-member etcd (TLS + auth) and 3 postroom nodes on 127.0.0.2-4
(tests/support/cluster.py), 20 concurrent SMTP senders and 10 IMAP clients
(cluster/drill.py ``Load``) on temporary accounts covering every shard.  Each
scenario injects one fault by PID: SIGKILL the primary; SIGSTOP the primary
for longer than the lease TTL, then SIGCONT (it must commit nothing and
rejoin as a follower); SIGKILL a follower; SIGKILL the controller; SIGKILL
the etcd leader.  Then:

* the cluster serves every shard again (RTO: each shard has a live primary
  and a probe message to an account of each shard got 250);
* the victim comes back (restart / SIGCONT) and every replica catches up
  (in the ISR at the primary's position, per /positions/);
* every message that got 250 (or APPEND OK) is in its mailbox exactly once,
  read through IMAP, i.e. on the new primary; UIDs ascend in acknowledgement
  order and are never reused; UIDVALIDITY is fixed; HIGHESTMODSEQ, UIDNEXT
  and per-message MODSEQ never go back; acknowledged flag changes hold;
* ``repl.digest`` is equal on all three replicas of every shard.

``test_random_kills`` repeats random faults POSTROOM_CHAOS_ROUNDS times
(default 3; docs/operations.md has the 50+ round command), seeded by
POSTROOM_CHAOS_SEED (printed, for replay).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster import drill
from cluster.directory import EtcdDirectory
from node.statuscli import ClusterSnapshot, read_snapshot
from tests.support.cluster import LEASE_TTL, ClusterHarness

pytestmark = pytest.mark.timeout(600)

SENDERS = 20
IMAP_CLIENTS = 10
WARMUP = 2.0  # seconds of load before the fault
AFTER = 2.0  # seconds of load after the victim is back
FREEZE = 2 * LEASE_TTL + 1.0  # longer than the lease TTL
RECOVERY = 60.0  # deadline for failover, catch-up and reading back
MIN_ACKED = 50  # a scenario with less traffic than this proves nothing
ROUNDS = int(os.environ.get("POSTROOM_CHAOS_ROUNDS", "3"))


@pytest.fixture(scope="module")
def harness(chaos_cluster: ClusterHarness) -> ClusterHarness:
    """The chaos modules' shared cluster, whole (tests/support/cluster.py)."""
    return chaos_cluster


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


def _wait_replicated(harness: ClusterHarness, what: str, caught_up: bool = True) -> None:
    """Until _fully_replicated; on timeout the failure says what is missing."""
    try:
        harness.wait_until(lambda: harness.fully_replicated(caught_up), RECOVERY, what)
    except TimeoutError as exc:
        snap = _snapshot(harness)
        raise AssertionError(
            f"{exc}: members {sorted(snap.members)}, {drill.lagging(snap)}, shards "
            f"{ {n: (r.get('epoch'), r.get('primary'), r.get('replicas'), r.get('isr')) for n, r in snap.shards.items()} }"
            f", positions {snap.positions}\n{harness.log_tails(15)}") from None


class Chaos:
    """The load, the recovery measurement and the checks of one scenario."""

    def __init__(self, harness: ClusterHarness, rpc_call: Callable[[str, str, dict], dict],
                 run_id: str) -> None:
        self.harness = harness
        self.rpc_call = rpc_call
        self.ledger = drill.Ledger(run_id)
        self.accounts = drill.DrillAccounts(EtcdDirectory(harness.session), run_id)
        self.load: drill.Load | None = None
        self.shards = 0

    def start(self) -> None:
        snap = _snapshot(self.harness)
        self.shards = snap.shard_count
        passwords = self.accounts.create(self.shards, IMAP_CLIENTS)
        self.load = drill.Load(self.ledger, passwords, SENDERS, IMAP_CLIENTS)
        self.load.set_nodes(drill.endpoints(snap))
        self.load.start()
        self.run_load(WARMUP)

    def run_load(self, seconds: float) -> None:
        """Let the load run, keeping its node list current."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self._refresh()
            time.sleep(0.3)

    def _refresh(self, snap: ClusterSnapshot | None = None) -> None:
        assert self.load is not None
        try:
            self.load.set_nodes(drill.endpoints(snap or _snapshot(self.harness)))
        except drill.EtcdError:
            pass

    def first_shard(self) -> int:
        return drill.shard_of(sorted(self.accounts.passwords)[0], self.shards)

    def rto(self, t_fault: float, exclude: str | None) -> float:
        by_shard = self.accounts.by_shard(self.shards)
        rto = drill.wait_for_rto(self.harness.session, self.ledger, by_shard, t_fault,
                                 t_fault + RECOVERY, exclude, self._refresh)
        assert rto is not None, f"not every shard served again:\n{self.harness.log_tails()}"
        return rto

    def finish(self) -> drill.CheckResult:
        """Stop the load once everything is back; check every promise."""
        self.run_load(AFTER)
        assert self.load is not None
        self.load.stop()
        _wait_replicated(self.harness, "every replica back in the ISR and caught up")
        snap = _snapshot(self.harness)
        finals = drill.collect_mailboxes(self.accounts.passwords, drill.endpoints(snap),
                                         time.monotonic() + RECOVERY)
        result = drill.check(self.ledger, finals)
        assert result.acked >= MIN_ACKED, (result.acked, dict(self.ledger.errors))
        assert result.lost == [], result.lost[:20]
        assert result.duplicated == [], result.duplicated[:20]
        assert result.uid_violations == [], result.uid_violations[:20]
        assert result.modseq_violations == [], result.modseq_violations[:20]
        assert result.flag_violations == [], result.flag_violations[:20]
        digests, violations = drill.check_replicas(
            self.harness.session, self.rpc_call, time.monotonic() + RECOVERY)
        assert violations == []
        assert sorted(digests) == list(range(self.shards))
        assert all(len(d) == len(self.harness.nodes) for d in digests.values()), digests
        return result

    def close(self) -> None:
        if self.load is not None:
            self.load.stop()
        self.accounts.remove()


@pytest.fixture
def chaos(harness: ClusterHarness, rpc_call) -> Iterator[Chaos]:
    _wait_replicated(harness, "a healthy cluster")
    run = Chaos(harness, rpc_call, os.urandom(3).hex())
    try:
        yield run
    finally:
        run.close()
        harness.restore()  # every node and etcd member running for the next test


def _primary_of(harness: ClusterHarness, shard: int) -> str:
    name = _snapshot(harness).primary(shard)
    assert name is not None
    return name


def _kill(harness: ClusterHarness, chaos: Chaos, name: str,
          while_down: Callable[[], None] = lambda: None) -> float:
    """SIGKILL a node, measure the RTO, run while_down, restart it; returns the RTO."""
    harness.by_name(name).kill()
    rto = chaos.rto(time.monotonic(), exclude=name)
    while_down()
    harness.by_name(name).start()
    return rto


def test_sigkill_primary(harness: ClusterHarness, chaos: Chaos) -> None:
    chaos.start()
    shard = chaos.first_shard()
    victim = _primary_of(harness, shard)
    epoch = harness.shard_record(shard)["epoch"]

    def failed_over() -> None:
        record = harness.shard_record(shard)
        assert record["epoch"] > epoch and record["primary"] not in (None, victim), record

    rto = _kill(harness, chaos, victim, failed_over)
    chaos.finish()
    print(f"SIGKILL primary {victim}: RTO {rto:.2f} s")


def test_sigstop_primary_longer_than_the_lease(harness: ClusterHarness, chaos: Chaos) -> None:
    chaos.start()
    snap = _snapshot(harness)
    victim = _primary_of(harness, chaos.first_shard())
    led = {n: snap.shards[n]["epoch"] for n in range(snap.shard_count)
           if snap.primary(n) == victim}
    node = harness.by_name(victim)
    node.stop()
    t_fault = time.monotonic()
    rto = chaos.rto(t_fault, exclude=victim)
    # It lost its lease while frozen: every shard it led moved on to a new
    # epoch with another primary; thawed, it comes back as a member under a
    # new lease and catches up as a follower.
    after = harness.shard_records()
    assert led and all(after[n]["epoch"] > epoch for n, epoch in led.items()), (led, after)
    assert all(after[n]["primary"] != victim for n in led), after
    time.sleep(max(0.0, t_fault + FREEZE - time.monotonic()))
    node.cont()
    harness.wait_until(lambda: victim in _snapshot(harness).members, RECOVERY, "rejoin")
    chaos.finish()  # it committed nothing of its own: no loss, no duplicate, equal digests
    print(f"SIGSTOP primary {victim} for {FREEZE:.0f} s: RTO {rto:.2f} s")


def test_sigkill_follower(harness: ClusterHarness, chaos: Chaos) -> None:
    chaos.start()
    record = harness.shard_record(chaos.first_shard())
    victim = next(r for r in record["isr"] if r != record["primary"])
    rto = _kill(harness, chaos, victim)
    chaos.finish()
    print(f"SIGKILL follower {victim}: RTO {rto:.2f} s")


def test_sigkill_controller(harness: ClusterHarness, chaos: Chaos) -> None:
    chaos.start()
    victim = _snapshot(harness).controller
    assert victim is not None

    def new_controller() -> None:
        harness.wait_until(lambda: _snapshot(harness).controller not in (None, victim),
                           RECOVERY, "another node elected controller")

    rto = _kill(harness, chaos, victim, new_controller)
    chaos.finish()
    print(f"SIGKILL controller {victim}: RTO {rto:.2f} s")


def _etcd_status(harness: ClusterHarness) -> Callable[[str], dict]:
    from cluster.etcd import EtcdSession

    s = harness.etcd.settings()

    def status(endpoint: str) -> dict:
        # a deadline for one status call (5 s: a loaded 2-CPU machine can take 2 s)
        session = EtcdSession([endpoint], s["prefix"], LEASE_TTL, 5.0, ca_cert=s["ca_cert"],
                              cert=s["cert"], key=s["key"], username=s["username"],
                              password=harness.etcd.password)
        try:
            return session.status()
        finally:
            session.close()

    return status


def test_sigkill_etcd_leader(harness: ClusterHarness, chaos: Chaos) -> None:
    chaos.start()
    leader = harness.etcd.leader()
    pid = harness.etcd.members[leader].pid
    killed = drill.kill_etcd_leader(_etcd_status(harness), harness.etcd.endpoints)
    t_fault = time.monotonic()
    assert killed == {"endpoint": harness.etcd.endpoints[leader], "pid": pid}
    rto = chaos.rto(t_fault, exclude=None)
    harness.etcd.start_member(leader)
    chaos.finish()
    print(f"SIGKILL etcd leader m{leader + 1}: RTO {rto:.2f} s")


@pytest.mark.timeout(300 + 90 * ROUNDS)
def test_random_kills(harness: ClusterHarness, chaos: Chaos) -> None:
    rounds = ROUNDS
    seed = int(os.environ.get("POSTROOM_CHAOS_SEED", str(random.randrange(1 << 30))))
    print(f"POSTROOM_CHAOS_SEED={seed} POSTROOM_CHAOS_ROUNDS={rounds}")
    rng = random.Random(seed)
    chaos.start()
    rtos = []
    for i in range(rounds):
        kind = rng.choice(["primary", "follower", "controller", "freeze", "etcd"])
        snap = _snapshot(harness)
        shard = rng.randrange(snap.shard_count)
        record = snap.shards[shard]
        if kind == "etcd":
            leader = harness.etcd.leader()
            harness.etcd.kill(leader)
            rtos.append(chaos.rto(time.monotonic(), exclude=None))
            harness.etcd.start_member(leader)
        elif kind == "freeze":
            node = harness.by_name(record["primary"])
            node.stop()
            t_fault = time.monotonic()
            rtos.append(chaos.rto(t_fault, exclude=node.name))
            time.sleep(max(0.0, t_fault + FREEZE - time.monotonic()))
            node.cont()
        else:
            victim = {"primary": record["primary"],
                      "follower": next(r for r in record["isr"] if r != record["primary"]),
                      "controller": snap.controller}[kind]
            rtos.append(_kill(harness, chaos, victim))
        chaos.run_load(1.0)
        # the load goes on: every replica back in the ISR (every commit waits
        # for it) is the recovery; positions are compared once the load stops
        _wait_replicated(harness, f"recovery after round {i + 1} ({kind})", caught_up=False)
        acked = len(chaos.ledger.acked())
        print(f"round {i + 1}/{rounds}: {kind} shard {shard}: RTO {rtos[-1]:.2f} s;"
              f" {acked} acknowledged so far")
    chaos.finish()
    print(f"RTO max {max(rtos):.2f} s, mean {sum(rtos) / len(rtos):.2f} s over {rounds} rounds")
