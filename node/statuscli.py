"""``postroom status`` for a cluster, ``postroom node drain|undrain``, ``postroom drill``.

Theory of operation
-------------------
Everything here reads (or, for drain, writes) etcd only, so it works on any
machine with the etcd settings of the configuration, with or without a local
node.  :func:`read_snapshot` reads the cluster keys of docs/cluster.md
(/cluster/meta, /members/, /controller, /shards/, /positions/, /drain/), one
range after the other (milliseconds apart; positions are rewritten every 2 s
anyway, so lag is approximate by that much).  :class:`ClusterSnapshot` answers the
questions the status table, ``drain --wait`` and the drill ask: does a shard
have a live primary (named in its record, a member, and under the lease the
record names), how far each replica lags (primary's last index minus the
replica's, from /positions/), what a node still leads or holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

META = "/cluster/meta"
MEMBERS = "/members/"
CONTROLLER = "/controller"
SHARDS = "/shards/"
POSITIONS = "/positions/"
DRAIN = "/drain/"


def shard_key(number: int) -> str:
    return f"{SHARDS}{number:04d}"


@dataclass
class ClusterSnapshot:
    """The cluster keys read at one etcd revision (docs/cluster.md)."""

    meta: dict | None
    members: dict[str, dict]  # name -> /members/<name> record
    member_leases: dict[str, int]  # name -> the lease its key lives under
    controller: str | None
    shards: dict[int, dict]  # number -> /shards/<NNNN> record
    positions: dict[str, dict[int, tuple[int, int]]]  # node -> shard -> (index, epoch)
    drain: dict[str, float]  # node -> requested at
    revision: int = 0
    read_at: float = field(default_factory=time.time)

    @property
    def shard_count(self) -> int:
        if self.meta and isinstance(self.meta.get("shards"), int):
            return int(self.meta["shards"])
        return max(self.shards, default=-1) + 1

    def primary(self, number: int) -> str | None:
        """The shard's primary if it is alive: a member under primary_lease."""
        record = self.shards.get(number) or {}
        name = record.get("primary")
        if not name or name not in self.members:
            return None
        lease = record.get("primary_lease")
        if lease and self.member_leases.get(name) not in (None, 0, lease):
            return None
        return name

    def leaderless(self) -> list[int]:
        """Shards without a live primary (no record yet counts as none)."""
        return [n for n in range(self.shard_count) if self.primary(n) is None]

    def position(self, node: str, number: int) -> tuple[int, int] | None:
        return self.positions.get(node, {}).get(number)

    def lag(self, number: int, replica: str) -> int | None:
        """Operations the replica is behind the primary; None when unknown."""
        record = self.shards.get(number) or {}
        primary = record.get("primary")
        ours, theirs = self.position(primary or "", number), self.position(replica, number)
        if ours is None or theirs is None:
            return None
        return max(0, ours[0] - theirs[0])

    def caught_up(self, number: int, replicas: list[str]) -> bool:
        """Every listed replica's (index, epoch) equals the live primary's."""
        primary = self.primary(number)
        if primary is None:
            return False
        ours = self.position(primary, number)
        return ours is not None and all(self.position(r, number) == ours for r in replicas)

    def holdings(self, node: str) -> tuple[list[int], list[int]]:
        """(shards the node leads, shards where it is a replica or a transfer target)."""
        leads = [n for n, r in sorted(self.shards.items()) if r.get("primary") == node]
        holds = [
            n for n, r in sorted(self.shards.items())
            if node in (r.get("replicas") or []) or r.get("transfer_to") == node
        ]
        return leads, holds

    def to_json(self) -> dict[str, Any]:
        """The machine-readable status (``postroom status --json``)."""
        members = []
        for name, record in sorted(self.members.items()):
            members.append({
                "name": name,
                "rpc": record.get("rpc"),
                "version": record.get("version"),
                "labels": record.get("labels") or {},
                "hostname": record.get("hostname"),
                "pid": record.get("pid"),
                "started": record.get("started"),
                "age": round(self.read_at - float(record.get("started") or self.read_at), 1),
                "lease": self.member_leases.get(name),
                "draining": name in self.drain,
            })
        shards = []
        for n in range(self.shard_count):
            record = self.shards.get(n) or {}
            primary = record.get("primary")
            shards.append({
                "shard": n,
                "epoch": record.get("epoch"),
                "primary": primary,
                "primary_alive": self.primary(n) is not None,
                "replicas": record.get("replicas") or [],
                "isr": record.get("isr") or [],
                "transfer_to": record.get("transfer_to"),
                "position": self.position(primary or "", n),
                "lag": {r: self.lag(n, r) for r in record.get("replicas") or [] if r != primary},
            })
        return {
            "cluster": self.meta,
            "revision": self.revision,
            "controller": self.controller,
            "members": members,
            "shards": shards,
            "draining": sorted(self.drain),
            "without_primary": self.leaderless(),
        }


