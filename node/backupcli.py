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
        elif first <= prev[0]:
            v.bad(key, f"overlaps {prev[1]} (two uploaders of one shard?)")
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

# ``postroom restore`` exit status: 0 done; 1 nothing restored (a wrong key,
# a missing bucket, --at outside the window, a running node, ...); 2 done,
# but objects (and the mail they hold) were lost: each one is printed.


class RestoreCliError(Exception):
    """A one-line operator error of a restore (exit 1)."""


def _session(config: Any) -> Any:
    from node.cli import _session as open_session

    return open_session(config)


def BlobStore(root: Path, fsync: bool = True) -> Any:  # noqa: N802 (a lazy import)
    from storage.blobs import BlobStore as Store

    return Store(root, fsync=fsync)

EXIT_LOST = 2  # a restore finished, but objects (and the mail in them) were lost


def add_restore_parser(sub: argparse._SubParsersAction) -> None:
    """``postroom restore ...`` under the main parser."""
    restore = sub.add_parser("restore", help="restore from the backup (docs/operations.md)")
    kinds = restore.add_subparsers(dest="action", metavar="ACTION", required=True)
    whole = kinds.add_parser("cluster", help="the whole cluster into one stopped node and an"
                             " empty etcd (single node: its data directory and etcd)")
    whole.add_argument("--node", metavar="NAME",
                       help="member that gets every shard (default: [cluster] name)")
    whole.add_argument("--force", action="store_true",
                       help="even if etcd or the data directory is not empty")
    account = kinds.add_parser("account", help="one account (or one mailbox) on the live system")
    account.add_argument("address")
    account.add_argument("--mailbox", metavar="NAME", help="only this mailbox")
    mailbox = kinds.add_parser("mailbox", help="one mailbox on the live system")
    mailbox.add_argument("address")
    mailbox.add_argument("mailbox", metavar="NAME")
    for parser in (account, mailbox):
        how = parser.add_mutually_exclusive_group()
        how.add_argument("--into-folder", metavar="FOLDER",
                         help='append into FOLDER/<mailbox> (default "Restored <date>")')
        how.add_argument("--in-place", action="store_true",
                         help="put the mailbox back as it was: UIDVALIDITY, UIDs, flags")
    for parser in (whole, account, mailbox):
        _common_options(parser)


def add_drill_parser(kinds: argparse._SubParsersAction) -> None:
    """``postroom drill restore`` (the ``drill`` parser is node/statuscli.py's)."""
    drill = kinds.add_parser("restore", help="restore the latest backup into a scratch"
                             " directory and compare it with the live system")
    _common_options(drill)
    drill.add_argument("--scratch", metavar="DIR", help="work directory (default: a temporary one)")
    drill.add_argument("--json", action="store_true", help="the report as JSON")


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--at", metavar="TIME",
                        help="point in time: ISO 8601 (UTC unless an offset is given) or"
                        " seconds since the epoch (default: the newest backed-up state)")
    parser.add_argument("--cluster-id", metavar="ID",
                        help="whose backup (default: /cluster/meta, else data_dir/node-id,"
                        " else the only one in the target)")


class _Restore:
    """What every restore command opens: the target, the key, the catalog."""

    def __init__(self, config: Any, args: argparse.Namespace, cid: str | None = None) -> None:
        from storage import backup_crypto, backup_target, restore

        settings = config.backup
        if not settings.target or not settings.key_file:
            raise RestoreCliError("[backup] target and key_file must be set to restore")
        self.config = config
        self.at = restore.parse_time(args.at) if getattr(args, "at", None) else None
        self.key = backup_crypto.load_key(settings.key_file)
        self.target = backup_target.open_target(settings)
        self.cid = args.cluster_id or cid or self._find_cid()
        self.catalog = restore.Catalog(self.target, self.key, self.cid)
        if self.catalog.empty():
            raise RestoreCliError(f"the backup target {settings.target} holds no backup of"
                                  f" cluster {self.cid}")
        self.catalog.check_key()
        self.catalog.check_at(self.at)

    def _find_cid(self) -> str:
        node_id = Path(self.config.data_dir) / "node-id"
        if not self.config.cluster.enabled and node_id.is_file():
            return node_id.read_text().strip()
        found = sorted({info.key.split("/", 1)[0] for info in self.target.list("")})
        if len(found) != 1:
            raise RestoreCliError("give --cluster-id: the target holds the backups of"
                                  f" {', '.join(found) or 'no cluster'}")
        return found[0]


