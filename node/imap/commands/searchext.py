"""SEARCH extensions: ESEARCH (RFC 4731), SEARCHRES (RFC 5182), SORT and
THREAD (RFC 5256, with SORT=DISPLAY from RFC 5957).

Parsers (registered with protocol.register_command) and handlers; the work
is in node/imap/esearch.py (running SEARCH, ESEARCH/SEARCHRES answers),
node/imap/sort.py and node/imap/thread.py (pure algorithms).

Command args: SEARCH (charset | None, key[, returns: tuple[str, ...]]);
SORT (criteria: ((reverse, key), ...), charset, key); THREAD (algorithm,
charset, key).  SORT and THREAD take the charset positionally (RFC 5256 §4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from node.imap import esearch, sortcache, thread
from node.imap import protocol as P
from node.imap.protocol import Command, State, register_command
from node.imap.search import SearchKey
from node.imap.session import Reply, no, ok
from node.imap.sort import MAX_CRITERIA, SORT_KEYS, Item

_SELECTED = frozenset({State.SELECTED})
CHARSETS = ("UTF-8", "US-ASCII")
THREAD_ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")
CAPABILITIES = ("ESEARCH", "SEARCHRES", "SORT", "SORT=DISPLAY",
                "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES")
BATCH = 500


# --------------------------------------------------------------------- parsers


def _keys(r: Any) -> SearchKey:
    """search-key *(SP search-key), as SEARCH takes them (RFC 3501 §6.4.4)."""
    keys = [P._search_key(r, 0)]
    while r.maybe_sp():
        keys.append(P._search_key(r, 0))
        if len(keys) > r.limits.max_ranges:
            raise r.fail("too many search keys")
    return keys[0] if len(keys) == 1 else SearchKey("AND", tuple(keys))


def _parse_search(r: Any) -> tuple[Any, ...]:
    """SEARCH [RETURN (options)] [CHARSET x] keys (RFC 4731 §3.1, RFC 5182 §3)."""
    if r.line[r.pos : r.pos + 8].upper() != b" RETURN ":
        return P._search(r)
    r.pos += 7
    r.sp()
    r.expect(b"(")
    returns: list[str] = []
    while not r.accept(b")"):
        if returns:
            r.sp()
        word = r.atom().upper()
        if word not in esearch.RETURN_OPTIONS:
            raise r.fail("unknown search return option")  # RFC 4731 §3.1: BAD
        returns.append(word)
        if len(returns) > 2 * len(esearch.RETURN_OPTIONS):
            raise r.fail("too many search return options")
    charset, key = P._search(r)
    return (charset, key, tuple(returns))


def _charset(r: Any) -> str:
    return r.text_str(r.astring()).upper()


def _parse_sort(r: Any) -> tuple[Any, ...]:
    """SORT (sort-criteria) charset keys (RFC 5256 §5)."""
    r.sp()
    r.expect(b"(")
    criteria: list[tuple[bool, str]] = []
    while True:
        word = r.atom().upper()
        reverse = word == "REVERSE"
        if reverse:
            r.sp()
            word = r.atom().upper()
        if word not in SORT_KEYS:
            raise r.fail("unknown sort criterion")
        criteria.append((reverse, word))
        if len(criteria) > MAX_CRITERIA:
            raise r.fail("too many sort criteria")
        if r.accept(b")"):
            break
        r.sp()
    r.sp()
    charset = _charset(r)
    r.sp()
    return (tuple(criteria), charset, _keys(r))


def _parse_thread(r: Any) -> tuple[Any, ...]:
    """THREAD algorithm charset keys (RFC 5256 §5)."""
    r.sp()
    algorithm = r.atom().upper()
    if algorithm not in THREAD_ALGORITHMS:
        raise r.fail("unknown threading algorithm")
    r.sp()
    charset = _charset(r)
    r.sp()
    return (algorithm, charset, _keys(r))


def encode_args(cmd: Command) -> list[bytes]:
    """The arguments of SORT/THREAD on the wire (protocol.encode_command)."""
    a = cmd.args
    if cmd.name == "SORT":
        crit = " ".join(("REVERSE " if rev else "") + k for rev, k in a[0])
        head = [b"(" + crit.encode("ascii") + b")"]
    else:
        head = [a[0].encode("ascii")]
    key: SearchKey = a[2]
    parts = key.args if key.op == "AND" else (key,)
    return head + [P.encode_astring(a[1])] + [P.encode_search_key(k) for k in parts]


# -------------------------------------------------------------------- handlers


def _items(session: Any, uids: list[int], with_meta: bool) -> list[Item]:
    store, view = session.ctx.store, session.view
    out: list[Item] = []
    for start in range(0, len(uids), BATCH):
        batch = uids[start : start + BATCH]
        rows = store.rows(session.account, view.name, batch)
        metas = store.metadata(session.account, view.name, batch) if with_meta else {}
        out += [
            Item(view.seq_of(u), u, rows[u].internaldate, rows[u].size, metas.get(u, {}))
            for u in batch if u in rows
        ]
    return out


def cmd_search(session: Any, cmd: Command) -> Reply:
    """RFC 9051 §6.4.4 with RFC 4731 RETURN and RFC 5182 "$"."""
    if cmd.args[0] not in (None, *CHARSETS):
        return no("unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
    session._write(esearch.answer(session, cmd))
    return ok(f"{cmd.full_name} completed")


def cmd_sort(session: Any, cmd: Command) -> Reply:
    """RFC 5256 §4 SORT / UID SORT: `* SORT n ...` in sorted order."""
    criteria, charset, key = cmd.args
    if charset not in CHARSETS:
        return no("unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
    uids = esearch.find(session.ctx.store, session.account, session.view, key,
                        esearch.saved_uids(session), not getattr(session, "_dirty", True))
    needs_meta = any(k not in ("ARRIVAL", "SIZE") for _, k in criteria)
    view = session.view
    # Values computed by earlier SORTs of this mailbox are reused (sortcache.py).
    ordered, known = sortcache.values(
        session.ctx.store, session.account, view.uidvalidity, uids, (k for _, k in criteria),
        lambda missing: _items(session, missing, needs_meta))
    # Ties by sequence number (RFC 5256 §3): ascending UIDs are in sequence
    # order, then stable sorts, last key first.
    ordered = list(ordered)
    for reverse, key in reversed(criteria):
        ordered.sort(key=known[key].__getitem__, reverse=reverse)
    nums = ordered if cmd.uid else [view.seq_of(u) for u in ordered]
    session._write(b"* SORT" + esearch.number_list(nums) + b"\r\n")
    return ok(f"{cmd.full_name} completed")


def cmd_thread(session: Any, cmd: Command) -> Reply:
    """RFC 5256 §4 THREAD / UID THREAD: `* THREAD (..)(..)`."""
    algorithm, charset, key = cmd.args
    if charset not in CHARSETS:
        return no("unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
    uids = esearch.find(session.ctx.store, session.account, session.view, key,
                        esearch.saved_uids(session), not getattr(session, "_dirty", True))
    items = _items(session, uids, True)
    roots = (thread.references if algorithm == "REFERENCES" else thread.ordered_subject)(items)
    body = thread.encode(roots, cmd.uid)
    session._write(b"* THREAD" + (b" " + body if body else b"") + b"\r\n")
    return ok(f"{cmd.full_name} completed")


HANDLERS: dict[str, Callable[..., Reply | None]] = {
    "SEARCH": cmd_search,
    "SORT": cmd_sort,
    "THREAD": cmd_thread,
}

register_command("SEARCH", _parse_search, P.COMMAND_STATES["SEARCH"])
register_command("SORT", _parse_sort, _SELECTED)
register_command("THREAD", _parse_thread, _SELECTED)
P.COMMAND_STATES["UID SORT"] = _SELECTED  # RFC 5256 §4
P.COMMAND_STATES["UID THREAD"] = _SELECTED
P.UID_COMMANDS = P.UID_COMMANDS | {"SORT", "THREAD"}
