"""The cluster test harness itself: a 3-member etcd with TLS + auth works with
EtcdSession, `cluster init`/`join` give every node a certificate from the
cluster CA, and three nodes start in cluster mode.

Scenarios that need greenlets (watches, the lease refresher) run in a
gevent-patched child process (tests.support.etcd.run_patched).
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from cluster import ca
from cluster.etcd import EtcdError, WatchEvent, session_from_config
from node.config import EtcdSettings
from tests.support.cluster import ClusterHarness
from tests.support.etcd import run_patched
from tests.support.etcd_cluster import EtcdCluster
from tests.support.node import USERS

MODULE = "tests.integration.cluster.test_harness"


def _settings(etcd: EtcdCluster, **changes) -> EtcdSettings:
    return EtcdSettings(**{**etcd.settings(), "lease_ttl": 3, "timeout": 3.0, **changes})


# -- etcd over TLS with authentication ------------------------------------


def scenario_session_over_tls_with_auth() -> None:
    """KV, lease and watch through TLS with a token; an expired token is
    renewed; a member crash loses no watch event."""
    with tempfile.TemporaryDirectory() as tmp, EtcdCluster(Path(tmp), token_ttl=1) as etcd:
        session = session_from_config(_settings(etcd))
        session.start()
        assert session.lease_id and session.authentications == 1
        seen: list[WatchEvent] = []
        _, revision = session.get_prefix("/q/")
        session.watch_prefix("/q/", seen.append, revision + 1)
        for i in range(5):
            session.put(f"/q/{i}", i)
        session.put("/q/leased", "x", lease=True)
        assert session.get("/q/leased").lease == session.lease_id
        _wait(lambda: len(seen) == 6, "events before the crash")

        # Sessions without a lease refresher let their tokens go idle: etcd
        # drops them after token_ttl.  The next request re-authenticates once;
        # a watch re-armed with the dead token is refused, re-authenticates
        # and resumes where it was.
        idle = session_from_config(_settings(etcd))
        idle.put("/idle", 1)
        watcher = session_from_config(_settings(etcd))
        watched: list[WatchEvent] = []
        idle_watch = watcher.watch_prefix("/q/", watched.append, revision + 1)
        _wait(lambda: len(watched) == 6, "the second watch's first events")
        assert (idle.authentications, watcher.authentications) == (1, 1)
        gevent.sleep(etcd.token_ttl + 1.5)  # let the tokens expire (etcd checks every 1 s)
        assert idle.get("/idle").value == 1
        assert idle.authentications == 2
        idle_watch.rearm()
        _wait(lambda: watcher.authentications == 2, "the watch to re-authenticate")

        member = session._index  # crash the member this session talks to
        etcd.kill(member)
        for i in range(5, 8):
            session.put(f"/q/{i}", i)  # served by the others
        etcd.start(member)
        session._index = member
        for i in range(8, 10):
            session.put(f"/q/{i}", i)
        _wait(lambda: len(seen) == 11 and len(watched) == 11, "events after the crash")
        gevent.sleep(0.3)  # nothing more may arrive (no duplicates)
        for events in (seen, watched):
            values = [e.value for e in events if e.key != "/q/leased"]
            assert values == list(range(10)), values
            revisions = [e.mod_revision for e in events]
            assert revisions == sorted(set(revisions))
        watcher.close()
        session.close()
        print("ok")


def _wait(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        gevent.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_session_over_tls_with_auth() -> None:
    assert "ok" in run_patched(MODULE, "scenario_session_over_tls_with_auth")


def test_requests_without_credentials_are_refused(etcd_cluster: EtcdCluster) -> None:
    good = session_from_config(_settings(etcd_cluster))
    good.put("/probe", 1)

    anonymous = session_from_config(_settings(etcd_cluster, username="", password_file=""))
    with pytest.raises(EtcdError, match="user name is empty"):
        anonymous.get("/probe")
    with pytest.raises(EtcdError, match="user name is empty"):
        anonymous.put("/probe", 2)

    wrong = Path(etcd_cluster.base_dir / "wrong.password")
    wrong.write_text("wrong\n")
    with pytest.raises(EtcdError, match="authentication as 'postroom' failed"):
        session_from_config(_settings(etcd_cluster, password_file=str(wrong))).get("/probe")

    with pytest.raises(EtcdError, match="permission denied"):  # outside the role's prefix
        session_from_config(_settings(etcd_cluster, prefix="/elsewhere")).put("/x", 1)

    no_cert = session_from_config(_settings(etcd_cluster, cert="", key=""))
    with pytest.raises(EtcdError, match="TLS handshake failed"):  # etcd requires a client cert
        no_cert.get("/probe")

    stranger_ca = etcd_cluster.base_dir / "stranger-ca.crt"
    stranger_ca.write_bytes(ca.create_ca("stranger")[0])
    with pytest.raises(EtcdError, match=r"TLS handshake failed: \[SSL: CERTIFICATE_VERIFY_FAILED\]"):
        session_from_config(_settings(etcd_cluster, ca_cert=str(stranger_ca))).get("/probe")

    # The raw gateway without a token: refused, nothing written.
    status, body = etcd_cluster.request(
        0, "/v3/kv/put", {"key": "L3Bvc3Ryb29tL3Byb2Jl", "value": "Mg=="})  # /postroom/probe
    assert status in (401, 403) and "error" in body
    assert good.get("/probe").value == 1


# -- init / join through the harness --------------------------------------


@pytest.fixture(scope="module")
def harness(etcd_cluster: EtcdCluster, tmp_path_factory) -> Iterator[ClusterHarness]:
    """Configured, initialised and joined; nodes not started yet."""
    h = ClusterHarness(tmp_path_factory.mktemp("harness"), etcd=etcd_cluster)
    h.setup()
    try:
        yield h
    finally:
        h.close()


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_init_and_join_give_every_node_a_certificate(harness: ClusterHarness) -> None:
    session = harness.session
    meta = session.get("/cluster/meta").value
    assert meta["id"] == harness.cluster_id and meta["shards"] == 8
    ca_cert = x509.load_pem_x509_certificate(session.get("/cluster/ca").value["cert"].encode())
    for i, node in enumerate(harness.nodes):
        cert_dir = node.data_dir / "cluster"
        cert = x509.load_pem_x509_certificate((cert_dir / "node.crt").read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        assert _cn(cert) == node.name == f"n{i + 1}"
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == [f"127.0.0.{i + 2}"]
    for address in USERS:
        assert session.get(f"/accounts/{address}") is not None
    assert _mtls_peer(harness.nodes[0].data_dir / "cluster",
                      harness.nodes[1].data_dir / "cluster") == ("n2", "n1")


def _mtls_peer(server_dir: Path, client_dir: Path) -> tuple[str, str]:
    """One real mTLS handshake with two joined nodes' files: (client CN seen by
    the server, server CN seen by the client)."""
    listener = socket.create_server(("127.0.0.2", 0))
    seen: list[str] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with ca.server_context(server_dir).wrap_socket(conn, server_side=True) as tls:
            seen.append(ca.peer_name(tls))
            tls.recv(1)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        with ca.client_context(client_dir).wrap_socket(raw) as tls:
            server = ca.peer_name(tls)
            tls.sendall(b"x")
    finally:
        thread.join(10)
        listener.close()
    return seen[0], server


def test_three_nodes_start_in_cluster_mode(harness: ClusterHarness) -> None:
    harness.start()
    for node in harness.nodes:
        assert node.running
    members = harness.wait_until(lambda: len(harness.members()) == 3 and harness.members(),
                                 what="three members in etcd")
    for node in harness.nodes:
        record = members[node.name]
        assert record["labels"]["host"] == f"h{node.index + 1}"
        assert record["rpc"] == node.rpc_address
        assert record["pid"] == node.pid
    harness.wait_until(harness.all_shards_led, what="a primary for every shard")

