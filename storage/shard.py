"""One SQLite database per shard: the operation log and the state it builds.

Theory of operation
-------------------
Every change to a shard is an *operation* appended to the ``oplog`` table
``(idx, epoch, ts, op, args)``; the state tables (``mailboxes``, ``messages``,
``expunged``, ``shard_meta``, and the outbound queue's ``queue`` and
``queue_rcpt``, see storage/queue.py) are exactly what applying the log in
index order produces.  An operation is created by the writer *inside* the write
transaction: an intent handler (``intent_*``) reads the current state,
validates, decides every value (UID, MODSEQ, UIDVALIDITY, times) and records
them in the op's JSON args; the matching ``_apply_*`` function then changes
state using only those args and the state itself.  Replaying the log into an
empty database, or shipping it to a replica (``ops_since`` / ``apply_ops``),
therefore yields identical state.

Mailboxes are keyed by their UIDVALIDITY, which is unique within a shard
(``max(now, last + 1)``), so a recreated mailbox never repeats an earlier
incarnation's value (RFC 3501 §2.3.1.1) and renaming needs no message moves.

Threads: the writer connection is used only from gevent's threadpool, one
batch at a time (storage/groupcommit.py); the reader connection only on the
hub, for small indexed queries.  WAL mode means readers never wait for the
writer and always see the last committed state.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import fts, names
from storage.model import (
    DEFAULT_MAILBOXES,
    PENDING,
    AppendResult,
    FlagChange,
    LogMismatch,
    MailboxChanges,
    MailboxExists,
    MailboxInfo,
    MailboxNotAllowed,
    MailboxStatus,
    MessageRow,
    MetadataTooMany,
    NoSuchMailbox,
    SpecialUseInUse,
    StorageError,
    StorageUnavailable,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS oplog (
    idx INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    ts REAL NOT NULL,
    op TEXT NOT NULL,
    args TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS shard_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailboxes (
    uidvalidity INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    name TEXT NOT NULL,
    uidnext INTEGER NOT NULL,
    highestmodseq INTEGER NOT NULL,
    special_use TEXT,
    subscribed INTEGER NOT NULL,
    UNIQUE (account, name)
);
CREATE TABLE IF NOT EXISTS messages (
    mailbox INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    blob TEXT NOT NULL,
    size INTEGER NOT NULL,
    internaldate REAL NOT NULL,
    flags TEXT NOT NULL,
    modseq INTEGER NOT NULL,
    meta TEXT NOT NULL,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_modseq ON messages (mailbox, modseq);
-- Covers what an IMAP view (uid_flags) and STATUS read, so they scan this
-- small index instead of the message rows with their metadata JSON
-- (100,000 messages: ~5 s -> well under a second).
CREATE INDEX IF NOT EXISTS messages_view ON messages (mailbox, uid, flags, size);
CREATE TABLE IF NOT EXISTS expunged (
    mailbox INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS expunged_modseq ON expunged (mailbox, modseq);
CREATE TABLE IF NOT EXISTS queue (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    blob TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    next_attempt REAL NOT NULL,
    attempts INTEGER NOT NULL,
    held INTEGER NOT NULL,
    envid TEXT,
    ret TEXT,
    requiretls INTEGER NOT NULL,
    smtputf8 INTEGER NOT NULL,
    body TEXT NOT NULL,
    is_dsn INTEGER NOT NULL,
    delay_dsn_sent INTEGER NOT NULL,
    data BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS queue_due ON queue (held, next_attempt);
CREATE TABLE IF NOT EXISTS queue_rcpt (
    qid TEXT NOT NULL,
    pos INTEGER NOT NULL,
    address TEXT NOT NULL,
    notify TEXT NOT NULL,
    orcpt TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    code INTEGER,
    enhanced TEXT,
    text TEXT NOT NULL,
    remote_mta TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (qid, pos)
) WITHOUT ROWID;
"""

# Quota usage, save dates and METADATA (RFC 9208, RFC 8514, RFC 5464); see
# docs/storage.md.  Triggers keep derived state in step with every op that
# inserts or deletes messages (append, copy, move, expunge, delete, ...):
# ``usage`` counts each account's octets and messages, and a new message's
# ``savedate`` is the timestamp of the op that inserted it (the op being
# applied is always the newest log row), so replay and replicas agree.
MAILBOX_EXT_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    account TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    messages INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS metadata (
    account TEXT NOT NULL,
    mailbox INTEGER NOT NULL,
    entry TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (account, mailbox, entry)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS usage_add AFTER INSERT ON messages BEGIN
    INSERT INTO usage (account, bytes, messages)
        SELECT account, NEW.size, 1 FROM mailboxes WHERE uidvalidity = NEW.mailbox
        ON CONFLICT (account) DO UPDATE SET
            bytes = bytes + excluded.bytes, messages = messages + 1;
    UPDATE messages SET savedate = (SELECT ts FROM oplog ORDER BY idx DESC LIMIT 1)
        WHERE mailbox = NEW.mailbox AND uid = NEW.uid;
END;
CREATE TRIGGER IF NOT EXISTS usage_sub AFTER DELETE ON messages BEGIN
    UPDATE usage SET bytes = bytes - OLD.size, messages = messages - 1
        WHERE account = (SELECT account FROM mailboxes WHERE uidvalidity = OLD.mailbox);
END;
CREATE TRIGGER IF NOT EXISTS metadata_drop AFTER DELETE ON mailboxes BEGIN
    DELETE FROM metadata WHERE account = OLD.account AND mailbox = OLD.uidvalidity;
END;
"""


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the MAILBOX_EXT_SCHEMA state and the queue's ``data`` column to a
    database (idempotent).

    A database from before it gets NULL save dates (FETCH SAVEDATE NIL,
    RFC 8514 §4.3) and its usage counted once from the messages; its queue
    entries keep their blob files (``data`` NULL).
    """
    columns = {r[1] for r in conn.execute("PRAGMA table_info(messages)")}
    if "savedate" not in columns:
        conn.execute("ALTER TABLE messages ADD COLUMN savedate REAL")
    if "data" not in {r[1] for r in conn.execute("PRAGMA table_info(queue)")}:
        conn.execute("ALTER TABLE queue ADD COLUMN data BLOB")  # inline queued bodies
    had_usage = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage'"
    ).fetchone()
    backfill = "" if had_usage else (
        "INSERT INTO usage (account, bytes, messages)"
        " SELECT b.account, sum(m.size), count(*) FROM messages m"
        " JOIN mailboxes b ON b.uidvalidity = m.mailbox GROUP BY b.account;"
    )
    conn.executescript(f"BEGIN IMMEDIATE; {MAILBOX_EXT_SCHEMA} {backfill} COMMIT;")


STATE_TABLES = ("shard_meta", "mailboxes", "messages", "expunged", "queue", "queue_rcpt",
                "usage", "metadata")
MAX_UIDS_PER_OP = 1_000_000  # bounded op args


@dataclass(frozen=True)
class Op:
    """One log entry; ``args`` is the JSON object recorded in the log."""

    index: int
    epoch: int
    timestamp: float
    op: str
    args: dict[str, Any]


def _flags_text(flags: Iterable[str]) -> str:
    # Space-joined canonical list: flags are atoms, so a space never occurs.
    return " ".join(flags)


