"""Running SEARCH (RFC 9051 §6.4.4) and answering it: plain SEARCH, ESEARCH
(RFC 4731) and SEARCHRES (RFC 5182).

Theory of operation: `find` evaluates a key tree over the session's view.
Every string key (BODY, TEXT, SUBJECT, FROM, TO, CC, BCC, HEADER) is first
asked of the full-text index (`store.search_text`, storage/fts.py), which
answers exactly for the messages it has indexed and names the ones it has
not.  The conjunction at the top of the tree then narrows the candidates to
the index hits, so a SEARCH BODY over 100,000 messages only touches the
messages that contain the text; the rest of the tree (flags, dates, sizes,
sequence sets) is evaluated by node/imap/search.py `matches`, which reads
metadata or the raw message only for the keys the index could not decide.

Nothing here writes to the client: callers encode with `search_response`.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from node.imap import search as searchmod
from node.imap.protocol import SeqSet, encode_string
from node.imap.search import Candidate, SearchKey
from storage.model import TextHits

BATCH = 500  # messages whose rows/metadata are loaded at once
RETURN_OPTIONS = ("MIN", "MAX", "ALL", "COUNT", "SAVE")  # RFC 4731 §3.1, RFC 5182 §2


class _Lazy:
    """Loads metadata for a whole batch on the first request of any of it."""

    def __init__(self, load: Callable[[list[int]], dict[int, Any]], uids: list[int]) -> None:
        self._load = load
        self._uids = uids
        self._data: dict[int, Any] | None = None

    def get(self, uid: int) -> Any:
        if self._data is None:
            self._data = self._load(self._uids)
        return self._data.get(uid, {})


def find(
    store: Any, account: str, view: Any, key: SearchKey, saved: Iterable[int] = (),
    fresh: bool = False,
) -> list[int]:
    """UIDs of the view's live messages that match key, ascending.

    ``view`` is node/imap/view.View (uids, flags, gone, live, seq_of);
    ``saved`` the SEARCHRES result "$" stands for; ``fresh`` says the view
    has seen every committed change (no unreported expunge can hide in it).
    """
    key = substitute_saved(key, saved)
    hits: dict[SearchKey, tuple[TextHits, bool]] = {}
    for k in searchmod.text_keys(key):
        needle = k.args[-1]
        found = store.search_text(account, view.name, searchmod.INDEX_FIELDS[k.op], needle)
        if found is not None:
            hits[k] = (found, k.op != "HEADER")  # HEADER: candidates, not exact
    live = view.live_uids()
    whole = _Sets(view, live, hits).eval(key)
    if whole is not None:
        # Answered from the view and the index alone, as set operations.
        result = sorted(whole)
        if not fresh and result:  # drop messages expunged meanwhile
            rows = store.rows(account, view.name, result)
            result = [u for u in result if u in rows]
        return result
    narrow: set[int] | None = None
    for k in searchmod.conjuncts(key):
        if k in hits:
            h = hits[k][0]
            allowed = set(h.uids) | set(h.unindexed)
            narrow = allowed if narrow is None else narrow & allowed
    if narrow is not None:
        live = [u for u in live if u in narrow]
    max_seq = len(view.uids)
    max_uid = view.uids[-1] if view.uids else 0
    found_uids: list[int] = []
    for start in range(0, len(live), BATCH):
        rows = store.rows(account, view.name, live[start : start + BATCH])
        batch = [u for u in live[start : start + BATCH] if u in rows]
        metas = _Lazy(lambda us: store.metadata(account, view.name, us), batch)
        for u in batch:
            row = rows[u]
            decided: dict[SearchKey, bool] = {}
            for k, (h, exact) in hits.items():
                if u in h.unindexed:
                    continue
                if u in h.uids:
                    if exact:
                        decided[k] = True
                else:
                    decided[k] = False
            cand = Candidate(
                seq=view.seq_of(u),
                uid=u,
                flags=view.flags.get(u, row.flags),
                size=row.size,
                internaldate=row.internaldate,
                modseq=row.modseq,  # RFC 7162 §3.1.5 SEARCH MODSEQ
                load_meta=lambda u=u, m=metas: m.get(u),
                load_raw=lambda b=row.blob: store.read_message(b),
                decided=decided,
                blob=row.blob,  # RFC 8474 SEARCH EMAILID
                load_savedate=lambda u=u: store.savedates(account, view.name, [u]).get(u),
            )
            if searchmod.matches(key, cand, max_seq=max_seq, max_uid=max_uid):
                found_uids.append(u)
    return found_uids


class _Sets:
    """Evaluates a key tree as sets of UIDs when every key can be answered
    from the view (flags, sequence numbers, UIDs) or exactly by the index;
    eval returns None as soon as one cannot (dates, sizes, HEADER, ...)."""

    def __init__(self, view: Any, live: list[int], hits: dict) -> None:
        self.view = view
        self.live = live
        self.hits = hits

    @functools.cached_property
    def all(self) -> set[int]:
        """The live UIDs as a set, built only for keys that need it (a flag
        key alone, e.g. UNSEEN, does not)."""
        return set(self.live)

    def eval(self, key: SearchKey) -> set[int] | None:
        op, args = key.op, key.args
        if op in ("AND", "OR"):
            parts = [self.eval(k) for k in args]
            if any(p is None for p in parts):
                return None
            out = set(self.all) if op == "AND" else set()
            for p in parts:
                out = out & p if op == "AND" else out | p  # type: ignore[operator]
            return out
        if op == "NOT":
            inner = self.eval(args[0])
            return None if inner is None else self.all - inner
        if op in ("ALL", "OLD"):
            return set(self.all)
        if op in ("NEW", "RECENT"):
            return set()  # \Recent is not kept (docs/imap.md)
        flags = self.view.flags
        if op in searchmod.FLAG_KEYS:
            flag, present = searchmod.FLAG_KEYS[op]
            return {u for u in self.live if (flag in flags[u]) == present}
        if op in ("KEYWORD", "UNKEYWORD"):
            want = op == "KEYWORD"
            return {u for u in self.live if searchmod._has_flag(flags[u], args[0]) == want}
        if op == "SEQ":
            uids = self.view.uids
            out: set[int] = set()
            for lo, hi in args[0].resolve(len(uids)):
                out.update(uids[max(lo, 1) - 1 : hi])
            return out & self.all
        if op == "UID":
            uids = self.view.uids
            out = set()
            for lo, hi in args[0].resolve(uids[-1] if uids else 0):
                out.update(uids[bisect.bisect_left(uids, lo) : bisect.bisect_right(uids, hi)])
            return out & self.all
        found = self.hits.get(key)
        if found is not None and found[1] and not (found[0].unindexed & self.all):
            return set(found[0].uids) & self.all
        return None


# ---------------------------------------------------------------------------
# SEARCHRES (RFC 5182): "$" names the last saved result.


@dataclass
class Saved:
    """A saved search result: UIDs, tied to the view (mailbox selection) it
    was made in, so a new SELECT/EXAMINE or CLOSE empties it (RFC 5182 §2.1)."""

    view: Any  # the View object of the selection it belongs to
    uids: frozenset[int]


def substitute_saved(key: SearchKey, uids: Iterable[int] | None) -> SearchKey:
    """Replace "$" sequence sets in a key tree by the saved UIDs (RFC 5182 §2.1:
    "$" in SEARCH means the saved UIDs, in UID and non-UID SEARCH alike)."""
    if key.op in ("AND", "OR", "NOT"):
        return SearchKey(key.op, tuple(substitute_saved(k, uids) for k in key.args))
    if key.op in ("SEQ", "UID") and getattr(key.args[0], "saved", False):
        return SearchKey("UID", (uid_set(sorted(uids or ())),))
    return key


def uid_set(uids: list[int]) -> SeqSet:
    """Ascending UIDs as a SeqSet; empty -> a set that matches nothing."""
    ranges: list[tuple[int, int]] = []
    for u in uids:
        if ranges and ranges[-1][1] + 1 == u:
            ranges[-1] = (ranges[-1][0], u)
        else:
            ranges.append((u, u))
    return SeqSet(tuple(ranges))


def compact(numbers: list[int]) -> str:
    """RFC 4731 §3.1 sequence-set of ascending numbers ("1:3,7")."""
    return uid_set(numbers).encode()


# ---------------------------------------------------------------------------
# Responses


def number_list(numbers: list[int]) -> bytes:
    """`` 1 2 3`` (each number after a space): the body of `* SEARCH` and
    `* SORT`; str.join over map(str) is ~3x faster than a %d per number."""
    if not numbers:
        return b""
    return (" " + " ".join(map(str, numbers))).encode("ascii")


def search_response(
    tag: str, numbers: list[int], uid: bool, returns: tuple[str, ...] | None
) -> bytes:
    """`* SEARCH ...` (RFC 9051 §7.3.4 / RFC 3501 §7.2.5) when returns is None,
    else `* ESEARCH (TAG "t") [UID] ...` (RFC 4731 §3.1).  numbers ascending."""
    if returns is None:
        return b"* SEARCH" + number_list(numbers) + b"\r\n"
    opts = set(returns) or {"ALL"}  # RFC 4731 §3.1: RETURN () means ALL
    out = [b"* ESEARCH (TAG " + encode_string(tag) + b")"]
    if uid:
        out.append(b"UID")
    if numbers:
        if "MIN" in opts:
            out.append(b"MIN %d" % numbers[0])
        if "MAX" in opts:
            out.append(b"MAX %d" % numbers[-1])
        if "ALL" in opts:
            out.append(b"ALL " + compact(numbers).encode("ascii"))
    if "COUNT" in opts:
        out.append(b"COUNT %d" % len(numbers))
    return b" ".join(out) + b"\r\n"


def answer(session: Any, cmd: Any) -> bytes:
    """Run SEARCH/UID SEARCH for a session and return the untagged response.

    cmd.args: (charset, key) or (charset, key, returns).  RETURN (SAVE) keeps
    the result for "$" (RFC 5182 §2.1); with SAVE alone no ESEARCH is sent,
    with MIN/MAX but neither ALL nor COUNT only those are saved (§2.4).
    """
    key = cmd.args[1]
    returns = cmd.args[2] if len(cmd.args) > 2 else None
    if returns is None and "IMAP4REV2" in getattr(session, "enabled", ()):
        returns = ()  # RFC 9051 §6.4.4: ESEARCH, as if RETURN (ALL)
    view = session.view
    fresh = not getattr(session, "_dirty", True)
    uids = find(session.ctx.store, session.account, view, key, saved_uids(session), fresh)
    numbers = uids if cmd.uid else [view.seq_of(u) for u in uids]
    if returns is not None and "SAVE" in returns:
        keep = uids
        if uids and not {"ALL", "COUNT"} & set(returns) and {"MIN", "MAX"} & set(returns):
            ends = ([uids[0]] if "MIN" in returns else []) + (
                [uids[-1]] if "MAX" in returns else [])
            keep = sorted(set(ends))
        session.searchres = Saved(view, frozenset(keep))
        rest = tuple(r for r in returns if r != "SAVE")
        if not rest:
            return b""
        returns = rest
    out = search_response(cmd.tag, numbers, cmd.uid, returns)
    from node.imap.commands import condstore  # RFC 7162 §3.1.5: (MODSEQ n)

    return condstore.search_modseq(session, key, uids, out, esearch=returns is not None)


def saved_uids(session: Any) -> frozenset[int]:
    """The SEARCHRES result of this selection ("$"), empty if none."""
    saved = getattr(session, "searchres", None)
    if saved is None or saved.view is not session.view:
        return frozenset()
    return saved.uids