def _positions(value: Any) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    shards = value.get("shards") if isinstance(value, dict) else None
    for key, pos in (shards or {}).items():
        try:
            out[int(key)] = (int(pos[0]), int(pos[1]))
        except (TypeError, ValueError, IndexError):
            continue
    return out


def read_snapshot(session) -> ClusterSnapshot:
    """One look at every cluster key (see the module docstring)."""
    meta_kv = session.get(META)
    members_kvs, revision = session.get_prefix(MEMBERS)
    rest = {prefix: session.get_prefix(prefix)[0] for prefix in (SHARDS, POSITIONS, DRAIN)}
    controller_kv = session.get(CONTROLLER)
    members = {kv.key[len(MEMBERS):]: kv.value for kv in members_kvs
               if isinstance(kv.value, dict)}
    leases = {kv.key[len(MEMBERS):]: kv.lease for kv in members_kvs}
    shards = {}
    for kv in rest[SHARDS]:
        suffix = kv.key[len(SHARDS):]
        if suffix.isdigit() and isinstance(kv.value, dict):
            shards[int(suffix)] = kv.value
    controller = None
    if controller_kv is not None and isinstance(controller_kv.value, dict):
        controller = controller_kv.value.get("node")
    return ClusterSnapshot(
        meta=meta_kv.value if meta_kv is not None and isinstance(meta_kv.value, dict) else None,
        members=members,
        member_leases=leases,
        controller=controller,
        shards=shards,
        positions={kv.key[len(POSITIONS):]: _positions(kv.value) for kv in rest[POSITIONS]},
        drain={
            kv.key[len(DRAIN):]: float((kv.value or {}).get("requested", 0) or 0)
            if isinstance(kv.value, dict) else 0.0
            for kv in rest[DRAIN]
        },
        revision=revision,
    )


# -- rendering ---------------------------------------------------------------


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def render(snap: ClusterSnapshot) -> list[str]:
    """The human status table (see docs/operations.md for the columns)."""
    data = snap.to_json()
    meta = snap.meta or {}
    lines = [
        f"cluster: {meta.get('id', '?')}  shards: {snap.shard_count}"
        f"  replication factor: {meta.get('replication_factor', '?')}"
        f"  controller: {snap.controller or '(none)'}",
        f"members: {len(data['members'])}",
    ]
    if data["members"]:
        rows = [["NAME", "RPC", "VERSION", "LABELS", "AGE", "PID", "DRAINING"]]
        for m in data["members"]:
            labels = ",".join(f"{k}={v}" for k, v in sorted(m["labels"].items()) if v) or "-"
            rows.append([m["name"], m["rpc"] or "-", m["version"] or "?", labels,
                         _age(m["age"]), str(m["pid"] or "-"), "yes" if m["draining"] else "-"])
        lines += _table(rows)
    missing = data["without_primary"]
    lines.append(f"shards: {snap.shard_count}, without primary: {len(missing)}"
                 + (f" ({', '.join(f'{n:04d}' for n in missing)})" if missing else ""))
    rows = [["SHARD", "EPOCH", "PRIMARY", "REPLICAS", "ISR", "TRANSFER", "INDEX", "LAG"]]
    for s in data["shards"]:
        primary = s["primary"] or "(none)"
        if s["primary"] and not s["primary_alive"]:
            primary += " (gone)"
        lag = " ".join(f"{r}={'?' if v is None else v}" for r, v in s["lag"].items()) or "-"
        position = s["position"]
        rows.append([f"{s['shard']:04d}", str(s["epoch"] if s["epoch"] is not None else "-"),
                     primary, ",".join(s["replicas"]) or "-", ",".join(s["isr"]) or "-",
                     s["transfer_to"] or "-", str(position[0]) if position else "?", lag])
    lines += _table(rows)
    if snap.drain:
        lines.append("draining: " + ", ".join(
            f"{name} (since {_age(snap.read_at - ts)}; leads {len(leads)}, holds {len(holds)})"
            for name, ts in sorted(snap.drain.items())
            for leads, holds in [snap.holdings(name)]))
    return lines


