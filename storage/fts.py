"""Full-text index for IMAP SEARCH (RFC 3501 §6.4.4, RFC 9051 §6.4.4), SQLite FTS5.

Theory of operation
-------------------
Each shard database holds two FTS5 tables with one row per message:
``fts_text`` with the decoded header lines (``hdr``) and the decoded text
of the text parts (``body``), and ``fts_addr`` with the decoded
Subject/From/To/Cc/Bcc values the SEARCH keys of those names read.  Every column holds exactly the text the unindexed SEARCH
path compares against (node/imap/mime.py ``full_text``/``body_text``/
``header_text``), *case-folded* (``str.casefold``) once at delivery.

Why the ``trigram`` tokenizer (not ``unicode61`` with prefix queries): IMAP
SEARCH is a case-insensitive *substring* match, and a word tokenizer cannot
find "port" in "report".  A trigram phrase query on case-folded text is an
exact substring test for needles of three or more characters; shorter
needles are answered by ``instr()`` over the stored columns of the mailbox's
rows (no MIME decoding, still inside SQLite).  So the index never changes
what SEARCH finds, only how fast: the answer equals the slow path's.

Rows follow the ``messages`` table through SQL triggers, not through the
individual ops: any insert into ``messages`` (append, copy, move, replay of
the log on a replica) queues the message in ``fts_pending``; a delete
removes its row; moving messages between mailboxes (RENAME INBOX) moves
their rows.  So the index is a pure function of the state the log builds and
of the blobs, whatever ops exist now or later.  The text itself is never in
the op log.  A new message waits in ``fts_pending`` until the store's
indexer (storage/mailstore.py) takes it, right after the commit that
delivered, copied or replayed it: blobs are read and decoded in the
threadpool (`pending_batch`, `extract_batch`), and many rows are written in
one short write transaction (`index_docs`), so delivery never waits for the
index and the hub never decodes MIME for it.  Messages the index cannot
represent exactly (decoded text over MAX_TEXT, control characters in the
header) stay in ``fts_pending`` with ``skip = 1``; SEARCH checks them and any
not-yet-indexed message the slow way.

``fts_text``, ``fts_addr`` and ``fts_pending`` are a derived index, not log
state: they are not in shard.STATE_TABLES.

FTS5 rowid = the 64-bit pattern ``uidvalidity << 32 | uid`` read as a signed
integer, so one mailbox is one contiguous rowid range.
"""

from __future__ import annotations

import importlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_TEXT = 4 * 1024 * 1024  # characters of decoded text indexed per message
FIELDS = ("hdr", "body", "subject", "from", "to", "cc", "bcc")
# Two tables: the long texts, and the short address/subject values, so a
# short needle's instr() scan over the header fields reads small rows only.
_TABLES = {"fts_text": ("hdr", "body"), "fts_addr": ("subj", "frm", "rcpt", "cc", "bcc")}
_COLUMNS = ("hdr", "body", "subj", "frm", "rcpt", "cc", "bcc")
_COLUMN_OF = dict(zip(FIELDS, _COLUMNS, strict=True))
_TABLE_OF = {c: t for t, cols in _TABLES.items() for c in cols}
_ROWID = "(({m} << 32) | {u})"  # SQLite integers wrap like Python's _rowid below
_OLD = _ROWID.format(m="OLD.mailbox", u="OLD.uid")
_NEW = _ROWID.format(m="NEW.mailbox", u="NEW.uid")


def _move_sql(table: str, cols: tuple[str, ...]) -> str:
    names = ", ".join(cols)
    return (f"INSERT INTO {table} (rowid, {names}) SELECT {_NEW}, {names} FROM {table}"
            f" WHERE rowid = {_OLD};\n    DELETE FROM {table} WHERE rowid = {_OLD};")


