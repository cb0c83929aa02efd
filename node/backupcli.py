"""``postroom backup ...``, ``postroom restore ...`` and ``postroom drill restore``.

Two owners share this file (docs/backup.md): the ``backup`` subcommands
(keygen, status, list, verify [--deep], prune) are the first section, the
restore commands follow in their own section.  Keep edits to your section.

Theory of operation (backup)
----------------------------
Everything reads the target named by ``[backup]`` and, for ``status``, the
``/backup/<node>`` records the agents publish in etcd (storage/backup.py);
nothing needs a running node.  The cluster id (``<cid>``, the first part of
every object key) is ``/cluster/meta``'s id, else the node id in
``data_dir/node-id`` (single node), unless ``--cluster-id`` names it.

``verify`` lists the target once and checks, per shard: every segment
downloads, opens with our key (authenticated: any flipped byte fails),
holds the ops its name says, and continues the previous one (``first ==
previous last + 1``, ``prev`` = its key, ``prev_sha256`` = the SHA-256 of
its object bytes); a chain start (no ``prev``) sits on a snapshot at
``first - 1``, and the oldest retained segment on a snapshot that covers
the ops before it; every snapshot's header is readable, of our key id and
names the position its key says; every blob a retained segment references
exists.  ``--deep`` also downloads and decrypts every snapshot, blob and
etcd export (each chunk authenticated, ``plain_sha256`` checked, a blob's
name equal to the SHA-256 of its plaintext) and checks that the blobs the
snapshots reference exist, with a progress bar (rate, ETA) on stderr.
Every problem is printed as ``KEY: what is wrong``; any problem exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ============================================================ backup (J2)


class BackupCliError(Exception):
    """A one-line operator error (exit 1)."""


def add_backup_parser(sub: argparse._SubParsersAction) -> None:
    """``postroom backup keygen|status|list|verify|prune``."""
    backup = sub.add_parser("backup", help="continuous backup: keys, status, listing, checks")
    actions = backup.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("keygen", help="write a new encryption key file (mode 0600)"
                       ).add_argument("file")
    status = actions.add_parser("status", help="per shard: uploaded position, lag, snapshot")
    status.add_argument("--json", action="store_true", help="machine-readable")
    listing = actions.add_parser("list", help="snapshots, segment ranges, etcd exports, window")
    listing.add_argument("--json", action="store_true", help="machine-readable")
    verify = actions.add_parser("verify", help="check chains, headers and blobs (exit 1 if bad)")
    verify.add_argument("--deep", action="store_true",
                        help="download and decrypt every object and check its hash")
    actions.add_parser("prune", help="apply retention now (the agent does it hourly)")
    for parser in (status, listing, verify):
        parser.add_argument("--cluster-id", metavar="ID", help="default: this cluster's id")


def run_backup(config: Any, session_factory: Any, args: argparse.Namespace) -> int:
    """Dispatch ``postroom backup ACTION``; ``session_factory()`` opens etcd."""
    if args.action == "keygen":
        return cmd_keygen(args.file)
    ctx = BackupContext.open(config, session_factory, getattr(args, "cluster_id", None))
    try:
        if args.action == "status":
            return cmd_status(ctx, session_factory(), args.json)
        if args.action == "list":
            return cmd_list(ctx, args.json)
        if args.action == "verify":
            return cmd_verify(ctx, args.deep)
        return cmd_prune(ctx)
    finally:
        ctx.target.close()


def cmd_keygen(path: str) -> int:
    from storage import backup_crypto

    try:
        key = backup_crypto.generate_key_file(path)
    except backup_crypto.KeyFileError as exc:
        raise BackupCliError(str(exc)) from None
    print(f"wrote backup key {key.key_id} to {path} (mode 0600)")
    print("keep a copy away from the servers: without it no backup can be read")
    return 0


@dataclass
class BackupContext:
    """The target, our key and the cluster id, from [backup]."""

    config: Any
    target: Any
    key: Any
    cid: str
    sealer: Any = None

    @classmethod
    def open(cls, config: Any, session_factory: Any, cid: str | None) -> BackupContext:
        from storage import backup, backup_crypto, backup_target

        settings = config.backup
        if not settings.target:
            raise BackupCliError("[backup] target is not set (docs/configuration.md)")
        if not settings.key_file:
            raise BackupCliError("[backup] key_file is not set (postroom backup keygen FILE)")
        try:
            key = backup_crypto.load_key(settings.key_file)
        except backup_crypto.KeyFileError as exc:
            raise BackupCliError(str(exc)) from None
        try:
            target = backup_target.open_target(settings)
        except backup_target.TargetError as exc:
            raise BackupCliError(str(exc)) from None
        ctx = cls(config, target, key, cid or _cluster_id(config, session_factory))
        ctx.sealer = backup.Sealer(target, key)
        return ctx

    def listing(self, prefix: str = "") -> list[Any]:
        from storage import backup_target

        try:
            return list(self.target.list(f"{self.cid}/{prefix}"))
        except (backup_target.TargetError, backup_target.TargetUnavailable) as exc:
            raise BackupCliError(f"backup target: {exc}") from None


def _cluster_id(config: Any, session_factory: Any) -> str:
    if config.cluster.enabled:
        record = session_factory().get("/cluster/meta")
        if record is None or not isinstance(record.value, dict):
            raise BackupCliError("etcd holds no /cluster/meta; give --cluster-id")
        return str(record.value["id"])
    path = Path(config.data_dir) / "node-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise BackupCliError(f"no node id in {path}; give --cluster-id") from None


@dataclass
class ShardObjects:
    """One shard's objects in the target, by name."""

    segments: list[tuple[int, int, str]] = field(default_factory=list)  # (first, last, key)
    snapshots: list[tuple[int, str]] = field(default_factory=list)  # (last_index, key)


