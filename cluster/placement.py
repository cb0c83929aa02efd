"""Shard placement as pure functions: observed etcd state in, next records out.

Theory of operation
-------------------
The controller (cluster/controller.py) reads ``/members/``, ``/drain/`` and
``/shards/`` and calls :func:`plan`.  ``plan`` answers only the shards whose
record must change, each changed by *one* step; the controller writes them by
compare-and-swap, watches the result, and plans again.  So a long change (a
rebalance, a drain) is a chain of small steps, each valid on its own, and a
controller that dies half-way leaves records its successor simply continues.

Per shard, the first rule that applies wins (docs/cluster.md, "Placement"):

1. **No record**: ``min(rf, eligible members)`` replicas over distinct failure
   domains (label ``zone``, then ``host``), then the least loaded nodes; the
   primary is the replica leading the fewest shards; ``isr = replicas``.
2. **Failover**: the primary is gone, or its member carries another lease
   than ``primary_lease`` (it restarted).  The new primary comes from the
   alive ISR only (never a replica outside it: it may lack committed
   operations), ``epoch + 1``.  With no alive ISR member the record gets
   ``primary = None`` (``epoch + 1``, ISR kept) until one returns.
3. **Repair**: a pending ``transfer_to`` is left alone unless its target died,
   left the ISR or began to drain (then cleared).  Dead members leave ``isr``; a missing
   replica is replaced by the best live non-replica (it enters ``isr`` only
   when the primary has caught it up); dead replicas are dropped once enough
   live replicas exist.
4. **Moves** (drain, join): a replacement is added first (``rf + 1``
   temporarily); once it is in the ISR the leaving node is removed, or, if
   it is the primary, ``transfer_to`` asks it to hand off.  At most
   ``MAX_MOVES_PER_NODE`` shards move through a node at once.  Primaries are
   balanced with ``transfer_to`` when two ISR members differ by more than one.

The controller never adds a node to ``isr`` (creation aside: empty logs are
trivially in sync), never changes ``epoch`` without changing ``primary``, and
never names a primary outside the ISR.  Loads are tracked while planning, so
the shards of one plan see each other's decisions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

MAX_MOVES_PER_NODE = 2  # shards moving to or from one node at the same time
DOMAIN_LABELS = ("zone", "host")  # failure domains, widest first


@dataclass(frozen=True)
class Member:
    """A live member as /members/<name> (and /drain/<name>) show it."""

    name: str
    lease: int
    labels: Mapping[str, str] = field(default_factory=dict)
    draining: bool = False

    @classmethod
    def from_json(cls, name: str, value: Any, lease: int = 0, draining: bool = False) -> Member:
        """From a /members/ record; ``lease`` is the etcd lease of the key
        (authoritative), else the record's own "lease" field."""
        value = value if isinstance(value, dict) else {}
        raw = value.get("labels")
        labels = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        return cls(name, int(lease or value.get("lease") or 0), labels, draining)