SCHEMA = "".join(
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {t} USING fts5({', '.join(cols)},"
    " tokenize = 'trigram case_sensitive 1');\n"
    for t, cols in _TABLES.items()
) + f"""
CREATE TABLE IF NOT EXISTS fts_pending (
    mailbox INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    skip INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS fts_msg_insert AFTER INSERT ON messages BEGIN
    INSERT OR IGNORE INTO fts_pending (mailbox, uid) VALUES (NEW.mailbox, NEW.uid);
END;
CREATE TRIGGER IF NOT EXISTS fts2_msg_delete AFTER DELETE ON messages BEGIN
    DELETE FROM fts_text WHERE rowid = {_OLD};
    DELETE FROM fts_addr WHERE rowid = {_OLD};
    DELETE FROM fts_pending WHERE mailbox = OLD.mailbox AND uid = OLD.uid;
END;
CREATE TRIGGER IF NOT EXISTS fts2_msg_move AFTER UPDATE OF mailbox, uid ON messages BEGIN
    {_move_sql("fts_text", _TABLES["fts_text"])}
    {_move_sql("fts_addr", _TABLES["fts_addr"])}
    UPDATE fts_pending SET mailbox = NEW.mailbox, uid = NEW.uid
        WHERE mailbox = OLD.mailbox AND uid = OLD.uid;
END;
"""
# The first layout (one table "fts"): dropped, its messages queued again.
_OLD_LAYOUT = ("DROP TRIGGER IF EXISTS fts_msg_delete", "DROP TRIGGER IF EXISTS fts_msg_move",
               "DROP TABLE IF EXISTS fts")


def create(conn: sqlite3.Connection) -> None:
    """Create the index in an open write transaction; a database that had
    messages before the index existed queues them all for indexing."""
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    requeue = "fts_pending" not in names or "fts" in names
    for statement in _OLD_LAYOUT:
        conn.execute(statement)
    for statement in _statements(SCHEMA):
        conn.execute(statement)
    if requeue:
        conn.execute("INSERT OR IGNORE INTO fts_pending (mailbox, uid) SELECT mailbox, uid"
                     " FROM messages")


def _statements(script: str) -> list[str]:
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return [s for s in out if s]


def _rowid(mailbox: int, uid: int) -> int:
    v = (mailbox << 32) | uid
    return v - (1 << 64) if v >= 1 << 63 else v


def _range(mailbox: int) -> tuple[int, int]:
    return _rowid(mailbox, 0), _rowid(mailbox, 0xFFFFFFFF)


# ---------------------------------------------------------------------------
# Text extraction (pure; at delivery off the hub, or by the indexer)


@dataclass(frozen=True)
class Doc:
    """Case-folded searchable text of one message, one value per FIELDS entry."""

    values: tuple[str, ...]


def _mime() -> Any:
    # The SEARCH text is defined by node/imap/mime.py (the unindexed path);
    # using the same functions keeps the two answers identical.
    return importlib.import_module("node.imap.mime")


def _header_ok(raw: bytes) -> bool:
    """False if the header holds control octets that the SEARCH paths strip
    differently (NUL, VT, FF, ...): such messages are checked the slow way."""
    head = raw.split(b"\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return not any(c < 0x20 and c not in (9, 10, 13) or c == 0x7F for c in head)


def extract(raw: bytes, meta: dict) -> Doc | None:
    """The Doc of a message, or None if the index cannot represent it exactly."""
    if not _header_ok(raw):
        return None
    mime = _mime()
    full = mime.full_text(raw)
    body = mime.body_text(raw)
    if body and full.endswith("\n" + body):
        hdr = full[: len(full) - len(body) - 1]
    elif full == body:
        hdr = ""
    else:
        hdr = full
    if len(hdr) + len(body) > MAX_TEXT:
        return None
    values = [hdr, body] + [mime.header_text(meta, name) for name in FIELDS[2:]]
    return Doc(tuple(v.casefold() for v in values))


# ---------------------------------------------------------------------------
# Writer side (threadpool, inside the shard's write transaction)


def index_doc(conn: sqlite3.Connection, mailbox: int, uid: int, doc: Doc | None) -> None:
    """Index one message whose text was extracted at delivery."""
    if doc is None:
        conn.execute("UPDATE fts_pending SET skip = 1 WHERE mailbox = ? AND uid = ?",
                     (mailbox, uid))
        return
    deleted = conn.execute("DELETE FROM fts_pending WHERE mailbox = ? AND uid = ?",
                           (mailbox, uid)).rowcount
    if deleted:  # only messages that exist (the trigger queued them)
        rowid = _rowid(mailbox, uid)
        conn.execute("INSERT INTO fts_text (rowid, hdr, body) VALUES (?, ?, ?)",
                     (rowid, *doc.values[:2]))
        conn.execute("INSERT INTO fts_addr (rowid, subj, frm, rcpt, cc, bcc)"
                     " VALUES (?, ?, ?, ?, ?, ?)", (rowid, *doc.values[2:]))


Pending = tuple[int, int, str, str]  # mailbox, uid, blob name, metadata JSON


def pending_batch(conn: sqlite3.Connection, limit: int) -> list[Pending]:
    """Up to ``limit`` queued messages to index (reader side, a small query)."""
    return conn.execute(
        "SELECT p.mailbox, p.uid, m.blob, m.meta FROM fts_pending p JOIN messages m"
        " ON m.mailbox = p.mailbox AND m.uid = p.uid WHERE p.skip = 0 LIMIT ?",
        (limit,),
    ).fetchall()


def extract_batch(
    rows: list[Pending], read_blob: Callable[[str], bytes]
) -> list[tuple[int, int, Doc | None]]:
    """Docs of queued messages (threadpool: file reads and MIME decoding)."""
    import json

    out = []
    for mailbox, uid, blob, meta in rows:
        try:
            doc = extract(read_blob(blob), json.loads(meta))
        except Exception:  # a missing or unreadable blob: left to the slow path
            doc = None
        out.append((mailbox, uid, doc))
    return out


def index_docs(conn: sqlite3.Connection, docs: list[tuple[int, int, Doc | None]]) -> None:
    """Write extracted docs (writer side, one short transaction for many)."""
    for mailbox, uid, doc in docs:
        index_doc(conn, mailbox, uid, doc)


# ---------------------------------------------------------------------------
# Reader side (hub, small indexed queries)


@dataclass(frozen=True)
class Query:
    """What one SEARCH string key asks: field in FIELDS or "text" (hdr or body)."""

    field: str
    needle: str


def usable(needle: str) -> bool:
    """Can the index answer this needle exactly?  Not for "" (matches all) or
    needles with control characters (line breaks span the joined texts)."""
    return bool(needle) and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in needle)


def _fts_string(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def search(conn: sqlite3.Connection, mailbox: int, query: Query) -> tuple[set[int], set[int]]:
    """(UIDs whose indexed text contains the needle, UIDs not indexed)."""
    needle = query.needle.casefold()
    cols = ("hdr", "body") if query.field == "text" else (_COLUMN_OF[query.field],)
    table = _TABLE_OF[cols[0]]
    lo, hi = _range(mailbox)
    if len(needle) >= 3:
        match = "{" + " ".join(cols) + "} : " + _fts_string(needle)
        cur = conn.execute(
            f"SELECT rowid FROM {table} WHERE {table} MATCH ? AND rowid BETWEEN ? AND ?",
            (match, lo, hi),
        )
    else:
        test = " OR ".join(f"instr({c}, ?) > 0" for c in cols)
        cur = conn.execute(
            f"SELECT rowid FROM {table} WHERE rowid BETWEEN ? AND ? AND ({test})",
            (lo, hi, *([needle] * len(cols))),
        )
    found = {r & 0xFFFFFFFF for (r,) in cur}
    pending = {u for (u,) in conn.execute(
        "SELECT uid FROM fts_pending WHERE mailbox = ?", (mailbox,))}
    return found, pending


def doc_matches(doc: Doc, field: str, needle: str) -> bool:
    """What `search` answers for one indexed message (the fakes use it)."""
    want = needle.casefold()
    names = ("hdr", "body") if field == "text" else (field,)
    return any(want in doc.values[FIELDS.index(n)] for n in names)


def has_work(conn: sqlite3.Connection) -> bool:
    """Are there queued messages the indexer should handle?"""
    return conn.execute("SELECT 1 FROM fts_pending WHERE skip = 0 LIMIT 1").fetchone() is not None
