"""cluster/router.py: the wire codec, and ClusterStore between two real
MailStores over real mTLS RPC (cluster/rpc.py, cluster/ca.py).

Only the ClusterView is a test double (``View`` below): it says which node
leads which shard.  Everything else is the real component.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster import ca
from cluster.router import ClusterStore, decode, encode, register_handlers, remote_error
from cluster.rpc import RpcClient, RpcError, RpcServer, RpcUnavailable
from storage.mailstore import MailStore, shard_of
from storage.model import (
    AppendResult,
    FlagChange,
    MailboxChanges,
    MailboxInfo,
    MailboxStatus,
    MessageRow,
    NoSuchMailbox,
    StorageError,
    StorageUnavailable,
    TextHits,
)

SHARDS = 8
MESSAGE = b"From: a@example.test\r\nSubject: hello\r\n\r\nbody\r\n"
SETTLE = 0.5  # seconds a NotLeader refusal is re-routed before StorageUnavailable


class View:
    """A ClusterView double: ``leaders`` maps shard -> node name."""

    def __init__(self, node_name: str, leaders: dict[int, str | None],
                 addresses: dict[str, str]) -> None:
        self.node_name = node_name
        self.leaders = leaders
        self.addresses = addresses

    def shard_of(self, account: str) -> int:
        return shard_of(account, SHARDS)

    def primary_of(self, number: int) -> str | None:
        return self.leaders.get(number)

    def rpc_address(self, node: str) -> str | None:
        return self.addresses.get(node)

    def is_local_primary(self, number: int) -> bool:
        return self.leaders.get(number) == self.node_name

    def local_primary_shards(self) -> list[int]:
        return [n for n, lead in self.leaders.items() if lead == self.node_name]

    def on_role_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        return lambda: None


def accounts_on_distinct_shards(count: int) -> list[str]:
    found: dict[int, str] = {}
    i = 0
    while len(found) < count:
        account = f"user{i}@example.test"
        found.setdefault(shard_of(account, SHARDS), account)
        i += 1
    return list(found.values())


# ------------------------------------------------------------------ codec


@pytest.mark.parametrize("value", [
    None, 3, 2.5, "x", [1, "a"], (1, 2), frozenset({"\\Seen", "k"}), {3: {"a": [1]}},
    b"\x00raw", {"k": b"v", "n": None},
    AppendResult("a@x", "INBOX", 7, 1, 2, "ab"), FlagChange(1, frozenset({"\\Seen"}), 9),
    MailboxInfo("Sent", 3, "\\Sent", True), MailboxStatus(1, 2, 3, 4, 5, 6),
    MessageRow(1, frozenset(), 2, 3, 4.5, "cd"), TextHits(frozenset({1}), frozenset()),
    MailboxChanges(5, [MessageRow(1, frozenset({"a"}), 2, 3, 4.0, "e")], [7]),
    [(1, frozenset({"\\Seen"})), (2, frozenset())], (7, [(1, 2), (3, 4)]),
])
def test_codec_round_trips_every_mailstore_result_type(value) -> None:
    attachments: list[bytes] = []
    wire = encode(value, attachments)
    assert decode(json.loads(json.dumps(wire)), attachments) == value


def test_codec_refuses_unknown_classes_both_ways() -> None:
    class Other:
        pass

    with pytest.raises(TypeError):
        encode(Other(), [])
    with pytest.raises(ValueError):
        decode({"$dc": "Popen", "f": {}}, [])
    with pytest.raises(ValueError):
        decode({"$x": 1}, [])


def test_remote_errors_become_the_same_storage_class() -> None:
    assert type(remote_error(RpcError("NoSuchMailbox", "Foo"))) is NoSuchMailbox
    assert type(remote_error(RpcError("StorageUnavailable", "x"))) is StorageUnavailable
    assert type(remote_error(RpcUnavailable("down"))) is StorageUnavailable
    assert type(remote_error(RpcError("Expired", "late"))) is StorageUnavailable
    assert type(remote_error(RpcError("NoSuchMethod", "store.call"))) is StorageUnavailable
    other = remote_error(RpcError("KeyError", "k"))
    assert type(other) is StorageError and "KeyError" in str(other)
    assert type(remote_error(RpcError("Exception", "k"))) is StorageError


# ------------------------------------------------------- two real nodes


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    ca_cert, ca_key = ca.create_ca("test")
    dirs = {}
    for name in ("a", "b"):
        cert, key = ca.issue_node_cert(ca_cert, ca_key, name, ["127.0.0.1"])
        ca.write_node_files(tmp_path / name / "certs", ca_cert, cert, key)
        dirs[name] = tmp_path / name / "certs"
    return dirs


@pytest.fixture
def nodes(tmp_path: Path, certs) -> Iterator[dict]:
    stores = {n: MailStore(tmp_path / n / "data", SHARDS, fsync=False) for n in ("a", "b")}
    for s in stores.values():
        s.open()
    servers = {n: RpcServer("127.0.0.1:0", ca.server_context(certs[n])) for n in ("a", "b")}
    for s in servers.values():
        s.start()
    addresses = {n: servers[n].bound_address for n in servers}
    leaders: dict[int, str | None] = {n: ("a" if n % 2 else "b") for n in range(SHARDS)}
    views = {n: View(n, leaders, addresses) for n in ("a", "b")}
    clients = {n: RpcClient(ca.client_context(certs[n]), connect_timeout=2) for n in ("a", "b")}
    for n in ("a", "b"):
        register_handlers(servers[n], stores[n], views[n])
    cluster = {n: ClusterStore(stores[n], views[n], clients[n], timeout=5, settle=SETTLE)
               for n in ("a", "b")}
    yield {"stores": stores, "cluster": cluster, "leaders": leaders, "servers": servers,
           "addresses": addresses}
    for c in clients.values():
        c.close()
    for s in servers.values():
        s.stop()
    for s in stores.values():
        s.close()


def test_deliver_splits_accounts_by_primary(nodes) -> None:
    accounts = accounts_on_distinct_shards(4)
    a = nodes["cluster"]["a"]
    results = a.deliver([x.upper() for x in accounts] + accounts[:1], MESSAGE,
                        flags=["\\Seen"], internaldate=1700000000.0)
    assert [r.account for r in results] == accounts  # one per account, in order
    for account, result in zip(accounts, results, strict=True):
        leader = nodes["leaders"][shard_of(account, SHARDS)]
        other = "b" if leader == "a" else "a"
        rows = nodes["stores"][leader].messages(account, "INBOX")
        assert [(r.uid, r.flags, r.internaldate) for r in rows] == [
            (result.uid, frozenset({"\\Seen"}), 1700000000.0)]
        assert nodes["stores"][leader].read_message(rows[0].blob) == MESSAGE
        assert nodes["stores"][other].list_mailboxes(account) == []  # nothing on the other
    assert {nodes["leaders"][shard_of(x, SHARDS)] for x in accounts} == {"a", "b"}


def test_account_methods_run_on_the_primary_with_typed_results(nodes) -> None:
    remote = next(x for x in accounts_on_distinct_shards(4)
                  if nodes["leaders"][shard_of(x, SHARDS)] == "b")
    a, b_store = nodes["cluster"]["a"], nodes["stores"]["b"]
    a.ensure_account(remote)
    assert [m.name for m in b_store.list_mailboxes(remote)] == [
        m.name for m in a.list_mailboxes(remote)]
    res = a.append(remote, "INBOX", MESSAGE, flags=["k1"], internaldate=1700000001.0)
    assert isinstance(res, AppendResult) and res.uid == 1
    assert a.status(remote, "INBOX") == b_store.status(remote, "INBOX")
    assert a.uid_flags(remote, "INBOX") == [(1, frozenset({"k1"}))]
    assert a.rows(remote, "INBOX", [1, 5]) == b_store.rows(remote, "INBOX", [1])
    assert a.metadata(remote, "INBOX", [1]) == b_store.metadata(remote, "INBOX", [1])
    changes = a.store_flags(remote, "INBOX", [1], "add", ["\\Seen"])
    assert changes == [FlagChange(1, frozenset({"k1", "\\Seen"}), changes[0].modseq)]
    assert a.changes_since(remote, "INBOX", 0) == b_store.changes_since(remote, "INBOX", 0)
    assert a.copy(remote, "INBOX", [1], "Archive")[1] == [(1, 1)]
    a.set_metadata(remote, None, [("/private/comment", b"\xffbytes")])
    assert a.get_metadata(remote, None) == {"/private/comment": b"\xffbytes"}
    assert a.usage(remote) == b_store.usage(remote) == (2 * len(MESSAGE), 2)
    assert a.expunge(remote, "INBOX", [1]) == [1]
    with pytest.raises(NoSuchMailbox):
        a.status(remote, "Nope")
    with pytest.raises(StorageUnavailable):
        a.watch(remote, lambda name: None)


def test_primary_refuses_accounts_it_does_not_lead(nodes) -> None:
    leaders = nodes["leaders"]
    remote = next(x for x in accounts_on_distinct_shards(4) if leaders[shard_of(x, SHARDS)] == "b")
    # a's view says b leads, b's view (shared dict) now says a: b must refuse.
    number = shard_of(remote, SHARDS)
    a = nodes["cluster"]["a"]
    a.view = View("a", dict(leaders), nodes["addresses"])
    leaders[number] = "a"
    with pytest.raises(StorageUnavailable):
        a.deliver([remote], MESSAGE)
    with pytest.raises(StorageUnavailable):
        a.usage(remote)
    assert nodes["stores"]["b"].list_mailboxes(remote) == []


def test_no_primary_or_unreachable_primary_is_unavailable(nodes) -> None:
    accounts = accounts_on_distinct_shards(4)
    leaders = nodes["leaders"]
    remote = next(x for x in accounts if leaders[shard_of(x, SHARDS)] == "b")
    local = next(x for x in accounts if leaders[shard_of(x, SHARDS)] == "a")
    a = nodes["cluster"]["a"]
    leaders[shard_of(remote, SHARDS)] = None
    with pytest.raises(StorageUnavailable):
        a.deliver([remote, local], MESSAGE)
    # The local part was still delivered (at-least-once: the sender retries).
    assert len(nodes["stores"]["a"].messages(local, "INBOX")) == 1
    leaders[shard_of(remote, SHARDS)] = "b"
    nodes["servers"]["b"].stop()
    with pytest.raises(StorageUnavailable):
        a.usage(remote)
    with pytest.raises(StorageUnavailable):
        a.deliver([remote], MESSAGE)
