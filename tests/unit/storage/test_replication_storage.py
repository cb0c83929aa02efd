"""The storage side of replication (docs/cluster.md, "Shard roles in the MailStore").

Two real MailStores in one process: A is the primary of a shard, B its
follower.  A's replicate hook hands each prepared batch to B.apply_replicated
with the blobs the ops reference, read from A's BlobStore.  The network path
is tested with cluster/replication.py.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sqlite3

import gevent
import gevent.event
import pytest

from storage import fts
from storage import shard as ops
from storage.mailstore import MailStore, shard_of
from storage.model import (
    LogMismatch,
    QueuedRecipient,
    RecipientResult,
    StaleEpoch,
    StorageError,
    StorageUnavailable,
)
from storage.queue import OutboundQueue, queue_shard
from storage.shard import Op
from tests.unit.storage.storage_testlib import META, msg, open_store
from tests.unit.storage.test_storage_shard import busy_workload

SHARDS = 2
ALICE = "alice@example.test"
N = shard_of(ALICE, SHARDS)
BOB = next(f"bob{i}@example.test" for i in range(100) if shard_of(f"bob{i}@example.test", SHARDS) == N)


class Link:
    """A's replicate hook: ship to B, optionally failing before or after B has them."""

    def __init__(self, primary: MailStore, follower: MailStore, epoch: int) -> None:
        self.primary, self.follower, self.epoch = primary, follower, epoch
        self.fail_before = self.fail_after = False
        self.shipped: list[tuple[int, list[Op]]] = []

    def __call__(self, number: int, new_ops: list[Op]) -> None:
        if self.fail_before:
            raise StorageUnavailable("no follower reachable")
        first = new_ops[0].index
        prev = (first - 1, self.primary.op_epoch(number, first - 1))
        blobs = {o.args["blob"]: self.primary.read_message(o.args["blob"])
                 for o in new_ops if "blob" in o.args}
        self.follower.apply_replicated(number, self.epoch, prev, new_ops, blobs)
        self.shipped.append((number, new_ops))
        if self.fail_after:
            raise StorageUnavailable("ISR shrink failed")


@pytest.fixture
def pair(tmp_path):
    with open_store(tmp_path / "a", SHARDS, fsync=False) as a, \
            open_store(tmp_path / "b", SHARDS, fsync=False) as b:
        link = Link(a, b, epoch=1)
        for number in range(SHARDS):
            a.set_role(number, "primary", 1, link)
            b.set_role(number, "follower", 1)
        yield a, b, link


def in_sync(a: MailStore, b: MailStore, number: int = N) -> bool:
    return a.position_digest(number) == b.position_digest(number)


def test_single_node_default_is_primary_epoch_0_without_replication(tmp_path):
    with open_store(tmp_path / "s", SHARDS) as store:
        assert store.role(N) == ("primary", 0)
        assert store.position(N) == (0, 0)
        assert store.op_epoch(N, 0) == 0 and store.op_epoch(N, 1) is None
        store.ensure_account(ALICE)
        store.deliver([ALICE], msg(1))
        last, epoch = store.position(N)
        assert last > 0 and epoch == 0
        assert all(o.epoch == 0 for o in store.ops_since(N, 0))
        assert store.op_epoch(N, last) == 0


