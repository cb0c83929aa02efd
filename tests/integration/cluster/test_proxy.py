"""Any node serves any client (issue 5 item 4), in one process.

Two nodes "a" and "b", each with its own real MailStore, real mTLS RPC
server and client (cluster/ca.py certificates), ClusterStore
(cluster/router.py), proxy handlers (cluster/proxy.py) and real IMAP and
POP3 servers on loopback, sharing one real directory in a real etcd.  The
only double is the ClusterView (`Placement`/`View` below), which says which
node leads which shard and tells both nodes when that changes.

Clients are Python's imaplib and poplib, run in native threads (the
servers run on this thread's gevent hub), plus a raw gevent socket where
the test needs exact bytes (pipelining, COMPRESS).
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.server import StreamServer

from cluster import ca, proxy, router
from cluster.directory import EtcdDirectory
from cluster.etcd import EtcdSession
from cluster.rpc import RpcClient, RpcServer
from node.config import from_dict
from node.context import NodeContext
from node.imap.server import serve_connection as imap_serve
from node.net.tls import ensure_self_signed
from node.pop3.server import serve_connection as pop3_serve
from storage.mailstore import MailStore, shard_of
from storage.model import StorageUnavailable
from tests.support.etcd import EtcdServer, skip_without_etcd

SHARDS = 8
ALICE, BOB = "alice@example.test", "bob@example.test"
PASSWORD = "secret-pw-1234"
MESSAGE = b"From: x@example.test\r\nSubject: proxied\r\n\r\nhello through the proxy\r\n"
MOVED_BYE = b"* BYE [UNAVAILABLE] Mailbox moved, reconnect\r\n"
DEADLINE = 10.0  # seconds any single client read may wait
SETTLE = 1.0  # [cluster] settle of both nodes: how long a refused login is re-routed


class Placement:
    """Which node leads which shard, shared by both nodes' views."""

    def __init__(self, addresses: dict[str, str], leader: str) -> None:
        self.addresses = addresses
        self.leaders: dict[int, str | None] = dict.fromkeys(range(SHARDS), leader)
        self.views: list[View] = []

    def move(self, number: int, node: str | None, tell: tuple[str, ...] = ("a", "b")) -> None:
        """A new primary (or none): the role callbacks of the nodes in
        ``tell`` run (a node left out has not seen the change yet)."""
        self.leaders[number] = node
        for view in self.views:
            if view.node_name in tell:
                for callback in list(view.callbacks):
                    callback(number)


class View:
    """node.context.ClusterView over a Placement (the test double)."""

    def __init__(self, node_name: str, placement: Placement) -> None:
        self.node_name = node_name
        self.placement = placement
        self.callbacks: list[Callable[[int], None]] = []
        placement.views.append(self)

    def shard_of(self, account: str) -> int:
        return shard_of(account, SHARDS)

    def primary_of(self, number: int) -> str | None:
        return self.placement.leaders[number]

    def rpc_address(self, node: str) -> str | None:
        return self.placement.addresses.get(node)

    def is_local_primary(self, number: int) -> bool:
        return self.placement.leaders[number] == self.node_name

    def local_primary_shards(self) -> list[int]:
        return [n for n in range(SHARDS) if self.is_local_primary(n)]

    def on_role_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)


