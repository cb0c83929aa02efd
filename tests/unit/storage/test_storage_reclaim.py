"""storage/reclaim.py: the compaction floor, log compaction on a real store,
and the two-phase blob sweep with its races (real files, real SQLite)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import gevent
import pytest

from storage.model import NoSuchBlob
from storage.reclaim import Reclaimer, compaction_floor, keep_positions
from tests.unit.storage.storage_testlib import META, msg, open_store

ALICE = "alice@example.test"
DEADLINE = 30.0


def settings(**over):
    base = dict(log_keep_ops=10, compact_interval=0.0, blob_gc_interval=0.0,
                blob_gc_grace=0.0, blob_gc_settle=0.0)
    base.update(over)
    return SimpleNamespace(**base)


def age(store, sha: str, seconds: float = 7200.0) -> None:
    """Make a blob look written ``seconds`` ago (the grace clock)."""
    when = time.time() - seconds
    os.utime(store.blobs.path(sha), (when, when))


def wait_for(predicate, what: str):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if predicate():
            return
        gevent.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- the floor ----------------------------------------------------------------------


def test_floor_keeps_the_newest_ops():
    assert compaction_floor(1000, 100, []) == 900
    assert compaction_floor(50, 100, []) == 0
    assert compaction_floor(0, 0, []) == 0


def test_floor_keeps_the_op_at_every_needed_position():
    # the backup uploaded up to 500, a replica is at 700: op 500 must stay
    assert compaction_floor(1000, 100, [500, 700]) == 499
    assert compaction_floor(1000, 100, [950]) == 900
    assert compaction_floor(1000, 100, [0]) == 0  # nothing uploaded: nothing goes


def test_floor_never_reaches_the_last_op():
    assert compaction_floor(10, 0, []) == 9
    assert compaction_floor(10, 0, [10]) == 9
    assert compaction_floor(1, 0, []) == 0


def test_keep_positions_without_backup_or_cluster_compacts_everything():
    assert keep_positions([0, 3]) == {0: [], 3: []}


def test_keep_positions_skips_shards_whose_backup_position_is_unknown():
    agent = SimpleNamespace(
        shards={0: SimpleNamespace(uploaded=(42, 1.0)), 1: SimpleNamespace(uploaded=None)},
        index=SimpleNamespace(position=lambda n: (7, 1.0) if n == 1 else None))
    # shard 2 is not shipped by this node and nothing else reports it
    assert keep_positions([0, 1, 2], backup=agent, backup_enabled=True) == {0: [42], 1: [7]}


# -- log compaction -------------------------------------------------------------------


def test_compaction_deletes_old_ops_and_keeps_position_and_state(tmp_path):
    with open_store(tmp_path, shards=1) as store:
        for n in range(30):
            store.deliver([ALICE], msg(n), meta=META)
        store.expunge(ALICE, "INBOX", [1, 2])
        shard, _ = store.shard_by_number(0)
        before_pos, before_state = store.position(0), shard.dump_state()
        last = before_pos[0]
        assert store.log_start(0) == 1
        done = Reclaimer(store, settings(log_keep_ops=10)).compact_now()
        assert done == {0: last - 10}
        assert store.log_start(0) == last - 9
        assert store.position(0) == before_pos
        assert shard.dump_state() == before_state
        assert store.op_epoch(0, last) == before_pos[1]
        assert store.op_epoch(0, last - 10) is None
        # the log goes on from where it was
        store.deliver([ALICE], msg(99), meta=META)
        assert store.position(0)[0] == last + 1
        assert [op.index for op in store.ops_since(0, last - 10)][:1] == [last - 9]


def test_compaction_keeps_what_the_backup_and_replicas_still_need(tmp_path):
    with open_store(tmp_path, shards=1) as store:
        for n in range(30):
            store.deliver([ALICE], msg(n), meta=META)
        last = store.position(0)[0]
        keep = {0: [12, 20]}
        Reclaimer(store, settings(log_keep_ops=0), lambda numbers: keep).compact_now()
        assert store.log_start(0) == 12  # op 12 stays: its epoch is checked
        Reclaimer(store, settings(log_keep_ops=0), lambda numbers: {}).compact_now()
        assert store.log_start(0) == 12  # unknown: not compacted
        Reclaimer(store, settings(log_keep_ops=0)).compact_now()
        assert store.log_start(0) == last  # the last op always stays


def test_compaction_runs_in_bounded_batches(tmp_path):
    with open_store(tmp_path, shards=1) as store:
        for n in range(40):
            store.deliver([ALICE], msg(n), meta=META)
        _, committer = store.shard_by_number(0)
        batches = len(committer.batch_sizes)
        last = store.position(0)[0]
        reclaimer = Reclaimer(store, settings(log_keep_ops=5))
        reclaimer.batch = 7
        reclaimer.compact_now()
        assert store.log_start(0) == last - 4
        assert len(committer.batch_sizes) - batches == (last - 5) // 7 + 1


# -- blob sweep -----------------------------------------------------------------------


def test_sweep_deletes_expunged_bodies_once_the_log_no_longer_names_them(tmp_path):
    with open_store(tmp_path, shards=1) as store:
        kept = store.deliver([ALICE], msg(1, 5000), meta=META)[0].blob
        gone = store.deliver([ALICE], msg(2, 5000), meta=META)[0].blob
        for _ in range(3):
            store.store_flags(ALICE, "INBOX", [1], "add", ["\\Seen"])
        store.expunge(ALICE, "INBOX", [2])
        age(store, kept)
        age(store, gone)
        reclaimer = Reclaimer(store, settings(log_keep_ops=0))
        first = reclaimer.sweep_now()
        assert first.deleted == 0  # the append of message 2 is still in the log
        assert store.blobs.path(gone).is_file()
        reclaimer.compact_now()
        second = reclaimer.sweep_now()
        assert (second.deleted, second.freed) == (1, len(msg(2, 5000)))
        assert not store.blobs.path(gone).exists()
        assert list(store.blobs.trash.iterdir()) == []
        assert store.read_message(kept) == msg(1, 5000)
        with pytest.raises(NoSuchBlob):
            store.read_message(gone)


def test_identical_bytes_delivered_twice_one_expunged_the_other_stays(tmp_path):
    with open_store(tmp_path, shards=1) as store:
        raw = msg(7, 3000)
        a = store.deliver([ALICE], raw, meta=META)[0]
        b = store.deliver(["bob@example.test"], raw, meta=META)[0]
        assert a.blob == b.blob
        store.expunge(ALICE, "INBOX", [a.uid])
        reclaimer = Reclaimer(store, settings(log_keep_ops=0))
        reclaimer.compact_now()
        age(store, a.blob)
        assert reclaimer.sweep_now().deleted == 0
        store.blobs.forget([a.blob])  # no cache: the file itself is read
        assert store.read_message(b.blob) == raw


def test_young_blobs_are_kept_through_the_grace_period(tmp_path):
    with open_store(tmp_path, shards=1) as store:
        orphan = store.blobs.put(b"written, its op not committed yet")
        result = Reclaimer(store, settings(blob_gc_grace=3600.0)).sweep_now()
        assert (result.trashed, result.deleted) == (0, 0)
        assert store.blobs.path(orphan).is_file()


def test_put_of_a_trashed_candidate_during_the_settle_period_keeps_it(tmp_path):
    """Race (a): a delivery of identical bytes while the sweep waits."""
    with open_store(tmp_path, shards=1) as store:
        raw = msg(3, 2000)
        sha = store.blobs.put(raw)
        age(store, sha)
        reclaimer = Reclaimer(store, settings())
        sweep = gevent.spawn(reclaimer.sweep_now, 2.0)
        trashed = store.blobs.trash / sha
        wait_for(trashed.exists, "the candidate in trash/")
        result = store.deliver([ALICE], raw, meta=META)[0]  # put, then commit
        assert result.blob == sha and not trashed.exists()
        outcome = sweep.get(timeout=DEADLINE)
        assert (outcome.trashed, outcome.deleted) == (1, 0)
        assert store.blobs.path(sha).read_bytes() == raw


def test_a_blob_asked_for_during_the_sweep_is_kept(tmp_path):
    """Race (b): replication skips the put when exists() says yes (cache)."""
    with open_store(tmp_path, shards=1) as store:
        sha = store.blobs.put(b"a body a follower already holds")
        age(store, sha)
        reclaimer = Reclaimer(store, settings())
        sweep = gevent.spawn(reclaimer.sweep_now, 2.0)
        wait_for((store.blobs.trash / sha).exists, "the candidate in trash/")
        assert store.blobs.exists(sha)  # moved back at once
        outcome = sweep.get(timeout=DEADLINE)
        assert outcome.deleted == 0 and store.blobs.path(sha).is_file()


def test_a_trashed_blob_is_readable_and_moved_back(tmp_path):
    """Race (c): a reader between the phases (or after a crash) finds it."""
    with open_store(tmp_path, shards=1) as store:
        raw = msg(4)
        sha = store.deliver([ALICE], raw, meta=META)[0].blob
        store.blobs.forget([sha])
        os.replace(store.blobs.path(sha), store.blobs.trash / sha)
        assert store.read_message(sha) == raw
        assert store.blobs.path(sha).is_file() and not (store.blobs.trash / sha).exists()


def test_trash_left_by_a_crash_is_rechecked_not_emptied(tmp_path):
    with open_store(tmp_path, shards=1) as store:
        live = store.deliver([ALICE], msg(5), meta=META)[0].blob
        dead = store.blobs.put(msg(6))
        for sha in (live, dead):
            age(store, sha)
            store.blobs.forget([sha])
            os.replace(store.blobs.path(sha), store.blobs.trash / sha)
    with open_store(tmp_path, shards=1) as store:  # reopened: trash/ still there
        assert (store.blobs.trash / live).exists()
        result = Reclaimer(store, settings(log_keep_ops=10**6)).sweep_now()
        assert (result.deleted, result.kept) == (1, 1)
        assert store.blobs.path(live).is_file()
        assert not store.blobs.path(dead).exists() and not (store.blobs.trash / dead).exists()