def shard_objects(ctx: BackupContext, infos: list[Any]) -> dict[int, ShardObjects]:
    from storage import backup

    out: dict[int, ShardObjects] = {}
    for info in infos:
        shards = backup.shard_numbers([info.key], ctx.cid)
        if not shards:
            continue
        objs = out.setdefault(shards[0], ShardObjects())
        if (rng := backup.parse_segment(info.key)) is not None:
            objs.segments.append((rng[0], rng[1], info.key))
        elif (last := backup.parse_snapshot(info.key)) is not None:
            objs.snapshots.append((last, info.key))
    for objs in out.values():
        objs.segments.sort()
        objs.snapshots.sort()
    return dict(sorted(out.items()))


def _header(ctx: BackupContext, key: str) -> Any:
    from storage import backup

    return backup.read_remote_header(ctx.target, ctx.sealer.crypto, key)


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _age(seconds: float) -> str:
    from node.cli import _age as age

    return age(seconds)


# -- status ---------------------------------------------------------------------


def cmd_status(ctx: BackupContext, session: Any, as_json: bool) -> int:
    """``/backup/<node>`` of every agent plus the target's newest objects."""
    from storage.backup import STATUS_PREFIX

    records, _rev = session.get_prefix(STATUS_PREFIX)
    agents = {kv.key[len(STATUS_PREFIX):]: kv.value for kv in records}
    target_state, objects = "reachable", {}
    try:
        objects = shard_objects(ctx, ctx.listing("shards/"))
    except BackupCliError as exc:
        target_state = f"unreachable from here ({exc})"
    if as_json:
        print(json.dumps({"cid": ctx.cid, "target": ctx.config.backup.target,
                          "target_state": target_state, "agents": agents,
                          "objects": {n: {"segments": len(o.segments),
                                          "snapshots": [k for _, k in o.snapshots]}
                                      for n, o in objects.items()}}, indent=2))
        return 0
    now = time.time()
    print(f"backup of cluster {ctx.cid} to {ctx.config.backup.target}: {target_state}")
    if not agents:
        print("no backup agent is running (no /backup/<node> record in etcd)")
    for node, record in sorted(agents.items()):
        ok = "ok" if record.get("target_ok") else "UNREACHABLE"
        age = _age(now - float(record.get("ts") or now))
        print(f"node {node}: target {ok}, reported {age} ago"
              + (f"; last error: {record['last_error']}" if record.get("last_error") else ""))
        print(f"  {'SHARD':>5}  {'UPLOADED':>9}  {'COMMITTED':>9}  {'LAG':>8}  LAST SNAPSHOT")
        for n, s in sorted(record.get("shards", {}).items(), key=lambda kv: int(kv[0])):
            up, com = s.get("uploaded") or [0, 0], s.get("committed") or [0, 0]
            snap = s.get("last_snapshot")
            snap_text = f"op {snap[0]} at {_iso(snap[1])}" if snap else "none yet"
            lag = float(s.get("lag_s") or 0.0)
            print(f"  {int(n):>5}  {up[0]:>9}  {com[0]:>9}  {lag:>7.1f}s  {snap_text}"
                  + (f"  ({s['error']})" if s.get("error") else ""))
    for n, objs in objects.items():
        newest = objs.segments[-1][2].rsplit("/", 1)[-1] if objs.segments else "none"
        print(f"shard {n}: {len(objs.segments)} segments (newest {newest}),"
              f" {len(objs.snapshots)} snapshots")
    return 0


