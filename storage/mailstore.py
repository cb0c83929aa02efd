"""The node's MailStore (node/context.py): accounts spread over shard databases.

``shard = first 8 bytes of sha256(lower-cased account) mod shards``.  The
shard count is recorded in ``data_dir/storage.json`` on first creation; a
later mismatch is an error, never a silent reshuffle.  Shards are opened
lazily.  Every write is an intent submitted to the shard's group committer
(storage/groupcommit.py) and returns only once committed; message bodies go
to the BlobStore (fsynced) *before* the op that references them is committed.

Layout under ``data_dir``::

    storage.json                 {"format": 1, "shards": N}
    blobs/ab/cd/<sha256>         message bodies (storage/blobs.py)
    blobs/tmp/                   partial blob writes, removed on open
    shards/shard-0007.sqlite     op log + state of shard 7 (storage/shard.py)

Roles (docs/cluster.md, "Shard roles in the MailStore").  Each open shard has
a role -- "primary", "follower" or "none" -- and the highest epoch this node
knows for it.  Only a primary takes client writes; every write path passes
the gate twice, before any work (blob writes) and again on the hub when its
batch starts, so a role change is never overtaken by a queued write.  A
primary stamps its epoch on new ops and, given a ``replicate`` hook, commits
each batch only after the hook returned (storage/groupcommit.py); after a
batch rolled back behind the hook, its epoch takes no more writes.  A
follower takes only ``apply_replicated`` appends whose epoch is at least the
known one and whose ``prev`` matches its log (epoch fencing, log matching),
or a whole snapshot.  The full-text indexer writes derived local state and
runs under every role.  Without any ``set_role`` call (a single node) every
shard is primary at epoch 0 with no hook: nothing changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import gevent
from gevent.event import AsyncResult

from storage import fts, names
from storage import shard as ops
from storage.blobs import BlobStore
from storage.groupcommit import GroupCommitter
from storage.model import (
    AppendResult,
    FlagChange,
    MailboxChanges,
    MailboxInfo,
    MailboxStatus,
    MessageRow,
    StaleEpoch,
    StorageError,
    StorageUnavailable,
    TextHits,
)
from storage.shard import Changes, Intent, Op, Shard

log = logging.getLogger(__name__)

FORMAT = 1
_MODES = ("set", "add", "remove")
MAX_UIDS = ops.MAX_UIDS_PER_OP
_PARSE_INLINE_MAX = 64 * 1024  # octets parsed on the hub; larger ones in the threadpool
_OVERLAP_MAX = 256 * 1024  # bodies up to this size are hashed on the hub (put_nowait)
_INDEX_BATCH = 50  # messages indexed per write transaction (storage/fts.py): short, so a
# replicated apply or delivery queued behind it never waits long (a follower's ack_timeout)
_INDEX_DELAY = 1.0  # seconds without changes before the shard's pending messages are indexed
_INDEX_MAX_WAIT = 30.0  # seconds a message waits for the index at most, even under load
# A follower serves no SEARCH: it indexes its replicated messages only when
# the shard has been quiet longer, or at the latest after this long under
# load, so its backlog (a promoted primary's slow-path window) stays bounded.
_FOLLOWER_INDEX_DELAY = 10.0
_FOLLOWER_INDEX_MAX_WAIT = 300.0
ROLES = ("primary", "follower", "none")


def _index_intent(tx: Any, docs: list, shard: Shard, incarnation: int) -> None:
    # A derived index: no op is logged.  Docs read before a snapshot was
    # installed may describe other messages under the same (mailbox, uid).
    if shard.incarnation == incarnation:
        fts.index_docs(tx.conn, docs)


class StoreLayoutError(StorageError):
    """data_dir does not match the configured store (e.g. another shard count)."""


@functools.lru_cache(maxsize=4096)  # asked on every store call (a SHA-256 each)
def shard_of(account: str, shards: int) -> int:
    """Stable shard number of an account (never depends on process or version)."""
    digest = hashlib.sha256(account.lower().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def _account(account: str) -> str:
    if not isinstance(account, str):
        raise StorageError("bad account name")
    return _checked_account(account)


@functools.lru_cache(maxsize=4096)  # every store call checks its account: once per name
def _checked_account(account: str) -> str:
    if not account or len(account) > 320:
        raise StorageError("bad account name")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in account):
        raise StorageError("bad account name")
    return account.lower()


def _when(internaldate: float | None) -> float:
    if internaldate is None:
        return time.time()
    when = float(internaldate)
    if not math.isfinite(when) or not 0 <= when < 2**37:
        raise StorageError("internal date out of range")
    return when


def _uids(uids: Iterable[int]) -> list[int]:
    out = sorted({int(u) for u in uids})
    if len(out) > MAX_UIDS:
        raise StorageError("too many UIDs in one operation")
    if out and (out[0] < 1 or out[-1] > 0xFFFFFFFF):
        raise StorageError("UID out of range")  # RFC 3501 §2.3.1.1: 32-bit non-zero
    return out


class _OpenShard:
    def __init__(
        self, number: int, shard: Shard, committer: GroupCommitter, role: str, known: int
    ) -> None:
        self.number = number
        self.shard = shard
        self.committer = committer
        self.role = role
        self.known_epoch = known  # the highest epoch seen (set_role, appends, the log)
        self.last_change = 0.0  # monotonic time of the last committed change

    def require_primary(self) -> None:
        """The write gate: StorageUnavailable unless this node leads the shard."""
        if self.role != "primary":
            raise StorageUnavailable(f"shard {self.number} is not led here")
        if self.shard.epoch <= self.committer.fenced_epoch:
            raise StorageUnavailable(
                f"shard {self.number}: a batch of epoch {self.shard.epoch} failed to replicate;"
                " writes resume at a higher epoch")

    def require_follower(self, epoch: int) -> None:
        """The replication gate: a follower, and ``epoch`` not stale (then known)."""
        if self.role != "follower":
            raise StorageUnavailable(f"shard {self.number} is not a follower here")
        if epoch < self.known_epoch:
            raise StaleEpoch(self.known_epoch)
        self.known_epoch = epoch


class MailStore:
    """Implements node.context.MailStore over SQLite shards and a BlobStore."""

    def __init__(
        self,
        data_dir: Path,
        shards: int,
        fsync: bool = True,
        group_commit_max: int = 256,
        default_role: str = "primary",
    ) -> None:
        """``default_role``: the role of a shard opened before any ``set_role``
        ("primary" on a single node; a cluster node passes "none")."""
        if not 1 <= shards <= 4096:
            raise StoreLayoutError("shards must be 1..4096")
        if default_role not in ROLES:
            raise ValueError(f"bad role {default_role!r}")
        self.default_role = default_role
        self.data_dir = Path(data_dir)
        self.shards = shards
        self.fsync = fsync
        self.group_commit_max = group_commit_max
        self.blobs = BlobStore(self.data_dir / "blobs", fsync=fsync)
        self._open: dict[int, _OpenShard] = {}
        self._opening: dict[int, AsyncResult] = {}
        self._watchers: dict[str, list[Callable[[str], None]]] = {}
        # (account, mailbox, modseq) -> (shard commits, shard, answer): see changes_since
        self._changes_cache: dict[tuple[str, str, int], tuple[int, Shard, MailboxChanges]] = {}
        self._indexing: set[_OpenShard] = set()  # shards with a running indexer
        self._is_open = False

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """Create or check the layout; raises StoreLayoutError on a mismatch."""
        gevent.get_hub().threadpool.apply(self._open_sync)
        self._is_open = True

    def _open_sync(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "shards").mkdir(exist_ok=True)
        marker = self.data_dir / "storage.json"
        if marker.exists():
            try:
                recorded = json.loads(marker.read_text())
            except ValueError as exc:
                raise StoreLayoutError(f"{marker}: unreadable") from exc
            if recorded.get("format") != FORMAT:
                raise StoreLayoutError(f"{marker}: unknown format {recorded.get('format')!r}")
            if recorded.get("shards") != self.shards:
                raise StoreLayoutError(
                    f"{marker}: store was created with {recorded.get('shards')} shards,"
                    f" configuration says {self.shards}; shards cannot change"
                )
        else:
            tmp = marker.with_suffix(".tmp")
            with open(tmp, "w") as f:
                json.dump({"format": FORMAT, "shards": self.shards}, f)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, marker)
            if self.fsync:
                fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self.blobs.open()

    def close(self) -> None:
        """Finish queued writes and close every shard."""
        self._is_open = False
        for entry in list(self._open.values()):
            entry.committer.close()
            entry.shard.close()
        self._open.clear()

    def __enter__(self) -> MailStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shards ------------------------------------------------------------

    def shard_path(self, number: int) -> Path:
        return self.data_dir / "shards" / f"shard-{number:04d}.sqlite"

    def _shard(self, account: str) -> _OpenShard:
        return self._entry(shard_of(account, self.shards))

    def _entry(self, number: int) -> _OpenShard:
        """The open shard ``number``, opening it on first use."""
        if not self._is_open:
            raise StorageUnavailable("store is not open")
        if not 0 <= number < self.shards:
            raise StorageError("no such shard")
        entry = self._open.get(number)
        if entry is not None:
            return entry
        pending = self._opening.get(number)
        if pending is not None:  # another greenlet is opening it
            return pending.get()
        pending = self._opening[number] = AsyncResult()
        try:
            shard = Shard(self.shard_path(number), fsync=self.fsync)
            gevent.get_hub().threadpool.apply(shard.open_writer)
            shard.open_reader()
            _, last_epoch = shard.position()
            shard.epoch = last_epoch
            committer = GroupCommitter(shard, self.group_commit_max, self._notify)
            entry = _OpenShard(number, shard, committer, self.default_role, last_epoch)
            self._open[number] = entry
            pending.set(entry)
            return entry
        except Exception as exc:
            pending.set_exception(StorageUnavailable(f"cannot open shard {number}"))
            raise StorageUnavailable(f"cannot open shard {number}") from exc
        finally:
            del self._opening[number]

    def shard_for(self, account: str) -> Shard:
        """The (opened) shard database holding an account, for replication and tools."""
        return self._shard(_account(account)).shard

    def committer_for(self, account: str) -> GroupCommitter:
        return self._shard(_account(account)).committer

    def shard_by_number(self, number: int) -> tuple[Shard, GroupCommitter]:
        """Shard ``number`` and its committer, opened on first use (storage/queue.py)."""
        entry = self._entry(number)
        return entry.shard, entry.committer

    def busy_shards(self, numbers: list[int]) -> list[int]:
        """Those of ``numbers`` that are open with a batch running or waiting
        (storage/queue.py sends new entries there: one commit for several)."""
        return [n for n in numbers if (e := self._open.get(n)) is not None and e.committer.busy]

    def existing_shards(self) -> list[int]:
        """Numbers of the shards that are open or have a database on disk."""
        found = set(self._open)
        for path in (self.data_dir / "shards").glob("shard-*.sqlite"):
            try:
                number = int(path.stem.removeprefix("shard-"))
            except ValueError:
                continue
            if 0 <= number < self.shards:
                found.add(number)
        return sorted(found)

    def _submit(self, account: str, intent: Intent) -> Any:
        return self._write(self._shard(account), intent)

    def _write(self, entry: _OpenShard, intent: Intent, after: AsyncResult | None = None) -> Any:
        """A client write through the role gate (checked now and at its batch)."""
        entry.require_primary()
        return entry.committer.submit(intent, entry.require_primary, after)

    def submit_to(self, number: int, intent: Intent, after: AsyncResult | None = None) -> Any:
        """Run a write intent on shard ``number`` through the role gate
        (storage/queue.py); raises StorageUnavailable unless led here.  Its
        batch commits only once ``after`` (a blob being stored) holds a value."""
        return self._write(self._entry(number), intent, after)

    def apply_ops(self, number: int, ops_: list[Op]) -> int:
        """Append ops to shard ``number`` without any role or epoch check
        (replay and tools; replication uses ``apply_replicated``)."""
        entry = self._entry(number)
        return entry.committer.submit(functools.partial(ops.intent_apply_ops, ops=ops_))

    def ops_since(self, number: int, index: int, limit: int = 10_000,
                  max_bytes: int | None = None) -> list[Op]:
        """Committed log entries after ``index``, ascending, at most ``limit``
        and, with ``max_bytes``, at most that many octets of args JSON after
        the first (more than a few are read and decoded in the threadpool)."""
        shard = self._entry(number).shard
        if limit <= 64:
            return shard.ops_since(index, limit, max_bytes)
        return gevent.get_hub().threadpool.apply(shard.read_ops, (index, limit, max_bytes))

    # -- roles and replication (docs/cluster.md) -------------------------------

    def set_role(
        self,
        number: int,
        role: str,
        epoch: int,
        replicate: Callable[[int, list[Op]], None] | None = None,
    ) -> None:
        """Make this node "primary", "follower" or "none" for shard ``number``.

        Opens the shard if needed.  ``epoch`` is stamped on the ops this node
        logs as primary; the known epoch becomes max(known, epoch).  A primary
        with ``replicate`` calls ``replicate(number, new_ops)`` on the hub
        between prepare and commit of every batch that logged ops; if it
        raises, the batch is rolled back, its callers get StorageUnavailable,
        and the epoch is fenced: writes fail until the shard is made primary
        at a higher epoch (followers may hold the rolled-back ops).  Raises
        StaleEpoch for a primary role of an epoch older than the known one.
        A change away from follower/none waits for the running batch, so no
        append of an older epoch lands after this returns; a batch that is
        being replicated is not waited for: it fails (role changed) unless
        it already committed.
        """
        if role not in ROLES:
            raise ValueError(f"bad role {role!r}")
        entry = self._entry(number)
        if role == "primary" and epoch < entry.known_epoch:
            raise StaleEpoch(entry.known_epoch)
        committer = entry.committer
        if entry.role == "primary" or committer.replicating:
            # A primary's batch may wait in replicate for long: it is not
            # waited for, and it fails as its role changed (generation).
            self._change_role(entry, role, epoch, replicate)
        else:
            with committer.paused():
                self._change_role(entry, role, epoch, replicate)

    def _change_role(
        self,
        entry: _OpenShard,
        role: str,
        epoch: int,
        replicate: Callable[[int, list[Op]], None] | None,
    ) -> None:
        committer = entry.committer
        entry.role = role
        entry.known_epoch = max(entry.known_epoch, epoch)
        entry.shard.epoch = epoch
        hook = None
        if role == "primary" and replicate is not None:
            hook = functools.partial(replicate, entry.number)
        committer.replicate = hook
        committer.generation += 1
        log.info("shard %d: %s at epoch %d", entry.number, role, epoch)
        self._index_later(entry)  # now with this role's delays (fts_pending)

    def role(self, number: int) -> tuple[str, int]:
        """(role, highest known epoch) of shard ``number``."""
        entry = self._entry(number)
        return entry.role, entry.known_epoch

    def position(self, number: int) -> tuple[int, int]:
        """(last_index, last_epoch) of the committed log; (0, 0) when empty."""
        return self._entry(number).shard.position()

    def log_start(self, number: int) -> int:
        """Index of the oldest op shard ``number``'s log still holds (0: empty;
        storage/reclaim.py deletes old ones)."""
        return self._entry(number).shard.log_start()

    def op_epoch(self, number: int, index: int) -> int | None:
        """Epoch of the committed op at ``index``; None if absent, 0 for index 0."""
        return self._entry(number).shard.op_epoch(index)

    def paused(self, number: int) -> Any:
        """Context manager: shard ``number``'s committer with no batch running
        and none starting (GroupCommitter.paused)."""
        return self._entry(number).committer.paused()

    def apply_replicated(
        self,
        number: int,
        epoch: int,
        prev: tuple[int, int],
        ops_: list[Op],
        blobs: Mapping[str, bytes],
    ) -> tuple[int, int]:
        """Follower side of replication: append the primary's ops after ``prev``.

        Refuses with StaleEpoch(known) if ``epoch`` is older than the known
        epoch (else it becomes the known epoch), StorageUnavailable unless
        this node is a follower of the shard.  Every blob the ops reference
        must be stored or among ``blobs`` (name -> bytes, each name its
        sha256).  Then, in one batch: the log's last (index, epoch) must equal
        ``prev`` (else LogMismatch with ours), the new blobs are stored
        durably, and the ops are appended and committed.  Returns the new
        (last_index, last_epoch).  An empty ``ops_`` only checks ``prev``.
        """
        entry = self._entry(number)
        entry.require_follower(epoch)
        # Only a cached blob is known durable (see _store_blobs): a visible
        # file may be another append's write whose directory is not fsynced yet.
        fresh = {name: data for name, data in blobs.items() if not self.blobs.cached(name)}
        missing = [b for b in _referenced_blobs(ops_) if b not in fresh and not self.blobs.exists(b)]
        if missing:
            raise StorageUnavailable(f"replicated ops reference missing blobs: {missing[:3]}")
        intent = functools.partial(ops.intent_append_replicated, epoch=epoch, prev=prev, ops=ops_)
        if fresh:  # written in the batch's own threadpool job: one hand-off, not two
            intent = functools.partial(_with_blobs, self.blobs, fresh, intent, epoch, prev)
        last = entry.committer.submit(intent, functools.partial(entry.require_follower, epoch))
        for name, data in fresh.items():
            self.blobs.stored(name, data)
        return last

    def _store_blobs(self, blobs: Mapping[str, bytes], needed: set[str]) -> None:
        for name, data in blobs.items():
            # Only a cached blob is known durable: a file may be visible while
            # another write of the same bytes has not fsynced its directory
            # yet, and put() of an existing file makes its entries durable.
            if self.blobs.cached(name):
                continue
            if self.blobs.put(data) != name:
                raise StorageError(f"blob {name}: content does not match its name")
        missing = [b for b in needed if not self.blobs.exists(b)]
        if missing:
            raise StorageUnavailable(f"replicated ops reference missing blobs: {missing[:3]}")

    def export_snapshot(self, number: int, dest: Path) -> tuple[int, int]:
        """A consistent copy of shard ``number``'s database at ``dest``
        (fsynced) and the (last_index, last_epoch) it holds."""
        shard = self._entry(number).shard
        return gevent.get_hub().threadpool.apply(shard.export_snapshot, (Path(dest),))

    def install_snapshot(self, number: int, path: Path, epoch: int) -> tuple[int, int]:
        """Replace shard ``number``'s database by the snapshot file ``path``
        (from the primary of ``epoch``) and return the position it holds.

        Raises StaleEpoch if ``epoch`` is older than the known one,
        StorageUnavailable if this node leads the shard, StorageError for a
        file that is not a sound shard database (nothing changed then).  The
        role becomes "follower"; the known epoch max(known, epoch, the
        snapshot's last epoch).  Blobs are not part of it: see missing_blobs.
        """
        entry = self._entry(number)
        shard = entry.shard
        with entry.committer.paused():
            if entry.role == "primary":
                raise StorageUnavailable(f"shard {number} is led here")
            if epoch < entry.known_epoch:
                raise StaleEpoch(entry.known_epoch)
            shard.close_reader()
            try:
                position = gevent.get_hub().threadpool.apply(shard.install, (Path(path),))
            finally:
                shard.open_reader()
                shard.commits += 1  # cached answers (changes_since) are void
            self._change_role(entry, "follower", max(epoch, position[1]), None)
        return position

    def missing_blobs(self, number: int) -> list[str]:
        """Blobs the shard's messages and queue reference that are not stored here, sorted."""
        shard = self._entry(number).shard

        def find() -> list[str]:  # threadpool: a scan and one stat per blob
            return sorted(b for b in shard.blob_names() if not self.blobs.exists(b))

        return gevent.get_hub().threadpool.apply(find)

    def digest(self, number: int) -> str:
        """sha256 over the rows of every state table (no FTS): equal on every
        replica at the same position."""
        return self.position_digest(number)[1]

    def position_digest(self, number: int) -> tuple[tuple[int, int], str]:
        """(position, digest) read from one snapshot of the database."""
        shard = self._entry(number).shard
        return gevent.get_hub().threadpool.apply(shard.state_digest)

    # -- watchers ------------------------------------------------------------

    def watch(self, account: str, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call callback(mailbox) on the hub after each committed change."""
        key = _account(account)
        self._watchers.setdefault(key, []).append(callback)

        def stop() -> None:
            callbacks = self._watchers.get(key, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._watchers.pop(key, None)

        return stop

    def _notify(self, changes: Changes) -> None:
        if self._is_open:
            now = time.monotonic()
            for account in {a for a, _ in changes}:
                # New messages wait in fts_pending (storage/fts.py).
                entry = self._shard(account)
                entry.last_change = now
                self._index_later(entry)
        seen: set[tuple[str, str]] = set()
        for account, mailbox in changes:
            if (account, mailbox) in seen:
                continue
            seen.add((account, mailbox))
            for callback in list(self._watchers.get(account, ())):
                try:
                    callback(mailbox)
                except Exception:
                    log.exception("mailbox watcher failed")

    # -- writes ------------------------------------------------------------

    def ensure_account(self, account: str) -> None:
        """Create the default folders if the account has no INBOX yet; idempotent.

        Every IMAP/POP3 login calls this: an account that has its INBOX costs
        one read, not a place in the committer's queue (a login proxied to a
        busy primary waited there behind replicated batches past the proxy's
        bound, docs/cluster.md)."""
        acct = _account(account)
        entry = self._shard(acct)
        entry.require_primary()
        if any(box.name == "INBOX" for box in entry.shard.list_mailboxes(acct)):
            return
        self._write(entry, functools.partial(ops.intent_ensure_account, account=acct))

    def delete_account(self, account: str) -> None:
        """Remove every mailbox of the account; its bodies go at the next blob sweep
        once nothing references them (storage/reclaim.py, docs/storage.md)."""
        acct = _account(account)
        self._submit(acct, functools.partial(ops.intent_delete_account, account=acct))

    def _meta(self, raw: bytes, meta: dict | None) -> dict:
        if meta is not None:
            return meta
        from storage.mime import parse_metadata  # owned by the IMAP side

        if len(raw) > _PARSE_INLINE_MAX:
            # Pure Python and CPU-bound: in a thread the GIL's switch interval
            # still lets the hub run, inline a large message would stall it.
            return gevent.get_hub().threadpool.apply(parse_metadata, (raw,))
        return parse_metadata(raw)

    def deliver(
        self,
        accounts: Iterable[str],
        raw: bytes,
        *,
        mailbox: str = "INBOX",
        flags: Iterable[str] = (),
        internaldate: float | None = None,
        meta: dict | None = None,
    ) -> list[AppendResult]:
        """Store one message for several accounts, all committed before returning.

        The blob is written (and fsynced) once, then one append per account is
        queued on every shard at once, so the shards commit concurrently.  On
        replicated primaries the appends are queued while the blob is still
        being written: each batch commits only after it is durable, and its
        followers store their copies meanwhile.
        Raises the first failure after all appends have finished; the others
        may have committed (the sender retries: at-least-once).
        """
        targets = list(dict.fromkeys(_account(a) for a in accounts))
        if not targets:
            return []
        box = names.mailbox_name(mailbox)
        canon = names.canonical_flags(flags)
        when = _when(internaldate)
        entries = [self._shard(acct) for acct in targets]
        for entry in entries:
            entry.require_primary()
        metadata = self._meta(raw, meta)
        stored = None
        if len(raw) <= _OVERLAP_MAX and all(e.committer.replicate for e in entries):
            # Replicated primaries: the body's fsync here overlaps the
            # followers' (each batch commits only once ``stored`` is set).
            blob, stored = self.blobs.put_nowait(raw)
        else:
            blob = self.blobs.put(raw)
        pending = []
        for acct, entry in zip(targets, entries, strict=True):
            intent = functools.partial(
                ops.intent_append, account=acct, mailbox=box, blob=blob, size=len(raw),
                flags=canon, internaldate=when, meta=metadata,
            )
            pending.append(entry.committer.submit_nowait(intent, entry.require_primary, stored))
        results: list[AppendResult] = []
        error: BaseException | None = None
        for p in pending:
            try:
                results.append(p.get())
            except StorageError as exc:
                error = error or exc
        if error is not None:
            raise error
        return results

    def append(
        self,
        account: str,
        mailbox: str,
        raw: bytes,
        *,
        flags: Iterable[str] = (),
        internaldate: float | None = None,
        meta: dict | None = None,
    ) -> AppendResult:
        """RFC 3501 §6.3.11 APPEND; raises NoSuchMailbox (TRYCREATE) if missing."""
        acct = _account(account)
        box = names.mailbox_name(mailbox)
        canon = names.canonical_flags(flags)
        when = _when(internaldate)
        self._shard(acct).require_primary()
        metadata = self._meta(raw, meta)
        blob = self.blobs.put(raw)
        return self._submit(acct, functools.partial(
            ops.intent_append, account=acct, mailbox=box, blob=blob, size=len(raw),
            flags=canon, internaldate=when, meta=metadata,
        ))

    def create_mailbox(
        self, account: str, name: str, special_use: str | None = None
    ) -> MailboxInfo:
        """RFC 3501 §6.3.3; missing superior names are created too."""
        acct = _account(account)
        return self._submit(acct, functools.partial(
            ops.intent_create_mailbox, account=acct, name=names.mailbox_name(name),
            special_use=names.special_use(special_use),
        ))

    def delete_mailbox(self, account: str, name: str) -> None:
        """RFC 3501 §6.3.4; INBOX raises MailboxNotAllowed, inferiors stay."""
        acct = _account(account)
        self._submit(acct, functools.partial(
            ops.intent_delete_mailbox, account=acct, name=names.mailbox_name(name)))

    def rename_mailbox(self, account: str, old: str, new: str) -> None:
        """RFC 3501 §6.3.5, including the INBOX special case."""
        acct = _account(account)
        self._submit(acct, functools.partial(
            ops.intent_rename_mailbox, account=acct, old=names.mailbox_name(old),
            new=names.mailbox_name(new)))

    def set_subscribed(self, account: str, name: str, subscribed: bool) -> None:
        acct = _account(account)
        self._submit(acct, functools.partial(
            ops.intent_subscribe, account=acct, name=names.mailbox_name(name),
            subscribed=bool(subscribed)))

    def store_flags(
        self,
        account: str,
        name: str,
        uids: Iterable[int],
        mode: str,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> list[FlagChange]:
        """RFC 3501 §6.4.6 / RFC 7162 §3.1.3; changed messages only, each a new MODSEQ."""
        if mode not in _MODES:
            raise StorageError(f"bad store mode {mode!r}")
        acct = _account(account)
        return self._submit(acct, functools.partial(
            ops.intent_store_flags, account=acct, mailbox=names.mailbox_name(name),
            uids=_uids(uids), mode=mode, flags=names.canonical_flags(flags),
            unchanged_since=unchanged_since))

    def expunge(self, account: str, name: str, uids: Iterable[int]) -> list[int]:
        """Remove the given messages; returns the UIDs that existed, ascending."""
        acct = _account(account)
        return self._submit(acct, functools.partial(
            ops.intent_expunge, account=acct, mailbox=names.mailbox_name(name),
            uids=_uids(uids)))

    def copy(
        self, account: str, src: str, uids: Iterable[int], dst: str
    ) -> tuple[int, list[tuple[int, int]]]:
        """RFC 3501 §6.4.7 / RFC 4315 COPYUID data: (dst uidvalidity, [(src, new)])."""
        acct = _account(account)
        return self._submit(acct, functools.partial(
            ops.intent_copy, account=acct, src=names.mailbox_name(src), uids=_uids(uids),
            dst=names.mailbox_name(dst)))

    def move(
        self, account: str, src: str, uids: Iterable[int], dst: str
    ) -> tuple[int, list[tuple[int, int]]]:
        """RFC 6851 MOVE in one op: (dst uidvalidity, [(src uid, new uid)]);
        the source messages are expunged in the same commit."""
        acct = _account(account)
        return self._submit(acct, functools.partial(
            ops.intent_move, account=acct, src=names.mailbox_name(src), uids=_uids(uids),
            dst=names.mailbox_name(dst)))

    def restore_mailbox(
        self, account: str, mailbox: str, backup: dict, blobs: Mapping[str, bytes] | None = None
    ) -> dict:
        """Put a mailbox back in place as ``backup`` holds it (storage/restore.py;
        the rules are ``shard.intent_restore_mailbox``'s).  ``blobs`` (name ->
        bytes, each checked against its name) are stored first; every message's
        blob must then be here.  Returns {uidvalidity, recreated, restored,
        reflagged, expunged}."""
        acct = _account(account)
        box = names.mailbox_name(mailbox)
        self._shard(acct).require_primary()
        messages = [{
            "uid": _uids([m["uid"]])[0], "blob": str(m["blob"]), "size": int(m["size"]),
            "internaldate": _when(m["internaldate"]),
            "flags": names.canonical_flags(m.get("flags") or ()), "meta": dict(m["meta"]),
        } for m in backup.get("messages") or ()]
        if len(messages) > MAX_UIDS:
            raise StorageError("too many messages in one restore")
        clean = {
            "uidvalidity": int(backup["uidvalidity"]), "uidnext": int(backup["uidnext"]),
            "highestmodseq": int(backup.get("highestmodseq") or 0),
            "special_use": names.special_use(backup.get("special_use")),
            "subscribed": bool(backup.get("subscribed", True)), "messages": messages,
        }
        if not 0 < clean["uidvalidity"] <= 0xFFFFFFFF or clean["uidnext"] < 1:
            raise StorageError("restore_mailbox: bad UIDVALIDITY or UIDNEXT")
        self._store_blobs(blobs or {}, set())
        missing = sorted({m["blob"] for m in messages if not self.blobs.exists(m["blob"])})
        if missing:
            raise StorageError(f"restore_mailbox: {len(missing)} blob(s) missing, e.g. {missing[0]}")
        return self._submit(acct, functools.partial(
            ops.intent_restore_mailbox, account=acct, mailbox=box, backup=clean))

    def set_metadata(
        self, account: str, mailbox: str | None, entries: Iterable[tuple[str, bytes | None]]
    ) -> None:
        """RFC 5464 §4.3: set (value) or remove (None) entries, all or none;
        mailbox None is the server.  Raises MetadataTooMany past the limit."""
        acct = _account(account)
        box = None if mailbox is None else names.mailbox_name(mailbox)
        items = [(str(e).lower(), None if v is None else bytes(v)) for e, v in entries]
        self._submit(acct, functools.partial(
            ops.intent_set_metadata, account=acct, mailbox=box, entries=items))

    def get_metadata(self, account: str, mailbox: str | None) -> dict[str, bytes]:
        """RFC 5464 entries of a mailbox (None: the server), lower-case names."""
        acct = _account(account)
        box = None if mailbox is None else names.mailbox_name(mailbox)
        return self._shard(acct).shard.get_metadata(acct, box)

    def usage(self, account: str) -> tuple[int, int]:
        """(octets, messages) the account stores, for RFC 9208 quotas; O(1)."""
        acct = _account(account)
        return self._shard(acct).shard.usage(acct)

    def savedates(self, account: str, name: str, uids: Iterable[int]) -> dict[int, float | None]:
        """RFC 8514 save dates (seconds since the epoch; None if not known)."""
        acct = _account(account)
        return self._shard(acct).shard.savedates(acct, names.mailbox_name(name), _uids(uids))

    # -- reads (hub, reader connection) ----------------------------------------

    def list_mailboxes(self, account: str) -> list[MailboxInfo]:
        acct = _account(account)
        return self._shard(acct).shard.list_mailboxes(acct)

    def status(self, account: str, name: str) -> MailboxStatus:
        acct = _account(account)
        return self._shard(acct).shard.status(acct, names.mailbox_name(name))

    def mailbox_state(self, account: str, name: str) -> tuple[int, int, int]:
        """(uidvalidity, uidnext, highestmodseq) of a mailbox: status() without
        its count/unseen/size aggregate; raises NoSuchMailbox."""
        acct = _account(account)
        return self._shard(acct).shard.mailbox_state(acct, names.mailbox_name(name))

    def messages(self, account: str, name: str) -> list[MessageRow]:
        acct = _account(account)
        return self._shard(acct).shard.messages(acct, names.mailbox_name(name))

    def metadata(self, account: str, name: str, uids: Iterable[int]) -> dict[int, dict]:
        acct = _account(account)
        return self._shard(acct).shard.metadata(acct, names.mailbox_name(name), _uids(uids))

    def rows(self, account: str, name: str, uids: Iterable[int]) -> dict[int, MessageRow]:
        """The rows of those UIDs that exist, by UID (FETCH reads only these)."""
        acct = _account(account)
        return self._shard(acct).shard.rows(acct, names.mailbox_name(name), _uids(uids))

    def uid_flags(self, account: str, name: str) -> list[tuple[int, frozenset[str]]]:
        """(uid, flags) of every message, ascending UID (an IMAP view at SELECT)."""
        acct = _account(account)
        return self._shard(acct).shard.uid_flags(acct, names.mailbox_name(name))

    def search_text(self, account: str, name: str, field: str, needle: str) -> TextHits | None:
        """Messages whose SEARCH text for field ("text", "body", "hdr", "subject",
        "from", "to", "cc", "bcc") contains needle, case-insensitively (RFC 3501
        §6.4.4), from the full-text index; None if the index cannot answer
        that needle (see storage/fts.py)."""
        if field not in ("text", *fts.FIELDS) or not fts.usable(needle):
            return None
        acct = _account(account)
        entry = self._shard(acct)
        found, pending = entry.shard.search_text(
            acct, names.mailbox_name(name), fts.Query(field, needle))
        if pending:
            self._index_later(entry)
        return TextHits(frozenset(found - pending), frozenset(pending))

    def _index_later(self, entry: _OpenShard) -> None:
        """Index queued messages (storage/fts.py) in the background: the
        text is extracted in the threadpool, then many rows are written in
        one short write transaction, so deliveries never wait for it."""
        if entry in self._indexing or not self._is_open:
            return
        self._indexing.add(entry)
        pool = gevent.get_hub().threadpool

        def read(sha: str) -> bytes:  # threadpool: plain file I/O
            return self.blobs.path(sha).read_bytes()

        def delays() -> tuple[float, float]:
            if entry.role == "follower":
                return _FOLLOWER_INDEX_DELAY, _FOLLOWER_INDEX_MAX_WAIT
            return _INDEX_DELAY, _INDEX_MAX_WAIT

        def run() -> None:
            # Index when the shard is quiet (no change for the role's delay),
            # or at the latest its max wait after the first waiting message:
            # deliveries under load do not pay for the index, and one index
            # transaction (one fsync) covers many messages.  SEARCH stays
            # exact meanwhile: pending messages take the slow path.  The
            # delays are read each turn: a promotion shortens them.
            started = time.monotonic()
            while self._is_open:
                gevent.sleep(min(_INDEX_DELAY, delays()[0]))
                now = time.monotonic()
                quiet, most = delays()
                if now - entry.last_change >= quiet or now - started >= most:
                    break
            try:
                while self._is_open:
                    incarnation = entry.shard.incarnation
                    rows = fts.pending_batch(entry.shard.reader, _INDEX_BATCH)
                    if not rows:
                        break
                    docs = pool.apply(fts.extract_batch, (rows, read))
                    entry.committer.submit(functools.partial(
                        _index_intent, docs=docs, shard=entry.shard, incarnation=incarnation))
            except StorageError:
                if self._is_open:  # closing the store stops it quietly
                    log.warning("full-text indexing stopped", exc_info=True)
            finally:
                self._indexing.discard(entry)

        gevent.spawn(run)

    def changes_since(self, account: str, name: str, modseq: int) -> MailboxChanges:
        """RFC 7162 §3.1 changes after ``modseq``.  The result is shared: do
        not mutate it.  Every session of a mailbox that a delivery wakes asks
        the same question (same view MODSEQ), so answers are reused until
        the shard commits again (10,000 IDLE sessions: one query per wake-up
        instead of one per session)."""
        acct = _account(account)
        box = names.mailbox_name(name)
        shard = self._shard(acct).shard
        key = (acct, box, modseq)
        commits = shard.commits  # read before the query: a later commit invalidates
        hit = self._changes_cache.get(key)
        if hit is not None and hit[0] == commits and hit[1] is shard:
            return hit[2]
        changes = shard.changes_since(acct, box, modseq)
        if len(self._changes_cache) >= 1024:
            self._changes_cache.clear()
        self._changes_cache[key] = (commits, shard, changes)
        return changes

    def read_message(self, blob: str) -> bytes:
        """The stored bytes; raises NoSuchBlob."""
        return self.blobs.read(blob)


def _with_blobs(
    store: BlobStore, blobs: Mapping[str, bytes], intent: Intent, epoch: int,
    prev: tuple[int, int], tx: Any,
) -> Any:
    """A follower's batch intent (threadpool): check ``prev`` first (a
    mismatch writes nothing), store ``blobs`` durably (each checked against
    its name), then run ``intent``: the batch commits only after the blobs."""
    ops.intent_append_replicated(tx, epoch, prev, [])
    for name, data in blobs.items():
        if hashlib.sha256(data).hexdigest() != name:
            raise StorageError(f"blob {name}: content does not match its name")
        store.put_in_thread(data)
    return intent(tx)


def _referenced_blobs(ops_: Iterable[Op]) -> set[str]:
    """Blobs named by ops (append, enqueue): they must exist before the op commits."""
    return {op.args["blob"] for op in ops_ if isinstance(op.args.get("blob"), str)}
