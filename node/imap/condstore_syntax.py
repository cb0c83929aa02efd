"""Wire syntax of CONDSTORE and QRESYNC (RFC 7162 §7), sans-I/O.

Typed values for the SELECT/EXAMINE parameters, the FETCH modifiers and the
STORE modifier, their parsers (on protocol.py's reader) and encoders, so
``parse -> encode -> parse`` is a fixed point like every other command.
node/imap/commands/condstore.py registers them with protocol.register_command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.imap.protocol import STAR, SeqSet, _is_digit

MAX_MODSEQ = 2**63 - 1  # mod-sequence-value: positive unsigned 63-bit (RFC 7162 §7)
MAX_SEQ_MATCH = 4096  # ranges per QRESYNC sequence set (same bound as Limits.max_ranges)


def mod_sequence(r: Any, *, zero: bool) -> int:
    """mod-sequence-value (or -valzer when ``zero``), RFC 7162 §7."""
    value = r._take(_is_digit)
    if not value or len(value) > 19:
        raise r.fail("expected mod-sequence")
    n = int(value)
    if n > MAX_MODSEQ or (n == 0 and not zero):
        raise r.fail("mod-sequence out of range")
    return n


def _no_star(r: Any, seqs: SeqSet) -> SeqSet:
    if any(STAR in rng for rng in seqs.ranges):
        raise r.fail("'*' is not allowed here")  # RFC 7162 §3.2.5: known-uids
    return seqs


@dataclass(frozen=True)
class QresyncParams:
    """SELECT ... (QRESYNC (uidvalidity modseq [known-uids [seq-match]]))."""

    uidvalidity: int
    modseq: int
    known_uids: SeqSet | None = None
    seq_match: tuple[SeqSet, SeqSet] | None = None  # (known sequence set, known uids)

    def encode(self) -> str:
        parts = [str(self.uidvalidity), str(self.modseq)]
        if self.known_uids is not None:
            parts.append(self.known_uids.encode())
        if self.seq_match is not None:
            parts.append(f"({self.seq_match[0].encode()} {self.seq_match[1].encode()})")
        return "QRESYNC (" + " ".join(parts) + ")"


@dataclass(frozen=True)
class SelectParams:
    """select-params of RFC 7162 §7 (RFC 4466 §2.1 syntax)."""

    condstore: bool = False
    qresync: QresyncParams | None = None

    def encode(self) -> bytes:
        parts = (["CONDSTORE"] if self.condstore else []) + (
            [self.qresync.encode()] if self.qresync else []
        )
        return ("(" + " ".join(parts) + ")").encode("ascii")


@dataclass(frozen=True)
class FetchModifiers:
    """fetch-modifiers: CHANGEDSINCE (RFC 7162 §3.1.4.1), VANISHED (§3.2.6)."""

    changedsince: int | None = None
    vanished: bool = False

    def encode(self) -> bytes:
        parts = [] if self.changedsince is None else [f"CHANGEDSINCE {self.changedsince}"]
        if self.vanished:
            parts.append("VANISHED")
        return ("(" + " ".join(parts) + ")").encode("ascii")


def parse_select_params(r: Any) -> SelectParams:
    """``(CONDSTORE)`` / ``(QRESYNC (...))`` after the mailbox name."""
    r.expect(b"(")
    condstore = False
    qresync: QresyncParams | None = None
    while True:
        word = r.atom().upper()
        if word == "CONDSTORE" and not condstore:
            condstore = True
        elif word == "QRESYNC" and qresync is None:
            r.sp()
            r.expect(b"(")
            uidvalidity = r.nz_number()
            r.sp()
            modseq = mod_sequence(r, zero=False)
            known: SeqSet | None = None
            match: tuple[SeqSet, SeqSet] | None = None
            if r.maybe_sp():
                if r.peek() != 0x28:
                    known = _no_star(r, r.sequence_set())
                    if r.maybe_sp() and r.peek() != 0x28:
                        raise r.fail("expected seq-match-data")
                if r.peek() == 0x28:
                    r.expect(b"(")
                    seqs = _no_star(r, r.sequence_set())
                    r.sp()
                    uids = _no_star(r, r.sequence_set())
                    r.expect(b")")
                    match = (seqs, uids)
            r.expect(b")")
            qresync = QresyncParams(uidvalidity, modseq, known, match)
        else:
            raise r.fail("unknown SELECT parameter")
        if r.accept(b")"):
            return SelectParams(condstore, qresync)
        r.sp()


def parse_fetch_modifiers(r: Any) -> FetchModifiers:
    """``(CHANGEDSINCE n [VANISHED])`` after the fetch items."""
    r.expect(b"(")
    changed: int | None = None
    vanished = False
    while True:
        word = r.atom().upper()
        if word == "CHANGEDSINCE" and changed is None:
            r.sp()
            changed = mod_sequence(r, zero=True)  # clients send 0 for "everything"
        elif word == "VANISHED" and not vanished:
            vanished = True
        else:
            raise r.fail("unknown FETCH modifier")
        if r.accept(b")"):
            return FetchModifiers(changed, vanished)
        r.sp()


def parse_unchangedsince(r: Any) -> int:
    """``(UNCHANGEDSINCE n)`` of STORE (RFC 7162 §3.1.3)."""
    r.expect(b"(")
    if r.atom().upper() != "UNCHANGEDSINCE":
        raise r.fail("unknown STORE modifier")
    r.sp()
    n = mod_sequence(r, zero=True)
    r.expect(b")")
    return n


def parse_search_modseq(r: Any) -> tuple[int, str | None, str | None]:
    """After ``MODSEQ SP``: [entry-name SP entry-type-req SP] mod-sequence-valzer
    (RFC 7162 §3.1.5).  Returns (modseq, entry name, entry type)."""
    entry: str | None = None
    kind: str | None = None
    if r.peek() == 0x22:  # entry-flag-name is a quoted string
        entry = r.text_str(r.quoted())
        r.sp()
        kind = r.atom().lower()
        if kind not in ("priv", "shared", "all"):
            raise r.fail("bad MODSEQ entry type")
        r.sp()
    return (mod_sequence(r, zero=True), entry, kind)


def encode_search_modseq(args: tuple[Any, ...]) -> bytes:
    n, entry, kind = args
    if entry is None:
        return b"MODSEQ %d" % n
    quoted = entry.replace("\\", "\\\\").replace('"', '\\"')
    return f'MODSEQ "{quoted}" {kind} {n}'.encode()