def _user_error(exc: Exception) -> RestoreCliError | None:
    """Restore, target and key errors as one-line operator errors."""
    from storage import backup_crypto, backup_target, restore

    if isinstance(exc, restore.RestoreError | backup_crypto.BackupCryptoError):
        return RestoreCliError(str(exc))
    if isinstance(exc, backup_target.TargetError | backup_target.TargetUnavailable):
        return RestoreCliError(f"backup target: {exc}")
    return None


def cmd_restore(config: Any, args: argparse.Namespace) -> int:
    try:
        if args.action == "cluster":
            return _restore_cluster(config, args)
        return _restore_account(config, args)
    except Exception as exc:
        error = _user_error(exc)
        if error is None:
            raise
        raise error from None


def cmd_drill_restore(config: Any, args: argparse.Namespace) -> int:
    try:
        return _drill_restore(config, args)
    except Exception as exc:
        error = _user_error(exc)
        if error is None:
            raise
        raise error from None


# -- shared pieces ------------------------------------------------------------


def _build(r: _Restore, shard: int, dest: Path) -> Any:
    from node.progress import Progress
    from storage import restore

    with Progress(f"shard {shard:04d}", unit="B") as bar:
        return restore.build_shard(r.catalog, shard, r.at, dest, bar)


def _print_losses(reports: list, blobs: Any = None) -> bool:
    """Print every lost object and message; True if anything was lost."""
    from storage import restore

    lost = False
    for rep in reports:
        for line in rep.lost_objects:
            print(f"LOST shard {rep.shard:04d}: {line}")
            lost = True
        if rep.lost_ops:
            print(f"LOST shard {rep.shard:04d}: operations {rep.lost_ops[0]}..{rep.lost_ops[1]}"
                  f" (after {restore.iso(rep.last_ts)}) are not restored")
    if blobs is not None:
        for line in blobs.messages_lost:
            print(f"LOST message {line}")
        lost = lost or not blobs.ok
    return lost


def _etcd_for(config: Any) -> tuple[Any, Any]:
    """(session, embedded etcd started here or None) for a stopped node."""
    from cluster.embedded import EmbeddedEtcd, check_health
    from cluster.etcd import session_from_config

    embedded = None
    if not config.etcd.endpoints:
        if check_health(config.etcd.embedded_client_url):
            raise RestoreCliError(f"an etcd answers at {config.etcd.embedded_client_url}:"
                                  " stop the node before `postroom restore cluster`")
        embedded = EmbeddedEtcd(config.data_dir, config.etcd.embedded_binary,
                                config.etcd.embedded_client_url, config.etcd.embedded_peer_url)
        embedded.start()
    return session_from_config(config.etcd), embedded


def _live_primary(session: Any, shard: int) -> str:
    """The RPC address of the primary of ``shard`` (cluster mode)."""
    record = session.get(f"/shards/{shard:04d}")
    primary = (record.value or {}).get("primary") if record else None
    member = session.get(f"/members/{primary}") if primary else None
    if member is None or not (member.value or {}).get("rpc"):
        raise RestoreCliError(f"shard {shard:04d} has no live primary; try again later")
    return member.value["rpc"]