@functools.lru_cache(maxsize=4096)
def _flags_set(text: str) -> frozenset[str]:
    # Interned: a mailbox has few distinct flag lists, so every row and every
    # IMAP session view shares one frozenset per list (memory and time on
    # 100,000-message mailboxes; frozensets are immutable, so sharing is safe).
    return frozenset(text.split()) if text else frozenset()


def _mailbox_row(conn: sqlite3.Connection, account: str, name: str) -> tuple:
    """(uidvalidity, uidnext, highestmodseq) of a mailbox; raises NoSuchMailbox."""
    row = conn.execute(
        "SELECT uidvalidity, uidnext, highestmodseq FROM mailboxes"
        " WHERE account = ? AND name = ?",
        (account, name),
    ).fetchone()
    if row is None:
        raise NoSuchMailbox(name)
    return row


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _meta_get(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM shard_meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else 0


def _meta_set(conn: sqlite3.Connection, key: str, value: int) -> None:
    conn.execute(
        "INSERT INTO shard_meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


# ---------------------------------------------------------------------------
# Deterministic state transitions: args (+ state) -> state.  Each returns the
# (account, mailbox name) pairs it changed, for watchers.

Changes = list[tuple[str, str]]


def _apply_create_mailbox(conn: sqlite3.Connection, a: dict) -> Changes:
    for mb in a["mailboxes"]:
        conn.execute(
            "INSERT INTO mailboxes (uidvalidity, account, name, uidnext, highestmodseq,"
            " special_use, subscribed) VALUES (?, ?, ?, 1, 1, ?, ?)",
            (mb["uidvalidity"], a["account"], mb["name"], mb["special_use"], int(mb["subscribed"])),
        )
        _meta_set(conn, "last_uidvalidity", max(_meta_get(conn, "last_uidvalidity"), mb["uidvalidity"]))
    return [(a["account"], mb["name"]) for mb in a["mailboxes"]]


def _drop_mailbox(conn: sqlite3.Connection, uidvalidity: int) -> None:
    conn.execute("DELETE FROM messages WHERE mailbox = ?", (uidvalidity,))
    conn.execute("DELETE FROM expunged WHERE mailbox = ?", (uidvalidity,))
    conn.execute("DELETE FROM mailboxes WHERE uidvalidity = ?", (uidvalidity,))


def _apply_delete_mailbox(conn: sqlite3.Connection, a: dict) -> Changes:
    _drop_mailbox(conn, a["uidvalidity"])
    return [(a["account"], a["name"])]


def _apply_rename_mailbox(conn: sqlite3.Connection, a: dict) -> Changes:
    account, old, new = a["account"], a["old"], a["new"]
    if old == "INBOX":
        # RFC 3501 §6.3.5: the messages move to a new mailbox; INBOX stays, empty,
        # keeping its UIDVALIDITY and UIDNEXT.  Its children are unaffected.
        inbox = conn.execute(
            "SELECT uidvalidity, uidnext, highestmodseq FROM mailboxes"
            " WHERE account = ? AND name = 'INBOX'",
            (account,),
        ).fetchone()
        src, uidnext, hms = inbox
        conn.execute(
            "INSERT INTO mailboxes (uidvalidity, account, name, uidnext, highestmodseq,"
            " special_use, subscribed) VALUES (?, ?, ?, ?, ?, NULL, 0)",
            (a["uidvalidity"], account, new, uidnext, hms),
        )
        _meta_set(conn, "last_uidvalidity", max(_meta_get(conn, "last_uidvalidity"), a["uidvalidity"]))
        conn.execute(
            "INSERT OR REPLACE INTO expunged (mailbox, uid, modseq)"
            " SELECT mailbox, uid, ? FROM messages WHERE mailbox = ?",
            (a["modseq"], src),
        )
        conn.execute("UPDATE messages SET mailbox = ? WHERE mailbox = ?", (a["uidvalidity"], src))
        conn.execute(
            "UPDATE mailboxes SET highestmodseq = ? WHERE uidvalidity = ?", (a["modseq"], src)
        )
        return [(account, "INBOX"), (account, new)]
    # Rename the mailbox and every inferior name (RFC 3501 §6.3.5), in name order.
    rows = conn.execute(
        "SELECT uidvalidity, name FROM mailboxes WHERE account = ? AND (name = ? OR"
        " substr(name, 1, ?) = ?) ORDER BY name",
        (account, old, len(old) + 1, old + names.DELIMITER),
    ).fetchall()
    changes: Changes = []
    for uv, name in rows:
        renamed = new + name[len(old):]
        conn.execute("UPDATE mailboxes SET name = ? WHERE uidvalidity = ?", (renamed, uv))
        changes += [(account, name), (account, renamed)]
    return changes


def _apply_subscribe(conn: sqlite3.Connection, a: dict) -> Changes:
    conn.execute(
        "UPDATE mailboxes SET subscribed = ? WHERE uidvalidity = ?",
        (int(a["subscribed"]), a["uidvalidity"]),
    )
    return [(a["account"], a["name"])]


def _apply_append(conn: sqlite3.Connection, a: dict) -> Changes:
    conn.execute(
        "INSERT INTO messages (mailbox, uid, blob, size, internaldate, flags, modseq, meta)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            a["uidvalidity"], a["uid"], a["blob"], a["size"], a["internaldate"],
            _flags_text(a["flags"]), a["modseq"], _dumps(a["meta"]),
        ),
    )
    conn.execute(
        "UPDATE mailboxes SET uidnext = max(uidnext, ?), highestmodseq = max(highestmodseq, ?)"
        " WHERE uidvalidity = ?",
        (a["uid"] + 1, a["modseq"], a["uidvalidity"]),
    )
    return [(a["account"], a["mailbox"])]


def _apply_store_flags(conn: sqlite3.Connection, a: dict) -> Changes:
    top = 0
    for uid, flags, modseq in a["changes"]:
        conn.execute(
            "UPDATE messages SET flags = ?, modseq = ? WHERE mailbox = ? AND uid = ?",
            (_flags_text(flags), modseq, a["uidvalidity"], uid),
        )
        top = max(top, modseq)
    conn.execute(
        "UPDATE mailboxes SET highestmodseq = max(highestmodseq, ?) WHERE uidvalidity = ?",
        (top, a["uidvalidity"]),
    )
    return [(a["account"], a["mailbox"])]


def _apply_expunge(conn: sqlite3.Connection, a: dict) -> Changes:
    uv, modseq = a["uidvalidity"], a["modseq"]
    for uid in a["uids"]:
        conn.execute("DELETE FROM messages WHERE mailbox = ? AND uid = ?", (uv, uid))
        conn.execute(
            "INSERT OR REPLACE INTO expunged (mailbox, uid, modseq) VALUES (?, ?, ?)",
            (uv, uid, modseq),
        )
    conn.execute(
        "UPDATE mailboxes SET highestmodseq = max(highestmodseq, ?) WHERE uidvalidity = ?",
        (modseq, uv),
    )
    return [(a["account"], a["mailbox"])]


def _apply_copy(conn: sqlite3.Connection, a: dict) -> Changes:
    # RFC 3501 §6.4.7: flags and internal date are preserved.
    src, dst = a["src_uidvalidity"], a["dst_uidvalidity"]
    top_uid = top_modseq = 0
    for src_uid, dst_uid, modseq in a["pairs"]:
        conn.execute(
            "INSERT INTO messages (mailbox, uid, blob, size, internaldate, flags, modseq, meta)"
            " SELECT ?, ?, blob, size, internaldate, flags, ?, meta FROM messages"
            " WHERE mailbox = ? AND uid = ?",
            (dst, dst_uid, modseq, src, src_uid),
        )
        top_uid, top_modseq = max(top_uid, dst_uid), max(top_modseq, modseq)
    conn.execute(
        "UPDATE mailboxes SET uidnext = max(uidnext, ?), highestmodseq = max(highestmodseq, ?)"
        " WHERE uidvalidity = ?",
        (top_uid + 1, top_modseq, dst),
    )
    return [(a["account"], a["dst"])]


def _apply_move(conn: sqlite3.Connection, a: dict) -> Changes:
    # RFC 6851 §3.3: copy (flags and internal date kept) and expunge the
    # source messages, in one op so a crash never leaves both or neither.
    src, gone = a["src_uidvalidity"], a["src_modseq"]
    _apply_copy(conn, a)
    for src_uid, _dst_uid, _modseq in a["pairs"]:
        conn.execute("DELETE FROM messages WHERE mailbox = ? AND uid = ?", (src, src_uid))
        conn.execute(
            "INSERT OR REPLACE INTO expunged (mailbox, uid, modseq) VALUES (?, ?, ?)",
            (src, src_uid, gone),
        )
    conn.execute(
        "UPDATE mailboxes SET highestmodseq = max(highestmodseq, ?) WHERE uidvalidity = ?",
        (gone, src),
    )
    return [(a["account"], a["src"]), (a["account"], a["dst"])]


def _apply_delete_account(conn: sqlite3.Connection, a: dict) -> Changes:
    rows = conn.execute(
        "SELECT uidvalidity, name FROM mailboxes WHERE account = ? ORDER BY name", (a["account"],)
    ).fetchall()
    for uv, _name in rows:
        _drop_mailbox(conn, uv)
    conn.execute("DELETE FROM metadata WHERE account = ?", (a["account"],))  # server entries
    return [(a["account"], name) for _uv, name in rows]


def _apply_set_metadata(conn: sqlite3.Connection, a: dict) -> Changes:
    # RFC 5464 §4.3: a NIL value removes the entry.  mailbox 0 = the server.
    for entry, value in a["entries"]:
        if value is None:
            conn.execute(
                "DELETE FROM metadata WHERE account = ? AND mailbox = ? AND entry = ?",
                (a["account"], a["uidvalidity"], entry),
            )
        else:
            conn.execute(
                "INSERT OR REPLACE INTO metadata (account, mailbox, entry, value)"
                " VALUES (?, ?, ?, ?)",
                (a["account"], a["uidvalidity"], entry, base64.b64decode(value)),
            )
    return []


def _apply_restore_mailbox(conn: sqlite3.Connection, a: dict) -> Changes:
    # An in-place restore (storage/restore.py): the mailbox takes the backup's
    # UIDVALIDITY (dropping another incarnation), current messages missing
    # from the backup are expunged, and UIDs the backup brings back leave the
    # expunged table; "append" / "store_flags" ops of the same intent follow.
    uv = a["uidvalidity"]
    if a["replace"] is not None:
        _drop_mailbox(conn, a["replace"])
    if a["create"]:
        conn.execute(
            "INSERT INTO mailboxes (uidvalidity, account, name, uidnext, highestmodseq,"
            " special_use, subscribed) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (uv, a["account"], a["mailbox"], a["uidnext"], a["modseq"], a["special_use"],
             int(a["subscribed"])),
        )
        _meta_set(conn, "last_uidvalidity", max(_meta_get(conn, "last_uidvalidity"), uv))
    for uid in a["expunge"]:
        conn.execute("DELETE FROM messages WHERE mailbox = ? AND uid = ?", (uv, uid))
        conn.execute(
            "INSERT OR REPLACE INTO expunged (mailbox, uid, modseq) VALUES (?, ?, ?)",
            (uv, uid, a["modseq"]),
        )
    for uid in a["reinstate"]:
        conn.execute("DELETE FROM expunged WHERE mailbox = ? AND uid = ?", (uv, uid))
    conn.execute(
        "UPDATE mailboxes SET uidnext = max(uidnext, ?), highestmodseq = max(highestmodseq, ?)"
        " WHERE uidvalidity = ?",
        (a["uidnext"], a["modseq"], uv),
    )
    return [(a["account"], a["mailbox"])]


