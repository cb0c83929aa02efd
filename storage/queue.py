"""The outbound queue (node/context.py ``OutboundQueue``), kept in the shard logs.

Theory of operation
-------------------
A queued message is a row of table ``queue`` plus one ``queue_rcpt`` row per
recipient, in the same shard databases and the same operation log as the
mailboxes (storage/shard.py), so replication, hand-over and backup treat the
queue like any mailbox.  The *queue shard* of an entry is
``shard_of(queue_id, shards)`` (storage/mailstore.py), so any reader finds an
entry from its id alone.

Every change is an intent run by the shard's group committer in the write
transaction; the intent decides every value -- the queue id (16 random hex
digits drawn until one maps to this shard and is unused), times, attempt
counters -- and records them in the op's args, so replaying the log rebuilds
identical state.  Ops (docs/queue.md): ``enqueue``, ``attempt_result``,
``dequeue``, ``hold``, ``release``, ``retry``.

Inline bodies.  A body of up to ``inline_max`` octets (``[storage]
queue_inline_max``, 256 KiB by default) travels inside the ``enqueue`` op
(``data``: base64 of the raw bytes) and lives in the entry's row (column
``data``; ``blob`` is "").  It is durable with the batch's one WAL commit
and, in a cluster, replicated with the op, backed up in log segments and
restored with them -- one flush per accepted message instead of the blob
file's, its directory's and the commit's.  A larger body is a blob file,
durable (fsynced) *before* the ``enqueue`` op that names it is committed,
like a mailbox append; one of up to 256 KiB is stored with ``put_nowait``
and its fsyncs overlap the batch's prepare, whose COMMIT waits for them
(storage/groupcommit.py, ``after``).  Entries and ops stored with a blob
name (before inline bodies) keep working: ``read_body`` reads either form.
Queued bodies are transient (gone once delivered), so nothing is lost by
not sharing them; mailbox messages stay blob files.  Reads run on the hub on each shard's
reader connection; ``due`` and ``next_due`` use the ``(held, next_attempt)``
index.  ``due`` first reads only ids in index order and skips the ones the
caller excludes (the runner's in-flight entries), then reads whole entries
for the chosen few, so a pass costs O(in flight) cheap rows, not O(in
flight) entries with their recipients.

Cluster mode (``use_cluster``): this node may write only to the shards it
leads (the store's role gate raises StorageUnavailable otherwise).
``enqueue`` picks one of those (one with a batch forming first, else at
random), so the commit is local; a node
that leads no shard hands the message to ``forward`` (an RPC to a primary,
node/admin.py).  Reads without an explicit shard list cover the led shards.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import logging
import random
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from storage.mailstore import MailStore, shard_of
from storage.model import (
    DELIVERED,
    FAILED,
    PENDING,
    RELAYED,
    NoSuchQueueEntry,
    QueuedRecipient,
    QueueEntry,
    RecipientResult,
    StorageError,
    StorageUnavailable,
)
from storage.shard import Shard, Tx

log = logging.getLogger(__name__)

ID_RE = re.compile(r"[0-9a-f]{16,64}")
MAX_RECIPIENTS = 10_000  # per entry; SMTP sessions accept far fewer (smtp.max_recipients)
MAX_ADDRESS = 998  # octets of one address, as a safe bound on the stored text
MAX_REPLY_TEXT = 2_000  # characters of a remote reply kept per recipient
MAX_ENVID = 100  # RFC 3461 §4.4
MAX_IDS_PER_OP = 10_000  # bounded op args for retry/flush
_OVERLAP_MAX = 256 * 1024  # bodies up to this size are hashed on the hub (put_nowait)
INLINE_MAX = 256 * 1024  # default [storage] queue_inline_max: bodies kept in the op and row
INLINE_LIMIT = 4 * 1024 * 1024  # queue_inline_max's cap: an op must fit one replication frame
STATES = (PENDING, DELIVERED, FAILED, RELAYED)
NOTIFY_VALUES = ("NEVER", "SUCCESS", "FAILURE", "DELAY")  # RFC 3461 §4.1
BODIES = ("7BIT", "8BITMIME", "BINARYMIME")  # RFC 6152, RFC 3030
RETS = (None, "FULL", "HDRS")  # RFC 3461 §4.3

_ENTRY_COLUMNS = (
    "id, sender, blob, size, created, next_attempt, attempts, held, envid, ret,"
    " requiretls, smtputf8, body, is_dsn, delay_dsn_sent"
)
_RCPT_COLUMNS = "address, notify, orcpt, state, attempts, code, enhanced, text, remote_mta, updated"


def is_queue_id(text: object) -> bool:
    """16..64 lower-case hex digits."""
    return isinstance(text, str) and ID_RE.fullmatch(text) is not None


def queue_shard(queue_id: str, shards: int) -> int:
    """The shard holding an entry: a stable hash of its id."""
    return shard_of(queue_id, shards)


def entry_to_json(entry: QueueEntry) -> dict[str, Any]:
    """A queue entry as plain JSON data (tuples become lists), plus
    ``pending``; without the body (``read_body`` reads it)."""
    data = dataclasses.asdict(dataclasses.replace(entry, data=None))
    del data["data"]
    data["pending"] = len(entry.pending)
    return data


def entry_from_json(data: dict[str, Any]) -> QueueEntry:
    """The inverse of ``entry_to_json`` (extra keys are ignored)."""
    fields = {f.name for f in dataclasses.fields(QueueEntry)}
    values = {k: v for k, v in data.items() if k in fields}
    values["recipients"] = tuple(
        QueuedRecipient(**{**r, "notify": tuple(r.get("notify", ()))})
        for r in data["recipients"]
    )
    return QueueEntry(**values)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text(value: str, limit: int, what: str) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise StorageError(f"bad {what}")
    if _CONTROL.search(value):
        raise StorageError(f"bad {what}: control characters")
    return value


# ---------------------------------------------------------------------------
# Reading state (reader connection on the hub, or the writer inside a Tx).


def _entry(conn: Any, row: tuple) -> QueueEntry:
    """The entry of a row of ``_ENTRY_COLUMNS`` (with ``data`` last, if read)."""
    (qid, sender, blob, size, created, next_attempt, attempts, held, envid, ret,
     requiretls, smtputf8, body, is_dsn, delay_dsn_sent) = row[:15]
    rcpts = conn.execute(
        f"SELECT {_RCPT_COLUMNS} FROM queue_rcpt WHERE qid = ? ORDER BY pos", (qid,)
    ).fetchall()
    return QueueEntry(
        id=qid,
        sender=sender,
        recipients=tuple(
            QueuedRecipient(
                address=a, notify=tuple(n.split()), orcpt=o, state=st, attempts=at, code=c,
                enhanced=e, text=t, remote_mta=m, updated=u,
            )
            for a, n, o, st, at, c, e, t, m, u in rcpts
        ),
        blob=blob,
        size=size,
        created=created,
        next_attempt=next_attempt,
        attempts=attempts,
        held=bool(held),
        envid=envid,
        ret=ret,
        requiretls=bool(requiretls),
        smtputf8=bool(smtputf8),
        body=body,
        is_dsn=bool(is_dsn),
        delay_dsn_sent=bool(delay_dsn_sent),
        data=row[15] if len(row) > 15 else None,
    )


def _due_ids(shard: Shard, now: float, limit: int, exclude: Collection[str]) -> list[tuple]:
    """(next_attempt, id) of up to ``limit`` due entries not in ``exclude``,
    walking the (held, next_attempt) index."""
    out: list[tuple] = []
    cursor = shard.reader.execute(
        "SELECT next_attempt, id FROM queue WHERE held = 0 AND next_attempt <= ?"
        " ORDER BY next_attempt", (now,))
    for row in cursor:
        if row[1] in exclude:
            continue
        out.append(row)
        if len(out) >= limit:
            break
    cursor.close()
    return out


def _read_entries(shard: Shard, where: str, params: tuple, *, bodies: bool = False
                  ) -> list[QueueEntry]:
    """Entries matching ``where``, read in one WAL snapshot; with ``bodies``
    their inline bodies too (``QueueEntry.data``)."""
    conn = shard.reader
    columns = f"{_ENTRY_COLUMNS}, data" if bodies else _ENTRY_COLUMNS
    conn.execute("BEGIN")
    try:
        rows = conn.execute(f"SELECT {columns} FROM queue WHERE {where}", params).fetchall()
        return [_entry(conn, row) for row in rows]
    finally:
        conn.execute("COMMIT")


def _require(tx: Tx, queue_id: str) -> tuple:
    row = tx.conn.execute(
        "SELECT attempts, next_attempt, delay_dsn_sent, held FROM queue WHERE id = ?",
        (queue_id,),
    ).fetchone()
    if row is None:
        raise NoSuchQueueEntry(queue_id)
    return row


# ---------------------------------------------------------------------------
# Intents (run by the group committer in the write transaction).


_ID_DRAW = 64  # candidate ids per getrandom call


def _draw_id(tx: Tx, number: int, shards: int) -> str:
    """16 random hex digits that map to shard ``number`` and name no entry yet."""
    for _ in range(16 * shards):  # ~1000 candidates per shard, as many as needed
        pool = secrets.token_bytes(8 * _ID_DRAW)
        for i in range(0, len(pool), 8):
            candidate = pool[i:i + 8].hex()
            if queue_shard(candidate, shards) == number and tx.conn.execute(
                "SELECT 1 FROM queue WHERE id = ?", (candidate,)
            ).fetchone() is None:
                return candidate
    raise StorageError("could not draw a queue id")  # pragma: no cover - p ~ e^-1000


def _new_entry(a: dict, raw: bytes | None) -> QueueEntry:
    """The entry ``_apply_enqueue`` stores for the op args ``a`` (no re-read),
    carrying ``raw``, its inline body, if any."""
    return QueueEntry(
        id=a["id"], sender=a["sender"],
        recipients=tuple(QueuedRecipient(r["address"], tuple(r["notify"]), r["orcpt"],
                                         updated=a["created"]) for r in a["recipients"]),
        blob=a.get("blob", ""), size=a["size"], created=a["created"],
        next_attempt=a["next_attempt"], envid=a["envid"], ret=a["ret"],
        requiretls=bool(a["requiretls"]), smtputf8=bool(a["smtputf8"]), body=a["body"],
        is_dsn=bool(a["is_dsn"]), data=raw,
    )  # fmt: skip


def intent_enqueue(
    tx: Tx, number: int, shards: int, sender: str, recipients: list[dict], blob: str | None,
    size: int, options: dict, raw: bytes | None = None,
) -> QueueEntry:
    """Draw a fresh id that maps to this shard, then log ``enqueue``: with the
    body inline (``raw``, as base64 ``data``) or naming its blob file."""
    now = time.time()
    args = {
        "id": _draw_id(tx, number, shards), "sender": sender, "recipients": recipients,
        "size": size, "created": now, "next_attempt": now, **options,
    }
    if raw is not None:
        args["data"] = base64.b64encode(raw).decode("ascii")
    else:
        args["blob"] = blob
    tx.log("enqueue", args)
    return _new_entry(args, raw)


def intent_record_attempt(
    tx: Tx, queue_id: str, results: list[RecipientResult], next_attempt: float | None,
    delay_dsn_sent: bool | None,
) -> QueueEntry | None:
    """Log ``attempt_result`` (and ``dequeue`` once nothing is pending).

    Each result applies to the first still-pending recipient with its address
    (case-insensitive); results for other addresses are ignored.  An unknown
    entry (deleted meanwhile) changes nothing and gives None.
    """
    row = tx.conn.execute(
        "SELECT attempts, next_attempt, delay_dsn_sent FROM queue WHERE id = ?", (queue_id,)
    ).fetchone()
    if row is None:
        return None
    attempts, current_next, current_dsn = row
    rcpts = tx.conn.execute(
        "SELECT pos, address, state, attempts FROM queue_rcpt WHERE qid = ? ORDER BY pos",
        (queue_id,),
    ).fetchall()
    pending = {pos: (addr.lower(), n) for pos, addr, state, n in rcpts if state == PENDING}
    now = time.time()
    updates: list[list] = []
    left = set(pending)
    for result in results:
        want = result.address.lower()
        pos = next((p for p in sorted(left) if pending[p][0] == want), None)
        if pos is None:
            continue
        if result.state != PENDING:
            left.discard(pos)
        updates.append([
            pos, result.state, pending[pos][1] + 1, result.code, result.enhanced,
            result.text[:MAX_REPLY_TEXT], result.remote_mta[:255], now,
        ])
        pending[pos] = ("", pending[pos][1])  # one result per recipient per attempt
    tx.log("attempt_result", {
        "id": queue_id,
        "attempts": attempts + 1,
        "next_attempt": current_next if next_attempt is None else float(next_attempt),
        "delay_dsn_sent": bool(current_dsn) if delay_dsn_sent is None else bool(delay_dsn_sent),
        "recipients": updates,
    })
    if not left:
        tx.log("dequeue", {"id": queue_id, "reason": "done"})
        return None
    return _entry(tx.conn, tx.conn.execute(
        f"SELECT {_ENTRY_COLUMNS} FROM queue WHERE id = ?", (queue_id,)).fetchone())


def intent_hold(tx: Tx, queue_id: str) -> None:
    if not _require(tx, queue_id)[3]:
        tx.log("hold", {"id": queue_id})


def intent_release(tx: Tx, queue_id: str) -> bool:
    """Un-hold and make it due now; False if it was not held (nothing logged)."""
    if not _require(tx, queue_id)[3]:
        return False
    tx.log("release", {"id": queue_id, "next_attempt": time.time()})
    return True


def intent_retry(tx: Tx, queue_id: str | None) -> int:
    """Make one entry (held or not), or every non-held entry, due now."""
    if queue_id is not None:
        _require(tx, queue_id)
        ids = [queue_id]
    else:
        ids = [r[0] for r in tx.conn.execute("SELECT id FROM queue WHERE held = 0 ORDER BY id")]
    now = time.time()
    for i in range(0, len(ids), MAX_IDS_PER_OP):
        tx.log("retry", {"ids": ids[i:i + MAX_IDS_PER_OP], "next_attempt": now})
    return len(ids)


def intent_delete(tx: Tx, queue_id: str) -> None:
    _require(tx, queue_id)
    tx.log("dequeue", {"id": queue_id, "reason": "deleted"})


def enqueue_args(
    sender: str,
    recipients: Iterable[QueuedRecipient],
    *,
    envid: str | None = None,
    ret: str | None = None,
    requiretls: bool = False,
    smtputf8: bool = False,
    body: str = "7BIT",
    is_dsn: bool = False,
) -> dict[str, Any]:
    """Checked ``enqueue`` arguments as JSON data ({sender, recipients,
    options}); raises StorageError for invalid ones."""
    rcpts = [
        {
            "address": _text(r.address, MAX_ADDRESS, "recipient"),
            "notify": [n.upper() for n in r.notify],
            "orcpt": None if r.orcpt is None else _text(r.orcpt, MAX_ADDRESS, "ORCPT"),
        }
        for r in recipients
    ]
    if not rcpts or len(rcpts) > MAX_RECIPIENTS:
        raise StorageError(f"an entry needs 1..{MAX_RECIPIENTS} recipients")
    if any(not r["address"] or any(n not in NOTIFY_VALUES for n in r["notify"])
           for r in rcpts):
        raise StorageError("bad recipient or NOTIFY value")
    if ret not in RETS or body not in BODIES:
        raise StorageError("bad RET or BODY value")
    options = {
        "envid": None if envid is None else _text(envid, MAX_ENVID, "ENVID"),
        "ret": ret, "requiretls": bool(requiretls), "smtputf8": bool(smtputf8),
        "body": body, "is_dsn": bool(is_dsn),
    }
    return {"sender": _text(sender, MAX_ADDRESS, "sender"), "recipients": rcpts,
            "options": options}


def check_enqueue_args(data: Any) -> dict[str, Any]:
    """``enqueue_args`` output received from elsewhere (an RPC), checked again."""
    try:
        rcpts = [QueuedRecipient(r["address"], tuple(r["notify"]), r["orcpt"])
                 for r in data["recipients"]]
        return enqueue_args(data["sender"], rcpts, **data["options"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise StorageError(f"bad enqueue arguments: {exc}") from None


# ---------------------------------------------------------------------------


class OutboundQueue:
    """node.context.OutboundQueue over a MailStore's shards.

    Every change returns once committed and raises StorageUnavailable
    otherwise; hold/release/retry/delete raise NoSuchQueueEntry for an
    unknown id.  Watchers run on the hub after a committed enqueue, retry,
    release or flush.
    """

    def __init__(self, store: MailStore, inline_max: int = INLINE_MAX) -> None:
        self.store = store
        self.inline_max = min(inline_max, INLINE_LIMIT)  # bodies up to this travel in the op
        self._watchers: list[tuple[Callable[..., None], bool]] = []
        self._known: set[int] | None = None  # shards that may hold entries
        self._recent: int | None = None  # the shard of the last enqueue
        self.cluster: Any = None  # node.context.ClusterView in cluster mode
        self.remote: Any = None  # node/admin.py ClusterQueue in cluster mode

    def use_cluster(self, view: Any, remote: Any) -> None:
        """Cluster mode: enqueue into led shards, else ``remote.enqueue(args,
        raw)`` (args from ``enqueue_args``; returns the entry a primary
        committed).  ``remote`` None: StorageUnavailable instead."""
        self.cluster = view
        self.remote = remote

    # -- shards ------------------------------------------------------------

    def _shard_numbers(self) -> list[int]:
        if self._known is None:
            self._known = set(self.store.existing_shards())
        return sorted(self._known)

    def local_shards(self, shards: Iterable[int] | None = None) -> list[int]:
        """The shards reads cover: ``shards`` if given (single node: those
        that exist), else every shard with entries (single node) or every
        shard led here (cluster)."""
        if self.cluster is None:
            known = self._shard_numbers()
            return known if shards is None else sorted(set(shards) & set(known))
        if shards is None:
            return sorted(self.cluster.local_primary_shards())
        return sorted(set(shards))

    def shard_of_id(self, queue_id: str) -> int | None:
        """The queue shard of a well-formed id (None if malformed)."""
        return queue_shard(queue_id, self.store.shards) if is_queue_id(queue_id) else None

    def _shard_of_id(self, queue_id: str) -> int | None:
        """The shard of an id, or None if it is malformed or (single node)
        that shard has no database."""
        number = self.shard_of_id(queue_id)
        if number is None or self.cluster is not None:
            return number
        return number if number in self._shard_numbers() else None

    def _submit(self, number: int, intent: Callable[[Tx], Any]) -> Any:
        # Through the role gate: StorageUnavailable unless this node leads the shard.
        return self.store.submit_to(number, intent)

    def _submit_for(self, queue_id: str, intent: Callable[..., Any], **kwargs: Any) -> Any:
        number = self._shard_of_id(queue_id)
        if number is None:
            raise NoSuchQueueEntry(queue_id)
        return self._submit(number, functools.partial(intent, queue_id=queue_id, **kwargs))

    # -- watchers ------------------------------------------------------------

    def watch(self, callback: Callable[..., None], *, entries: bool = False
              ) -> Callable[[], None]:
        """callback() on the hub after each committed enqueue/retry/release/flush.

        With ``entries=True`` it is called as callback(entry) with the new
        QueueEntry after an enqueue, and callback(None) after the others
        (the queue runner dispatches new entries without a query).
        """
        item = (callback, entries)
        self._watchers.append(item)

        def stop() -> None:
            if item in self._watchers:
                self._watchers.remove(item)

        return stop

    def _notify(self, entry: QueueEntry | None = None) -> None:
        for callback, with_entry in list(self._watchers):
            try:
                if with_entry:
                    callback(entry)
                else:
                    callback()
            except Exception:
                log.exception("queue watcher failed")

    # -- writes ------------------------------------------------------------

    def enqueue(
        self,
        sender: str,
        recipients: Iterable[QueuedRecipient],
        raw: bytes,
        *,
        envid: str | None = None,
        ret: str | None = None,
        requiretls: bool = False,
        smtputf8: bool = False,
        body: str = "7BIT",
        is_dsn: bool = False,
    ) -> QueueEntry:
        """Queue one message; every recipient starts pending (their state
        fields are ignored).  Raises StorageError for invalid arguments before
        anything is written."""
        args = enqueue_args(sender, recipients, envid=envid, ret=ret, requiretls=requiretls,
                            smtputf8=smtputf8, body=body, is_dsn=is_dsn)
        if self.cluster is not None and not self.cluster.local_primary_shards():
            return self._forward_enqueue(args, raw)
        try:
            return self.enqueue_checked(args, raw)
        except StorageUnavailable:
            if self.cluster is None or self.remote is None:
                raise
            return self._forward_enqueue(args, raw)  # lost the lead meanwhile

    def enqueue_checked(self, args: dict, raw: bytes, number: int | None = None) -> QueueEntry:
        """Enqueue ``enqueue_args`` output into shard ``number`` (default: one
        chosen here once the body is stored); never forwards (the
        ``queue.enqueue`` RPC handler).  A body of up to ``inline_max``
        octets goes into the op: durable with its commit, no blob file."""
        raw = bytes(raw)
        stored = None
        inline = len(raw) <= self.inline_max
        if inline:
            blob = None
        elif len(raw) <= _OVERLAP_MAX:
            # The body's fsyncs overlap the batch's prepare (and replication);
            # the batch commits only once it is durable (storage/groupcommit.py).
            blob, stored = self.store.blobs.put_nowait(raw)
        else:
            blob = self.store.blobs.put(raw)  # durable before the op that names it
        if number is None:
            number = self._enqueue_shard()
            if number is None:
                raise StorageUnavailable("this node leads no queue shard")
        entry = self.store.submit_to(number, functools.partial(
            intent_enqueue, number=number, shards=self.store.shards, sender=args["sender"],
            recipients=args["recipients"], blob=blob, size=len(raw), options=args["options"],
            raw=raw if inline else None,
        ), stored)
        self._shard_numbers()
        assert self._known is not None
        self._known.add(number)
        self._notify(entry)
        return entry

    def _enqueue_shard(self) -> int | None:
        """A shard to enqueue into: any (single node) or a led one (cluster;
        None if none).  A shard whose committer has a batch running or
        waiting comes first, so that concurrent enqueues and attempt results
        share commits (one transaction and one fsync for several) instead of
        each opening its own on a random shard; otherwise a random one."""
        if self.cluster is None:
            candidates = range(self.store.shards)
        else:
            candidates = self.cluster.local_primary_shards()
            if not candidates:
                return None
        recent = self._recent
        if recent in candidates and self.store.busy_shards([recent]):
            return recent  # the common case under load: no scan of every shard
        busy = self.store.busy_shards(list(candidates))
        self._recent = random.choice(busy or list(candidates))
        return self._recent

    def _forward_enqueue(self, args: dict, raw: bytes) -> QueueEntry:
        if self.remote is None:
            raise StorageUnavailable("this node leads no queue shard")
        return self.remote.enqueue(args, raw)

    def record_attempt(
        self,
        queue_id: str,
        results: Iterable[RecipientResult],
        next_attempt: float | None,
        *,
        delay_dsn_sent: bool | None = None,
    ) -> QueueEntry | None:
        """Apply one attempt's results (see ``intent_record_attempt``).

        ``next_attempt`` None keeps the current time.  Returns the updated
        entry, or None once no recipient is pending (the entry is removed in
        the same transaction) or if the entry no longer exists.
        """
        items = list(results)
        for r in items:
            if r.state not in STATES:
                raise StorageError(f"bad recipient state {r.state!r}")
        number = self._shard_of_id(queue_id)
        if number is None:
            return None
        return self._submit(number, functools.partial(
            intent_record_attempt, queue_id=queue_id, results=items,
            next_attempt=next_attempt, delay_dsn_sent=delay_dsn_sent,
        ))

    def hold(self, queue_id: str) -> None:
        """Keep the entry out of ``due`` until released (Postfix ``postsuper -h``)."""
        self._submit_for(queue_id, intent_hold)

    def release(self, queue_id: str) -> None:
        """Un-hold the entry and make it due now."""
        if self._submit_for(queue_id, intent_release):
            self._notify()

    def retry_now(self, queue_id: str) -> None:
        """Make the entry due now (its hold, if any, stays)."""
        self._submit_for(queue_id, intent_retry)
        self._notify()

    def delete(self, queue_id: str) -> None:
        """Remove the entry without any report (operator action)."""
        self._submit_for(queue_id, intent_delete)

    def flush(self, shards: Iterable[int] | None = None) -> int:
        """Make every non-held entry due now (of ``shards``, default
        ``local_shards()``); returns how many."""
        total = 0
        for number in self.local_shards(shards):
            total += self._submit(number, functools.partial(intent_retry, queue_id=None))
        self._notify()
        return total

    # -- reads -------------------------------------------------------------

    def get(self, queue_id: str) -> QueueEntry | None:
        number = self._shard_of_id(queue_id)
        if number is None:
            return None
        shard, _ = self.store.shard_by_number(number)
        found = _read_entries(shard, "id = ?", (queue_id,))
        return found[0] if found else None

    def due(self, now: float, limit: int, *, shards: Iterable[int] | None = None,
            exclude: Collection[str] = ()) -> list[QueueEntry]:
        """Entries not held with next_attempt <= now, earliest first, at most
        ``limit``, from ``shards`` (default ``local_shards()``), leaving out
        the ids in ``exclude``."""
        if limit <= 0:
            return []
        chosen: list[tuple] = []
        for number in self.local_shards(shards):
            shard, _ = self.store.shard_by_number(number)
            chosen += [(when, qid, number) for when, qid in _due_ids(shard, now, limit, exclude)]
        chosen.sort()
        by_shard: dict[int, list[str]] = {}
        for _, qid, number in chosen[:limit]:
            by_shard.setdefault(number, []).append(qid)
        found: list[QueueEntry] = []
        for number, ids in by_shard.items():
            shard, _ = self.store.shard_by_number(number)
            for i in range(0, len(ids), 500):  # SQLite's variable limit is far above
                part = ids[i:i + 500]
                found += _read_entries(
                    shard, f"id IN ({','.join('?' * len(part))}) AND held = 0", tuple(part),
                    bodies=True)
        found.sort(key=lambda e: (e.next_attempt, e.id))
        return found

    def next_due(self, *, after: float | None = None,
                 shards: Iterable[int] | None = None) -> float | None:
        """The earliest next_attempt of a non-held entry (later than ``after``
        if given) in ``shards`` (default ``local_shards()``), or None."""
        best: float | None = None
        where = "held = 0" if after is None else "held = 0 AND next_attempt > ?"
        params: tuple = () if after is None else (after,)
        for number in self.local_shards(shards):
            shard, _ = self.store.shard_by_number(number)
            (value,) = shard.reader.execute(
                f"SELECT min(next_attempt) FROM queue WHERE {where}", params
            ).fetchone()
            if value is not None and (best is None or value < best):
                best = value
        return best

    def list(
        self,
        domain: str | None = None,
        sender: str | None = None,
        older_than: float | None = None,
        now: float | None = None,
        *,
        shards: Iterable[int] | None = None,
    ) -> list[QueueEntry]:
        """Every entry of ``shards`` (default ``local_shards()``), oldest
        first, filtered by recipient domain, sender (an address, or
        ``@domain``), and age in seconds -- all case-insensitive."""
        cutoff = None if older_than is None else (now or time.time()) - older_than
        out: list[QueueEntry] = []
        for number in self.local_shards(shards):
            shard, _ = self.store.shard_by_number(number)
            out += _read_entries(shard, "1 ORDER BY created", ())
        return sorted(
            (e for e in out if _matches(e, domain, sender, cutoff)),
            key=lambda e: (e.created, e.id),
        )

    def read_message(self, blob: str) -> bytes:
        return self.store.read_message(blob)

    def read_body(self, entry: QueueEntry) -> bytes:
        """The message of an entry: the body it carries, its blob file, or
        its row's inline body.  Raises NoSuchQueueEntry if the entry is
        gone, NoSuchBlob if its blob is."""
        if entry.data is not None:
            return entry.data
        if entry.blob:
            return self.store.read_message(entry.blob)
        number = self._shard_of_id(entry.id)
        if number is None:
            raise NoSuchQueueEntry(entry.id)
        shard, _ = self.store.shard_by_number(number)
        row = shard.reader.execute("SELECT data FROM queue WHERE id = ?", (entry.id,)).fetchone()
        if row is None or row[0] is None:
            raise NoSuchQueueEntry(entry.id)
        return bytes(row[0])


def _matches(
    entry: QueueEntry, domain: str | None, sender: str | None, cutoff: float | None
) -> bool:
    if cutoff is not None and entry.created > cutoff:
        return False
    if sender is not None:
        want = sender.lower()
        have = entry.sender.lower()
        if want.startswith("@"):
            if not have.endswith(want):
                return False
        elif have != want:
            return False
    if domain is not None:
        want = domain.lower().lstrip("@")
        domains: Sequence[str] = [r.address.rpartition("@")[2].lower() for r in entry.recipients]
        if want not in domains:
            return False
    return True