class _LiveStore:
    """The live store of the account's shard: the admin socket (single node)
    or `store.call` on the primary (cluster, mTLS RPC with this node's certificate)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.cluster = config.cluster.enabled
        self.session: Any = None
        self.rpc: Any = None
        if self.cluster:
            from cluster import ca, rpc

            cert_dir = Path(config.cluster.cert_dir or config.data_dir / "cluster")
            self.rpc = rpc.RpcClient(ca.client_context(cert_dir))
            self.session = _session(config)
            meta = self.session.get("/cluster/meta")
            if meta is None:
                raise RestoreCliError("etcd holds no cluster")
            self.shards = int(meta.value["shards"])
            self.cid = str(meta.value["id"])
        else:
            from node.admin import AdminClient

            self.admin = AdminClient(config.data_dir / "admin.sock", timeout=300)
            self.admin.call("ping")
            layout = config.data_dir / "mail" / "storage.json"
            self.shards = (json.loads(layout.read_text())["shards"] if layout.is_file()
                           else config.storage.shards)
            self.cid = None
            self.blobs = BlobStore(config.data_dir / "mail" / "blobs",
                                   fsync=config.storage.fsync)

    def close(self) -> None:
        if self.rpc is not None:
            self.rpc.close()

    def shard_of(self, account: str) -> int:
        from storage.mailstore import shard_of

        return shard_of(account, self.shards)

    def call(self, method: str, account: str, *args: Any, **kwargs: Any) -> Any:
        """A MailStore method on the primary of the account's shard (cluster)."""
        from cluster import router
        from cluster.rpc import RpcError

        out: list[bytes] = []
        payload = {"method": method, "account": account,
                   "args": router.encode(list(args), out), "kwargs": router.encode(kwargs, out)}
        address = _live_primary(self.session, self.shard_of(account))
        try:
            result, att = self.rpc.call(address, "store.call", payload, out,
                                        timeout=max(60.0, self.config.cluster.rpc_timeout))
        except RpcError as exc:
            raise RestoreCliError(f"{method} on the primary of {account}: {exc}") from None
        return router.decode(result.get("result"), att)

    def listing(self, account: str) -> list[dict]:
        """[{name, uidvalidity, messages: [[uid, blob, flags]]}] of the live account."""
        if not self.cluster:
            return self.admin.call("restore.listing", account=account)["mailboxes"]
        out = []
        for box in self.call("list_mailboxes", account):
            rows = self.call("messages", account, box.name)
            out.append({"name": box.name, "uidvalidity": box.uidvalidity,
                        "messages": [[r.uid, r.blob, sorted(r.flags)] for r in rows]})
        return out


# -- restore cluster ------------------------------------------------------------


def _restore_cluster(config: Any, args: argparse.Namespace) -> int:
    """The whole backup into this (stopped) node's data directory and etcd."""
    from node.admin import AdminClient, AdminError, NodeNotRunning
    from storage import restore

    try:
        AdminClient(config.data_dir / "admin.sock", timeout=5).call("ping")
        raise RestoreCliError("the node is running: stop it before `postroom restore cluster`")
    except NodeNotRunning:
        pass
    except AdminError as exc:
        if exc.code != "not_running":
            raise RestoreCliError("the node is running: stop it before"
                                  " `postroom restore cluster`") from None
    mail = config.data_dir / "mail"
    if any((mail / "shards").glob("shard-*.sqlite")) and not args.force:
        raise RestoreCliError(f"{mail} already holds shards; restore into an empty data directory"
                              " (or --force to replace them)")
    name = args.node or config.cluster.name
    if config.cluster.enabled and not name:
        raise RestoreCliError("give --node NAME (the member that gets every shard)")
    started = time.monotonic()
    session, embedded = _etcd_for(config)
    try:
        kvs, _ = session.get_prefix("/")
        if kvs and not args.force:
            raise RestoreCliError(f"etcd is not empty ({len(kvs)} keys under the prefix); restore"
                                  " into an empty etcd (or --force to overwrite)")
        r = _Restore(config, args)
        print(f"restoring cluster {r.cid} from {config.backup.target}"
              f" as of {restore.iso(r.at) if r.at else 'the newest backed-up state'}")
        data = _etcd_data(r)
        shards = _shard_count(config, data)
        reports, blobs = _restore_shards(r, mail, shards)
        _write_etcd(session, data, reports, name if config.cluster.enabled else None,
                    shards if config.cluster.enabled else 0)
    finally:
        session.close()
        if embedded is not None:
            embedded.stop()
    if not config.cluster.enabled:
        (config.data_dir / "node-id").write_text(r.cid + "\n")  # the backup continues its chain
    lost = _print_losses(reports, blobs)
    messages = sum(len(restore.shard_messages(rep.path)) for rep in reports)
    print(f"restored {len(reports)} shard(s), {messages} message(s), {blobs.fetched} blob(s)"
          f" ({blobs.octets} octets) in {time.monotonic() - started:.1f} s")
    if config.cluster.enabled:
        print(f"next: start {name}; then on each other node `postroom cluster join` and start it")
    return EXIT_LOST if lost else 0