def test_mailbox_and_queue_ops_reach_the_follower(pair):
    a, b, link = pair
    a.ensure_account(ALICE)
    a.ensure_account(BOB)
    delivered = a.deliver([ALICE, BOB], msg(1), meta=META)
    a.append(ALICE, "INBOX", msg(2), flags=["\\Flagged"], meta=META)
    a.create_mailbox(ALICE, "Work/2026")
    a.store_flags(ALICE, "INBOX", [1, 2], "add", ["\\Seen", "todo"])
    a.copy(ALICE, "INBOX", [1], "Work/2026")
    a.move(ALICE, "INBOX", [2], "Archive")
    a.expunge(ALICE, "Work/2026", [1])
    a.rename_mailbox(ALICE, "Work", "Jobs")
    a.set_metadata(ALICE, "INBOX", [("/private/comment", b"hello")])
    a.set_subscribed(ALICE, "Jobs/2026", True)
    queue = OutboundQueue(a)
    entry = queue.enqueue("alice@example.test", [QueuedRecipient("x@remote.test")], msg(3))
    number = queue_shard(entry.id, SHARDS)
    queue.record_attempt(entry.id, [RecipientResult("x@remote.test", "pending", 451)], 0.0)
    queue.hold(entry.id)

    assert in_sync(a, b)
    assert in_sync(a, b, number)
    assert a.position(N)[1] == 1 and all(o.epoch == 1 for o in b.ops_since(N, 0))
    assert b.messages(ALICE, "INBOX")[0].blob == delivered[0].blob
    assert b.read_message(delivered[0].blob) == msg(1)
    assert b.get_metadata(ALICE, "INBOX") == {"/private/comment": b"hello"}
    assert b.missing_blobs(N) == [] and b.missing_blobs(number) == []
    assert OutboundQueue(b).get(entry.id) == OutboundQueue(a).get(entry.id)
    # One replicate call per committed batch that logged ops, in log order.
    shipped = [o.index for number_, batch in link.shipped if number_ == N for o in batch]
    assert shipped == list(range(1, a.position(N)[0] + 1))


def test_follower_watchers_are_told(pair):
    a, b, _ = pair
    a.ensure_account(ALICE)
    seen: list[str] = []
    b.watch(ALICE, seen.append)
    a.deliver([ALICE], msg(1))
    assert "INBOX" in seen


def test_replicate_failure_rolls_back_and_fences_the_epoch(pair):
    a, b, link = pair
    a.ensure_account(ALICE)
    a.deliver([ALICE], msg(1))
    before = a.position_digest(N)
    link.fail_before = True
    with pytest.raises(StorageUnavailable):
        a.deliver([ALICE], msg(2))
    assert a.position_digest(N) == before == b.position_digest(N)
    assert [m.uid for m in a.messages(ALICE, "INBOX")] == [1]
    # Epoch 1 is fenced now, even with a working hook: nothing is logged.
    link.fail_before = False
    a.set_role(N, "primary", 1, link)
    with pytest.raises(StorageUnavailable, match="higher epoch"):
        a.store_flags(ALICE, "INBOX", [1], "add", ["\\Seen"])
    assert a.position_digest(N) == before
    # A new epoch lifts it.
    link.epoch = 2
    a.set_role(N, "primary", 2, link)
    a.store_flags(ALICE, "INBOX", [1], "add", ["\\Seen"])
    assert a.position(N) == (before[0][0] + 1, 2)
    assert in_sync(a, b)


def test_failure_after_the_follower_appended_leaves_it_ahead(pair):
    """The primary died (here: failed) between the follower's ack and its own
    commit: the follower holds a tail the primary never committed, which the
    next append of a new epoch exposes as a LogMismatch."""
    a, b, link = pair
    a.ensure_account(ALICE)
    a.deliver([ALICE], msg(1))
    committed = a.position(N)
    link.fail_after = True
    with pytest.raises(StorageUnavailable):
        a.deliver([ALICE], msg(2))
    assert a.position(N) == committed
    assert b.position(N) == (committed[0] + 1, 1)
    link.fail_after = False
    link.epoch = 2
    a.set_role(N, "primary", 2, link)
    with pytest.raises(StorageUnavailable):
        a.deliver([ALICE], msg(3))  # B answers LogMismatch: the hook raises
    with pytest.raises(LogMismatch) as info:
        b.apply_replicated(N, 2, committed, [], {})
    assert (info.value.last_index, info.value.last_epoch) == (committed[0] + 1, 1)


