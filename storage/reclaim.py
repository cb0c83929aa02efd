"""Reclaiming space: operation-log compaction and blob garbage collection.

Theory of operation (docs/storage.md, "Reclaiming space")
---------------------------------------------------------
**Log compaction.**  Every ``compact_interval`` each local shard's log loses
its ops with ``idx <= floor``, where ``floor = min(last_index - log_keep_ops,
p - 1 for every position p still needed)``, never reaching the last op (the
position and last epoch stay readable).  The positions still needed
(``keep_positions``): the backup's uploaded position of the shard (its op
must stay, the agent checks its chain tail against it) and the published
positions of the other replicas (a follower that is at ``p`` is caught up
from op ``p + 1``).  A shard whose backup position is unknown while backup
is enabled is not compacted that round.  A replica whose position is not
known (it is down) may fall below the floor: the primary then sees that its
position is not in its log and sends a snapshot (cluster/replication.py).
Ops are deleted in batches of ``COMPACT_BATCH`` through the shard's group
committer (a write like any other, so the hub keeps serving), on every role.

**Blob sweep.**  Every ``blob_gc_interval``: the blob store starts noting
every name put, read or asked for (``BlobStore.wanted``); the referenced set
is read (every local shard database: messages, queue and the ops still in
its log); every blob neither referenced nor wanted whose mtime is older than
``blob_gc_grace`` is renamed into ``blobs/trash/`` (phase 1).  After
``blob_gc_settle`` seconds -- longer than any commit takes -- the references
are read again, and every trashed blob (also ones a crash left there) that
is now referenced, was wanted, or has a fresh mtime goes back; the rest is
deleted (phase 2).  A delivery of identical bytes refreshes the mtime (or
moves the blob back), and every read path falls back to the trash, so a
blob an acknowledged message names is never unreadable.  File work runs in
the threadpool, one fan-out directory per call.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.lock

from storage import shard as ops
from storage.blobs import BlobStore, is_blob_name
from storage.model import StorageError

log = logging.getLogger("postroom.reclaim")

COMPACT_BATCH = 2000  # ops deleted per write transaction
_HEX2 = frozenset(f"{i:02x}" for i in range(256))

KeepPositions = Callable[[list[int]], Mapping[int, list[int]]]


def compaction_floor(last_index: int, keep_ops: int, keep: Iterable[int]) -> int:
    """The highest index whose op may be deleted (0: none).

    Ops after ``last_index - keep_ops`` stay, and so does the op at every
    position in ``keep`` (log matching needs its epoch) and the last op."""
    floor = last_index - max(0, keep_ops)
    for position in keep:
        floor = min(floor, position - 1)
    return max(0, min(floor, last_index - 1))


def _compact_intent(tx: Any, floor: int, limit: int, shard: Any, incarnation: int) -> int:
    # A snapshot installed since the floor was computed holds another log: skip.
    if shard.incarnation != incarnation:
        return 0
    return ops.intent_compact_log(tx, floor, limit)


def compact_shard(store: Any, number: int, floor: int, batch: int = COMPACT_BATCH) -> int:
    """Delete shard ``number``'s ops with idx <= ``floor`` in batches; the count."""
    shard, committer = store.shard_by_number(number)
    incarnation = shard.incarnation
    total = 0
    while True:
        done = committer.submit(functools.partial(
            _compact_intent, floor=floor, limit=batch, shard=shard, incarnation=incarnation))
        total += done
        if done < batch:
            return total


