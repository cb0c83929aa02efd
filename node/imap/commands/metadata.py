"""METADATA (RFC 5464): GETMETADATA and SETMETADATA on mailboxes and the server.

Entries live in the account's shard (op ``set_metadata``, docs/storage.md),
so they are replicated and replayed like mail.  The server's entries (the
mailbox name ``""``) are kept per account: postroom has no shared
namespace, so ``/shared`` entries, on the server and on mailboxes, are seen
only by the account that owns them.  A mailbox's entries go away when it is
deleted (RFC 5464 §3.2) and follow it on RENAME.

Limits (RFC 5464 §4.3): a value of at most ``MAX_VALUE`` octets
(``NO [METADATA MAXSIZE n]``), at most ``METADATA_MAX_ENTRIES`` entries per
account (``NO [METADATA TOOMANY]``); entry names are case-insensitive
(stored lower-case) and at most ``MAX_ENTRY_NAME`` octets.
"""

from __future__ import annotations

import re
from typing import Any

from node.imap import subscriptions
from node.imap.protocol import (
    Command,
    Literal,
    Raw,
    State,
    encode_string,
    register_command,
    untagged,
)
from node.imap.session import Reply, _mbox, no, ok
from storage.model import MetadataTooMany

_AUTHED = frozenset({State.AUTHENTICATED, State.SELECTED})

MAX_VALUE = 64 * 1024  # octets of one value
MAX_ENTRY_NAME = 1024  # octets of one entry name
MAX_ENTRIES_PER_COMMAND = 256
# RFC 5464 §5: entry = "/private" or "/shared" followed by "/"-separated
# components; no wildcards, no empty component, no trailing "/".
_ENTRY = re.compile(r"/(private|shared)(/[\x21-\x29\x2b-\x2e\x30-\x7e]+)+", re.IGNORECASE)


def _entry(r: Any) -> str:
    name = r.text_str(r.astring())
    if len(name) > MAX_ENTRY_NAME or not _ENTRY.fullmatch(name):
        raise r.fail("invalid metadata entry name")
    return name.lower()


def _mailbox_or_server(r: Any) -> str | None:
    name = r.mailbox()
    return None if name == "" else name


# --------------------------------------------------------------------- parsers


def _parse_getmetadata(r: Any) -> tuple[Any, ...]:
    """RFC 5464 §4.2: GETMETADATA [(options)] mailbox (entry ...) | entry."""
    r.sp()
    maxsize: int | None = None
    depth = "0"
    if r.peek() == 0x28:
        r.pos += 1
        while not r.accept(b")"):
            if r.peek() == 0x20:
                r.pos += 1
            word = r.atom().upper()
            r.sp()
            if word == "MAXSIZE":
                maxsize = r.number()
            elif word == "DEPTH":
                depth = r.atom().lower()
                if depth not in ("0", "1", "infinity"):
                    raise r.fail("DEPTH must be 0, 1 or infinity")
            else:
                raise r.fail("unknown GETMETADATA option")
        r.sp()
    mailbox = _mailbox_or_server(r)
    r.sp()
    entries: list[str] = []
    if r.accept(b"("):
        while not r.accept(b")"):
            if entries:
                r.sp()
            entries.append(_entry(r))
            if len(entries) > MAX_ENTRIES_PER_COMMAND:
                raise r.fail("too many entries")
        if not entries:
            raise r.fail("expected an entry")
    else:
        entries.append(_entry(r))
    return (mailbox, tuple(entries), maxsize, depth)


def _value(r: Any) -> bytes | None:
    """nstring / literal8 (RFC 5464 §5)."""
    if r.peek() in (0x4E, 0x6E):  # NIL
        word = r.atom()
        if word.upper() != "NIL":
            raise r.fail("expected a value or NIL")
        return None
    if r.peek() == 0x7E:  # "~{n}": literal8 (RFC 3516 §4.3)
        r.pos += 1
        return r.literal()
    return r.string()


def _parse_setmetadata(r: Any) -> tuple[Any, ...]:
    """RFC 5464 §4.3: SETMETADATA mailbox (entry value ...)."""
    r.sp()
    mailbox = _mailbox_or_server(r)
    r.sp()
    r.expect(b"(")
    pairs: list[tuple[str, bytes | None]] = []
    while not r.accept(b")"):
        if pairs:
            r.sp()
        entry = _entry(r)
        r.sp()
        pairs.append((entry, _value(r)))
        if len(pairs) > MAX_ENTRIES_PER_COMMAND:
            raise r.fail("too many entries")
    if not pairs:
        raise r.fail("expected an entry")
    return (mailbox, tuple(pairs))


# --------------------------------------------------------------------- handlers


def _wanted(stored: dict[str, bytes], entry: str, depth: str) -> list[str]:
    """RFC 5464 §4.2.2: the entry and, by DEPTH, its descendants."""
    out = [entry] if entry in stored else []
    if depth != "0":
        prefix = entry + "/"
        for name in sorted(stored):
            if name.startswith(prefix):
                rest = name[len(prefix):]
                if depth == "infinity" or "/" not in rest:
                    out.append(name)
    return out


def _wire_value(value: bytes) -> Any:
    if b"\x00" in value:
        return Raw(b"~{%d}\r\n" % len(value) + value)  # literal8 (RFC 5464 §5)
    return Raw(encode_string(value)) if len(value) < 1024 else Literal(value)


def cmd_getmetadata(session: Any, cmd: Command) -> Reply:
    """RFC 5464 §4.2; entries that do not exist are left out (§4.2)."""
    mailbox, entries, maxsize, depth = cmd.args
    stored = session.ctx.store.get_metadata(session._acct, mailbox)
    if mailbox is None:
        stored.pop(subscriptions.ENTRY, None)  # the server's own (node/imap/subscriptions.py)
    names: list[str] = []
    for entry in entries:
        names += [n for n in _wanted(stored, entry, depth) if n not in names]
    items: list[Any] = []
    longest = 0
    for name in names:
        value = stored[name]
        if maxsize is not None and len(value) > maxsize:
            longest = max(longest, len(value))  # §4.2.1: LONGENTRIES
            continue
        items += [Raw(encode_string(name)), _wire_value(value)]
    if items:
        session._write(_metadata_line(mailbox, items))
    code = f"METADATA LONGENTRIES {longest}" if longest else None
    return ok("GETMETADATA completed", code)


def _metadata_line(mailbox: str | None, items: list[Any]) -> bytes:
    return untagged("METADATA", _mbox(mailbox or ""), items)


def cmd_setmetadata(session: Any, cmd: Command) -> Reply:
    """RFC 5464 §4.3: all entries are set, or none."""
    mailbox, pairs = cmd.args
    too_big = max((len(v) for _, v in pairs if v is not None), default=0)
    if too_big > MAX_VALUE:
        return no("value too large", f"METADATA MAXSIZE {MAX_VALUE}")
    if mailbox is None and any(e == subscriptions.ENTRY for e, _ in pairs):
        return no("entry is maintained by the server", "NOPERM")
    try:
        session.ctx.store.set_metadata(session._acct, mailbox, list(pairs))
    except MetadataTooMany:
        return no("too many metadata entries", "METADATA TOOMANY")
    return ok("SETMETADATA completed")


register_command("GETMETADATA", _parse_getmetadata, _AUTHED)
register_command("SETMETADATA", _parse_setmetadata, _AUTHED)

HANDLERS = {"GETMETADATA": cmd_getmetadata, "SETMETADATA": cmd_setmetadata}
