"""Group commit on one node with ``after`` results (a body still being fsynced):
the batch's intents run meanwhile, its COMMIT waits for every ``after``,
and a failed ``after`` fails its own caller alone."""

from __future__ import annotations

import functools
import threading
import time

import gevent
import pytest
from gevent.event import AsyncResult

from storage import shard as ops
from storage.model import StorageUnavailable
from tests.unit.storage.storage_testlib import open_store

DEADLINE = 30.0


def _append(i: int, ran: threading.Event | None = None):
    intent = functools.partial(
        ops.intent_append, account="a@x", mailbox="INBOX", blob=f"{i:064x}", size=10,
        flags=[], internaldate=float(i), meta={},
    )
    if ran is None:
        return intent

    def noted(tx):  # runs in the writer thread, inside the open transaction
        ran.set()
        return intent(tx)

    return noted


def _wait_until(condition) -> None:
    end = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < end, "condition not met before the deadline"
        gevent.sleep(0.005)


def _blobs(store) -> list[str]:
    return [m.blob for m in store.messages("a@x", "INBOX")]


def test_commit_waits_for_after_while_the_batch_is_prepared(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account("a@x")
        shard, committer = store.shard_for("a@x"), store.committer_for("a@x")
        body = AsyncResult()
        at_commit = []
        shard.before_commit = lambda: at_commit.append(body.ready())
        ran = threading.Event()
        before = shard.commits
        pending = [committer.submit_nowait(_append(1, ran), after=body),
                   committer.submit_nowait(_append(2))]
        _wait_until(ran.is_set)  # prepared while the body is not durable yet
        gevent.sleep(0.05)
        assert not any(p.ready() for p in pending)  # nobody answered
        assert shard.commits == before and _blobs(store) == []  # nothing committed
        body.set("done")
        assert [p.get(timeout=DEADLINE).uid for p in pending] == [1, 2]
        assert at_commit == [True] and shard.commits == before + 1


def test_after_failing_once_prepared_fails_its_caller_alone(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account("a@x")
        shard, committer = store.shard_for("a@x"), store.committer_for("a@x")
        bad, good = AsyncResult(), AsyncResult()
        ran = threading.Event()
        seen = []
        store.watch("a@x", seen.append)
        first = committer.submit_nowait(_append(1, ran), after=good)
        failing = committer.submit_nowait(_append(2), after=bad)
        plain = committer.submit_nowait(_append(3))
        _wait_until(ran.is_set)
        bad.set_exception(OSError(28, "No space left on device"))
        good.set("done")
        with pytest.raises(StorageUnavailable):
            failing.get(timeout=DEADLINE)
        assert [first.get(timeout=DEADLINE).uid, plain.get(timeout=DEADLINE).uid] == [1, 2]
        assert _blobs(store) == [f"{1:064x}", f"{3:064x}"]
        assert f"{2:064x}" not in [o.args.get("blob") for o in shard.ops_since(0)]
        assert seen  # watchers heard of the committed batch


def test_after_failed_before_the_batch_fails_alone(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account("a@x")
        committer = store.committer_for("a@x")
        bad = AsyncResult()
        bad.set_exception(OSError(5, "Input/output error"))
        with committer.paused():  # both are queued before their batch starts
            failing = committer.submit_nowait(_append(1), after=bad)
            ok = committer.submit_nowait(_append(2))
        with pytest.raises(StorageUnavailable):
            failing.get(timeout=DEADLINE)
        assert ok.get(timeout=DEADLINE).uid == 1
        assert _blobs(store) == [f"{2:064x}"]


def test_failed_commit_after_the_wait_leaves_nothing(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account("a@x")
        shard, committer = store.shard_for("a@x"), store.committer_for("a@x")
        body = AsyncResult()

        def disk_error() -> None:
            raise OSError(5, "Input/output error")

        shard.before_commit = disk_error
        pending = [committer.submit_nowait(_append(i), after=body) for i in (1, 2)]
        gevent.sleep(0.01)
        body.set("done")
        for p in pending:
            with pytest.raises(StorageUnavailable):
                p.get(timeout=DEADLINE)
        shard.before_commit = None
        assert _blobs(store) == []
        assert committer.submit(_append(3), after=body).uid == 1
