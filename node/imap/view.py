"""The selected mailbox as one IMAP session has reported it (RFC 3501 §2.3.1.2).

Theory of operation: at SELECT the view is built from ``store.uid_flags``
(UIDs and flags only, no MessageRow per message; equal flag sets are one
shared frozenset, so a view of 100,000 messages costs a list and a dict, a
few MB).  After that it is refreshed incrementally: ``apply`` takes what
``store.changes_since(view.modseq)`` returned and yields what to report,
never re-reading the whole mailbox.  FETCH, STORE and SEARCH load only the
rows they name (``store.rows``), in batches.

Positions in ``uids`` are the message sequence numbers.  An expunge learned
where RFC 3501 §7.4.1 forbids reporting it (during FETCH, STORE, SEARCH) is
kept in ``gone``: the message keeps its number until ``take_expunged``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from node.imap.protocol import SYSTEM_FLAGS, FetchItem
from storage.model import MailboxChanges

# FETCH items answered from the view alone, without reading rows.
FLAGS_ONLY = frozenset({"FLAGS", "UID"})
_FLAG_LISTS: dict[frozenset[str], bytes] = {}  # encoded "(\\Seen kw)", per distinct set
_FLAG_LISTS_MAX = 4096


@dataclass
class View:
    """The selected mailbox as this session has reported it."""

    name: str
    readonly: bool
    uidvalidity: int
    uids: list[int]  # ascending; index + 1 is the sequence number
    flags: dict[int, frozenset[str]]
    modseq: int
    keywords: set[str] = field(default_factory=set)  # announced in FLAGS
    gone: set[int] = field(default_factory=set)  # expunged, not yet reported

    @classmethod
    def build(
        cls,
        name: str,
        readonly: bool,
        uidvalidity: int,
        modseq: int,
        pairs: Iterable[tuple[int, frozenset[str]]],
    ) -> View:
        """A view from ``store.uid_flags`` output (ascending UIDs)."""
        flags = dict(pairs)
        view = cls(name, readonly, uidvalidity, list(flags), flags, modseq)
        for fs in set(flags.values()):  # distinct sets only (frozensets cache their hash)
            view.keywords.update(f for f in fs if not f.startswith("\\"))
        return view

    def seq_of(self, uid: int) -> int:
        return bisect.bisect_left(self.uids, uid) + 1

    def first_unseen(self) -> int | None:
        """Sequence number of the first message without \\Seen (RFC 3501 §7.1)."""
        flags = self.flags
        for i, u in enumerate(self.uids):
            if "\\Seen" not in flags[u]:
                return i + 1
        return None

    def live(self, uids: Iterable[int]) -> list[int]:
        """Those of ``uids`` that are in the view and not expunged."""
        flags, gone = self.flags, self.gone
        return [u for u in uids if u in flags and u not in gone]

    def live_uids(self) -> list[int]:
        """Every UID of the view not expunged, ascending (``live(uids)``
        without a lookup per message: ``uids`` and ``flags`` hold the same UIDs)."""
        if not self.gone:
            return list(self.uids)
        gone = self.gone
        return [u for u in self.uids if u not in gone]

    def apply(self, changes: MailboxChanges) -> tuple[list[int], list[int]]:
        """Fold committed changes into the view; returns (UIDs whose flags
        changed, new UIDs appended), both ascending.  Expunged UIDs go to
        ``gone``; own STORE results already in ``flags`` are not reported
        again (flags are compared, not MODSEQs)."""
        self.modseq = max(self.modseq, changes.highestmodseq)
        flags, gone = self.flags, self.gone
        for uid in changes.expunged:
            if uid in flags:
                gone.add(uid)
        newest = self.uids[-1] if self.uids else 0
        updated: list[int] = []
        added: list[int] = []
        new_flags: dict[int, frozenset[str]] = {}
        for row in changes.changed:
            uid = row.uid
            if uid in gone:
                continue
            old = flags.get(uid)
            if old is not None:
                if row.flags != old:
                    flags[uid] = row.flags
                    updated.append(uid)
            elif uid > newest:
                new_flags[uid] = row.flags
        for uid in sorted(new_flags):
            self.uids.append(uid)
            flags[uid] = new_flags[uid]
            added.append(uid)
        updated.sort()
        return updated, added

    def reopened(self, readonly: bool) -> View:
        """A new view of this mailbox as a SELECT now would build it, from
        this one once every committed change is applied: messages expunged
        meanwhile dropped (a new selection reports none), keywords again from
        the flags the messages hold."""
        self.take_expunged()
        flags = self.flags
        return View.build(self.name, readonly, self.uidvalidity, self.modseq,
                          [(u, flags[u]) for u in self.uids])

    def take_expunged(self) -> list[int]:
        """Remove the ``gone`` messages; returns their sequence numbers,
        highest first, so each EXPUNGE leaves earlier numbers valid (§7.4.1)."""
        out: list[int] = []
        if not self.gone:
            return out
        gone = self.gone
        # Deleting from the highest number down leaves lower positions
        # unchanged, so each reported number is the original position; the
        # list is rebuilt once (a mass expunge stays linear).
        for uid in sorted(gone, reverse=True):
            out.append(self.seq_of(uid))
            del self.flags[uid]
        self.uids = [u for u in self.uids if u not in gone]
        gone.clear()
        return out


def flag_list_bytes(flags: frozenset[str]) -> bytes:
    """``(\\Answered \\Seen kw)``: system flags in RFC order, then keywords
    sorted (RFC 3501 §2.3.2); cached per distinct set."""
    out = _FLAG_LISTS.get(flags)
    if out is None:
        ordered = [f for f in SYSTEM_FLAGS if f in flags]
        ordered += sorted(f for f in flags if f not in SYSTEM_FLAGS)
        out = ("(" + " ".join(ordered) + ")").encode("utf-8")
        if len(_FLAG_LISTS) >= _FLAG_LISTS_MAX:
            _FLAG_LISTS.clear()
        _FLAG_LISTS[flags] = out
    return out


def fetch_flags_line(view: View, uid: int, items: list[FetchItem]) -> bytes:
    """``* n FETCH (...)`` for items within FLAGS_ONLY, in the order asked
    (RFC 3501 §7.4.2), from the view's flags."""
    parts: list[bytes] = []
    for item in items:
        if item.name == "UID":
            parts.append(b"UID %d" % uid)
        else:
            parts.append(b"FLAGS " + flag_list_bytes(view.flags[uid]))
    return b"* %d FETCH (%s)\r\n" % (view.seq_of(uid), b" ".join(parts))
