"""Server TLS: the SSLContext every listener shares, self-signed at first start.

TLS 1.2 is the minimum (config tls.min_version may raise it to 1.3).  When no
certificate is configured, one is generated with `cryptography` under
data_dir/tls on first start and reused afterwards, so clients that pinned it
keep working across restarts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from node.config import Config


class TlsError(Exception):
    """A certificate or key that cannot be used; the message says which file."""


def self_signed_paths(data_dir: Path) -> tuple[Path, Path]:
    return data_dir / "tls" / "cert.pem", data_dir / "tls" / "key.pem"


def ensure_self_signed(data_dir: Path, hostname: str) -> tuple[Path, Path]:
    """Create (once) an ECDSA P-256 self-signed certificate for hostname."""
    cert_path, key_path = self_signed_paths(data_dir)
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    # Imported only when a certificate is made: an idle node does not keep
    # cryptography's x509 modules in memory.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(key_path, key_pem)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def certificate_paths(config: Config) -> tuple[Path, Path]:
    if config.tls.cert:
        return Path(config.tls.cert), Path(config.tls.key)
    return ensure_self_signed(config.data_dir, config.hostname)


def server_context(config: Config) -> ssl.SSLContext:
    """The listeners' SSLContext; raises TlsError for unusable files."""
    cert, key = certificate_paths(config)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if config.tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
    return ctx


def starttls(sock: socket.socket, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    """Upgrade an accepted plaintext socket (STARTTLS/STLS) and handshake.

    The caller must already have dropped any plaintext it buffered after the
    STARTTLS command (RFC 3207 §4.2, RFC 2595 §3.1).  Raises OSError or
    ssl.SSLError when the handshake fails; the caller closes the connection.
    """
    sock.settimeout(timeout)
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    tls.do_handshake()
    return tls


def describe(sock: socket.socket) -> str | None:
    """'TLSv1.3 TLS_AES_256_GCM_SHA384' for a TLS socket (for Received headers), else None."""
    if isinstance(sock, ssl.SSLSocket):
        cipher = sock.cipher()
        if cipher:
            return f"{cipher[1]} {cipher[0]}"
    return None