def test_follower_refuses_every_client_write(pair, tmp_path):
    a, b, _ = pair
    a.ensure_account(ALICE)
    a.deliver([ALICE], msg(1))
    before = b.position_digest(N)
    queue = OutboundQueue(b)
    writes = [
        lambda: b.ensure_account(ALICE),
        lambda: b.deliver([ALICE], msg(2)),
        lambda: b.append(ALICE, "INBOX", msg(2)),
        lambda: b.create_mailbox(ALICE, "New"),
        lambda: b.delete_mailbox(ALICE, "Junk"),
        lambda: b.rename_mailbox(ALICE, "Junk", "Spam"),
        lambda: b.set_subscribed(ALICE, "INBOX", True),
        lambda: b.store_flags(ALICE, "INBOX", [1], "add", ["\\Seen"]),
        lambda: b.expunge(ALICE, "INBOX", [1]),
        lambda: b.copy(ALICE, "INBOX", [1], "Trash"),
        lambda: b.move(ALICE, "INBOX", [1], "Trash"),
        lambda: b.set_metadata(ALICE, None, [("/private/comment", b"x")]),
        lambda: b.delete_account(ALICE),
        lambda: b.submit_to(N, functools.partial(ops.intent_ensure_account, account=BOB)),
    ]
    for write in writes:
        with pytest.raises(StorageUnavailable, match="not led here"):
            write()
    b.set_role(1 - N, "none", 0)  # both shards refuse: the queue cannot enqueue anywhere
    with pytest.raises(StorageUnavailable):
        queue.enqueue("a@example.test", [QueuedRecipient("x@remote.test")], msg(3))
    assert b.position_digest(N) == before
    assert b.role(N) == ("follower", 1)


def test_queued_writes_are_gated_when_their_batch_starts(pair):
    """A write that passed the gate and waits in the committer's queue fails
    if the node stops leading the shard before its batch runs."""
    a, b, link = pair
    a.ensure_account(ALICE)
    before = a.position_digest(N)
    with a.paused(N):
        waiting = gevent.spawn(a.store_flags, ALICE, "INBOX", [1], "add", ["\\Seen"])
        pending = gevent.spawn(a.create_mailbox, ALICE, "Later")
        gevent.sleep(0.01)
        a.set_role(N, "follower", 2)
    with pytest.raises(StorageUnavailable, match="not led here"):
        pending.get()
    waiting.join()
    assert isinstance(waiting.exception, StorageUnavailable)
    assert a.position_digest(N) == before


def test_paused_holds_batches_until_released(pair):
    a, b, _ = pair
    a.ensure_account(ALICE)
    before = a.position(N)
    with a.paused(N):
        job = gevent.spawn(a.create_mailbox, ALICE, "Held")
        gevent.sleep(0.05)
        assert not job.ready() and a.position(N) == before
    job.get(timeout=10)
    assert a.position(N)[0] == before[0] + 1 and in_sync(a, b)


def test_epoch_fencing(pair):
    a, b, link = pair
    a.ensure_account(ALICE)
    last = b.position(N)
    with pytest.raises(StaleEpoch) as info:
        b.apply_replicated(N, 0, last, [], {})
    assert info.value.known_epoch == 1
    # A newer epoch is learned from an append (even an empty probe) ...
    assert b.apply_replicated(N, 3, last, [], {}) == last
    assert b.role(N) == ("follower", 3)
    # ... after which the old primary's appends are refused.
    with pytest.raises(StorageUnavailable):
        a.create_mailbox(ALICE, "Lost")
    assert a.position(N) == last
    with pytest.raises(StaleEpoch):
        b.set_role(N, "primary", 2)
    b.set_role(N, "follower", 1)  # a stale record never lowers the known epoch
    assert b.role(N) == ("follower", 3)
    # Ops newer than the sender's epoch are refused too.
    op = Op(last[0] + 1, 5, 0.0, "subscribe", {"account": ALICE, "name": "INBOX",
                                              "uidvalidity": 1, "subscribed": True})
    with pytest.raises(StorageError):
        b.apply_replicated(N, 4, last, [op], {})
    assert b.position(N) == last


