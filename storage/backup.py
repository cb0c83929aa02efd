"""The continuous backup agent: blobs, log segments, snapshots, etcd data, retention.

Theory of operation
-------------------
One ``BackupAgent`` per node (node/app.py, ``[backup] enabled``) runs one
worker greenlet per shard this node leads (every existing shard on a single
node; ``ClusterView.on_role_change`` and a periodic check add and remove
workers).  The object layout and format are docs/backup.md; keys here are
built by the ``*_key`` helpers below, which the CLI and restores share.

A worker first finds the shard's **chain tail**: the newest object under
``seg/``, downloaded, decrypted, and checked against our log (the op at its
last index must be in our log with the same epoch).  A tail that is not in
our log (the log was restored to an earlier point, or diverged) or that
cannot be read is *moved aside* to ``diverged/<unix time>/<name>`` (copied,
then deleted) with a logged error, and the next older segment is tried; so
``seg/`` always holds one linear history.  With no usable tail the worker
starts a new chain after a snapshot: ``snap/<P>`` and then segments from
``P + 1`` whose ``prev`` is null.

Then, every ``segment_interval``: the committed ops after the tail
(``MailStore.ops_since``) are cut into segments (at most 10,000 ops or
64 MiB of JSON each), the blobs they reference are uploaded first (each
blob once: a local SQLite index ``data_dir/backup/uploaded.sqlite``, HEAD on
a miss, ``upload_concurrency`` uploads at once), and the segment is sealed
with ``prev``/``prev_sha256`` and uploaded.  A snapshot (``VACUUM INTO``
copy, sealed part by part while it uploads: no staging copy) is taken when the shard has
none and every ``snapshot_interval``, after the ops up to its position are
in uploaded segments and the blobs its messages and queue reference are
uploaded.  Sealing, hashing, JSON and SQLite run in the threadpool.

The target may be down for long: every failure is logged once per state
change, retried with exponential backoff (1 s doubling to 60 s), and mail
flow never waits for the agent (it only reads the store).  Each round
publishes ``/backup/<node>`` under the session lease: per shard the
uploaded and committed positions with their op times and the lag (now minus
the time of the oldest committed op not yet uploaded; 0 when none).

On the controller node (or a single node) the agent also uploads the etcd
data when it changed, and runs retention once an hour (``prune``; the CLI's
``postroom backup prune`` runs the same function).  Retention marks blobs
from the retained segments' ops and snapshots' tables; the blob set of each
object is cached in the local index (``refs`` table), so each object is
downloaded at most once per node for marking (the incremental part), and
only blobs older than ``BLOB_GRACE`` are deleted, so a blob uploaded for a
segment that is still being written is never taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from storage.model import StorageError

log = logging.getLogger("postroom.backup")

SEGMENT_MAX_OPS = 10_000
SEGMENT_MAX_BYTES = 64 << 20
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
PRUNE_INTERVAL = 3600.0
STREAM_BLOB = 8 << 20  # larger blobs are sealed on demand from their file, not in memory
BLOB_GRACE = 86400.0  # a blob younger than this is never pruned (in-flight segments)
ETCD_EXCLUDED = ("/members/", "/positions/", "/controller", "/backup/")
STATUS_PREFIX = "/backup/"

_SEG_RE = re.compile(r"(\d{12})-(\d{12})$")
_SNAP_RE = re.compile(r"(\d{12})$")


# -- layout (docs/backup.md) --------------------------------------------------


def shard_prefix(cid: str, shard: int) -> str:
    return f"{cid}/shards/{shard:04d}/"


def segment_key(cid: str, shard: int, first: int, last: int) -> str:
    return f"{shard_prefix(cid, shard)}seg/{first:012d}-{last:012d}"


def snapshot_key(cid: str, shard: int, last: int) -> str:
    return f"{shard_prefix(cid, shard)}snap/{last:012d}"


def blob_key(cid: str, sha: str) -> str:
    return f"{cid}/blobs/{sha[:2]}/{sha}"


def etcd_key(cid: str, ts: float, revision: int) -> str:
    return f"{cid}/etcd/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(ts))}-{revision}"


def parse_segment(key: str) -> tuple[int, int] | None:
    """(first, last) of a segment key, None for anything else."""
    if "/seg/" not in key:
        return None
    m = _SEG_RE.search(key)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_snapshot(key: str) -> int | None:
    """last_index of a snapshot key, None for anything else."""
    if "/snap/" not in key:
        return None
    m = _SNAP_RE.search(key)
    return int(m.group(1)) if m else None


def shard_numbers(keys: Iterable[str], cid: str) -> list[int]:
    """Shard numbers seen in keys under ``<cid>/shards/``."""
    found = set()
    head = f"{cid}/shards/"
    for key in keys:
        if key.startswith(head):
            part = key[len(head):].split("/", 1)[0]
            if part.isdigit():
                found.add(int(part))
    return sorted(found)


def encode_segment(ops: Iterable[Any]) -> bytes:
    """JSON lines ``[index, epoch, ts, op, args]`` (docs/backup.md)."""
    return b"".join(
        json.dumps([o.index, o.epoch, o.timestamp, o.op, o.args],
                   separators=(",", ":")).encode() + b"\n"
        for o in ops
    )


def decode_segment(plain: bytes) -> list[list]:
    """The op lines of a segment's plaintext."""
    return [json.loads(line) for line in plain.splitlines() if line.strip()]


