"""cluster/controller.py against a real etcd: election, first placement,
take-over, failover records, session loss, and CAS conflicts.

Members are keys the test writes under the leases of extra sessions, so
killing a member is closing its session (the lease is revoked and etcd
deletes the key, as an expiry would).  Scenarios need greenlets (watches, the
lease refresher), so each runs in a gevent-patched child process
(tests.support.etcd.run_patched); pytest collects only the test_* wrappers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent

from cluster.controller import Controller
from cluster.etcd import EtcdSession
from cluster.placement import ShardRecord, shard_key
from tests.support.etcd import EtcdServer, run_patched

MODULE = "tests.integration.cluster.test_controller"
PREFIX = "/ctl-test"
META = {"id": "t", "shards": 4, "replication_factor": 3}


def _wait(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        gevent.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _session(url: str, session_class: type[EtcdSession] = EtcdSession) -> EtcdSession:
    return session_class([url], PREFIX, 2, 2.0)


def _member(url: str, name: str, zone: str) -> EtcdSession:
    """A member registered under its own session lease."""
    s = _session(url)
    s.start()
    s.put(f"/members/{name}", {"node_id": name, "labels": {"zone": zone, "host": name},
                               "lease": s.lease_id}, lease=True)  # fmt: skip
    return s


def _records(reader: EtcdSession) -> dict[int, ShardRecord]:
    kvs, _ = reader.get_prefix("/shards/")
    return {int(kv.key.rsplit("/", 1)[1]): ShardRecord.from_json(kv.value) for kv in kvs}


def _placed(reader: EtcdSession, leases: dict[str, int]) -> dict[int, ShardRecord]:
    """The records once every shard has one, each with the members' leases."""
    records: dict[int, ShardRecord] = {}

    def ready() -> bool:
        records.clear()
        records.update(_records(reader))
        return len(records) == META["shards"]

    _wait(ready, "the first shard records")
    for r in records.values():
        assert sorted(r.replicas) == sorted(leases) and sorted(r.isr) == sorted(leases)
        assert r.epoch == 1 and r.transfer_to is None
        assert r.primary_lease == leases[r.primary]
    return records


def _leader(*controllers: Controller) -> Controller:
    _wait(lambda: sum(c.leading for c in controllers) == 1, "exactly one controller")
    return next(c for c in controllers if c.leading)


# -- election, placement, take-over, failover ---------------------------------


def scenario_election_takeover_and_failover(url: str) -> None:
    reader = _session(url)
    c1 = Controller(_session(url), "c1", META)
    c2 = Controller(_session(url), "c2", META)
    c1.start()
    c2.start()
    members = {n: _member(url, n, f"z{i}") for i, n in enumerate(("n1", "n2", "n3"))}
    leases = {n: s.lease_id for n, s in members.items()}
    try:
        winner = _leader(c1, c2)
        other = c2 if winner is c1 else c1
        held = reader.get("/controller")
        assert held.value == {"node": winner.node_name, "lease": winner.session.lease_id}
        records = _placed(reader, leases)
        assert sorted(r.primary for r in records.values()) == ["n1", "n1", "n2", "n3"]
        assert winner.actions == 4 and other.actions == 0

        # The winner's session goes away: its key is deleted, the other takes over.
        winner.session.close()
        _wait(lambda: other.leading, "the other controller to take over")
        assert reader.get("/controller").value["node"] == other.node_name
        winner.stop()

        # The primary of shards 0 and 3 dies: each gets a new primary from its
        # ISR with the next epoch, then n1 leaves the ISR and the replicas.
        led = [n for n, r in records.items() if r.primary == "n1"]
        members.pop("n1").close()

        def failed_over() -> bool:
            now = _records(reader)
            return all(now[n].primary not in (None, "n1") for n in led)

        _wait(failed_over, "failover records")
        now = _records(reader)
        for n in led:
            r = now[n]
            assert r.epoch == records[n].epoch + 1, r
            assert r.primary in records[n].isr and r.primary_lease == leases[r.primary]
        for n in set(records) - set(led):
            assert now[n].epoch == records[n].epoch  # no epoch without a new primary

        def settled() -> bool:
            return all(set(r.replicas) == set(r.isr) == {"n2", "n3"}
                       for r in _records(reader).values())  # fmt: skip

        _wait(settled, "n1 removed from every record")
        assert other.actions >= len(led) + len(records)
    finally:
        for c in (c1, c2):
            c.stop()
            c.session.close()
        for s in members.values():
            s.close()