def test_only_a_follower_applies(pair):
    a, b, _ = pair
    with pytest.raises(StorageUnavailable):
        a.apply_replicated(N, 5, a.position(N), [], {})
    b.set_role(N, "none", 1)
    with pytest.raises(StorageUnavailable):
        b.apply_replicated(N, 1, b.position(N), [], {})


def test_log_matching_gap_and_diverged_tail(pair, tmp_path):
    a, b, link = pair
    a.ensure_account(ALICE)
    a.deliver([ALICE], msg(1))
    last = b.position(N)
    # A gap: the follower never had index last+1.
    ahead = (last[0] + 3, 1)
    with pytest.raises(LogMismatch) as info:
        b.apply_replicated(N, 1, ahead, [], {})
    assert (info.value.last_index, info.value.last_epoch) == last
    # A diverged tail: same index, another epoch.
    with pytest.raises(LogMismatch):
        b.apply_replicated(N, 2, (last[0], 2), [], {})
    # The probe with the right prev passes and changes nothing.
    assert b.apply_replicated(N, 2, last, [], {}) == last


def test_blobs_are_verified_and_required(pair):
    a, b, _ = pair
    a.ensure_account(ALICE)
    last = b.position(N)
    uv = a.status(ALICE, "INBOX").uidvalidity
    raw = msg(7)
    good = a.blobs.put(raw)
    op = Op(last[0] + 1, 1, 1.0, "append", {
        "account": ALICE, "mailbox": "INBOX", "uidvalidity": uv, "uid": 1, "modseq": 2,
        "blob": good, "size": len(raw), "internaldate": 1.0, "flags": [], "meta": META})
    with pytest.raises(StorageError, match="does not match"):
        b.apply_replicated(N, 1, last, [op], {good: raw + b"tampered"})
    with pytest.raises(StorageUnavailable, match="missing blobs"):
        b.apply_replicated(N, 1, last, [op], {})
    assert b.position(N) == last
    assert b.apply_replicated(N, 1, last, [op], {good: raw}) == (last[0] + 1, 1)
    assert b.read_message(good) == raw


def test_new_primary_keeps_old_epochs_and_stamps_its_own(pair):
    a, b, link = pair
    a.ensure_account(ALICE)
    a.deliver([ALICE], msg(1))
    # Hand-off: A stops, B leads at epoch 2 and replicates to A.
    a.set_role(N, "follower", 2)
    back = Link(b, a, epoch=2)
    b.set_role(N, "primary", 2, back)
    b.deliver([ALICE], msg(2))
    epochs = [o.epoch for o in a.ops_since(N, 0)]
    assert epochs[-1] == 2 and set(epochs[:-1]) == {1}
    assert in_sync(a, b) and a.role(N) == ("follower", 2)


