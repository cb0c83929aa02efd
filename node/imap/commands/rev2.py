"""IMAP4rev2 (RFC 9051) session commands beyond the RFC 3501 core.

ENABLE (RFC 5161, RFC 9051 §6.3.1), ID (RFC 2971), NAMESPACE (RFC 2342,
RFC 9051 §6.3.10), UNSELECT (RFC 3691, RFC 9051 §6.4.2), MOVE and UID MOVE
(RFC 6851, RFC 9051 §6.4.8) and COMPRESS (RFC 4978).

After ``ENABLE IMAP4rev2`` (RFC 9051 Appendix E) a session differs from an
IMAP4rev1 one in: SELECT/EXAMINE (no RECENT, no [UNSEEN], an untagged LIST
with the name; session._select), SEARCH answered with ESEARCH
(node/imap/esearch.py), mailbox names UTF-8 both ways (Limits.utf8_mailboxes,
session._mbox), the RECENT/NEW/OLD search keys and STATUS RECENT answered
BAD (`check_rev2_grammar`), and [CLOSED] before a new selection
(commands/condstore.py).  A session that never enables it is IMAP4rev1.

``session.enabled`` holds the upper-cased capability names a client
ENABLEd; other families read it (``"IMAP4REV2" in session.enabled``) and add
the names they can enable to `ENABLEABLE`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from node.imap import protocol as P
from node.imap.protocol import (
    Command,
    State,
    register_command,
    status_untagged,
    tagged,
    untagged,
)
from node.imap.search import SearchKey
from node.imap.session import COMMAND_CHECKS, DELIMITER, Reply, _compact, bad, no, ok
from storage.model import NoSuchMailbox

log = logging.getLogger("postroom.imap")

_AUTH_ONLY = frozenset({State.AUTHENTICATED})  # RFC 5161 §3.1
_AUTHED = frozenset({State.AUTHENTICATED, State.SELECTED})
_SELECTED = frozenset({State.SELECTED})
_ANY = frozenset({State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED})

# Capability names ENABLE accepts (upper case) -> the names it turns on with
# them (RFC 7162 §3.2.3: QRESYNC implies CONDSTORE).  Other families add theirs.
ENABLEABLE: dict[str, tuple[str, ...]] = {"IMAP4REV2": ("IMAP4REV2",)}
MAX_ENABLE = 64  # capability names in one ENABLE

# RFC 2971 §3.3: at most 30 field-value pairs, fields of at most 30 octets,
# values of at most 1024 octets.
ID_MAX_PAIRS = 30
ID_MAX_FIELD = 30
ID_MAX_VALUE = 1024
ID_LOG_CHARS = 256  # of the client's ID, in the log


# RFC 9051 Appendix E: \Recent is gone, and with it these search keys and
# STATUS item; in an IMAP4rev2 session they are syntax errors (BAD).
REMOVED_SEARCH_KEYS = frozenset({"RECENT", "NEW", "OLD"})
REMOVED_STATUS_ITEMS = frozenset({"RECENT"})


def rev2(session: Any) -> bool:
    """True once the client sent ENABLE IMAP4rev2 (RFC 9051 §6.3.1)."""
    return "IMAP4REV2" in session.enabled


def _removed_key(key: Any) -> str | None:
    """The first RFC 3501-only key in a search key tree, if any."""
    if not isinstance(key, SearchKey):
        return None
    if key.op in REMOVED_SEARCH_KEYS:
        return key.op
    if key.op in ("AND", "OR", "NOT"):
        for sub in key.args:
            found = _removed_key(sub)
            if found:
                return found
    return None


def check_rev2_grammar(session: Any, cmd: Command) -> Reply | None:
    """RFC 9051 §6.4.4 / §6.3.11 / Appendix E: after ENABLE IMAP4rev2 the
    RECENT, NEW and OLD search keys and STATUS RECENT are not in the grammar,
    so they are answered BAD; a session without IMAP4rev2 keeps them."""
    if not rev2(session):
        return None
    if cmd.name in ("SEARCH", "SORT", "THREAD"):
        key = cmd.args[1] if cmd.name == "SEARCH" else cmd.args[2]
        found = _removed_key(key)
        if found:
            return bad(f"{found} is not an IMAP4rev2 search key")
    elif cmd.name in ("STATUS", "LIST"):  # LIST: RFC 5819 RETURN (STATUS (...))
        items = cmd.args[1] if cmd.name == "STATUS" else (
            getattr(cmd.args[2], "status", ()) if len(cmd.args) > 2 else ())
        if REMOVED_STATUS_ITEMS & set(items):
            return bad("RECENT is not an IMAP4rev2 status item")
    return None


# --------------------------------------------------------------------- parsers


def _parse_enable(r: Any) -> tuple[Any, ...]:
    names = []
    while r.maybe_sp():
        names.append(r.atom())
        if len(names) > MAX_ENABLE:
            raise r.fail("too many capabilities")
    if not names:
        raise r.fail("expected capability names")
    return tuple(names)


def _parse_id(r: Any) -> tuple[Any, ...]:
    r.sp()
    if r.peek() != 0x28:
        if r.atom().upper() != "NIL":
            raise r.fail("expected ( or NIL")
        return (None,)
    r.expect(b"(")
    pairs: list[tuple[str, str | None]] = []
    while True:
        name = r.string()
        if len(name) > ID_MAX_FIELD:
            raise r.fail("ID field name too long")
        r.sp()
        if r.peek() in (0x22, 0x7B):
            value: bytes | None = r.string()
            if len(value) > ID_MAX_VALUE:  # type: ignore[arg-type]
                raise r.fail("ID value too long")
        elif r.atom().upper() == "NIL":
            value = None
        else:
            raise r.fail("expected string or NIL")
        pairs.append((r.text_str(name), None if value is None else r.text_str(value)))
        if len(pairs) > ID_MAX_PAIRS:
            raise r.fail("too many ID fields")
        if r.accept(b")"):
            return (tuple(pairs),)
        r.sp()


def _parse_no_args(r: Any) -> tuple[Any, ...]:
    return ()


def _parse_compress(r: Any) -> tuple[Any, ...]:
    r.sp()
    return (r.atom().upper(),)


# -------------------------------------------------------------------- handlers


def cmd_enable(session: Any, cmd: Command) -> Reply:
    """RFC 5161 §3.1: answer `* ENABLED` with what is newly enabled."""
    newly: list[str] = []
    for name in cmd.args:
        for turned in ENABLEABLE.get(name.upper(), ()):
            if turned not in session.enabled:
                session.enabled.add(turned)
                newly.append("IMAP4rev2" if turned == "IMAP4REV2" else turned)
                if turned == "IMAP4REV2":  # RFC 9051 §5.1: UTF-8 names from now on
                    session.limits = dataclasses.replace(session.limits, utf8_mailboxes=True)
                    session.framer.limits = session.limits
    session._write(untagged("ENABLED", *newly) if newly else b"* ENABLED\r\n")
    return ok("ENABLE completed")


def cmd_id(session: Any, cmd: Command) -> Reply:
    """RFC 2971 §3.1: log the client's fields (bounded), answer ours."""
    pairs = cmd.args[0]
    if pairs:
        text = " ".join(f"{k}={v}" for k, v in pairs)
        log.info("imap: client ID from %s: %r", session.peer_ip, text[:ID_LOG_CHARS])
    session._write(untagged("ID", '("name" "postroom" "vendor" "postroom")'))
    return ok("ID completed")


