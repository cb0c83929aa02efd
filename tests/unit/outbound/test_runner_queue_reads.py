"""The queue reads the runner relies on (storage/queue.py), over a real MailStore.

``due`` leaves out the ids in flight and still returns the earliest others
across shards; ``next_due(after=)`` finds the next future attempt;
``watch(entries=True)`` hands over the committed entry.
"""

from __future__ import annotations

import time

import pytest

from storage.mailstore import MailStore
from storage.model import PENDING, QueuedRecipient, RecipientResult
from storage.queue import OutboundQueue, queue_shard

RAW = b"Subject: s\r\n\r\nbody\r\n"


@pytest.fixture
def queue(tmp_path):
    store = MailStore(tmp_path / "store", 4, fsync=False)
    store.open()
    yield OutboundQueue(store)
    store.close()


def test_due_excludes_in_flight_ids_and_keeps_the_order(queue):
    ids = [queue.enqueue("a@x.test", [QueuedRecipient(f"r{i}@y.test")], RAW).id
           for i in range(12)]
    assert len({queue_shard(i, 4) for i in ids}) > 1  # spread over shards
    now = time.time() + 1
    everything = [e.id for e in queue.due(now, 100)]
    assert sorted(everything) == sorted(ids)
    in_flight = set(everything[:5])
    rest = [e.id for e in queue.due(now, 4, exclude=in_flight)]
    assert rest == everything[5:9]  # the next earliest, not fewer because of the exclusions
    assert [e.id for e in queue.due(now, 100, shards=[queue_shard(ids[0], 4)])] == [
        i for i in everything if queue_shard(i, 4) == queue_shard(ids[0], 4)]
    queue.hold(everything[5])
    assert everything[5] not in [e.id for e in queue.due(now, 100, exclude=in_flight)]


def test_next_due_after_skips_what_is_due_now(queue):
    first = queue.enqueue("a@x.test", [QueuedRecipient("r@y.test")], RAW)
    later = queue.enqueue("a@x.test", [QueuedRecipient("s@y.test")], RAW)
    when = time.time() + 600
    queue.record_attempt(later.id, [RecipientResult("s@y.test", PENDING, 451, "4.0.0", "x")],
                         when)
    assert queue.next_due() == first.next_attempt
    assert queue.next_due(after=time.time() + 1) == pytest.approx(when)
    assert queue.next_due(after=when) is None


def test_watch_hands_over_new_entries(queue):
    seen: list = []
    stop = queue.watch(seen.append, entries=True)
    entry = queue.enqueue("a@x.test", [QueuedRecipient("r@y.test")], RAW)
    queue.retry_now(entry.id)
    assert [e.id if e is not None else None for e in seen] == [entry.id, None]
    stop()
    queue.flush()
    assert len(seen) == 2
