"""A test CA and small TLS servers on loopback, for MTA-STS and DANE tests.

``TestCA`` makes a root (and optionally an intermediate) with cryptography
and issues server certificates with subjectAltName DNS names.  ``HttpsServer``
serves ``/.well-known/mta-sts.txt`` (RFC 8461 §3.3) over real TLS in a
background thread; what it answers (status, media type, body, redirects) is
set per request path so tests can script the bad cases too.  ``TlsServer``
accepts connections, completes the handshake and holds them, so a client
test can inspect the peer certificate (DANE matching).

    ca = TestCA()
    with HttpsServer(ca, ["mta-sts.example.net"]) as web:
        web.set_policy("version: STSv1\\nmode: enforce\\nmx: mx.example.net\\nmax_age: 86400\\n")
        ...  # connect to 127.0.0.1:web.port with SNI mta-sts.example.net
"""

from __future__ import annotations

import datetime
import http.server
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

POLICY_PATH = "/.well-known/mta-sts.txt"


@dataclass
class Issued:
    """A certificate and its key, in PEM and DER, plus files for ssl.load_cert_chain."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain_pem: bytes  # leaf first, then intermediates
    cert_file: str
    key_file: str

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def spki_der(self) -> bytes:
        return self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class TestCA:
    """A root CA, an intermediate CA, and leaf certificates signed by either."""

    __test__ = False  # not a pytest class

    def __init__(self, name: str = "postroom test root") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="postroom-ca-"))
        now = datetime.datetime.now(datetime.UTC)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.root_key.public_key()), critical=False)
            .sign(self.root_key, hashes.SHA256())
        )
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = (
            x509.CertificateBuilder()
            .subject_name(_name(name + " intermediate"))
            .issuer_name(self.root.subject)
            .public_key(self.inter_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.inter_key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.root_key.public_key()), critical=False
            )
            .sign(self.root_key, hashes.SHA256())
        )
        self.cafile = str(self.dir / "ca.pem")
        Path(self.cafile).write_bytes(self.root.public_bytes(serialization.Encoding.PEM))

    @property
    def root_der(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.DER)

    @property
    def intermediate_der(self) -> bytes:
        return self.intermediate.public_bytes(serialization.Encoding.DER)

    def issue(self, names: list[str], *, via_intermediate: bool = False, self_signed: bool = False,
              valid_days: int = 10) -> Issued:
        """A server certificate for ``names`` (SAN DNS names; CN = first name)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        if self_signed:
            issuer_name, issuer_key, extra = _name(names[0]), key, []
        elif via_intermediate:
            issuer_name, issuer_key, extra = self.intermediate.subject, self.inter_key, [self.intermediate]
        else:
            issuer_name, issuer_key, extra = self.root.subject, self.root_key, []
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        if not self_signed:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
        cert = builder.sign(issuer_key, hashes.SHA256())
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [cert, *extra])
        stem = self.dir / f"{names[0]}-{x509.random_serial_number()}"
        cert_file, key_file = f"{stem}.crt", f"{stem}.key"
        Path(cert_file).write_bytes(chain_pem)
        Path(key_file).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return Issued(cert, key, chain_pem, cert_file, key_file)


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )


def _server_context(issued: Issued) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(issued.cert_file, issued.key_file)
    return ctx


@dataclass
class Reply:
    status: int = 200
    content_type: str = "text/plain"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


class HttpsServer:
    """HTTPS on 127.0.0.1 with a certificate from ``ca`` for ``names``."""

    def __init__(self, ca: TestCA, names: list[str], *, issued: Issued | None = None) -> None:
        self.ca = ca
        self.issued = issued or ca.issue(names)
        self.replies: dict[str, Reply] = {}
        self.requests: list[tuple[str, str]] = []  # (Host header, path) seen
        self._server: http.server.ThreadingHTTPServer | None = None

    def set_policy(self, text: str | bytes, *, status: int = 200,
                   content_type: str = "text/plain", headers: tuple[tuple[str, str], ...] = ()) -> None:
        body = text.encode() if isinstance(text, str) else text
        self.replies[POLICY_PATH] = Reply(status, content_type, body, headers)

    def start(self) -> HttpsServer:
        owner = self
        ctx = _server_context(self.issued)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                owner.requests.append((self.headers.get("Host", ""), self.path))
                reply = owner.replies.get(self.path, Reply(404, "text/plain", b"not found\n"))
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                for name, value in reply.headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, object]:
                sock, addr = self.socket.accept()
                sock.settimeout(5)
                try:
                    return ctx.wrap_socket(sock, server_side=True), addr
                except (OSError, ssl.SSLError):
                    sock.close()
                    raise

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> HttpsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TlsServer:
    """Accepts TLS connections on 127.0.0.1 and holds them until stopped."""

    def __init__(self, issued: Issued) -> None:
        self.issued = issued
        self._sock: socket.socket | None = None
        self._held: list[socket.socket] = []
        self._stopping = threading.Event()

    def start(self) -> TlsServer:
        ctx = _server_context(self.issued)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]

        def run() -> None:
            assert self._sock is not None
            while not self._stopping.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                conn.settimeout(5)
                try:
                    self._held.append(ctx.wrap_socket(conn, server_side=True))
                except (OSError, ssl.SSLError):
                    conn.close()

        threading.Thread(target=run, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
        for conn in self._held:
            conn.close()

    def __enter__(self) -> TlsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
