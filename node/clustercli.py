"""``postroom cluster init | join | show``: create a cluster in etcd, enrol a node.

Theory of operation
-------------------
``init`` runs once per cluster, from any machine with the etcd settings.  It
makes a cluster id and a cluster CA (cluster/ca.py) and writes ``/cluster/meta``
and ``/cluster/ca`` in **one** etcd transaction that succeeds only while
neither key exists, so two concurrent inits cannot both win and a second
init changes nothing (exit 1).  etcd authentication protects the CA key.

``join`` runs once on each node, with that node's configuration: it reads the
CA from etcd, issues this node's certificate (CN = the member name, SAN = the
host of ``[cluster] advertise`` or ``listen`` plus any ``--address``) and
writes ``ca.crt``, ``node.crt``, ``node.key`` into ``[cluster] cert_dir``
(default ``data_dir/cluster``).  The member name is ``--name``, else
``[cluster] name``, else the node-id file in data_dir -- the name the node
itself will use (node/app.py), created here when missing.

``show`` prints the cluster record (never the CA key).
"""

from __future__ import annotations

import argparse
import ipaddress
import time
import uuid
from pathlib import Path
from typing import Any

from node.config import Config

META = "/cluster/meta"
CA = "/cluster/ca"
MAX_SHARDS = 9999  # shard keys are /shards/NNNN


class ClusterCliError(Exception):
    """A one-line operator error (exit 1); node/cli.py prints it."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``postroom cluster ...`` under the main parser."""
    cluster = sub.add_parser("cluster", help="create a cluster, enrol this node").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    init = cluster.add_parser("init", help="create the cluster record and CA in etcd (once)")
    init.add_argument("--shards", type=int, metavar="N",
                      help="mailbox shards (default: [storage] shards)")
    init.add_argument("--replication-factor", type=int, metavar="R",
                      help="copies of each shard (default: [cluster] replication_factor)")
    join = cluster.add_parser("join", help="issue this node's certificate from the cluster CA")
    join.add_argument("--name", metavar="NAME",
                      help="member name (default: [cluster] name, else data_dir/node-id)")
    join.add_argument("--address", metavar="ADDR", action="append", default=[],
                      help="another IP address or DNS name for the certificate (repeatable)")
    cluster.add_parser("show", help="the cluster record (id, shards, replication factor)")


def run(config: Config, session: Any, args: argparse.Namespace) -> int:
    if args.action == "init":
        return cmd_init(config, session, args.shards, args.replication_factor)
    if args.action == "join":
        return cmd_join(config, session, args.name, args.address)
    return cmd_show(session)


# -- init ------------------------------------------------------------------


def cmd_init(config: Config, session: Any, shards: int | None, factor: int | None) -> int:
    from cluster import ca
    from cluster.etcd import Put, key_absent

    shards = config.storage.shards if shards is None else shards
    factor = config.cluster.replication_factor if factor is None else factor
    if not 1 <= shards <= MAX_SHARDS:
        raise ClusterCliError(f"--shards must be between 1 and {MAX_SHARDS}")
    if factor < 1:
        raise ClusterCliError("--replication-factor must be at least 1")
    cluster_id = uuid.uuid4().hex[:16]
    cert, key = ca.create_ca(cluster_id)
    meta = {"id": cluster_id, "shards": shards, "replication_factor": factor,
            "created": time.time()}
    secret = {"cert": cert.decode("ascii"), "key": key.decode("ascii")}
    created = session.txn([key_absent(META), key_absent(CA)], [Put(META, meta), Put(CA, secret)])
    if not created:
        existing = session.get(META)
        which = f" (id {existing.value.get('id')})" if existing and isinstance(
            existing.value, dict) else ""
        raise ClusterCliError(f"a cluster already exists in etcd{which}; nothing changed")
    print(f"created cluster {cluster_id}: {shards} shards, replication factor {factor}")
    return 0


# -- join ------------------------------------------------------------------


def member_name(config: Config, requested: str | None) -> str:
    """The name this node runs under: [cluster] name, else data_dir/node-id.

    A --name must agree with [cluster] name when that is set; otherwise it
    becomes the node-id (written if there is none yet, refused if another)."""
    configured = config.cluster.name
    if requested and configured and requested != configured:
        raise ClusterCliError(f"--name {requested} differs from [cluster] name = {configured}")
    if configured:
        return configured
    path = config.data_dir / "node-id"
    try:
        current = path.read_text().strip()
    except FileNotFoundError:
        current = ""
    if current and requested and current != requested:
        raise ClusterCliError(
            f"--name {requested} differs from this node's id {current} ({path});"
            " set [cluster] name instead")
    if current:
        return current
    name = requested or uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(name + "\n")
    tmp.replace(path)
    return name


def _host(address: str) -> str:
    """"127.0.0.2:7400" -> "127.0.0.2", "[::1]:7400" -> "::1", "node1" -> "node1"."""
    address = address.strip()
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address


def certificate_addresses(config: Config, extra: list[str]) -> list[str]:
    """Host of advertise (else listen) plus extra, without wildcards, each once."""
    out: list[str] = []
    for candidate in [_host(config.cluster.advertise or config.cluster.listen), *extra]:
        candidate = _host(candidate) if candidate.startswith("[") else candidate.strip()
        try:
            if ipaddress.ip_address(candidate).is_unspecified:
                continue  # 0.0.0.0 / :: name no peer could dial
        except ValueError:
            pass
        if candidate and candidate not in out:
            out.append(candidate)
    return out


def cmd_join(config: Config, session: Any, name: str | None, extra: list[str]) -> int:
    from cluster import ca

    meta, secret = session.get(META), session.get(CA)
    if meta is None or secret is None:
        raise ClusterCliError("etcd holds no cluster; run `postroom cluster init` first")
    try:
        ca_cert = secret.value["cert"].encode("ascii")
        ca_key = secret.value["key"].encode("ascii")
    except (TypeError, KeyError, AttributeError):
        raise ClusterCliError(f"{CA} in etcd is not a CA record") from None
    member = member_name(config, name)
    addresses = certificate_addresses(config, extra)
    cert, key = ca.issue_node_cert(ca_cert, ca_key, member, addresses)
    cert_dir = Path(config.cluster.cert_dir or config.data_dir / "cluster")
    ca.write_node_files(cert_dir, ca_cert, cert, key)
    print(f"joined cluster {meta.value.get('id')} as {member}:"
          f" certificate for {', '.join([member, *addresses])} in {cert_dir}")
    return 0


# -- show ------------------------------------------------------------------


def cmd_show(session: Any) -> int:
    meta = session.get(META)
    if meta is None or not isinstance(meta.value, dict):
        raise ClusterCliError("etcd holds no cluster; run `postroom cluster init` first")
    value = meta.value
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(value.get("created", 0))))
    print(f"id: {value.get('id')}")
    print(f"shards: {value.get('shards')}")
    print(f"replication_factor: {value.get('replication_factor')}")
    print(f"created: {created}")
    print(f"ca: {'present' if session.get(CA) is not None else 'missing'}")
    return 0