def test_snapshot_makes_a_diverged_follower_equal(tmp_path):
    with open_store(tmp_path / "a", SHARDS) as a, open_store(tmp_path / "b", SHARDS) as b:
        # B diverged: it took writes of its own at epoch 0.
        b.ensure_account(ALICE)
        b.deliver([ALICE], msg(99))
        b.set_role(N, "follower", 0)
        link = Link(a, b, epoch=1)
        a.set_role(N, "primary", 1)  # not replicating while B is out of sync
        a.ensure_account(ALICE)
        delivered = a.deliver([ALICE], msg(1), meta=META)
        a.store_flags(ALICE, "INBOX", [1], "add", ["\\Seen"])
        queue = OutboundQueue(a)
        entry = queue.enqueue("a@example.test", [QueuedRecipient("x@remote.test")], msg(2))
        b.set_role(queue_shard(entry.id, SHARDS), "follower", 0)
        with pytest.raises(LogMismatch):
            b.apply_replicated(N, 1, a.position(N), [], {})

        # A prepared but uncommitted batch is not in the snapshot.
        a.set_role(N, "primary", 1, lambda number, new_ops: snap.append(
            a.export_snapshot(number, tmp_path / "snap.sqlite")))
        snap: list[tuple[int, int]] = []
        a.create_mailbox(ALICE, "Extra")
        assert snap == [(a.position(N)[0] - 1, 1)]
        a.set_role(N, "primary", 1, link)

        position = b.install_snapshot(N, tmp_path / "snap.sqlite", 1)
        assert position == snap[0] and b.position(N) == position
        assert b.role(N) == ("follower", 1)
        assert b.list_mailboxes(ALICE) and "Extra" not in {m.name for m in b.list_mailboxes(ALICE)}
        number = queue_shard(entry.id, SHARDS)
        assert entry.blob == ""  # an inline queued body is in the snapshot, not a blob
        assert b.missing_blobs(N) == [delivered[0].blob]
        # Log catch-up after the snapshot, then replication continues.
        extra = a.ops_since(N, position[0])
        b.apply_replicated(N, 1, position, extra, {})
        a.deliver([ALICE], msg(3))
        assert in_sync(a, b)
        # A queue shard snapshot works the same; then the blobs are fetched.
        if number != N:
            a.export_snapshot(number, tmp_path / "q.sqlite")
            b.install_snapshot(number, tmp_path / "q.sqlite", 1)
            assert in_sync(a, b, number)
        for name in b.missing_blobs(number) + b.missing_blobs(N):
            b.blobs.put(a.read_message(name))
        assert b.missing_blobs(N) == b.missing_blobs(number) == []
        assert OutboundQueue(b).get(entry.id) == entry
        assert OutboundQueue(b).read_body(entry) == msg(2)
    # Reopened from disk, B still holds the installed state.
    with open_store(tmp_path / "b", SHARDS, default_role="none") as b2:
        assert b2.role(N) == ("none", 1)
        assert b2.messages(ALICE, "INBOX")[0].blob == delivered[0].blob
        with pytest.raises(StorageUnavailable):
            b2.deliver([ALICE], msg(4))


def test_install_refuses_bad_input_and_changes_nothing(pair, tmp_path):
    a, b, _ = pair
    a.ensure_account(ALICE)
    before = b.position_digest(N)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(StorageError):
        b.install_snapshot(N, junk, 1)
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    with pytest.raises(StorageError):
        b.install_snapshot(N, empty, 1)
    a.export_snapshot(N, tmp_path / "snap.sqlite")
    with pytest.raises(StaleEpoch):
        b.install_snapshot(N, tmp_path / "snap.sqlite", 0)
    with pytest.raises(StorageUnavailable):
        a.install_snapshot(N, tmp_path / "snap.sqlite", 1)  # the primary's own shard
    assert b.position_digest(N) == before
    a.deliver([ALICE], msg(1))  # replication still works
    assert in_sync(a, b)


def index(tx, docs) -> None:
    fts.index_docs(tx.conn, docs)


def test_digest_ignores_the_full_text_index_but_not_state(pair):
    a, b, _ = pair
    a.ensure_account(ALICE)
    a.deliver([ALICE], msg(1))
    assert a.digest(N) == b.digest(N)
    # Index on A only (derived local state): the digest does not change.
    shard, committer = a.shard_by_number(N)
    rows = fts.pending_batch(shard.reader, 10)
    assert rows
    docs = fts.extract_batch(rows, lambda sha: a.blobs.path(sha).read_bytes())
    committer.submit(functools.partial(index, docs=docs))
    assert not fts.pending_batch(shard.reader, 10)
    assert a.digest(N) == b.digest(N)
    a.set_metadata(ALICE, None, [("/private/comment", b"x")])
    b.set_role(N, "none", 1)
    a.set_role(N, "primary", 1)
    a.set_metadata(ALICE, None, [("/private/comment", b"y")])
    assert a.digest(N) != b.digest(N)


def test_role_change_during_replication_rolls_the_batch_back(pair):
    a, b, link = pair
    a.ensure_account(ALICE)
    before = a.position_digest(N)

    def deposed(number: int, new_ops: list[Op]) -> None:
        link(number, new_ops)  # B has the ops ...
        a.set_role(number, "follower", 2)  # ... but A lost the lead meanwhile

    a.set_role(N, "primary", 1, deposed)
    with pytest.raises(StorageUnavailable, match="role changed"):
        a.create_mailbox(ALICE, "Gone")
    assert a.position_digest(N) == before
    assert b.position(N) == (before[0][0] + 1, 1)
    assert a.role(N) == ("follower", 2)