# -- outbound queue ops (storage/queue.py; docs/queue.md) ---------------------
# Queue ops change no mailbox, so they report no (account, mailbox) changes;
# storage/queue.py tells its own watchers after the commit.


def inline_body(a: dict) -> bytes | None:
    """The body an ``enqueue`` op carries inline (``data``, base64), or None
    when it names a blob file (``blob``, the only form before inline bodies)."""
    data = a.get("data")
    if data is None:
        return None
    if not isinstance(data, str):
        raise StorageError("bad inline body")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise StorageError("bad inline body") from None


def _apply_enqueue(conn: sqlite3.Connection, a: dict) -> Changes:
    conn.execute(
        "INSERT INTO queue (id, sender, blob, size, created, next_attempt, attempts, held,"
        " envid, ret, requiretls, smtputf8, body, is_dsn, delay_dsn_sent, data)"
        " VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?, ?, ?, ?, 0, ?)",
        (
            a["id"], a["sender"], a.get("blob", ""), a["size"], a["created"],
            a["next_attempt"], a["envid"], a["ret"], int(a["requiretls"]),
            int(a["smtputf8"]), a["body"], int(a["is_dsn"]), inline_body(a),
        ),
    )
    for pos, r in enumerate(a["recipients"]):
        conn.execute(
            "INSERT INTO queue_rcpt (qid, pos, address, notify, orcpt, state, attempts, code,"
            " enhanced, text, remote_mta, updated) VALUES (?, ?, ?, ?, ?, ?, 0, NULL, NULL,"
            " '', '', ?)",
            (a["id"], pos, r["address"], " ".join(r["notify"]), r["orcpt"], PENDING,
             a["created"]),
        )
    return []


def _apply_attempt_result(conn: sqlite3.Connection, a: dict) -> Changes:
    for pos, state, attempts, code, enhanced, text, remote_mta, updated in a["recipients"]:
        conn.execute(
            "UPDATE queue_rcpt SET state = ?, attempts = ?, code = ?, enhanced = ?, text = ?,"
            " remote_mta = ?, updated = ? WHERE qid = ? AND pos = ?",
            (state, attempts, code, enhanced, text, remote_mta, updated, a["id"], pos),
        )
    conn.execute(
        "UPDATE queue SET attempts = ?, next_attempt = ?, delay_dsn_sent = ? WHERE id = ?",
        (a["attempts"], a["next_attempt"], int(a["delay_dsn_sent"]), a["id"]),
    )
    return []


def _apply_dequeue(conn: sqlite3.Connection, a: dict) -> Changes:
    conn.execute("DELETE FROM queue_rcpt WHERE qid = ?", (a["id"],))
    conn.execute("DELETE FROM queue WHERE id = ?", (a["id"],))
    return []


def _apply_hold(conn: sqlite3.Connection, a: dict) -> Changes:
    conn.execute("UPDATE queue SET held = 1 WHERE id = ?", (a["id"],))
    return []


def _apply_release(conn: sqlite3.Connection, a: dict) -> Changes:
    conn.execute(
        "UPDATE queue SET held = 0, next_attempt = ? WHERE id = ?", (a["next_attempt"], a["id"])
    )
    return []


