"""CONDSTORE and QRESYNC (RFC 7162) on top of the session core.

Theory of operation: storage gives every message a MODSEQ (one per change)
and keeps every expunged UID with the MODSEQ of its expunge (the shard's
``expunged`` table; EXPUNGE, UID EXPUNGE, CLOSE, MOVE and RENAME of INBOX
all record it), so the history QRESYNC needs is complete and VANISHED
(EARLIER) is exact; seq-match-data (RFC 7162 §3.2.5.2) is only an
optimisation for servers with a pruned history, so it is checked for syntax
and otherwise not needed.

CONDSTORE is on for a session once the client sends ENABLE CONDSTORE, ENABLE
QRESYNC, or any CONDSTORE-enabling command (RFC 7162 §3.1: SELECT/EXAMINE
(CONDSTORE), FETCH MODSEQ or CHANGEDSINCE, STORE UNCHANGEDSINCE, SEARCH
MODSEQ, STATUS HIGHESTMODSEQ).  From then on SELECT/EXAMINE send
``[HIGHESTMODSEQ]`` and every FETCH response that carries FLAGS, solicited
or not, also carries MODSEQ.  With QRESYNC expunges are reported as
``* VANISHED`` (§3.2.10) and a SELECT while a mailbox is selected sends
``* OK [CLOSED]`` first (§3.2.11).  NOMODSEQ is never sent: every mailbox has
persistent MODSEQs.

SELECT, EXAMINE, FETCH and STORE are wrapped here (parsers through
``protocol.register_command``, handlers through ``HANDLERS``) and call the
core session code for the part RFC 3501 defines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from node.imap import protocol as P
from node.imap.commands import rev2
from node.imap.condstore_syntax import (
    FetchModifiers,
    SelectParams,
    parse_fetch_modifiers,
    parse_select_params,
)
from node.imap.protocol import (
    STAR,
    Atom,
    Command,
    FetchItem,
    SeqSet,
    status_untagged,
)
from node.imap.session import Reply, _compact, bad, no, ok
from node.imap.view import flag_list_bytes

CONDSTORE, QRESYNC = "CONDSTORE", "QRESYNC"

# RFC 5161 ENABLE: QRESYNC implies CONDSTORE (RFC 7162 §3.2.3), see condstore_on.
rev2.ENABLEABLE.update({CONDSTORE: (CONDSTORE,), QRESYNC: (QRESYNC,)})


def condstore_on(session: Any) -> bool:
    """RFC 7162 §3.1: CONDSTORE enabled for this session."""
    return CONDSTORE in session.enabled or QRESYNC in session.enabled


def qresync_on(session: Any) -> bool:
    return QRESYNC in session.enabled


def enable_condstore(session: Any) -> None:
    """A CONDSTORE-enabling command was used (RFC 7162 §3.1)."""
    session.enabled.add(CONDSTORE)


# ------------------------------------------------------------------ parsers


def _wrap_parser(name: str, extra: Callable[[Any], Any]) -> None:
    """Chain onto the parser registered for ``name``: after its arguments an
    optional ``SP (...)`` is parsed by ``extra`` and appended to args."""
    previous = P._PARSERS[name]

    def parser(r: Any) -> tuple[Any, ...]:
        args = previous(r)
        if r.peek() == 0x20 and r.pos + 1 < len(r.line) and r.line[r.pos + 1] == 0x28:
            r.sp()
            return (*args, extra(r))
        return args

    P.register_command(name, parser, P.COMMAND_STATES[name])


# ----------------------------------------------------------------- helpers


def modseq_item(modseq: int) -> list[Any]:
    """``MODSEQ (n)`` (RFC 7162 §3.1.4.1) as encode_value parts."""
    return [Atom("MODSEQ"), P.Raw(b"(%d)" % modseq)]


def flags_fetch_line(session: Any, uid: int, modseq: int | None, *, with_uid: bool = True) -> bytes:
    """An unsolicited ``* n FETCH (FLAGS (...) UID u [MODSEQ (m)])``."""
    view = session.view
    parts = [b"FLAGS " + flag_list_bytes(view.flags[uid])]
    if with_uid:
        parts.append(b"UID %d" % uid)
    if modseq is not None and condstore_on(session):
        parts.append(b"MODSEQ (%d)" % modseq)
    return b"* %d FETCH (%s)\r\n" % (view.seq_of(uid), b" ".join(parts))


def vanished_line(uids: list[int], *, earlier: bool) -> bytes:
    """``* VANISHED [(EARLIER)] uid-set`` (RFC 7162 §3.2.10)."""
    head = b"* VANISHED (EARLIER) " if earlier else b"* VANISHED "
    return head + _compact(sorted(uids)).encode("ascii") + b"\r\n"


def _in_uid_set(seqs: SeqSet, uid: int) -> bool:
    # For VANISHED "*" is open above: expunged UIDs may lie past the highest
    # UID still present, and "n:*" must still report them.
    top = 1 << 32
    for lo, hi in seqs.ranges:
        a, b = (top if lo == STAR else lo), (top if hi == STAR else hi)
        if min(a, b) <= uid <= max(a, b):
            return True
    return False


def _runs(numbers: list[int]) -> SeqSet:
    """Ascending numbers as a sequence set of runs."""
    ranges: list[tuple[int, int]] = []
    for n in numbers:
        if ranges and ranges[-1][1] + 1 == n:
            ranges[-1] = (ranges[-1][0], n)
        else:
            ranges.append((n, n))
    return SeqSet(tuple(ranges))


# ----------------------------------------------------------------- SELECT


def cmd_select(session: Any, cmd: Command) -> Reply | None:
    """RFC 7162 §3.1.2.1 (HIGHESTMODSEQ), §3.2.5 (QRESYNC), §3.2.11 (CLOSED)."""
    params: SelectParams | None = cmd.args[1] if len(cmd.args) > 1 else None
    if params is not None and params.qresync is not None and not qresync_on(session):
        return bad("QRESYNC is not enabled")  # RFC 7162 §3.2.5
    if params is not None and params.condstore:
        enable_condstore(session)
    if session.view is not None and (qresync_on(session) or rev2.rev2(session)):
        # RFC 7162 §3.2.11; IMAP4rev2 requires the same (RFC 9051 §7.1).
        session._write(status_untagged("OK", "previous mailbox is now closed", "CLOSED"))
    core = session._cmd_examine if cmd.name == "EXAMINE" else session._cmd_select
    reply = core(cmd)
    view = session.view
    if reply.status != "OK" or view is None or not condstore_on(session):
        return reply
    session._write(status_untagged("OK", "highest", f"HIGHESTMODSEQ {view.modseq}"))
    if params is not None and params.qresync is not None:
        q = params.qresync
        if q.uidvalidity == view.uidvalidity and q.modseq < view.modseq:
            _resync(session, q.modseq, q.known_uids)
    return reply


def _resync(session: Any, modseq: int, known: SeqSet | None) -> None:
    """RFC 7162 §3.2.5.2: VANISHED (EARLIER) for the known UIDs expunged
    since modseq, then FETCH (UID FLAGS MODSEQ) for the messages changed."""
    view = session.view
    changes = session.ctx.store.changes_since(session._acct, view.name, modseq)
    gone = [u for u in changes.expunged if known is None or _in_uid_set(known, u)]
    if gone:
        session._write(vanished_line(gone, earlier=True))
    for row in changes.changed:
        live = row.uid in view.flags and row.uid not in view.gone
        if live and (known is None or _in_uid_set(known, row.uid)):
            session._write(flags_fetch_line(session, row.uid, row.modseq))


# ------------------------------------------------------------------ FETCH


def cmd_fetch(session: Any, cmd: Command) -> Reply | None:
    """FETCH MODSEQ (§3.1.4.1), CHANGEDSINCE (§3.1.4.1), VANISHED (§3.2.6)."""
    seqs, items = cmd.args[0], cmd.args[1]
    mods: FetchModifiers | None = cmd.args[2] if len(cmd.args) > 2 else None
    if mods is None:
        if any(i.name == "MODSEQ" for i in items):
            enable_condstore(session)
        return session._cmd_fetch(cmd)
    if mods.changedsince is None:
        return bad("VANISHED needs CHANGEDSINCE")  # RFC 7162 §3.2.6
    if mods.vanished and (not cmd.uid or not qresync_on(session)):
        return bad("VANISHED needs UID FETCH and ENABLE QRESYNC")
    enable_condstore(session)
    view = session.view
    uids = session._resolve(seqs, cmd.uid)
    if uids is None:
        return bad("invalid message sequence number")
    changes = session.ctx.store.changes_since(session._acct, view.name, mods.changedsince)
    if mods.vanished:
        gone = [u for u in changes.expunged if _in_uid_set(seqs, u)]
        if gone:
            session._write(vanished_line(gone, earlier=True))
    wanted = set(uids)
    keep = [r.uid for r in changes.changed if r.uid in wanted]
    if not any(i.name == "MODSEQ" for i in items):
        items = (*items, FetchItem("MODSEQ"))  # CHANGEDSINCE implies MODSEQ
    if not keep:
        return ok(f"{cmd.full_name} completed")
    numbers = keep if cmd.uid else [view.seq_of(u) for u in keep]
    inner = dataclasses.replace(cmd, args=(_runs(sorted(numbers)), items))
    return session._cmd_fetch(inner)


# ------------------------------------------------------------------ STORE


def cmd_store(session: Any, cmd: Command) -> Reply | None:
    """STORE with CONDSTORE on or UNCHANGEDSINCE (RFC 7162 §3.1.3): untagged
    FETCH carries MODSEQ (sent even for .SILENT for the messages changed),
    messages modified after UNCHANGEDSINCE are left alone and listed in
    ``[MODIFIED]`` (UIDs for UID STORE, else sequence numbers)."""
    unchanged: int | None = cmd.args[4] if len(cmd.args) > 4 else None
    if unchanged is None and not condstore_on(session):
        return session._cmd_store(cmd)
    enable_condstore(session)
    seqs, mode, silent, flags = cmd.args[:4]
    view = session.view
    uids = session._resolve(seqs, cmd.uid)
    if uids is None:
        return bad("invalid message sequence number")
    if view.readonly:
        return no("mailbox is read-only", "READ-ONLY")
    uids = [u for u in uids if u not in view.gone]
    if not uids:
        return ok(f"{cmd.full_name} completed")
    store = session.ctx.store
    changes = store.store_flags(session._acct, view.name, uids, mode, flags, unchanged)
    session._own += len(changes)  # one MODSEQ each, already in the view (Session._own_only)
    changed = {ch.uid: ch for ch in changes}
    for ch in changes:
        view.flags[ch.uid] = ch.flags
    session._announce_keywords(flags)
    rows = store.rows(session._acct, view.name, uids)
    failed: list[int] = []
    if unchanged is not None:
        failed = [u for u in uids if u not in changed and u in rows and rows[u].modseq > unchanged]
    for u in uids:
        if u in failed or u not in rows and u not in changed:
            continue
        modseq = changed[u].modseq if u in changed else rows[u].modseq
        if silent:
            if u not in changed:
                continue
            parts = [b"UID %d" % u] if cmd.uid else []
        else:
            parts = [b"FLAGS " + flag_list_bytes(view.flags[u])]
            if cmd.uid:
                parts.append(b"UID %d" % u)
        parts.append(b"MODSEQ (%d)" % modseq)
        session._write(b"* %d FETCH (%s)\r\n" % (view.seq_of(u), b" ".join(parts)))
    if failed:
        numbers = failed if cmd.uid else [view.seq_of(u) for u in failed]
        return ok("conditional STORE failed", f"MODIFIED {_compact(sorted(numbers))}")
    return ok(f"{cmd.full_name} completed")


# ------------------------------------------------------------ EXPUNGE


def cmd_expunge(session: Any, cmd: Command) -> Reply | None:
    """With QRESYNC the tagged OK carries the new HIGHESTMODSEQ (RFC 7162
    §3.2.10, so the client's cache can follow without another SELECT)."""
    reply = session._cmd_expunge(cmd)
    if reply.status != "OK" or not qresync_on(session) or session.view is None:
        return reply
    session._sync_safe(expunge=True)  # VANISHED before the tagged OK
    view = session.view
    if view is None:
        return reply
    return ok(reply.text, f"HIGHESTMODSEQ {view.modseq}")


HANDLERS: dict[str, Callable[..., Reply | None]] = {
    "SELECT": cmd_select,
    "EXAMINE": cmd_select,
    "FETCH": cmd_fetch,
    "STORE": cmd_store,
    "EXPUNGE": cmd_expunge,
}

_wrap_parser("SELECT", parse_select_params)
_wrap_parser("EXAMINE", parse_select_params)
_wrap_parser("FETCH", parse_fetch_modifiers)


# ----------------------------------------------------------------- SEARCH


def _uses_modseq(key: Any) -> bool:
    stack = [key]
    while stack:
        k = stack.pop()
        if k.op == "MODSEQ":
            return True
        if k.op in ("AND", "OR", "NOT"):
            stack.extend(k.args)
    return False


def search_modseq(session: Any, key: Any, uids: list[int], out: bytes, *, esearch: bool) -> bytes:
    """RFC 7162 §3.1.5: a SEARCH with the MODSEQ key enables CONDSTORE and its
    answer ends with ``(MODSEQ n)`` (ESEARCH: ``MODSEQ n``, RFC 4731 §3.2),
    n the highest MODSEQ of the messages found (none found: no MODSEQ)."""
    if not _uses_modseq(key):
        return out
    enable_condstore(session)
    if not uids or not out.endswith(b"\r\n"):
        return out
    rows = session.ctx.store.rows(session._acct, session.view.name, uids)
    if not rows:
        return out
    top = max(r.modseq for r in rows.values())
    extra = b" MODSEQ %d" % top if esearch else b" (MODSEQ %d)" % top
    return out[:-2] + extra + b"\r\n"