def _etcd_data(r: _Restore) -> dict:
    from storage import restore

    export = r.catalog.etcd_export(r.at)
    if export is None and r.catalog.etcd:
        export = r.catalog.etcd[0]
        print(f"warning: no etcd data as old as --at; using the oldest,"
              f" of {restore.iso(export.ts)}")
    if export is None:
        if r.config.cluster.enabled:
            raise RestoreCliError("the backup holds no etcd data: the cluster cannot be restored")
        print("warning: the backup holds no etcd data (domains and accounts not restored)")
        return {}
    try:
        data = restore.read_etcd_export(r.catalog, export)
    except restore.ObjectLost as exc:
        raise RestoreCliError(f"etcd data lost: {exc}") from None
    print(f"etcd data of {restore.iso(export.ts)} (revision {export.revision}, {len(data)} keys)")
    return data


def _shard_count(config: Any, data: dict) -> int:
    meta = data.get("/cluster/meta")
    if config.cluster.enabled:
        if not isinstance(meta, dict) or "shards" not in meta:
            raise RestoreCliError("the backup's etcd data has no /cluster/meta")
        return int(meta["shards"])
    return config.storage.shards


def _restore_shards(r: _Restore, mail: Path, shards: int) -> tuple[list, Any]:
    """Every shard of the backup into mail/shards, storage.json, then the blobs."""
    from node.progress import Progress
    from storage import restore
    from storage.mailstore import FORMAT

    (mail / "shards").mkdir(parents=True, exist_ok=True)
    reports, needed = [], {}
    for shard in r.catalog.shards():
        if shard >= shards:
            raise RestoreCliError(f"the backup has shard {shard}, the cluster {shards} shards")
        final = mail / "shards" / f"shard-{shard:04d}.sqlite"
        for suffix in ("-wal", "-shm"):
            Path(f"{final}{suffix}").unlink(missing_ok=True)
        report = _build(r, shard, final.with_name(final.name + ".restore"))
        final.with_name(final.name + ".restore").replace(final)
        report.path = final
        reports.append(report)
        needed.update(restore.referenced_blobs(final))
        print(f"shard {shard:04d}: op {report.position[0]} (epoch {report.position[1]}),"
              f" {restore.iso(report.last_ts)}, from"
              f" {report.snapshot or 'the log'} + {report.ops_applied} op(s)")
    (mail / "storage.json").write_text(json.dumps({"format": FORMAT, "shards": shards}))
    store = BlobStore(mail / "blobs", fsync=r.config.storage.fsync)
    store.open()
    with Progress("blobs", unit="B") as bar:
        blobs = restore.fetch_blobs(r.catalog, needed, store, bar)
    return reports, blobs


def _write_etcd(session: Any, data: dict, reports: list, node: str | None, shards: int) -> None:
    """The exported keys, and (cluster) /shards/ records naming ``node`` alone."""
    from storage import restore

    session.delete_prefix("/shards/")
    for key, value in sorted(data.items()):
        if not key.startswith(restore.EXCLUDED_ETCD + ("/shards/",)):
            session.put(key, value)
    if node is None:
        return
    epochs = {rep.shard: rep.position[1] for rep in reports}
    for shard in range(shards):
        # Epoch: at least the restored log's last one, so the promotion
        # (controller, placement rule 2: lease 0 is not NAME's) goes above it.
        session.put(f"/shards/{shard:04d}", restore.shard_record(node, max(1, epochs.get(shard, 1))))


# -- restore account / mailbox --------------------------------------------------