def keep_positions(
    numbers: list[int],
    *,
    backup: Any = None,
    backup_enabled: bool = False,
    session: Any = None,
    node: str = "",
) -> dict[int, list[int]]:
    """Per shard, the log positions that must stay readable; a shard left
    out is not compacted now (backup enabled, its position unknown).

    ``backup``: this node's BackupAgent (its uploaded position of the shards
    it leads); ``session``: etcd in a cluster (``/positions/`` of the other
    nodes, ``/backup/`` of the shards' leaders)."""
    positions: dict[int, list[int]] = {n: [] for n in numbers}
    remote_backup: dict[int, list[int]] = {}
    if session is not None:
        for kv in session.get_prefix("/positions/")[0]:
            if kv.key.rsplit("/", 1)[-1] == node:
                continue
            for key, pos in _shards_of(kv.value).items():
                if key in positions and isinstance(pos, list) and pos:
                    positions[key].append(int(pos[0]))
        if backup_enabled:
            for kv in session.get_prefix("/backup/")[0]:
                for key, status in _shards_of(kv.value).items():
                    uploaded = status.get("uploaded") if isinstance(status, dict) else None
                    if isinstance(uploaded, list) and uploaded:
                        remote_backup.setdefault(key, []).append(int(uploaded[0]))
    if not backup_enabled:
        return positions
    out = {}
    for n in numbers:
        uploaded = _local_uploaded(backup, n)
        found = [uploaded] if uploaded is not None else remote_backup.get(n)
        if found:
            out[n] = positions[n] + found
    return out


def _shards_of(value: Any) -> dict[int, Any]:
    shards = value.get("shards") if isinstance(value, dict) else None
    if not isinstance(shards, dict):
        return {}
    return {int(k): v for k, v in shards.items() if str(k).isdigit()}


def _local_uploaded(agent: Any, number: int) -> int | None:
    """The uploaded position of a shard this node's backup agent ships."""
    if agent is None:
        return None
    state = agent.shards.get(number)
    if state is None:
        return None
    if state.uploaded is not None:
        return int(state.uploaded[0])
    saved = agent.index.position(number)
    return int(saved[0]) if saved is not None else None


@dataclass
class SweepResult:
    """What one blob sweep did."""

    referenced: int = 0
    trashed: int = 0
    deleted: int = 0
    freed: int = 0  # octets
    kept: int = 0  # trashed blobs put back (referenced, wanted or fresh again)


def _trash_candidates(blobs: BlobStore, top: str, refs: set[str], wanted: set[str],
                      horizon: float) -> list[str]:
    """Phase 1 for one fan-out directory (threadpool): rename candidates."""
    moved = []
    base, trash = os.path.join(blobs.root, top), str(blobs.trash)
    for sub in os.scandir(base):
        if sub.name not in _HEX2 or not sub.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(sub.path):
            sha = entry.name
            if not is_blob_name(sha) or sha in refs or sha in wanted:
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= horizon:
                    continue
                os.replace(entry.path, os.path.join(trash, sha))
            except FileNotFoundError:
                continue
            moved.append(sha)
    return moved


def _empty_trash(blobs: BlobStore, refs: set[str], wanted: set[str],
                 horizon: float) -> tuple[int, int, int]:
    """Phase 2 (threadpool): (deleted, octets freed, put back)."""
    deleted = freed = kept = 0
    for entry in os.scandir(blobs.trash):
        sha = entry.name
        if not is_blob_name(sha):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if sha in refs or sha in wanted or st.st_mtime >= horizon:
                final = blobs.path(sha)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(entry.path, final)
                kept += 1
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # a reader or a put moved it back meanwhile
        deleted += 1
        freed += st.st_size
    return deleted, freed, kept


