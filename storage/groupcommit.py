"""Group commit: concurrent writes on a shard share one transaction and one fsync.

Callers ``submit`` an intent (storage/shard.py) and wait on a gevent
AsyncResult.  One committer greenlet per shard takes every pending intent
(at most ``max_batch``), runs them in ONE SQLite transaction with ONE commit
in gevent's threadpool -- the writer connection is only ever used there, one
batch at a time -- and then resolves each caller.  While a batch commits,
new submissions queue up and form the next batch, so the batch size grows
with the load and a slow disk never blocks the hub.

An intent that fails (no such mailbox, ...) fails alone: it runs inside its
own SAVEPOINT.  If the commit fails, every caller in the batch gets
StorageUnavailable and nothing of the batch is visible (design.md, promise 1).
Watchers are told about changes only after the commit (promise 3).

Replication (docs/cluster.md, "Shard roles in the MailStore").  With a
``replicate`` hook set (the shard's primary in a cluster) a batch is
*prepared* (intents run, ops logged and applied, transaction left open; one
threadpool hop), the new ops are handed to ``replicate`` on the hub -- it
returns once every in-sync follower has them durably, or raises -- and only
then COMMITted (a second hop).  If it raises, or the shard's role changed
meanwhile (``generation``), the batch is rolled back and every caller gets
StorageUnavailable: a primary's log holds only replicated operations.  Its
followers may hold them though, so that epoch is then *fenced*: the
MailStore refuses writes until the shard is made primary at a higher epoch
(an index and epoch never name two different ops, which log matching needs).
Without a hook a batch is one hop, exactly as on a single node.

Each submission may carry a ``check`` run on the hub when its batch starts
(the MailStore's role gate: "not led here", stale epoch); if it raises, that
caller alone gets the exception.  It may also carry ``after``, a result the
batch's COMMIT must wait for (a message body still being fsynced, see
MailStore.deliver and OutboundQueue.enqueue_checked): nothing of a batch is
committed, so no caller answered, before every ``after`` of it holds a
value.  The wait overlaps the batch's prepare (its intents run in the open
transaction meanwhile) and, with a ``replicate`` hook, replication, so the
primary's blob fsync and its followers' run at the same time.  A failed
``after`` fails its caller alone: before prepare at once; after prepare on a
single node by rolling the batch back and running the others again (nothing
was visible); after replication the whole batch is rolled back and fenced.
``paused()`` waits for the running batch and holds back further batches
while held.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
from gevent.event import AsyncResult, Event
from gevent.lock import RLock

from storage.model import StorageUnavailable
from storage.shard import BatchResult, Changes, Intent, Op, Shard

log = logging.getLogger(__name__)

Check = Callable[[], None]
_Item = tuple[Intent, AsyncResult, "Check | None", "AsyncResult | None"]


class GroupCommitter:
    """The single writer of one shard."""

    def __init__(
        self,
        shard: Shard,
        max_batch: int = 256,
        on_commit: Callable[[Changes], None] | None = None,
    ) -> None:
        self.shard = shard
        self.max_batch = max(1, max_batch)
        self.on_commit = on_commit
        # Set by MailStore.set_role: called with a prepared batch's new ops.
        self.replicate: Callable[[list[Op]], None] | None = None
        self.generation = 0  # bumped on every role change of the shard
        self.replicating = False  # a batch is inside ``replicate`` now
        # The epoch of the last batch rolled back after ``replicate`` was
        # called: followers may hold its ops, so that epoch may log no more.
        self.fenced_epoch = -1
        self.batch_sizes: list[int] = []  # committed batch sizes (bounded), for tests/metrics
        self._queue: deque[_Item] = deque()
        self._lock = RLock()  # held while a batch runs, and by paused()
        self._wakeup = Event()
        self._idle = Event()
        self._idle.set()
        self._closed = False
        self._greenlet = gevent.spawn(self._run)

    def submit_nowait(
        self, intent: Intent, check: Check | None = None, after: AsyncResult | None = None
    ) -> AsyncResult:
        """Queue an intent; the AsyncResult holds its value or exception.

        ``check`` runs on the hub when the intent's batch starts; an exception
        it raises fails this intent alone.  The batch commits only once
        ``after`` holds a value (see the module docstring)."""
        result = AsyncResult()
        if self._closed:
            result.set_exception(StorageUnavailable("store is closing"))
            return result
        self._queue.append((intent, result, check, after))
        self._idle.clear()
        self._wakeup.set()
        return result

    @property
    def busy(self) -> bool:
        """True while a batch runs or intents wait: a write now joins the next batch."""
        return not self._idle.is_set()

    def submit(
        self, intent: Intent, check: Check | None = None, after: AsyncResult | None = None
    ) -> Any:
        """Run an intent in the next batch and return once it is committed."""
        return self.submit_nowait(intent, check, after).get()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Wait until no batch is running, and start none while inside.

        Re-entrant for the holder; replication uses it to grow the ISR and to
        hand leadership off with nothing in flight."""
        with self._lock:
            yield

    def close(self) -> None:
        """Commit what is queued, then stop the committer greenlet."""
        self._closed = True
        self._idle.wait()
        self._greenlet.kill()

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                with self._lock:
                    n = min(self.max_batch, len(self._queue))
                    batch = [self._queue.popleft() for _ in range(n)]
                    self._run_batch(batch)
            self._idle.set()

    def _run_batch(self, batch: list[_Item]) -> None:
        live: list[_Item] = []
        for intent, result, check, after in batch:
            try:
                if check is not None:
                    check()
                if after is not None and after.ready():
                    after.get()  # raises if it failed: this caller alone fails
                    after = None
            except Exception as exc:
                result.set_exception(_unavailable(exc))
            else:
                live.append((intent, result, check, after))
        if not live:
            return
        intents = [i for i, _, _, _ in live]
        afters = [a for _, _, _, a in live if a is not None]
        try:
            if self.replicate is not None:
                outcome = self._replicated(intents, self.replicate, afters)
            elif afters:
                overlapped = self._overlapped(intents, afters)
                if overlapped is None:  # an ``after`` failed: rolled back
                    self._run_batch(_without_failed(live))
                    return
                outcome = overlapped
            else:
                pool = gevent.get_hub().threadpool
                outcome = pool.apply(self.shard.run_batch, (intents, self.shard.epoch))
        except Exception as exc:
            if not isinstance(exc, StorageUnavailable):
                log.exception("shard %s: batch failed", self.shard.path)
            failure = exc if isinstance(exc, StorageUnavailable) else None
            for _, result, _, _ in live:
                result.set_exception(failure or StorageUnavailable("commit failed"))
            return
        self._answer(live, outcome)

    def _overlapped(self, intents: list[Intent], afters: list[AsyncResult]) -> BatchResult | None:
        """One node: prepare while the ``afters`` (blob fsyncs) run, then
        COMMIT once all of them hold a value; None (rolled back) if one failed."""
        pool = gevent.get_hub().threadpool
        outcome, _ = pool.apply(self.shard.prepare_batch, (intents, self.shard.epoch, False))
        try:
            for after in afters:
                after.wait()
            if not all(after.successful() for after in afters):
                pool.apply(self.shard.rollback_prepared)
                return None
            pool.apply(self.shard.commit_prepared)
        except BaseException:
            pool.apply(self.shard.rollback_prepared)
            raise
        return outcome

    def _replicated(
        self, intents: list[Intent], replicate: Callable[[list[Op]], None],
        afters: list[AsyncResult],
    ) -> BatchResult:
        """prepare -> replicate (hub) -> afters -> commit; rolled back if any step fails."""
        pool = gevent.get_hub().threadpool
        generation, epoch = self.generation, self.shard.epoch
        outcome, new_ops = pool.apply(self.shard.prepare_batch, (intents, epoch))
        shipped = False
        try:
            if new_ops:
                self.replicating = shipped = True
                try:
                    replicate(new_ops)
                finally:
                    self.replicating = False
                if self.generation != generation:
                    raise StorageUnavailable("shard role changed during replication")
            for after in afters:  # e.g. the primary's own blob fsyncs
                after.get()
            pool.apply(self.shard.commit_prepared)
        except BaseException as exc:
            pool.apply(self.shard.rollback_prepared)
            if shipped:
                # Followers may have these ops: reusing their (index, epoch)
                # for other ops would pass log matching with other contents.
                self.fenced_epoch = max(self.fenced_epoch, epoch)
                log.warning("shard %s: batch rolled back after replication; epoch %d"
                            " takes no more writes", self.shard.path, epoch)
            if isinstance(exc, Exception) and not isinstance(exc, StorageUnavailable):
                log.warning("shard %s: replication failed: %s", self.shard.path, exc)
                raise StorageUnavailable("replication failed") from exc
            raise
        return outcome

    def _answer(self, live: list[_Item], outcome: BatchResult) -> None:
        if len(self.batch_sizes) < 100_000:
            self.batch_sizes.append(len(live))
        changed: Changes = []
        for (_, result, _, _), (ok, value, changes) in zip(live, outcome, strict=True):
            if ok:
                result.set(value)
                changed += changes
            else:
                result.set_exception(value)
        if changed and self.on_commit is not None:
            try:
                self.on_commit(changed)
            except Exception:
                log.exception("shard %s: commit notification failed", self.shard.path)


def _without_failed(live: list[_Item]) -> list[_Item]:
    """A rolled-back batch again, less the callers whose ``after`` failed
    (they get its exception); the others' ``after`` holds a value."""
    again: list[_Item] = []
    for intent, result, check, after in live:
        if after is not None and not after.successful():
            exc = after.exception
            result.set_exception(_unavailable(exc) if isinstance(exc, Exception)
                                 else StorageUnavailable("write failed"))
        else:
            again.append((intent, result, check, None))  # the role gate again
    return again


def _unavailable(exc: Exception) -> Exception:
    """A check's exception as is; a failed ``after`` (an OSError of a blob
    write, ...) as StorageUnavailable, as a failed commit would be."""
    if isinstance(exc, StorageUnavailable) or not isinstance(exc, OSError):
        return exc
    return StorageUnavailable(f"write failed: {exc}")
