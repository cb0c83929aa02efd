"""Inline queued bodies (storage/queue.py): the body travels in the ``enqueue``
op and lives in the queue row; ops and rows that name a blob file still work."""

from __future__ import annotations

import base64
import dataclasses
import functools
import sqlite3

import pytest

from storage import shard as ops
from storage.model import NoSuchQueueEntry, QueuedRecipient, StorageError
from storage.queue import OutboundQueue, queue_shard
from storage.shard import Op, Shard
from tests.unit.storage.storage_testlib import msg, open_store

RCPT = [QueuedRecipient("b@y.test")]


def _blob_files(store) -> list:
    root = store.data_dir / "blobs"
    return [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "tmp"]


def _enqueue_op(store, entry) -> Op:
    number = queue_shard(entry.id, store.shards)
    [op] = [o for o in store.ops_since(number, 0) if o.op == "enqueue"
            and o.args["id"] == entry.id]
    return op


def test_the_enqueue_op_carries_the_body_and_no_blob_file_is_written(tmp_path):
    with open_store(tmp_path / "s") as store:
        q = OutboundQueue(store)
        raw = msg(1) + bytes(range(256))  # 8-bit and control octets survive
        e = q.enqueue("a@x.test", RCPT, raw)
        op = _enqueue_op(store, e)
        assert "blob" not in op.args and base64.b64decode(op.args["data"]) == raw
        assert e.blob == "" and e.size == len(raw) and e.data == raw
        assert _blob_files(store) == []
        [due] = q.due(e.created, 10)
        assert due.data == raw and q.read_body(due) == raw
        assert q.read_body(dataclasses.replace(e, data=None)) == raw  # from the row
        q.delete(e.id)
        with pytest.raises(NoSuchQueueEntry):
            q.read_body(dataclasses.replace(e, data=None))


def test_a_body_over_the_limit_is_a_blob_file_made_durable_before_the_op(tmp_path):
    with open_store(tmp_path / "s") as store:
        q = OutboundQueue(store, inline_max=100)
        small, big = msg(1), msg(2, size=200)
        inline = q.enqueue("a@x.test", RCPT, small)
        filed = q.enqueue("a@x.test", RCPT, big)
        assert inline.blob == "" and len(filed.blob) == 64 and filed.data is None
        assert store.blobs.exists(filed.blob) and len(_blob_files(store)) == 1
        assert "data" not in _enqueue_op(store, filed).args
        assert q.read_body(filed) == big and q.read_body(inline) == small
        refs = set().union(*(s.blob_names() for s in
                             (store.shard_by_number(n)[0] for n in store.existing_shards())))
        assert refs == {filed.blob}  # the inline body references no blob


def test_old_form_ops_replay_next_to_inline_ones(tmp_path):
    """A log with both forms (written before and after inline bodies) replays
    into a replica that serves both bodies."""
    with open_store(tmp_path / "s", shards=1) as store:
        old = OutboundQueue(store, inline_max=0)  # every body a blob file, as before
        new = OutboundQueue(store)
        a = old.enqueue("a@x.test", RCPT, msg(1))
        b = new.enqueue("a@x.test", RCPT, msg(2))
        log = store.ops_since(0, 0)
        blob = store.read_message(a.blob)
        expected = store.shard_by_number(0)[0].dump_state()
    (tmp_path / "r" / "shards").mkdir(parents=True)
    replica = Shard(tmp_path / "r" / "shards" / "shard-0000.sqlite")
    replica.open_writer()
    replica.open_reader()
    try:
        [(ok, value, _)] = replica.run_batch([functools.partial(ops.intent_apply_ops, ops=log)])
        assert ok, value
        assert replica.dump_state() == expected
    finally:
        replica.close()
    with open_store(tmp_path / "r", shards=1) as store:
        store.blobs.put(blob)
        q = OutboundQueue(store)
        assert [e.id for e in q.list()] == [a.id, b.id]
        assert q.read_body(q.get(a.id)) == msg(1) and q.read_body(q.get(b.id)) == msg(2)


def test_a_database_from_before_inline_bodies_is_migrated(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        e = OutboundQueue(store, inline_max=0).enqueue("a@x.test", RCPT, msg(1))
    path = tmp_path / "s" / "shards" / "shard-0000.sqlite"
    with sqlite3.connect(path) as conn:  # the schema before this change
        conn.execute("ALTER TABLE queue DROP COLUMN data")
    with open_store(tmp_path / "s", shards=1) as store:
        q = OutboundQueue(store)
        assert q.read_body(q.get(e.id)) == msg(1)
        f = q.enqueue("a@x.test", RCPT, msg(2))
        assert f.blob == "" and q.read_body(q.get(f.id)) == msg(2)
        assert [x.data for x in q.due(f.created, 10)] == [None, msg(2)]


def test_a_bad_inline_body_changes_nothing(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        e = OutboundQueue(store).enqueue("a@x.test", RCPT, msg(1))
        good = _enqueue_op(store, e)
        before = store.shard_by_number(0)[0].dump_state()
        position = store.position(0)
        for data in ("not base64!", 12):
            args = {**good.args, "id": "0" * 16, "data": data}
            bad = Op(position[0] + 1, position[1], good.timestamp, "enqueue", args)
            with pytest.raises(StorageError):
                store.apply_ops(0, [bad])
            assert store.position(0) == position
            assert store.shard_by_number(0)[0].dump_state() == before


def test_ops_since_bounds_the_args_octets(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        q = OutboundQueue(store)
        for i in range(6):
            q.enqueue("a@x.test", RCPT, msg(i, size=30_000))
        every = store.ops_since(0, 0)
        assert len(every) == 6
        one = store.ops_since(0, 0, 100, max_bytes=10)  # the first op always
        assert one == every[:1]
        some = store.ops_since(0, 0, 100, max_bytes=100_000)  # ~40 KB of JSON each
        assert some == every[:2]
        assert store.ops_since(0, 0, 100, max_bytes=10**9) == every


def test_backup_and_restore_name_no_blob_for_an_inline_body(tmp_path):
    from storage import backup, restore

    with open_store(tmp_path / "s", shards=1) as store:
        q = OutboundQueue(store)
        inline = q.enqueue("a@x.test", RCPT, msg(1))
        filed = OutboundQueue(store, inline_max=0).enqueue("a@x.test", RCPT, msg(2))
        assert backup.op_blobs(_enqueue_op(store, inline).args) == set()
        assert backup.op_blobs(_enqueue_op(store, filed).args) == {filed.blob}
        lines = backup.decode_segment(backup.encode_segment(store.ops_since(0, 0)))
        assert backup.segment_blobs(lines) == {filed.blob}
        store.export_snapshot(0, tmp_path / "snap.sqlite")
    assert backup.snapshot_blobs(tmp_path / "snap.sqlite") == {filed.blob}
    assert restore.referenced_blobs(tmp_path / "snap.sqlite") == {
        filed.blob: [f"queue {filed.id}"]}
