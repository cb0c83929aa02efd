"""SEARCH keys (RFC 3501 §6.4.4) as a small tree, and their evaluation.

Theory of operation: the parser in protocol.py builds a `SearchKey` tree;
`needs()` tells the session which per-message data a tree needs (parsed
metadata, the raw message) so it can fetch that once per message in a batch;
`matches()` evaluates the tree against one `Candidate`.  Nothing here does
I/O: raw messages and metadata are handed in (lazily, through callables).

String keys compare case-insensitively as substrings of the decoded text
(RFC 3501 §6.4.4: "case-insensitive substring").  Date keys compare calendar
dates in UTC, disregarding time of day (internal dates are stored as UTC
instants; the original zone is not kept).
"""

from __future__ import annotations

import datetime
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node.imap import objectid

# Keys without arguments that test a flag: key -> (flag, expected presence).
FLAG_KEYS: dict[str, tuple[str, bool]] = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
# Keys without arguments that are not simple flag tests.
PLAIN_KEYS = frozenset({"ALL", "NEW", "OLD", "RECENT"}) | frozenset(FLAG_KEYS)
STRING_KEYS = frozenset({"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"})
DATE_KEYS = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})
NUMBER_KEYS = frozenset({"LARGER", "SMALLER"})
FLAG_ARG_KEYS = frozenset({"KEYWORD", "UNKEYWORD"})
# RFC 8514 §4.2 SAVEDATE keys; RFC 8474 §6 EMAILID/THREADID take an objectid
# (atom characters, so they parse and encode like KEYWORD's argument).
DATE_KEYS |= frozenset({"SAVEDBEFORE", "SAVEDON", "SAVEDSINCE"})
PLAIN_KEYS |= frozenset({"SAVEDATESUPPORTED"})
FLAG_ARG_KEYS |= frozenset({"EMAILID", "THREADID"})
ADDRESS_HEADERS = {"BCC": "bcc", "CC": "cc", "FROM": "from", "TO": "to", "SUBJECT": "subject"}


@dataclass(frozen=True)
class SearchKey:
    """One node of the tree.

    op is the RFC 3501 key name, or "SEQ" (a sequence set), "AND" (a
    parenthesized list or the implicit top-level conjunction).  args:
    PLAIN_KEYS: (); STRING_KEYS: (str,); HEADER: (field, str);
    DATE_KEYS: (datetime.date,); NUMBER_KEYS: (int,); KEYWORD/UNKEYWORD:
    (flag,); SEQ and UID: (SeqSet,); NOT: (SearchKey,); OR: (a, b);
    AND: (SearchKey, ...).
    """

    op: str
    args: tuple[Any, ...] = ()


@dataclass
class Candidate:
    """One message as SEARCH sees it.  meta/raw are loaded only if needed."""

    seq: int
    uid: int
    flags: frozenset[str]
    size: int
    internaldate: float
    load_meta: Callable[[], dict] = field(default=lambda: {})
    modseq: int = 0  # RFC 7162 §3.1.5 (SEARCH MODSEQ)
    load_raw: Callable[[], bytes] = field(default=lambda: b"")
    blob: str = ""  # SHA-256 of the stored message (RFC 8474 EMAILID)
    load_savedate: Callable[[], float | None] = field(default=lambda: None)  # RFC 8514
    _meta: dict | None = None
    _raw: bytes | None = None
    _texts: dict[str, str] = field(default_factory=dict)
    # String keys already answered by the full-text index (storage/fts.py):
    # key -> result, so neither metadata nor the raw message is read for them.
    decided: dict[SearchKey, bool] = field(default_factory=dict)

    @property
    def meta(self) -> dict:
        if self._meta is None:
            self._meta = self.load_meta()
        return self._meta

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self.load_raw()
        return self._raw


def needs(key: SearchKey) -> tuple[bool, bool]:
    """(needs parsed metadata, needs the raw message) to evaluate key."""
    meta = raw = False
    stack = [key]
    while stack:
        k = stack.pop()
        if k.op in ("NOT", "OR", "AND"):
            stack.extend(k.args)
        elif k.op in ("BODY", "TEXT", "HEADER"):
            raw = True
        elif k.op in ADDRESS_HEADERS or k.op.startswith("SENT") or k.op == "THREADID":
            meta = True
    return meta, raw


def _mime() -> Any:
    # node/imap/mime.py is written by another part of the project; import
    # lazily so the parser and flag/size/date keys work on their own.
    return importlib.import_module("node.imap.mime")


def _utc_date(epoch: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).date()


def _contains(haystack: str, needle: str) -> bool:
    return needle.casefold() in haystack.casefold()