def _apply_retry(conn: sqlite3.Connection, a: dict) -> Changes:
    for qid in a["ids"]:
        conn.execute(
            "UPDATE queue SET next_attempt = ? WHERE id = ?", (a["next_attempt"], qid)
        )
    return []

MAILBOX_APPLY: dict[str, Callable[[sqlite3.Connection, dict], Changes]] = {
    "create_mailbox": _apply_create_mailbox,
    "delete_mailbox": _apply_delete_mailbox,
    "rename_mailbox": _apply_rename_mailbox,
    "subscribe": _apply_subscribe,
    "append": _apply_append,
    "store_flags": _apply_store_flags,
    "expunge": _apply_expunge,
    "copy": _apply_copy,
    "move": _apply_move,
    "set_metadata": _apply_set_metadata,
    "delete_account": _apply_delete_account,
    "restore_mailbox": _apply_restore_mailbox,
}
QUEUE_APPLY: dict[str, Callable[[sqlite3.Connection, dict], Changes]] = {
    "enqueue": _apply_enqueue,
    "attempt_result": _apply_attempt_result,
    "dequeue": _apply_dequeue,
    "hold": _apply_hold,
    "release": _apply_release,
    "retry": _apply_retry,
}
APPLY: dict[str, Callable[[sqlite3.Connection, dict], Changes]] = {
    **MAILBOX_APPLY, **QUEUE_APPLY,
}


# ---------------------------------------------------------------------------
# The write transaction seen by intent handlers.


class Tx:
    """One intent's view of the open write transaction (threadpool only)."""

    def __init__(self, conn: sqlite3.Connection, epoch: int) -> None:
        self.conn = conn
        self.epoch = epoch
        self.changes: Changes = []

    def log(self, op: str, args: dict[str, Any]) -> None:
        """Append an op to the log and apply it: the only way state changes."""
        index = _meta_get(self.conn, "last_index") + 1
        self.insert(Op(index, self.epoch, time.time(), op, args))

    def insert(self, op: Op) -> None:
        if op.op not in APPLY:
            raise StorageError(f"unknown operation {op.op!r}")
        self.conn.execute(
            "INSERT INTO oplog (idx, epoch, ts, op, args) VALUES (?, ?, ?, ?, ?)",
            (op.index, op.epoch, op.timestamp, op.op, _dumps(op.args)),
        )
        _meta_set(self.conn, "last_index", op.index)
        _meta_set(self.conn, "last_epoch", op.epoch)
        self.changes += APPLY[op.op](self.conn, op.args)

    def mailbox(self, account: str, name: str) -> tuple[int, int, int]:
        """(uidvalidity, uidnext, highestmodseq); raises NoSuchMailbox."""
        return _mailbox_row(self.conn, account, name)

    def new_uidvalidities(self, count: int) -> list[int]:
        """Values never used before in this shard (RFC 3501 §2.3.1.1)."""
        first = max(int(time.time()), _meta_get(self.conn, "last_uidvalidity") + 1)
        return list(range(first, first + count))


Intent = Callable[[Tx], Any]


# ---------------------------------------------------------------------------
# Intents: validate, decide every value, log ops.  Arguments arrive already
# validated by storage/mailstore.py where that needs no state.


def _ensure_defaults(tx: Tx, account: str) -> None:
    """Create the default folders (storage/model.py) for an account on first use."""
    if tx.conn.execute(
        "SELECT 1 FROM mailboxes WHERE account = ? AND name = 'INBOX'", (account,)
    ).fetchone():
        return
    existing = {r[0] for r in tx.conn.execute(
        "SELECT name FROM mailboxes WHERE account = ?", (account,))}
    wanted = [(n, su) for n, su in DEFAULT_MAILBOXES if n not in existing]
    uvs = tx.new_uidvalidities(len(wanted))
    tx.log("create_mailbox", {
        "account": account,
        "mailboxes": [
            {"name": n, "uidvalidity": uv, "special_use": su, "subscribed": True}
            for (n, su), uv in zip(wanted, uvs, strict=True)
        ],
    })


def intent_ensure_account(tx: Tx, account: str) -> None:
    _ensure_defaults(tx, account)


def intent_create_mailbox(
    tx: Tx, account: str, name: str, special_use: str | None
) -> MailboxInfo:
    _ensure_defaults(tx, account)
    existing = {r[0] for r in tx.conn.execute(
        "SELECT name FROM mailboxes WHERE account = ?", (account,))}
    if name in existing:
        raise MailboxExists(name)
    if special_use is not None and tx.conn.execute(
        "SELECT 1 FROM mailboxes WHERE account = ? AND special_use = ?", (account, special_use)
    ).fetchone():
        raise SpecialUseInUse(special_use)  # RFC 6154 §3: one mailbox per use
    # RFC 3501 §6.3.3: create superior hierarchical names that do not exist.
    parts = name.split(names.DELIMITER)
    todo = [names.DELIMITER.join(parts[:i]) for i in range(1, len(parts))]
    todo = [p for p in todo if p not in existing] + [name]
    uvs = tx.new_uidvalidities(len(todo))
    tx.log("create_mailbox", {
        "account": account,
        "mailboxes": [
            {"name": n, "uidvalidity": uv, "subscribed": False,
             "special_use": special_use if n == name else None}
            for n, uv in zip(todo, uvs, strict=True)
        ],
    })
    return MailboxInfo(name, uvs[-1], special_use, False)


METADATA_MAX_ENTRIES = 1000  # RFC 5464 §4.3 TOOMANY: entries per account, all mailboxes


def intent_set_metadata(
    tx: Tx, account: str, mailbox: str | None, entries: list[tuple[str, bytes | None]]
) -> None:
    """RFC 5464 §4.3 SETMETADATA: all entries or none; mailbox None = server."""
    uv = 0 if mailbox is None else tx.mailbox(account, mailbox)[0]
    count = tx.conn.execute(
        "SELECT count(*) FROM metadata WHERE account = ?", (account,)).fetchone()[0]
    for entry, value in entries:
        present = tx.conn.execute(
            "SELECT 1 FROM metadata WHERE account = ? AND mailbox = ? AND entry = ?",
            (account, uv, entry),
        ).fetchone()
        count += (value is not None and not present) - (value is None and bool(present))
    if count > METADATA_MAX_ENTRIES:
        raise MetadataTooMany(account)
    tx.log("set_metadata", {
        "account": account, "mailbox": mailbox, "uidvalidity": uv,
        "entries": [[e, None if v is None else base64.b64encode(v).decode("ascii")]
                    for e, v in entries],
    })


def intent_delete_mailbox(tx: Tx, account: str, name: str) -> None:
    if name == "INBOX":
        raise MailboxNotAllowed("INBOX cannot be deleted")  # RFC 3501 §6.3.4
    uv, _, _ = tx.mailbox(account, name)
    # Inferior names stay (RFC 9051 §6.3.4); the IMAP layer shows the gap.
    tx.log("delete_mailbox", {"account": account, "name": name, "uidvalidity": uv})