class Reclaimer:
    """Runs log compaction and blob sweeps for one node's MailStore."""

    def __init__(self, store: Any, settings: Any, keep: KeepPositions | None = None) -> None:
        self.store = store
        self.blobs: BlobStore = store.blobs
        self.keep_ops = int(settings.log_keep_ops)
        self.compact_interval = float(settings.compact_interval)
        self.gc_interval = float(settings.blob_gc_interval)
        self.grace = float(settings.blob_gc_grace)
        self.settle = float(settings.blob_gc_settle)
        self.keep = keep or (lambda numbers: {n: [] for n in numbers})
        self.batch = COMPACT_BATCH
        self._greenlets: list[gevent.Greenlet] = []
        self._stopping = gevent.event.Event()
        self._sweeping = gevent.lock.Semaphore()
        self.compacted = 0  # ops deleted since start (status, tests)
        self.last_sweep: SweepResult | None = None

    def start(self) -> None:
        if self.compact_interval > 0:
            self._greenlets.append(gevent.spawn(self._loop, self.compact_interval,
                                                self.compact_now, "log compaction"))
        if self.gc_interval > 0:
            self._greenlets.append(gevent.spawn(self._loop, self.gc_interval,
                                                self.sweep_now, "blob sweep"))

    def stop(self) -> None:
        self._stopping.set()
        gevent.killall(self._greenlets, block=True, timeout=5)
        self._greenlets.clear()
        self.blobs.wanted = None

    def _loop(self, interval: float, work: Callable[[], Any], what: str) -> None:
        while not self._stopping.wait(interval):
            try:
                work()
            except gevent.GreenletExit:
                raise
            except Exception:
                log.exception("%s failed (next try in %.0f s)", what, interval)

    # -- log compaction ----------------------------------------------------------

    def compact_now(self) -> dict[int, int]:
        """One compaction round over every local shard: shard -> ops deleted."""
        numbers = self.store.existing_shards()
        keep = self.keep(numbers)
        done = {}
        for number in numbers:
            if number not in keep:
                log.debug("shard %d: log not compacted (backup position unknown)", number)
                continue
            try:
                done[number] = self._compact(number, keep[number])
            except StorageError as exc:  # e.g. a snapshot being installed
                log.info("shard %d: log not compacted now: %s", number, exc)
        return {n: c for n, c in done.items() if c}

    def _compact(self, number: int, keep: list[int]) -> int:
        shard, _ = self.store.shard_by_number(number)
        last = shard.last_index()  # (a snapshot installed after this: compact_shard skips)
        floor = compaction_floor(last, self.keep_ops, keep)
        if floor < max(1, shard.log_start()):
            return 0
        deleted = compact_shard(self.store, number, floor, self.batch)
        if deleted:
            self.compacted += deleted
            log.info("shard %d: log compacted: %d ops deleted, it now holds ops %d..%d",
                     number, deleted, shard.log_start(), last)
        return deleted

    # -- blob sweep --------------------------------------------------------------

    def referenced(self) -> set[str]:
        """Every blob a local shard's messages, queue or log names."""
        pool = gevent.get_hub().threadpool
        refs: set[str] = set()
        for number in self.store.existing_shards():
            shard, _ = self.store.shard_by_number(number)
            refs |= pool.apply(shard.referenced_blobs)
        return refs

    def sweep_now(self, settle: float | None = None) -> SweepResult:
        """One two-phase sweep (module docstring); one at a time."""
        with self._sweeping:
            wanted: set[str] = set()
            self.blobs.wanted = wanted
            try:
                return self._sweep(wanted, self.settle if settle is None else settle)
            finally:
                self.blobs.wanted = None

    def _sweep(self, wanted: set[str], settle: float) -> SweepResult:
        pool = gevent.get_hub().threadpool
        result = SweepResult()
        refs = self.referenced()
        horizon = time.time() - self.grace
        for top in sorted(_fanout_dirs(self.blobs.root)):
            moved = pool.apply(_trash_candidates, (self.blobs, top, refs, wanted, horizon))
            self.blobs.forget(moved)
            result.trashed += len(moved)
        if settle > 0 and self._stopping.wait(settle):
            return result  # stopping: the trash is left to the next sweep
        refs = self.referenced()
        result.referenced = len(refs)
        horizon = time.time() - self.grace
        result.deleted, result.freed, result.kept = pool.apply(
            _empty_trash, (self.blobs, refs, wanted, horizon))
        self.last_sweep = result
        if result.trashed or result.deleted or result.kept:
            log.info("blob sweep: %d unreferenced blobs deleted (%d octets freed), %d put back;"
                     " %d blobs referenced", result.deleted, result.freed, result.kept,
                     result.referenced)
        return result


def _fanout_dirs(root: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(root) if e.name in _HEX2 and e.is_dir()]
    except FileNotFoundError:
        return []
