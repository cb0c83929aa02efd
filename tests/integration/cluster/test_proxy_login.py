"""Proxied logins on a healthy cluster are answered (issue 5 item 4), in one process.

Regression tests for the IMAP fill of tests/bench/cluster.py, whose LOGIN
through a non-primary node got ``NO [UNAVAILABLE]`` on a healthy cluster:
the primary's answer to a handed-over login waited in the shard's committer
(``ensure_account`` was a write batch, queued behind replicated batches)
past the proxy's RPC timeout.  Also: a login that reaches a shard between
two primaries (a new primary still syncing, the proxy itself about to
lead) is re-routed while placement settles instead of refused.

Two nodes "a" and "b", each with a real MailStore, real mTLS RPC server and
client (cluster/ca.py), ClusterStore, proxy handlers and real IMAP and
POP3 servers on loopback, sharing one real directory in a real etcd.  The
only double is the ClusterView (`View`), which says which node leads which
shard; ``syncing`` shards are named as led by a node that does not lead
them yet (its promotion sync is running).  Clients are imaplib/poplib in
native threads; the servers run on this thread's gevent hub.
"""

from __future__ import annotations

import imaplib
import poplib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest
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

SHARDS = 4
ACCOUNTS = [f"login{i}@example.test" for i in range(8)]
PASSWORD = "secret-pw-1234"
MESSAGE = b"From: x@example.test\r\nSubject: after login\r\n\r\nproxied append\r\n"
DEADLINE = 20.0  # seconds any single client read may wait
PROXY_TIMEOUT = 1.0  # the proxying node's RPC timeout: its bound for the login's answer


class View:
    """node.context.ClusterView over a shared leaders map (the test double)."""

    def __init__(self, node_name: str, leaders: dict[int, str], addresses: dict[str, str]):
        self.node_name = node_name
        self.leaders = leaders
        self.addresses = addresses
        self.syncing: set[int] = set()  # named primary here, not leading yet
        self.asked_while_syncing = 0
        self.callbacks: list[Callable[[int], None]] = []

    def shard_of(self, account: str) -> int:
        return shard_of(account, SHARDS)

    def primary_of(self, number: int) -> str | None:
        return self.leaders[number]

    def rpc_address(self, node: str) -> str | None:
        return self.addresses.get(node)

    def is_local_primary(self, number: int) -> bool:
        if number in self.syncing:
            if not self.asked_while_syncing:  # the promotion ends a moment later
                gevent.spawn_later(0.1, self.syncing.discard, number)
            self.asked_while_syncing += 1
            return False
        return self.leaders[number] == self.node_name

    def local_primary_shards(self) -> list[int]:
        return [n for n in range(SHARDS) if self.is_local_primary(n)]

    def on_role_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)


class Node:
    """One node: store, RPC, ClusterStore, proxy handlers, IMAP and POP3 servers."""

    def __init__(self, name: str, base: Path, directory: EtcdDirectory,
                 tls: gssl.SSLContext, ca_pair: tuple[bytes, bytes]) -> None:
        certs = base / name / "certs"
        node_cert, node_key = ca.issue_node_cert(*ca_pair, name, ["127.0.0.1"])
        ca.write_node_files(certs, ca_pair[0], node_cert, node_key)
        self.name = name
        self.store = MailStore(base / name / "data", SHARDS, fsync=False)
        self.store.open()
        self.rpc_server = RpcServer("127.0.0.1:0", ca.server_context(certs))
        self.rpc_client = RpcClient(ca.client_context(certs), connect_timeout=2)
        self.directory = directory
        self.tls = tls
        self.servers: list[StreamServer] = []
        self.rpc_server.start()

    def start(self, view: View) -> None:
        self.view = view
        store = router.ClusterStore(self.store, view, self.rpc_client, PROXY_TIMEOUT)
        config = from_dict({"node": {"allow_plaintext_auth_on_loopback": True},
                            "imap": {"idle_timeout": 60}})
        self.ctx = NodeContext(config=config, directory=self.directory, store=store,
                               tls=self.tls, hostname=f"{self.name}.example.test", cluster=view)
        router.register_handlers(self.rpc_server, self.store, view)
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
def directory(tmp_path_factory) -> Iterator[EtcdDirectory]:
    from tests.support.etcd import EtcdServer, skip_without_etcd

    skip_without_etcd()
    with EtcdServer(tmp_path_factory.mktemp("etcd")) as etcd:
        d = EtcdDirectory(EtcdSession([etcd.client_url], "/postroom", 5, 2.0))
        d.add_domain("example.test")
        for account in ACCOUNTS:
            d.add_user(account, PASSWORD)
        d.start(watch=False)
        yield d
        d.stop()


