"""Group commit: batching, per-op failure isolation, failed commits, a free hub."""

from __future__ import annotations

import gevent
import pytest

from storage.model import NoSuchMailbox, StorageUnavailable
from tests.unit.storage.storage_testlib import META, msg, open_store


def test_queued_writes_share_one_commit(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account("a@x")
        shard, committer = store.shard_for("a@x"), store.committer_for("a@x")
        before = shard.commits
        pending = [committer.submit_nowait(_append_intent(i)) for i in range(200)]
        assert [p.get().uid for p in pending] == list(range(1, 201))
        assert shard.commits - before == 1  # 200 <= group_commit_max: one transaction


def test_concurrent_appends_share_commits(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account("a@x")
        shard = store.shard_for("a@x")
        before = shard.commits
        jobs = [gevent.spawn(store.append, "a@x", "INBOX", msg(i), meta=META) for i in range(200)]
        gevent.joinall(jobs, raise_error=True)
        commits = shard.commits - before
        assert 1 <= commits < 100, commits  # one commit per append would be 200
        assert max(store.committer_for("a@x").batch_sizes) > 1
        assert store.status("a@x", "INBOX").messages == 200


def test_batches_respect_group_commit_max(tmp_path):
    with open_store(tmp_path / "s", shards=1, group_commit_max=8) as store:
        store.ensure_account("a@x")
        committer = store.committer_for("a@x")
        committer.batch_sizes.clear()
        pending = [committer.submit_nowait(_append_intent(i)) for i in range(50)]
        for p in pending:
            p.get()
        # The full-text indexer (storage/fts.py) may add its own intents.
        sizes = committer.batch_sizes
        assert max(sizes) == 8 and sizes[:6] == [8] * 6 and sum(sizes) >= 50
        assert store.status("a@x", "INBOX").messages == 50


def test_invalid_op_fails_alone(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account("a@x")
        shard = store.shard_for("a@x")
        committer = store.committer_for("a@x")
        before = shard.commits
        good = [committer.submit_nowait(_append_intent(i)) for i in range(5)]
        bad = committer.submit_nowait(_append_intent(99, mailbox="NoSuchBox"))
        more = [committer.submit_nowait(_append_intent(i)) for i in range(5, 10)]
        with pytest.raises(NoSuchMailbox):
            bad.get()
        assert [r.get().uid for r in good + more] == list(range(1, 11))
        assert shard.commits - before == 1  # all eleven went in one batch
        assert [m.uid for m in store.messages("a@x", "INBOX")] == list(range(1, 11))
        assert "NoSuchBox" not in [o.args.get("mailbox") for o in shard.ops_since(0)]


def test_failed_commit_leaves_nothing_visible(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        store.append("a@x", "INBOX", msg(0), meta=META)
        shard = store.shard_for("a@x")
        state, log = shard.dump_state(), shard.ops_since(0)
        seen = []
        store.watch("a@x", seen.append)

        def disk_error() -> None:
            raise OSError(5, "Input/output error")

        shard.before_commit = disk_error
        jobs = [gevent.spawn(store.append, "a@x", "INBOX", msg(i), meta=META) for i in range(1, 9)]
        jobs.append(gevent.spawn(store.create_mailbox, "a@x", "New"))
        gevent.joinall(jobs)
        assert all(isinstance(j.exception, StorageUnavailable) for j in jobs)
        assert shard.dump_state() == state
        assert shard.ops_since(0) == log
        assert seen == []  # watchers hear only of committed changes
        shard.before_commit = None
        r = store.append("a@x", "INBOX", msg(10), meta=META)
        assert r.uid == 2  # nothing of the failed batch was ever visible
        assert seen == ["INBOX"]


def test_hub_keeps_ticking_during_a_large_commit(tmp_path):
    ticks = [0]

    def ticker() -> None:
        while True:
            gevent.sleep(0.001)
            ticks[0] += 1

    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account("a@x")
        shard = store.shard_for("a@x")
        committer = store.committer_for("a@x")
        in_thread = {}

        def note_commit() -> None:  # runs in the writer thread, just before COMMIT
            in_thread["ticks"] = ticks[0]

        shard.before_commit = note_commit
        big_meta = {"text": "y" * 4000}
        t = gevent.spawn(ticker)
        try:
            gevent.sleep(0.01)
            start = ticks[0]
            before = shard.commits
            pending = [
                committer.submit_nowait(_append_intent(i, big_meta)) for i in range(3000)
            ]
            for p in pending:
                p.get()
            end = ticks[0]
        finally:
            t.kill()
        assert shard.commits - before <= 20
        # The hub ran the ticker while the batch executed in the threadpool:
        # a blocked hub would show (almost) no ticks over the whole batch.
        assert in_thread["ticks"] - start >= 5
        assert end - start >= 10


def _append_intent(i: int, meta: dict | None = None, mailbox: str = "INBOX"):
    import functools

    from storage import shard as ops

    return functools.partial(
        ops.intent_append, account="a@x", mailbox=mailbox, blob="0" * 64, size=10,
        flags=[], internaldate=float(i), meta=meta or {},
    )


def test_submit_after_close_is_unavailable(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account("a@x")
        committer = store.committer_for("a@x")
    with pytest.raises(StorageUnavailable):
        committer.submit(_append_intent(1))
    with pytest.raises(StorageUnavailable):
        store.append("a@x", "INBOX", msg(1), meta=META)