def test_election_takeover_and_failover(etcd_server: EtcdServer) -> None:
    run_patched(MODULE, "scenario_election_takeover_and_failover", etcd_server.client_url)


# -- session loss ---------------------------------------------------------------


def scenario_session_loss_stops_leading_then_campaigns_again(url: str) -> None:
    c = Controller(_session(url), "c1", META)
    c.start()
    try:
        _wait(lambda: c.leading, "leadership")
        first = c.session.lease_id
        # Someone revokes our lease (as an expiry would); the refresher notices.
        _session(url)._post("kv/lease/revoke", {"ID": first})
        _wait(lambda: not c.leading or c.terms > 1, "stepping down")
        _wait(lambda: c.leading and c.terms == 2, "leading again under the new lease")
        assert c.session.lease_id != first
        assert c.session.get("/controller").lease == c.session.lease_id
    finally:
        c.stop()
        c.session.close()


def test_session_loss_stops_leading_then_campaigns_again(etcd_server: EtcdServer) -> None:
    run_patched(
        MODULE, "scenario_session_loss_stops_leading_then_campaigns_again", etcd_server.client_url
    )


# -- CAS conflicts -------------------------------------------------------------------


class RacingSession(EtcdSession):
    """A real session in which another writer (``racer``) changes etcd just
    before the controller's transaction on ``key`` goes out, once."""

    key = ""
    racer: Callable[[], None] | None = None

    def txn(self, compare, success, failure=None) -> bool:
        racer = self.racer
        if racer is not None and any(op.key == self.key for op in success):
            self.racer = None
            racer()
        return super().txn(compare, success, failure)


def scenario_cas_conflicts_are_retried(url: str) -> None:
    reader = _session(url)
    ctl_session = _session(url, RacingSession)
    c = Controller(ctl_session, "c1", META)
    members = {n: _member(url, n, f"z{i}") for i, n in enumerate(("n1", "n2", "n3"))}
    c.start()
    try:
        records = _placed(reader, {n: s.lease_id for n, s in members.items()})
        number = next(n for n, r in records.items() if r.primary == "n1")
        key = shard_key(number)

        def primary_drops_n2() -> None:
            kv = reader.get(key)
            r = ShardRecord.from_json(kv.value)
            shrunk = ShardRecord(r.epoch, r.primary, r.primary_lease, r.replicas,
                                 tuple(x for x in r.isr if x != "n2"), None)  # fmt: skip
            assert reader.compare_and_swap(key, kv.mod_revision, shrunk.to_json())

        ctl_session.key = key
        ctl_session.racer = primary_drops_n2
        members.pop("n3").close()  # the controller removes n3 from the ISR...

        def both_applied() -> bool:
            r = _records(reader)[number]
            return set(r.replicas) == {"n1", "n2"} and r.isr == ("n1",)

        # ...and keeps the primary's concurrent removal of n2 (no blind overwrite).
        _wait(both_applied, f"{key} with both changes")
        assert ctl_session.racer is None and c.conflicts >= 1
        assert _records(reader)[number].epoch == records[number].epoch
    finally:
        c.stop()
        ctl_session.close()
        for s in members.values():
            s.close()


def test_cas_conflicts_are_retried(etcd_server: EtcdServer) -> None:
    run_patched(MODULE, "scenario_cas_conflicts_are_retried", etcd_server.client_url)


# -- first placement waits for members --------------------------------------------


def scenario_first_records_wait_for_members(url: str) -> None:
    reader = _session(url)
    members = {"n1": _member(url, "n1", "z1")}
    c = Controller(_session(url), "c1", META)
    c.start()
    try:
        _wait(lambda: c.leading and c.plans >= 1, "a leading controller that planned")
        assert _records(reader) == {}  # one member of three: wait a little
        members["n2"] = _member(url, "n2", "z2")
        # Two members and rf 3: created at the latest INITIAL_WAIT after the first.
        records = _placed(reader, {n: s.lease_id for n, s in members.items()})
        assert sorted(r.primary for r in records.values()) == ["n1", "n1", "n2", "n2"]
    finally:
        c.stop()
        c.session.close()
        for s in members.values():
            s.close()


def test_first_records_wait_for_members(etcd_server: EtcdServer) -> None:
    run_patched(MODULE, "scenario_first_records_wait_for_members", etcd_server.client_url)
