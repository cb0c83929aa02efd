"""cluster/ca.py: the cluster CA, node certificates, their files, and real mTLS handshakes.

Handshakes run through memory BIOs (real OpenSSL TLS 1.3, no sockets or
threads needed), between contexts built from files written by write_node_files.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cluster import ca


@pytest.fixture(scope="module")
def cluster_ca() -> tuple[bytes, bytes]:
    return ca.create_ca("c0ffee")


def _node_dir(base: Path, cluster_ca: tuple[bytes, bytes], name: str) -> Path:
    cert, key = ca.issue_node_cert(*cluster_ca, name, ["127.0.0.2"])
    ca.write_node_files(base / name, cluster_ca[0], cert, key)
    return base / name


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple:
    """Run a TLS handshake between two contexts; returns (server, client) SSLObjects."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    done = {server: False, client: False}
    for _ in range(20):
        for obj in (client, server):
            if not done[obj]:
                try:
                    obj.do_handshake()
                    done[obj] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the client finishes first; the server's verdict on the
            # client certificate reaches the client with its first read.
            client.write(b"ping")
            s_in.write(c_out.read())
            assert server.read(4) == b"ping"
            return server, client
    raise AssertionError("handshake did not finish")


def test_ca_certificate(cluster_ca):
    cert_pem, key_pem = cluster_ca
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "postroom cluster c0ffee"
    )
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # self-signed
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= datetime.timedelta(days=3650)
    assert b"PRIVATE KEY" in key_pem


def test_two_cas_differ():
    first, second = ca.create_ca("x"), ca.create_ca("x")
    assert first[0] != second[0] and first[1] != second[1]


def test_node_certificate(cluster_ca):
    cert_pem, key_pem = ca.issue_node_cert(
        *cluster_ca, "node-b", ["127.0.0.3", "::1", "[fe80::1]", "mail-b.example.net", "node-b"]
    )
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca_cert = x509.load_pem_x509_certificate(cluster_ca[0])
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-b"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-b", "mail-b.example.net"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.3"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("fe80::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key().curve.name == "secp256r1"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=5 * 365) <= lifetime < datetime.timedelta(days=5 * 366)
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc
    assert b"PRIVATE KEY" in key_pem


def test_node_certificate_needs_a_name(cluster_ca):
    with pytest.raises(ValueError):
        ca.issue_node_cert(*cluster_ca, "", [])


def test_write_node_files_modes_and_contents(tmp_path, cluster_ca):
    cert, key = ca.issue_node_cert(*cluster_ca, "n1", ["127.0.0.2"])
    cert_dir = tmp_path / "certs" / "n1"
    ca.write_node_files(cert_dir, cluster_ca[0], cert, key)
    ca_path, cert_path, key_path = ca.node_files(cert_dir)
    assert (ca_path.name, cert_path.name, key_path.name) == ("ca.crt", "node.crt", "node.key")
    assert ca_path.read_bytes() == cluster_ca[0]
    assert cert_path.read_bytes() == cert and key_path.read_bytes() == key
    assert stat.S_IMODE(os.stat(cert_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    # Rewriting replaces the files whole and leaves no temporary files behind.
    cert2, key2 = ca.issue_node_cert(*cluster_ca, "n1", ["127.0.0.2"])
    ca.write_node_files(cert_dir, cluster_ca[0], cert2, key2)
    assert key_path.read_bytes() == key2 and cert_path.read_bytes() == cert2
    assert sorted(p.name for p in cert_dir.iterdir()) == ["ca.crt", "node.crt", "node.key"]
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600


def test_contexts_are_strict(tmp_path, cluster_ca):
    node = _node_dir(tmp_path, cluster_ca, "n1")
    server, client = ca.server_context(node), ca.client_context(node)
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        # The cluster CA only: no system roots were loaded.
        assert [c["subject"] for c in ctx.get_ca_certs()] == [
            ((("commonName", "postroom cluster c0ffee"),),)
        ]
    assert client.check_hostname is False


def test_mutual_handshake_names_both_peers(tmp_path, cluster_ca):
    alpha = _node_dir(tmp_path, cluster_ca, "alpha")
    beta = _node_dir(tmp_path, cluster_ca, "beta")
    server, client = _handshake(ca.server_context(alpha), ca.client_context(beta))
    assert ca.peer_name(server) == "beta"
    assert ca.peer_name(client) == "alpha"
    assert server.version() == "TLSv1.3"


def test_server_refuses_a_client_from_another_ca(tmp_path, cluster_ca):
    alpha = _node_dir(tmp_path, cluster_ca, "alpha")
    mallory = _node_dir(tmp_path / "other", ca.create_ca("other"), "mallory")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=str(ca.node_files(alpha)[0]))  # trusts our CA
    client.load_cert_chain(*map(str, ca.node_files(mallory)[1:]))  # but is not one of us
    with pytest.raises(ssl.SSLError, match="certificate"):
        _handshake(ca.server_context(alpha), client)


def test_server_refuses_a_client_without_certificate(tmp_path, cluster_ca):
    alpha = _node_dir(tmp_path, cluster_ca, "alpha")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=str(ca.node_files(alpha)[0]))
    with pytest.raises(ssl.SSLError, match="certificate"):
        _handshake(ca.server_context(alpha), client)


def test_client_refuses_a_server_from_another_ca(tmp_path, cluster_ca):
    beta = _node_dir(tmp_path, cluster_ca, "beta")
    mallory = _node_dir(tmp_path / "other", ca.create_ca("other"), "mallory")
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        _handshake(ca.server_context(mallory), ca.client_context(beta))


def test_peer_name_without_certificate_raises(tmp_path, cluster_ca):
    alpha = _node_dir(tmp_path, cluster_ca, "alpha")
    server_ctx = ca.server_context(alpha)
    server_ctx.verify_mode = ssl.CERT_NONE  # a server that asks for no client certificate
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=str(ca.node_files(alpha)[0]))
    server, _ = _handshake(server_ctx, client)
    with pytest.raises(ssl.SSLError):
        ca.peer_name(server)