@pytest.fixture
def nodes(tmp_path: Path, directory: EtcdDirectory) -> Iterator[dict[str, Node]]:
    """Nodes a and b; b leads every shard; every account exists (has its INBOX)."""
    cert, key = ensure_self_signed(tmp_path, "localhost")
    tls = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    ca_pair = ca.create_ca("proxy-login-test")
    made = {name: Node(name, tmp_path, directory, tls, ca_pair) for name in ("a", "b")}
    leaders = dict.fromkeys(range(SHARDS), "b")
    addresses = {n: made[n].rpc_server.bound_address for n in made}
    for name, node in made.items():
        node.start(View(name, leaders, addresses))
    for account in ACCOUNTS:
        made["b"].store.ensure_account(account)
    yield made
    for node in made.values():
        node.stop()


def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking stdlib client call in a native thread; the hub (both nodes) runs on."""
    return gevent.get_hub().threadpool.apply(fn, args)


def login(port: int, account: str) -> tuple[imaplib.IMAP4, str, list]:
    client = in_thread(imaplib.IMAP4, "127.0.0.1", port, DEADLINE)
    try:
        typ, data = in_thread(client.login, account, PASSWORD)
    except imaplib.IMAP4.error as exc:  # imaplib raises on NO
        typ, data = "NO", [str(exc)]
    return client, typ, data


def test_concurrent_proxied_logins_do_not_wait_for_the_primarys_commits(nodes) -> None:
    """Every shard's committer on the primary is held (batches queue, as behind
    a slow replicated batch) for longer than the proxy waits for a login's
    answer: every LOGIN through node a still succeeds, and the APPENDs that
    follow commit once the committers run again."""
    a, b = nodes["a"], nodes["b"]
    release = gevent.event.Event()
    held = gevent.event.Event()

    def hold_committers() -> None:
        with ExitStack() as stack:
            for number in range(SHARDS):
                stack.enter_context(b.store.paused(number))
            held.set()
            release.wait(3 * DEADLINE)

    holder = gevent.spawn(hold_committers)
    assert held.wait(DEADLINE), "the committers were not paused"
    try:
        jobs = [gevent.spawn(login, a.imap_port, account) for account in ACCOUNTS]
        gevent.joinall(jobs, raise_error=True)
    finally:
        release.set()
        holder.join(DEADLINE)
    results = [job.value for job in jobs]
    assert [(typ, data) for _, typ, data in results if typ != "OK"] == []
    for (client, _, _), account in zip(results, ACCOUNTS, strict=True):
        typ, data = in_thread(client.append, "INBOX", None, None, MESSAGE)
        assert typ == "OK", (account, data)
        in_thread(client.logout)
    for account in ACCOUNTS:
        assert b.store.status(account, "INBOX").messages == 1


def test_a_login_reaching_a_primary_still_syncing_is_retried(nodes) -> None:
    """b is named primary but its promotion sync is still running (it answers
    the hand-over NO [UNAVAILABLE]): the proxy re-routes the login until b
    leads, and the client never sees the refusal."""
    a, b = nodes["a"], nodes["b"]
    account = ACCOUNTS[0]
    b.view.syncing.add(shard_of(account, SHARDS))
    client, typ, data = login(a.imap_port, account)
    assert (typ, b.view.asked_while_syncing > 0) == ("OK", True), data
    typ, data = in_thread(client.select, "INBOX")
    assert typ == "OK", data
    in_thread(client.logout)


def test_a_login_on_the_node_about_to_lead_is_served_there(nodes) -> None:
    """a is named primary of the account's shard but not leading yet: the
    login waits for the promotion and is served on a itself."""
    a, b = nodes["a"], nodes["b"]
    account = ACCOUNTS[1]
    number = shard_of(account, SHARDS)
    a.store.ensure_account(account)
    a.view.leaders[number] = "a"
    a.view.syncing.add(number)
    client, typ, data = login(a.imap_port, account)
    assert (typ, a.view.asked_while_syncing > 0) == ("OK", True), data
    typ, data = in_thread(client.append, "INBOX", None, None, MESSAGE)
    assert typ == "OK", data
    in_thread(client.logout)
    assert a.store.status(account, "INBOX").messages == 1
    assert b.store.status(account, "INBOX").messages == 0


def test_a_pop3_login_reaching_a_primary_still_syncing_is_retried(nodes) -> None:
    a, b = nodes["a"], nodes["b"]
    account = ACCOUNTS[2]
    b.view.syncing.add(shard_of(account, SHARDS))
    client = in_thread(poplib.POP3, "127.0.0.1", a.pop3_port, DEADLINE)
    in_thread(client.user, account)
    reply = in_thread(client.pass_, PASSWORD)
    assert reply.startswith(b"+OK maildrop has 0 messages"), reply
    assert b.view.asked_while_syncing > 0
    in_thread(client.quit)