# -- list -----------------------------------------------------------------------


def _ranges(segments: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """Contiguous op ranges covered by the segments."""
    out: list[tuple[int, int]] = []
    for first, last, _ in segments:
        if out and first == out[-1][1] + 1:
            out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out


def cmd_list(ctx: BackupContext, as_json: bool) -> int:
    """Snapshots and segment ranges per shard, etcd exports, the PIT window."""
    objects = shard_objects(ctx, ctx.listing("shards/"))
    etcd = [i.key for i in ctx.listing("etcd/")]
    report: dict[str, Any] = {"cid": ctx.cid, "shards": {}, "etcd": etcd}
    oldest, newest = None, None
    for n, objs in objects.items():
        snaps = []
        for last, key in objs.snapshots:
            meta = _header(ctx, key).meta
            snaps.append({"key": key, "last_index": last, "ts": meta.get("ts")})
        seg_newest = _header(ctx, objs.segments[-1][2]).meta.get("last_ts") \
            if objs.segments else None
        from_start = bool(objs.segments) and objs.segments[0][0] == 1
        shard_oldest = None if from_start else (snaps[0]["ts"] if snaps else None)
        shard_newest = max([t for t in [seg_newest] + [s["ts"] for s in snaps] if t],
                           default=None)
        report["shards"][n] = {"snapshots": snaps, "segments": len(objs.segments),
                               "ranges": _ranges(objs.segments),
                               "window": [shard_oldest, shard_newest]}
        if shard_oldest is not None:
            oldest = shard_oldest if oldest is None else max(oldest, shard_oldest)
        if shard_newest is not None:
            newest = shard_newest if newest is None else max(newest, shard_newest)
    report["window"] = [oldest, newest]
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"backup of cluster {ctx.cid} in {ctx.config.backup.target}")
    for n, s in report["shards"].items():
        ranges = ", ".join(f"{a}..{b}" for a, b in s["ranges"]) or "none"
        print(f"shard {n}: {s['segments']} segments, ops {ranges}")
        for snap in s["snapshots"]:
            print(f"  snapshot at op {snap['last_index']}  {_iso(snap['ts'])}  {snap['key']}")
    print(f"etcd exports: {len(etcd)}" + (f", newest {etcd[-1]}" if etcd else ""))
    start = "the first op" if oldest is None and newest is not None else _iso(oldest)
    print(f"point-in-time window: {start} .. {_iso(newest)}")
    return 0


# -- verify ---------------------------------------------------------------------


@dataclass
class Verification:
    sizes: dict[str, int]  # key -> octets, from the listing
    problems: list[str] = field(default_factory=list)
    checked: int = 0  # objects checked
    referenced: dict[str, str] = field(default_factory=dict)  # blob -> first object naming it

    def bad(self, key: str, what: str) -> None:
        self.problems.append(f"{key}: {what}")


