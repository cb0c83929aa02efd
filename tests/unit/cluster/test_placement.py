"""cluster/placement.py: transcripts of observed state -> next shard records,
and properties over random membership histories.

Records are written as one line, "e2 n2 [n1 n2 n3] isr [n2 n3]" (epoch,
primary or "-", replicas, ISR, optional "-> n3" for transfer_to), so each
transcript reads like the log of a cluster.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.placement import (
    MAX_MOVES_PER_NODE,
    Member,
    ShardRecord,
    describe,
    plan,
    shard_key,
)

# -- notation -------------------------------------------------------------


def fmt(rec: ShardRecord | None) -> str:
    if rec is None:
        return "none"
    text = f"e{rec.epoch} {rec.primary or '-'} [{' '.join(rec.replicas)}] isr [{' '.join(rec.isr)}]"
    return text + (f" -> {rec.transfer_to}" if rec.transfer_to else "")


def members(*names: str, draining: tuple[str, ...] = (), **labels: str) -> dict[str, Member]:
    """Members with lease 100+i; labels given as n1="z1/h1" (zone/host)."""
    out = {}
    for i, name in enumerate(names):
        zone, _, host = labels.get(name, "").partition("/")
        tags = {k: v for k, v in (("zone", zone), ("host", host)) if v}
        out[name] = Member(name, 100 + i, tags, name in draining)
    return out


def rec(epoch: int, primary: str | None, replicas: str, isr: str, lease: int = 0,
        transfer_to: str | None = None, ms: dict[str, Member] | None = None) -> ShardRecord:  # fmt: skip
    if ms is not None and primary is not None:
        lease = ms[primary].lease
    return ShardRecord(epoch, primary, lease, tuple(replicas.split()), tuple(isr.split()),
                       transfer_to)  # fmt: skip


def plan_fmt(records, ms, shards, rf) -> dict[int, str]:
    return {n: fmt(r) for n, r in plan(records, ms, shards, rf).items()}


class Sim:
    """Records plus the primaries' own moves (ISR grow, hand-off), applied by hand."""

    def __init__(self, ms: dict[str, Member], shards: int, rf: int) -> None:
        self.ms = ms
        self.shards = shards
        self.rf = rf
        self.records: dict[int, ShardRecord] = {}
        self.copies = 0  # replicas added to existing records (data copied)
        self.log: list[str] = []

    def control(self) -> dict[int, ShardRecord]:
        changes = plan(self.records, self.ms, self.shards, self.rf)
        for n, new in changes.items():
            old = self.records.get(n)
            check_controller_step(old, new, self.ms)
            if old is not None:
                self.copies += len(set(new.replicas) - set(old.replicas))
            self.records[n] = new
            self.log.append(f"{n}: {fmt(new)}")
        return changes

    def leader_ok(self, r: ShardRecord) -> bool:
        p = r.primary
        return p is not None and p in self.ms and self.ms[p].lease == r.primary_lease

    def primaries_act(self) -> bool:
        """Each live primary hands off or adds its caught-up replicas to the ISR."""
        acted = False
        for n, r in sorted(self.records.items()):
            if not self.leader_ok(r):
                continue
            if r.transfer_to is not None and r.transfer_to in r.isr:
                t = r.transfer_to
                self.records[n] = replace(
                    r, epoch=r.epoch + 1, primary=t, primary_lease=self.ms[t].lease,
                    transfer_to=None)  # fmt: skip
                acted = True
            else:
                grow = tuple(x for x in r.replicas if x in self.ms and x not in r.isr)
                if grow:
                    self.records[n] = replace(r, isr=r.isr + grow)
                    acted = True
        return acted

    def settle(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            if not self.control() and not self.primaries_act():
                return
            check_records(self.records)
        raise AssertionError("placement did not converge:\n" + "\n".join(self.log[-30:]))

    def load(self) -> Counter:
        return Counter(x for r in self.records.values() for x in r.replicas)

    def leads(self) -> Counter:
        return Counter(r.primary for r in self.records.values())


def check_records(records: dict[int, ShardRecord]) -> None:
    for r in records.values():
        assert len(set(r.replicas)) == len(r.replicas), fmt(r)
        assert len(set(r.isr)) == len(r.isr), fmt(r)
        assert set(r.isr) <= set(r.replicas), fmt(r)
        assert r.primary is None or r.primary in r.isr, fmt(r)
        assert r.transfer_to is None or (r.transfer_to in r.isr and r.transfer_to != r.primary)


def check_controller_step(old: ShardRecord | None, new: ShardRecord, ms) -> None:
    """What the controller may and may not do in one step."""
    check_records({0: new})
    if new.primary is not None:
        assert ms[new.primary].lease == new.primary_lease, fmt(new)
    if old is None:
        assert new.epoch == 1 and new.isr == new.replicas and new.primary is not None
        return
    leader_changed = (new.primary, new.primary_lease) != (old.primary, old.primary_lease)
    assert new.epoch >= old.epoch
    assert leader_changed == (new.epoch != old.epoch), f"{fmt(old)} => {fmt(new)}"
    if leader_changed:
        assert new.epoch == old.epoch + 1
        assert new.primary is None or new.primary in old.isr, "promoted outside the ISR"
    assert set(new.isr) <= set(old.isr), "the controller never adds to the ISR"
    p = old.primary
    old_leader_ok = p is not None and p in ms and ms[p].lease == old.primary_lease
    if old.transfer_to is not None and old_leader_ok:
        assert new == replace(old, transfer_to=None), "a pending transfer was touched"


# -- records ----------------------------------------------------------------


def test_record_json_roundtrip_and_errors() -> None:
    r = rec(3, "n2", "n1 n2 n3", "n2 n3", lease=77, transfer_to="n3")
    assert r.to_json() == {
        "epoch": 3, "primary": "n2", "primary_lease": 77, "replicas": ["n1", "n2", "n3"],
        "isr": ["n2", "n3"], "transfer_to": "n3"}  # fmt: skip
    assert ShardRecord.from_json(r.to_json()) == r
    none = ShardRecord(4, None, 0, ("n1",), ("n1",), None)
    assert ShardRecord.from_json(none.to_json()) == none
    for bad in (None, [], {}, {"epoch": "x"}, {"epoch": -1}, {"epoch": 1, "replicas": 5}):
        with pytest.raises(ValueError):
            ShardRecord.from_json(bad)
    assert shard_key(7) == "/shards/0007"


def test_member_from_registration() -> None:
    value = {"node_id": "n1", "labels": {"zone": "z1", "host": "h1"}, "lease": 5}
    assert Member.from_json("n1", value, lease=9) == Member("n1", 9, {"zone": "z1", "host": "h1"})
    assert Member.from_json("n1", value).lease == 5  # no key lease: the record's own
    assert Member.from_json("n2", "junk", lease=3, draining=True) == Member("n2", 3, {}, True)


def test_describe_marks_dead_draining_and_restarted() -> None:
    ms = members("n1", "n2", draining=("n2",))
    records = {
        0: rec(2, "n1", "n1 n2 n3", "n1 n3", ms=ms, transfer_to="n3"),
        1: rec(5, "n1", "n1 n2", "n1", lease=1),
        2: None,
    }
    assert describe(records, ms) == [
        "shard 0000: epoch 2 primary n1 isr [n1,n3(dead)] catching-up [n2(draining)]"
        " transfer_to n3(dead)",
        "shard 0001: epoch 5 primary n1(restarted) isr [n1] catching-up [n2(draining)]",
        "shard 0002: no record",
    ]


# -- creation -------------------------------------------------------------


def test_no_members_no_records() -> None:
    assert plan({}, {}, 4, 3) == {}


def test_create_with_one_node() -> None:
    ms = members("n1")
    assert plan_fmt({}, ms, 2, 3) == {0: "e1 n1 [n1] isr [n1]", 1: "e1 n1 [n1] isr [n1]"}
    assert plan({}, ms, 1, 3)[0].primary_lease == 100


def test_create_with_two_nodes_balances_primaries() -> None:
    assert plan_fmt({}, members("n1", "n2"), 4, 3) == {
        0: "e1 n1 [n1 n2] isr [n1 n2]",
        1: "e1 n2 [n2 n1] isr [n2 n1]",
        2: "e1 n1 [n1 n2] isr [n1 n2]",
        3: "e1 n2 [n2 n1] isr [n2 n1]",
    }


def test_create_with_three_nodes() -> None:
    assert plan_fmt({}, members("n1", "n2", "n3"), 3, 3) == {
        0: "e1 n1 [n1 n2 n3] isr [n1 n2 n3]",
        1: "e1 n2 [n2 n3 n1] isr [n2 n3 n1]",
        2: "e1 n3 [n3 n1 n2] isr [n3 n1 n2]",
    }


def test_create_with_five_nodes_rf2_balances_replicas() -> None:
    changes = plan({}, members("a", "b", "c", "d", "e"), 5, 2)
    assert {n: fmt(r) for n, r in changes.items()} == {
        0: "e1 a [a b] isr [a b]",
        1: "e1 c [c d] isr [c d]",
        2: "e1 b [e b] isr [e b]",
        3: "e1 d [d e] isr [d e]",
        4: "e1 a [a c] isr [a c]",
    }
    assert Counter(x for r in changes.values() for x in r.replicas) == dict.fromkeys("abcde", 2)


def test_create_spreads_over_zones_before_load() -> None:
    # zone z3 has a single node: it must hold a replica of every shard.
    ms = members("a", "b", "c", "d", "e", a="z1/h1", b="z1/h2", c="z2/h3", d="z2/h4", e="z3/h5")
    changes = plan({}, ms, 6, 3)
    for r in changes.values():
        assert sorted(ms[x].labels["zone"] for x in r.replicas) == ["z1", "z2", "z3"], fmt(r)
    load = Counter(x for r in changes.values() for x in r.replicas)
    assert load == {"e": 6, "a": 3, "b": 3, "c": 3, "d": 3}
    leads = Counter(r.primary for r in changes.values())
    assert max(leads.values()) - min(leads.values()) <= 1 and len(leads) == 5


def test_create_uses_hosts_when_zones_do_not_suffice() -> None:
    # Two zones for three replicas: the third copy goes to another host.
    ms = members("a", "b", "c", "d", a="z1/h1", b="z1/h1", c="z1/h2", d="z2/h3")
    for r in plan({}, ms, 4, 3).values():
        zones = Counter(ms[x].labels["zone"] for x in r.replicas)
        hosts = {ms[x].labels["host"] for x in r.replicas}
        assert zones == {"z1": 2, "z2": 1} and len(hosts) == 3, fmt(r)


def test_create_skips_draining_nodes() -> None:
    changes = plan({}, members("n1", "n2", "n3", draining=("n3",)), 2, 3)
    assert {n: fmt(r) for n, r in changes.items()} == {
        0: "e1 n1 [n1 n2] isr [n1 n2]",
        1: "e1 n2 [n2 n1] isr [n2 n1]",
    }


# -- failover -------------------------------------------------------------


def test_primary_death_promotes_from_isr_then_drops_it() -> None:
    ms = members("n1", "n2", "n3")
    records = {0: rec(4, "n1", "n1 n2 n3", "n1 n2 n3", ms=ms)}
    del ms["n1"]
    step1 = plan(records, ms, 1, 3)
    assert fmt(step1[0]) == "e5 n2 [n1 n2 n3] isr [n2 n3]"
    assert step1[0].primary_lease == ms["n2"].lease
    step2 = plan(step1, ms, 1, 3)  # two live replicas reach min(rf, 2 members)
    assert fmt(step2[0]) == "e5 n2 [n2 n3] isr [n2 n3]"
    assert plan(step2, ms, 1, 3) == {}
    ms["n1"] = Member("n1", 900)  # n1 comes back with a new lease: a new copy
    assert plan_fmt(step2, ms, 1, 3) == {0: "e5 n2 [n2 n3 n1] isr [n2 n3]"}


def test_new_primary_is_the_isr_member_leading_fewest() -> None:
    ms = members("n1", "n2", "n3")
    records = {
        0: rec(1, "n1", "n1 n2 n3", "n1 n2 n3", ms=ms),
        1: rec(1, "n2", "n1 n2 n3", "n1 n2 n3", ms=ms),
        2: rec(1, "n2", "n1 n2 n3", "n1 n2 n3", ms=ms),
        3: rec(1, "n1", "n1 n2 n3", "n1 n2 n3", ms=ms),
    }
    del ms["n1"]
    assert plan_fmt(records, ms, 4, 3) == {
        0: "e2 n3 [n1 n2 n3] isr [n2 n3]",
        1: "e1 n2 [n1 n2 n3] isr [n2 n3]",
        2: "e1 n2 [n1 n2 n3] isr [n2 n3]",
        3: "e2 n3 [n1 n2 n3] isr [n2 n3]",
    }


def test_restarted_primary_is_replaced_and_stays_a_replica() -> None:
    ms = members("n1", "n2", "n3")
    records = {0: rec(2, "n1", "n1 n2 n3", "n1 n2 n3", ms=ms)}
    ms["n1"] = Member("n1", 555)  # same name, new session lease
    step1 = plan(records, ms, 1, 3)
    assert fmt(step1[0]) == "e3 n2 [n1 n2 n3] isr [n2 n3]"
    assert plan(step1, ms, 1, 3) == {}  # n1 catches up; its primary adds it back


def test_restarted_sole_isr_member_leads_again_under_its_new_lease() -> None:
    ms = members("n1")
    records = {0: rec(7, "n1", "n1", "n1", ms=ms)}
    ms["n1"] = Member("n1", 4242)
    step = plan(records, ms, 1, 3)
    assert fmt(step[0]) == "e8 n1 [n1] isr [n1]" and step[0].primary_lease == 4242


def test_failover_clears_a_pending_transfer() -> None:
    ms = members("n1", "n2", "n3")
    records = {0: rec(2, "n1", "n1 n2 n3", "n1 n2 n3", ms=ms, transfer_to="n2")}
    del ms["n1"]
    assert plan_fmt(records, ms, 1, 3) == {0: "e3 n2 [n1 n2 n3] isr [n2 n3]"}


def test_everything_dead_then_one_isr_member_returns() -> None:
    ms = members("n1", "n2", "n3")
    records = {0: rec(3, "n1", "n1 n2 n3", "n1 n2", ms=ms)}
    assert plan(records, {}, 1, 3) == {}  # nobody to act for
    only_n3 = {"n3": ms["n3"]}  # n3 is alive but was not in sync: never promoted
    step1 = plan(records, only_n3, 1, 3)
    assert fmt(step1[0]) == "e4 - [n1 n2 n3] isr [n1 n2]" and step1[0].primary_lease == 0
    assert plan(step1, only_n3, 1, 3) == {}  # waits; the epoch does not creep
    back = {"n3": ms["n3"], "n2": Member("n2", 901)}
    step2 = plan(step1, back, 1, 3)
    assert fmt(step2[0]) == "e5 n2 [n1 n2 n3] isr [n2]" and step2[0].primary_lease == 901
    step3 = plan(step2, back, 1, 3)
    assert fmt(step3[0]) == "e5 n2 [n2 n3] isr [n2]"  # n1 dropped; n3 catches up


# -- followers ------------------------------------------------------------


def test_follower_death_shrinks_isr_then_replicas() -> None:
    ms = members("n1", "n2", "n3")
    records = {0: rec(2, "n1", "n1 n2 n3", "n1 n2 n3", ms=ms)}
    del ms["n3"]
    step1 = plan(records, ms, 1, 3)
    assert fmt(step1[0]) == "e2 n1 [n1 n2 n3] isr [n1 n2]"
    step2 = plan(step1, ms, 1, 3)
    assert fmt(step2[0]) == "e2 n1 [n1 n2] isr [n1 n2]"
    assert plan(step2, ms, 1, 3) == {}


def test_dead_follower_is_replaced_before_it_is_dropped() -> None:
    ms = members("n1", "n2", "n3", "n4")
    records = {0: rec(2, "n1", "n1 n2 n3", "n1 n2 n3", ms=ms)}
    del ms["n3"]
    sim = Sim(ms, 1, 3)
    sim.records = dict(records)
    sim.control()
    sim.control()
    sim.control()
    assert sim.log == [
        "0: e2 n1 [n1 n2 n3] isr [n1 n2]",
        "0: e2 n1 [n1 n2 n3 n4] isr [n1 n2]",
        "0: e2 n1 [n1 n2 n4] isr [n1 n2]",
    ]


# -- transfers ----------------------------------------------------------------


def test_pending_transfer_is_left_alone_until_its_target_dies() -> None:
    ms = members("n1", "n2", "n3")
    records = {0: rec(2, "n1", "n1 n2 n3", "n1 n2 n3", ms=ms, transfer_to="n3")}
    assert plan(records, ms, 1, 3) == {}
    del ms["n2"]  # a dead follower waits until the hand-off is done or dropped
    assert plan(records, ms, 1, 3) == {}
    del ms["n3"]
    step = plan(records, ms, 1, 3)
    assert fmt(step[0]) == "e2 n1 [n1 n2 n3] isr [n1 n2 n3]"
    assert fmt(plan(step, ms, 1, 3)[0]) == "e2 n1 [n1 n2 n3] isr [n1]"


def test_transfer_to_a_member_outside_the_isr_is_cleared() -> None:
    ms = members("n1", "n2", "n3")
    records = {0: rec(2, "n1", "n1 n2 n3", "n1 n2", ms=ms, transfer_to="n3")}
    assert plan_fmt(records, ms, 1, 3) == {0: "e2 n1 [n1 n2 n3] isr [n1 n2]"}


def test_transfer_to_a_draining_member_is_cleared_then_it_leaves() -> None:
    ms = members("n1", "n2", "n3", draining=("n3",))
    records = {0: rec(2, "n1", "n1 n2 n3", "n1 n2 n3", ms=ms, transfer_to="n3")}
    step = plan(records, ms, 1, 3)
    assert fmt(step[0]) == "e2 n1 [n1 n2 n3] isr [n1 n2 n3]"
    assert plan_fmt(step, ms, 1, 3) == {0: "e2 n1 [n1 n2] isr [n1 n2]"}


# -- join and drain -----------------------------------------------------------


def three_node_cluster(shards: int = 8) -> Sim:
    sim = Sim(members("n1", "n2", "n3"), shards, 3)
    sim.settle()
    assert sim.load() == {"n1": shards, "n2": shards, "n3": shards}
    return sim


def test_join_of_a_fourth_node_rebalances_a_few_shards_at_a_time() -> None:
    sim = three_node_cluster()
    sim.ms["n4"] = Member("n4", 400)
    first = sim.control()
    assert {n: fmt(r) for n, r in first.items()} == {
        0: "e1 n1 [n1 n2 n3 n4] isr [n1 n2 n3]",
        1: "e1 n2 [n2 n3 n1 n4] isr [n2 n3 n1]",
    }  # MAX_MOVES_PER_NODE copies to n4 at once
    assert sim.control() == {}  # nothing more until they are in sync
    while sim.primaries_act() or sim.control():
        catching_up = sum(1 for r in sim.records.values() if "n4" not in r.isr
                          and "n4" in r.replicas)  # fmt: skip
        assert catching_up <= MAX_MOVES_PER_NODE
        for r in sim.records.values():
            assert len(r.isr) >= 3, f"a move left fewer in sync: {fmt(r)}"
    assert sim.load() == {"n1": 6, "n2": 6, "n3": 6, "n4": 6}
    assert sim.copies == 6  # every copy made was needed
    leads = sim.leads()
    assert max(leads.values()) - min(leads.values()) <= 1 and leads["n4"] >= 1
    assert sim.control() == {}


def test_drain_moves_every_replica_and_primary_away() -> None:
    sim = three_node_cluster()
    sim.ms["n4"] = Member("n4", 400)
    sim.settle()
    epochs = {n: r.epoch for n, r in sim.records.items()}
    sim.ms["n2"] = replace(sim.ms["n2"], draining=True)
    changes = sim.control()
    for n, r in changes.items():  # the first step only adds copies
        assert r.primary == sim.records[n].primary and r.isr == r.isr
    while sim.primaries_act() or sim.control():
        for r in sim.records.values():
            assert len(r.isr) >= 3, f"a move left fewer in sync: {fmt(r)}"
    assert "n2" not in sim.load() and sim.copies == 6 + 6
    assert sim.load() == {"n1": 8, "n3": 8, "n4": 8}
    # n2's primaries left by hand-off (the primary's own epoch + 1), one each.
    for n, r in sim.records.items():
        assert r.epoch - epochs[n] <= 1


def test_drain_without_spare_nodes_shrinks_to_the_rest() -> None:
    ms = members("n1", "n2", "n3", draining=("n1",))
    records = {0: rec(1, "n1", "n1 n2 n3", "n1 n2 n3", ms=ms)}
    step1 = plan(records, ms, 1, 3)
    assert fmt(step1[0]) == "e1 n1 [n1 n2 n3] isr [n1 n2 n3] -> n2"
    handed = {0: rec(2, "n2", "n1 n2 n3", "n1 n2 n3", ms=ms)}  # the primary's hand-off
    assert plan_fmt(handed, ms, 1, 3) == {0: "e2 n2 [n2 n3] isr [n2 n3]"}


def test_everyone_draining_changes_nothing() -> None:
    ms = members("n1", "n2", draining=("n1", "n2"))
    records = {0: rec(1, "n1", "n1 n2", "n1 n2", ms=ms)}
    assert plan(records, ms, 1, 3) == {}


def test_growth_from_one_node_adds_replicas_at_once() -> None:
    sim = Sim(members("n1"), 4, 3)
    sim.settle()
    sim.ms.update({"n2": Member("n2", 200), "n3": Member("n3", 300)})
    sim.settle()
    assert sim.load() == {"n1": 4, "n2": 4, "n3": 4}
    leads = sim.leads()
    assert max(leads.values()) - min(leads.values()) <= 1


# -- properties over random histories ----------------------------------------

NAMES = [f"n{i}" for i in range(5)]
# "start" joins a node or restarts it (a new lease); "shrink" is a primary
# dropping a slow follower from its ISR.  Weighted towards the controller.
KINDS = ["control"] * 4 + ["primaries"] * 2 + ["start"] * 2 + ["shrink"] * 2
KINDS += ["kill", "kill", "drain", "undrain"]
event = st.tuples(st.sampled_from(KINDS), st.sampled_from(NAMES))


def apply_event(sim: Sim, kind: str, name: str, lease: int) -> None:
    ms = sim.ms
    if kind == "kill":
        ms.pop(name, None)
    elif kind == "start":
        zone = f"z{int(name[1:]) % 3}"
        ms[name] = Member(name, lease, {"zone": zone, "host": name})
    elif kind in ("drain", "undrain") and name in ms:
        ms[name] = replace(ms[name], draining=kind == "drain")
    elif kind == "control":
        sim.control()
    elif kind == "primaries":
        sim.primaries_act()
    elif kind == "shrink":
        for n, r in sim.records.items():
            if name in r.isr and name != r.primary and r.transfer_to != name:
                sim.records[n] = replace(r, isr=tuple(x for x in r.isr if x != name))


@settings(
    max_examples=int(os.environ.get("PLACEMENT_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    history=st.lists(event, min_size=1, max_size=80),
    shards=st.integers(1, 6),
    rf=st.integers(1, 3),
)
def test_random_histories_keep_the_invariants_and_converge(history, shards, rf) -> None:
    sim = Sim({}, shards, rf)
    epochs: dict[int, int] = {}
    for lease, (kind, name) in enumerate(history, start=1000):
        apply_event(sim, kind, name, lease)
        check_records(sim.records)
        for n, r in sim.records.items():
            assert r.epoch >= epochs.get(n, 0)
            epochs[n] = r.epoch
    # Quiet period: everything converges to a fixed point.
    sim.settle()
    if not sim.ms:
        return
    eligible = [m for m in sim.ms.values() if not m.draining] or list(sim.ms.values())
    target = min(rf, len(eligible))
    for n in range(shards):
        r = sim.records[n]
        if not any(x in sim.ms for x in r.isr):
            assert r.primary is None  # stuck until an ISR member returns, by design
            continue
        assert sim.leader_ok(r), fmt(r)
        assert all(x in sim.ms for x in r.replicas) and len(r.replicas) == target, fmt(r)
        assert set(r.isr) == set(r.replicas) and r.transfer_to is None, fmt(r)
        if len(eligible) < len(sim.ms):  # drains are done
            assert not any(sim.ms[x].draining for x in r.replicas), fmt(r)


@st.composite
def any_record(draw) -> ShardRecord:
    """A valid record: ISR within replicas, primary (or none) in the ISR."""
    replicas = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    isr = draw(st.lists(st.sampled_from(replicas), min_size=1, unique=True))
    primary = draw(st.one_of(st.none(), st.sampled_from(isr)))
    others = [n for n in isr if n != primary]
    transfer = draw(st.one_of(st.none(), st.sampled_from(others))) if others and primary else None
    lease = draw(st.integers(1, 3))
    return ShardRecord(draw(st.integers(1, 9)), primary, lease if primary else 0,
                       tuple(replicas), tuple(isr), transfer)  # fmt: skip


@settings(max_examples=int(os.environ.get("PLACEMENT_EXAMPLES", "200")), deadline=None)
@given(
    records=st.lists(st.one_of(st.none(), any_record()), min_size=1, max_size=5),
    alive=st.dictionaries(st.sampled_from(NAMES), st.tuples(st.integers(1, 3), st.booleans())),
    rf=st.integers(1, 3),
)
def test_one_step_from_any_state_keeps_the_rules(records, alive, rf) -> None:
    ms = {n: Member(n, lease, {"zone": n}, drain) for n, (lease, drain) in alive.items()}
    current = dict(enumerate(records))
    for n, new in plan(current, ms, len(records), rf).items():
        check_controller_step(current[n], new, ms)
