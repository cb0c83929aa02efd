"""One TOML file into typed settings.

Every setting has a safe default and is documented in docs/configuration.md.
Unknown sections and keys are rejected with their dotted name, so a typo never
silently falls back to a default.  Each section is a frozen dataclass; a
protocol package that needs a new limit adds a field to its own section here
and a line to docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class NodeSettings:
    hostname: str = ""  # empty: the machine's FQDN
    data_dir: str = "/var/lib/postroom"
    log_level: str = "info"  # debug | info | warning | error
    # Loopback addresses may use LOGIN/AUTHENTICATE/USER/PASS without TLS.
    allow_plaintext_auth_on_loopback: bool = False


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: list[str] = field(default_factory=list)  # empty: start an embedded etcd
    prefix: str = "/postroom"
    lease_ttl: int = 5  # seconds; the session lease is the liveness signal (and RTO's floor)
    timeout: float = 5.0  # seconds per request before rotating to the next endpoint
    # Embedded etcd (used only when endpoints is empty).
    embedded_binary: str = ""  # empty: search PATH and /usr/bin for "etcd"
    embedded_client_url: str = "http://127.0.0.1:2379"
    embedded_peer_url: str = "http://127.0.0.1:2380"
    # Multi-node mode: etcd over TLS with authentication (docs/cluster.md).
    ca_cert: str = ""  # PEM CA that signed the etcd members' certificates (https endpoints)
    cert: str = ""  # client certificate for etcd (optional with username/password)
    key: str = ""  # its private key
    username: str = ""  # etcd user (etcd auth enabled); empty: no authentication
    password_file: str = ""  # file holding that user's password


@dataclass(frozen=True)
class StorageSettings:
    shards: int = 16  # mailbox shards; fixed when the store is first created
    fsync: bool = True  # never turn off outside throwaway tests
    group_commit_max: int = 256  # operations per SQLite transaction at most
    # Queued bodies up to this many octets travel in the enqueue op and live in
    # the queue row (one flush per accepted message); larger ones are blob files.
    queue_inline_max: int = 256 * 1024
    # Space reclaiming (storage/reclaim.py, docs/storage.md "Reclaiming space").
    log_keep_ops: int = 100_000  # newest ops every shard's log keeps at least
    compact_interval: float = 600.0  # seconds between log compactions; 0: never
    blob_gc_interval: float = 3600.0  # seconds between blob sweeps; 0: never
    blob_gc_grace: float = 3600.0  # an unreferenced blob younger than this is kept
    blob_gc_settle: float = 60.0  # seconds trashed blobs wait before the re-check


@dataclass(frozen=True)
class TlsSettings:
    cert: str = ""  # PEM chain; empty: a self-signed certificate under data_dir/tls
    key: str = ""
    min_version: str = "1.2"  # "1.2" or "1.3"


@dataclass(frozen=True)
class SmtpSettings:
    listen: list[str] = field(default_factory=lambda: ["0.0.0.0:25", "[::]:25"])
    max_message_size: int = 50 * 1024 * 1024  # bytes; SIZE (RFC 1870), 552 5.3.4
    max_recipients: int = 100  # per transaction; 452 4.5.3 (RFC 5321 §4.5.3.1.8)
    max_line_length: int = 1000  # octets incl. CRLF, text lines (RFC 5321 §4.5.3.1.6)
    max_command_length: int = 512  # octets incl. CRLF (RFC 5321 §4.5.3.1.4)
    max_errors: int = 10  # protocol errors per session before 421 and close
    timeout: int = 300  # seconds of client silence before 421 (RFC 5321 §4.5.3.2.7)
    max_connections_per_ip: int = 20  # 421 4.7.0 beyond this
    # Local domain whose postmaster gets RCPT TO:<postmaster> (RFC 5321 §4.5.1);
    # empty: the hostname or its nearest parent that is a local domain.
    postmaster_domain: str = ""


@dataclass(frozen=True)
class SubmissionSettings:
    # Port 587: STARTTLS required before AUTH (RFC 6409, RFC 8314 §3.3).
    listen: list[str] = field(default_factory=lambda: ["0.0.0.0:587", "[::]:587"])
    # Port 465: implicit TLS (RFC 8314 §3.3).
    listen_tls: list[str] = field(default_factory=lambda: ["0.0.0.0:465", "[::]:465"])
    max_message_size: int = 50 * 1024 * 1024  # bytes; 552 5.3.4
    max_recipients: int = 100  # per transaction; 452 4.5.3
    max_auth_failures: int = 3  # per session, then 421 4.7.0 and close
    auth_failure_delay: float = 1.0  # seconds before each 535 (slows guessing)
    max_connections_per_ip: int = 20
    timeout: int = 300  # seconds of client silence before 421 4.4.2
    # Accounts allowed to send as any address of their domains (e.g. a web app).
    any_sender_accounts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OutboundSettings:
    port: int = 25  # destination port for MX delivery (tests use another)
    # DNS resolvers "IP" or "IP:PORT"; empty: /etc/resolv.conf.
    resolvers: list[str] = field(default_factory=list)
    # Trust the AD bit of these resolvers for DANE (RFC 7672 §1.3): only set
    # this for a validating resolver on a trusted path (e.g. 127.0.0.1).
    dnssec_trusted: bool = False
    dns_timeout: float = 5.0  # seconds per DNS query
    relay_host: str = ""  # global smart host "HOST:PORT"; empty: MX routing
    relay_by_domain: dict[str, str] = field(default_factory=dict)  # domain -> "HOST:PORT"
    # Seconds between consecutive attempts: the n-th retry waits
    # retry_intervals[n] (the last one repeats) with +-10% jitter.
    retry_intervals: list[int] = field(
        default_factory=lambda: [60, 300, 900, 1800, 3600, 7200, 14400]
    )
    delay_dsn_after: int = 4 * 3600  # seconds before a delay DSN (RFC 3464)
    max_lifetime: int = 5 * 86400  # seconds before giving up: failure DSN
    max_connections: int = 100  # concurrent outbound SMTP connections in all
    max_connections_per_domain: int = 10  # concurrent connections per destination
    messages_per_connection: int = 100  # connection reuse limit
    connect_timeout: float = 30.0  # seconds
    # RFC 5321 §4.5.3.2 timeouts, seconds.
    greeting_timeout: float = 300.0
    command_timeout: float = 300.0  # MAIL, RCPT
    data_init_timeout: float = 120.0
    data_block_timeout: float = 180.0
    data_end_timeout: float = 600.0
    tls: str = "opportunistic"  # "opportunistic" | "required" (all destinations)
    mta_sts: bool = True  # RFC 8461
    mta_sts_cafile: str = ""  # CA bundle for policy fetches; empty: system CAs
    mta_sts_port: int = 443  # HTTPS port of mta-sts.<domain> (tests use another)
    dane: bool = True  # RFC 7672, only with dnssec_trusted resolvers


@dataclass(frozen=True)
class DkimSettings:
    sign: bool = True  # sign outgoing mail of local domains with their keys
    # Use cryptography for the RSA step (same output, ~6x faster than dkimpy's
    # pure-Python RSA); canonicalization and hashing stay dkimpy's.
    fast_rsa: bool = True
    headers: list[str] = field(
        default_factory=lambda: [
            "from", "to", "cc", "subject", "date", "message-id", "reply-to",
            "in-reply-to", "references", "mime-version", "content-type",
            "content-transfer-encoding", "list-id", "list-unsubscribe",
        ]
    )


@dataclass(frozen=True)
class ImapSettings:
    listen: list[str] = field(default_factory=lambda: ["0.0.0.0:143", "[::]:143"])
    listen_tls: list[str] = field(default_factory=lambda: ["0.0.0.0:993", "[::]:993"])
    max_line_length: int = 65536  # octets of one command line outside literals
    max_literal_size: int = 50 * 1024 * 1024  # octets; beyond: BYE and close
    idle_timeout: int = 1800  # seconds (RFC 9051 §5.4: at least 30 minutes)
    max_connections_per_ip: int = 50


@dataclass(frozen=True)
class Pop3Settings:
    listen: list[str] = field(default_factory=lambda: ["0.0.0.0:110", "[::]:110"])
    listen_tls: list[str] = field(default_factory=lambda: ["0.0.0.0:995", "[::]:995"])
    max_line_length: int = 512  # octets incl. CRLF (RFC 2449 §4: 255 + slack)
    timeout: int = 600  # seconds (RFC 1939 §3: at least 10 minutes)
    max_connections_per_ip: int = 20
    max_auth_failures: int = 3  # failed logins per session, then -ERR [AUTH] and close
    auth_failure_delay: float = 1.0  # seconds before each -ERR [AUTH] (against guessing)
    max_bad_commands: int = 20  # unknown/invalid commands per session, then close


@dataclass(frozen=True)
class ClusterSettings:
    enabled: bool = False  # false: one node, every shard led here, nothing replicated
    name: str = ""  # this node's member name; empty: the node-id file in data_dir
    listen: str = "127.0.0.1:7400"  # node-to-node mTLS RPC address
    advertise: str = ""  # address other nodes dial; empty: listen
    cert_dir: str = ""  # ca.crt, node.crt, node.key from `postroom cluster join`; empty: data_dir/cluster
    labels: dict[str, str] = field(default_factory=dict)  # failure domain, e.g. host, zone
    replication_factor: int = 3  # copies of each shard (fewer while fewer nodes exist)
    ack_timeout: float = 2.0  # seconds a follower may take to fsync a batch, then it leaves the ISR
    rpc_timeout: float = 10.0  # seconds per node-to-node call
    settle: float = 5.0  # seconds a call or login refused "not the leader" is re-routed
    positions_interval: float = 2.0  # seconds between /positions/<node> writes (status, drills)
    catchup_batch: int = 1000  # operations per catch-up message


@dataclass(frozen=True)
class BackupSettings:
    enabled: bool = False  # continuous backup of every shard this node leads (docs/backup.md)
    target: str = ""  # "s3://BUCKET/PREFIX" or "file:///PATH" (a mounted disk); same code path
    endpoint_url: str = ""  # S3-compatible endpoint, e.g. "https://s3.example.net"; empty: AWS
    region: str = "us-east-1"
    path_style: bool = False  # path-style addressing (most non-AWS servers want true)
    access_key_id: str = ""  # empty: the environment / instance credentials (boto3's chain)
    secret_access_key_file: str = ""  # file holding the secret key
    ca_bundle: str = ""  # PEM bundle to verify the endpoint; empty: system CAs
    key_file: str = ""  # 32-byte AES-256-GCM key (`postroom backup keygen`); required
    segment_interval: float = 60.0  # seconds between log segment uploads: the backup RPO
    snapshot_interval: float = 21600.0  # seconds between shard database snapshots
    retention_days: int = 30  # point-in-time history kept; older snapshots/segments pruned
    upload_concurrency: int = 8  # parallel object uploads per node


@dataclass(frozen=True)
class Config:
    node: NodeSettings = field(default_factory=NodeSettings)
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    imap: ImapSettings = field(default_factory=ImapSettings)
    pop3: Pop3Settings = field(default_factory=Pop3Settings)
    submission: SubmissionSettings = field(default_factory=SubmissionSettings)
    outbound: OutboundSettings = field(default_factory=OutboundSettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    backup: BackupSettings = field(default_factory=BackupSettings)

    @property
    def hostname(self) -> str:
        return self.node.hostname or socket.getfqdn()

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir)


def _check_value(name: str, annotation: Any, value: Any) -> Any:
    """Validate one value against its field type (bool/int/float/str/list[str])."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list")
        return [_check_value(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict) or key_type is not str:
            raise ConfigError(f"{name}: expected a table")
        return {k: _check_value(f"{name}.{k}", value_type, v) for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(f"{name}: unsupported type")  # no optional fields exist
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name}: expected a non-negative integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{name}: expected a non-negative number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string")
        return value
    raise ConfigError(f"{name}: unsupported type")


def _build_section(cls: type, name: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown configuration key: {name}.{key}")
        values[key] = _check_value(f"{name}.{key}", hints[key], value)
    return cls(**values)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from parsed TOML; raises ConfigError naming a bad key."""
    hints = typing.get_type_hints(Config)
    sections = {}
    for name, value in raw.items():
        if name not in hints:
            raise ConfigError(f"unknown configuration section: {name}")
        sections[name] = _build_section(hints[name], name, value)
    config = Config(**sections)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    if config.node.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("node.log_level: expected debug, info, warning or error")
    if config.tls.min_version not in ("1.2", "1.3"):
        raise ConfigError('tls.min_version: expected "1.2" or "1.3"')
    if bool(config.tls.cert) != bool(config.tls.key):
        raise ConfigError("tls.cert and tls.key: set both or neither")
    if not 1 <= config.storage.shards <= 4096:
        raise ConfigError("storage.shards: expected 1..4096")
    if config.outbound.tls not in ("opportunistic", "required"):
        raise ConfigError('outbound.tls: expected "opportunistic" or "required"')
    if config.cluster.enabled:
        parse_listen_address(config.cluster.listen, "cluster.listen")
        if config.cluster.advertise:
            parse_listen_address(config.cluster.advertise, "cluster.advertise")
        if not 1 <= config.cluster.replication_factor <= 9:
            raise ConfigError("cluster.replication_factor: expected 1..9")
        if not 0 <= config.cluster.settle <= 300:
            raise ConfigError("cluster.settle: expected 0..300 seconds")
        if not 0.1 <= config.cluster.positions_interval <= 60:
            raise ConfigError("cluster.positions_interval: expected 0.1..60 seconds")
    if config.backup.enabled and not (config.backup.target and config.backup.key_file):
        raise ConfigError("backup.enabled needs backup.target and backup.key_file")
    if config.backup.target and not config.backup.target.startswith(("s3://", "file://")):
        raise ConfigError('backup.target: expected "s3://BUCKET/PREFIX" or "file:///PATH"')
    if bool(config.etcd.cert) != bool(config.etcd.key):
        raise ConfigError("etcd.cert and etcd.key: set both or neither")
    if not config.outbound.retry_intervals:
        raise ConfigError("outbound.retry_intervals: expected at least one interval")
    for section in ("smtp", "imap", "pop3", "submission"):
        settings = getattr(config, section)
        for key in ("listen", "listen_tls"):
            for addr in getattr(settings, key, []):
                parse_listen_address(addr, f"{section}.{key}")


def parse_listen_address(addr: str, name: str = "listen") -> tuple[str, int]:
    """'0.0.0.0:25' or '[::1]:143' -> (host, port); raises ConfigError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError(f"{name}: bad listen address {addr!r} (expected HOST:PORT)")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(f"{name}: bad listen address {addr!r}")
        host = host[1:-1]
    return host, int(port)


def load(path: str | Path) -> Config:
    """Read and validate a TOML file; raises ConfigError with a one-line reason."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return from_dict(raw)
