"""A replicated batch commits only after its ``after`` results (the primary's
own blob fsyncs, which overlap replication), and a follower's append stores
its new blobs inside its batch.  Real MailStores, real GroupCommitters, real
gevent results; the replicate hook records what was shipped and when."""

from __future__ import annotations

import functools

import gevent
import pytest
from gevent.event import AsyncResult

from storage import shard as ops
from storage.mailstore import shard_of
from storage.model import StorageUnavailable
from tests.unit.storage.storage_testlib import META, msg, open_store

SHARDS = 2
ALICE = "alice@example.test"
N = shard_of(ALICE, SHARDS)


class Recorder:
    """A replicate hook that only records the batches it was given."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, number: int, new_ops: list) -> None:
        self.batches.append([op.index for op in new_ops])


@pytest.fixture
def primary(tmp_path):
    with open_store(tmp_path / "a", SHARDS, fsync=False) as store:
        hook = Recorder()
        store.ensure_account(ALICE)
        store.set_role(N, "primary", 1, hook)
        yield store, hook


def _until(condition, what: str, deadline: float = 10.0) -> None:
    """Wait (cooperatively) until condition() holds; fail after the deadline."""
    with gevent.Timeout(deadline, AssertionError(f"timed out waiting for {what}")):
        while not condition():
            gevent.sleep(0.01)


def _append(i: int):
    return functools.partial(
        ops.intent_append, account=ALICE, mailbox="INBOX", blob="ab" * 32, size=10,
        flags=[], internaldate=1.0 + i, meta=META)


def test_commit_waits_for_after_which_overlaps_replication(primary):
    store, hook = primary
    committer = store.committer_for(ALICE)
    before = store.position(N)
    after = AsyncResult()
    result = committer.submit_nowait(_append(1), None, after)
    _until(lambda: hook.batches, "the batch to be shipped")
    assert hook.batches == [[before[0] + 1]]  # shipped while the blob is "being written"
    assert not result.ready() and store.position(N) == before  # but not committed
    after.set("done")
    assert result.get(timeout=5).uid == 1
    assert store.position(N) == (before[0] + 1, 1)


def test_after_failing_before_prepare_fails_its_caller_alone(primary):
    store, hook = primary
    committer = store.committer_for(ALICE)
    failed = AsyncResult()
    failed.set_exception(OSError("disk full"))
    with store.paused(N):  # both in one batch
        bad = committer.submit_nowait(_append(1), None, failed)
        good = committer.submit_nowait(_append(2), None, None)
    assert good.get(timeout=5).uid == 1
    with pytest.raises(StorageUnavailable, match="disk full"):
        bad.get(timeout=5)
    store.store_flags(ALICE, "INBOX", [1], "add", ["\\Seen"])  # not fenced
    assert len(hook.batches) == 2


def test_after_failing_during_replication_rolls_back_and_fences(primary):
    store, hook = primary
    committer = store.committer_for(ALICE)
    before = store.position_digest(N)
    after = AsyncResult()
    result = committer.submit_nowait(_append(1), None, after)
    _until(lambda: hook.batches, "the batch to be shipped")
    assert len(hook.batches) == 1
    after.set_exception(OSError("I/O error"))
    with pytest.raises(StorageUnavailable):
        result.get(timeout=5)
    assert store.position_digest(N) == before
    # Its ops were shipped: the epoch takes no more writes.
    with pytest.raises(StorageUnavailable, match="higher epoch"):
        store.store_flags(ALICE, "INBOX", [1], "add", ["\\Seen"])


def test_replicated_deliver_answers_after_its_blob_is_durable(primary):
    store, hook = primary
    raw = msg(3)
    (result,) = store.deliver([ALICE], raw)
    assert store.blobs.path(result.blob).read_bytes() == raw
    assert store.messages(ALICE, "INBOX")[-1].blob == result.blob
    assert len(hook.batches) == 1


def test_put_nowait_reads_from_memory_until_durable(tmp_path):
    with open_store(tmp_path / "s", 1, fsync=False) as store:
        data = b"body " * 100
        sha, done = store.blobs.put_nowait(data)
        assert store.blobs.read(sha) == data
        assert done.get(timeout=5) == sha
        assert store.blobs.exists(sha) and store.blobs.path(sha).read_bytes() == data
        assert store.blobs.read(sha) == data