# -- commands ----------------------------------------------------------------


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``node drain|undrain`` and ``drill failover`` (``status`` lives in node/cli.py)."""
    node = sub.add_parser("node", help="cluster members: drain before maintenance")
    actions = node.add_subparsers(dest="action", metavar="ACTION", required=True)
    drain = actions.add_parser("drain", help="move every shard away from a member")
    drain.add_argument("name")
    drain.add_argument("--wait", action="store_true",
                       help="wait until it leads nothing and holds no replica")
    drain.add_argument("--timeout", type=float, default=0.0, metavar="S",
                       help="with --wait: give up (exit 1) after S seconds (0: never)")
    actions.add_parser("undrain", help="let a member hold shards again").add_argument("name")

    drill = sub.add_parser("drill", help="failover drills against the live cluster")
    kinds = drill.add_subparsers(dest="action", metavar="ACTION", required=True)
    failover = kinds.add_parser("failover", help="load, fault, RTO and a consistency check")
    failover.add_argument("--target", default="primary",
                          choices=("primary", "follower", "controller", "etcd-member"))
    failover.add_argument("--fault", default="kill", choices=("kill", "freeze"),
                          help="for node targets: SIGKILL, or SIGSTOP for --freeze seconds")
    failover.add_argument("--freeze", type=float, default=0.0, metavar="S",
                          help="freeze time (default: 2 x the etcd lease TTL + 1 s)")
    failover.add_argument("--duration", type=float, default=20.0, metavar="S",
                          help="seconds of load in all (the fault comes after a third)")
    failover.add_argument("--senders", type=int, default=20, metavar="N")
    failover.add_argument("--imap-clients", type=int, default=10, metavar="N")
    failover.add_argument("--settle", type=float, default=90.0, metavar="S",
                          help="at most S seconds for recovery and for replicas to catch up")
    failover.add_argument("--json", action="store_true", help="the report as JSON")
    from node import backupcli

    backupcli.add_drill_parser(kinds)  # drill restore


def cmd_status(session, as_json: bool) -> int:
    """Cluster status; exit 1 when a shard has no live primary."""
    snap = read_snapshot(session)
    if as_json:
        print(json.dumps(snap.to_json(), indent=2, sort_keys=True))
        return 1 if snap.leaderless() else 0
    from cluster.directory import EtcdDirectory

    version = session.status().get("version", "?")
    print(f"etcd: reachable at {session._endpoint_url()} (version {version})")
    for line in render(snap):
        print(line)
    directory = EtcdDirectory(session)
    print(f"domains: {len(directory.list_domains())}  accounts: {len(directory.list_users())}"
          f"  aliases: {len(directory.list_aliases())}")
    return 1 if snap.leaderless() else 0


def cmd_node(session, args: argparse.Namespace) -> int:
    if args.action == "undrain":
        removed = session.delete(DRAIN + args.name)
        print(f"{args.name}: {'no longer draining' if removed else 'was not draining'}")
        return 0
    if "/" in args.name or not args.name:
        from node.cli import CliError

        raise CliError(f"bad member name {args.name!r}")
    snap = read_snapshot(session)
    session.put(DRAIN + args.name, {"requested": round(time.time(), 3)})
    known = "" if args.name in snap.members else " (not a live member now)"
    print(f"{args.name}: draining{known}")
    if not args.wait:
        return 0
    return _wait_drained(session, args.name, args.timeout)


def _wait_drained(session, name: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout if timeout > 0 else None
    shown = None
    while True:
        leads, holds = read_snapshot(session).holdings(name)
        if not leads and not holds:
            print(f"{name}: drained (leads nothing, holds no replica)")
            return 0
        if (len(leads), len(holds)) != shown:
            shown = (len(leads), len(holds))
            print(f"{name}: leads {len(leads)} shard(s), holds {len(holds)} replica(s)")
            sys.stdout.flush()
        if deadline is not None and time.monotonic() >= deadline:
            print(f"{name}: not drained after {timeout:g} s", file=sys.stderr)
            return 1
        time.sleep(0.5)


def cmd_drill(config, session, args: argparse.Namespace) -> int:
    """``postroom drill failover``: exit 0 only when every promise held."""
    from pathlib import Path

    from cluster import ca, drill, rpc
    from cluster.directory import EtcdDirectory
    from cluster.etcd import session_from_config

    cert_dir = Path(config.cluster.cert_dir or config.data_dir / "cluster")
    client = rpc.RpcClient(ca.client_context(cert_dir))
    options = drill.DrillOptions(
        target=args.target, fault=args.fault, freeze=args.freeze, duration=args.duration,
        senders=args.senders, imap_clients=args.imap_clients, settle=args.settle)
    endpoints = list(config.etcd.endpoints) or [config.etcd.embedded_client_url]

    def call(address: str, method: str, call_args: dict) -> dict:
        return client.call(address, method, call_args, timeout=config.cluster.rpc_timeout)[0]

    def status(endpoint: str) -> dict:
        one = session_from_config(config.etcd, [endpoint])
        try:
            return one.status()
        finally:
            one.close()

    def progress(text: str) -> None:
        if not args.json:
            print(f"... {text}", flush=True)

    try:
        report = drill.Drill(session, EtcdDirectory(session), options, call, status, endpoints,
                             config.etcd.lease_ttl, progress).run()
    except drill.DrillError as exc:
        from node.cli import CliError

        raise CliError(str(exc)) from None
    finally:
        client.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        for line in report.lines():
            print(line)
    return 0 if report.ok else 1
