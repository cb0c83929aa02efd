"""Reading a backup: the catalog, chain checks, point-in-time shard builds, blobs.

Theory of operation (contracts: docs/backup.md)
-----------------------------------------------
A backup of cluster ``cid`` is a set of sealed objects: per shard, snapshots
(``VACUUM INTO`` copies of the shard database, each naming its last op) and
log segments (JSON lines of ops, chained by the previous segment's key and
the SHA-256 of its object bytes); content-addressed blobs; etcd exports.

``Catalog`` lists them once (keys carry the shard, the op range and, for
etcd, the time).  Snapshot times and segment times are in the object
headers, read on demand.

The state of a shard at time T (``build_shard``) is the newest snapshot
taken at or before T (or an empty database), followed by the chained
segments' ops, in index order, up to the first op logged after T: a prefix
of the log, hence a state the live shard really had.  Ops are applied with
storage/shard.py's own ``intent_apply_ops`` -- the function replicas use --
so the result has the digest the live shard had at that position.  A
missing or damaged segment, or one whose chain link does not match, stops
the build there: what follows is reported as lost, never guessed.  A
damaged snapshot is passed over for the next older one.

Blobs (``fetch_blobs``) are fetched after the databases: each one named by a
restored message that the destination store lacks, checked against its name;
the ones that cannot be had are reported with the messages that need them.

Everything here blocks (downloads, decryption, SQLite): a gevent server calls
it through the threadpool; the CLI calls it directly.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import json
import math
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import gevent.pool

from storage import backup_crypto as crypto
from storage.blobs import BlobStore, is_blob_name
from storage.shard import Op, Shard, intent_apply_ops

Progress = Callable[[int], None]  # called with octets (or items) just done

_SEG_RE = re.compile(r"/shards/(\d{4})/seg/(\d{12})-(\d{12})$")
_SNAP_RE = re.compile(r"/shards/(\d{4})/snap/(\d{12})$")
_ETCD_RE = re.compile(r"/etcd/(\d{8}T\d{6}Z)-(\d+)$")
_APPLY_BATCH = 2000  # ops per write transaction while building a shard
CLOCK_SKEW = 600.0  # seconds the target's clock may be ahead of the nodes'
BLOB_FETCHES = 8  # blobs downloaded at once


class RestoreError(Exception):
    """A restore cannot start or go on; the message is for the operator."""


class WrongKeyError(RestoreError):
    """The backup is sealed under a key the key file does not hold."""


class OutsideWindow(RestoreError):
    """``--at`` is outside the point-in-time window of the backup."""

    def __init__(self, at: float, window: tuple[float, float]) -> None:
        super().__init__(
            f"--at {iso(at)} is outside the backup's point-in-time window"
            f" {iso(window[0])} .. {iso(window[1])}")
        self.window = window


class ObjectLost(Exception):
    """One object cannot be read: missing, or damaged (``reason`` says which)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def iso(ts: float) -> str:
    """A time for humans: 2026-11-28 01:02:03 UTC (or "the beginning")."""
    if not math.isfinite(ts) or ts <= 0:
        return "the beginning"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def parse_time(text: str) -> float:
    """``--at``: seconds since the epoch, or ISO 8601 (``2026-11-27T10:00[:00][Z]``,
    a space instead of the T; UTC unless an offset is given)."""
    from datetime import datetime

    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" UTC", "+00:00"))
    except ValueError:
        raise RestoreError(f"bad time {text!r} (e.g. 2026-11-27T10:00:00Z or"
                           " seconds since the epoch)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


# ---------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class Segment:
    key: str
    shard: int
    first: int
    last: int


@dataclass(frozen=True)
class Snapshot:
    key: str
    shard: int
    last_index: int
    uploaded: float = math.inf  # the target's modification time: after the snapshot's ts


@dataclass(frozen=True)
class EtcdExport:
    key: str
    ts: float
    revision: int


@dataclass
class ChainReport:
    """``verify_chain``: the verified segments and what breaks the chain."""

    shard: int
    segments: int = 0  # segments checked and linked
    first: int = 0  # first op index the chain covers (0: none)
    last: int = 0  # last op index reachable without a break
    problems: list[str] = field(default_factory=list)  # "KEY: what is wrong"
    lost: tuple[int, int] | None = None  # op indexes not restorable (after a break)

    @property
    def ok(self) -> bool:
        return not self.problems


class Catalog:
    """What a backup holds for cluster ``cid`` in ``target`` under ``keys``.

    ``keys``: one ``backup_crypto.Key`` or a mapping key id -> Key.
    """

    def __init__(self, target: Any, keys: Any, cid: str) -> None:
        self.target = target
        self.keys = keys
        self.cid = cid
        self._headers: dict[str, crypto.Header] = {}
        self.segments: dict[int, list[Segment]] = {}
        self.snapshots: dict[int, list[Snapshot]] = {}
        self.etcd: list[EtcdExport] = []
        self.refresh()

    # -- listing

    def refresh(self) -> None:
        """List the target again."""
        self.segments, self.snapshots, self.etcd = {}, {}, []
        for key, mtime in self._list(f"{self.cid}/shards/"):
            if m := _SEG_RE.search(key):
                seg = Segment(key, int(m[1]), int(m[2]), int(m[3]))
                self.segments.setdefault(seg.shard, []).append(seg)
            elif m := _SNAP_RE.search(key):
                snap = Snapshot(key, int(m[1]), int(m[2]), mtime)
                self.snapshots.setdefault(snap.shard, []).append(snap)
        for items in (*self.segments.values(), *self.snapshots.values()):
            items.sort(key=lambda o: (getattr(o, "first", 0), getattr(o, "last_index", 0),
                                      getattr(o, "last", 0)))
        for key, _ in self._list(f"{self.cid}/etcd/"):
            if m := _ETCD_RE.search(key):
                ts = float(calendar.timegm(time.strptime(m[1], "%Y%m%dT%H%M%SZ")))
                self.etcd.append(EtcdExport(key, ts, int(m[2])))
        self.etcd.sort(key=lambda e: (e.ts, e.revision))

    def _list(self, prefix: str) -> list[tuple[str, float]]:
        """(key, modification time) of every object under ``prefix``."""
        try:
            return [(item.key, float(item.mtime or math.inf))
                    for item in self.target.list(prefix)]
        except Exception as exc:
            raise RestoreError(f"cannot list the backup target: {_why(exc)}") from None

    def shards(self) -> list[int]:
        """Shard numbers with any snapshot or segment."""
        return sorted(set(self.segments) | set(self.snapshots))

    def empty(self) -> bool:
        return not self.shards() and not self.etcd

    # -- objects

    def header(self, key: str) -> crypto.Header:
        """An object's header (cached); ObjectLost if it cannot be read."""
        found = self._headers.get(key)
        if found is None:
            found = self._headers[key] = self._fetch_header(key)
        return found

    def _fetch_header(self, key: str) -> crypto.Header:
        try:
            header = crypto.header_from(
                lambda offset, length: self.target.get_range(key, offset, length))
        except crypto.CorruptObject as exc:
            raise ObjectLost(key, f"damaged ({exc})") from None
        except Exception as exc:
            raise _lost_or_error(key, exc) from None
        return header

    def fetch(self, key: str) -> tuple[crypto.Header, bytes]:
        """(header, plaintext) of an object; ObjectLost, WrongKeyError, RestoreError."""
        try:
            data = self.target.get(key)
        except Exception as exc:
            raise _lost_or_error(key, exc) from None
        header, plain = self._open(key, data)
        return header, plain

    def fetch_raw(self, key: str) -> tuple[crypto.Header, bytes, bytes]:
        """(header, plaintext, sealed object bytes): segments need the hash of the latter."""
        try:
            data = self.target.get(key)
        except Exception as exc:
            raise _lost_or_error(key, exc) from None
        header, plain = self._open(key, data)
        return header, plain, data

    def fetch_to_file(self, key: str, dest: Path) -> crypto.Header:
        """Decrypt a (large) object into ``dest``; same errors as ``fetch``.

        No sealed staging copy: chunk-aligned ranged GETs (several in
        flight on S3) are decrypted as they arrive, written at their
        offsets, and ``dest`` is fsynced once whole and verified."""
        try:
            header = crypto.open_remote_to_file(self.keys, self.target, key, dest)
        except crypto.WrongKey as exc:
            raise _wrong_key(exc) from None
        except crypto.CorruptObject as exc:
            raise ObjectLost(key, f"damaged ({exc})") from None
        except Exception as exc:
            raise _lost_or_error(key, exc) from None
        self._headers[key] = header
        return header

    def _open(self, key: str, data: bytes) -> tuple[crypto.Header, bytes]:
        try:
            header, plain = crypto.open_object(self.keys, data)
        except crypto.WrongKey as exc:
            raise _wrong_key(exc) from None
        except crypto.CorruptObject as exc:
            raise ObjectLost(key, f"damaged ({exc})") from None
        self._headers[key] = header
        return header, plain

    def check_key(self) -> None:
        """WrongKeyError (naming both key ids) unless the newest small objects
        (a segment, an etcd export; else a snapshot) are sealed under a key we hold."""
        probes = [s[-1].key for s in self.segments.values() if s][:1]
        probes += [e.key for e in self.etcd[-1:]]
        if not probes:
            probes = [s[-1].key for s in self.snapshots.values() if s][:1]
        held = {self.keys.key_id} if isinstance(self.keys, crypto.Key) else set(self.keys)
        for key in probes:
            try:
                header = self.header(key)
            except ObjectLost:
                continue
            if header.key_id not in held:
                raise _wrong_key(crypto.WrongKey(",".join(sorted(held)), header.key_id))

    # -- times

    def snapshot_ts(self, snap: Snapshot) -> float:
        return float(self.header(snap.key).meta.get("ts", 0.0))

    def shard_window(self, shard: int) -> tuple[float, float]:
        """(oldest restorable time, newest uploaded op time) of one shard.

        Oldest: -inf when the segments start at op 1 (everything is in
        them), else the oldest snapshot's upload time.  Newest: the last
        op time of the newest readable segment (a snapshot never holds ops
        past the uploaded segments), else the newest snapshot's time."""
        segs = self.segments.get(shard, [])
        snaps = self.snapshots.get(shard, [])
        oldest = -math.inf if segs and segs[0].first == 1 else math.inf
        if snaps and oldest == math.inf:  # upload time: no download, a little late
            oldest = snaps[0].uploaded
        newest = -math.inf
        for seg in reversed(segs):
            try:
                newest = float(self.header(seg.key).meta.get("last_ts", 0.0))
                break
            except ObjectLost:
                continue
        for snap in reversed(snaps if newest == -math.inf else []):
            try:
                newest = self.snapshot_ts(snap)
                break
            except ObjectLost:
                continue
        return oldest, newest

    def window(self) -> tuple[float, float]:
        """The cluster's point-in-time window: every shard restorable from
        the first value; the second is the newest op uploaded anywhere."""
        oldest, newest = -math.inf, -math.inf
        for shard in self.shards():
            lo, hi = self.shard_window(shard)
            oldest, newest = max(oldest, lo), max(newest, hi)
        if self.etcd:
            newest = max(newest, self.etcd[-1].ts)
            oldest = max(oldest, self.etcd[0].ts) if not self.shards() else oldest
        return oldest, newest

    def check_at(self, at: float | None) -> None:
        """OutsideWindow unless ``at`` (None: the latest) can be restored."""
        if at is None:
            return
        oldest, newest = self.window()
        if at < oldest or at > max(newest, time.time()):
            raise OutsideWindow(at, (oldest, newest))

    def etcd_export(self, at: float | None) -> EtcdExport | None:
        """The newest etcd export taken at or before ``at``."""
        fitting = [e for e in self.etcd if at is None or e.ts <= at]
        return fitting[-1] if fitting else None

    # -- chain verification

    def verify_chain(self, shard: int, progress: Progress | None = None) -> ChainReport:
        """Download every segment of ``shard`` and check contiguity and the
        ``prev``/``prev_sha256`` links; report each problem by key."""
        report = ChainReport(shard)
        prev: tuple[Segment, str] | None = None
        for seg in self.segments.get(shard, []):
            try:
                header, _plain, raw = self.fetch_raw(seg.key)
            except ObjectLost as exc:
                report.problems.append(str(exc))
                _mark_lost(report, seg)
                prev = None
                continue
            finally:
                if progress is not None:
                    progress(1)
            problem = _link_problem(prev, seg, header) if prev else None
            if problem:
                report.problems.append(problem)
            if problem or report.lost is not None:  # after a break nothing restores
                _mark_lost(report, seg)
            else:
                report.segments += 1
                report.first = report.first or seg.first
                report.last = seg.last
            prev = (seg, hashlib.sha256(raw).hexdigest())
        return report


def _mark_lost(report: ChainReport, seg: Segment) -> None:
    lo = seg.first if report.lost is None else report.lost[0]
    report.lost = (lo, max(seg.last, report.lost[1] if report.lost else 0))


def _link_problem(prev: tuple[Segment, str], seg: Segment, header: crypto.Header) -> str | None:
    """Why ``seg`` does not continue ``prev`` (None if it does)."""
    before, digest = prev
    meta = header.meta
    if seg.first == before.last + 1 and meta.get("prev") is None:
        return None  # a new chain, started after a snapshot at first - 1 (storage/backup.py)
    if seg.first != before.last + 1:
        return (f"{seg.key}: ops {before.last + 1}..{seg.first - 1} are missing"
                f" (gap after {before.key})")
    if meta.get("prev") != before.key:
        return f"{seg.key}: chained to {meta.get('prev')!r}, not to {before.key}"
    if meta.get("prev_sha256") != digest:
        return f"{seg.key}: the previous segment {before.key} was altered (prev_sha256 differs)"
    return None


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _wrong_key(exc: crypto.WrongKey) -> WrongKeyError:
    return WrongKeyError(
        f"wrong backup key: the backup is sealed with key {exc.key_id_found},"
        f" the key file holds key {exc.key_id_expected}")


def _lost_or_error(key: str, exc: BaseException) -> Exception:
    """NoSuchObject -> ObjectLost; anything else the target raised -> RestoreError."""
    from storage import backup_target as bt

    if isinstance(exc, bt.NoSuchObject):
        return ObjectLost(key, "missing")
    if isinstance(exc, crypto.CorruptObject):
        return ObjectLost(key, f"damaged ({exc})")
    return RestoreError(f"backup target: {key}: {_why(exc)}")


# --------------------------------------------------------------- shard builds


@dataclass
class ShardRestoreReport:
    shard: int
    path: Path
    snapshot: str | None = None  # key of the snapshot used (None: from an empty database)
    position: tuple[int, int] = (0, 0)  # (last_index, last_epoch) restored
    last_ts: float = 0.0  # time of the last op restored (snapshot time if none)
    ops_applied: int = 0
    lost_objects: list[str] = field(default_factory=list)  # "KEY: reason"
    lost_ops: tuple[int, int] | None = None  # op indexes after a break, not restored
    digest: str = ""
    unreadable_snapshot: int = 0  # last op of the newest lost snapshot that was wanted

    @property
    def ok(self) -> bool:
        return not self.lost_objects


def build_shard(
    catalog: Catalog,
    shard: int,
    at: float | None,
    dest: Path,
    progress: Progress | None = None,
) -> ShardRestoreReport:
    """Build shard ``shard`` as it was at ``at`` (None: the newest backed-up
    state) into the new database file ``dest``; see the module docstring."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{dest}{suffix}").unlink(missing_ok=True)
    report = ShardRestoreReport(shard, dest)
    base = _install_snapshot(catalog, shard, at, dest, report)
    db = Shard(dest, fsync=False)
    db.open_writer()
    try:
        _apply_segments(catalog, db, shard, at, base, report, progress)
        db.open_reader()
        report.position, report.digest = db.state_digest()
        if report.lost_ops is None and report.position[0] < report.unreadable_snapshot:
            # Only the lost snapshot held these ops (no segment covers them).
            report.lost_ops = (report.position[0] + 1, report.unreadable_snapshot)
    finally:
        db.close()
    _finish(dest)
    return report


def _install_snapshot(
    catalog: Catalog, shard: int, at: float | None, dest: Path, report: ShardRestoreReport
) -> int:
    """Decrypt the newest usable snapshot at or before ``at`` into ``dest``;
    returns its last op index (0 when none is usable: an empty database)."""
    for snap in reversed(catalog.snapshots.get(shard, [])):
        if at is not None and snap.uploaded > at + CLOCK_SKEW and snap.uploaded != math.inf:
            continue  # uploaded well after ``at``: taken after it (no download)
        try:
            if at is not None and catalog.snapshot_ts(snap) > at:
                continue
            header = catalog.fetch_to_file(snap.key, dest)
            last = _snapshot_last(dest, snap)
        except ObjectLost as exc:  # the next older one, or the log from op 1
            report.lost_objects.append(str(exc))
            report.unreadable_snapshot = max(report.unreadable_snapshot, snap.last_index)
            dest.unlink(missing_ok=True)
            continue
        report.snapshot = snap.key
        report.last_ts = float(header.meta.get("ts", 0.0))
        return last
    return 0


def _snapshot_last(path: Path, snap: Snapshot) -> int:
    """The snapshot's last op index, which must be the one its key names."""
    try:
        with closing(sqlite3.connect(path)) as conn:
            row = conn.execute(
                "SELECT value FROM shard_meta WHERE key = 'last_index'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise ObjectLost(snap.key, f"damaged (not a shard database: {exc})") from None
    last = row[0] if row else 0
    if last != snap.last_index:
        raise ObjectLost(snap.key, f"damaged (holds op {last}, its name says {snap.last_index})")
    return last


def _apply_segments(
    catalog: Catalog, db: Shard, shard: int, at: float | None, base: int,
    report: ShardRestoreReport, progress: Progress | None,
) -> None:
    """Apply the chained segments' ops after ``base`` up to the first op after ``at``."""
    segs = [s for s in catalog.segments.get(shard, []) if s.last > base]
    expected = base + 1
    prev: tuple[Segment, str] | None = None
    for seg in segs:
        if seg.first > expected:
            report.lost_objects.append(
                f"{catalog.cid}/shards/{shard:04d}/seg: ops {expected}..{seg.first - 1} missing")
            report.lost_ops = (expected, segs[-1].last)
            return
        try:
            header, plain, raw = catalog.fetch_raw(seg.key)
        except ObjectLost as exc:
            report.lost_objects.append(str(exc))
            report.lost_ops = (expected, segs[-1].last)
            return
        if progress is not None:
            progress(len(raw))
        problem = _link_problem(prev, seg, header) if prev else None
        if problem:
            report.lost_objects.append(problem)
            report.lost_ops = (expected, segs[-1].last)
            return
        prev = (seg, hashlib.sha256(raw).hexdigest())
        try:
            ops = [op for op in _segment_ops(seg, plain) if op.index >= expected]
        except ObjectLost as exc:
            report.lost_objects.append(str(exc))
            report.lost_ops = (expected, segs[-1].last)
            return
        applied = _apply_until(db, ops, at, report)
        expected += applied
        if applied < len(ops):  # an op after ``at``: the state at ``at`` is built
            return


def _segment_ops(seg: Segment, plain: bytes) -> list[Op]:
    """The ops of a segment, which must be exactly first..last in order."""
    try:
        ops = [Op(int(i), int(e), float(t), str(o), a)
               for i, e, t, o, a in (json.loads(line) for line in plain.splitlines()
                                     if line.strip())]
    except (ValueError, TypeError) as exc:
        raise ObjectLost(seg.key, f"damaged (not op lines: {exc})") from None
    if [op.index for op in ops] != list(range(seg.first, seg.last + 1)):
        raise ObjectLost(seg.key, "damaged (does not hold the ops its name says)")
    return ops


def _apply_until(
    db: Shard, ops: list[Op], at: float | None, report: ShardRestoreReport
) -> int:
    """Apply ``ops`` in order until one is after ``at``; how many were applied."""
    cut = len(ops)
    if at is not None:
        cut = next((i for i, op in enumerate(ops) if op.timestamp > at), len(ops))
    for start in range(0, cut, _APPLY_BATCH):
        batch = ops[start:min(cut, start + _APPLY_BATCH)]
        ((ok, value, _),) = db.run_batch([functools.partial(intent_apply_ops, ops=batch)])
        if not ok:
            raise RestoreError(f"shard {report.shard}: op {batch[0].index}: {value}")
        report.ops_applied += len(batch)
        report.last_ts = batch[-1].timestamp
    return cut


def _finish(dest: Path) -> None:
    """Checkpoint the WAL into the file, so ``dest`` alone is the database."""
    with closing(sqlite3.connect(dest, isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """A message of a built shard, as the drill and the restores see it."""

    account: str
    mailbox: str
    uidvalidity: int
    uid: int
    blob: str
    size: int
    internaldate: float
    flags: tuple[str, ...]
    modseq: int


def shard_messages(path: Path, account: str | None = None,
                   mailbox: str | None = None) -> list[Message]:
    """Messages of a built shard database (optionally one account / mailbox)."""
    sql = ("SELECT b.account, b.name, m.mailbox, m.uid, m.blob, m.size, m.internaldate,"
           " m.flags, m.modseq FROM messages m JOIN mailboxes b ON b.uidvalidity = m.mailbox")
    where, params = [], []
    if account is not None:
        where.append("b.account = ?")
        params.append(account.lower())
    if mailbox is not None:
        where.append("b.name = ?")
        params.append(mailbox)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY b.account, b.name, m.uid"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return [Message(a, n, uv, u, b, s, d, tuple(f.split()), ms)
                for a, n, uv, u, b, s, d, f, ms in conn.execute(sql, params)]


def shard_mailboxes(path: Path, account: str) -> list[dict]:
    """Mailboxes of an account in a built shard: name, uidvalidity, uidnext,
    highestmodseq, special_use, subscribed."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT name, uidvalidity, uidnext, highestmodseq, special_use, subscribed"
            " FROM mailboxes WHERE account = ? ORDER BY name", (account.lower(),)).fetchall()
    return [{"name": n, "uidvalidity": uv, "uidnext": un, "highestmodseq": h,
             "special_use": su, "subscribed": bool(s)} for n, uv, un, h, su, s in rows]


def shard_accounts(path: Path) -> list[str]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return [a for (a,) in conn.execute("SELECT DISTINCT account FROM mailboxes ORDER BY 1")]


def message_meta(path: Path, uidvalidity: int, uids: Iterable[int]) -> dict[int, dict]:
    """The stored metadata (storage/mime.py) of messages of a built shard."""
    out: dict[int, dict] = {}
    wanted = list(uids)
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            for uid, meta in conn.execute(
                f"SELECT uid, meta FROM messages WHERE mailbox = ? AND uid IN"
                f" ({','.join('?' * len(chunk))})", (uidvalidity, *chunk)):
                out[uid] = json.loads(meta)
    return out


def referenced_blobs(path: Path) -> dict[str, list[str]]:
    """blob -> the messages (and queue entries) of a built shard that need it,
    as "account/mailbox uid N" (or "queue ID"; an inline queued body needs none)."""
    need: dict[str, list[str]] = {}
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        for account, name, uid, blob in conn.execute(
                "SELECT b.account, b.name, m.uid, m.blob FROM messages m"
                " JOIN mailboxes b ON b.uidvalidity = m.mailbox"):
            need.setdefault(blob, []).append(f"{account}/{name} uid {uid}")
        for qid, blob in conn.execute("SELECT id, blob FROM queue WHERE blob <> ''"):
            need.setdefault(blob, []).append(f"queue {qid}")
    return need


@dataclass
class BlobReport:
    fetched: int = 0
    present: int = 0  # already in the destination store
    octets: int = 0
    lost: dict[str, str] = field(default_factory=dict)  # sha -> reason
    messages_lost: list[str] = field(default_factory=list)  # "account/mailbox uid N: sha reason"

    @property
    def ok(self) -> bool:
        return not self.lost


def blob_key(cid: str, sha: str) -> str:
    return f"{cid}/blobs/{sha[:2]}/{sha}"


def fetch_blobs(
    catalog: Catalog,
    shas: dict[str, list[str]] | Iterable[str],
    blob_store: BlobStore | Callable[[bytes], str] | None,
    progress: Progress | None = None,
    have: Callable[[str], bool] | None = None,
) -> BlobReport:
    """Fetch the named blobs into ``blob_store`` (a BlobStore, or a
    ``put(bytes) -> sha`` callable; None only checks them), each checked
    against its name; ``shas`` may map each to the messages needing it, which
    the report then names for every blob lost."""
    needers = shas if isinstance(shas, dict) else {s: [] for s in shas}
    put = blob_store.put if isinstance(blob_store, BlobStore) else blob_store
    if have is None and isinstance(blob_store, BlobStore):
        have = blob_store.exists
    report = BlobReport()
    todo = []
    for sha in sorted(needers):
        if have is not None and have(sha):
            report.present += 1
        else:
            todo.append(sha)

    def fetch(sha: str) -> tuple[str, bytes | ObjectLost]:
        try:
            return sha, _fetch_blob(catalog, sha)
        except ObjectLost as exc:
            return sha, exc

    # Several at once: downloads overlap (greenlets in a monkey-patched CLI).
    for sha, data in gevent.pool.Pool(BLOB_FETCHES).imap_unordered(fetch, todo):
        if isinstance(data, ObjectLost):
            report.lost[sha] = data.reason
            continue
        if put is not None:
            put(data)
        report.fetched += 1
        report.octets += len(data)
        if progress is not None:
            progress(len(data))
    for sha in sorted(report.lost):
        report.messages_lost += [f"{m}: blob {sha[:12]}… {report.lost[sha]}"
                                 for m in needers[sha]]
    return report


def _fetch_blob(catalog: Catalog, sha: str) -> bytes:
    key = blob_key(catalog.cid, sha)
    if not is_blob_name(sha):
        raise ObjectLost(key, "not a blob name")
    _, data = catalog.fetch(key)
    if hashlib.sha256(data).hexdigest() != sha:
        raise ObjectLost(key, "damaged (content does not match its name)")
    return data


def fetch_blob(catalog: Catalog, sha: str) -> bytes:
    """One blob's bytes, checked against its name (ObjectLost otherwise)."""
    return _fetch_blob(catalog, sha)


# ------------------------------------------------------------- etcd exports


def read_etcd_export(catalog: Catalog, export: EtcdExport) -> dict[str, Any]:
    """{key: value} of an etcd export (keys relative to the etcd prefix)."""
    _, plain = catalog.fetch(export.key)
    data = json.loads(plain)
    if not isinstance(data, dict):
        raise ObjectLost(export.key, "damaged (not a JSON object)")
    return data


EXCLUDED_ETCD = ("/members/", "/positions/", "/controller", "/backup/")


def shard_record(node: str, epoch: int) -> dict:
    """``/shards/<NNNN>`` after a cluster restore: ``node`` the only replica
    and ISR member, lease 0 so the controller promotes it at ``epoch + 1``
    once it registers (placement rule 2)."""
    return {"epoch": epoch, "primary": node, "primary_lease": 0, "replicas": [node],
            "isr": [node], "transfer_to": None}


def scratch_dir(parent: Path | None = None) -> Path:
    """A new private directory for builds (removed by the caller)."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="postroom-restore-", dir=parent))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