def test_commit_failure_after_replication_fences_the_epoch(pair):
    a, b, link = pair
    a.ensure_account(ALICE)
    before = a.position_digest(N)
    shard = a.shard_by_number(N)[0]

    def disk_error() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    shard.before_commit = disk_error
    with pytest.raises(StorageUnavailable):
        a.create_mailbox(ALICE, "Lost")
    shard.before_commit = None
    assert a.position_digest(N) == before
    assert b.position(N)[0] == before[0][0] + 1  # the follower kept the tail
    with pytest.raises(StorageUnavailable, match="higher epoch"):
        a.create_mailbox(ALICE, "Again")
    # Reads and the follower's log matching are unaffected.
    assert a.list_mailboxes(ALICE)
    with pytest.raises(LogMismatch):
        b.apply_replicated(N, 2, before[0], [], {})


def test_every_op_kind_under_concurrency_keeps_replicas_equal(pair):
    a, b, link = pair
    a.ensure_account(ALICE)
    jobs = [gevent.spawn(busy_workload, a)]
    jobs += [gevent.spawn(a.deliver, [ALICE, BOB], msg(100 + i)) for i in range(40)]
    gevent.joinall(jobs, raise_error=True)
    assert any(len(batch) > 1 for _, batch in link.shipped)  # group commit still groups
    for number in range(SHARDS):
        assert a.position(number)[0] > 0
        assert in_sync(a, b, number)
        assert b.missing_blobs(number) == []
        assert a.ops_since(number, 0) == b.ops_since(number, 0)


def test_role_changes_do_not_wait_for_a_batch_in_replication(pair):
    a, b, link = pair
    a.ensure_account(ALICE)
    before = a.position_digest(N)
    release = gevent.event.Event()
    entered = gevent.event.Event()

    def slow(number: int, new_ops: list[Op]) -> None:
        entered.set()
        release.wait()  # an ISR follower that does not answer yet
        link(number, new_ops)

    a.set_role(N, "primary", 1, slow)
    job = gevent.spawn(a.create_mailbox, ALICE, "Slow")
    assert entered.wait(timeout=10)
    a.set_role(N, "none", 2)
    a.set_role(N, "follower", 2)  # returns while the batch still waits
    assert a.role(N) == ("follower", 2) and not job.ready()
    release.set()
    job.join(timeout=10)
    assert isinstance(job.exception, StorageUnavailable)
    assert a.position_digest(N) == before


def _pending(store: MailStore) -> list:
    return fts.pending_batch(store.shard_by_number(N)[0].reader, 10)


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = gevent.get_hub().loop.now() + timeout
    while not predicate():
        if gevent.get_hub().loop.now() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        gevent.sleep(0.02)


def _follower_delays(monkeypatch, quiet: float, most: float) -> None:
    from storage import mailstore

    monkeypatch.setattr(mailstore, "_INDEX_DELAY", 0.05)
    monkeypatch.setattr(mailstore, "_FOLLOWER_INDEX_DELAY", quiet)
    monkeypatch.setattr(mailstore, "_FOLLOWER_INDEX_MAX_WAIT", most)


def _three_indexed_by_the_primary_only(a: MailStore, b: MailStore) -> None:
    """Deliver 3 messages: the primary indexes them, the follower (whose
    delays the test set far longer) still has them in fts_pending."""
    a.ensure_account(ALICE)
    for i in range(3):
        a.deliver([ALICE], msg(i))
    _wait_for(lambda: not _pending(a), "the primary's index")
    gevent.sleep(0.5)  # ten primary delays, an eighth of the follower's least
    assert len(_pending(b)) == 3


