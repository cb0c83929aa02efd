"""The per-node cluster manager: shard roles from etcd, replication, positions.

Theory of operation
-------------------
The manager watches ``/members/`` (RPC addresses and leases of the live
members) and ``/shards/`` (one record per shard, docs/cluster.md).  For each
shard it decides this node's role from the freshest record it knows:

* **primary** iff the record names this node with ``primary_lease`` equal to
  our current session lease, the session is alive, and we were not deposed
  at that epoch;
* **follower** iff we are one of its replicas;
* **none** otherwise.

Role changes are applied by one worker greenlet per shard, so transitions of
a shard never overlap.  Becoming primary of a new epoch first fences the
shard (role follower, known epoch = the new one: the old primary's appends
are refused from now on), then runs the promotion sync of a new
:class:`~cluster.replication.Replicator`, and only then sets the role to
primary with the replicator as the committer's ``replicate`` hook.  Until
then writes raise StorageUnavailable (clients retry).  On session loss every
led shard becomes follower at once, before a new lease is granted.

Every 2 s (``positions_interval``) the manager publishes ``/positions/<node>``
(under its lease) if it changed: the last (index, epoch) of each shard it
holds, for ``postroom status``, lag, drills and log compaction.
It also implements node.context.ClusterView for the rest of the node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent

from cluster.etcd import EtcdError, EtcdSession, Watch, WatchEvent
from cluster.placement import ShardRecord
from cluster.replication import (
    SHARDS,
    Deposed,
    ReplicationService,
    Replicator,
    ShardRecords,
)
from cluster.rpc import RpcClient, RpcServer
from node.config import Config
from storage import mailstore
from storage.mailstore import MailStore
from storage.model import StaleEpoch, StorageError

log = logging.getLogger(__name__)

MEMBERS = "/members/"
POSITIONS = "/positions/"
POSITIONS_INTERVAL = 2.0  # default [cluster] positions_interval: seconds between /positions/ writes
POSITIONS_REFRESH = 60.0  # seconds after which unchanged positions are written again
HANDOFF_HOOK_TIMEOUT = 10.0  # seconds the hand-off hooks may take together
RETRY_DELAY = 0.5  # seconds before a failed role transition is tried again


@dataclass
class _Role:
    role: str  # "none" | "follower" | "syncing" | "primary"
    epoch: int
    replicator: Replicator | None = None


def _shard_number(key: str) -> int | None:
    try:
        return int(key[len(SHARDS):])
    except ValueError:
        return None


class ClusterManager:
    """Implements node.context.ClusterView; see the module docstring."""

    def __init__(
        self,
        config: Config,
        session: EtcdSession,
        store: MailStore,
        rpc_server: RpcServer,
        rpc_client: RpcClient,
        meta: dict,
        node_name: str,
    ) -> None:
        settings = config.cluster
        self.config = config
        self.session = session
        self.store = store
        self.rpc_server = rpc_server
        self.rpc_client = rpc_client
        self.meta = meta
        self.node_name = node_name
        self.shards = int(meta["shards"])
        self.ack_timeout = settings.ack_timeout
        self.rpc_timeout = settings.rpc_timeout
        self.catchup_batch = max(1, settings.catchup_batch)
        self.positions_interval = settings.positions_interval
        self.records = ShardRecords(session, on_change=self._mark)
        self.service = ReplicationService(store, rpc_client, self.rpc_address, self.rpc_timeout,
                                          self.await_follower)
        self.service.register(rpc_server)
        self._members: dict[str, dict] = {}
        self._roles: dict[int, _Role] = {}
        self._fenced: dict[int, int] = {}  # shard -> epoch we were deposed at
        self._seen: dict[int, tuple[bool, str | None]] = {}  # what callbacks were told
        self._dirty: set[int] = set()
        self._workers: dict[int, gevent.Greenlet] = {}
        self._callbacks: list[Callable[[int], None]] = []
        self._handoff_hooks: list[Callable[[int], None]] = []
        self._watches: list[Watch] = []
        self._publisher: gevent.Greenlet | None = None
        self._published: tuple[int, dict] | None = None  # (lease, shards) last written
        self._published_at = 0.0
        self._running = False
        session.add_session_callbacks(on_lost=self._session_lost,
                                      on_restored=self._session_restored)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Load members and shard records, set every shard's role, start watching."""
        self.service.clean()
        self._running = True
        rev_members = self._load_members()
        rev_shards = self._load_shards()
        for number in range(self.shards):
            want, epoch = self._desired(number)
            first = "follower" if want == "primary" else want  # primary only after a sync
            self.store.set_role(number, first, epoch)
            self._roles[number] = _Role(first, epoch)
            if want == "primary":
                self._mark(number)
        self._watches.append(self.session.watch_prefix(
            MEMBERS, self._member_event, rev_members + 1, on_reset=self._load_members_reset))
        self._watches.append(self.session.watch_prefix(
            SHARDS, self._shard_event, rev_shards + 1, on_reset=self._load_shards_reset))
        self._publisher = gevent.spawn(self._publish_loop)
        log.info("cluster manager %s started: %d shards", self.node_name, self.shards)

    def stop(self) -> None:
        """Stop leading (every led shard becomes follower) and stop watching."""
        self._running = False
        for watch in self._watches:
            watch.cancel()
        self._watches.clear()
        if self._publisher is not None:
            self._publisher.kill(block=False)
            self._publisher = None
        for worker in list(self._workers.values()):
            worker.kill(block=False)
        self._workers.clear()
        self._step_down_all()
        try:
            self.session.delete(POSITIONS + self.node_name)
        except EtcdError:
            pass  # the key lives under our lease anyway

    # -- ClusterView -------------------------------------------------------------

    def shard_of(self, account: str) -> int:
        return mailstore.shard_of(account, self.shards)

    def primary_of(self, number: int) -> str | None:
        record = self.records.record(number)
        return record.primary if record is not None and record.primary else None

    def rpc_address(self, node: str) -> str | None:
        member = self._members.get(node)
        address = member.get("rpc") if member else None
        return address if isinstance(address, str) and address else None

    def member_lease(self, node: str) -> int | None:
        member = self._members.get(node)
        lease = member.get("lease") if member else None
        return int(lease) if isinstance(lease, int) and lease else None

    def members(self) -> dict[str, dict]:
        return dict(self._members)

    def is_local_primary(self, number: int) -> bool:
        role = self._roles.get(number)
        return role is not None and role.role == "primary"

    def local_primary_shards(self) -> list[int]:
        return sorted(n for n, r in self._roles.items() if r.role == "primary")

    def role(self, number: int) -> tuple[str, int]:
        """This node's role in shard ``number`` as the manager applied it."""
        role = self._roles.get(number)
        return (role.role, role.epoch) if role is not None else ("none", 0)

    def replicator(self, number: int) -> Replicator | None:
        role = self._roles.get(number)
        return role.replicator if role is not None else None

    def on_role_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        self._callbacks.append(callback)

        def cancel() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return cancel

    def add_handoff_hook(self, hook: Callable[[int], None]) -> Callable[[], None]:
        """hook(shard) runs (and is waited for, bounded) before we hand a shard off."""
        self._handoff_hooks.append(hook)

        def cancel() -> None:
            if hook in self._handoff_hooks:
                self._handoff_hooks.remove(hook)

        return cancel

    # -- Host (for the replicators) ----------------------------------------------

    def run_handoff_hooks(self, shard: int) -> None:
        jobs = [gevent.spawn(hook, shard) for hook in list(self._handoff_hooks)]
        gevent.joinall(jobs, timeout=HANDOFF_HOOK_TIMEOUT)
        for job in jobs:
            if not job.ready():
                log.warning("shard %d: a hand-off hook did not finish in time", shard)
                job.kill(block=False)
            elif job.exception is not None:
                log.warning("shard %d: a hand-off hook failed: %s", shard, job.exception)

    def deposed(self, shard: int, epoch: int, why: str) -> None:
        self._fenced[shard] = max(self._fenced.get(shard, 0), epoch)
        self._mark(shard)

    def handed_off(self, shard: int, new_epoch: int) -> None:
        """Inside the committer pause: nothing may commit after the CAS."""
        self.store.set_role(shard, "follower", new_epoch)
        self._roles[shard] = _Role("follower", new_epoch)
        self._mark(shard)

    def await_follower(self, shard: int, epoch: int) -> None:
        """A primary of ``epoch`` treats us as its follower before we saw the
        record that says so: re-read it and wait (bounded) for the role."""
        record = self.records.record(shard)
        if record is None or record.epoch < epoch:
            try:
                self.records.fetch(shard)
            except EtcdError:
                return
        deadline = time.monotonic() + max(0.1, self.ack_timeout / 2)
        while self.store.role(shard)[0] != "follower" and time.monotonic() < deadline:
            gevent.sleep(0.02)

    # -- etcd state ----------------------------------------------------------------

    def _load_members(self) -> int:
        kvs, revision = self.session.get_prefix(MEMBERS)
        members: dict[str, dict] = {}
        for kv in kvs:
            if isinstance(kv.value, dict):
                members[kv.key[len(MEMBERS):]] = {"lease": kv.lease, **kv.value}
        self._members = members
        return revision

    def _load_members_reset(self) -> int:
        return self._load_members() + 1

    def _member_event(self, event: WatchEvent) -> None:
        name = event.key[len(MEMBERS):]
        if event.type == "delete" or not isinstance(event.value, dict):
            self._members.pop(name, None)
        else:
            value = dict(event.value)
            if not value.get("lease"):  # older records do not name their lease
                try:
                    kv = self.session.get(event.key)
                    value["lease"] = kv.lease if kv is not None else 0
                except EtcdError:
                    value["lease"] = 0
            self._members[name] = value

    def _load_shards(self) -> int:
        kvs, revision = self.session.get_prefix(SHARDS)
        present = set()
        for kv in kvs:
            number = _shard_number(kv.key)
            if number is None or not 0 <= number < self.shards:
                continue
            present.add(number)
            try:
                record = ShardRecord.from_json(kv.value)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring bad shard record %s: %s", kv.key, exc)
                continue
            self.records.observe(number, record, kv.mod_revision)
        for number in self.records.numbers():
            if number not in present:
                self.records.observe(number, None, revision)
        return revision

    def _load_shards_reset(self) -> int:
        return self._load_shards() + 1

    def _shard_event(self, event: WatchEvent) -> None:
        number = _shard_number(event.key)
        if number is None or not 0 <= number < self.shards:
            return
        record = None
        if event.type == "put":
            try:
                record = ShardRecord.from_json(event.value)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring bad shard record %s: %s", event.key, exc)
                return
        self.records.observe(number, record, event.mod_revision)

    # -- roles ---------------------------------------------------------------------

    def _desired(self, number: int) -> tuple[str, int]:
        record = self.records.record(number)
        if record is None:
            return "none", 0
        lease = self.session.lease_id
        if (self._running and lease and record.primary == self.node_name
                and record.primary_lease == lease
                and record.epoch > self._fenced.get(number, 0)):
            return "primary", record.epoch
        if self.node_name in record.replicas or self.node_name in record.isr:
            return "follower", record.epoch
        return "none", record.epoch

    def _mark(self, number: int) -> None:
        """Re-evaluate shard ``number`` in its worker greenlet."""
        if not self._running:
            return
        self._dirty.add(number)
        worker = self._workers.get(number)
        if worker is None or worker.dead:
            self._workers[number] = gevent.spawn(self._work, number)

    def _work(self, number: int) -> None:
        try:
            while number in self._dirty and self._running:
                self._dirty.discard(number)
                try:
                    self._apply(number)
                except Exception:
                    log.exception("shard %d: role change failed; retrying", number)
                    self._dirty.add(number)
                    gevent.sleep(RETRY_DELAY)
        finally:
            if self._workers.get(number) is gevent.getcurrent():
                del self._workers[number]

    def _apply(self, number: int) -> None:
        want, epoch = self._desired(number)
        current = self._roles.get(number) or _Role("none", 0)
        if want == "primary":
            if current.role == "primary" and current.epoch == epoch and current.replicator:
                current.replicator.record_changed()
            else:
                self._become_primary(number, epoch, current)
        else:
            if current.replicator is not None:
                current.replicator.stop()
            if (current.role, current.epoch) != (want, epoch) or current.replicator:
                self.store.set_role(number, want, epoch)
                self._roles[number] = _Role(want, epoch)
                log.info("shard %d: %s at epoch %d", number, want, epoch)
        self._notify(number)

    def _become_primary(self, number: int, epoch: int, current: _Role) -> None:
        if current.replicator is not None:
            current.replicator.stop()
        self.store.set_role(number, "follower", epoch)  # fence the old primary first
        replicator = Replicator(self, number, epoch, self.session.lease_id)
        self._roles[number] = _Role("syncing", epoch, replicator)
        try:
            replicator.sync()
        except Deposed as exc:
            log.info("shard %d: not promoted at epoch %d: %s", number, epoch, exc)
            replicator.stop()
            self._roles[number] = _Role("follower", epoch)
            return
        if self._desired(number) != ("primary", epoch) or not replicator.active:
            replicator.stop()
            self._roles[number] = _Role("follower", epoch)
            return
        try:
            self.store.set_role(number, "primary", epoch, replicator.replicate)
        except StaleEpoch as exc:  # a newer primary reached us meanwhile
            log.info("shard %d: not promoted at epoch %d: %s", number, epoch, exc)
            replicator.stop()
            self._roles[number] = _Role("follower", epoch)
            return
        if self._desired(number) != ("primary", epoch) or not replicator.active:
            replicator.stop()  # lost the lead while set_role ran (e.g. the session)
            self.store.set_role(number, "follower", epoch)
            self._roles[number] = _Role("follower", epoch)
            self._dirty.add(number)
            return
        self._roles[number] = _Role("primary", epoch, replicator)
        replicator.start()
        log.info("shard %d: primary at epoch %d", number, epoch)

    def _notify(self, number: int) -> None:
        state = (self.is_local_primary(number), self.primary_of(number))
        if self._seen.get(number, (False, None)) == state:
            return
        self._seen[number] = state
        for callback in list(self._callbacks):
            try:
                callback(number)
            except Exception:
                log.exception("role change callback failed")

    def _step_down_all(self) -> list[int]:
        """Every led (or syncing) shard becomes follower now."""
        changed = []
        for number, role in list(self._roles.items()):
            if role.replicator is not None:
                role.replicator.stop()
            if role.role in ("primary", "syncing"):
                self.store.set_role(number, "follower", role.epoch)
                self._roles[number] = _Role("follower", role.epoch)
                changed.append(number)
        return changed

    def _session_lost(self) -> None:
        changed = self._step_down_all()
        if changed:
            log.warning("etcd session lost: stepped down from shards %s", changed)
        for number in changed:
            self._notify(number)
        for number in range(self.shards):
            self._mark(number)

    def _session_restored(self) -> None:
        for number in range(self.shards):
            self._mark(number)

    # -- positions -----------------------------------------------------------------

    def positions(self) -> dict[str, list[int]]:
        """shard -> [last_index, last_epoch] for every shard held here."""
        out = {}
        for number, role in sorted(self._roles.items()):
            if role.role != "none":
                try:
                    out[str(number)] = list(self.store.position(number))
                except StorageError:  # e.g. its database is being replaced by a snapshot
                    continue
        return out

    def _publish_loop(self) -> None:
        while self._running:
            for role in list(self._roles.values()):
                if role.role == "primary" and role.replicator is not None:
                    role.replicator.check_fenced()
            try:
                self._publish()
            except EtcdError as exc:
                log.info("cannot publish positions: %s", exc)
            except Exception:
                log.exception("cannot publish positions")
            gevent.sleep(self.positions_interval)

    def _publish(self) -> None:
        """Write /positions/<node> if it changed (or its lease did) since the
        last write, or POSITIONS_REFRESH seconds passed: an idle node writes
        nothing (every put is an etcd raft write on every member)."""
        lease = self.session.lease_id
        if not lease:
            return
        shards = self.positions()
        now = time.monotonic()
        if self._published == (lease, shards) and now - self._published_at < POSITIONS_REFRESH:
            return
        self.session.put(POSITIONS + self.node_name,
                         {"shards": shards, "ts": round(time.time(), 3)}, lease=True)
        self._published, self._published_at = (lease, shards), now
