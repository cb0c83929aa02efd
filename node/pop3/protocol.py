"""POP3 sans-I/O core (RFC 1939, RFC 2449, RFC 2595, RFC 5034, RFC 3206).

Theory of operation: bytes from the peer go into `Pop3Connection.receive_data`;
`next_event()` frames one line (capped at `max_line_length` octets including
CRLF, RFC 2449 §4) before any grammar is applied, then returns a `Command`
legal in the current state, a SASL client response while an AUTH exchange is
open (RFC 5034 §4), a `BadInput` carrying the `-ERR` reply the peer earned, or
`NEED_DATA`.  Which command is legal in which state is the `LEGAL` table;
anything not in it is an error.  The session (policy) moves the state with
`transition()`; a move not in `TRANSITIONS` is our bug (`LocalProtocolError`).

Replies are typed (`Reply`, `RespCode`) and encoded here; multi-line bodies
are dot-stuffed incrementally by `DotStuffer` (RFC 1939 §3) so a message can
be streamed in chunks and is byte-identical after un-stuffing.  This module
imports nothing from gevent, socket, ssl, storage or cluster.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


class State(enum.Enum):
    """RFC 1939 §3 session states, plus DONE once the session is over."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    DONE = "DONE"


class LocalProtocolError(Exception):
    """We misused the core (a bug in the session), never the peer's fault."""


class RespCode(enum.Enum):
    """Extended response codes (RFC 2449 §8, RFC 3206)."""

    IN_USE = "IN-USE"  # RFC 2449 §8.1.1: maildrop locked by another session
    LOGIN_DELAY = "LOGIN-DELAY"  # RFC 2449 §8.1.2
    SYS_TEMP = "SYS/TEMP"  # RFC 3206 §4: temporary system problem
    SYS_PERM = "SYS/PERM"  # RFC 3206 §4: permanent system problem
    AUTH = "AUTH"  # RFC 3206 §5: credentials problem


@dataclass(frozen=True)
class Reply:
    """One status line: `+OK text` or `-ERR [CODE] text` (RFC 1939 §3)."""

    ok: bool
    text: str
    code: RespCode | None = None

    def encode(self) -> bytes:
        status = "+OK" if self.ok else "-ERR"
        code = f" [{self.code.value}]" if self.code else ""
        text = f" {self.text}" if self.text else ""
        # Reply text is ours, but never let a CR/LF split the line.
        line = f"{status}{code}{text}".replace("\r", " ").replace("\n", " ")
        return line.encode("utf-8") + b"\r\n"

    @property
    def temporary(self) -> bool:
        """Whether retrying later may succeed (RFC 3206 SYS/TEMP, IN-USE)."""
        return self.code in (RespCode.SYS_TEMP, RespCode.IN_USE, RespCode.LOGIN_DELAY)


def ok(text: str = "") -> Reply:
    return Reply(True, text)


def err(text: str, code: RespCode | None = None) -> Reply:
    return Reply(False, text, code)


# Replies the core itself produces for bad peer input.
ERR_LINE_TOO_LONG = err("line too long")  # RFC 2449 §4
ERR_EMPTY = err("empty command")
ERR_UNKNOWN = err("unknown command")
ERR_BAD_STATE = err("command not valid in this state")
ERR_SYNTAX = err("syntax error in arguments")
ERR_NOT_UTF8 = err("command is not valid UTF-8")

# SASL continuation with an empty challenge (RFC 5034 §4: "+" SP base64).
SASL_CONTINUE = b"+ \r\n"


@dataclass(frozen=True)
class Command:
    """One command line: upper-cased keyword and its arguments."""

    name: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class SaslResponse:
    """A client response line during AUTH (still base64, RFC 5034 §4)."""

    data: bytes


@dataclass(frozen=True)
class SaslCancel:
    """The client sent "*" to cancel the exchange (RFC 5034 §4)."""


@dataclass(frozen=True)
class BadInput:
    """The peer broke the protocol; send `reply`, the state is unchanged."""

    reply: Reply


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

Event = Command | SaslResponse | SaslCancel | BadInput


@dataclass(frozen=True)
class Syntax:
    """Argument count of a command; `rest` keeps the remainder as one argument."""

    min_args: int
    max_args: int
    rest: bool = False  # PASS: spaces belong to the password (RFC 1939 §7)