def intent_rename_mailbox(tx: Tx, account: str, old: str, new: str) -> None:
    _ensure_defaults(tx, account)
    tx.mailbox(account, old)
    if new == "INBOX" or new == old:
        raise MailboxExists(new)
    if old != "INBOX" and new.startswith(old + names.DELIMITER):
        raise MailboxNotAllowed("cannot rename a mailbox into itself")
    if tx.conn.execute(
        "SELECT 1 FROM mailboxes WHERE account = ? AND name = ?", (account, new)
    ).fetchone():
        raise MailboxExists(new)
    args: dict[str, Any] = {"account": account, "old": old, "new": new}
    if old == "INBOX":
        _, _, hms = tx.mailbox(account, "INBOX")
        args["uidvalidity"] = tx.new_uidvalidities(1)[0]
        args["modseq"] = hms + 1
    else:
        # Every renamed name must be free too (inferiors move along).
        rows = tx.conn.execute(
            "SELECT name FROM mailboxes WHERE account = ? AND substr(name, 1, ?) = ?",
            (account, len(old) + 1, old + names.DELIMITER),
        ).fetchall()
        for (child,) in rows:
            target = new + child[len(old):]
            if len(target.encode("utf-8")) > names.MAX_NAME_OCTETS:
                raise MailboxNotAllowed("renamed mailbox name too long")
            if tx.conn.execute(
                "SELECT 1 FROM mailboxes WHERE account = ? AND name = ?", (account, target)
            ).fetchone():
                raise MailboxExists(target)
    tx.log("rename_mailbox", args)


def intent_subscribe(tx: Tx, account: str, name: str, subscribed: bool) -> None:
    uv, _, _ = tx.mailbox(account, name)
    tx.log("subscribe", {"account": account, "name": name, "uidvalidity": uv,
                         "subscribed": bool(subscribed)})


def intent_append(
    tx: Tx, account: str, mailbox: str, blob: str, size: int, flags: list[str],
    internaldate: float, meta: dict, search_doc: tuple[fts.Doc | None] | None = None,
) -> AppendResult:
    _ensure_defaults(tx, account)
    uv, uidnext, hms = tx.mailbox(account, mailbox)
    tx.log("append", {
        "account": account, "mailbox": mailbox, "uidvalidity": uv, "uid": uidnext,
        "modseq": hms + 1, "blob": blob, "size": size, "internaldate": internaldate,
        "flags": flags, "meta": meta,
    })
    if search_doc is not None:
        # Text extracted at delivery; a derived index, not logged (storage/fts.py).
        fts.index_doc(tx.conn, uv, uidnext, search_doc[0])
    return AppendResult(account, mailbox, uv, uidnext, hms + 1, blob)


def intent_store_flags(
    tx: Tx, account: str, mailbox: str, uids: list[int], mode: str, flags: list[str],
    unchanged_since: int | None,
) -> list[FlagChange]:
    uv, _, hms = tx.mailbox(account, mailbox)
    given = set(flags)
    changes: list[FlagChange] = []
    for uid in uids:
        row = tx.conn.execute(
            "SELECT flags, modseq FROM messages WHERE mailbox = ? AND uid = ?", (uv, uid)
        ).fetchone()
        if row is None:
            continue
        current = _flags_set(row[0])
        # RFC 7162 §3.1.3: UNCHANGEDSINCE fails for messages modified after it.
        if unchanged_since is not None and row[1] > unchanged_since:
            continue
        if mode == "set":
            updated = frozenset(given)
        elif mode == "add":
            updated = current | given
        else:
            updated = current - given
        if updated == current:
            continue
        hms += 1
        changes.append(FlagChange(uid, updated, hms))
    if changes:
        tx.log("store_flags", {
            "account": account, "mailbox": mailbox, "uidvalidity": uv,
            "changes": [[c.uid, sorted(c.flags), c.modseq] for c in changes],
        })
    return changes


def intent_expunge(tx: Tx, account: str, mailbox: str, uids: list[int]) -> list[int]:
    uv, _, hms = tx.mailbox(account, mailbox)
    present = [
        uid for uid in uids
        if tx.conn.execute(
            "SELECT 1 FROM messages WHERE mailbox = ? AND uid = ?", (uv, uid)).fetchone()
    ]
    if present:
        tx.log("expunge", {"account": account, "mailbox": mailbox, "uidvalidity": uv,
                           "uids": present, "modseq": hms + 1})
    return present


def _plan_copies(
    tx: Tx, src_uv: int, uids: list[int], uidnext: int, hms: int
) -> tuple[list[list[int]], int]:
    """[source uid, new uid, new modseq] for each source message that exists,
    in order, and the destination's HIGHESTMODSEQ after them."""
    pairs: list[list[int]] = []
    for uid in uids:
        if tx.conn.execute(
            "SELECT 1 FROM messages WHERE mailbox = ? AND uid = ?", (src_uv, uid)
        ).fetchone():
            hms += 1
            pairs.append([uid, uidnext, hms])
            uidnext += 1
    return pairs, hms


def intent_copy(
    tx: Tx, account: str, src: str, uids: list[int], dst: str
) -> tuple[int, list[tuple[int, int]]]:
    src_uv, _, _ = tx.mailbox(account, src)
    dst_uv, uidnext, hms = tx.mailbox(account, dst)
    pairs, hms = _plan_copies(tx, src_uv, uids, uidnext, hms)
    if pairs:
        tx.log("copy", {"account": account, "src": src, "src_uidvalidity": src_uv,
                        "dst": dst, "dst_uidvalidity": dst_uv, "pairs": pairs})
    return dst_uv, [(s, d) for s, d, _ in pairs]


def intent_move(
    tx: Tx, account: str, src: str, uids: list[int], dst: str
) -> tuple[int, list[tuple[int, int]]]:
    """RFC 6851 MOVE as one op: new UIDs in dst, then the sources expunged."""
    src_uv, _, src_hms = tx.mailbox(account, src)
    dst_uv, uidnext, hms = tx.mailbox(account, dst)
    pairs, hms = _plan_copies(tx, src_uv, uids, uidnext, hms)
    if pairs:
        # The expunge's MODSEQ follows every copy when src is dst (one counter).
        gone = (hms if src_uv == dst_uv else src_hms) + 1
        tx.log("move", {"account": account, "src": src, "src_uidvalidity": src_uv,
                        "dst": dst, "dst_uidvalidity": dst_uv, "pairs": pairs,
                        "src_modseq": gone})
    return dst_uv, [(s, d) for s, d, _ in pairs]


def intent_delete_account(tx: Tx, account: str) -> None:
    if tx.conn.execute("SELECT 1 FROM mailboxes WHERE account = ?", (account,)).fetchone():
        tx.log("delete_account", {"account": account})


