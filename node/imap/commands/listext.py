"""The mailbox-list family: LIST-EXTENDED, LIST-STATUS, SPECIAL-USE, CREATE-SPECIAL-USE.

* LIST-EXTENDED (RFC 5258, and RFC 9051 §6.3.9): selection options
  SUBSCRIBED, REMOTE, RECURSIVEMATCH, SPECIAL-USE (RFC 6154 §5.3), several
  patterns, return options SUBSCRIBED, CHILDREN, SPECIAL-USE and STATUS
  (RFC 5819); ``\\NonExistent`` for names that exist only as superiors of
  other mailboxes, ``\\Subscribed``, and CHILDINFO extended data for
  RECURSIVEMATCH (RFC 5258 §3.5).
* CREATE-SPECIAL-USE (RFC 6154 §3): ``CREATE name (USE (\\Archive))``;
  ``NO [USEATTR]`` for an unknown attribute, more than one, or one that
  another mailbox of the account already has.

The basic RFC 3501 forms (``LIST ref pattern``) parse to the same
``(reference, pattern)`` args as before, so they keep the core's answers;
the extended forms add a third argument, a ``ListOptions``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from node.imap import protocol as P
from node.imap import subscriptions
from node.imap.protocol import (
    Command,
    Raw,
    State,
    register_command,
    untagged,
)
from node.imap.session import DELIMITER, Reply, _mbox, _valid_name, no, ok
from node.imap.wildcard import Pattern
from storage import names
from storage.model import MailboxInfo, SpecialUseInUse, StorageError

log = logging.getLogger("postroom.imap")

_AUTHED = frozenset({State.AUTHENTICATED, State.SELECTED})

SELECT_OPTIONS = ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE")
RETURN_OPTIONS = ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS")
MAX_PATTERNS = 64  # patterns in one LIST (RFC 5258 §3 allows a list)


@dataclass(frozen=True)
class ListOptions:
    """The extended parts of a LIST command (RFC 5258 §3)."""

    select: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    returns: tuple[str, ...] = ()
    status: tuple[str, ...] = ()  # RETURN (STATUS (...)) items, RFC 5819 §2


# --------------------------------------------------------------------- parsers


def _option_list(r: Any, known: tuple[str, ...], what: str) -> list[str]:
    r.expect(b"(")
    out: list[str] = []
    if r.accept(b")"):
        return out
    while True:
        word = r.atom().upper()
        if word not in known:
            raise r.fail(f"unknown LIST {what} option")  # RFC 5258 §3: BAD
        out.append(word)
        if len(out) > 4 * len(known):
            raise r.fail(f"too many LIST {what} options")
        if word == "STATUS":
            r.sp()
            out.extend("STATUS=" + item for item in _status_items(r))
        if r.accept(b")"):
            return out
        r.sp()


def _status_items(r: Any) -> list[str]:
    r.expect(b"(")
    items: list[str] = []
    while True:
        item = r.atom().upper()
        if item not in P.STATUS_ITEMS:
            raise r.fail("unknown status item")
        items.append(item)
        if len(items) > len(P.STATUS_ITEMS) * 4:
            raise r.fail("too many status items")
        if r.accept(b")"):
            return items
        r.sp()


def _pattern(r: Any) -> str:
    try:
        return r.mailbox_name(r.list_mailbox())  # UTF-8 after IMAP4rev2 (RFC 9051 §5.1)
    except ValueError:
        raise r.fail("bad mailbox name encoding") from None


def parse_list(r: Any) -> tuple[Any, ...]:
    """RFC 5258 §3 ``list``; the RFC 3501 form gives (reference, pattern)."""
    r.sp()
    select: list[str] = []
    extended = False
    if r.peek() == 0x28:  # "(": selection options
        select = _option_list(r, SELECT_OPTIONS, "selection")
        extended = True
        r.sp()
    try:
        ref = r.mailbox_name(r.astring())
    except ValueError:
        raise r.fail("bad mailbox name encoding") from None
    r.sp()
    if r.peek() == 0x28:  # several patterns
        r.pos += 1
        patterns = [_pattern(r)]
        while not r.accept(b")"):
            r.sp()
            patterns.append(_pattern(r))
            if len(patterns) > MAX_PATTERNS:
                raise r.fail("too many LIST patterns")
        extended = True
    else:
        patterns = [_pattern(r)]
    returns: list[str] = []
    if r.maybe_sp():
        if r.atom().upper() != "RETURN":
            raise r.fail("expected RETURN")
        r.sp()
        returns = _option_list(r, RETURN_OPTIONS, "return")
        extended = True
    # RFC 5258 §3: RECURSIVEMATCH alone (without another selection option) is BAD.
    if "RECURSIVEMATCH" in select and not set(select) - {"RECURSIVEMATCH", "REMOTE"}:
        raise r.fail("RECURSIVEMATCH needs another selection option")
    if not extended:
        return (ref, patterns[0])
    status = tuple(dict.fromkeys(x[7:] for x in returns if x.startswith("STATUS=")))
    opts = ListOptions(
        select=tuple(dict.fromkeys(select)),
        patterns=tuple(patterns),
        returns=tuple(dict.fromkeys(x for x in returns if not x.startswith("STATUS"))),
        status=status,
    )
    return (ref, patterns[0], opts)


def parse_create(r: Any) -> tuple[Any, ...]:
    """RFC 3501 CREATE, plus RFC 6154 §3 ``SP "(" "USE" SP "(" use-attrs ")" ")"``."""
    r.sp()
    name = r.mailbox()
    if not r.maybe_sp():
        return (name,)
    r.expect(b"(")
    uses: list[str] = []
    while True:
        word = r.atom().upper()
        if word != "USE":
            raise r.fail("unknown CREATE parameter")
        r.sp()
        r.expect(b"(")
        while not r.accept(b")"):
            if uses and r.peek() != 0x5C:
                r.sp()
            r.expect(b"\\")
            uses.append("\\" + r.atom())
            if len(uses) > 16:
                raise r.fail("too many special-use attributes")
        if r.accept(b")"):
            return (name, tuple(uses))
        r.sp()


def encode_list(cmd: Command) -> bytes:
    """The wire form of a (possibly extended) LIST, for round-trip tests."""
    ref, pattern = cmd.args[0], cmd.args[1]
    opts: ListOptions | None = cmd.args[2] if len(cmd.args) > 2 else None
    out = [cmd.tag.encode("ascii"), b"LIST"]
    if opts is not None and opts.select:
        out.append(b"(" + " ".join(opts.select).encode("ascii") + b")")
    out.append(P.encode_string(P.encode_mailbox(ref)))
    pats = opts.patterns if opts is not None else (pattern,)
    wire = [P.encode_string(P.encode_mailbox(p)) for p in pats]
    out.append(b"(" + b" ".join(wire) + b")" if opts is not None else wire[0])
    if opts is not None and (opts.returns or opts.status):
        ret = list(opts.returns)
        if opts.status:
            ret.append("STATUS (" + " ".join(opts.status) + ")")
        out.append(b"RETURN (" + " ".join(ret).encode("ascii") + b")")
    return b" ".join(out) + b"\r\n"


# --------------------------------------------------------------------- handlers


def cmd_list(session: Any, cmd: Command) -> Reply:
    """RFC 5258 LIST; the basic form is the core's (RFC 3501 §6.3.8)."""
    if len(cmd.args) == 2:
        return session._list(cmd, subscribed_only=False)
    ref, _first, opts = cmd.args
    if all(p == "" for p in opts.patterns):
        # RFC 5258 §3: an empty pattern still asks for the delimiter.
        return session._list(Command(cmd.tag, "LIST", (ref, "")), subscribed_only=False)
    select, returns = set(opts.select), set(opts.returns)
    want_subscribed = "SUBSCRIBED" in select or "SUBSCRIBED" in returns
    want_special = "SPECIAL-USE" in select or "SPECIAL-USE" in returns
    boxes = session.ctx.store.list_mailboxes(session._acct)
    by_name: dict[str, MailboxInfo] = {m.name: m for m in boxes}
    subscribed = {m.name for m in boxes if m.subscribed}
    if want_subscribed:  # RFC 9051 §6.3.7: kept after DELETE (node/imap/subscriptions.py)
        subscribed |= set(subscriptions.kept(session.ctx.store, session._acct))
    matchers = [Pattern.compile(ref + p, DELIMITER) for p in opts.patterns if p != ""]
    has_children = {n.rsplit(DELIMITER, 1)[0] for n in by_name if DELIMITER in n}
    # Every name that exists or is the superior of one (\NonExistent, RFC 5258 §3.4).
    universe = set(by_name)
    if "SUBSCRIBED" in select:  # RFC 5258 §3: subscribed names that do not exist too
        universe |= subscribed
    for name in by_name:
        parts = name.split(DELIMITER)
        universe.update(DELIMITER.join(parts[:i]) for i in range(1, len(parts)))
    subscribed_parents = set()
    for name in subscribed:
        parts = name.split(DELIMITER)
        subscribed_parents.update(DELIMITER.join(parts[:i]) for i in range(1, len(parts)))
    for name in sorted(universe, key=lambda n: (n != "INBOX", n)):
        if not any(m.matches(name) for m in matchers):
            continue
        info = by_name.get(name)
        childinfo = False
        if "SUBSCRIBED" in select and name not in subscribed:
            # RFC 5258 §3.5: with RECURSIVEMATCH a parent of a subscribed
            # mailbox is returned with CHILDINFO ("SUBSCRIBED").
            if "RECURSIVEMATCH" in select and name in subscribed_parents:
                childinfo = True
            else:
                continue
        if "SPECIAL-USE" in select and not childinfo and (info is None or not info.special_use):
            continue
        attrs: list[str] = []
        if info is None:
            attrs.append("\\NonExistent")  # implies \Noselect (RFC 5258 §3)
        attrs.append("\\HasChildren" if name in has_children else "\\HasNoChildren")
        if want_subscribed and name in subscribed:
            attrs.append("\\Subscribed")
        if want_special and info is not None and info.special_use:
            attrs.append(info.special_use)
        parts: list[Any] = ["LIST", "(" + " ".join(attrs) + ")", f'"{DELIMITER}"', _mbox(name)]
        if childinfo:
            parts.append(Raw(b'("CHILDINFO" ("SUBSCRIBED"))'))
        session._write(untagged(*parts))
        if opts.status and info is not None:
            _list_status(session, name, opts.status)
    return ok("LIST completed")