def test_a_follower_indexes_once_quiet_for_its_longer_delay(pair, monkeypatch):
    """A follower serves no SEARCH: it leaves its replicated messages in
    fts_pending while the primary indexes, then indexes them itself once the
    shard was quiet for _FOLLOWER_INDEX_DELAY (a later promotion then starts
    with no slow-path backlog)."""
    _follower_delays(monkeypatch, quiet=4, most=600)
    a, b, _ = pair
    _three_indexed_by_the_primary_only(a, b)
    _wait_for(lambda: not _pending(b), "the follower's index")
    assert a.digest(N) == b.digest(N)


def test_a_follower_under_steady_load_indexes_at_its_max_wait(pair, monkeypatch):
    """Changes closer together than the quiet delay do not hold a follower's
    backlog back past _FOLLOWER_INDEX_MAX_WAIT."""
    _follower_delays(monkeypatch, quiet=600, most=2)
    a, b, _ = pair
    a.ensure_account(ALICE)
    for i in range(3):
        a.deliver([ALICE], msg(i))
    assert {uid for _, uid in _pending_uids(b)} == {1, 2, 3}
    stop = gevent.event.Event()

    def steady() -> None:
        i = 100
        while not stop.is_set():
            a.deliver([ALICE], msg(i))
            i += 1
            gevent.sleep(0.1)

    load = gevent.spawn(steady)
    try:
        _wait_for(lambda: not {uid for _, uid in _pending_uids(b)} & {1, 2, 3},
                  "the follower's first messages indexed under load")
        assert load.exception is None and not load.dead
    finally:
        stop.set()
        load.join(timeout=10)
    assert load.exception is None


def test_a_promoted_follower_indexes_at_the_primary_delay(pair, monkeypatch):
    _follower_delays(monkeypatch, quiet=600, most=600)
    a, b, _ = pair
    _three_indexed_by_the_primary_only(a, b)
    b.set_role(N, "primary", 2)
    _wait_for(lambda: not _pending(b), "the promoted follower's index")
    assert a.digest(N) == b.digest(N)


def _pending_uids(store: MailStore) -> list[tuple[int, int]]:
    reader = store.shard_by_number(N)[0].reader
    return [tuple(r) for r in reader.execute("SELECT mailbox, uid FROM fts_pending").fetchall()]


def test_a_follower_makes_a_visible_blob_durable_before_its_append(pair):
    """A file in place is not proof of a durable blob (another append may be
    between its rename and its directory fsync): the follower puts it again."""
    a, b, _ = pair
    a.ensure_account(ALICE)
    body = msg(7)
    path = b.blobs.path(hashlib.sha256(body).hexdigest())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)  # visible, never fsynced
    os.utime(path, (1, 1))
    a.deliver([ALICE], body)
    assert path.stat().st_mtime > 1  # put() found it and made its entries durable
    assert b.blobs.cached(path.name)
    assert in_sync(a, b)


def test_shipped_blob_is_stored_with_its_batch(pair):
    """A follower writes a shipped blob in its append's batch: nothing when
    the append does not continue its log, durable and cached once it does."""
    a, b, _ = pair
    a.ensure_account(ALICE)
    last = b.position(N)
    uv = a.status(ALICE, "INBOX").uidvalidity
    raw = msg(8)
    name = hashlib.sha256(raw).hexdigest()
    op = Op(last[0] + 1, 1, 1.0, "append", {
        "account": ALICE, "mailbox": "INBOX", "uidvalidity": uv, "uid": 1, "modseq": 2,
        "blob": name, "size": len(raw), "internaldate": 1.0, "flags": [], "meta": META})
    with pytest.raises(LogMismatch):
        b.apply_replicated(N, 1, (last[0] + 2, 1), [op], {name: raw})
    assert not b.blobs.exists(name) and not b.blobs.cached(name)
    assert b.apply_replicated(N, 1, last, [op], {name: raw}) == (last[0] + 1, 1)
    assert b.blobs.cached(name)
    assert b.blobs.path(name).read_bytes() == raw
    assert b.read_message(name) == raw
