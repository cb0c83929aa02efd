"""The outbound queue (storage/queue.py) over a real MailStore."""

from __future__ import annotations

import functools
import time

import gevent
import pytest

from storage import shard as ops
from storage.model import (
    DELIVERED,
    FAILED,
    PENDING,
    NoSuchQueueEntry,
    QueuedRecipient,
    RecipientResult,
    StorageError,
    StorageUnavailable,
)
from storage.queue import OutboundQueue, is_queue_id, queue_shard
from storage.shard import Shard
from tests.unit.storage.storage_testlib import msg, open_store
from tests.unit.storage.test_storage_shard import busy_workload


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "store", shards=4) as s:
        yield s


@pytest.fixture
def queue(store):
    return OutboundQueue(store)


def rcpts(*addresses: str, **kw) -> list[QueuedRecipient]:
    return [QueuedRecipient(a, **kw) for a in addresses]


def test_enqueue_get_and_blob(queue, store):
    before = time.time()
    e = queue.enqueue("a@x.test", rcpts("b@y.test", "c@z.test", notify=("success",)),
                      msg(1), envid="env-1", ret="HDRS", requiretls=True, body="8BITMIME")
    assert is_queue_id(e.id) and len(e.id) == 16
    assert store.shard_by_number(queue_shard(e.id, store.shards))[0].path.exists()
    assert before <= e.created == e.next_attempt <= time.time()
    assert [r.address for r in e.pending] == ["b@y.test", "c@z.test"]
    assert e.recipients[0].notify == ("SUCCESS",)
    assert (e.envid, e.ret, e.requiretls, e.body, e.held, e.attempts) == (
        "env-1", "HDRS", True, "8BITMIME", False, 0)
    assert e.blob == "" and e.data == msg(1) and e.size == len(msg(1))  # inline body
    assert queue.read_body(e) == msg(1)
    assert queue.get(e.id) == e
    assert queue.get(e.id).data is None and queue.read_body(queue.get(e.id)) == msg(1)
    assert [p for p in (store.data_dir / "blobs").rglob("*") if p.is_file()] == []
    assert queue.get("0" * 16) is None and queue.get("../etc") is None


def test_ids_are_unique_and_spread_over_shards(queue, store):
    ids = [queue.enqueue("", rcpts("r@y.test"), msg(i), is_dsn=True).id for i in range(40)]
    assert len(set(ids)) == 40
    assert {queue_shard(i, store.shards) for i in ids} == set(range(store.shards))
    assert all(queue.get(i).is_dsn and queue.get(i).sender == "" for i in ids)


@pytest.mark.parametrize("bad", [
    {"recipients": []},
    {"recipients": rcpts("a\r\nb@y")},
    {"recipients": rcpts("b@y", notify=("SOMETIMES",))},
    {"ret": "ALL"},
    {"body": "8BIT"},
    {"envid": "x" * 101},
])
def test_bad_arguments_write_nothing(queue, store, bad):
    args = {"recipients": rcpts("b@y.test")} | bad
    recipients = args.pop("recipients")
    with pytest.raises(StorageError):
        queue.enqueue("a@x", recipients, msg(1), **args)
    assert queue.list() == []
    assert [p for p in (store.data_dir / "blobs").rglob("*") if p.is_file()] == []