def intent_restore_mailbox(tx: Tx, account: str, mailbox: str, backup: dict) -> dict:
    """Put a mailbox back as it is in ``backup`` (storage/restore.py), in place.

    ``backup``: {uidvalidity, uidnext, special_use, subscribed, messages:
    [{uid, blob, size, internaldate, flags, meta}]}.  Same UIDVALIDITY as
    now: UIDs kept, UIDNEXT = max of both.  Else (a recreated or deleted
    mailbox) the mailbox takes the backup's UIDVALIDITY and UIDs (a fresh
    one if another mailbox of the shard holds it).  Current messages not in
    the backup are expunged; every change gets a MODSEQ above the current
    HIGHESTMODSEQ, so CONDSTORE/QRESYNC clients resync.  Logs one
    ``restore_mailbox`` op, then ``store_flags`` and one ``append`` per
    message brought back (each names its blob, for replication and backup).
    """
    _ensure_defaults(tx, account)
    row = tx.conn.execute(
        "SELECT uidvalidity, uidnext, highestmodseq, special_use, subscribed FROM mailboxes"
        " WHERE account = ? AND name = ?", (account, mailbox)).fetchone()
    wanted = {int(m["uid"]): m for m in backup["messages"]}
    uv = int(backup["uidvalidity"])
    same = row is not None and row[0] == uv
    if not same and tx.conn.execute(
            "SELECT 1 FROM mailboxes WHERE uidvalidity = ?", (uv,)).fetchone():
        uv = tx.new_uidvalidities(1)[0]  # held by another mailbox of this shard
    present: dict[int, tuple[str, frozenset[str]]] = {}
    if same:
        present = {u: (b, _flags_set(f)) for u, b, f in tx.conn.execute(
            "SELECT uid, blob, flags FROM messages WHERE mailbox = ?", (uv,))}
    hms = max(row[2] if row else 0, 0 if same else int(backup.get("highestmodseq", 0)))
    special = row[3] if row else backup.get("special_use")
    if special is not None and not same and tx.conn.execute(
            "SELECT 1 FROM mailboxes WHERE account = ? AND special_use = ? AND name != ?",
            (account, special, mailbox)).fetchone():
        special = None  # RFC 6154 §3: the use moved to another mailbox meanwhile
    gone = sorted(u for u in present if u not in wanted)
    back = sorted(u for u in wanted if u not in present or present[u][0] != wanted[u]["blob"])
    gone += [u for u in back if u in present]  # same UID, other body: replaced
    hms += 1
    tx.log("restore_mailbox", {
        "account": account, "mailbox": mailbox, "uidvalidity": uv,
        "replace": None if same or row is None else row[0], "create": not same,
        "special_use": special, "subscribed": bool(row[4]) if row else
        bool(backup.get("subscribed", True)),
        "uidnext": max(int(backup["uidnext"]), row[1] if same else 1, max(wanted, default=0) + 1),
        "modseq": hms, "expunge": sorted(gone), "reinstate": back,
    })
    changes = []
    for uid in sorted(set(wanted) - set(back)):
        flags = sorted(set(wanted[uid]["flags"]))
        if frozenset(flags) != present[uid][1]:
            hms += 1
            changes.append([uid, flags, hms])
    if changes:
        tx.log("store_flags", {"account": account, "mailbox": mailbox, "uidvalidity": uv,
                               "changes": changes})
    for uid in back:
        m = wanted[uid]
        hms += 1
        tx.log("append", {
            "account": account, "mailbox": mailbox, "uidvalidity": uv, "uid": uid,
            "modseq": hms, "blob": m["blob"], "size": int(m["size"]),
            "internaldate": float(m["internaldate"]), "flags": sorted(set(m["flags"])),
            "meta": m["meta"],
        })
    return {"uidvalidity": uv, "recreated": not same, "restored": len(back),
            "reflagged": len(changes), "expunged": len(gone)}


def intent_append_replicated(
    tx: Tx, epoch: int, prev: tuple[int, int], ops: list[Op]
) -> tuple[int, int]:
    """Follower side of replication: append the primary's ops after ``prev``.

    Log matching: the log's last (index, epoch) must be ``prev``, otherwise
    LogMismatch carries ours.  No op may be newer than the sender's epoch.
    An empty ``ops`` only checks ``prev``.  Returns the new last (index, epoch).
    """
    last = (_meta_get(tx.conn, "last_index"), _meta_get(tx.conn, "last_epoch"))
    if last != (int(prev[0]), int(prev[1])):
        raise LogMismatch(*last)
    if any(op.epoch > epoch for op in ops):
        raise StorageError(f"replicated op newer than its sender's epoch {epoch}")
    if ops:
        intent_apply_ops(tx, ops)
        last = (ops[-1].index, ops[-1].epoch)
    return last


def intent_apply_ops(tx: Tx, ops: list[Op]) -> int:
    """Replication/replay: append given ops in order; returns the last index.

    Each op must continue the log (index = last + 1) and carry an epoch no
    older than the last one applied (design.md, promise 2).
    """
    last = _meta_get(tx.conn, "last_index")
    epoch = _meta_get(tx.conn, "last_epoch")
    for op in ops:
        if op.index != last + 1:
            raise StorageError(f"op index {op.index} does not follow {last}")
        if op.epoch < epoch:
            raise StorageError(f"op epoch {op.epoch} is older than {epoch}")
        tx.insert(op)
        last, epoch = op.index, op.epoch
    return last


def intent_compact_log(tx: Tx, floor: int, limit: int) -> int:
    """Delete at most ``limit`` of the oldest ops with idx <= ``floor``
    (storage/reclaim.py); the newest op always stays, and with it the
    position in shard_meta.  Logs nothing.  Returns how many went."""
    last = _meta_get(tx.conn, "last_index")
    floor = min(int(floor), last - 1)
    first = tx.conn.execute("SELECT min(idx) FROM oplog").fetchone()[0]
    if first is None or floor < first:
        return 0
    upto = min(floor, first + max(1, int(limit)) - 1)
    return tx.conn.execute("DELETE FROM oplog WHERE idx <= ?", (upto,)).rowcount


# ---------------------------------------------------------------------------


BatchResult = list[tuple[bool, Any, Changes]]