def _restore_account(config: Any, args: argparse.Namespace) -> int:
    from storage import restore

    account = args.address.lower()
    only = args.mailbox
    live = _LiveStore(config)
    try:
        r = _Restore(config, args, live.cid)
        shard = live.shard_of(account)
        scratch = restore.scratch_dir(config.data_dir / "restore")
        try:
            report = _build(r, shard, scratch / f"shard-{shard:04d}.sqlite")
            print(f"{account}: shard {shard:04d} as of {restore.iso(report.last_ts)}"
                  f" (op {report.position[0]})")
            boxes = [b for b in restore.shard_mailboxes(report.path, account)
                     if only is None or b["name"] == only]
            if not boxes:
                what = f"mailbox {only!r} of {account}" if only else f"account {account}"
                raise RestoreCliError(f"the backup holds no {what} at"
                                      f" {restore.iso(r.at) if r.at else 'its newest state'}")
            when = r.at if r.at is not None else time.time()
            folder = args.into_folder or time.strftime("Restored %Y-%m-%d", time.gmtime(when))
            lost = _print_losses([report])
            for box in boxes:
                lost |= _restore_box(r, live, report.path, account, box,
                                     None if args.in_place else folder, scratch)
        finally:
            restore.remove_tree(scratch)
    finally:
        live.close()
    return EXIT_LOST if lost else 0


def _restore_box(r: _Restore, live: _LiveStore, db: Path, account: str, box: dict,
                 folder: str | None, scratch: Path) -> bool:
    """One mailbox into FOLDER/<name> by appends, or in place; True if mail was lost."""
    from storage import restore

    messages = restore.shard_messages(db, account, box["name"])
    blobs: dict[str, bytes] = {}
    needed = {m.blob: [f"{account}/{box['name']} uid {m.uid}"] for m in messages}
    store_put = live.blobs.put if not live.cluster else (lambda d: _keep(blobs, d))
    from node.progress import Progress

    with Progress(f"{box['name']}: blobs", unit="B") as bar:
        report = restore.fetch_blobs(r.catalog, needed, store_put, bar,
                                     have=None if live.cluster else live.blobs.exists)
    lost = _print_losses([], report)
    kept = [m for m in messages if m.blob not in report.lost]
    if folder is not None:
        target = f"{folder}/{box['name']}"
        if live.cluster:
            _ensure_mailbox(live, account, target)
        for m in kept:
            _append(live, account, target, m, blobs)
        print(f"{account}: {len(kept)} message(s) of {box['name']} restored into {target}")
        return lost
    meta = restore.message_meta(db, box["uidvalidity"], [m.uid for m in kept])
    backup = {"uidvalidity": box["uidvalidity"], "uidnext": box["uidnext"],
              "highestmodseq": box["highestmodseq"], "special_use": box["special_use"],
              "subscribed": box["subscribed"],
              "messages": [{"uid": m.uid, "blob": m.blob, "size": m.size,
                            "internaldate": m.internaldate, "flags": list(m.flags),
                            "meta": meta[m.uid]} for m in kept]}
    if live.cluster:
        result = live.call("restore_mailbox", account, box["name"], backup, blobs)
    else:
        request = scratch.parent / f"{scratch.name}.json"
        request.write_text(json.dumps({"account": account, "mailbox": box["name"],
                                       "backup": backup}))
        try:
            result = live.admin.call("restore.mailbox", file=str(request))
        finally:
            request.unlink(missing_ok=True)
    print(f"{account}: {box['name']} restored in place: {result['restored']} message(s) back,"
          f" {result['reflagged']} reflagged, {result['expunged']} expunged"
          f" (UIDVALIDITY {result['uidvalidity']}{', recreated' if result['recreated'] else ''})")
    return lost


def _keep(blobs: dict[str, bytes], data: bytes) -> str:
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    blobs[sha] = data
    return sha


def _ensure_mailbox(live: _LiveStore, account: str, mailbox: str) -> None:
    """Create the folder on the primary unless it exists (cluster)."""
    if mailbox not in {b.name for b in live.call("list_mailboxes", account)}:
        live.call("create_mailbox", account, mailbox, None)


def _append(live: _LiveStore, account: str, mailbox: str, m: Any, blobs: dict) -> None:
    if not live.cluster:
        live.admin.call("restore.append", account=account, mailbox=mailbox, blob=m.blob,
                        flags=list(m.flags), internaldate=m.internaldate)
        return
    live.call("append", account, mailbox, blobs[m.blob], flags=list(m.flags),
              internaldate=m.internaldate)