def test_record_attempt_updates_and_dequeues(queue):
    e = queue.enqueue("a@x", rcpts("b@y", "c@y", "d@z"), msg(1))
    later = time.time() + 300
    after = queue.record_attempt(e.id, [
        RecipientResult("B@Y", DELIVERED, 250, "2.0.0", "ok", "mx.y"),
        RecipientResult("c@y", PENDING, 451, "4.3.0", "try later", "mx.y"),
        RecipientResult("nobody@y", FAILED, 550),  # not a recipient: ignored
    ], later, delay_dsn_sent=True)
    assert after is not None and after.attempts == 1 and after.next_attempt == later
    assert after.delay_dsn_sent
    b, c, d = after.recipients
    assert (b.state, b.attempts, b.code, b.enhanced, b.text, b.remote_mta) == (
        DELIVERED, 1, 250, "2.0.0", "ok", "mx.y")
    assert (c.state, c.attempts, c.code, c.text) == (PENDING, 1, 451, "try later")
    assert (d.state, d.attempts, d.code) == (PENDING, 0, None)
    assert queue.get(e.id) == after
    # None keeps next_attempt and the delay-DSN flag.
    again = queue.record_attempt(e.id, [RecipientResult("d@z", PENDING, 421)], None)
    assert again.next_attempt == later and again.delay_dsn_sent and again.attempts == 2
    # The last pending recipients reach a final state: the entry goes.
    assert queue.record_attempt(e.id, [
        RecipientResult("c@y", FAILED, 550, "5.1.1", "no such user", "mx.y"),
        RecipientResult("d@z", DELIVERED, 250),
    ], None) is None
    assert queue.get(e.id) is None and queue.list() == []
    # An entry that is gone (delivered, deleted) is not an error for the runner.
    assert queue.record_attempt(e.id, [RecipientResult("c@y", DELIVERED)], None) is None
    with pytest.raises(StorageError):
        queue.record_attempt(e.id, [RecipientResult("c@y", "lost")], None)


def test_duplicate_addresses_are_separate_recipients(queue):
    e = queue.enqueue("a@x", rcpts("b@y", "b@y"), msg(1))
    after = queue.record_attempt(e.id, [RecipientResult("b@y", DELIVERED, 250)], time.time())
    assert [r.state for r in after.recipients] == [DELIVERED, PENDING]
    assert queue.record_attempt(e.id, [RecipientResult("b@y", DELIVERED, 250)], None) is None


def test_due_and_next_due_order_and_limit(queue):
    assert queue.due(time.time(), 10) == [] and queue.next_due() is None
    entries = [queue.enqueue("a@x", rcpts(f"r{i}@y"), msg(i)) for i in range(6)]
    base = time.time()
    # Spread next attempts: entry i due at base + 100 * (5 - i).
    for i, e in enumerate(entries):
        queue.record_attempt(e.id, [RecipientResult(f"r{i}@y", PENDING, 451)],
                             base + 100 * (5 - i))
    assert queue.next_due() == base
    due = queue.due(base + 250, 10)
    assert [e.id for e in due] == [entries[5].id, entries[4].id, entries[3].id]
    assert [e.id for e in queue.due(base + 1000, 2)] == [entries[5].id, entries[4].id]
    assert queue.due(base - 1, 10) == [] and queue.due(base + 1000, 0) == []


def test_due_uses_the_index(store, queue):
    e = queue.enqueue("a@x", rcpts("b@y"), msg(1))
    shard, _ = store.shard_by_number(queue_shard(e.id, store.shards))
    plan = shard.reader.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM queue WHERE held = 0 AND next_attempt <= ?"
        " ORDER BY next_attempt LIMIT 5", (1.0,)).fetchall()
    assert "queue_due" in " ".join(str(row) for row in plan)