class Node:
    def __init__(self, name: str, base: Path, certs: Path, directory: EtcdDirectory,
                 tls: gssl.SSLContext) -> None:
        self.name = name
        self.store = MailStore(base / name / "data", SHARDS, fsync=False)
        self.store.open()
        self.rpc_server = RpcServer("127.0.0.1:0", ca.server_context(certs))
        self.rpc_client = RpcClient(ca.client_context(certs), connect_timeout=2)
        self.directory = directory
        self.tls = tls
        self.servers: list[StreamServer] = []

    def start(self, placement: Placement) -> None:
        self.view = View(self.name, placement)
        self.cluster_store = router.ClusterStore(self.store, self.view, self.rpc_client, 5,
                                                 settle=SETTLE)
        config = from_dict({"node": {"allow_plaintext_auth_on_loopback": True},
                            "imap": {"idle_timeout": 60}})
        self.ctx = NodeContext(config=config, directory=self.directory,
                               store=self.cluster_store, tls=self.tls,
                               hostname=f"{self.name}.example.test", cluster=self.view)
        router.register_handlers(self.rpc_server, self.store, self.view)
        proxy.register_handlers(self.rpc_server, self.ctx)
        for serve in (imap_serve, pop3_serve):
            server = StreamServer(("127.0.0.1", 0), self._handler(serve))
            server.start()
            self.servers.append(server)
        self.imap_port, self.pop3_port = (s.server_port for s in self.servers)

    def _handler(self, serve: Callable[..., None]) -> Callable[[Any, Any], None]:
        return lambda sock, address: serve(self.ctx, sock, address, implicit_tls=False)

    def stop(self) -> None:
        for server in self.servers:
            server.stop(timeout=1)
        self.rpc_client.close()
        self.rpc_server.stop()
        self.store.close()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory) -> Iterator[EtcdServer]:
    skip_without_etcd()
    with EtcdServer(tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture(scope="module")
def directory(etcd: EtcdServer) -> Iterator[EtcdDirectory]:
    d = EtcdDirectory(EtcdSession([etcd.client_url], "/postroom", 5, 2.0))
    d.add_domain("example.test")
    for account in (ALICE, BOB):
        d.add_user(account, PASSWORD)
    d.start(watch=False)
    yield d
    d.stop()


@pytest.fixture
def cluster(tmp_path: Path, directory: EtcdDirectory) -> Iterator[dict[str, Any]]:
    ca_cert, ca_key = ca.create_ca("proxy-test")
    cert, key = ensure_self_signed(tmp_path, "localhost")
    tls = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    client_tls = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)
    client_tls.load_verify_locations(cafile=str(cert))
    nodes: dict[str, Any] = {}
    for name in ("a", "b"):
        node_cert, node_key = ca.issue_node_cert(ca_cert, ca_key, name, ["127.0.0.1"])
        ca.write_node_files(tmp_path / name / "certs", ca_cert, node_cert, node_key)
        nodes[name] = Node(name, tmp_path, tmp_path / name / "certs", directory, tls)
        nodes[name].rpc_server.start()
    placement = Placement({n: nodes[n].rpc_server.bound_address for n in nodes}, "b")
    for node in nodes.values():
        node.start(placement)
    yield {"placement": placement, "client_tls": client_tls, **nodes}
    for node in nodes.values():
        node.stop()


