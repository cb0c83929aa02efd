"""A real 3-member etcd cluster with TLS and authentication, for cluster tests.

Theory of operation
-------------------
``EtcdCluster(base_dir)`` makes its own CA with cryptography, one certificate
per member (server and peer, SAN = the member's IP) and one client
certificate, then starts ``members`` etcd processes on 127.0.0.2, .3, .4
(free ports, https client and peer URLs, client and peer certificates
required) under ``setpriv --pdeathsig KILL``, each tracked by its PID.  Once
every member reports ``/health``, authentication is enabled through the HTTP
gateway, the way an operator would do it with etcdctl:

* user ``root`` with role ``root`` (etcd requires it before ``auth enable``);
* role ``postroom`` with READWRITE on the key prefix (default ``/postroom``),
  user ``postroom`` with that role;
* ``/v3/auth/enable``.

``settings()`` is the ``[etcd]`` section a node needs (endpoints, ca_cert,
cert, key, username, password_file).  ``kill(i)`` / ``start(i)`` crash and
restart one member with its data; ``leader()`` asks the members which of them
leads.  Member certificates carry the CN ``etcd-member``, which is no etcd
user: a request without a token is refused even though the gateway reaches
etcd with the member's own certificate.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.etcd import find_etcd, free_port, terminate

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")
START_DEADLINE = 30.0
USER = "postroom"


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _certificate(subject_cn: str, key: Any, issuer: Any, issuer_key: Any, *, ca: bool,
                 ips: tuple[str, ...] = ()) -> Any:
    """One X.509 certificate; issuer None means self-signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)] if subject_cn else [])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        san = x509.SubjectAlternativeName(sans)
        builder = builder.add_extension(san, critical=not subject_cn)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def make_pki(directory: Path, hosts: tuple[str, ...]) -> dict[str, Path]:
    """ca.crt, member.crt/.key (every host in its SAN), client.crt/.key.

    The client certificate has no CommonName: with --client-cert-auth,
    etcd 3.4's HTTP gateway refuses a client certificate that has one
    ("CommonName of client sending a request against gateway will be
    ignored").
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("postroom test etcd CA", ca_key, None, None, ca=True)
    files = {"ca": directory / "ca.crt"}
    files["ca"].write_bytes(_pem_cert(ca))
    for role, cn, ips in (("member", "etcd-member", hosts), ("client", "", ())):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(cn, key, ca, ca_key, ca=False, ips=ips)
        files[role + "_cert"] = directory / f"{role}.crt"
        files[role + "_key"] = directory / f"{role}.key"
        files[role + "_cert"].write_bytes(_pem_cert(cert))
        files[role + "_key"].write_bytes(_pem_key(key))
        files[role + "_key"].chmod(0o600)
    return files


def _range_end(prefix: bytes) -> bytes:
    buf = bytearray(prefix)
    while buf and buf[-1] == 0xFF:
        buf.pop()
    if not buf:
        return b"\0"
    buf[-1] += 1
    return bytes(buf)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class EtcdMember:
    """One member: its host, ports, data directory and process."""

    def __init__(self, index: int, host: str, base_dir: Path) -> None:
        self.index = index
        self.name = f"m{index + 1}"
        self.host = host
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self.data_dir = base_dir / self.name
        self.log_path = base_dir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"https://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class EtcdCluster:
    """``members`` real etcd processes with TLS (and, by default, auth)."""

    def __init__(self, base_dir: Path, members: int = 3, tls: bool = True, auth: bool = True,
                 prefix: str = "/postroom", token_ttl: int = 0) -> None:
        if not tls:
            raise ValueError("EtcdCluster runs etcd over TLS only (use EtcdServer for plain)")
        binary = find_etcd()
        if binary is None:
            raise RuntimeError("etcd binary not found (install the Debian package etcd-server)")
        self.binary = binary
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.prefix = prefix
        self.token_ttl = token_ttl  # seconds an idle simple token lives; 0: etcd's 300
        self.members = [EtcdMember(i, HOSTS[i], self.base_dir) for i in range(members)]
        self.pki = make_pki(self.base_dir / "pki", tuple(m.host for m in self.members))
        self.password_file = self.base_dir / "postroom.password"
        self.password_file.write_text(secrets.token_urlsafe(18) + "\n")
        self.password_file.chmod(0o600)
        self.root_password = secrets.token_urlsafe(18)
        self._started = False

    # -- configuration ---------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def settings(self) -> dict[str, Any]:
        """The [etcd] section of a node's TOML."""
        out: dict[str, Any] = {
            "endpoints": self.endpoints,
            "prefix": self.prefix,
            "ca_cert": str(self.pki["ca"]),
            "cert": str(self.pki["client_cert"]),
            "key": str(self.pki["client_key"]),
        }
        if self.auth:
            out["username"] = USER
            out["password_file"] = str(self.password_file)
        return out

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def _argv(self, member: EtcdMember, state: str) -> list[str]:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        p = self.pki
        argv = [
            self.binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", "postroom-test",
            # bcrypt's minimum cost for the test users' password hashes: each
            # authentication (every session, node and CLI start) costs etcd
            # ~1 ms of CPU instead of ~60 ms at the default cost 10.
            "--bcrypt-cost", "4",
            "--cert-file", str(p["member_cert"]), "--key-file", str(p["member_key"]),
            "--trusted-ca-file", str(p["ca"]), "--client-cert-auth",
            "--peer-cert-file", str(p["member_cert"]), "--peer-key-file", str(p["member_key"]),
            "--peer-trusted-ca-file", str(p["ca"]), "--peer-client-cert-auth",
        ]  # fmt: skip
        if self.token_ttl:
            argv += ["--auth-token-ttl", str(self.token_ttl)]
        setpriv = shutil.which("setpriv")
        return [setpriv, "--pdeathsig", "KILL", *argv] if setpriv else argv

    def _spawn(self, member: EtcdMember, state: str) -> None:
        with open(member.log_path, "ab") as log:
            member.proc = subprocess.Popen(
                self._argv(member, state),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    # -- HTTP to one member ----------------------------------------------

    def _ssl_context(self, client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki["ca"]))
        if client_cert:
            ctx.load_cert_chain(str(self.pki["client_cert"]), str(self.pki["client_key"]))
        return ctx

    def request(self, i: int, path: str, body: dict | None = None, token: str = "",
                timeout: float = 5.0) -> tuple[int, dict]:
        """POST (or GET when body is None) to member i; (HTTP status, JSON body)."""
        url = self.members[i].client_url + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", token)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl_context()) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw or b"{}")
            except ValueError:
                return exc.code, {"error": raw.decode("utf-8", "replace")}

    def _admin(self, path: str, body: dict, token: str = "") -> dict:
        status, answer = self.request(0, path, body, token)
        if status != 200:
            raise RuntimeError(f"etcd {path} failed: HTTP {status} {answer}")
        return answer

    def token(self, user: str, password: str, i: int = 0) -> str:
        status, answer = self.request(i, "/v3/auth/authenticate",
                                      {"name": user, "password": password})
        if status != 200:
            raise RuntimeError(f"authenticate {user} failed: HTTP {status} {answer}")
        return answer["token"]

    def root_token(self) -> str:
        return self.token("root", self.root_password)

    # -- lifecycle -------------------------------------------------------

    def start(self, i: int | None = None) -> None:
        """Start every member (i None), or restart killed member i with its data.

        The first start also enables authentication; every start waits for
        /health.
        """
        if i is not None:
            self.start_member(i)
            return
        state = "existing" if self._started else "new"
        for member in self.members:
            if member.pid is None:
                self._spawn(member, state)
        deadline = time.monotonic() + START_DEADLINE
        for member in self.members:
            self.wait_healthy(member.index, deadline)
        if not self._started and self.auth:
            self._enable_auth()
        self._started = True

    def _enable_auth(self) -> None:
        full = self.prefix.rstrip("/").encode() + b"/"
        self._admin("/v3/auth/role/add", {"name": "root"})
        self._admin("/v3/auth/user/add", {"name": "root", "password": self.root_password})
        self._admin("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self._admin("/v3/auth/role/add", {"name": USER})
        perm = {"permType": "READWRITE", "key": _b64(full), "range_end": _b64(_range_end(full))}
        self._admin("/v3/auth/role/grant", {"name": USER, "perm": perm})
        self._admin("/v3/auth/user/add", {"name": USER, "password": self.password})
        self._admin("/v3/auth/user/grant", {"user": USER, "role": USER})
        self._admin("/v3/auth/enable", {})

    def wait_healthy(self, i: int, deadline: float) -> None:
        """Poll member i until it answers a linearizable read (or raise at deadline)."""
        member = self.members[i]
        last = "no answer"
        while time.monotonic() < deadline:
            if member.proc is not None and member.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd {member.name} exited with {member.proc.returncode}: {self._tail(member)}"
                )
            try:
                status, body = self.request(i, "/health", timeout=1.0)
                if status == 200 and body.get("health") == "true":
                    return
                last = f"HTTP {status} {body}"
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.05)  # poll interval only; /health decides
        raise TimeoutError(f"etcd {member.name} not healthy before deadline: {last}")

    def _tail(self, member: EtcdMember, lines: int = 15) -> str:
        try:
            return "\n".join(member.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def leader(self) -> int:
        """Index of the member that leads now (asks each live member)."""
        ids: dict[int, int] = {}
        leader_id = 0
        for member in self.members:
            if member.pid is None:
                continue
            try:
                status, body = self.request(member.index, "/v3/maintenance/status", {})
            except OSError:
                continue
            if status == 200:
                ids[int(body["header"]["member_id"])] = member.index
                leader_id = leader_id or int(body.get("leader", 0))
        if leader_id not in ids:
            raise RuntimeError("no live member knows a leader")
        return ids[leader_id]

    def kill(self, i: int) -> None:
        """SIGKILL member i (a crash) and reap it."""
        member = self.members[i]
        proc, member.proc = member.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def start_member(self, i: int, timeout: float = START_DEADLINE) -> None:
        """Restart a killed member with its data; wait until it is healthy."""
        member = self.members[i]
        if member.pid is None:
            self._spawn(member, "existing")
        self.wait_healthy(i, time.monotonic() + timeout)

    def stop_all(self, timeout: float = 5.0) -> None:
        """SIGTERM every member, the leader first (so it can hand leadership to
        a live follower instead of trying for 7 s); SIGKILL after timeout."""
        try:
            order = [self.leader()]
        except (RuntimeError, OSError, KeyError, ValueError):
            order = []
        order += [m.index for m in self.members if m.index not in order]
        for i in order:
            member = self.members[i]
            proc, member.proc = member.proc, None
            terminate(proc, timeout)

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