def test_hold_release_retry_delete_flush(queue):
    a, b, c = (queue.enqueue("s@x", rcpts(f"r{i}@y"), msg(i)) for i in range(3))
    future = time.time() + 3600
    for i, e in enumerate((a, b, c)):
        queue.record_attempt(e.id, [RecipientResult(f"r{i}@y", PENDING, 451)], future)
    queue.hold(a.id)
    queue.hold(a.id)  # idempotent
    assert queue.get(a.id).held
    assert queue.next_due() == pytest.approx(future)
    assert {e.id for e in queue.due(future + 1, 10)} == {b.id, c.id}
    queue.retry_now(b.id)
    assert [e.id for e in queue.due(time.time(), 10)] == [b.id]
    queue.retry_now(a.id)  # a held entry stays held
    assert a.id not in [e.id for e in queue.due(time.time(), 10)]
    queue.release(a.id)
    assert not queue.get(a.id).held
    assert {e.id for e in queue.due(time.time(), 10)} == {a.id, b.id}
    queue.release(a.id)  # not held: nothing happens
    queue.hold(c.id)
    assert queue.flush() == 2  # a and b; c is held
    assert {e.id for e in queue.due(time.time(), 10)} == {a.id, b.id}
    queue.delete(b.id)
    assert queue.get(b.id) is None
    for action in (queue.hold, queue.release, queue.retry_now, queue.delete):
        with pytest.raises(NoSuchQueueEntry):
            action(b.id)
        with pytest.raises(NoSuchQueueEntry):
            action("not-an-id")


def test_list_filters(queue):
    old = queue.enqueue("Alice@X.test", rcpts("b@Y.test"), msg(1))
    new = queue.enqueue("carol@w.test", rcpts("d@z.test", "e@y.test"), msg(2))
    assert [e.id for e in queue.list()] == [old.id, new.id]
    assert [e.id for e in queue.list(domain="y.test")] == [old.id, new.id]
    assert [e.id for e in queue.list(domain="Z.TEST")] == [new.id]
    assert [e.id for e in queue.list(sender="alice@x.test")] == [old.id]
    assert [e.id for e in queue.list(sender="@w.test")] == [new.id]
    assert queue.list(sender="alice") == []
    assert old.created < new.created
    now = new.created + 60
    between = 60 + (new.created - old.created) / 2
    assert [e.id for e in queue.list(older_than=between, now=now)] == [old.id]
    assert [e.id for e in queue.list(older_than=59, now=now)] == [old.id, new.id]
    assert queue.list(older_than=3600, now=now) == []


def test_watch_runs_after_enqueue_retry_release_flush_only(queue):
    seen: list[int] = []

    def callback():
        seen.append(len(queue.due(time.time() + 1, 100)))  # committed state is visible

    stop = queue.watch(callback)
    e = queue.enqueue("a@x", rcpts("b@y"), msg(1))
    assert seen == [1]
    queue.hold(e.id)
    queue.record_attempt(e.id, [RecipientResult("b@y", PENDING, 451)], time.time() + 900)
    assert seen == [1]
    queue.release(e.id)
    queue.retry_now(e.id)
    queue.flush()
    assert seen == [1, 1, 1, 1]
    queue.watch(lambda: 1 / 0)  # a failing watcher breaks nothing
    queue.flush()
    stop()
    queue.flush()
    assert seen == [1, 1, 1, 1, 1]


def test_queue_survives_restart(tmp_path):
    with open_store(tmp_path / "s", shards=8) as store:
        q = OutboundQueue(store)
        e = q.enqueue("a@x", rcpts("b@y", "c@y", notify=("SUCCESS", "FAILURE")), msg(1),
                      envid="E", ret="FULL", smtputf8=True)
        held = q.enqueue("a@x", rcpts("d@y"), msg(2))
        q.record_attempt(e.id, [RecipientResult("b@y", DELIVERED, 250, "2.0.0", "ok", "m")],
                         e.created + 60)
        q.hold(held.id)
        before = {x.id: x for x in q.list()}
    with open_store(tmp_path / "s", shards=8) as store:
        q = OutboundQueue(store)  # a new process: nothing in memory
        assert {x.id: x for x in q.list()} == before
        assert q.get(e.id) == before[e.id] and q.get(held.id).held
        due = q.due(e.created + 60, 10)
        assert [x.id for x in due] == [e.id] and due[0].data == msg(1)  # read with the entry
        assert q.next_due() == e.created + 60
        assert q.read_body(before[e.id]) == msg(1) and q.read_body(held) == msg(2)


