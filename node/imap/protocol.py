"""IMAP4rev1 wire protocol, sans-I/O (RFC 3501 §2.2, §6, §7, §9).

Theory of operation:

* `Framer` splits the byte stream into whole commands *before* any grammar
  is applied: a line (capped at `Limits.max_line_length` octets, CRLF
  included) that ends in a literal announcement ``{n}`` is followed by n
  octets of literal data (capped, per command, at `Limits.max_literal_size`)
  and then more line.  For a synchronizing literal the framer emits
  `ContinuationRequest` so the caller sends ``+`` (RFC 3501 §7.5); for an
  over-size synchronizing literal it emits `LiteralTooLarge` (the client has
  not sent the data yet, so a tagged BAD keeps the stream in sync).  An
  over-long line, or an over-size non-synchronizing literal (RFC 7888 §4),
  cannot be resynchronized: `FatalError` (the session sends BYE and closes).
  In "line" mode (AUTHENTICATE responses, IDLE's DONE) it emits `RawLine`.
* `parse_command` turns one framed command into a typed `Command` or raises
  `ParseError` carrying the tag to answer BAD with.  Nesting depth and the
  number of ranges in a sequence set are bounded (`Limits`).
* `encode_command` is the inverse (used by tests and a future proxy), and the
  response helpers (`tagged`, `untagged`, `continuation`, `encode_value`)
  build replies.  Nothing here imports sockets, gevent, storage or cluster.
* `COMMAND_STATES` is the table of which command is legal in which state.
"""

from __future__ import annotations

import base64
import datetime
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from node.imap.search import (
    DATE_KEYS,
    FLAG_ARG_KEYS,
    NUMBER_KEYS,
    PLAIN_KEYS,
    STRING_KEYS,
    SearchKey,
)

# --------------------------------------------------------------------------
# Limits, states, command table


@dataclass(frozen=True)
class Limits:
    """Named bounds on what a client may send (style: everything is bounded)."""

    max_line_length: int = 65536  # octets of one line incl. CRLF, outside literals
    max_literal_size: int = 50 * 1024 * 1024  # octets of literal data per command
    max_depth: int = 32  # nesting of parenthesized lists / search keys
    max_ranges: int = 4096  # ranges in one sequence set
    literal_plus: bool = False  # accept {n+} (RFC 7888)
    # LITERAL- (RFC 7888 §5): non-synchronizing literals up to this size only
    # (4096); None means LITERAL+, any size up to max_literal_size.
    max_nonsync_literal: int | None = None
    # After ENABLE IMAP4rev2, mailbox names are UTF-8, not modified UTF-7
    # (RFC 9051 §5.1, §6.3.1): "&" is then an ordinary character.
    utf8_mailboxes: bool = False