def _list_status(session: Any, name: str, items: tuple[str, ...]) -> None:
    """RFC 5819 §2: a STATUS response after the LIST response of a selectable
    mailbox; one that cannot be read now is left out, not an error."""
    try:
        data = session._status_data(name, items)
    except StorageError:
        log.info("imap: LIST-STATUS skipped %r", name, exc_info=True)
        return
    session._write(untagged("STATUS", _mbox(name), data))


def cmd_create(session: Any, cmd: Command) -> Reply:
    """RFC 3501 §6.3.3 with RFC 6154 §3 USE and RFC 8474 §4.1 MAILBOXID."""
    from node.imap import objectid

    uses: tuple[str, ...] = cmd.args[1] if len(cmd.args) > 1 else ()
    name = cmd.args[0].rstrip(DELIMITER)  # RFC 3501 §6.3.3: trailing delimiter
    if not name or name.upper() == "INBOX":
        if name:
            return no("INBOX always exists", "ALREADYEXISTS")
        return no("empty mailbox name", "CANNOT")
    if not _valid_name(name):
        return no("invalid mailbox name", "CANNOT")
    special: str | None = None
    if uses:
        canon = {u.lower(): u for u in names.SPECIAL_USE}
        known = [canon.get(u.lower()) for u in uses]
        if len(set(known)) != 1 or known[0] is None:
            # RFC 6154 §3: an attribute we do not know, or a combination we
            # cannot give one mailbox (one special use per mailbox here).
            return no("unsupported special-use attribute", "USEATTR")
        special = known[0]
    try:
        info = session.ctx.store.create_mailbox(session._acct, name, special)
    except SpecialUseInUse:
        return no("another mailbox already has that special use", "USEATTR")
    subscriptions.adopt(session.ctx.store, session._acct, name)  # a subscription kept after DELETE
    return ok("CREATE completed", f"MAILBOXID ({objectid.mailbox_id(session._acct, info.uidvalidity)})")


register_command("LIST", parse_list, _AUTHED)
register_command("CREATE", parse_create, _AUTHED)

HANDLERS = {"LIST": cmd_list, "CREATE": cmd_create}
# Advertised in Session.capabilities (RFC 5258 §1, RFC 5819 §1, RFC 6154 §3, RFC 8438).
CAPABILITIES = ("LIST-EXTENDED", "LIST-STATUS", "SPECIAL-USE", "CREATE-SPECIAL-USE",
                "STATUS=SIZE")