def test_concurrent_enqueues_group_commit(queue):
    jobs = [gevent.spawn(queue.enqueue, "a@x", rcpts(f"r{i}@y"), msg(i)) for i in range(50)]
    gevent.joinall(jobs, raise_error=True)
    assert len({j.value.id for j in jobs}) == 50
    assert len(queue.list()) == 50


def test_failed_commit_leaves_no_entry(queue, store):
    e = queue.enqueue("a@x", rcpts("b@y"), msg(1))
    shard, _ = store.shard_by_number(queue_shard(e.id, store.shards))

    def fail():
        raise OSError("disk gone")

    shard.before_commit = fail
    with pytest.raises(StorageUnavailable):
        queue.record_attempt(e.id, [RecipientResult("b@y", DELIVERED, 250)], None)
    shard.before_commit = None
    assert queue.get(e.id) == e


def queue_workload(queue: OutboundQueue) -> None:
    """Every queue op kind."""
    ids = [queue.enqueue(f"s{i}@x", rcpts(f"r{i}@y", f"t{i}@z", notify=("DELAY",)), msg(i),
                         envid=f"e{i}").id for i in range(6)]
    queue.record_attempt(ids[0], [RecipientResult("r0@y", DELIVERED, 250, "2.0.0", "ok", "mx")],
                         time.time() + 60, delay_dsn_sent=True)
    queue.record_attempt(ids[1], [RecipientResult("r1@y", FAILED, 550, "5.1.1", "no", "mx"),
                                  RecipientResult("t1@z", DELIVERED, 250)], None)
    queue.hold(ids[2])
    queue.release(ids[2])
    queue.hold(ids[3])
    queue.retry_now(ids[4])
    queue.delete(ids[5])
    queue.flush()


def restore_workload(store) -> None:
    """An in-place restore (storage/restore.py): INBOX put back as it is now,
    minus its newest message, which the restore expunges."""
    status = store.status("a@x", "INBOX")
    rows = store.messages("a@x", "INBOX")
    meta = store.metadata("a@x", "INBOX", [r.uid for r in rows])
    store.restore_mailbox("a@x", "INBOX", {
        "uidvalidity": status.uidvalidity, "uidnext": status.uidnext,
        "messages": [{"uid": r.uid, "blob": r.blob, "size": r.size,
                      "internaldate": r.internaldate, "flags": sorted(r.flags),
                      "meta": meta[r.uid]} for r in rows[:-1]],
    })


def test_replaying_the_log_rebuilds_queue_state(tmp_path):
    # RFC-free invariant of storage/shard.py: state == replay(log), queue included.
    with open_store(tmp_path / "s", shards=1) as store:
        busy_workload(store)
        queue_workload(OutboundQueue(store))
        restore_workload(store)
        original = store.shard_for("a@x")
        log = original.ops_since(0)
        assert {o.op for o in log} == set(ops.APPLY)  # every op kind, mailbox and queue
        expected = original.dump_state()
        assert expected["queue"] and expected["queue_rcpt"]
    copy = Shard(tmp_path / "replayed.sqlite")
    copy.open_writer()
    copy.open_reader()
    try:
        [(ok, value, _)] = copy.run_batch([functools.partial(ops.intent_apply_ops, ops=log)])
        assert ok, value
        assert copy.dump_state() == expected
        assert copy.ops_since(0) == log
    finally:
        copy.close()


def test_replica_built_from_the_log_serves_the_queue(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        q = OutboundQueue(store)
        queue_workload(q)
        expected = q.list()
        log = store.ops_since(0, 0)
    (tmp_path / "r" / "shards").mkdir(parents=True)
    (tmp_path / "r" / "blobs").mkdir()
    replica = Shard(tmp_path / "r" / "shards" / "shard-0000.sqlite")
    replica.open_writer()
    replica.run_batch([functools.partial(ops.intent_apply_ops, ops=log)])
    replica.close()
    with open_store(tmp_path / "r", shards=1) as store:
        assert OutboundQueue(store).list() == expected
