"""The cluster test harness itself (tests/support/cluster.py): `cluster init` /
`join` through the CLI give every node a certificate from the cluster CA
that works for mTLS, three nodes start in cluster mode over a 3-member etcd
with TLS + auth, and the harness freezes, kills, restarts and adds nodes.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from cluster import ca
from tests.support.cluster import ClusterHarness
from tests.support.etcd_cluster import EtcdCluster
from tests.support.node import USERS

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



def test_harness_freezes_kills_restarts_and_adds_nodes(harness: ClusterHarness) -> None:
    harness.start()  # no-op when the previous test left every node running
    n1, n3 = harness.node(0), harness.node(2)
    lease = harness.members()["n3"]["lease"]
    n3.stop()  # SIGSTOP: its lease is not refreshed, its member key expires
    harness.wait_until(lambda: "n3" not in harness.members(), what="frozen n3's key to expire")
    n3.cont()
    harness.wait_until(lambda: harness.members().get("n3", {}).get("lease") not in (None, lease),
                       what="n3 registered again under a new lease")

    pid = n1.pid
    n1.kill()
    assert not n1.running
    harness.wait_until(lambda: "n1" not in harness.members() and harness.all_shards_led(),
                       what="n1 gone and every shard led by a live member")
    n1.restart()
    assert n1.pid not in (None, pid)
    harness.wait_until(lambda: harness.members().get("n1", {}).get("pid") == n1.pid,
                       what="restarted n1 registered")

    n4 = harness.add_node()
    assert (n4.name, n4.host) == ("n4", "127.0.0.5")
    record = harness.wait_until(lambda: harness.members().get("n4"), what="n4 registered")
    assert record["labels"] == {"host": "h4", "zone": "z4"}