COMMANDS: dict[str, Syntax] = {
    "USER": Syntax(1, 1, rest=True),  # RFC 1939 §7
    "PASS": Syntax(1, 1, rest=True),  # RFC 1939 §7
    "AUTH": Syntax(0, 2),  # RFC 5034 §4 (no argument: list mechanisms)
    "STLS": Syntax(0, 0),  # RFC 2595 §4
    "CAPA": Syntax(0, 0),  # RFC 2449 §5
    "QUIT": Syntax(0, 0),  # RFC 1939 §4, §6
    "STAT": Syntax(0, 0),  # RFC 1939 §5
    "LIST": Syntax(0, 1),
    "RETR": Syntax(1, 1),
    "DELE": Syntax(1, 1),
    "NOOP": Syntax(0, 0),
    "RSET": Syntax(0, 0),
    "TOP": Syntax(2, 2),  # RFC 1939 §7
    "UIDL": Syntax(0, 1),  # RFC 1939 §7
}

# Which command is legal in which state (RFC 1939 §4-§6, RFC 2449 §5: CAPA in
# AUTHORIZATION and TRANSACTION; RFC 2595 §4: STLS only in AUTHORIZATION).
LEGAL: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset({"USER", "PASS", "AUTH", "STLS", "CAPA", "QUIT"}),
    State.TRANSACTION: frozenset(
        {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "CAPA", "QUIT"}
    ),
    State.UPDATE: frozenset(),
    State.DONE: frozenset(),
}

TRANSITIONS: dict[State, frozenset[State]] = {
    State.AUTHORIZATION: frozenset({State.TRANSACTION, State.DONE}),
    State.TRANSACTION: frozenset({State.UPDATE, State.DONE}),
    State.UPDATE: frozenset({State.DONE}),
    State.DONE: frozenset(),
}