def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking stdlib client call in a native thread; the hub (and
    with it both nodes) keeps running meanwhile."""
    return gevent.get_hub().threadpool.apply(fn, args)


def imap_login(port: int, account: str = ALICE) -> imaplib.IMAP4:
    client = in_thread(imaplib.IMAP4, "127.0.0.1", port, DEADLINE)
    typ, data = in_thread(client.login, account, PASSWORD)
    assert typ == "OK", data
    return client


def read_until(client: imaplib.IMAP4, prefix: bytes) -> list[bytes]:
    """Lines from the server up to the first that starts with prefix."""
    lines = []
    while not lines or not lines[-1].startswith(prefix):
        line = in_thread(client.readline)
        assert line, f"connection closed before {prefix!r}: {lines}"
        lines.append(line)
    return lines


class RawImap:
    """A gevent socket speaking IMAP bytes, optionally DEFLATE-compressed."""

    def __init__(self, port: int) -> None:
        self.sock = gsocket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.buf = b""
        self.inflate: Any = None
        self.deflate: Any = None
        self.greeting = self.line()

    def starttls(self, context: gssl.SSLContext) -> None:
        self.send(b"s STARTTLS\r\n")
        assert self.line() == b"s OK begin TLS negotiation now\r\n"
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def send(self, data: bytes) -> None:
        if self.deflate is not None:
            data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += self.inflate.decompress(data) if self.inflate else data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def until(self, prefix: bytes) -> list[bytes]:
        lines = [self.line()]
        while not lines[-1].startswith(prefix):
            lines.append(self.line())
        return lines


def shard(account: str) -> int:
    return shard_of(account, SHARDS)


# ------------------------------------------------------------------- IMAP


@pytest.mark.parametrize("first", ["a", "b"])
def test_imap_on_a_is_served_by_primary_b_until_the_primary_moves(cluster, first) -> None:
    a, b, placement = cluster["a"], cluster["b"], cluster["placement"]
    client = imap_login(a.imap_port)
    assert b"IDLE" in in_thread(client.capability)[1][0]
    typ, data = in_thread(client.select, "INBOX")
    assert (typ, data) == ("OK", [b"0"])
    typ, data = in_thread(client.append, "INBOX", "(\\Flagged)", None, MESSAGE)
    assert typ == "OK" and b"APPENDUID" in data[0]
    # The message lives on b, the primary; a stored nothing for alice.
    assert [r.flags for r in b.store.messages(ALICE, "INBOX")] == [frozenset({"\\Flagged"})]
    assert a.store.list_mailboxes(ALICE) == []
    typ, data = in_thread(client.fetch, "1", "(FLAGS BODY.PEEK[])")
    assert typ == "OK" and data[0][1] == MESSAGE and b"\\Flagged" in data[0][0]

    # IDLE on a (served by b) sees a delivery that a routed to b.
    in_thread(client.send, b"i1 IDLE\r\n")
    assert in_thread(client.readline).startswith(b"+ ")
    results = a.cluster_store.deliver([ALICE], MESSAGE)
    assert [r.uid for r in results] == [2]
    assert read_until(client, b"* 2 EXISTS")[-1] == b"* 2 EXISTS\r\n"

    # The shard's primary moves to a: the proxied session ends cleanly,
    # whether the proxy (a) or the old primary (b) learns it first.
    placement.move(shard(ALICE), "a", tell=(first,))
    lines = read_until(client, b"* BYE")
    assert lines[-1] == MOVED_BYE
    assert in_thread(client.readline) == b""  # and the connection is closed
    in_thread(client.shutdown)
    placement.move(shard(ALICE), "a")  # now both know

    # Reconnecting lands on the new primary (a's own store: empty here).
    again = imap_login(a.imap_port)
    assert in_thread(again.select, "INBOX") == ("OK", [b"0"])
    in_thread(again.logout)


def test_session_on_a_primary_that_loses_the_shard_ends(cluster) -> None:
    b, placement = cluster["b"], cluster["placement"]
    client = imap_login(b.imap_port)  # b leads: served locally, no proxy
    assert in_thread(client.select, "INBOX") == ("OK", [b"0"])
    in_thread(client.send, b"i1 IDLE\r\n")
    assert in_thread(client.readline).startswith(b"+ ")
    placement.move(shard(ALICE), "a")
    assert read_until(client, b"* BYE")[-1] == MOVED_BYE
    assert in_thread(client.readline) == b""  # and the connection is closed
    in_thread(client.shutdown)


def test_pipelined_commands_and_compress_pass_through(cluster) -> None:
    a, b = cluster["a"], cluster["b"]
    b.store.ensure_account(BOB)
    b.store.append(BOB, "INBOX", MESSAGE)
    c = RawImap(a.imap_port)
    # LOGIN and the next command in one packet: the second runs on b.
    c.send(f"l LOGIN {BOB} {PASSWORD}\r\ns SELECT INBOX\r\n".encode())
    assert c.line().startswith(b"l OK [CAPABILITY ")
    assert b"* 1 EXISTS\r\n" in c.until(b"s OK")
    c.send(b"z COMPRESS DEFLATE\r\n")
    assert c.line() == b"z OK DEFLATE active\r\n"
    c.inflate, c.deflate = zlib.decompressobj(-15), zlib.compressobj(6, zlib.DEFLATED, -15)
    c.send(b"f FETCH 1 (BODY.PEEK[])\r\n")
    lines = c.until(b"f OK")
    assert b"".join(lines).count(MESSAGE) == 1
    c.send(b"o LOGOUT\r\n")
    assert c.until(b"o OK")[0].startswith(b"* BYE")
    c.sock.close()


def test_authenticate_plain_is_proxied_too(cluster) -> None:
    a, b = cluster["a"], cluster["b"]
    c = RawImap(a.imap_port)
    c.send(b"t AUTHENTICATE PLAIN\r\n")
    assert c.line() == b"+ \r\n"
    c.send(base64.b64encode(f"\0{BOB}\0{PASSWORD}".encode()) + b"\r\n")
    assert c.line().startswith(b"t OK [CAPABILITY ")
    c.send(b"c CREATE Projects\r\n")
    assert c.line().startswith(b"c OK ")
    assert "Projects" in [m.name for m in b.store.list_mailboxes(BOB)]
    c.send(b"o LOGOUT\r\n")
    assert c.until(b"o OK")[0].startswith(b"* BYE")
    c.sock.close()


def test_starttls_on_a_then_proxied_session_over_tls(cluster) -> None:
    a, b, placement = cluster["a"], cluster["b"], cluster["placement"]
    b.store.ensure_account(BOB)
    b.store.append(BOB, "INBOX", MESSAGE)
    c = RawImap(a.imap_port)
    c.starttls(cluster["client_tls"])
    c.send(f"l LOGIN {BOB} {PASSWORD}\r\n".encode())
    assert c.line().startswith(b"l OK [CAPABILITY ")
    c.send(b"s EXAMINE INBOX\r\n")
    assert b"* 1 EXISTS\r\n" in c.until(b"s OK")
    c.send(b"i IDLE\r\n")
    assert c.line().startswith(b"+ ")
    placement.move(shard(BOB), "a", tell=("a",))
    assert c.line() == MOVED_BYE
    with pytest.raises(EOFError):
        c.line()
    c.sock.close()


def test_login_answers_unavailable_without_a_reachable_primary(cluster) -> None:
    a, b, placement = cluster["a"], cluster["b"], cluster["placement"]
    placement.move(shard(ALICE), None)
    client = in_thread(imaplib.IMAP4, "127.0.0.1", a.imap_port, DEADLINE)
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        in_thread(client.login, ALICE, PASSWORD)
    with pytest.raises(StorageUnavailable):
        a.cluster_store.deliver([ALICE], MESSAGE)
    # The session is still usable: once b leads again the login proxies.
    placement.move(shard(ALICE), "b")
    assert in_thread(client.login, ALICE, PASSWORD)[0] == "OK"
    in_thread(client.logout)

    # Two pipelined logins: the first is refused here, the second proxied.
    placement.move(shard(ALICE), None)
    assert shard(ALICE) != shard(BOB)
    c = RawImap(a.imap_port)
    c.send(f"l1 LOGIN {ALICE} {PASSWORD}\r\nl2 LOGIN {BOB} {PASSWORD}\r\nn NOOP\r\n".encode())
    assert c.line() == b"l1 NO [UNAVAILABLE] try again later\r\n"
    assert c.line().startswith(b"l2 OK [CAPABILITY ")
    assert c.line() == b"n OK NOOP completed\r\n"
    c.sock.close()

    b.rpc_server.stop()  # b unreachable
    client = in_thread(imaplib.IMAP4, "127.0.0.1", a.imap_port, DEADLINE)
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        in_thread(client.login, ALICE, PASSWORD)
    in_thread(client.logout)
    pop = in_thread(poplib.POP3, "127.0.0.1", a.pop3_port, DEADLINE)
    in_thread(pop.user, ALICE)
    with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
        in_thread(pop.pass_, PASSWORD)
    in_thread(pop.quit)
    with pytest.raises(StorageUnavailable):
        a.cluster_store.deliver([ALICE], MESSAGE)


# ------------------------------------------------------------------- POP3


def test_pop3_on_a_is_served_by_primary_b(cluster) -> None:
    a, b, placement = cluster["a"], cluster["b"], cluster["placement"]
    a.cluster_store.deliver([ALICE], MESSAGE)  # routed to b
    a.cluster_store.deliver([ALICE], MESSAGE + b"second\r\n")
    pop = in_thread(poplib.POP3, "127.0.0.1", a.pop3_port, DEADLINE)
    in_thread(pop.user, ALICE)
    assert in_thread(pop.pass_, PASSWORD).startswith(b"+OK maildrop has 2 messages")
    assert in_thread(pop.stat) == (2, 2 * len(MESSAGE) + 8)
    _, lines, _ = in_thread(pop.retr, 1)
    assert b"\r\n".join(lines) + b"\r\n" == MESSAGE
    in_thread(pop.dele, 1)
    assert in_thread(pop.quit).startswith(b"+OK")
    assert len(b.store.messages(ALICE, "INBOX")) == 1  # expunged on b at QUIT

    # A second session on b's maildrop is refused by b (one per maildrop).
    first = in_thread(poplib.POP3, "127.0.0.1", b.pop3_port, DEADLINE)
    in_thread(first.user, ALICE)
    in_thread(first.pass_, PASSWORD)
    pop = in_thread(poplib.POP3, "127.0.0.1", a.pop3_port, DEADLINE)
    in_thread(pop.user, ALICE)
    with pytest.raises(poplib.error_proto, match=r"IN-USE"):
        in_thread(pop.pass_, PASSWORD)
    in_thread(first.quit)
    in_thread(pop.user, ALICE)  # still in AUTHORIZATION: try again
    assert in_thread(pop.pass_, PASSWORD).startswith(b"+OK maildrop has 1 messages")

    placement.move(shard(ALICE), "a")
    assert in_thread(pop.file.readline) == b"-ERR [SYS/TEMP] mailbox moved\r\n"
    assert in_thread(pop.file.readline) == b""
    in_thread(pop.close)


def test_pop3_pipelined_login_reaches_the_primary(cluster) -> None:
    a, b = cluster["a"], cluster["b"]
    b.store.ensure_account(BOB)
    b.store.append(BOB, "INBOX", MESSAGE)
    c = RawImap(a.pop3_port)  # line-based bytes: POP3 works the same
    assert c.greeting.startswith(b"+OK")
    c.send(f"USER {BOB}\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode())
    assert [c.line() for _ in range(4)] == [
        b"+OK send PASS\r\n", b"+OK maildrop has 1 messages (%d octets)\r\n" % len(MESSAGE),
        b"+OK 1 %d\r\n" % len(MESSAGE), b"+OK postroom signing off (1 messages left)\r\n"]
    with pytest.raises(EOFError):
        c.line()
    c.sock.close()


def test_pop3_session_on_a_primary_that_loses_the_shard_ends(cluster) -> None:
    b, placement = cluster["b"], cluster["placement"]
    pop = in_thread(poplib.POP3, "127.0.0.1", b.pop3_port, DEADLINE)  # served locally
    in_thread(pop.user, ALICE)
    assert in_thread(pop.pass_, PASSWORD).startswith(b"+OK maildrop has 0 messages")
    placement.move(shard(ALICE), "a")
    assert in_thread(pop.file.readline) == b"-ERR [SYS/TEMP] mailbox moved\r\n"
    assert in_thread(pop.file.readline) == b""
    in_thread(pop.close)
    # The maildrop lock on b was released with the session.
    placement.move(shard(ALICE), "b")
    again = in_thread(poplib.POP3, "127.0.0.1", b.pop3_port, DEADLINE)
    in_thread(again.user, ALICE)
    assert in_thread(again.pass_, PASSWORD).startswith(b"+OK")
    in_thread(again.quit)