def matches(key: SearchKey, msg: Candidate, *, max_seq: int, max_uid: int) -> bool:
    """Evaluate key for msg.  max_seq/max_uid resolve "*" in sequence sets."""
    op, args = key.op, key.args
    if op == "AND":
        return all(matches(k, msg, max_seq=max_seq, max_uid=max_uid) for k in args)
    if op == "NOT":
        return not matches(args[0], msg, max_seq=max_seq, max_uid=max_uid)
    if op == "OR":
        return any(matches(k, msg, max_seq=max_seq, max_uid=max_uid) for k in args)
    if op == "ALL":
        return True
    if op in FLAG_KEYS:
        flag, present = FLAG_KEYS[op]
        return (flag in msg.flags) == present
    # \Recent is never set (docs/imap.md): RECENT and NEW match nothing, OLD all.
    if op in ("RECENT", "NEW"):
        return False
    if op == "OLD":
        return True
    if op == "SEQ":
        return args[0].contains(msg.seq, max_seq)
    if op == "UID":
        return args[0].contains(msg.uid, max_uid)
    if op == "MODSEQ":  # RFC 7162 §3.1.5: equal to or greater than
        return msg.modseq >= args[0]
    if op == "KEYWORD":
        return _has_flag(msg.flags, args[0])
    if op == "UNKEYWORD":
        return not _has_flag(msg.flags, args[0])
    if op == "LARGER":
        return msg.size > args[0]
    if op == "SMALLER":
        return msg.size < args[0]
    if op in ("BEFORE", "ON", "SINCE"):
        return _date_cmp(op, _utc_date(msg.internaldate), args[0])
    if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        sent = _mime().sent_date(msg.meta)
        if sent is None:
            return False
        return _date_cmp(op[4:], _utc_date(sent), args[0])
    if op == "SAVEDATESUPPORTED":  # RFC 8514 §4.2: every mailbox keeps save dates
        return True
    if op in ("SAVEDBEFORE", "SAVEDON", "SAVEDSINCE"):  # RFC 8514 §4.2
        saved = msg.load_savedate()
        if saved is None:  # saved before save dates were kept: the internal date
            saved = msg.internaldate
        return _date_cmp(op[5:], _utc_date(saved), args[0])
    if op == "EMAILID":  # RFC 8474 §6
        return bool(msg.blob) and args[0] == "E" + msg.blob[:24]
    if op == "THREADID":  # RFC 8474 §6
        return args[0] == objectid.thread_id(msg.meta.get("headers") or {}, msg.blob)
    if key in msg.decided:
        return msg.decided[key]
    if op == "HEADER":
        name, value = args
        if value == "":
            # RFC 3501 §6.4.4: an empty string matches every message that
            # has the field, even with an empty value.
            return name.lower() in _header_names(msg)
        return _contains(_mime().header_text({}, name, msg.raw), value)
    if op in ADDRESS_HEADERS:
        return _contains(_mime().header_text(msg.meta, ADDRESS_HEADERS[op]), args[0])
    if op == "BODY":
        if "body" not in msg._texts:
            msg._texts["body"] = _mime().body_text(msg.raw)
        return _contains(msg._texts["body"], args[0])
    if op == "TEXT":
        if "text" not in msg._texts:
            msg._texts["text"] = _mime().full_text(msg.raw)
        return _contains(msg._texts["text"], args[0])
    raise ValueError(f"unknown search key {op}")  # the parser never builds one


# Which full-text index field answers a string key (storage/fts.py FIELDS);
# HEADER's index answer is only a candidate set (any header line matches).
INDEX_FIELDS = {"BODY": "body", "TEXT": "text", "SUBJECT": "subject", "FROM": "from",
                "TO": "to", "CC": "cc", "BCC": "bcc", "HEADER": "hdr"}


def text_keys(key: SearchKey) -> list[SearchKey]:
    """Distinct string keys anywhere in the tree (candidates for the index)."""
    out: dict[SearchKey, None] = {}
    stack = [key]
    while stack:
        k = stack.pop()
        if k.op in ("NOT", "OR", "AND"):
            stack.extend(k.args)
        elif k.op in INDEX_FIELDS:
            out[k] = None
    return list(out)


def conjuncts(key: SearchKey) -> list[SearchKey]:
    """Keys every match must satisfy (the top-level AND, flattened)."""
    if key.op != "AND":
        return [key]
    return [c for k in key.args for c in conjuncts(k)]


def _header_names(msg: Candidate) -> set[str]:
    """Lower-case names of the header fields of msg, from its raw header."""
    head = msg.raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    names = set()
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") or b":" not in line:
            continue
        names.add(line.split(b":", 1)[0].strip().decode("ascii", "replace").lower())
    return names


def _has_flag(flags: frozenset[str], flag: str) -> bool:
    # Keywords are case-insensitive (RFC 3501 §2.3.2 treats flags as atoms;
    # clients differ in case, so compare without it).
    low = flag.lower()
    return any(f.lower() == low for f in flags)


def _date_cmp(op: str, have: datetime.date, want: datetime.date) -> bool:
    if op == "BEFORE":
        return have < want
    if op == "ON":
        return have == want
    return have >= want  # SINCE: "within or later than"