def parse_command(line: bytes, state: State) -> Command | BadInput:
    """Parse one line (without its line ending) legal in `state`."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return BadInput(ERR_NOT_UTF8)
    keyword, _, rest = text.partition(" ")
    name = keyword.upper()
    if not name.strip():
        return BadInput(ERR_EMPTY)
    syntax = COMMANDS.get(name) if keyword.isascii() else None  # "\u017ftat" is not STAT
    if syntax is None:
        return BadInput(ERR_UNKNOWN)
    if name not in LEGAL[state]:
        return BadInput(ERR_BAD_STATE)
    if syntax.rest:
        args: tuple[str, ...] = (rest,) if rest else ()
    else:
        args = tuple(rest.split(" ")) if rest else ()
        if any(not a for a in args):  # doubled, leading or trailing space
            args = tuple(a for a in args if a)
    if not syntax.min_args <= len(args) <= syntax.max_args:
        return BadInput(ERR_SYNTAX)
    if any(not a.isprintable() for a in args) and name not in ("PASS",):
        return BadInput(ERR_SYNTAX)
    return Command(name, args)


class Pop3Connection:
    """Server side of one POP3 conversation, without I/O.

    Feed bytes with `receive_data`; pull events with `next_event` until it
    returns NEED_DATA.  Lines longer than `max_line_length` octets (CRLF
    included) give one `BadInput(ERR_LINE_TOO_LONG)` and are discarded up to
    their end, whatever way the bytes were split.
    """

    def __init__(self, max_line_length: int = 512) -> None:
        if max_line_length < 8:
            raise LocalProtocolError("max_line_length too small")
        self.max_line_length = max_line_length
        self.state = State.AUTHORIZATION
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already known to hold no LF
        self._discarding = False  # inside an over-long line
        self._sasl = False  # the next line is a SASL client response

    def transition(self, new: State) -> None:
        """Move to `new`; raises LocalProtocolError for a move RFC 1939 lacks."""
        if new not in TRANSITIONS[self.state]:
            raise LocalProtocolError(f"{self.state.value} -> {new.value}")
        self.state = new
        if new is not State.AUTHORIZATION:
            self._sasl = False

    def expect_sasl_response(self) -> None:
        """The session sent a `+ ` continuation: the next line is not a command."""
        if self.state is not State.AUTHORIZATION:
            raise LocalProtocolError("SASL exchange outside AUTHORIZATION")
        self._sasl = True

    @property
    def in_sasl(self) -> bool:
        return self._sasl

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def discard_input(self) -> bytes:
        """Drop buffered input (after STLS, RFC 2595 §4); returns what was dropped."""
        dropped = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        self._discarding = False
        return dropped

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_event(self) -> Event | _NeedData:
        while True:
            nl = self._buf.find(b"\n", self._scan)
            if nl < 0:
                if self._discarding:
                    self._buf.clear()
                    self._scan = 0
                    return NEED_DATA
                if len(self._buf) >= self.max_line_length:
                    # No line ending within the cap: the line is too long.
                    self._buf.clear()
                    self._scan = 0
                    self._discarding = True
                    self._sasl = False
                    return BadInput(ERR_LINE_TOO_LONG)
                self._scan = len(self._buf)
                return NEED_DATA
            raw = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            self._scan = 0
            if self._discarding:
                self._discarding = False
                continue
            if len(raw) > self.max_line_length:
                self._sasl = False
                return BadInput(ERR_LINE_TOO_LONG)
            line = raw[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._sasl:
                self._sasl = False
                if line == b"*":
                    return SaslCancel()
                return SaslResponse(line)
            return parse_command(line, self.state)


# ---------------------------------------------------------------- multi-line


class DotStuffer:
    """Incremental byte-stuffing of a multi-line body (RFC 1939 §3).

    A "." is doubled at the start of the body and after every LF, so clients
    that split on LF and clients that split on CRLF both see the body intact
    and find the terminator only where we put it.  The body bytes are otherwise
    sent exactly as given; `finish()` adds CRLF if the body does not end with
    one, then the terminating ".CRLF".
    """

    def __init__(self) -> None:
        self._line_start = True
        self._tail = b"\r\n"  # last two bytes sent; an empty body needs no CRLF

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if self._line_start and chunk[:1] == b".":
            out = b"." + out
        self._line_start = chunk.endswith(b"\n")
        self._tail = (self._tail + chunk)[-2:]
        return out

    def finish(self) -> bytes:
        end = b"" if self._tail == b"\r\n" else b"\r\n"
        self._line_start = True
        self._tail = b"\r\n"
        return end + b".\r\n"


def multiline(first: Reply, body: Iterable[bytes], chunk_size: int = 64 * 1024) -> Iterator[bytes]:
    """Encode a multi-line response lazily: status line, stuffed chunks, ".".

    Each piece of `body` is sliced into at most `chunk_size` octets, so a large
    message is never copied whole a second time.
    """
    if not first.ok:
        raise LocalProtocolError("a multi-line response starts with +OK")
    yield first.encode()
    stuffer = DotStuffer()
    for piece in body:
        view = memoryview(piece)
        for start in range(0, len(view), chunk_size):
            out = stuffer.feed(bytes(view[start : start + chunk_size]))
            if out:
                yield out
    yield stuffer.finish()


def lines_body(lines: Iterable[str]) -> Iterator[bytes]:
    """Text lines (LIST, UIDL, CAPA) as CRLF-terminated bytes."""
    for line in lines:
        yield line.encode("utf-8") + b"\r\n"


def unstuff(data: bytes) -> bytes:
    """Inverse of the stuffing of a complete multi-line body, terminator included.

    Raises ValueError if `data` does not end with the terminator.
    """
    if data == b".\r\n":
        return b""
    if not data.endswith(b"\n.\r\n"):
        raise ValueError("no multi-line terminator")
    body = data[:-3]
    if body.startswith(b"."):
        body = body[1:]
    return body.replace(b"\n..", b"\n.")


def top_of_message(raw: bytes, lines: int) -> bytes:
    """Header section, the blank line and the first `lines` body lines (RFC 1939 §7 TOP)."""
    pos = 0
    size = len(raw)
    while pos < size:  # find the end of the header section: the first empty line
        nl = raw.find(b"\n", pos)
        if nl < 0:
            return raw  # no body at all
        line_is_empty = nl == pos or (nl == pos + 1 and raw[pos] == 0x0D)
        pos = nl + 1
        if line_is_empty:
            break
    for _ in range(lines):
        if pos >= size:
            break
        nl = raw.find(b"\n", pos)
        pos = size if nl < 0 else nl + 1
    return raw[:pos]


def parse_number(arg: str) -> int | None:
    """A message number or line count: ASCII digits only, at most 10 of them."""
    if not arg or len(arg) > 10 or not arg.isascii() or not arg.isdigit():
        return None
    return int(arg)
