"""The elected placement controller: applies cluster/placement.py through etcd.

Theory of operation
-------------------
Every node runs a :class:`Controller`; one of them leads.  Election is
``/controller`` created if absent under the session lease (cluster/etcd.py);
the others watch that key and campaign again when it is deleted (its lease
expired, or the leader stopped).  When the session is lost the leader stops
acting at once (``on_session_lost``), before etcd even expires its key.

The leader reads ``/members/``, ``/drain/`` and ``/shards/``, runs
:func:`cluster.placement.plan`, and writes each changed record in one etcd
transaction: the record's mod_revision is still the one read (absent for a
new record) **and** ``/controller`` is still under our lease.  The second
condition fences a deposed controller whose session already expired on the
server.  A failed transaction (a primary changed its ISR meanwhile, or a
hand-off happened) means: read again and plan again.  Plans are single steps,
so the leader reconciles again after every change it sees: watches on the
three prefixes (from the revision read + 1) wake it, debounced by
``DEBOUNCE`` seconds, and it re-plans every ``RESYNC`` seconds anyway.

The first records wait until ``replication_factor`` members are present, or
``INITIAL_WAIT`` seconds after the first member appeared, so that a cluster
starting node by node spreads its shards instead of piling them on the first.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import gevent.event

from cluster.etcd import Compare, EtcdError, EtcdSession, Put, Watch, WatchEvent, key_absent
from cluster.etcd import mod_revision_is as mod_is
from cluster.placement import Member, ShardRecord, describe_record, plan, shard_key

log = logging.getLogger(__name__)

CONTROLLER = "/controller"
MEMBERS = "/members/"
SHARDS = "/shards/"
DRAIN = "/drain/"
DEBOUNCE = 0.1  # seconds to gather a burst of watch events into one plan
RESYNC = 3.0  # seconds between safety-net plans without any event
INITIAL_WAIT = 3.0  # seconds after the first member before records are created
RETRY = 0.5  # seconds after an etcd error


def _shard_number(key: str) -> int | None:
    tail = key[len(SHARDS) :]
    return int(tail) if tail.isdigit() else None


class Controller:
    """Campaigns for /controller and, while it leads, keeps /shards/ placed."""

    def __init__(self, session: EtcdSession, node_name: str, meta: dict[str, Any]) -> None:
        self.session = session
        self.node_name = node_name
        self.shards = int(meta["shards"])
        self.rf = int(meta.get("replication_factor") or 3)
        self.leading = False
        self.terms = 0  # times this node became the controller
        self.actions = 0  # shard records written
        self.conflicts = 0  # writes refused (record changed meanwhile, or deposed)
        self.plans = 0  # reconciliations run while leading
        self._lease = 0  # the lease /controller was acquired under
        self._wake = gevent.event.Event()
        self._watches: list[Watch] = []
        self._election_watch: Watch | None = None
        self._runner: gevent.Greenlet | None = None
        self._stopped = False
        self._first_member: float | None = None
        self._timer: gevent.Greenlet | None = None
        self._created_callbacks = False

    # -- life cycle -------------------------------------------------------

    def start(self) -> None:
        """Start campaigning (the session is started if it is not yet)."""
        self.session.start()
        if not self._created_callbacks:
            self.session.add_session_callbacks(self._on_session_lost, self._on_session_restored)
            self._created_callbacks = True
        self._stopped = False
        self._runner = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop leading (releasing /controller) and campaigning."""
        self._stopped = True
        was_leading = self.leading
        self._step_down("stopping")
        if self._election_watch is not None:
            self._election_watch.cancel()
            self._election_watch = None
        for greenlet in (self._runner, self._timer):
            if greenlet is not None:
                greenlet.kill(block=True, timeout=5)
        self._runner = self._timer = None
        if was_leading:
            try:
                self.session.release(CONTROLLER)
            except EtcdError as exc:
                log.warning("controller: release failed (the lease expires anyway): %s", exc)

    # -- session and election ---------------------------------------------

    def _on_session_lost(self) -> None:
        self._step_down("etcd session lost")

    def _on_session_restored(self) -> None:
        self._wake.set()  # campaign again under the new lease

    def _step_down(self, why: str) -> None:
        if self.leading:
            log.warning("controller: %s stops leading (%s)", self.node_name, why)
        self.leading = False
        self._lease = 0
        for watch in self._watches:
            watch.cancel()
        self._watches.clear()
        self._wake.set()

    def _on_election_event(self, event: WatchEvent) -> None:
        if event.type == "delete":
            if self.leading:
                self._step_down("/controller was deleted")
            self._wake.set()
        elif self.leading and not (
            isinstance(event.value, dict) and event.value.get("lease") == self._lease
        ):
            self._step_down("/controller names another leader")

    def _campaign(self) -> bool:
        """Try to become the controller; True if we now lead."""
        lease = self.session.lease_id
        if not lease:
            return False
        if not self.session.acquire(CONTROLLER, {"node": self.node_name, "lease": lease}):
            current = self.session.get(CONTROLLER)
            if current is None or current.lease != lease:
                return False  # another node leads (or it just vanished: retry soon)
        self._lease = lease
        self.leading = True
        self.terms += 1
        self._first_member = None
        log.info("controller: %s leads (lease %x)", self.node_name, lease)
        return True

    def _watch_election(self) -> None:
        if self._election_watch is None:
            _, revision = self.session.get_prefix(CONTROLLER)
            self._election_watch = self.session.watch_prefix(
                CONTROLLER, self._on_election_event, revision + 1
            )

    # -- the loop -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped:
            try:
                self._watch_election()
                if not self.leading:
                    self._wake.clear()
                    if not self._campaign():
                        self._wake.wait(timeout=max(1.0, self.session.lease_ttl / 2))
                        continue
                    self._lead()
                self._wake.wait(timeout=RESYNC)
                if not self.leading or self._stopped:
                    continue
                gevent.sleep(DEBOUNCE)  # gather the rest of a burst
                self._wake.clear()
                self.reconcile()
            except EtcdError as exc:
                log.warning("controller: %s", exc)
                gevent.sleep(RETRY)
            except Exception:
                log.exception("controller: unexpected error; carrying on")
                gevent.sleep(RETRY)

    def _lead(self) -> None:
        """Newly elected: plan once, then watch what plans depend on."""
        try:
            revision = self.reconcile()
        except EtcdError:
            self._step_down("etcd failed while taking over")  # campaign again
            raise
        for prefix in (MEMBERS, SHARDS, DRAIN):
            self._watches.append(self.session.watch_prefix(prefix, self._on_change, revision + 1))

    def _on_change(self, event: WatchEvent) -> None:
        self._wake.set()

    # -- reconcile ----------------------------------------------------------------

    def _observe(self) -> tuple[dict[str, Member], dict[int, tuple[Any, int]], int]:
        """Members, {shard: (raw record, mod_revision)}, the first revision read."""
        member_kvs, revision = self.session.get_prefix(MEMBERS)
        drain_kvs, _ = self.session.get_prefix(DRAIN)
        shard_kvs, _ = self.session.get_prefix(SHARDS)
        draining = {kv.key[len(DRAIN) :] for kv in drain_kvs}
        members = {}
        for kv in member_kvs:
            name = kv.key[len(MEMBERS) :]
            if name and "/" not in name:
                members[name] = Member.from_json(name, kv.value, kv.lease, name in draining)
        raw: dict[int, tuple[Any, int]] = {}
        for kv in shard_kvs:
            number = _shard_number(kv.key)
            if number is not None and number < self.shards:
                raw[number] = (kv.value, kv.mod_revision)
        return members, raw, revision

    def reconcile(self) -> int:
        """Read, plan one step, write it; returns the revision read.  A refused
        write wakes the loop to read and plan again."""
        members, raw, revision = self._observe()
        if not self.leading:
            return revision
        self.plans += 1
        records: dict[int, ShardRecord | None] = {}
        unreadable = set()
        for number, (value, _) in raw.items():
            try:
                records[number] = ShardRecord.from_json(value)
            except ValueError as exc:
                unreadable.add(number)
                log.error("controller: %s left alone: %s", shard_key(number), exc)
        changes = plan(records, members, self.shards, self.rf)
        hold_new = self._hold_new_records(members)
        for number, record in sorted(changes.items()):
            if number in unreadable or (number not in raw and hold_new):
                continue
            if not self.leading:
                break
            expected = raw[number][1] if number in raw else 0
            self._write(number, expected, record, members)
        return revision

    def _hold_new_records(self, members: dict[str, Member]) -> bool:
        """True while the first records should wait for more members."""
        if not members:
            return True
        now = time.monotonic()
        if self._first_member is None:
            self._first_member = now
        waited = now - self._first_member
        if len(members) >= self.rf or waited >= INITIAL_WAIT:
            return False
        if self._timer is None or self._timer.dead:
            self._timer = gevent.spawn_later(INITIAL_WAIT - waited + DEBOUNCE, self._wake.set)
        return True

    def _write(
        self, number: int, expected: int, record: ShardRecord, members: dict[str, Member]
    ) -> bool:
        key = shard_key(number)
        fence = Compare(CONTROLLER, "LEASE", "EQUAL", self._lease)
        guard = key_absent(key) if expected == 0 else mod_is(key, expected)
        if self.session.txn([guard, fence], [Put(key, record.to_json())]):
            self.actions += 1
            log.info("controller: %s", describe_record(number, record, members))
            return True
        self.conflicts += 1
        current = self.session.get(CONTROLLER)
        if current is None or current.lease != self._lease:
            self._step_down("/controller is no longer ours")
            return False
        log.info("controller: %s changed meanwhile; planning again", key)
        self._wake.set()
        return False