def _open(ctx: BackupContext, key: str, v: Verification) -> tuple[bytes, Any, bytes] | None:
    """(object bytes, header, plaintext), or None with the problem recorded."""
    from storage import backup_target

    crypto = ctx.sealer.crypto
    try:
        return ctx.sealer.get(key)
    except backup_target.NoSuchObject:
        v.bad(key, "missing (deleted while verifying?)")
    except crypto.WrongKey as exc:
        v.bad(key, f"sealed with key {exc.key_id_found}, ours is {exc.key_id_expected}")
    except crypto.CorruptObject as exc:
        v.bad(key, f"damaged: {exc}")
    return None


def _verify_chain(ctx: BackupContext, n: int, objs: ShardObjects, v: Verification,
                  progress: Any) -> None:
    """One shard's segments: readable, contiguous, hash-linked, based on a snapshot."""
    from storage import backup

    snaps = {last for last, _ in objs.snapshots}
    prev: tuple[int, str, str] | None = None  # (last, key, sha256 of its bytes)
    for i, (first, last, key) in enumerate(objs.segments):
        opened = _open(ctx, key, v)
        progress(v.sizes.get(key, 0))
        v.checked += 1
        if opened is None:
            prev = None
            continue
        data, header, plain = opened
        meta = header.meta
        lines = backup.decode_segment(plain)
        if [line[0] for line in lines] != list(range(first, last + 1)):
            v.bad(key, f"does not hold exactly ops {first}..{last}")
        if (meta.get("first"), meta.get("last"), meta.get("shard")) != (first, last, n):
            v.bad(key, "its header names another shard or op range")
        for sha in backup.segment_blobs(lines):
            v.referenced.setdefault(sha, key)
        if i == 0:
            if first > 1 and not any(s >= first - 1 for s in snaps):
                v.bad(key, f"ops before {first} are in no segment and no snapshot covers them")
        elif prev is None:
            v.bad(key, "follows a segment that could not be read")
        elif first != prev[0] + 1:
            v.bad(key, f"ops {prev[0] + 1}..{first - 1} are missing (gap after {prev[1]})")
        elif meta.get("prev") is None:
            if first - 1 not in snaps:
                v.bad(key, "starts a new chain but there is no snapshot at op "
                           f"{first - 1}")
        elif meta.get("prev") != prev[1]:
            v.bad(key, f"chained to {meta.get('prev')}, not to {prev[1]}")
        elif meta.get("prev_sha256") != prev[2]:
            v.bad(key, f"the previous segment {prev[1]} was altered (prev_sha256 differs)")
        prev = (last, key, hashlib.sha256(data).hexdigest())


def _verify_snapshot(ctx: BackupContext, last: int, key: str, deep: bool,
                     v: Verification, scratch: Path) -> None:
    from storage import backup, backup_target

    crypto = ctx.sealer.crypto
    v.checked += 1
    try:
        if not deep:
            header = _header(ctx, key)
            if header.key_id != ctx.key.key_id:
                v.bad(key, f"sealed with key {header.key_id}, ours is {ctx.key.key_id}")
        else:
            sealed, db = scratch / "snap.sealed", scratch / "snap.sqlite"
            ctx.target.get_to_file(key, sealed)
            try:
                header = backup.in_pool(crypto.open_to_file, ctx.key, sealed, db)
                for sha in backup.in_pool(backup.snapshot_blobs, db):
                    v.referenced.setdefault(sha, key)
            finally:
                sealed.unlink(missing_ok=True)
                db.unlink(missing_ok=True)
    except backup_target.NoSuchObject:
        v.bad(key, "missing (deleted while verifying?)")
        return
    except crypto.WrongKey as exc:
        v.bad(key, f"sealed with key {exc.key_id_found}, ours is {exc.key_id_expected}")
        return
    except crypto.CorruptObject as exc:
        v.bad(key, f"damaged: {exc}")
        return
    if header.kind != "snapshot" or header.meta.get("last_index") != last:
        v.bad(key, f"header says {header.kind} at op {header.meta.get('last_index')}")