# -- drill restore ----------------------------------------------------------------


def _drill_restore(config: Any, args: argparse.Namespace) -> int:
    """Restore every shard into scratch, check every blob, compare with the live system."""
    from storage import restore

    started = time.time()
    live = _LiveStore(config)
    try:
        r = _Restore(config, args, live.cid)
        _, newest = r.catalog.window()
        scratch = Path(args.scratch) if args.scratch else None
        work = restore.scratch_dir(scratch)
        report: dict[str, Any] = {"cluster": r.cid, "at": r.at, "shards": 0, "messages": 0,
                                  "bytes": 0, "rpo_seconds": round(started - newest, 1),
                                  "newest_backed_up": newest, "lost": [], "violations": [],
                                  "expunged_since": 0, "flags_changed": 0, "newer_live": 0}
        try:
            for shard in r.catalog.shards():
                _drill_shard(r, live, shard, work, report)
        finally:
            restore.remove_tree(work)
    finally:
        live.close()
    report["duration_seconds"] = round(time.time() - started, 1)
    ok = not report["violations"] and not report["lost"]
    report["ok"] = ok
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_drill(report)
    return 0 if ok else 1


def _drill_shard(r: _Restore, live: _LiveStore, shard: int, work: Path, report: dict) -> None:
    from storage import restore

    built = _build(r, shard, work / f"shard-{shard:04d}.sqlite")
    report["shards"] += 1
    report["lost"] += [f"shard {shard:04d}: {x}" for x in built.lost_objects]
    messages = restore.shard_messages(built.path)
    needed: dict[str, list[str]] = {}
    for m in messages:
        needed.setdefault(m.blob, []).append(f"{m.account}/{m.mailbox} uid {m.uid}")
    from node.progress import Progress

    with Progress(f"shard {shard:04d}: blobs", unit="B") as bar:  # downloaded, hash-checked
        blobs = restore.fetch_blobs(r.catalog, needed, None, bar)
    report["lost"] += blobs.messages_lost
    report["messages"] += len(messages)
    report["bytes"] += blobs.octets
    by_account: dict[str, list] = {}
    for m in messages:
        by_account.setdefault(m.account, []).append(m)
    for account, mine in by_account.items():
        _compare(account, mine, live.listing(account), report)


def _compare(account: str, backed: list, listing: list[dict], report: dict) -> None:
    """Backed-up messages against the live ones: same (mailbox, uidvalidity,
    uid) must mean the same blob (else a violation); gone live is an expunge."""
    now = {}
    for box in listing:
        for uid, blob, flags in box["messages"]:
            now[(box["name"], box["uidvalidity"], uid)] = (blob, frozenset(flags))
    seen = set()
    for m in backed:
        key = (m.mailbox, m.uidvalidity, m.uid)
        seen.add(key)
        found = now.get(key)
        if found is None:
            report["expunged_since"] += 1
        elif found[0] != m.blob:
            report["violations"].append(
                f"{account}/{m.mailbox} uidvalidity {m.uidvalidity} uid {m.uid}: backup blob"
                f" {m.blob[:12]}…, live blob {found[0][:12]}…")
        elif found[1] != frozenset(m.flags):
            report["flags_changed"] += 1
    report["newer_live"] += sum(1 for k in now if k not in seen)


def _print_drill(report: dict) -> None:
    from node.progress import duration, human
    from storage import restore

    print(f"restore drill of cluster {report['cluster']}:"
          f" {'OK' if report['ok'] else 'FAILED'}")
    print(f"  restored: {report['shards']} shard(s), {report['messages']} message(s),"
          f" {human(report['bytes'], 'B')} of blobs verified,"
          f" in {duration(report['duration_seconds'])}")
    print(f"  backup lag (RPO): {report['rpo_seconds']:.1f} s (newest backed-up op"
          f" {restore.iso(report['newest_backed_up'])})")
    print(f"  since the backup: {report['expunged_since']} expunged,"
          f" {report['flags_changed']} with other flags, {report['newer_live']} newer live")
    for line in report["lost"]:
        print(f"  LOST {line}")
    for line in report["violations"]:
        print(f"  VIOLATION {line}")