def op_blobs(args: dict) -> set[str]:
    """Blobs an op names (append, enqueue, ...): the ``blob`` argument (an
    enqueue with its body inline, ``data``, names none)."""
    blob = args.get("blob") if isinstance(args, dict) else None
    return {blob} if isinstance(blob, str) else set()


def segment_blobs(lines: Iterable[list]) -> set[str]:
    out: set[str] = set()
    for line in lines:
        out |= op_blobs(line[4])
    return out


def snapshot_blobs(path: Path) -> set[str]:
    """Blobs a shard database's messages and queue reference.  Threadpool."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT blob FROM messages UNION"
                            " SELECT blob FROM queue WHERE blob <> ''")  # "": inline body
        return {b for (b,) in rows if isinstance(b, str)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def in_pool(fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) in gevent's threadpool (sealing, hashing, SQLite, JSON)."""
    return gevent.get_hub().threadpool.apply(fn, args)


def cluster_id(config: Any, meta: dict | None) -> str:
    """``/cluster/meta`` id, or the node id in single-node mode."""
    if meta is not None and meta.get("id"):
        return str(meta["id"])
    path = Path(config.data_dir) / "node-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        from node.app import node_id

        return node_id(Path(config.data_dir))


# -- the local index ------------------------------------------------------------


class LocalIndex:
    """``data_dir/backup/uploaded.sqlite``: blobs known to be in the target
    (with the time that was last confirmed), each object's referenced blobs
    (for retention), and the last uploaded position per shard.

    Entries older than ``trust`` seconds are not trusted (HEAD again): a blob
    pruned from the target is never older than the retention window here,
    because each confirmation came with an object that references it.
    Every call runs in the threadpool, one at a time (a semaphore on the
    hub: a monkey-patched threading.Lock must not be taken in pool threads).
    """

    def __init__(self, path: Path, scope: str, trust: float) -> None:
        self.path = Path(path)
        self.scope = scope  # target + cluster id: one file may serve several targets
        self.trust = trust
        self._lock = gevent.lock.Semaphore()
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        in_pool(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(
            "CREATE TABLE IF NOT EXISTS uploaded (scope TEXT, sha TEXT, ts REAL,"
            " PRIMARY KEY (scope, sha)) WITHOUT ROWID;"
            "CREATE TABLE IF NOT EXISTS refs (scope TEXT, key TEXT, blobs TEXT, ts REAL,"
            " PRIMARY KEY (scope, key)) WITHOUT ROWID;"
            "CREATE TABLE IF NOT EXISTS position (scope TEXT, shard INTEGER, idx INTEGER,"
            " ts REAL, PRIMARY KEY (scope, shard)) WITHOUT ROWID;"
        )
        self._conn = conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._lock:
            if self._conn is None:
                raise StorageError("backup index is closed")
            return in_pool(fn, self._conn)

    def missing(self, shas: Iterable[str]) -> set[str]:
        """The blobs not confirmed in the target within ``trust`` seconds."""
        wanted = sorted(set(shas))
        horizon = time.time() - self.trust

        def q(conn: sqlite3.Connection) -> set[str]:
            have = set()
            for i in range(0, len(wanted), 500):
                part = wanted[i:i + 500]
                marks = ",".join("?" * len(part))
                have |= {s for (s,) in conn.execute(
                    f"SELECT sha FROM uploaded WHERE scope = ? AND ts >= ? AND sha IN ({marks})",
                    (self.scope, horizon, *part))}
            return set(wanted) - have
        return self._run(q) if wanted else set()

    def add(self, shas: Iterable[str]) -> None:
        rows = [(self.scope, s, time.time()) for s in set(shas)]

        def q(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany("INSERT OR REPLACE INTO uploaded VALUES (?, ?, ?)", rows)
        if rows:
            self._run(q)

    def forget(self, shas: Iterable[str]) -> None:
        rows = [(self.scope, s) for s in set(shas)]

        def q(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany("DELETE FROM uploaded WHERE scope = ? AND sha = ?", rows)
        if rows:
            self._run(q)

    def refs(self, keys: Iterable[str]) -> dict[str, tuple[set[str] | None, float | None]]:
        """Cached (blob set or None if unknown, snapshot ts) of objects known here."""
        wanted = list(keys)

        def q(conn: sqlite3.Connection) -> dict[str, tuple[set[str] | None, float | None]]:
            out = {}
            for i in range(0, len(wanted), 500):
                part = wanted[i:i + 500]
                marks = ",".join("?" * len(part))
                for key, blobs, ts in conn.execute(
                        f"SELECT key, blobs, ts FROM refs WHERE scope = ? AND key IN ({marks})",
                        (self.scope, *part)):
                    out[key] = (set(blobs.split()) if blobs is not None else None, ts)
            return out
        return self._run(q) if wanted else {}

    def set_refs(self, key: str, blobs: Iterable[str] | None, ts: float | None = None) -> None:
        """Remember an object's blob set (None: unknown) and a snapshot's ``ts``."""
        text = " ".join(sorted(blobs)) if blobs is not None else None

        def q(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("INSERT OR REPLACE INTO refs VALUES (?, ?, ?, ?)",
                             (self.scope, key, text, ts))
        self._run(q)

    def drop_refs(self, keys: Iterable[str]) -> None:
        rows = [(self.scope, k) for k in keys]

        def q(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany("DELETE FROM refs WHERE scope = ? AND key = ?", rows)
        if rows:
            self._run(q)

    def position(self, shard: int) -> tuple[int, float] | None:
        def q(conn: sqlite3.Connection) -> tuple[int, float] | None:
            row = conn.execute("SELECT idx, ts FROM position WHERE scope = ? AND shard = ?",
                               (self.scope, shard)).fetchone()
            return (row[0], row[1]) if row else None
        return self._run(q)

    def set_position(self, shard: int, index: int, ts: float) -> None:
        def q(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("INSERT OR REPLACE INTO position VALUES (?, ?, ?, ?)",
                             (self.scope, shard, index, ts))
        self._run(q)


# -- objects ---------------------------------------------------------------------


class Sealer:
    """Target + key: seal/upload and download/open objects (threadpool for crypto)."""

    def __init__(self, target: Any, key: Any) -> None:
        from storage import backup_crypto

        self.crypto = backup_crypto
        self.target = target
        self.key = key

    def put(self, key: str, kind: str, plaintext: bytes, meta: dict) -> bytes:
        """Seal and upload; returns the object's bytes."""
        data = in_pool(self.crypto.seal, self.key, kind, plaintext, meta)
        self.target.put(key, data)
        return data

    def put_file(self, key: str, kind: str, source: Path, meta: dict) -> None:
        """Seal a file on demand while it uploads (``SealedFile``: one hashing
        pass, then each part sealed in the threadpool as it is sent; no
        staging copy).  ``source`` must not change until this returns."""
        sealed = in_pool(self.crypto.SealedFile, self.key, kind, Path(source), meta)
        try:
            self.target.put(key, sealed)
        finally:
            sealed.close()

    def get_file(self, key: str, dest: Path) -> Any:
        """Download and decrypt a (large) object into ``dest``; its header."""
        return self.crypto.open_remote_to_file(self.key, self.target, key, dest, run=in_pool)

    def get(self, key: str) -> tuple[bytes, Any, bytes]:
        """(object bytes, header, plaintext); CorruptObject / WrongKey from crypto."""
        data = self.target.get(key)
        header, plain = in_pool(self.crypto.open_object, self.key, data)
        return data, header, plain


def header_meta(header: Any) -> dict:
    return dict(getattr(header, "meta", None) or {})


# -- the agent -------------------------------------------------------------------


@dataclass
class ShardState:
    """What one shard's worker knows; also what /backup/<node> reports."""

    number: int
    tail_key: str | None = None  # newest segment in the target (our chain)
    tail_sha256: str | None = None
    tail_last: int | None = None  # None: tail not found yet
    base: int | None = None  # a new chain starts after this snapshot position
    uploaded: tuple[int, float] | None = None
    last_snapshot: tuple[int, float] | None = None  # (last_index, ts)
    snapshot_due: float = 0.0
    segments: list[tuple[int, int, str]] = field(default_factory=list)  # recent (first, last, key)
    error: str = ""


class BackupAgent:
    """Ships every shard this node leads to the backup target (module docstring)."""

    def __init__(self, config: Any, store: Any, view: Any, session: Any,
                 meta: dict | None) -> None:
        from storage import backup_crypto, backup_target

        self.config = config
        self.settings = config.backup
        self.store = store
        self.view = view
        self.session = session
        self.cid = cluster_id(config, meta)
        self.node = (view.node_name if view is not None
                     else (config.cluster.name or self.cid))
        self.target = backup_target.open_target(self.settings)
        self.key = backup_crypto.load_key(self.settings.key_file)
        self.sealer = Sealer(self.target, self.key)
        self.work_dir = Path(config.data_dir) / "backup"
        retention = max(1, int(self.settings.retention_days)) * 86400.0
        self.index = LocalIndex(self.work_dir / "uploaded.sqlite",
                                f"{self.settings.target}|{self.cid}",
                                max(3600.0, retention - 86400.0))
        self.pool = gevent.pool.Pool(max(1, int(self.settings.upload_concurrency)))
        self.interval = max(0.05, float(self.settings.segment_interval))
        self.shards: dict[int, ShardState] = {}
        self.workers: dict[int, gevent.Greenlet] = {}
        self._inflight: dict[str, gevent.Greenlet] = {}  # blob uploads running now
        self._failing: set[str] = set()  # who last failed on the target ("shard N", "etcd")
        self.last_error = ""
        self._greenlets: list[gevent.Greenlet] = []
        self._cancel_role: Callable[[], None] | None = None
        self._stopping = gevent.event.Event()
        self._etcd_digest = ""
        self._next_prune = time.time() + 60.0
        self.rounds = 0  # completed shipping rounds (tests, metrics)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.work_dir.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        self.index.open()
        if self.view is not None:
            self._cancel_role = self.view.on_role_change(lambda _n: self._reconcile())
        self._greenlets = [gevent.spawn(self._supervise)]
        log.info("backup agent started: target %s, cluster id %s, every %.1fs",
                 self.settings.target, self.cid, self.interval)

    def stop(self) -> None:
        self._stopping.set()
        if self._cancel_role is not None:
            self._cancel_role()
        gevent.killall(list(self.workers.values()) + self._greenlets, block=True, timeout=5)
        self.workers.clear()
        self.pool.kill(block=True, timeout=5)
        self.index.close()
        try:
            self.session.delete(STATUS_PREFIX + self.node)
        except Exception:  # best effort: the lease removes it anyway
            pass

    def led_shards(self) -> list[int]:
        if self.view is None:
            return self.store.existing_shards()
        return list(self.view.local_primary_shards())

    def _reconcile(self) -> None:
        """Start workers for shards we lead, stop the others."""
        if self._stopping.is_set():
            return
        led = set(self.led_shards())
        for n in sorted(set(self.workers) - led):
            self.workers.pop(n).kill(block=False)
            self.shards.pop(n, None)
            self._failing.discard(f"shard {n}")
            log.info("backup: shard %d no longer led here", n)
        for n in sorted(led - set(self.workers)):
            self.shards[n] = ShardState(n)
            self.workers[n] = gevent.spawn(self._shard_loop, self.shards[n])

    def _supervise(self) -> None:
        """Reconcile workers, etcd export, retention and status, every interval."""
        while not self._stopping.is_set():
            try:
                self._reconcile()
                if self._is_controller():
                    self._export_etcd()
                    if time.time() >= self._next_prune:
                        self._next_prune = time.time() + PRUNE_INTERVAL
                        prune(self.sealer, self.index, self.cid,
                              self.settings.retention_days)
                    self._note_ok("etcd data and retention")
            except Exception as exc:
                self._note_error("etcd data and retention", exc)
            self.publish()
            self._stopping.wait(self.interval)

    # -- one shard ----------------------------------------------------------------

    def _shard_loop(self, st: ShardState) -> None:
        backoff = BACKOFF_MIN
        while not self._stopping.is_set():
            try:
                self._round(st)
                st.error = ""
                backoff = BACKOFF_MIN
                self._note_ok(f"shard {st.number}")
                delay = self.interval
            except gevent.GreenletExit:
                raise
            except Exception as exc:
                st.error = f"{type(exc).__name__}: {exc}"
                self._note_error(f"shard {st.number}", exc)
                delay, backoff = backoff, min(BACKOFF_MAX, backoff * 2)
            self.rounds += 1
            if self._stopping.wait(delay):
                return

    def _round(self, st: ShardState) -> None:
        if st.tail_last is None and st.base is None:
            self._find_tail(st)
            self._find_snapshot(st)
        if st.base is not None:  # a new chain: its snapshot comes first
            self._snapshot(st)
        elif st.last_snapshot is None or time.time() >= st.snapshot_due:
            self._ship(st)
            self._snapshot(st)
        self._ship(st)

    def _shard_keys(self, st: ShardState, sub: str) -> list[str]:
        return [info.key for info in self.target.list(shard_prefix(self.cid, st.number) + sub)]

    def _find_tail(self, st: ShardState) -> None:
        """The newest segment that is in our log; others moved aside."""
        segs = [(r, k) for k in self._shard_keys(st, "seg/") if (r := parse_segment(k))]
        segs.sort(key=lambda rk: (rk[0][1], rk[0][0]))
        while segs:
            (first, last), key = segs.pop()
            try:
                data, _header, plain = self.sealer.get(key)
            except self.sealer.crypto.WrongKey:
                raise
            except self.sealer.crypto.CorruptObject as exc:
                log.error("backup: shard %d: segment %s is unreadable (%s); moving it aside"
                          " and continuing the chain from the one before", st.number, key, exc)
                self._move_aside(key)
                continue
            lines = in_pool(decode_segment, plain)
            if not lines:
                self._move_aside(key)
                continue
            index, epoch = lines[-1][0], lines[-1][1]
            if self.store.op_epoch(st.number, index) == epoch:
                st.tail_sha256 = in_pool(lambda d=data: hashlib.sha256(d).hexdigest())
                st.tail_key, st.tail_last = key, index
                st.segments = [(first, last, key)]
                st.uploaded = (index, float(lines[-1][2]))
                return
            log.error("backup: shard %d: segment %s ends with op %d of epoch %d, which is not"
                      " in this node's log (restored to an earlier point, or diverged); moving"
                      " it aside to diverged/", st.number, key, index, epoch)
            self._move_aside(key)
        st.base = 0  # no chain: a new one starts after a snapshot
        log.info("backup: shard %d: no segment chain in the target; starting one", st.number)

    def _move_aside(self, key: str) -> None:
        head, name = key.rsplit("/seg/", 1)
        dest = f"{head}/diverged/{int(time.time())}/{name}"
        self.target.put(dest, self.target.get(key))
        self.target.delete([key])

    def _find_snapshot(self, st: ShardState) -> None:
        snaps = sorted(p for p in map(parse_snapshot, self._shard_keys(st, "snap/"))
                       if p is not None)
        if not snaps:
            st.last_snapshot = None
            return
        last = snaps[-1]
        ts = self._snapshot_time(snapshot_key(self.cid, st.number, last))
        st.last_snapshot = (last, ts)
        st.snapshot_due = ts + float(self.settings.snapshot_interval)

    def _snapshot_time(self, key: str) -> float:
        try:
            return snapshot_ts(self.sealer, self.index, key)
        except Exception as exc:
            log.warning("backup: cannot read the header of %s (%s)", key, exc)
            return time.time()

    def _ops_after(self, st: ShardState, after: int) -> list[Any]:
        return self.store.ops_since(st.number, after, SEGMENT_MAX_OPS)

    def _ship(self, st: ShardState) -> None:
        """Upload every committed op after the tail as segments."""
        if st.tail_last is None:
            return
        while not self._stopping.is_set():
            ops = self._ops_after(st, st.tail_last)
            if not ops:
                return
            if ops[0].index != st.tail_last + 1:
                raise StorageError(f"shard {st.number}: the log has no op {st.tail_last + 1}")
            cut, plain = in_pool(_cut_segment, ops)
            self._upload_blobs(set().union(*(op_blobs(o.args) for o in cut)))
            self._upload_segment(st, cut, plain)
            if len(cut) == len(ops) and len(ops) < SEGMENT_MAX_OPS:
                return

    def _upload_segment(self, st: ShardState, ops: list[Any], plain: bytes) -> None:
        first, last = ops[0], ops[-1]
        self._require_lead(st)
        key = segment_key(self.cid, st.number, first.index, last.index)
        meta = {"shard": st.number, "first": first.index, "last": last.index,
                "first_ts": first.timestamp, "last_ts": last.timestamp,
                "prev": st.tail_key, "prev_sha256": st.tail_sha256}
        data = self.sealer.put(key, "segment", plain, meta)
        blobs = set().union(*(op_blobs(o.args) for o in ops))
        self.index.set_refs(key, blobs)
        st.tail_key, st.tail_last = key, last.index
        st.tail_sha256 = in_pool(lambda: hashlib.sha256(data).hexdigest())
        st.segments = (st.segments + [(first.index, last.index, key)])[-64:]
        st.uploaded = (last.index, last.timestamp)
        self.index.set_position(st.number, last.index, last.timestamp)
        log.debug("backup: shard %d: uploaded %s", st.number, key)

    def _require_lead(self, st: ShardState) -> None:
        if self.view is not None and not self.view.is_local_primary(st.number):
            raise StorageError(f"shard {st.number} is no longer led here")

    def _upload_blobs(self, shas: set[str]) -> None:
        """Each blob not known to be in the target: HEAD, then upload if absent.
        A blob another worker is uploading right now is waited for, not sent twice."""
        todo = self.index.missing(shas)
        if not todo:
            return
        jobs = []
        for sha in sorted(todo):
            job = self._inflight.get(sha)
            if job is None:
                job = self._inflight[sha] = self.pool.spawn(self._upload_blob, sha)
                job.link(lambda _g, sha=sha: self._inflight.pop(sha, None))
            jobs.append(job)
        gevent.joinall(jobs)
        self.index.add(sha for sha, job in zip(sorted(todo), jobs, strict=True)
                       if job.successful())
        failed = next((job.exception for job in jobs if not job.successful()), None)
        if failed is not None:
            raise failed

    def _upload_blob(self, sha: str) -> None:
        """HEAD, then seal and PUT; a large blob is sealed part by part as it uploads."""
        key = blob_key(self.cid, sha)
        if self.target.head(key) is not None:
            return
        path = self.store.blobs.path(sha)
        size = in_pool(os.path.getsize, path)
        meta = {"sha256": sha, "size": size}
        if size <= STREAM_BLOB:
            self.sealer.put(key, "blob", self.store.read_message(sha), meta)
        else:
            self.sealer.put_file(key, "blob", path, meta)

    def _snapshot(self, st: ShardState) -> None:
        """Export, ship the log up to it, upload its blobs, seal and upload it.

        For a new chain (``st.base`` set) the snapshot is its base: the tail
        becomes its position only once it is uploaded."""
        self._require_lead(st)
        tmp = self.work_dir / f"snap-{st.number:04d}.tmp"
        try:
            ts = time.time()
            last_index, last_epoch = self.store.export_snapshot(st.number, tmp)
            new_chain = st.base is not None
            if not new_chain:
                self._ship(st)
                if st.tail_last is None or st.tail_last < last_index:
                    raise StorageError(f"shard {st.number}: ops up to {last_index} not uploaded")
            blobs = in_pool(snapshot_blobs, tmp)
            self._upload_blobs(blobs)
            holder = next((k for f, last, k in st.segments if f <= last_index <= last), None)
            meta = {"shard": st.number, "last_index": last_index, "last_epoch": last_epoch,
                    "ts": ts, "segment": holder}
            key = snapshot_key(self.cid, st.number, last_index)
            self._require_lead(st)
            self.sealer.put_file(key, "snapshot", tmp, meta)
            self.index.set_refs(key, blobs, ts)
            if new_chain:
                st.tail_key = st.tail_sha256 = None
                st.tail_last, st.base, st.segments = last_index, None, []
                st.uploaded = (last_index, ts)
                self.index.set_position(st.number, last_index, ts)
            st.last_snapshot = (last_index, ts)
            st.snapshot_due = ts + float(self.settings.snapshot_interval)
            log.info("backup: shard %d: snapshot %s", st.number, key)
        finally:
            tmp.unlink(missing_ok=True)

    # -- etcd data -------------------------------------------------------------------

    def _is_controller(self) -> bool:
        if self.view is None:
            return True
        record = self.session.get("/controller")
        return bool(record is not None and isinstance(record.value, dict)
                    and record.value.get("node") == self.node)

    def _export_etcd(self) -> None:
        """Every key under the prefix but the excluded ones, when it changed."""
        kvs, revision = self.session.get_prefix("/")
        data = {kv.key: kv.value for kv in kvs if not kv.key.startswith(ETCD_EXCLUDED)}
        plain = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(plain).hexdigest()
        if digest == self._etcd_digest:
            return
        now = time.time()
        key = etcd_key(self.cid, now, revision)
        self.sealer.put(key, "etcd", plain, {"revision": revision, "ts": now, "keys": len(data)})
        self._etcd_digest = digest
        log.info("backup: etcd data uploaded as %s (%d keys)", key, len(data))

    # -- status ----------------------------------------------------------------------

    @property
    def target_ok(self) -> bool:
        """False while the last target operation of any worker failed."""
        return not self._failing

    def _note_ok(self, who: str) -> None:
        if who in self._failing:
            self._failing.discard(who)
            if not self._failing:
                log.info("backup: target reachable again")

    def _note_error(self, who: str, exc: BaseException) -> None:
        from storage import backup_target

        text = f"{who}: {type(exc).__name__}: {' '.join(str(exc).split())}"
        if text != self.last_error:
            log.warning("backup: %s", text)
        self.last_error = text
        if isinstance(exc, backup_target.TargetUnavailable | backup_target.TargetError):
            self._failing.add(who)

    def shard_status(self, st: ShardState, now: float) -> dict:
        last_index, _ = self.store.position(st.number)
        committed = self.store.ops_since(st.number, last_index - 1, 1) if last_index else []
        committed_at = [last_index, committed[0].timestamp if committed else 0.0]
        uploaded = st.uploaded
        if uploaded is None:
            saved = self.index.position(st.number)
            uploaded = saved if saved is not None else (0, 0.0)
        pending = self.store.ops_since(st.number, uploaded[0], 1) if uploaded[0] < last_index else []
        lag = max(0.0, now - pending[0].timestamp) if pending else 0.0
        return {"uploaded": list(uploaded), "committed": committed_at, "lag_s": round(lag, 3),
                "last_snapshot": list(st.last_snapshot) if st.last_snapshot else None,
                "error": st.error}

    def status(self) -> dict:
        now = time.time()
        shards = {}
        for n, st in sorted(self.shards.items()):
            try:
                shards[str(n)] = self.shard_status(st, now)
            except Exception as exc:  # a shard closing under us
                shards[str(n)] = {"error": f"{type(exc).__name__}: {exc}"}
        return {"shards": shards, "target_ok": self.target_ok, "last_error": self.last_error,
                "target": self.settings.target, "cid": self.cid, "ts": now}

    def publish(self) -> None:
        """``/backup/<node>`` under the session lease (best effort)."""
        try:
            self.session.put(STATUS_PREFIX + self.node, self.status(), lease=True)
        except Exception as exc:
            log.debug("backup: status not published: %s", exc)


def _cut_segment(ops: list[Any]) -> tuple[list[Any], bytes]:
    """The first ops that fit SEGMENT_MAX_BYTES (at least one) and their JSON lines."""
    parts: list[bytes] = []
    size = 0
    for o in ops:
        line = encode_segment([o])
        if parts and size + len(line) > SEGMENT_MAX_BYTES:
            break
        parts.append(line)
        size += len(line)
    return ops[:len(parts)], b"".join(parts)


def read_remote_header(target: Any, crypto: Any, key: str) -> Any:
    """An object's header (unauthenticated), from a ranged read of its start."""
    return crypto.header_from(lambda offset, length: target.get_range(key, offset, length))


def snapshot_ts(sealer: Sealer, index: LocalIndex | None, key: str) -> float:
    """A snapshot's meta ``ts``: from the local index, else its header (cached)."""
    cached = index.refs([key]).get(key) if index is not None else None
    if cached is not None and cached[1] is not None:
        return cached[1]
    header = read_remote_header(sealer.target, sealer.crypto, key)
    ts = float(header_meta(header).get("ts") or 0.0)
    if index is not None:
        index.set_refs(key, cached[0] if cached else None, ts)
    return ts


# -- retention ---------------------------------------------------------------------


@dataclass
class PruneReport:
    deleted_snapshots: list[str] = field(default_factory=list)
    deleted_segments: list[str] = field(default_factory=list)
    deleted_blobs: list[str] = field(default_factory=list)
    kept_objects: int = 0
    errors: list[str] = field(default_factory=list)


def prune(sealer: Sealer, index: LocalIndex | None, cid: str, retention_days: float,
          now: float | None = None) -> PruneReport:
    """Retention (docs/backup.md): per shard keep snapshots newer than the
    window plus the newest one before it, segments not wholly before that
    snapshot (and segments moved to ``diverged/`` until they leave the
    window); then delete blobs no retained object references (and older
    than BLOB_GRACE).  Blob marking reads each retained object's blob set
    from the local index's cache, else downloads it once."""
    now = time.time() if now is None else now
    horizon = now - float(retention_days) * 86400.0
    report = PruneReport()
    target = sealer.target
    infos = list(target.list(f"{cid}/shards/"))
    keys = [info.key for info in infos]
    retained: list[str] = []
    old_aside = [i.key for i in infos if "/diverged/" in i.key and i.mtime < horizon]
    target.delete(old_aside)
    report.deleted_segments += old_aside
    for shard in shard_numbers(keys, cid):
        head = shard_prefix(cid, shard)
        mine = [k for k in keys if k.startswith(head)]
        kept, dropped_snaps, dropped_segs = _prune_shard(sealer, index, mine, horizon)
        retained += kept
        target.delete(dropped_snaps + dropped_segs)
        report.deleted_snapshots += dropped_snaps
        report.deleted_segments += dropped_segs
    if index is not None:
        index.drop_refs(report.deleted_snapshots + report.deleted_segments)
    referenced = _referenced(sealer, index, retained, report)
    if report.errors:  # never delete blobs on an incomplete mark
        return report
    for info in target.list(f"{cid}/blobs/"):
        sha = info.key.rsplit("/", 1)[-1]
        if sha in referenced or now - info.mtime < BLOB_GRACE:
            continue
        report.deleted_blobs.append(info.key)
    target.delete(report.deleted_blobs)
    if index is not None:
        index.forget(k.rsplit("/", 1)[-1] for k in report.deleted_blobs)
    report.kept_objects = len(retained)
    return report


def _prune_shard(sealer: Sealer, index: LocalIndex | None, keys: list[str], horizon: float
                 ) -> tuple[list[str], list[str], list[str]]:
    """(retained keys, snapshots to delete, segments to delete) of one shard."""
    snaps = sorted((parse_snapshot(k), k) for k in keys if parse_snapshot(k) is not None)
    segs = sorted((parse_segment(k), k) for k in keys if parse_segment(k) is not None)
    old = []  # snapshots before the window, oldest first
    for last, key in snaps:
        if snapshot_ts(sealer, index, key) < horizon:
            old.append((last, key))
    if not old:
        return [k for _, k in snaps + segs], [], []
    base = old[-1][0]  # the newest snapshot before the window is kept
    drop_snaps = [k for _, k in old[:-1]]
    drop_segs = [k for (_first, last), k in segs if last <= base]
    gone = set(drop_snaps) | set(drop_segs)
    kept = [k for _, k in snaps + segs if k not in gone]
    return kept, drop_snaps, drop_segs


def _referenced(sealer: Sealer, index: LocalIndex | None, keys: list[str],
                report: PruneReport) -> set[str]:
    cached = index.refs(keys) if index is not None else {}
    out: set[str] = set()
    for key in keys:
        blobs, ts = cached.get(key, (None, None))
        if blobs is None:
            try:
                blobs = object_blobs(sealer, key)
            except Exception as exc:
                report.errors.append(f"{key}: {type(exc).__name__}: {exc}")
                continue
            if index is not None:
                index.set_refs(key, blobs, ts)
        out |= blobs
    return out


def object_blobs(sealer: Sealer, key: str) -> set[str]:
    """The blobs a segment's ops or a snapshot's tables reference (downloaded;
    a snapshot streamed through temporary files)."""
    if parse_segment(key) is not None:
        _data, _header, plain = sealer.get(key)
        return in_pool(lambda: segment_blobs(decode_segment(plain)))
    with tempfile.TemporaryDirectory(prefix="postroom-backup-") as scratch:
        db = Path(scratch) / "plain.sqlite"
        sealer.get_file(key, db)
        return in_pool(snapshot_blobs, db)