class State(Enum):
    """RFC 3501 §3."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


_ANY = frozenset({State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED})
_AUTHED = frozenset({State.AUTHENTICATED, State.SELECTED})
_SELECTED = frozenset({State.SELECTED})
_NOAUTH = frozenset({State.NOT_AUTHENTICATED})

# RFC 3501 §6.1-§6.4 (+ IDLE, RFC 2177 §3).  UID commands are "UID FETCH" etc.
COMMAND_STATES: dict[str, frozenset[State]] = {
    "CAPABILITY": _ANY,
    "NOOP": _ANY,
    "LOGOUT": _ANY,
    "STARTTLS": _NOAUTH,
    "AUTHENTICATE": _NOAUTH,
    "LOGIN": _NOAUTH,
    "SELECT": _AUTHED,
    "EXAMINE": _AUTHED,
    "CREATE": _AUTHED,
    "DELETE": _AUTHED,
    "RENAME": _AUTHED,
    "SUBSCRIBE": _AUTHED,
    "UNSUBSCRIBE": _AUTHED,
    "LIST": _AUTHED,
    "LSUB": _AUTHED,
    "STATUS": _AUTHED,
    "APPEND": _AUTHED,
    "IDLE": _AUTHED,
    "CHECK": _SELECTED,
    "CLOSE": _SELECTED,
    "EXPUNGE": _SELECTED,
    "SEARCH": _SELECTED,
    "FETCH": _SELECTED,
    "STORE": _SELECTED,
    "COPY": _SELECTED,
    "UID FETCH": _SELECTED,
    "UID STORE": _SELECTED,
    "UID COPY": _SELECTED,
    "UID SEARCH": _SELECTED,
    "UID EXPUNGE": _SELECTED,  # RFC 4315 §2.1 (UIDPLUS)
}
UID_COMMANDS = frozenset({"FETCH", "STORE", "COPY", "SEARCH", "EXPUNGE"})


def allowed(state: State, name: str) -> bool:
    """True if the command `name` ("UID FETCH" for UID forms) is legal in state."""
    return state in COMMAND_STATES.get(name, frozenset())


def register_command(name: str, parser: Any, states: frozenset[State]) -> None:
    """Add (or extend) a command of an extension family (node/imap/commands/*):
    its parser ``parser(reader) -> args`` and its row in COMMAND_STATES."""
    _PARSERS[name] = parser
    COMMAND_STATES[name] = states


# --------------------------------------------------------------------------
# Typed values


class Secret:
    """A password: compares by value, never shows itself in repr or logs."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret(***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


STAR = 0  # "*" in a sequence set: the largest number in use (RFC 3501 §9)


@dataclass(frozen=True)
class SeqSet:
    """A sequence-set (RFC 3501 §9) as ranges (lo, hi); STAR stands for "*"."""

    ranges: tuple[tuple[int, int], ...]
    saved: bool = False  # "$", the saved search result (RFC 5182 §2.2); ranges ()

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Ranges with "*" replaced by `largest`, each as (low, high)."""
        out = []
        for lo, hi in self.ranges:
            a = largest if lo == STAR else lo
            b = largest if hi == STAR else hi
            out.append((min(a, b), max(a, b)))
        return out

    def contains(self, n: int, largest: int) -> bool:
        return any(lo <= n <= hi for lo, hi in self.resolve(largest))

    def encode(self) -> str:
        def one(n: int) -> str:
            return "*" if n == STAR else str(n)

        if self.saved:
            return "$"
        return ",".join(one(lo) if lo == hi else f"{one(lo)}:{one(hi)}" for lo, hi in self.ranges)


@dataclass(frozen=True)
class Section:
    """A BODY[section] specifier (RFC 3501 §6.4.5)."""

    part: tuple[int, ...] = ()
    specifier: str | None = None  # HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME
    fields: tuple[str, ...] = ()

    def encode(self) -> str:
        text = ".".join(str(p) for p in self.part)
        if self.specifier:
            text = f"{text}.{self.specifier}" if text else self.specifier
        if self.fields:
            text += " (" + " ".join(_astring_text(f) for f in self.fields) + ")"
        return f"[{text}]"


@dataclass(frozen=True)
class FetchItem:
    """One fetch-att.  name: FLAGS, UID, INTERNALDATE, RFC822.SIZE, ENVELOPE,
    BODYSTRUCTURE, BODY, RFC822, RFC822.HEADER, RFC822.TEXT, or BODY[...]
    (then section is set; peek for BODY.PEEK; partial as (origin, count))."""

    name: str
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None

    def encode(self) -> str:
        if self.section is None:
            return self.name
        if self.name == "BINARY.SIZE[]":  # RFC 3516 §4.2
            return "BINARY.SIZE" + self.section.encode()
        base = "BINARY" if self.name == "BINARY[]" else "BODY"
        text = (base + ".PEEK" if self.peek else base) + self.section.encode()
        if self.partial is not None:
            text += f"<{self.partial[0]}.{self.partial[1]}>"
        return text

    def response_name(self) -> str:
        """The name echoed in the FETCH response (RFC 3501 §7.4.2, RFC 3516 §4.2)."""
        assert self.section is not None
        base = {"BINARY[]": "BINARY", "BINARY.SIZE[]": "BINARY.SIZE"}.get(self.name, "BODY")
        text = base + self.section.encode()
        if self.partial is not None:
            text += f"<{self.partial[0]}>"
        return text


MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
SIMPLE_FETCH = frozenset(
    {
        "FLAGS",
        "UID",
        "INTERNALDATE",
        "RFC822.SIZE",
        "ENVELOPE",
        "BODYSTRUCTURE",
        "BODY",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.TEXT",
        "MODSEQ",  # RFC 7162 §3.1.4.1
        "SAVEDATE",  # RFC 8514 §4.3
        "EMAILID",  # RFC 8474 §5.1
        "THREADID",  # RFC 8474 §5.2
    }
)
STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")
STATUS_ITEMS += ("HIGHESTMODSEQ",)  # RFC 7162 §3.1.2.2
STATUS_ITEMS += ("SIZE", "MAILBOXID")  # RFC 8438 §2, RFC 8474 §4.2
STATUS_ITEMS += ("DELETED", "DELETED-STORAGE")  # RFC 9208 §4.2
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


@dataclass(frozen=True)
class Command:
    """A parsed command.  name is upper-case; uid marks the UID form.

    args by name: LOGIN (user: str, password: Secret); AUTHENTICATE
    (mechanism: str, initial: str | None); SELECT/EXAMINE/CREATE/DELETE/
    SUBSCRIBE/UNSUBSCRIBE (mailbox: str); RENAME (old, new); LIST/LSUB
    (reference: str, pattern: str); STATUS (mailbox, items: tuple[str]);
    APPEND (mailbox, flags: tuple[str], date: datetime | None, message:
    bytes); SEARCH (charset: str | None, key: SearchKey); FETCH (SeqSet,
    tuple[FetchItem]); STORE (SeqSet, mode "set"/"add"/"remove", silent:
    bool, flags: tuple[str]); COPY (SeqSet, mailbox); UID EXPUNGE (SeqSet,);
    others ().
    Mailbox names are decoded from modified UTF-7 (RFC 3501 §5.1.3).
    """

    tag: str
    name: str
    args: tuple[Any, ...] = ()
    uid: bool = False

    @property
    def full_name(self) -> str:
        return f"UID {self.name}" if self.uid else self.name


# --------------------------------------------------------------------------
# Framing


class ContinuationRequest:
    """A synchronizing literal was announced: send "+ ..." (RFC 3501 §7.5)."""

    def __repr__(self) -> str:
        return "ContinuationRequest()"


@dataclass(frozen=True)
class FramedCommand:
    """lines[i] (i < last) each end in a literal announcement for literals[i]."""

    lines: tuple[bytes, ...]
    literals: tuple[bytes, ...]


@dataclass(frozen=True)
class RawLine:
    line: bytes  # without CRLF


@dataclass(frozen=True)
class LiteralTooLarge:
    """A synchronizing literal over the limit; answer `tag BAD` (`NO [TOOBIG]`
    for APPEND, RFC 7889 §4) and go on."""

    tag: str
    command: str = field(default="", compare=False)  # upper-case name, "" if unknown


@dataclass(frozen=True)
class FatalError:
    """The stream cannot be resynchronized: send BYE and close."""

    text: str


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

_LITERAL_RE = re.compile(rb"\{(\d{1,19})(\+?)\}\r?$")
_TAG_RE = re.compile(rb"^([\x21-\x7e]+?) ")


def _tag_of(line: bytes) -> str:
    m = _TAG_RE.match(line)
    if not m or not all(_is_astring_char(c) and c != 0x2B for c in m.group(1)):
        return "*"
    return m.group(1).decode("ascii")


def _command_of(line: bytes) -> str:
    """The command name of a command's first line ("UID MOVE" style), or ""."""
    words = line.split(b" ", 3)[1:3]
    if not words or not words[0].isalpha():
        return ""
    name = words[0].decode("ascii").upper()
    if name == "UID" and len(words) > 1 and words[1].isalpha():
        name += " " + words[1].decode("ascii").upper()
    return name


class Framer:
    """Split bytes into commands, literals and raw lines, with caps (see module doc)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._lines: list[bytes] = []
        self._literals: list[bytes] = []
        self._total = 0  # octets of the lines of the command being framed
        self._literal_total = 0  # octets of its literals
        self._literal_left: int | None = None
        self.line_mode = False

    def receive(self, data: bytes) -> None:
        self._buf += data

    def take_buffer(self) -> bytes:
        """Hand over buffered, unframed input (it follows COMPRESS, RFC 4978 §3)."""
        data = bytes(self._buf)
        self.discard_buffer()
        return data

    def discard_buffer(self) -> None:
        """Drop buffered input (plaintext pipelined after STARTTLS, RFC 3501 §6.2.1)."""
        self._buf.clear()
        self._reset()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _reset(self) -> None:
        self._lines, self._literals, self._total = [], [], 0
        self._literal_total = 0
        self._literal_left = None

    def next_event(self) -> Any:
        """One of NEED_DATA, FramedCommand, ContinuationRequest, RawLine,
        LiteralTooLarge, FatalError."""
        while True:
            if self._literal_left is not None:
                n = self._literal_left
                if len(self._buf) < n:
                    return NEED_DATA
                self._literals.append(bytes(self._buf[:n]))
                del self._buf[:n]
                self._literal_left = None
                continue
            end = self._buf.find(b"\n", 0, self.limits.max_line_length)
            if end < 0:
                if len(self._buf) >= self.limits.max_line_length:
                    return FatalError("line too long")
                return NEED_DATA
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self.line_mode:
                return RawLine(line)
            self._total += len(line) + 2
            if self._total > self.limits.max_line_length:
                # The lines of one command, joined, share the line cap.
                return FatalError("command too long")
            m = _LITERAL_RE.search(line)
            if m and (not m.group(2) or self.limits.literal_plus):
                size = int(m.group(1))
                sync = not m.group(2)
                cap = self.limits.max_nonsync_literal
                if not sync and cap is not None and size > cap:
                    # LITERAL- (RFC 7888 §5): the data is on its way already.
                    self._reset()
                    return FatalError("non-synchronizing literal too large")
                if self._literal_total + size > self.limits.max_literal_size:
                    first = self._lines[0] if self._lines else line
                    self._reset()
                    if sync:
                        return LiteralTooLarge(_tag_of(first), _command_of(first))
                    return FatalError("literal too large")
                self._literal_total += size
                self._lines.append(line)
                self._literal_left = size
                if sync:
                    return ContinuationRequest()
                continue
            self._lines.append(line)
            framed = FramedCommand(tuple(self._lines), tuple(self._literals))
            self._reset()
            return framed


# --------------------------------------------------------------------------
# Parsing


class ParseError(Exception):
    """The client broke the grammar: answer `tag BAD text` (never str(exc)
    of anything else)."""

    def __init__(self, tag: str, text: str) -> None:
        super().__init__(text)
        self.tag = tag
        self.text = text


# RFC 3501 §9: atom-specials = "(" / ")" / "{" / SP / CTL / list-wildcards /
# quoted-specials / resp-specials.
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]')


def _is_atom_char(c: int) -> bool:
    return 0x20 < c < 0x7F and c not in _ATOM_SPECIALS


def _is_astring_char(c: int) -> bool:
    return _is_atom_char(c) or c == 0x5D  # resp-specials "]"


def _is_list_char(c: int) -> bool:
    return _is_astring_char(c) or c in (0x25, 0x2A)


def _is_digit(c: int) -> bool:
    return 0x30 <= c <= 0x39


def _is_tag_char(c: int) -> bool:
    return _is_astring_char(c) and c != 0x2B  # tag = 1*<any ASTRING-CHAR except "+">


def _is_fetch_word_char(c: int) -> bool:
    return _is_atom_char(c) and c != 0x5B  # a fetch-att name up to "["


def _is_visible(c: int) -> bool:
    return 0x20 < c < 0x7F


def _run_of(pred: Any) -> re.Pattern[bytes]:
    """A regex matching the longest run of bytes pred accepts (from a position)."""
    allowed = b"".join(re.escape(bytes([c])) for c in range(256) if pred(c))
    return re.compile(b"[" + allowed + b"]*")


# _Reader._take matches these character classes with one regex call instead
# of a Python call per byte (parsing was ~12 % of IMAP CPU).
_RUNS = {f: _run_of(f) for f in (_is_atom_char, _is_astring_char, _is_list_char, _is_digit,
                                 _is_tag_char, _is_fetch_word_char, _is_visible)}


class _Reader:
    """A cursor over one framed command (lines joined by literals)."""

    def __init__(self, framed: FramedCommand, limits: Limits) -> None:
        self.lines = framed.lines
        self.literals = framed.literals
        self.idx = 0
        self.line = framed.lines[0]
        self.pos = 0
        self.limits = limits
        self.tag = "*"

    def fail(self, text: str) -> ParseError:
        return ParseError(self.tag, text)

    def peek(self) -> int | None:
        return self.line[self.pos] if self.pos < len(self.line) else None

    def at_end(self) -> bool:
        return self.pos >= len(self.line) and self.idx == len(self.lines) - 1

    def end(self) -> None:
        if not self.at_end():
            raise self.fail("unexpected extra arguments")

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise self.fail("expected SP")
        self.pos += 1

    def maybe_sp(self) -> bool:
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def expect(self, ch: bytes) -> None:
        if self.peek() != ch[0]:
            raise self.fail(f"expected {ch.decode()}")
        self.pos += 1

    def accept(self, ch: bytes) -> bool:
        if self.peek() == ch[0]:
            self.pos += 1
            return True
        return False

    def _take(self, pred: Any) -> bytes:
        run = _RUNS.get(pred)
        if run is not None:
            m = run.match(self.line, self.pos)
            assert m is not None  # "*": always matches
            self.pos = m.end()
            return m.group()
        start = self.pos
        while self.pos < len(self.line) and pred(self.line[self.pos]):
            self.pos += 1
        return self.line[start : self.pos]

    def atom(self) -> str:
        value = self._take(_is_atom_char)
        if not value:
            raise self.fail("expected atom")
        return value.decode("ascii")

    def tag_token(self) -> str:
        value = self._take(_is_tag_char)
        if not value:
            raise ParseError("*", "missing or invalid tag")
        self.tag = value.decode("ascii")
        return self.tag

    def number(self) -> int:
        value = self._take(_is_digit)
        if not value or len(value) > 10:
            raise self.fail("expected number")
        n = int(value)
        if n > 0xFFFFFFFF:  # number = 32-bit unsigned (RFC 3501 §9)
            raise self.fail("number out of range")
        return n

    def nz_number(self) -> int:
        n = self.number()
        if n == 0:
            raise self.fail("expected non-zero number")
        return n

    def quoted(self) -> bytes:
        self.expect(b'"')
        out = bytearray()
        while True:
            c = self.peek()
            if c is None:
                raise self.fail("unterminated quoted string")
            self.pos += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:
                c = self.peek()
                if c not in (0x22, 0x5C):
                    raise self.fail("bad escape in quoted string")
                self.pos += 1
            out.append(c)

    def literal(self) -> bytes:
        m = _LITERAL_RE.fullmatch(self.line, self.pos)
        if m is None or self.idx >= len(self.literals):
            raise self.fail("bad literal")
        data = self.literals[self.idx]
        self.idx += 1
        self.line = self.lines[self.idx]
        self.pos = 0
        return data

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c == 0x7B:
            return self.literal()
        raise self.fail("expected string")

    def astring(self) -> bytes:
        c = self.peek()
        if c in (0x22, 0x7B):
            return self.string()
        value = self._take(_is_astring_char)
        if not value:
            raise self.fail("expected astring")
        return value

    def list_mailbox(self) -> bytes:
        c = self.peek()
        if c in (0x22, 0x7B):
            return self.string()
        value = self._take(_is_list_char)
        if not value:
            raise self.fail("expected list-mailbox")
        return value

    def text_str(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("string is not UTF-8") from None

    def mailbox(self) -> str:
        raw = self.astring()
        try:
            name = self.mailbox_name(raw)
        except ValueError:
            raise self.fail("bad mailbox name encoding") from None
        return "INBOX" if name.upper() == "INBOX" else name

    def mailbox_name(self, raw: bytes) -> str:
        """A mailbox name or pattern off the wire: UTF-8 once IMAP4rev2 is
        enabled (RFC 9051 §5.1), else modified UTF-7; ValueError if invalid."""
        return raw.decode("utf-8") if self.limits.utf8_mailboxes else decode_mailbox(raw)

    def flag(self) -> str:
        if self.accept(b"\\"):
            name = self.atom()
            for f in SYSTEM_FLAGS:
                if f[1:].upper() == name.upper():
                    return f
            if name.upper() == "RECENT":
                raise self.fail("\\Recent cannot be set")
            return "\\" + name
        return self.atom()

    def flag_list(self) -> tuple[str, ...]:
        self.expect(b"(")
        flags: list[str] = []
        if self.accept(b")"):
            return ()
        while True:
            flags.append(self.flag())
            if len(flags) > self.limits.max_ranges:
                raise self.fail("too many flags")
            if self.accept(b")"):
                return tuple(flags)
            self.sp()

    def seq_number(self) -> int:
        if self.accept(b"*"):
            return STAR
        return self.nz_number()

    def sequence_set(self) -> SeqSet:
        if self.accept(b"$"):  # RFC 5182 §3: seq-number "$" stands alone
            return SeqSet((), saved=True)
        # Fast path: one regex match and a split (a UID list of 20 numbers
        # took hundreds of per-byte calls); anything unusual takes the
        # byte-wise path below, which gives the exact error.
        m = _SEQ_SET.match(self.line, self.pos)
        if m is not None and self.line[m.end() : m.end() + 1] not in (b",", b":"):
            quick = _quick_ranges(m.group(), self.limits.max_ranges)
            if quick is not None:
                self.pos = m.end()
                return SeqSet(quick)
        ranges = []
        while True:
            lo = self.seq_number()
            hi = lo
            if self.accept(b":"):
                hi = self.seq_number()
            ranges.append((lo, hi))
            if len(ranges) > self.limits.max_ranges:
                raise self.fail("too many ranges in sequence set")
            if not self.accept(b","):
                return SeqSet(tuple(ranges))

    def date(self) -> datetime.date:
        quoted = self.accept(b'"')
        text = self._take(_is_atom_char).decode("ascii")
        if quoted:
            self.expect(b'"')
        m = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", text)
        if not m or m.group(2).capitalize() not in _MONTHS:
            raise self.fail("bad date")
        try:
            return datetime.date(
                int(m.group(3)), _MONTHS.index(m.group(2).capitalize()) + 1, int(m.group(1))
            )
        except ValueError:
            raise self.fail("bad date") from None

    def date_time(self) -> datetime.datetime:
        raw = self.quoted().decode("ascii", "replace")
        try:
            return parse_date_time(raw)
        except ValueError:
            raise self.fail("bad date-time") from None


_SEQ_NUMBER = rb"(?:[0-9]+|\*)"
_SEQ_SET = re.compile(
    _SEQ_NUMBER + rb"(?::" + _SEQ_NUMBER + rb")?(?:," + _SEQ_NUMBER + rb"(?::" + _SEQ_NUMBER
    + rb")?)*"
)


def _quick_seq_number(text: bytes) -> int | None:
    if text == b"*":
        return STAR
    n = int(text) if len(text) <= 10 else 0
    return n if 0 < n <= 0xFFFFFFFF else None  # 0, too long, too big: the slow path says why


def _quick_ranges(text: bytes, max_ranges: int) -> tuple[tuple[int, int], ...] | None:
    """The ranges of a sequence set _SEQ_SET matched; None if a number is
    invalid or there are too many ranges."""
    parts = text.split(b",")
    if len(parts) > max_ranges:
        return None
    ranges = []
    for part in parts:
        lo_text, colon, hi_text = part.partition(b":")
        lo = _quick_seq_number(lo_text)
        hi = _quick_seq_number(hi_text) if colon else lo
        if lo is None or hi is None:
            return None
        ranges.append((lo, hi))
    return tuple(ranges)


_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_DATE_TIME_RE = re.compile(
    r"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"
)


def parse_date_time(text: str) -> datetime.datetime:
    """RFC 3501 §9 date-time ("dd-Mon-yyyy hh:mm:ss +zzzz"); ValueError if bad."""
    m = _DATE_TIME_RE.fullmatch(text)
    if not m or m.group(2).capitalize() not in _MONTHS:
        raise ValueError(text)
    offset = datetime.timedelta(hours=int(m.group(8)), minutes=int(m.group(9)))
    if m.group(7) == "-":
        offset = -offset
    return datetime.datetime(
        int(m.group(3)),
        _MONTHS.index(m.group(2).capitalize()) + 1,
        int(m.group(1).strip()),
        int(m.group(4)),
        int(m.group(5)),
        int(m.group(6)),
        tzinfo=datetime.timezone(offset),
    )


def format_date_time(value: datetime.datetime | float) -> str:
    """INTERNALDATE text (RFC 3501 §9 date-time); epoch seconds are shown in UTC."""
    if not isinstance(value, datetime.datetime):
        value = datetime.datetime.fromtimestamp(value, datetime.UTC)
    offset = value.utcoffset() or datetime.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return (
        f"{value.day:02d}-{_MONTHS[value.month - 1]}-{value.year:04d} "
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d} "
        f"{sign}{minutes // 60:02d}{minutes % 60:02d}"
    )


def format_date(value: datetime.date) -> str:
    return f"{value.day}-{_MONTHS[value.month - 1]}-{value.year:04d}"


def parse_command(framed: FramedCommand, limits: Limits) -> Command:
    """One framed command -> Command; raises ParseError (answer BAD)."""
    r = _Reader(framed, limits)
    r.tag_token()
    r.sp()
    name = r.atom().upper()
    uid = False
    if name == "UID":
        r.sp()
        name = r.atom().upper()
        if name not in UID_COMMANDS:
            raise r.fail("unknown UID command")
        uid = True
    parser = _PARSERS.get(name)
    if uid and name == "EXPUNGE":
        parser = _uid_expunge
    if parser is None:
        raise r.fail("unknown command")
    args = parser(r)
    r.end()
    return Command(r.tag, name, args, uid)


# Commands whose parse is remembered by the line after the tag: their
# arguments are immutable (tuples, frozen dataclasses) and hold no secret
# (LOGIN and AUTHENTICATE are never kept).
CACHED_COMMANDS = frozenset({
    "SELECT", "EXAMINE", "FETCH", "STORE", "SEARCH", "SORT", "THREAD", "STATUS", "LIST",
    "LSUB", "NOOP", "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "IDLE", "COPY", "MOVE",
})
_PARSED: dict[tuple[Limits, bytes], Command] = {}
_PARSED_MAX = 4096
# Only lines up to this many octets are kept, so the cache holds at most
# ~4,096 x 512 octets of keys whatever the clients send (a line may be up
# to max_line_length).
_PARSED_LINE_MAX = 512


def parse_command_cached(framed: FramedCommand, limits: Limits) -> Command:
    """parse_command, with the Command of a literal-free line kept by the
    octets after its tag (and the limits): a line seen before is not parsed
    again (clients repeat theirs: NOOP, SELECT INBOX, the same FETCH item
    list and UIDs).  The same Command results, a new tag aside."""
    line = framed.lines[0]
    sp = line.find(b" ")
    if framed.literals or len(framed.lines) != 1 or sp <= 0 or len(line) > _PARSED_LINE_MAX:
        return parse_command(framed, limits)
    key = (limits, line[sp:])
    hit = _PARSED.get(key)
    if hit is not None and _RUNS[_is_tag_char].match(line).end() == sp:
        return Command(line[:sp].decode("ascii"), hit.name, hit.args, hit.uid)
    cmd = parse_command(framed, limits)
    if cmd.name in CACHED_COMMANDS:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[key] = cmd
    return cmd


def _no_args(r: _Reader) -> tuple[Any, ...]:
    return ()


def _uid_expunge(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    return (r.sequence_set(),)


def _one_mailbox(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    return (r.mailbox(),)


def _login(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    user = r.text_str(r.astring())
    r.sp()
    return (user, Secret(r.astring()))


def _authenticate(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    mech = r.atom().upper()
    initial = None
    if r.maybe_sp():
        # SASL-IR (RFC 4959 §3): base64 or "=" for an empty response.
        raw = r._take(_is_visible)
        if not raw:
            raise r.fail("expected initial response")
        initial = raw.decode("ascii")
    return (mech, initial)


def _rename(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    old = r.mailbox()
    r.sp()
    return (old, r.mailbox())


def _list(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    ref = r.astring()
    r.sp()
    pattern = r.list_mailbox()
    try:
        return (r.mailbox_name(ref), r.mailbox_name(pattern))
    except ValueError:
        raise r.fail("bad mailbox name encoding") from None


def _status(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    r.expect(b"(")
    items = []
    while True:
        item = r.atom().upper()
        if item not in STATUS_ITEMS:
            raise r.fail("unknown status item")
        items.append(item)
        if len(items) > len(STATUS_ITEMS) * 4:
            raise r.fail("too many status items")
        if r.accept(b")"):
            return (mailbox, tuple(items))
        r.sp()


def _append(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    flags: tuple[str, ...] = ()
    date = None
    if r.peek() == 0x28:
        flags = r.flag_list()
        r.sp()
    if r.peek() == 0x22:
        date = r.date_time()
        r.sp()
    r.accept(b"~")  # literal8 (RFC 3516 §4.4): taken as the message octets
    if r.peek() != 0x7B:
        raise r.fail("expected message literal")
    return (mailbox, flags, date, r.literal())


def _copy(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    seqs = r.sequence_set()
    r.sp()
    return (seqs, r.mailbox())


def _store(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    seqs = r.sequence_set()
    r.sp()
    unchanged = None
    if r.peek() == 0x28:  # RFC 7162 §3.1.3 store-modifier
        from node.imap.condstore_syntax import parse_unchangedsince

        unchanged = parse_unchangedsince(r)
        r.sp()
    mode = "set"
    if r.accept(b"+"):
        mode = "add"
    elif r.accept(b"-"):
        mode = "remove"
    item = r.atom().upper()
    if item not in ("FLAGS", "FLAGS.SILENT"):
        raise r.fail("expected FLAGS")
    r.sp()
    if r.peek() == 0x28:
        flags = r.flag_list()
    else:
        found = [r.flag()]
        while r.maybe_sp():
            found.append(r.flag())
            if len(found) > r.limits.max_ranges:
                raise r.fail("too many flags")
        flags = tuple(found)
    args = (seqs, mode, item.endswith(".SILENT"), flags)
    return args if unchanged is None else (*args, unchanged)  # 5th: UNCHANGEDSINCE


def _fetch(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    seqs = r.sequence_set()
    r.sp()
    items: list[FetchItem] = []
    if r.accept(b"("):
        while True:
            items.append(_fetch_att(r))
            if len(items) > 256:
                raise r.fail("too many fetch items")
            if r.accept(b")"):
                break
            r.sp()
    else:
        save = r.pos
        word = r.atom().upper()
        if word in MACROS:
            items = [FetchItem(n) for n in MACROS[word]]
        else:
            r.pos = save
            items = [_fetch_att(r)]
    return (seqs, tuple(items))


def _fetch_att(r: _Reader) -> FetchItem:
    word = r._take(_is_fetch_word_char).decode("ascii").upper()
    if r.peek() == 0x5B and word in ("BINARY", "BINARY.PEEK", "BINARY.SIZE"):
        # RFC 3516 §4.2: section-binary is part numbers only.
        section = _section(r)
        if section.specifier is not None:
            raise r.fail("bad binary section")
        if word == "BINARY.SIZE":
            return FetchItem("BINARY.SIZE[]", section, True)
        partial = None
        if r.accept(b"<"):
            origin = r.number()
            r.expect(b".")
            partial = (origin, r.nz_number())
            r.expect(b">")
        return FetchItem("BINARY[]", section, word == "BINARY.PEEK", partial)
    if r.peek() == 0x5B:  # "["
        if word not in ("BODY", "BODY.PEEK"):
            raise r.fail("unknown fetch item")
        section = _section(r)
        partial = None
        if r.accept(b"<"):
            origin = r.number()
            r.expect(b".")
            count = r.nz_number()
            r.expect(b">")
            partial = (origin, count)
        return FetchItem("BODY[]", section, word == "BODY.PEEK", partial)
    if word not in SIMPLE_FETCH:
        raise r.fail("unknown fetch item")
    return FetchItem(word)


def _section(r: _Reader) -> Section:
    r.expect(b"[")
    part: list[int] = []
    specifier = None
    fields: tuple[str, ...] = ()
    while r.peek() is not None and 0x31 <= r.peek() <= 0x39:  # type: ignore[operator]
        part.append(r.nz_number())
        if len(part) > r.limits.max_depth:
            raise r.fail("section nested too deeply")
        if not r.accept(b"."):
            break
    if r.peek() != 0x5D:
        word = r._take(_is_atom_char).decode("ascii").upper()
        allowed_specs = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT")
        if part:
            allowed_specs += ("MIME",)
        if word not in allowed_specs:
            raise r.fail("bad section")
        specifier = word
        if word.startswith("HEADER.FIELDS"):
            r.sp()
            r.expect(b"(")
            names = []
            while True:
                names.append(r.text_str(r.astring()).upper())
                if len(names) > 1024:
                    raise r.fail("too many header fields")
                if r.accept(b")"):
                    break
                r.sp()
            fields = tuple(names)
    elif part and r.line[r.pos - 1] == 0x2E:
        raise r.fail("bad section")
    r.expect(b"]")
    return Section(tuple(part), specifier, fields)


def _search(r: _Reader) -> tuple[Any, ...]:
    r.sp()
    charset = None
    save = r.pos
    word = r._take(_is_atom_char).decode("ascii").upper()
    if word == "CHARSET":
        r.sp()
        charset = r.text_str(r.astring()).upper()
        r.sp()
    else:
        r.pos = save
    keys = [_search_key(r, 0)]
    while r.maybe_sp():
        keys.append(_search_key(r, 0))
        if len(keys) > r.limits.max_ranges:
            raise r.fail("too many search keys")
    return (charset, keys[0] if len(keys) == 1 else SearchKey("AND", tuple(keys)))


def _search_key(r: _Reader, depth: int) -> SearchKey:
    if depth > r.limits.max_depth:
        raise r.fail("search keys nested too deeply")
    c = r.peek()
    if c == 0x28:  # "("
        r.pos += 1
        keys = [_search_key(r, depth + 1)]
        while not r.accept(b")"):
            r.sp()
            keys.append(_search_key(r, depth + 1))
            if len(keys) > r.limits.max_ranges:
                raise r.fail("too many search keys")
        return SearchKey("AND", tuple(keys))
    if c is not None and (0x30 <= c <= 0x39 or c in (0x2A, 0x24)):  # 0x24: "$" (RFC 5182)
        return SearchKey("SEQ", (r.sequence_set(),))
    word = r.atom().upper()
    if word in PLAIN_KEYS:
        return SearchKey(word)
    r.sp()
    if word in STRING_KEYS:
        return SearchKey(word, (r.text_str(r.astring()),))
    if word == "HEADER":
        name = r.text_str(r.astring())
        r.sp()
        return SearchKey(word, (name, r.text_str(r.astring())))
    if word in DATE_KEYS:
        return SearchKey(word, (r.date(),))
    if word in NUMBER_KEYS:
        return SearchKey(word, (r.number(),))
    if word in FLAG_ARG_KEYS:
        return SearchKey(word, (r.atom(),))
    if word == "UID":
        return SearchKey(word, (r.sequence_set(),))
    if word == "MODSEQ":  # RFC 7162 §3.1.5: (modseq, entry name, entry type)
        from node.imap.condstore_syntax import parse_search_modseq

        return SearchKey(word, parse_search_modseq(r))
    if word == "NOT":
        return SearchKey(word, (_search_key(r, depth + 1),))
    if word == "OR":
        a = _search_key(r, depth + 1)
        r.sp()
        return SearchKey(word, (a, _search_key(r, depth + 1)))
    raise r.fail("unknown search key")


_PARSERS = {
    "CAPABILITY": _no_args,
    "NOOP": _no_args,
    "LOGOUT": _no_args,
    "STARTTLS": _no_args,
    "CHECK": _no_args,
    "CLOSE": _no_args,
    "EXPUNGE": _no_args,
    "IDLE": _no_args,
    "LOGIN": _login,
    "AUTHENTICATE": _authenticate,
    "SELECT": _one_mailbox,
    "EXAMINE": _one_mailbox,
    "CREATE": _one_mailbox,
    "DELETE": _one_mailbox,
    "SUBSCRIBE": _one_mailbox,
    "UNSUBSCRIBE": _one_mailbox,
    "RENAME": _rename,
    "LIST": _list,
    "LSUB": _list,
    "STATUS": _status,
    "APPEND": _append,
    "SEARCH": _search,
    "FETCH": _fetch,
    "STORE": _store,
    "COPY": _copy,
}


# --------------------------------------------------------------------------
# Modified UTF-7 mailbox names (RFC 3501 §5.1.3)


def encode_mailbox(name: str) -> bytes:
    """Unicode mailbox name -> modified UTF-7."""
    out = bytearray()
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.extend(b"&" + base64.b64encode(data).rstrip(b"=").replace(b"/", b",") + b"-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.extend(b"&-" if ch == "&" else ch.encode("ascii"))
        else:
            pending.append(ch)
    flush()
    return bytes(out)


def decode_mailbox(raw: bytes) -> str:
    """Modified UTF-7 (or, leniently, 8-bit UTF-8) -> str; ValueError if invalid."""
    if any(c >= 0x80 for c in raw):
        return raw.decode("utf-8")  # raises UnicodeDecodeError, a ValueError
    out = []
    i = 0
    while i < len(raw):
        c = raw[i]
        if c != 0x26:
            out.append(chr(c))
            i += 1
            continue
        end = raw.find(b"-", i + 1)
        if end < 0:
            raise ValueError("unterminated modified base64")
        chunk = raw[i + 1 : end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        b64 = chunk.replace(b",", b"/")
        b64 += b"=" * (-len(b64) % 4)
        try:
            data = base64.b64decode(b64, validate=True)
            out.append(data.decode("utf-16-be"))
        except (ValueError, UnicodeDecodeError):
            raise ValueError("bad modified base64") from None
    return "".join(out)


# --------------------------------------------------------------------------
# Encoding: values, responses, and commands (the inverse of parse_command)


class Atom(str):
    """Emitted verbatim (flags, keywords, response item names)."""


@dataclass(frozen=True)
class Raw:
    """Already wire-encoded (e.g. ENVELOPE from node/imap/mime.py)."""

    data: bytes


@dataclass(frozen=True)
class Literal:
    """Always sent as a literal (message content)."""

    data: bytes


_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*")


def encode_string(value: str | bytes) -> bytes:
    """A quoted string if it can be one (short, 7-bit, no CR/LF), else a literal."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) <= 1024 and _QUOTABLE.fullmatch(data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def encode_utf8_string(value: str) -> bytes:
    """A UTF-8 quoted string (RFC 9051 §4.3 QUOTED-CHAR allows UTF8-2..4)
    when it can be one, else a literal: mailbox names after ENABLE IMAP4rev2."""
    data = value.encode("utf-8")
    if len(data) <= 1024 and not any(c in data for c in b"\r\n\x00"):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def _astring_text(value: str) -> str:
    data = value.encode("utf-8")
    if data and all(_is_astring_char(c) for c in data):
        return value
    return encode_string(data).decode("utf-8", "surrogateescape")


def encode_astring(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    if data and all(_is_astring_char(c) for c in data) and data.upper() != b"NIL":
        return data
    return encode_string(data)


def encode_value(value: Any) -> bytes:
    """None -> NIL, int -> number, Atom -> verbatim, str/bytes -> string,
    Literal -> literal, Raw -> verbatim, list/tuple -> parenthesized list."""
    if value is None:
        return b"NIL"
    if isinstance(value, bool):
        raise TypeError("bool is not an IMAP value")
    if isinstance(value, int):
        return str(value).encode("ascii")
    if isinstance(value, Atom):
        return value.encode("utf-8")
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, Literal):
        return b"{%d}\r\n" % len(value.data) + value.data
    if isinstance(value, str | bytes):
        return encode_string(value)
    if isinstance(value, list | tuple):
        return b"(" + b" ".join(encode_value(v) for v in value) + b")"
    raise TypeError(f"cannot encode {type(value).__name__}")


def untagged(*parts: Any) -> bytes:
    """`* part part ...` (RFC 3501 §7); str parts are sent verbatim."""
    return b"* " + b" ".join(_part(p) for p in parts) + b"\r\n"


def _part(p: Any) -> bytes:
    if isinstance(p, str) and not isinstance(p, Atom):
        return p.encode("utf-8")
    return encode_value(p)


def tagged(tag: str, status: str, text: str, code: str | None = None) -> bytes:
    """`tag OK|NO|BAD [code] text` (RFC 3501 §7.1)."""
    return _status_line(tag, status, text, code)


def status_untagged(status: str, text: str, code: str | None = None) -> bytes:
    return _status_line("*", status, text, code)


def _status_line(tag: str, status: str, text: str, code: str | None) -> bytes:
    text = text.replace("\r", " ").replace("\n", " ") or status
    body = f"[{code}] {text}" if code else text
    return f"{tag} {status} {body}\r\n".encode()


def continuation(text: str = "Ready") -> bytes:
    """`+ text` (RFC 3501 §7.5)."""
    return f"+ {text}\r\n".encode()


def encode_command(cmd: Command) -> bytes:
    """Command -> wire bytes, literals synchronizing (RFC 3501 §6)."""
    out = [cmd.tag.encode("ascii"), cmd.full_name.encode("ascii")]
    a = cmd.args
    mb = _mailbox_wire
    if cmd.name == "LOGIN":
        out += [encode_astring(a[0]), encode_astring(a[1].value)]
    elif cmd.name == "AUTHENTICATE":
        out.append(a[0].encode("ascii"))
        if a[1] is not None:
            out.append(a[1].encode("ascii"))
    elif cmd.name in ("SELECT", "EXAMINE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE"):
        out.append(mb(a[0]))
        out += [p.encode() for p in a[1:]]  # RFC 7162 select-params
    elif cmd.name == "RENAME":
        out += [mb(a[0]), mb(a[1])]
    elif cmd.name == "LSUB" or cmd.name == "LIST" and len(a) == 2:
        out += [encode_string(encode_mailbox(a[0])), encode_string(encode_mailbox(a[1]))]
    elif cmd.name == "STATUS":
        out += [mb(a[0]), b"(" + " ".join(a[1]).encode("ascii") + b")"]
    elif cmd.name == "APPEND":
        out.append(mb(a[0]))
        if a[1]:
            out.append(b"(" + " ".join(a[1]).encode("ascii") + b")")
        if a[2] is not None:
            out.append(b'"' + format_date_time(a[2]).encode("ascii") + b'"')
        out.append(b"{%d}\r\n" % len(a[3]) + a[3])
    elif cmd.name == "SEARCH":
        if len(a) > 2:  # RFC 4731 §3.1 search-return-opts
            out.append(b"RETURN (" + " ".join(a[2]).encode("ascii") + b")")
        if a[0] is not None:
            out += [b"CHARSET", encode_astring(a[0])]
        key: SearchKey = a[1]
        parts = key.args if key.op == "AND" else (key,)
        out += [encode_search_key(k) for k in parts]
    elif cmd.name in ("SORT", "THREAD"):  # RFC 5256 (node/imap/commands/searchext.py)
        from node.imap.commands.searchext import encode_args

        out += encode_args(cmd)
    elif cmd.name == "FETCH":
        out.append(a[0].encode().encode("ascii"))
        items = " ".join(i.encode() for i in a[1])
        out.append(b"(" + items.encode("utf-8", "surrogateescape") + b")")
        out += [m.encode() for m in a[2:]]  # RFC 7162 fetch-modifiers
    elif cmd.name == "STORE":
        prefix = {"set": "", "add": "+", "remove": "-"}[a[1]]
        out.append(a[0].encode().encode("ascii"))
        if len(a) > 4:
            out.append(b"(UNCHANGEDSINCE %d)" % a[4])  # RFC 7162 §3.1.3
        out.append(f"{prefix}FLAGS{'.SILENT' if a[2] else ''}".encode("ascii"))
        out.append(b"(" + " ".join(a[3]).encode("ascii") + b")")
    elif cmd.name == "COPY":
        out += [a[0].encode().encode("ascii"), mb(a[1])]
    elif cmd.name == "NOTIFY":
        out.append(a[0].encode())  # RFC 5465 (node/imap/notify.py NotifySpec)
    elif cmd.name == "EXPUNGE" and cmd.uid:
        out.append(a[0].encode().encode("ascii"))
    elif a:  # extension families (ENABLE, ID, MOVE, CREATE USE, LIST-EXTENDED, ...)
        from node.imap.commands.encode import encode_args

        out += encode_args(cmd)
    return b" ".join(out) + b"\r\n"


def _mailbox_wire(name: str) -> bytes:
    return encode_astring(encode_mailbox(name))


def encode_search_key(key: SearchKey) -> bytes:
    op, a = key.op, key.args
    if op == "AND":
        return b"(" + b" ".join(encode_search_key(k) for k in a) + b")"
    if op == "SEQ":
        return a[0].encode().encode("ascii")
    if op in PLAIN_KEYS:
        return op.encode("ascii")
    head = op.encode("ascii")
    if op in STRING_KEYS:
        return head + b" " + encode_astring(a[0])
    if op == "HEADER":
        return head + b" " + encode_astring(a[0]) + b" " + encode_astring(a[1])
    if op in DATE_KEYS:
        return head + b" " + format_date(a[0]).encode("ascii")
    if op in NUMBER_KEYS:
        return head + b" " + str(a[0]).encode("ascii")
    if op in FLAG_ARG_KEYS:
        return head + b" " + a[0].encode("ascii")
    if op == "UID":
        return head + b" " + a[0].encode().encode("ascii")
    if op == "MODSEQ":
        from node.imap.condstore_syntax import encode_search_modseq

        return encode_search_modseq(a)
    if op == "NOT":
        return head + b" " + encode_search_key(a[0])
    if op == "OR":
        return head + b" " + encode_search_key(a[0]) + b" " + encode_search_key(a[1])
    raise ValueError(op)


def frame_all(data: bytes, limits: Limits) -> list[Any]:
    """Frame and parse every complete command in data (tests, proxies).

    Returns Commands, ParseErrors, ContinuationRequests and other framer events
    in order; continuation requests are answered implicitly.
    """
    framer = Framer(limits)
    framer.receive(data)
    out: list[Any] = []
    while True:
        ev = framer.next_event()
        if ev is NEED_DATA:
            return out
        if isinstance(ev, FramedCommand):
            try:
                out.append(parse_command(ev, limits))
            except ParseError as exc:
                out.append(exc)
        else:
            out.append(ev)
        if isinstance(ev, FatalError):
            return out


__all__ = [
    "Atom",
    "Command",
    "ContinuationRequest",
    "FatalError",
    "FetchItem",
    "FramedCommand",
    "Framer",
    "Limits",
    "Literal",
    "LiteralTooLarge",
    "NEED_DATA",
    "ParseError",
    "Raw",
    "RawLine",
    "Secret",
    "SeqSet",
    "Section",
    "State",
]
