"""One node process: etcd (embedded or external), directory, store, listeners.

`serve(config)` runs until SIGTERM/SIGINT and then stops in reverse order:
listeners first (no new work), sessions drained, store closed (pending group
commits finish), etcd session closed, the embedded etcd stopped last.
`quickstart(data_dir)` is the README's first command: it writes a demo
configuration, creates a demo domain and account, prints how to connect and
serves.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import gevent.event

from node import log as nodelog
from node import memory
from node.config import Config
from node.context import NodeContext
from node.net.listener import Service
from node.net.tls import certificate_paths, server_context

log = logging.getLogger("postroom.node")

VERSION = "0.1.0"


def node_id(data_dir: Path) -> str:
    """A stable identity for this node, created on first start."""
    path = data_dir / "node-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        ident = uuid.uuid4().hex[:12]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(ident + "\n")
        os.replace(tmp, path)
        return ident


@dataclass
class Node:
    config: Config
    services: list[Service] = field(default_factory=list)
    _stopping: gevent.event.Event = field(default_factory=gevent.event.Event)

    def start(self) -> None:
        from cluster.directory import EtcdDirectory
        from cluster.embedded import EmbeddedEtcd
        from cluster.etcd import session_from_config
        from cluster.membership import Membership
        from node.admin import AdminServer
        from node.outbound.dkim import Signer
        from node.outbound.runner import QueueRunner
        from storage.mailstore import MailStore
        from storage.queue import OutboundQueue

        cfg = self.config
        data_dir = cfg.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.id = node_id(data_dir)
        self.name = cfg.cluster.name or self.id
        self.embedded = None
        endpoints = list(cfg.etcd.endpoints)
        if not endpoints:
            self.embedded = EmbeddedEtcd(
                data_dir,
                cfg.etcd.embedded_binary,
                cfg.etcd.embedded_client_url,
                cfg.etcd.embedded_peer_url,
            )
            self.embedded.start()
            endpoints = [cfg.etcd.embedded_client_url]
        self.etcd = session_from_config(cfg.etcd, endpoints)
        self.etcd.start()
        self.directory = EtcdDirectory(self.etcd)
        self.directory.start()
        self.meta = self._cluster_meta() if cfg.cluster.enabled else None
        self.store = MailStore(
            data_dir / "mail",
            self.meta["shards"] if self.meta else cfg.storage.shards,
            fsync=cfg.storage.fsync,
            group_commit_max=cfg.storage.group_commit_max,
            # cluster: no shard takes writes until the manager gives it a role
            default_role="none" if self.meta else "primary",
        )
        self.store.open()
        self.queue = OutboundQueue(self.store, inline_max=cfg.storage.queue_inline_max)
        self.context = NodeContext(
            config=cfg,
            directory=self.directory,
            store=self.store,
            tls=server_context(cfg),
            hostname=cfg.hostname,
            queue=self.queue,
            dkim=Signer(self.directory, cfg.dkim),
        )
        if self.meta is not None:
            self._start_cluster()
        if cfg.backup.enabled:
            from storage.backup import BackupAgent

            self.backup = BackupAgent(cfg, self.store, self.context.cluster, self.etcd, self.meta)
            self.backup.start()
        self._start_reclaimer()
        self.runner = QueueRunner(self.context)
        self.runner.start()
        self.admin = AdminServer(data_dir / "admin.sock", self.queue, self.runner.wake)
        self.admin.register("storage.reclaim", self._reclaim_now)
        self.admin.start()
        self._start_listeners()
        info = {"hostname": cfg.hostname, "version": VERSION, "listeners": self.ports(),
                "pid": os.getpid()}
        if self.meta is not None:
            labels = dict(cfg.cluster.labels)
            labels.setdefault("host", cfg.hostname)
            labels.setdefault("zone", "")
            info.update(rpc=cfg.cluster.advertise or self.rpc_server.bound_address,
                        labels=labels)
        self.membership = Membership(self.etcd, self.name, info)
        self.membership.start()
        if self.meta is not None:
            from cluster.controller import Controller

            self.controller = Controller(self.etcd, self.name, self.meta)
            self.controller.start()
        log.info("node %s ready", self.name)

    def _cluster_meta(self) -> dict:
        """/cluster/meta, written by `postroom cluster init`; the shard count
        of the cluster wins over [storage] shards."""
        record = self.etcd.get("/cluster/meta")
        if record is None or not isinstance(record.value, dict):
            raise SystemExit("postroom: [cluster] enabled but etcd holds no cluster;"
                             " run `postroom cluster init` first (docs/operations.md)")
        return record.value

    def _start_reclaimer(self) -> None:
        """Log compaction and blob sweeps (storage/reclaim.py)."""
        from storage.reclaim import Reclaimer, keep_positions

        cfg = self.config
        backup = getattr(self, "backup", None)
        session = self.etcd if self.meta is not None else None

        def keep(numbers: list[int]) -> dict[int, list[int]]:
            return keep_positions(numbers, backup=backup, backup_enabled=cfg.backup.enabled,
                                  session=session, node=self.name)

        self.reclaimer = Reclaimer(self.store, cfg.storage, keep)
        self.reclaimer.start()

    def _reclaim_now(self, args: dict) -> dict:
        """Admin ``storage.reclaim`` {settle?}: compact every log, sweep blobs."""
        settle = args.get("settle")
        if settle is not None and (isinstance(settle, bool) or not isinstance(settle, int | float)
                                   or not 0 <= settle <= 3600):
            raise ValueError("settle: expected 0..3600 seconds")
        compacted = self.reclaimer.compact_now()
        sweep = self.reclaimer.sweep_now(settle)
        return {"compacted": {str(n): c for n, c in compacted.items()},
                "sweep": dataclasses.asdict(sweep)}

    def _start_cluster(self) -> None:
        """Multi-node mode: mTLS RPC, the cluster manager (roles, replication),
        routing of other shards' accounts to their primaries (docs/cluster.md)."""
        from cluster import ca, drill, proxy, router, rpc
        from cluster.manager import ClusterManager
        from node.admin import register_queue_handlers

        cfg = self.config
        cert_dir = Path(cfg.cluster.cert_dir or cfg.data_dir / "cluster")
        self.rpc_server = rpc.RpcServer(cfg.cluster.listen, ca.server_context(cert_dir))
        self.rpc_client = rpc.RpcClient(ca.client_context(cert_dir))
        self.manager = ClusterManager(
            cfg, self.etcd, self.store, self.rpc_server, self.rpc_client, self.meta, self.name)
        ctx = self.context
        ctx.cluster = self.manager
        ctx.store = router.ClusterStore(
            self.store, self.manager, self.rpc_client, cfg.cluster.rpc_timeout,
            cfg.cluster.settle)
        router.register_handlers(self.rpc_server, self.store, self.manager)
        proxy.register_handlers(self.rpc_server, ctx)
        drill.register_fault_handler(self.rpc_server)
        register_queue_handlers(self.rpc_server, ctx, self.rpc_client, cfg.cluster.rpc_timeout)
        self.rpc_server.start()
        self.manager.start()

    def _start_listeners(self) -> None:
        from node.imap.server import serve_connection as imap
        from node.pop3.server import serve_connection as pop3
        from node.smtp.server import serve_connection as smtp
        from node.smtp.server import serve_submission as submission

        cfg, ctx = self.config, self.context

        def bind(fn):
            return lambda sock, addr, implicit_tls: fn(ctx, sock, addr, implicit_tls=implicit_tls)

        table = [
            ("smtp", smtp, cfg.smtp.listen, False, cfg.smtp.max_connections_per_ip,
             b"421 4.7.0 Too many connections from your address\r\n"),
            ("imap", imap, cfg.imap.listen, False, cfg.imap.max_connections_per_ip,
             b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"),
            ("imaps", imap, cfg.imap.listen_tls, True, cfg.imap.max_connections_per_ip, b""),
            ("pop3", pop3, cfg.pop3.listen, False, cfg.pop3.max_connections_per_ip,
             b"-ERR [SYS/TEMP] Too many connections from your address\r\n"),
            ("pop3s", pop3, cfg.pop3.listen_tls, True, cfg.pop3.max_connections_per_ip, b""),
            ("submission", submission, cfg.submission.listen, False,
             cfg.submission.max_connections_per_ip,
             b"421 4.7.0 Too many connections from your address\r\n"),
            ("submissions", submission, cfg.submission.listen_tls, True,
             cfg.submission.max_connections_per_ip, b""),
        ]
        # One per-IP count per protocol: its plain and implicit-TLS listeners
        # share the limit (imap and imaps count together).
        counts: dict[str, Counter[str]] = {}
        for name, fn, addresses, implicit, per_ip, refusal in table:
            if not addresses:
                continue
            shared = counts.setdefault(name.rstrip("s") if implicit else name, Counter())
            service = Service(
                name, bind(fn), list(addresses), implicit, ctx.tls, per_ip, refusal,
                per_ip=shared,
            )
            service.start()
            self.services.append(service)

    def ports(self) -> dict[str, list[str]]:
        return {s.name: s.bound_addresses() for s in self.services}

    def request_stop(self) -> None:
        self._stopping.set()

    def wait(self) -> None:
        self._stopping.wait()

    def stop(self) -> None:
        for service in self.services:
            for server in service.servers:
                server.close()
        for service in self.services:
            service.stop()
        for name in ("reclaimer", "backup", "admin", "runner", "controller"):
            part = getattr(self, name, None)
            if part is not None:
                part.stop()
        for name in ("manager", "rpc_server", "rpc_client"):
            part = getattr(self, name, None)
            if part is not None:
                part.stop() if hasattr(part, "stop") else part.close()
        for name in ("membership", "directory"):
            part = getattr(self, name, None)
            if part is not None:
                part.stop()
        if getattr(self, "store", None) is not None:
            self.store.close()
        if getattr(self, "etcd", None) is not None:
            self.etcd.close()
        if getattr(self, "embedded", None) is not None:
            self.embedded.stop()
        log.info("node stopped")


def _run(node: Node, on_ready=None) -> int:
    gevent.signal_handler(signal.SIGTERM, node.request_stop)
    gevent.signal_handler(signal.SIGINT, node.request_stop)
    memory.fix_mmap_threshold()
    try:
        node.start()
        if on_ready is not None:
            on_ready(node)
        memory.trim()
        # Machine-readable line for supervisors and tests: the bound ports.
        print("postroom ready " + " ".join(
            f"{name}={','.join(addrs)}" for name, addrs in node.ports().items()
        ), flush=True)
        node.wait()
    finally:
        node.stop()
    return 0


def serve(config: Config) -> int:
    """`postroom serve`: run one node until SIGTERM/SIGINT."""
    nodelog.setup(config.node.log_level)
    return _run(Node(config))


QUICKSTART_DOMAIN = "example.test"
QUICKSTART_USER = f"demo@{QUICKSTART_DOMAIN}"
QUICKSTART_TOML = """\
# postroom quickstart configuration (see docs/configuration.md)
[node]
hostname = "mail.example.test"
data_dir = "{data_dir}"
# Loopback-only demo: allow LOGIN/USER/PASS without TLS from 127.0.0.1 and ::1.
allow_plaintext_auth_on_loopback = true

[etcd]
embedded_client_url = "http://127.0.0.1:12379"
embedded_peer_url = "http://127.0.0.1:12380"

[smtp]
listen = ["127.0.0.1:2525", "[::1]:2525"]

[imap]
listen = ["127.0.0.1:1143", "[::1]:1143"]
listen_tls = ["127.0.0.1:1993", "[::1]:1993"]

[pop3]
listen = ["127.0.0.1:1110", "[::1]:1110"]
listen_tls = ["127.0.0.1:1995", "[::1]:1995"]

[submission]
listen = ["127.0.0.1:2587", "[::1]:2587"]
listen_tls = ["127.0.0.1:2465", "[::1]:2465"]
"""


def quickstart(data_dir: str | Path) -> int:
    """The README's first command: one demo node on loopback, ports printed."""
    from node import config as configmod

    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_path = data_dir / "postroom.toml"
    if not config_path.exists():
        config_path.write_text(QUICKSTART_TOML.format(data_dir=data_dir))
    config = configmod.load(config_path)
    nodelog.setup(config.node.log_level)
    credentials = data_dir / "demo-password"

    def create_demo(node: Node) -> None:
        directory = node.directory
        if QUICKSTART_DOMAIN not in directory.list_domains():
            directory.add_domain(QUICKSTART_DOMAIN)
        if not credentials.exists() or not directory.account_exists(QUICKSTART_USER):
            password = secrets.token_urlsafe(12)
            if directory.account_exists(QUICKSTART_USER):
                directory.set_password(QUICKSTART_USER, password)
            else:
                directory.add_user(QUICKSTART_USER, password)
            fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        password = credentials.read_text().strip()
        cert, _ = certificate_paths(config)
        ports = node.ports()
        lines = [
            "",
            "postroom is running (Ctrl-C stops it).",
            f"  config:      {config_path}",
            f"  data:        {data_dir}",
            f"  certificate: {cert} (self-signed)",
            f"  account:     {QUICKSTART_USER}",
            f"  password:    {password}",
        ]
        labels = {"smtp": "SMTP (STARTTLS)", "imap": "IMAP (STARTTLS)", "imaps": "IMAPS",
                  "pop3": "POP3 (STLS)", "pop3s": "POP3S",
                  "submission": "Submission", "submissions": "Submission TLS"}
        for name, addrs in ports.items():
            lines.append(f"  {labels.get(name, name) + ':':<17}{', '.join(addrs)}")
        lines += [
            "",
            "Try:  swaks --server 127.0.0.1:2525 --to demo@example.test",
            f"      curl -u '{QUICKSTART_USER}:{password}' imap://127.0.0.1:1143/INBOX -X 'FETCH 1 BODY[]'",
            f"Manage:  postroom --config {config_path} user add someone@example.test",
            "",
        ]
        print("\n".join(lines), file=sys.stderr, flush=True)

    return _run(Node(config), on_ready=create_demo)