def cmd_namespace(session: Any, cmd: Command) -> Reply:
    """RFC 2342 §5: one personal namespace, prefix "" and delimiter "/"."""
    session._write(untagged("NAMESPACE", f'(("" "{DELIMITER}")) NIL NIL'))
    return ok("NAMESPACE completed")


def cmd_unselect(session: Any, cmd: Command) -> Reply:
    """RFC 3691 §2: close the mailbox without expunging."""
    session.view = None
    session.state = State.AUTHENTICATED
    return ok("UNSELECT completed")


def cmd_move(session: Any, cmd: Command) -> Reply:
    """RFC 6851 §3.3: one storage op moves the messages; `* OK [COPYUID]`
    precedes the EXPUNGE (or VANISHED) responses the sync then sends."""
    seqs, dest = cmd.args
    view = session.view
    uids = session._resolve(seqs, cmd.uid)
    if uids is None:
        return bad("invalid message sequence number")
    if view.readonly:
        return no("mailbox is read-only", "READ-ONLY")
    uids = [u for u in uids if u not in view.gone]
    if not uids:
        return ok(f"{cmd.full_name} completed")
    try:
        uidvalidity, pairs = session.ctx.store.move(session._acct, view.name, uids, dest)
    except NoSuchMailbox:
        return no("no such mailbox", "TRYCREATE")  # RFC 6851 §3.3 / RFC 9051 §6.4.8
    session._dirty = True
    if pairs:
        src = _compact([a for a, _ in pairs])
        dst = _compact([b for _, b in pairs])
        session._write(
            status_untagged("OK", "moved", f"COPYUID {uidvalidity} {src} {dst}")
        )  # RFC 6851 §4.3
        for a, _ in pairs:
            if a in view.flags:
                view.gone.add(a)
    return ok(f"{cmd.full_name} completed")


def cmd_compress(session: Any, cmd: Command) -> Reply | None:
    """RFC 4978 §3: after this OK both directions are DEFLATE; the server
    (node/imap/server.py) wraps the socket when it sees want_compress."""
    if cmd.args[0] != "DEFLATE":
        return bad("unknown compression mechanism")
    if session.compressed or session.want_compress:
        return no("compression is already active", "COMPRESSIONACTIVE")
    if session.want_starttls:
        return bad("TLS negotiation pending")
    session._write(tagged(cmd.tag, "OK", "DEFLATE active"))
    session.flush()
    session.want_compress = True  # Session.feed stops; the rest is compressed
    return None


HANDLERS: dict[str, Callable[..., Reply | None]] = {
    "ENABLE": cmd_enable,
    "ID": cmd_id,
    "NAMESPACE": cmd_namespace,
    "UNSELECT": cmd_unselect,
    "MOVE": cmd_move,
    "COMPRESS": cmd_compress,
}

COMMAND_CHECKS.append(check_rev2_grammar)

register_command("ENABLE", _parse_enable, _AUTH_ONLY)
register_command("ID", _parse_id, _ANY)
register_command("NAMESPACE", _parse_no_args, _AUTHED)
register_command("UNSELECT", _parse_no_args, _SELECTED)
register_command("MOVE", P._copy, _SELECTED)
register_command("COMPRESS", _parse_compress, _AUTHED)
P.COMMAND_STATES["UID MOVE"] = _SELECTED  # RFC 6851 §3.2
P.UID_COMMANDS = P.UID_COMMANDS | {"MOVE"}

