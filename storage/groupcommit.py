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
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult, Event

from storage.model import StorageUnavailable
from storage.shard import Changes, Intent, Shard

log = logging.getLogger(__name__)


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
        self.batch_sizes: list[int] = []  # committed batch sizes (bounded), for tests/metrics
        self._queue: deque[tuple[Intent, AsyncResult]] = deque()
        self._wakeup = Event()
        self._idle = Event()
        self._idle.set()
        self._closed = False
        self._greenlet = gevent.spawn(self._run)

    def submit_nowait(self, intent: Intent) -> AsyncResult:
        """Queue an intent; the AsyncResult holds its value or exception."""
        result = AsyncResult()
        if self._closed:
            result.set_exception(StorageUnavailable("store is closing"))
            return result
        self._queue.append((intent, result))
        self._idle.clear()
        self._wakeup.set()
        return result

    def submit(self, intent: Intent) -> Any:
        """Run an intent in the next batch and return once it is committed."""
        return self.submit_nowait(intent).get()

    def close(self) -> None:
        """Commit what is queued, then stop the committer greenlet."""
        self._closed = True
        self._idle.wait()
        self._greenlet.kill()

    def _run(self) -> None:
        pool = gevent.get_hub().threadpool
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                n = min(self.max_batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                try:
                    outcome = pool.apply(self.shard.run_batch, ([i for i, _ in batch],))
                except Exception as exc:
                    if not isinstance(exc, StorageUnavailable):
                        log.exception("shard %s: batch failed", self.shard.path)
                    for _, result in batch:
                        result.set_exception(StorageUnavailable("commit failed"))
                    continue
                if len(self.batch_sizes) < 100_000:
                    self.batch_sizes.append(n)
                changed: Changes = []
                for (_, result), (ok, value, changes) in zip(batch, outcome, strict=True):
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
            self._idle.set()