def _verify_blob(ctx: BackupContext, key: str, v: Verification, progress: Any) -> None:
    opened = _open(ctx, key, v)
    progress(v.sizes.get(key, 0))
    v.checked += 1
    if opened is None:
        return
    _data, header, plain = opened
    from storage import backup

    sha = backup.in_pool(lambda: hashlib.sha256(plain).hexdigest())
    if sha != key.rsplit("/", 1)[-1] or header.kind != "blob":
        v.bad(key, f"content has SHA-256 {sha}, not its name (or is not a blob)")


def cmd_verify(ctx: BackupContext, deep: bool) -> int:
    """See the module docstring; prints every problem, exit 1 on any."""
    import tempfile

    import gevent.pool

    from node.progress import Progress

    infos = ctx.listing()
    objects = shard_objects(ctx, [i for i in infos if "/shards/" in i.key])
    blobs = {i.key.rsplit("/", 1)[-1]: i.key for i in infos if "/blobs/" in i.key}
    exports = [i.key for i in infos if "/etcd/" in i.key]
    v = Verification({i.key: i.size for i in infos})
    segment_bytes = sum(v.sizes[k] for o in objects.values() for _, _, k in o.segments)
    total = segment_bytes + (sum(v.sizes.values()) - segment_bytes if deep else 0)
    with Progress("verify", total=total) as progress, \
            tempfile.TemporaryDirectory(prefix="postroom-verify-") as scratch:
        for n, objs in objects.items():
            _verify_chain(ctx, n, objs, v, progress)
            for last, key in objs.snapshots:
                _verify_snapshot(ctx, last, key, deep, v, Path(scratch))
                if deep:
                    progress(v.sizes.get(key, 0))
        if deep:
            pool = gevent.pool.Pool(8)
            for key in sorted(blobs.values()):
                pool.spawn(_verify_blob, ctx, key, v, progress)
            pool.join()
            for key in exports:
                opened = _open(ctx, key, v)
                progress(v.sizes.get(key, 0))
                v.checked += 1
                if opened is not None:
                    try:
                        json.loads(opened[2])
                    except ValueError:
                        v.bad(key, "is not a JSON etcd export")
    for sha, holder in sorted(v.referenced.items(), key=lambda kv: kv[1]):
        if sha not in blobs:
            v.bad(f"{ctx.cid}/blobs/{sha[:2]}/{sha}", f"missing; referenced by {holder}")
    for problem in v.problems:
        print(problem)
    what = "deep verify" if deep else "verify"
    print(f"{what}: {v.checked} objects checked in {len(objects)} shards,"
          f" {len(v.referenced)} referenced blobs, {len(blobs)} blobs stored:"
          f" {len(v.problems)} problem(s)", file=sys.stderr)
    return 1 if v.problems else 0


# -- prune ----------------------------------------------------------------------


def cmd_prune(ctx: BackupContext) -> int:
    from storage import backup

    index = None
    path = Path(ctx.config.data_dir) / "backup" / "uploaded.sqlite"
    if path.exists():  # this node's agent cache: blob sets already known
        retention = max(1, int(ctx.config.backup.retention_days)) * 86400.0
        index = backup.LocalIndex(path, f"{ctx.config.backup.target}|{ctx.cid}",
                                  max(3600.0, retention - 86400.0))
        index.open()
    try:
        report = backup.prune(ctx.sealer, index, ctx.cid, ctx.config.backup.retention_days)
    finally:
        if index is not None:
            index.close()
    for key in report.deleted_snapshots + report.deleted_segments + report.deleted_blobs:
        print(f"deleted {key}")
    for error in report.errors:
        print(f"not pruned: {error}", file=sys.stderr)
    print(f"prune: {len(report.deleted_snapshots)} snapshots, {len(report.deleted_segments)}"
          f" segments, {len(report.deleted_blobs)} blobs deleted;"
          f" {report.kept_objects} objects retained")
    return 1 if report.errors else 0


# ============================================================ restore (J3)
# ``postroom restore ...`` and ``postroom drill restore``: the restore
# engineer's section (storage/restore.py) starts here.