@dataclass(frozen=True)
class ShardRecord:
    """The value of /shards/<NNNN> (docs/cluster.md, "etcd keys")."""

    epoch: int
    primary: str | None
    primary_lease: int
    replicas: tuple[str, ...]
    isr: tuple[str, ...]
    transfer_to: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "primary": self.primary,
            "primary_lease": self.primary_lease,
            "replicas": list(self.replicas),
            "isr": list(self.isr),
            "transfer_to": self.transfer_to,
        }

    @classmethod
    def from_json(cls, value: Any) -> ShardRecord:
        """Parse a record; ValueError if it is not one."""
        if not isinstance(value, dict):
            raise ValueError("shard record is not an object")
        try:
            primary = value.get("primary")
            transfer = value.get("transfer_to")
            record = cls(
                epoch=int(value["epoch"]),
                primary=None if primary is None else str(primary),
                primary_lease=int(value.get("primary_lease") or 0),
                replicas=tuple(str(x) for x in value.get("replicas") or ()),
                isr=tuple(str(x) for x in value.get("isr") or ()),
                transfer_to=None if transfer is None else str(transfer),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad shard record: {exc}") from None
        if record.epoch < 0:
            raise ValueError("bad shard record: negative epoch")
        return record


def shard_key(number: int) -> str:
    """The etcd key of shard ``number``: "/shards/0007"."""
    return f"/shards/{number:04d}"


def _without(names: Iterable[str], drop: Iterable[str]) -> tuple[str, ...]:
    gone = set(drop)
    return tuple(n for n in names if n not in gone)


class _Planner:
    """The loads and limits of one plan() call, updated shard by shard."""

    def __init__(
        self,
        records: Mapping[int, ShardRecord | None],
        members: Mapping[str, Member],
        rf: int,
    ) -> None:
        self.members = members
        eligible = [n for n, m in members.items() if not m.draining]
        # Everyone draining: nowhere to move to, so draining means nothing.
        self.drain_active = bool(eligible)
        self.eligible = sorted(eligible if eligible else members)
        self.target = min(max(rf, 1), len(self.eligible))
        # The replica each over-full record will drop: chosen in shard order
        # against loads that already count earlier choices, so that records
        # in motion together do not all drop the same node.
        counts: dict[str, int] = {n: 0 for n in members}
        for rec in records.values():
            for n in rec.replicas if rec else ():
                if n in counts:
                    counts[n] += 1
        self.leaving: dict[int, str | None] = {}
        for number in sorted(records):
            gone = self.excess(records[number], counts)
            self.leaving[number] = gone
            if gone is not None:
                counts[gone] -= 1
        self.load: dict[str, int] = {n: 0 for n in members}  # replicas that stay
        self.lead: dict[str, int] = {n: 0 for n in members}  # primaries, after transfers
        self.moving: dict[str, int] = {n: 0 for n in members}
        for number, rec in records.items():
            self.account(number, rec, +1)

    # -- facts about members and records --------------------------------

    def alive(self, name: str | None) -> bool:
        return name is not None and name in self.members

    def draining(self, name: str) -> bool:
        return self.drain_active and self.alive(name) and self.members[name].draining

    def leader_ok(self, rec: ShardRecord) -> bool:
        """The primary is a member and still under the lease it was chosen with."""
        p = rec.primary
        return p is not None and p in self.members and self.members[p].lease == rec.primary_lease

    def live(self, rec: ShardRecord) -> list[str]:
        return [n for n in rec.replicas if self.alive(n)]

    def staying(self, rec: ShardRecord) -> list[str]:
        return [n for n in rec.replicas if self.alive(n) and not self.draining(n)]

    def _dups(self, group: Iterable[str], name: str) -> tuple[int, ...]:
        """How many of group share each failure domain of name (zone, host)."""
        labels = self.members[name].labels
        out = []
        for label in DOMAIN_LABELS:
            mine = labels.get(label)
            same = 0
            if mine:
                same = sum(
                    1 for g in group if g != name and self.members[g].labels.get(label) == mine
                )
            out.append(same)
        return tuple(out)

    def spread(self, group: Iterable[str]) -> tuple[int, ...]:
        """Sum of shared failure domains in group (lower spreads better)."""
        names = [g for g in group if self.alive(g)]
        totals = [0] * len(DOMAIN_LABELS)
        for n in names:
            for i, d in enumerate(self._dups(names, n)):
                totals[i] += d
        return tuple(totals)

    def excess(self, rec: ShardRecord | None, loads: Mapping[str, int]) -> str | None:
        """The replica to remove when a record has more live replicas than
        the target: a draining one first, else the ISR member sharing most
        failure domains, then the most loaded, a follower before the primary.
        Replicas still catching up (not in the ISR) are never the excess
        unless draining."""
        if rec is None:
            return None
        live = self.live(rec)
        if len(live) <= self.target:
            return None
        pool = [n for n in live if n in rec.isr or self.draining(n)]
        if not pool:
            return None
        return max(
            pool,
            key=lambda n: (
                self.draining(n),
                self._dups(live, n),
                loads.get(n, 0),
                n != rec.primary,
                n,
            ),
        )

    # -- load bookkeeping -----------------------------------------------

    def account(self, number: int, rec: ShardRecord | None, sign: int) -> None:
        """Add (+1) or remove (-1) a record's share of the loads."""
        if rec is None:
            return
        gone = self.leaving.get(number)
        for n in self.live(rec):
            if n != gone:
                self.load[n] += sign
            if n == gone or n not in rec.isr:
                self.moving[n] += sign
        head = rec.primary if self.leader_ok(rec) else None
        if head is not None and self.alive(rec.transfer_to):
            self.moving[head] += sign
            head = rec.transfer_to
        if head is not None:
            self.lead[head] += sign

    def may_move(self, *names: str) -> bool:
        return all(self.moving.get(n, 0) < MAX_MOVES_PER_NODE for n in names)

    # -- choices ----------------------------------------------------------

    def best_new(self, chosen: list[str], exclude: Iterable[str]) -> str | None:
        """The eligible node to add next to chosen: failure domains first,
        then replica count, then primary count."""
        skip = set(exclude) | set(chosen)
        pool = [n for n in self.eligible if n not in skip]
        if not pool:
            return None
        return min(pool, key=lambda n: (self._dups(chosen, n), self.load[n], self.lead[n], n))

    def best_leader(self, pool: Iterable[str], avoid: str | None) -> str | None:
        candidates = list(pool)
        if not candidates:
            return None
        return min(candidates, key=lambda n: (n == avoid, self.draining(n), self.lead[n], n))

    # -- the rules ----------------------------------------------------------

    def create(self) -> ShardRecord | None:
        chosen: list[str] = []
        while len(chosen) < self.target:
            nxt = self.best_new(chosen, ())
            if nxt is None:
                break
            chosen.append(nxt)
        primary = self.best_leader(chosen, None)
        if primary is None:
            return None
        replicas = tuple(chosen)
        return ShardRecord(1, primary, self.members[primary].lease, replicas, replicas, None)

    def failover(self, rec: ShardRecord) -> ShardRecord | None:
        old = rec.primary
        alive_isr = [n for n in rec.isr if self.alive(n)]
        if not alive_isr:
            if old is None:
                return None  # still waiting for an ISR member to return
            return replace(
                rec, epoch=rec.epoch + 1, primary=None, primary_lease=0, transfer_to=None
            )
        new = self.best_leader(alive_isr, old)
        assert new is not None
        isr = tuple(n for n in alive_isr if n != old or n == new)  # a restarted old primary
        return ShardRecord(rec.epoch + 1, new, self.members[new].lease, rec.replicas, isr, None)

    def repair(self, number: int, rec: ShardRecord) -> ShardRecord | None:
        """Rules 3 and 4 for a record whose primary is alive."""
        t = rec.transfer_to
        if t is not None:
            if not self.alive(t) or self.draining(t) or t not in rec.isr or t == rec.primary:
                return replace(rec, transfer_to=None)
            return None  # the primary hands off; nothing else until then
        dead_isr = [n for n in rec.isr if not self.alive(n)]
        if dead_isr:
            return replace(rec, isr=_without(rec.isr, dead_isr))
        staying = self.staying(rec)
        live = self.live(rec)
        if len(staying) < self.target:
            new = self.best_new(staying, rec.replicas)
            only_drain = len(live) >= self.target  # nothing died: a planned move
            leaving = [n for n in live if self.draining(n)]
            if new is not None and (not only_drain or self.may_move(new, *leaving)):
                return replace(rec, replicas=rec.replicas + (new,))
        dead = [n for n in rec.replicas if not self.alive(n)]
        if dead and len(live) >= self.target:
            return replace(rec, replicas=_without(rec.replicas, dead))
        if len(live) > self.target:
            return self.shrink(number, rec)
        return self.rebalance(rec)

    def shrink(self, number: int, rec: ShardRecord) -> ShardRecord | None:
        gone = self.leaving.get(number)
        if gone is None:
            return None
        if gone in rec.isr and len([n for n in rec.isr if n != gone]) < max(self.target, 1):
            return None  # wait until the replacement is in sync
        if gone != rec.primary:
            return replace(
                rec, replicas=_without(rec.replicas, [gone]), isr=_without(rec.isr, [gone])
            )
        pool = [n for n in rec.isr if n != gone and self.alive(n) and not self.draining(n)]
        heir = self.best_leader(pool, gone)
        return replace(rec, transfer_to=heir) if heir is not None else None

    def rebalance(self, rec: ShardRecord) -> ShardRecord | None:
        """One replica move or one primary transfer, for a settled record."""
        settled = set(rec.isr) == set(rec.replicas) and all(
            self.alive(n) and not self.draining(n) for n in rec.replicas
        )
        if not settled:
            return None
        move = self.replica_move(rec)
        if move is not None:
            return replace(rec, replicas=rec.replicas + (move,))
        heir = min(
            (n for n in rec.isr if n != rec.primary),
            key=lambda n: (self.lead[n], n),
            default=None,
        )
        # Loads exclude this shard while it is planned: the primary's is one more.
        p = rec.primary
        if heir is not None and p is not None and self.lead[p] + 1 - self.lead[heir] > 1:
            return replace(rec, transfer_to=heir)
        return None

    def replica_move(self, rec: ShardRecord) -> str | None:
        """A node to add so that an overloaded replica can leave once it is
        in sync (loads differing by more than one), never spreading worse.
        The leaving replica is the one excess() will pick then."""
        before = self.spread(rec.replicas)
        best: tuple[Any, ...] | None = None
        for new in self.eligible:
            if new in rec.replicas or not self.may_move(new):
                continue
            grown = rec.replicas + (new,)
            out = self.excess(replace(rec, replicas=grown, isr=grown), self.load)
            if out is None or out == new or not self.may_move(out):
                continue
            # Loads exclude this shard while it is planned: out's is one more.
            if self.load[out] + 1 - self.load[new] <= 1:
                continue
            after = self.spread(n for n in grown if n != out)
            if after > before:
                continue
            key = (after, self.load[new], self.lead[new], new)
            if best is None or key < best:
                best = key
        return None if best is None else best[3]

    def step(self, number: int, rec: ShardRecord | None) -> ShardRecord | None:
        """The next record for one shard, or None if it stays."""
        if rec is None:
            return self.create()
        if not self.leader_ok(rec):
            return self.failover(rec)
        return self.repair(number, rec)


def plan(
    records: Mapping[int, ShardRecord | None],
    members: Mapping[str, Member],
    shards: int,
    rf: int,
) -> dict[int, ShardRecord]:
    """The shards (0 .. shards-1) whose record must change, one step each.

    ``records`` maps shard numbers to their current record (missing or None:
    no record yet); ``members`` are the live members by name, ``draining``
    set from /drain/.  With no members nothing changes.
    """
    if not members:
        return {}
    current = {n: records.get(n) for n in range(shards)}
    planner = _Planner(current, members, rf)
    changes: dict[int, ShardRecord] = {}
    for number in range(shards):
        rec = current[number]
        planner.account(number, rec, -1)
        new = planner.step(number, rec)
        if new is not None and new != rec:
            changes[number] = new
            rec = new
            planner.leaving[number] = planner.excess(new, planner.load)
        planner.account(number, rec, +1)
    return changes


def _name(name: str, members: Mapping[str, Member]) -> str:
    member = members.get(name)
    if member is None:
        return name + "(dead)"
    return name + ("(draining)" if member.draining else "")


def describe_record(number: int, rec: ShardRecord | None, members: Mapping[str, Member]) -> str:
    """One line for a shard: epoch, primary, ISR, other replicas, transfer."""
    if rec is None:
        return f"shard {number:04d}: no record"
    primary = "-" if rec.primary is None else _name(rec.primary, members)
    p = rec.primary
    if p is not None and p in members and members[p].lease != rec.primary_lease:
        primary = rec.primary + "(restarted)"
    isr = ",".join(_name(n, members) for n in rec.isr) or "-"
    rest = [_name(n, members) for n in rec.replicas if n not in rec.isr]
    line = f"shard {number:04d}: epoch {rec.epoch} primary {primary} isr [{isr}]"
    if rest:
        line += f" catching-up [{','.join(rest)}]"
    if rec.transfer_to is not None:
        line += f" transfer_to {_name(rec.transfer_to, members)}"
    return line


def describe(records: Mapping[int, ShardRecord | None], members: Mapping[str, Member]) -> list[str]:
    """Human-readable lines (for logs and `postroom status`), by shard number."""
    return [describe_record(n, records[n], members) for n in sorted(records)]
