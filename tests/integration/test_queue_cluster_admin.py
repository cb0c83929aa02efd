"""The outbound queue across cluster members: enqueue forwarding and the
cluster-wide ``postroom queue`` commands (node/admin.py), over real mTLS RPC.

Three members in one process, each with a real MailStore, OutboundQueue,
RpcServer and RpcClient (cluster/rpc.py, certificates from cluster/ca.py):
"a" leads queue shards 0, 2, 4; "b" leads 1, 3, 5; "c" leads none.  Shards
not led by a member have role "none" in its store, so the storage write
gate refuses them there.  Only the ClusterView is a double.  The admin
socket of "c" is driven with the real AdminClient from a thread.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest

from cluster import ca
from cluster.rpc import RpcClient, RpcServer
from node.admin import AdminClient, AdminError, AdminServer, register_queue_handlers
from storage.mailstore import MailStore
from storage.model import QueuedRecipient, StorageUnavailable
from storage.queue import OutboundQueue, queue_shard

SHARDS = 6
NODES = ("a", "b", "c")
LEADERS: dict[int, str | None] = {0: "a", 2: "a", 4: "a", 1: "b", 3: "b", 5: "b"}
MESSAGE = b"From: x@example.test\r\nSubject: queued here\r\n\r\nbody\r\n"


class View:
    """ClusterView double over a shared shard -> leader table."""

    def __init__(self, node_name: str, leaders: dict[int, str | None],
                 addresses: dict[str, str]) -> None:
        self.node_name = node_name
        self.leaders = leaders
        self.addresses = addresses

    def shard_of(self, account: str) -> int:
        return queue_shard(account, SHARDS)

    def primary_of(self, number: int) -> str | None:
        return self.leaders.get(number)

    def rpc_address(self, node: str) -> str | None:
        return self.addresses.get(node)

    def is_local_primary(self, number: int) -> bool:
        return self.leaders.get(number) == self.node_name

    def local_primary_shards(self) -> list[int]:
        return sorted(n for n, lead in self.leaders.items() if lead == self.node_name)

    def on_role_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        return lambda: None


def in_thread(fn, *args, **kwargs):
    return gevent.get_hub().threadpool.apply(fn, args, kwargs)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict]:
    ca_cert, ca_key = ca.create_ca("queue-test")
    leaders = dict(LEADERS)
    nodes: dict[str, types.SimpleNamespace] = {}
    addresses: dict[str, str] = {}
    for name in NODES:
        cert, key = ca.issue_node_cert(ca_cert, ca_key, name, ["127.0.0.1"])
        certs = tmp_path / name / "certs"
        ca.write_node_files(certs, ca_cert, cert, key)
        store = MailStore(tmp_path / name / "data", SHARDS, fsync=False, default_role="none")
        store.open()
        for number, lead in leaders.items():
            store.set_role(number, "primary" if lead == name else "none", 1)
        server = RpcServer("127.0.0.1:0", ca.server_context(certs))
        server.start()
        addresses[name] = server.bound_address
        nodes[name] = types.SimpleNamespace(
            store=store, queue=OutboundQueue(store), server=server,
            client=RpcClient(ca.client_context(certs), connect_timeout=2))
    for name, node in nodes.items():
        node.view = View(name, leaders, addresses)
        ctx = types.SimpleNamespace(queue=node.queue, cluster=node.view)
        node.remote = register_queue_handlers(node.server, ctx, node.client, timeout=5)
    wakes: list[int] = []
    admin = AdminServer(tmp_path / "admin.sock", nodes["c"].queue, lambda: wakes.append(1))
    admin.start()
    try:
        yield {"nodes": nodes, "leaders": leaders, "admin": AdminClient(tmp_path / "admin.sock"),
               "wakes": wakes}
    finally:
        admin.stop()
        for node in nodes.values():
            node.client.close()
            node.server.stop()
            node.store.close()


def enqueue(node, to: str, sender: str = "x@example.test") -> str:
    return node.queue.enqueue(sender, [QueuedRecipient(to)], MESSAGE).id


def test_enqueue_commits_on_a_led_shard_or_is_forwarded(cluster):
    nodes, leaders = cluster["nodes"], cluster["leaders"]
    local = {queue_shard(enqueue(nodes["a"], f"r{i}@remote.test"), SHARDS) for i in range(12)}
    assert local <= {0, 2, 4} and len(local) > 1  # spread over a's shards
    forwarded = enqueue(nodes["c"], "far@remote.test")  # c leads nothing
    owner = nodes[leaders[queue_shard(forwarded, SHARDS)]]
    entry = owner.queue.get(forwarded)
    assert entry is not None and entry.recipients[0].address == "far@remote.test"
    assert owner.queue.read_body(entry) == MESSAGE  # the body travelled with it
    assert nodes["c"].queue.list() == []  # nothing committed on c


def test_admin_on_a_member_covers_the_whole_cluster(cluster):
    nodes, admin = cluster["nodes"], cluster["admin"]
    ids = {enqueue(nodes["a"], "one@remote.test"), enqueue(nodes["b"], "two@other.test"),
           enqueue(nodes["b"], "three@remote.test", sender="s@sender.test")}
    listed = in_thread(admin.call, "queue.list")
    assert {e["id"] for e in listed["entries"]} == ids
    assert "missing_shards" not in listed
    assert [e["created"] for e in listed["entries"]] == sorted(e["created"]
                                                              for e in listed["entries"])
    only = in_thread(admin.call, "queue.list", domain="other.test")["entries"]
    assert [e["recipients"][0]["address"] for e in only] == ["two@other.test"]
    by_sender = in_thread(admin.call, "queue.list", sender="@sender.test")["entries"]
    assert [e["sender"] for e in by_sender] == ["s@sender.test"]

    target = next(iter(ids))
    shown = in_thread(admin.call, "queue.show", id=target)
    assert shown["entry"]["id"] == target and "Subject: queued here" in shown["headers"]
    owner = nodes[cluster["leaders"][queue_shard(target, SHARDS)]]

    in_thread(admin.call, "queue.hold", id=target)
    assert owner.queue.get(target).held
    assert in_thread(admin.call, "queue.flush") == {"count": 2}  # held entries stay
    in_thread(admin.call, "queue.release", id=target)
    assert not owner.queue.get(target).held
    assert in_thread(admin.call, "queue.retry", id=target) == {"count": 1}
    in_thread(admin.call, "queue.delete", id=target)
    assert owner.queue.get(target) is None
    assert {e["id"] for e in in_thread(admin.call, "queue.list")["entries"]} == ids - {target}
    with pytest.raises(AdminError) as err:
        in_thread(admin.call, "queue.show", id=target)
    assert err.value.code == "no_such_entry"


def test_shards_without_an_answer_are_reported(cluster):
    nodes, leaders, admin = cluster["nodes"], cluster["leaders"], cluster["admin"]
    kept = enqueue(nodes["a"], "kept@remote.test")
    enqueue(nodes["b"], "unseen@remote.test")
    leaders[5] = None  # failover in progress: shard 5 has no primary
    nodes["b"].server.stop()  # and b does not answer
    listed = in_thread(admin.call, "queue.list")
    assert [e["id"] for e in listed["entries"]] == [kept]
    assert listed["missing_shards"] == [1, 3, 5]
    assert in_thread(admin.call, "queue.flush") == {"count": 1, "missing_shards": [1, 3, 5]}
    orphan = next(f"{i:016x}" for i in range(1000) if queue_shard(f"{i:016x}", SHARDS) == 5)
    with pytest.raises(AdminError) as err:
        in_thread(admin.call, "queue.hold", id=orphan)
    assert err.value.code == "unavailable"


def test_a_member_refuses_to_answer_for_a_shard_it_does_not_lead(cluster):
    nodes = cluster["nodes"]
    qid = enqueue(nodes["a"], "r@remote.test")
    with pytest.raises(StorageUnavailable):  # b's store does not lead a's shard
        nodes["b"].queue.hold(qid)
    b_remote = nodes["b"].remote  # ... but b's cluster view routes it to a
    b_remote.act("hold", qid)
    assert nodes["a"].queue.get(qid).held
