"""Queue ownership in cluster mode: the runner attempts only led shards.

A real MailStore, OutboundQueue and QueueRunner; the ClusterView is a small
double that names the shards this node leads and fires role changes the way
cluster/manager.py does (callback(shard) on the hub).  Deliveries go to a
local domain, so an attempt is visible as a message in the mailbox and the
entry leaving the queue; no network is touched.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import gevent
import pytest

from node.config import from_dict
from node.context import NodeContext
from node.outbound.runner import QueueRunner
from storage.mailstore import MailStore
from storage.model import QueuedRecipient, StorageUnavailable
from storage.queue import OutboundQueue, queue_shard

SHARDS = 4
DEADLINE = 20.0
RAW = b"From: a@remote.test\r\nSubject: queued\r\n\r\nhello\r\n"


class View:
    """node.context.ClusterView double: this node leads ``led``."""

    node_name = "n1"

    def __init__(self, led: set[int]) -> None:
        self.led = set(led)
        self.callbacks: list[Callable[[int], None]] = []

    def shard_of(self, account: str) -> int:
        return queue_shard(account, SHARDS)

    def primary_of(self, number: int) -> str | None:
        return self.node_name if number in self.led else "n2"

    def rpc_address(self, node: str) -> str | None:
        return None

    def is_local_primary(self, number: int) -> bool:
        return number in self.led

    def local_primary_shards(self) -> list[int]:
        return sorted(self.led)

    def on_role_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def set_led(self, led: set[int]) -> None:
        changed = self.led ^ set(led)
        self.led = set(led)
        for number in sorted(changed):
            for callback in list(self.callbacks):
                callback(number)


class Directory:
    def is_local_domain(self, domain: str) -> bool:
        return domain == "example.test"

    def resolve_recipient(self, address: str) -> list[str] | None:
        return [address.lower()]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        gevent.sleep(0.01)


@pytest.fixture
def node(tmp_path):
    store = MailStore(tmp_path / "store", SHARDS, fsync=False)
    store.open()
    queue = OutboundQueue(store)
    view = View(set())  # what the runner sees
    queue.use_cluster(View(set()), None)  # steered by enqueue_into
    config = from_dict({"node": {"data_dir": str(tmp_path / "data")},
                        "outbound": {"resolvers": ["127.0.0.1:9"], "mta_sts": False}})
    ctx = NodeContext(config=config, directory=Directory(), store=store,  # type: ignore[arg-type]
                      tls=None, hostname="mx.example.test",  # type: ignore[arg-type]
                      queue=queue, cluster=view)
    runners: list[QueueRunner] = []

    def start_runner() -> QueueRunner:
        runner = QueueRunner(ctx, rng=random.Random(1))
        runner.start()
        runners.append(runner)
        return runner

    yield store, queue, view, start_runner
    for runner in runners:
        runner.stop()
    store.close()


def enqueue_into(queue: OutboundQueue, shard: int, n: int, store: MailStore) -> list[str]:
    """n entries in queue shard ``shard``: the queue's own view leads only
    that shard, and a cluster enqueue picks a led shard."""
    queue.cluster.led = {shard}
    ids = []
    for i in range(n):
        account = f"u{shard}x{i}@example.test"
        store.ensure_account(account)
        ids.append(queue.enqueue("a@remote.test", [QueuedRecipient(account)], RAW).id)
    return ids


def delivered(store: MailStore, queue: OutboundQueue, qid: str, account: str) -> bool:
    return queue.get(qid) is None and len(store.messages(account, "INBOX")) == 1


def test_cluster_enqueue_uses_led_shards_only(node):
    store, queue, _, _ = node
    view = queue.cluster
    view.led = {1, 3}
    shards = {queue_shard(queue.enqueue("a@remote.test", [QueuedRecipient("x@example.test")],
                                        RAW).id, SHARDS) for _ in range(40)}
    assert shards == {1, 3}  # spread over the led shards, nothing elsewhere
    view.led = set()
    with pytest.raises(StorageUnavailable):  # leads none and no way to forward
        queue.enqueue("a@remote.test", [QueuedRecipient("x@example.test")], RAW)


def test_runner_attempts_only_led_shards_and_rescans_on_role_change(node):
    store, queue, view, start_runner = node
    ids = {n: enqueue_into(queue, n, 3, store) for n in range(SHARDS)}
    view.led = {0, 1}
    start_runner()
    for n in (0, 1):
        for i, qid in enumerate(ids[n]):
            wait_until(lambda q=qid, a=f"u{n}x{i}@example.test": delivered(store, queue, q, a),
                       f"delivery of shard {n}")
    # The first scan saw every due entry: those of shards 2 and 3 were left alone.
    for n in (2, 3):
        assert [queue.get(q).attempts for q in ids[n]] == [0, 0, 0]
        assert all(not store.messages(f"u{n}x{i}@example.test", "INBOX") for i in range(3))

    # Gaining shard 2 (failover): its due entries are picked up at once.
    view.set_led({0, 1, 2})
    for i, qid in enumerate(ids[2]):
        wait_until(lambda q=qid, a=f"u2x{i}@example.test": delivered(store, queue, q, a),
                   "delivery of shard 2 after gaining it")
    assert [queue.get(q).attempts for q in ids[3]] == [0, 0, 0]


def test_lost_shard_gets_no_new_attempts(node):
    store, queue, view, start_runner = node
    view.led = {0, 1}
    start_runner()
    view.set_led({1})  # shard 0 moves away
    lost = enqueue_into(queue, 0, 2, store)  # e.g. replicated or late: not ours now
    kept = enqueue_into(queue, 1, 2, store)
    for i, qid in enumerate(kept):
        wait_until(lambda q=qid, a=f"u1x{i}@example.test": delivered(store, queue, q, a),
                   "delivery of shard 1")
    view.set_led({1, 3})  # another role change: a full rescan
    more = enqueue_into(queue, 3, 1, store)
    wait_until(lambda: delivered(store, queue, more[0], "u3x0@example.test"), "shard 3")
    assert [queue.get(q).attempts for q in lost] == [0, 0]
