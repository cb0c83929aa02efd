"""The cluster CA, node certificates, and the SSL contexts of node-to-node mTLS.

Theory of operation
-------------------
``postroom cluster init`` makes one self-signed ECDSA P-256 CA per cluster
(:func:`create_ca`); its certificate and key live in etcd under ``/cluster/ca``
(protected by etcd authentication).  ``postroom cluster join`` issues each node
a certificate signed by it (:func:`issue_node_cert`): CN = node name, SAN = the
node's DNS names and IP addresses, usable as TLS server *and* client.  A node
keeps three files in its cert directory (:func:`write_node_files`): ``ca.crt``,
``node.crt`` and ``node.key`` (mode 0600, directory 0700).

Every node-to-node connection is mutually authenticated TLS 1.3 that trusts
the cluster CA only (never the system store).  A peer is identified by the CN
of its verified certificate (:func:`peer_name`), not by its address, so
clients do not check host names: any certificate from the cluster CA is a
cluster node.

``cryptography`` is imported inside the functions that need it, so importing
this module (for the SSL contexts) stays cheap.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

CA_YEARS = 10
NODE_YEARS = 5
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "node.crt", "node.key"


def create_ca(cluster_id: str) -> tuple[bytes, bytes]:
    """A new self-signed cluster CA -> (certificate PEM, private key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"postroom cluster {cluster_id}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def issue_node_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, name: str, addresses: list[str]
) -> tuple[bytes, bytes]:
    """A node certificate signed by the CA -> (certificate PEM, private key PEM).

    CN is ``name``; the SAN holds ``name`` as a DNS name plus every entry of
    ``addresses`` (IP literals such as "127.0.0.2" or "::1", or host names).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not name:
        raise ValueError("a node certificate needs a name")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + datetime.timedelta(days=365 * NODE_YEARS), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_san_entries(name, addresses)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return _cert_pem(cert), _key_pem(key)


def node_files(cert_dir: Path | str) -> tuple[Path, Path, Path]:
    """(ca.crt, node.crt, node.key) paths inside ``cert_dir``."""
    d = Path(cert_dir)
    return d / CA_FILE, d / CERT_FILE, d / KEY_FILE


def write_node_files(cert_dir: Path | str, ca_cert: bytes, cert: bytes, key: bytes) -> None:
    """Write the three files atomically; the key 0600, the directory 0700."""
    d = Path(cert_dir)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ca_path, cert_path, key_path = node_files(d)
    _atomic_write(key_path, key, 0o600)
    _atomic_write(cert_path, cert, 0o644)
    _atomic_write(ca_path, ca_cert, 0o644)


def server_context(cert_dir: Path | str) -> ssl.SSLContext:
    """TLS 1.3 server side: presents the node cert, requires a cluster client cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, cert_dir)
    ctx.num_tickets = 0  # no session resumption between nodes
    return ctx


def client_context(cert_dir: Path | str) -> ssl.SSLContext:
    """TLS 1.3 client side: presents the node cert, trusts only the cluster CA.

    Host names are not checked: a peer is whoever its CA-signed certificate's
    CN says (:func:`peer_name`).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    _configure(ctx, cert_dir)
    return ctx


def peer_name(sslsock: Any) -> str:
    """The CN of the verified peer certificate; ssl.SSLError if there is none."""
    cert = sslsock.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    raise ssl.SSLError("peer presented no certificate with a common name")


def _configure(ctx: ssl.SSLContext, cert_dir: Path | str) -> None:
    ca_path, cert_path, key_path = node_files(cert_dir)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_path))  # the cluster CA only
    ctx.load_cert_chain(str(cert_path), str(key_path))


def _san_entries(name: str, addresses: list[str]) -> list[Any]:
    from cryptography import x509

    entries: list[Any] = []
    seen: set[str] = set()
    for item in [name, *addresses]:
        item = item.strip().strip("[]")
        if not item or item in seen:
            continue
        seen.add(item)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(item)))
        except ValueError:
            entries.append(x509.DNSName(item))
    return entries


def _key_usage(cert_sign: bool) -> Any:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _cert_pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write to a temporary file in the same directory, fsync, rename over."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