class Shard:
    """One shard database: ``run_batch`` for the writer, read queries for the hub."""

    def __init__(self, path: Path, fsync: bool = True, epoch: int = 0) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.epoch = epoch
        self.commits = 0  # successful batch commits, for tests and metrics
        self.incarnation = 0  # snapshots installed (``install``)
        # Test hook: called in the threadpool just before COMMIT; raising fails the batch.
        self.before_commit: Callable[[], None] | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None

    # -- lifecycle ---------------------------------------------------------

    def open_writer(self) -> None:
        """Open the writer connection and create the schema (threadpool side)."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'OFF'}")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
        _migrate(conn)
        conn.execute("BEGIN IMMEDIATE")  # the full-text index (storage/fts.py)
        fts.create(conn)
        conn.execute("COMMIT")
        self._writer = conn

    def open_reader(self) -> None:
        """Open the hub-side reader (after the writer created the schema)."""
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA query_only=1")
        self._reader = conn

    def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                conn.close()
        self._reader = self._writer = None

    def close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # -- writer (threadpool only, one batch at a time) ------------------------

    def run_batch(self, intents: list[Intent], epoch: int | None = None) -> BatchResult:
        """Run intents in ONE transaction with one commit.

        Each intent runs inside its own SAVEPOINT: an intent that raises is
        rolled back alone and its exception returned in its slot.  If the
        transaction cannot be committed, StorageUnavailable is raised and
        nothing of the batch is visible.  New ops carry ``epoch`` (default
        ``self.epoch``).
        """
        results, _ = self.prepare_batch(intents, epoch, collect=False)
        self.commit_prepared()
        return results

    def prepare_batch(
        self, intents: list[Intent], epoch: int | None = None, collect: bool = True
    ) -> tuple[BatchResult, list[Op]]:
        """The first half of ``run_batch``: run the intents in an open
        transaction and leave it open; returns the results and (if
        ``collect``) the ops the batch logged.  Follow with
        ``commit_prepared`` or ``rollback_prepared``; on error nothing stays."""
        conn = self._writer
        if conn is None:
            raise StorageUnavailable("shard is closed")
        stamp = self.epoch if epoch is None else epoch
        results: BatchResult = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            before = _meta_get(conn, "last_index")
            for intent in intents:
                conn.execute("SAVEPOINT op")
                tx = Tx(conn, stamp)
                try:
                    value = intent(tx)
                except (sqlite3.OperationalError, sqlite3.InternalError):
                    raise  # the database itself is failing: the batch fails
                except Exception as exc:  # handed to its caller
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, exc, []))
                else:
                    conn.execute("RELEASE op")
                    results.append((True, value, tx.changes))
            new_ops = _read_ops(conn, before, None) if collect else []
        except BaseException as exc:
            self.rollback_prepared()
            raise StorageUnavailable("shard commit failed") from exc
        return results, new_ops

    def commit_prepared(self) -> None:
        """COMMIT the prepared batch (fsync); StorageUnavailable and rolled back on failure."""
        conn = self._writer
        if conn is None:
            raise StorageUnavailable("shard is closed")
        try:
            if self.before_commit is not None:
                self.before_commit()
            conn.execute("COMMIT")
        except BaseException as exc:
            self.rollback_prepared()
            raise StorageUnavailable("shard commit failed") from exc
        self.commits += 1

    def rollback_prepared(self) -> None:
        """Discard the prepared batch (a no-op if no transaction is open)."""
        if self._writer is not None and self._writer.in_transaction:
            try:
                self._writer.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite may already have rolled back

    def install(self, source: Path) -> tuple[int, int]:
        """Replace this database by the snapshot file ``source`` (threadpool;
        the caller holds the committer paused and has closed the reader).

        The snapshot is checked first; then the writer is checkpointed and
        closed, the file copied next to the database, fsynced, the stale
        -wal/-shm removed and the copy renamed over the database (directory
        fsynced), and the writer reopened.  Returns the position it holds.
        """
        position = _snapshot_position(Path(source))
        tmp = self.path.with_name(self.path.name + ".install")
        shutil.copyfile(source, tmp)
        _fsync_file(tmp)
        if self._writer is not None:
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._writer.close()
            self._writer = None
        try:
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            os.replace(tmp, self.path)
            self.incarnation += 1
            _fsync_dir(self.path.parent)
        finally:
            tmp.unlink(missing_ok=True)
            self.open_writer()
        return position

    # -- whole-database reads (threadpool, a connection of their own) ----------

    @contextmanager
    def _snapshot_reader(self) -> Iterator[sqlite3.Connection]:
        """A private read connection inside one read transaction (one WAL snapshot)."""
        with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            conn.execute("PRAGMA query_only=1")
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def export_snapshot(self, dest: Path) -> tuple[int, int]:
        """A consistent copy of the database at ``dest`` (``VACUUM INTO``,
        fsynced) and the (last_index, last_epoch) it holds.  Threadpool."""
        dest = Path(dest)
        dest.unlink(missing_ok=True)
        with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            conn.execute("VACUUM INTO ?", (str(dest),))
        _fsync_file(dest)
        return _snapshot_position(dest, check=False)

    def state_digest(self) -> tuple[tuple[int, int], str]:
        """(position, sha256 hex over every state table's rows in key order)
        from one snapshot; the FTS tables are derived and left out.  Threadpool."""
        h = hashlib.sha256()
        with self._snapshot_reader() as conn:
            position = _position(conn)
            for table in STATE_TABLES:
                width = len(conn.execute(f"SELECT * FROM {table} LIMIT 0").description)
                order = ", ".join(str(i + 1) for i in range(width))
                h.update(f"\x00{table}\x00".encode())
                for row in conn.execute(f"SELECT * FROM {table} ORDER BY {order}"):
                    h.update(repr(row).encode("utf-8", "surrogatepass"))
                    h.update(b"\n")
        return position, h.hexdigest()

    def read_ops(self, index: int, limit: int, max_bytes: int | None = None) -> list[Op]:
        """``ops_since`` on a private connection (threadpool: many ops to decode)."""
        with self._snapshot_reader() as conn:
            return _read_ops(conn, index, limit, max_bytes)

    def blob_names(self) -> set[str]:
        """Every blob the messages and the queue reference (an inline queued
        body references none).  Threadpool."""
        with self._snapshot_reader() as conn:
            rows = conn.execute("SELECT blob FROM messages UNION"
                                " SELECT blob FROM queue WHERE blob <> ''")
            return {blob for (blob,) in rows}

    def referenced_blobs(self) -> set[str]:
        """``blob_names`` plus every blob an op still in the log names
        (replay, catch-up and backup may need them).  Threadpool."""
        with self._snapshot_reader() as conn:
            rows = conn.execute(
                "SELECT blob FROM messages UNION SELECT blob FROM queue WHERE blob <> ''"
                " UNION SELECT json_extract(args, '$.blob') FROM oplog"
                " WHERE json_extract(args, '$.blob') IS NOT NULL")
            return {blob for (blob,) in rows if isinstance(blob, str)}

    # -- reader (hub) ------------------------------------------------------

    @property
    def reader(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StorageUnavailable("shard is closed")
        return self._reader

    def ops_since(self, index: int, limit: int = 10_000, max_bytes: int | None = None
                  ) -> list[Op]:
        """Log entries with idx > index, ascending, at most ``limit`` (and, if
        given, no more than ``max_bytes`` of JSON args past the first)."""
        return _read_ops(self.reader, index, limit, max_bytes)

    def last_index(self) -> int:
        row = self.reader.execute("SELECT value FROM shard_meta WHERE key = 'last_index'").fetchone()
        return row[0] if row else 0

    def position(self) -> tuple[int, int]:
        """(last_index, last_epoch) of the committed log; (0, 0) when empty."""
        return _position(self.reader)

    def log_start(self) -> int:
        """The index of the oldest op still in the log (0: empty)."""
        return self.reader.execute("SELECT coalesce(min(idx), 0) FROM oplog").fetchone()[0]

    def op_epoch(self, index: int) -> int | None:
        """The epoch of the committed op at ``index`` (index 0: 0; None if absent)."""
        if index == 0:
            return 0
        row = self.reader.execute("SELECT epoch FROM oplog WHERE idx = ?", (index,)).fetchone()
        return row[0] if row else None

    def dump_state(self) -> dict[str, list[tuple]]:
        """Every state table's rows, sorted (for determinism checks and tools)."""
        return {
            t: sorted(self.reader.execute(f"SELECT * FROM {t}").fetchall())
            for t in STATE_TABLES
        }

    def _mailbox_row(self, account: str, name: str) -> tuple:
        return _mailbox_row(self.reader, account, name)

    def mailbox_state(self, account: str, name: str) -> tuple[int, int, int]:
        """(uidvalidity, uidnext, highestmodseq): one indexed row, no
        aggregate over the messages (what SELECT and a session sync need)."""
        uv, uidnext, hms = _mailbox_row(self.reader, account, name)
        return uv, uidnext, hms

    def list_mailboxes(self, account: str) -> list[MailboxInfo]:
        rows = self.reader.execute(
            "SELECT name, uidvalidity, special_use, subscribed FROM mailboxes"
            " WHERE account = ? ORDER BY name",
            (account,),
        ).fetchall()
        return [MailboxInfo(n, uv, su, bool(s)) for n, uv, su, s in rows]

    def usage(self, account: str) -> tuple[int, int]:
        """(octets, messages) stored for the account (RFC 9208 STORAGE, MESSAGE)."""
        row = self.reader.execute(
            "SELECT bytes, messages FROM usage WHERE account = ?", (account,)
        ).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def savedates(self, account: str, name: str, uids: Iterable[int]) -> dict[int, float | None]:
        """RFC 8514 save dates of the given messages (None: saved before they were kept)."""
        uv = self._mailbox_row(account, name)[0]
        out: dict[int, float | None] = {}
        wanted = list(uids)
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            for uid, saved in self.reader.execute(
                "SELECT uid, savedate FROM messages WHERE mailbox = ? AND uid IN"
                f" ({','.join('?' * len(chunk))})",
                (uv, *chunk),
            ):
                out[uid] = saved
        return out

    def get_metadata(self, account: str, mailbox: str | None) -> dict[str, bytes]:
        """RFC 5464 entries of a mailbox (None: the server), by entry name."""
        uv = 0 if mailbox is None else self._mailbox_row(account, mailbox)[0]
        return dict(self.reader.execute(
            "SELECT entry, value FROM metadata WHERE account = ? AND mailbox = ?", (account, uv)
        ).fetchall())

    def status(self, account: str, name: str) -> MailboxStatus:
        row = self.reader.execute(
            "SELECT m.uidvalidity, m.uidnext, m.highestmodseq, count(x.uid),"
            " coalesce(sum(instr(' ' || x.flags || ' ', ' \\Seen ') = 0), 0),"
            " coalesce(sum(x.size), 0)"
            " FROM mailboxes m LEFT JOIN messages x ON x.mailbox = m.uidvalidity"
            " WHERE m.account = ? AND m.name = ? GROUP BY m.uidvalidity",
            (account, name),
        ).fetchone()
        if row is None:
            raise NoSuchMailbox(name)
        uv, uidnext, hms, count, unseen, size = row
        return MailboxStatus(uv, uidnext, count, unseen, hms, size)

    def messages(self, account: str, name: str) -> list[MessageRow]:
        uv = self._mailbox_row(account, name)[0]
        rows = self.reader.execute(
            "SELECT uid, flags, modseq, size, internaldate, blob FROM messages"
            " WHERE mailbox = ? ORDER BY uid",
            (uv,),
        ).fetchall()
        return [MessageRow(u, _flags_set(f), m, s, d, b) for u, f, m, s, d, b in rows]

    def metadata(self, account: str, name: str, uids: Iterable[int]) -> dict[int, dict]:
        uv = self._mailbox_row(account, name)[0]
        out: dict[int, dict] = {}
        for chunk in _chunks(list(uids)):
            for uid, meta in self.reader.execute(
                "SELECT uid, meta FROM messages WHERE mailbox = ? AND uid IN"
                f" ({','.join('?' * len(chunk))})",
                (uv, *chunk),
            ):
                out[uid] = json.loads(meta)
        return out

    def rows(self, account: str, name: str, uids: Iterable[int]) -> dict[int, MessageRow]:
        """The rows of the given UIDs that exist (one indexed query per 500,
        the mailbox looked up inside it; NoSuchMailbox checked only when
        nothing matched, saving a statement per FETCH/STORE on the hub)."""
        out: dict[int, MessageRow] = {}
        for chunk in _chunks(list(uids)):
            for u, f, m, s, d, b in self.reader.execute(
                "SELECT uid, flags, modseq, size, internaldate, blob FROM messages"
                " WHERE mailbox = (SELECT uidvalidity FROM mailboxes"
                " WHERE account = ? AND name = ?)"
                f" AND uid IN ({','.join('?' * len(chunk))}) ORDER BY uid",
                (account, name, *chunk),
            ):
                out[u] = MessageRow(u, _flags_set(f), m, s, d, b)
        if not out:
            self._mailbox_row(account, name)  # raises NoSuchMailbox
        return out

    def uid_flags(self, account: str, name: str) -> list[tuple[int, frozenset[str]]]:
        """(uid, flags) of every message, ascending UID: what a session view
        needs at SELECT, without building a MessageRow per message."""
        uv = self._mailbox_row(account, name)[0]
        cur = self.reader.execute(
            "SELECT uid, flags FROM messages WHERE mailbox = ? ORDER BY uid", (uv,)
        )
        return [(u, _flags_set(f)) for u, f in cur]

    def search_text(
        self, account: str, name: str, query: fts.Query
    ) -> tuple[set[int], set[int]]:
        """(UIDs whose indexed text matches, UIDs not indexed): storage/fts.py."""
        uv = self._mailbox_row(account, name)[0]
        return fts.search(self.reader, uv, query)

    def changes_since(self, account: str, name: str, modseq: int) -> MailboxChanges:
        conn = self.reader
        conn.execute("BEGIN")  # one WAL snapshot for the three queries
        try:
            uv, _, hms = self._mailbox_row(account, name)
            if hms <= modseq:  # nothing changed (an idle NOOP, a poll): no scan
                return MailboxChanges(hms)
            # No ORDER BY uid: with it SQLite walked the whole mailbox in UID
            # order instead of the modseq index (2 s on 100,000 messages);
            # the few changed rows are sorted here.
            rows = sorted(conn.execute(
                "SELECT uid, flags, modseq, size, internaldate, blob FROM messages"
                " INDEXED BY messages_modseq WHERE mailbox = ? AND modseq > ?",
                (uv, modseq),
            ))
            gone = sorted(conn.execute(
                "SELECT uid FROM expunged INDEXED BY expunged_modseq"
                " WHERE mailbox = ? AND modseq > ?",
                (uv, modseq),
            ))
        finally:
            conn.execute("COMMIT")
        return MailboxChanges(
            hms,
            [MessageRow(u, _flags_set(f), m, s, d, b) for u, f, m, s, d, b in rows],
            [u for (u,) in gone],
        )


def _chunks(items: list[int], size: int = 500) -> Iterable[list[int]]:
    # Below SQLite's host-parameter limit (999 before 3.32).
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _read_ops(conn: sqlite3.Connection, index: int, limit: int | None,
              max_bytes: int | None = None) -> list[Op]:
    """Ops after ``index``; with ``max_bytes`` the first always, then only
    while their args' JSON adds up to at most that (ops with inline queued
    bodies are large: callers that ship ops in one frame bound them)."""
    cursor = conn.execute(
        "SELECT idx, epoch, ts, op, args FROM oplog WHERE idx > ? ORDER BY idx LIMIT ?",
        (index, -1 if limit is None else limit),
    )
    if max_bytes is None:
        return [Op(i, e, t, o, json.loads(a)) for i, e, t, o, a in cursor.fetchall()]
    out: list[Op] = []
    size = 0
    for i, e, t, o, a in cursor:
        size += len(a)
        if out and size > max_bytes:
            break
        out.append(Op(i, e, t, o, json.loads(a)))
    cursor.close()
    return out


def _position(conn: sqlite3.Connection) -> tuple[int, int]:
    # One statement: one read snapshot, so both values are of the same commit.
    found = dict(conn.execute(
        "SELECT key, value FROM shard_meta WHERE key IN ('last_index', 'last_epoch')"))
    return found.get("last_index", 0), found.get("last_epoch", 0)


def _snapshot_position(path: Path, check: bool = True) -> tuple[int, int]:
    """The (last_index, last_epoch) a shard database file holds; with ``check``
    it must pass SQLite's quick_check and have an op log (else StorageError)."""
    if not path.is_file():
        raise StorageError(f"{path}: no such snapshot")
    try:
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute("PRAGMA query_only=1")
            if check:
                (verdict,) = conn.execute("PRAGMA quick_check").fetchone()
                tables = {r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")}
                if verdict != "ok" or not {"oplog", "shard_meta"} <= tables:
                    raise StorageError(f"{path}: not a sound shard database ({verdict})")
            return _position(conn)
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"{path}: not a shard database") from exc


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
