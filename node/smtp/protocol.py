"""Sans-I/O SMTP server core (RFC 5321, RFC 3030 CHUNKING, RFC 2920 PIPELINING).

Theory of operation
-------------------
Bytes from the peer go in with ``receive_data``; ``next_event`` hands out typed
events one at a time.  Every event except ``DataChunk`` must be answered with
exactly one ``respond(reply)`` before the next event is framed, so pipelined
commands (RFC 2920) are answered strictly in order, and a command is framed
only after the state its predecessor left is known (DATA accepted or not).

Framing comes before parsing: command lines are cut at LF with a cap of
``max_command_length`` octets (RFC 5321 §4.5.3.1.4) and must end in CRLF;
DATA text lines are capped at ``max_line_length`` (§4.5.3.1.6).

DATA ends only at CRLF "." CRLF (§4.1.1.4).  A bare LF or bare CR never ends
DATA (SMTP smuggling, CVE-2023-51764 class): a line terminated by a bare LF
is kept as message text, with the LF normalised to CRLF, and the line after it
is not a candidate for the end marker ("\\n.\\n", "\\r\\n.\\n" and "\\n.\\r\\n" are
all plain text).  Dot-unstuffing follows §4.5.2.

BDAT chunks (RFC 3030 §2) are consumed by exact octet count, even when the
command is out of sequence, so the stream never desynchronises.  After a
STARTTLS command (RFC 3207 §4.2) everything already buffered is discarded and
reported on the event, so the server drops it before the handshake.

AUTH (RFC 4954) exists only when the core is built with ``auth=True`` (the
submission role); otherwise it is 502.  After a 334 reply the next line is a
SASL response, framed as ``AuthResponse`` (cap ``MAX_AUTH_LINE``, §4), until
the session answers with anything but 334.  The exchange is a sub-mode of
READY (``in_sasl``), not a state of its own: no command is legal inside it.

The message size cap is enforced while streaming: once the running size of a
transaction exceeds ``max_message_size`` no more ``DataChunk`` events are
produced; the end event carries the 552 5.3.4 hint.

This module imports nothing from gevent, socket, ssl, storage or cluster.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from node.smtp import replies as R
from node.smtp.replies import Reply


class State(enum.Enum):
    START = "start"  # greeted; no EHLO/HELO yet
    READY = "ready"  # EHLO/HELO done, no mail transaction
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    CHUNKING = "chunking"  # BDAT chunk(s) accepted, LAST not yet seen (RFC 3030)
    DATA = "data"  # reading DATA text after 354
    BDAT = "bdat"  # reading the octets of one BDAT chunk
    TLS = "tls"  # 220 to STARTTLS sent; the server does the handshake now
    CLOSED = "closed"


class SmtpProtocolError(Exception):
    """Base of the core's own errors."""


class LocalProtocolError(SmtpProtocolError):
    """The caller misused the core (e.g. responded with no event pending)."""


@dataclass(frozen=True)
class Command:
    """A complete, legal-in-this-state command line: VERB and the rest."""

    verb: str  # upper-case
    args: str  # text after the verb and one or more spaces; "" if none
    discarded: bytes = b""  # STARTTLS only: pipelined bytes dropped (RFC 3207 §4.2)


@dataclass(frozen=True)
class ProtocolViolation:
    """The peer broke the protocol; ``reply`` is the hint. ``fatal`` closes."""

    reply: Reply
    reason: str  # for the log only
    fatal: bool = False


@dataclass(frozen=True)
class AuthResponse:
    """One SASL response line (base64 or "*"), without its CRLF (RFC 4954 §4)."""

    line: bytes


@dataclass(frozen=True)
class DataChunk:
    """Message octets (DATA: unstuffed, CRLF-normalised; BDAT: verbatim)."""

    data: bytes


@dataclass(frozen=True)
class DataEnd:
    """CRLF.CRLF seen.  ``error`` is set when the message must be refused."""

    size: int  # octets of message text after unstuffing
    error: Reply | None = None


@dataclass(frozen=True)
class BdatEnd:
    """All octets of one BDAT chunk consumed (RFC 3030 §2)."""

    chunk_size: int
    last: bool
    total: int  # octets of the transaction so far
    error: Reply | None = None  # size exceeded or out of sequence
    in_sequence: bool = True


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes
PAUSED = _Sentinel("PAUSED")  # respond to the pending event first

Event = Command | ProtocolViolation | AuthResponse | DataChunk | DataEnd | BdatEnd

MAX_AUTH_LINE = 12288  # octets an AUTH command or SASL response line may take (RFC 4954 §4)

KNOWN_VERBS = frozenset(
    {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY",
     "EXPN", "HELP", "STARTTLS", "AUTH"}
)
# Verbs of RFC 5321 / extensions we know but do not offer (AUTH: not on the MX role).
UNIMPLEMENTED_VERBS = frozenset({"TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML", "VERB"})

_COMMON = frozenset({"EHLO", "HELO", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP"})

# Which command is legal in which state (RFC 5321 §4.1.4, RFC 3030 §2, RFC 3207 §4).
ALLOWED: dict[State, frozenset[str]] = {
    State.START: _COMMON | {"STARTTLS"},
    State.READY: _COMMON | {"STARTTLS", "MAIL", "AUTH"},  # AUTH: RFC 4954 §4, not in a txn
    State.MAIL: _COMMON | {"RCPT"},
    State.RCPT: _COMMON | {"RCPT", "DATA", "BDAT"},
    State.CHUNKING: _COMMON | {"BDAT"},
    State.DATA: frozenset(),
    State.BDAT: frozenset(),
    State.TLS: frozenset(),
    State.CLOSED: frozenset(),
}

# State after a positive reply to a command; absent verbs keep the state.
_AFTER_POSITIVE: dict[str, State] = {
    "EHLO": State.READY,
    "HELO": State.READY,
    "MAIL": State.MAIL,
    "RCPT": State.RCPT,
    "DATA": State.DATA,
    "RSET": State.READY,
    "QUIT": State.CLOSED,
    "STARTTLS": State.TLS,
}

_BDAT_RE = re.compile(r"([0-9]{1,20})(?: +(LAST))? *", re.IGNORECASE)


def sequence_error(state: State, verb: str) -> Reply:
    """The reply hint for a verb that is not legal in ``state``."""
    if state is State.START and verb in ("MAIL", "RCPT", "DATA", "BDAT"):
        return R.NEED_EHLO if verb == "MAIL" else R.NEED_MAIL
    if verb == "MAIL":
        return R.NESTED_MAIL
    if verb in ("RCPT",) or (verb in ("DATA", "BDAT") and state is State.READY):
        return R.NEED_MAIL
    if verb in ("DATA", "BDAT") and state is State.MAIL:
        return R.NEED_RCPT
    if verb == "DATA" and state is State.CHUNKING:
        return R.DATA_AFTER_BDAT
    return R.BAD_SEQUENCE


@dataclass
class _Data:
    """Incremental state of one DATA body."""

    prev_crlf: bool = True  # the previous line ended in CRLF (the DATA line did)
    skipping: bool = False  # inside an over-long line: drop until LF
    last_was_cr: bool = False  # last dropped octet was CR (for the skipped line's end)
    size: int = 0
    too_long: bool = False
    too_big: bool = False
    ended: bool = False


@dataclass
class SmtpCore:
    """The server side of one SMTP connection, without I/O."""

    max_command_length: int = 512
    max_line_length: int = 1000
    max_message_size: int = 50 * 1024 * 1024
    auth: bool = False  # offer AUTH (RFC 4954): the submission role
    state: State = State.START
    in_sasl: bool = False  # READY, 334 sent: the next line is a SASL response
    _buf: bytearray = field(default_factory=bytearray)
    _pending: Event | None = None
    _skipping_command: bool = False
    _data: _Data | None = None
    _bdat_remaining: int = 0
    _bdat_last: bool = False
    _bdat_size: int = 0
    _bdat_in_sequence: bool = True
    _bdat_before: State = State.START
    _txn_size: int = 0
    _txn_too_big: bool = False

    # -- input ------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Buffer peer bytes.  Ignored once closed or while TLS is pending."""
        if self.state in (State.CLOSED, State.TLS):
            return
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_event(self) -> Event | _Sentinel:
        """The next event, NEED_DATA, or PAUSED while a reply is owed."""
        if self._pending is not None:
            return PAUSED
        if self.state in (State.CLOSED, State.TLS):
            return NEED_DATA
        if self.state is State.DATA:
            return self._next_data()
        if self.state is State.BDAT:
            return self._next_bdat()
        if self.in_sasl:
            return self._next_auth_line()
        return self._next_command()

    def _next_auth_line(self) -> Event | _Sentinel:
        nl = self._buf.find(b"\n", 0, MAX_AUTH_LINE)
        if nl < 0:
            if len(self._buf) >= MAX_AUTH_LINE:
                # Cannot resynchronise cheaply with a client that sends this: close.
                return self._pend(
                    ProtocolViolation(R.LINE_TOO_LONG, "SASL response too long", fatal=True)
                )
            return NEED_DATA
        line = bytes(self._buf[: nl + 1])
        del self._buf[: nl + 1]
        if not line.endswith(b"\r\n"):
            return self._pend(ProtocolViolation(R.BARE_LF, "SASL response ended by bare LF"))
        return self._pend(AuthResponse(line[:-2]))

    # -- commands -----------------------------------------------------------
    def _next_command(self) -> Event | _Sentinel:
        limit = self.max_command_length
        if self.auth and bytes(self._buf[:5]).upper() == b"AUTH ":
            limit = max(limit, MAX_AUTH_LINE)  # RFC 4954 §4: initial responses are long
        while True:
            if self._skipping_command:
                nl = self._buf.find(b"\n")
                if nl < 0:
                    self._buf.clear()  # frame before parsing: never buffer past the cap
                    return NEED_DATA
                del self._buf[: nl + 1]
                self._skipping_command = False
                return self._pend(ProtocolViolation(R.LINE_TOO_LONG, "command line too long"))
            nl = self._buf.find(b"\n", 0, limit)
            if nl < 0:
                if len(self._buf) >= limit:
                    self._skipping_command = True
                    continue
                return NEED_DATA
            line = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            event = self._parse_command(line)
            if event is None:  # a BDAT command: its octets follow at once
                return self._next_bdat()
            return self._pend(event)

    def _parse_command(self, line: bytes) -> Event | None:
        if not line.endswith(b"\r\n"):
            return ProtocolViolation(R.BARE_LF, "command ended by bare LF")
        body = line[:-2]
        if b"\r" in body or b"\0" in body:
            return ProtocolViolation(R.SYNTAX_ERROR, "CR or NUL inside command")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return ProtocolViolation(R.SYNTAX_ERROR, "command not UTF-8")
        verb, _, args = text.partition(" ")
        verb = verb.upper()
        args = args.lstrip(" ")
        if verb == "BDAT":
            return self._start_bdat(args)
        if verb not in KNOWN_VERBS or (verb == "AUTH" and not self.auth):
            if verb in UNIMPLEMENTED_VERBS or verb == "AUTH":
                return ProtocolViolation(R.NOT_IMPLEMENTED, f"unimplemented {verb}")
            return ProtocolViolation(R.SYNTAX_ERROR, "unknown command")
        if verb not in ALLOWED[self.state]:
            return ProtocolViolation(sequence_error(self.state, verb), f"{verb} in {self.state.value}")
        if verb == "STARTTLS":
            # RFC 3207 §4.2: nothing pipelined after STARTTLS may be acted on.
            dropped = bytes(self._buf)
            self._buf.clear()
            return Command(verb, args, discarded=dropped)
        return Command(verb, args)

    def _start_bdat(self, args: str) -> Event | None:
        m = _BDAT_RE.fullmatch(args)
        if m is None:
            # Without a size the chunk's end is unknown: the stream cannot be resynchronised.
            return ProtocolViolation(R.BAD_BDAT, "BDAT without a valid size", fatal=True)
        size = int(m.group(1))
        if size > self.max_message_size:
            return ProtocolViolation(R.MESSAGE_TOO_BIG, "BDAT chunk over the size cap", fatal=True)
        self._bdat_in_sequence = "BDAT" in ALLOWED[self.state]
        if self._bdat_in_sequence and self._txn_size + size > self.max_message_size:
            self._txn_too_big = True  # decided per chunk, so no partial chunk is passed on
        self._bdat_before = self.state
        self._bdat_remaining = size
        self._bdat_size = size
        self._bdat_last = m.group(2) is not None
        self.state = State.BDAT
        return None

    # -- BDAT ---------------------------------------------------------------
    def _next_bdat(self) -> Event | _Sentinel:
        if self._bdat_remaining:
            if not self._buf:
                return NEED_DATA
            take = min(self._bdat_remaining, len(self._buf))
            chunk = bytes(self._buf[:take])
            del self._buf[:take]
            self._bdat_remaining -= take
            if self._bdat_in_sequence and not self._txn_too_big:
                self._txn_size += take
                return DataChunk(chunk)
            if self._bdat_remaining:
                return NEED_DATA
        if not self._bdat_in_sequence:
            error: Reply | None = sequence_error(self._bdat_before, "BDAT")
        else:
            error = R.MESSAGE_TOO_BIG if self._txn_too_big else None
        self.state = self._bdat_before
        return self._pend(
            BdatEnd(
                self._bdat_size,
                self._bdat_last,
                self._txn_size,
                error,
                self._bdat_in_sequence,
            )
        )

    # -- DATA ---------------------------------------------------------------
    def _next_data(self) -> Event | _Sentinel:
        d = self._data
        assert d is not None
        if d.ended:
            self._data = None
            error = R.LINE_TOO_LONG if d.too_long else R.MESSAGE_TOO_BIG if d.too_big else None
            return self._pend(DataEnd(d.size, error))
        out = bytearray()
        cap = self.max_line_length
        fast = self._fast_block(d)
        if fast:
            return DataChunk(fast)
        while not d.ended:
            if d.skipping:
                nl = self._buf.find(b"\n")
                if nl < 0:
                    if self._buf:
                        d.last_was_cr = self._buf[-1:] == b"\r"
                    self._buf.clear()
                    break
                d.prev_crlf = self._buf[nl - 1 : nl] == b"\r" if nl else d.last_was_cr
                del self._buf[: nl + 1]
                d.skipping = False
                continue
            nl = self._buf.find(b"\n", 0, cap)
            if nl < 0:
                if len(self._buf) >= cap:
                    d.too_long = True
                    d.skipping = True
                    continue
                break
            line = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            crlf = line.endswith(b"\r\n")
            content = line[:-2] if crlf else line[:-1]
            if crlf and d.prev_crlf and content == b".":
                d.ended = True  # RFC 5321 §4.1.1.4: only CRLF "." CRLF
                break
            if d.prev_crlf and len(content) > 1 and content[:1] == b".":
                content = content[1:]  # §4.5.2 transparency
            d.prev_crlf = crlf
            piece = content + b"\r\n"  # bare LF normalised; bare CR kept as text
            d.size += len(piece)
            if d.too_long or d.too_big:
                continue
            if d.size > self.max_message_size:
                d.too_big = True
                continue
            out += piece
        if out:
            return DataChunk(bytes(out))
        if d.ended:
            return self._next_data()
        return NEED_DATA

    def _fast_block(self, d: _Data) -> bytes:
        """All complete lines in the buffer at once, when none needs attention.

        Plain case only: every line CRLF-terminated, within the line cap, no
        line starting with "." (so no unstuffing and no end marker), and the
        size cap not reached.  The lines before the first one that starts
        with "." (usually the end marker) still qualify; that line and
        anything else go line by line.
        """
        if d.skipping or d.too_long or d.too_big or not d.prev_crlf:
            return b""
        last = self._buf.rfind(b"\n")
        if last < 0 or self._buf[:1] == b".":
            return b""
        block = bytes(self._buf[: last + 1])
        dot = block.find(b"\n.")
        if dot >= 0:
            block = block[: dot + 1]
        if (
            block.count(b"\n") != block.count(b"\r\n")
            or d.size + len(block) > self.max_message_size
            or self._long_line(block)
        ):
            return b""
        del self._buf[: len(block)]
        d.size += len(block)
        return block

    def _long_line(self, block: bytes) -> bool:
        # Lines incl. CRLF longer than the cap: content of cap octets or more before LF.
        return max(map(len, block.split(b"\n"))) >= self.max_line_length

    # -- output -------------------------------------------------------------
    def _pend(self, event: Event) -> Event:
        self._pending = event
        return event

    def respond(self, reply: Reply) -> bytes:
        """Answer the pending event; applies the state change; returns wire bytes.

        Raises LocalProtocolError when no event is waiting for a reply.
        """
        event = self._pending
        if event is None:
            raise LocalProtocolError("respond() without a pending event")
        self._pending = None
        if isinstance(event, Command | AuthResponse) and reply.code == 334:
            self.in_sasl = True  # RFC 4954 §4: a SASL response line comes next
        elif isinstance(event, AuthResponse) or (
            isinstance(event, ProtocolViolation) and self.in_sasl
        ):
            self.in_sasl = False  # the exchange ended (235, 535, 501, ...)
            if isinstance(event, ProtocolViolation) and event.fatal:
                self.state = State.CLOSED
        elif isinstance(event, Command):
            if reply.positive:
                new = _AFTER_POSITIVE.get(event.verb)
                if event.verb == "RSET" and self.state is State.START:
                    new = State.START
                if new is not None:
                    self.state = new
                if event.verb == "DATA":
                    self._data = _Data()
            if event.verb in ("EHLO", "HELO", "RSET", "MAIL") and reply.positive:
                self._reset_txn()
        elif isinstance(event, DataEnd):
            self.state = State.READY
            self._reset_txn()
        elif isinstance(event, BdatEnd):
            if event.in_sequence:
                if reply.positive and not event.last:
                    self.state = State.CHUNKING
                else:
                    self.state = State.READY
                    self._reset_txn()
        elif isinstance(event, ProtocolViolation) and event.fatal:
            self.state = State.CLOSED
        if reply.closes:
            self.state = State.CLOSED
        if self.state is State.CLOSED:
            self._buf.clear()
        return reply.encode()

    def _reset_txn(self) -> None:
        self._txn_size = 0
        self._txn_too_big = False

    def close(self) -> None:
        """The session decided to end (e.g. too many errors): ignore further input."""
        self._pending = None
        self._buf.clear()
        self.in_sasl = False
        self.state = State.CLOSED

    def tls_established(self) -> None:
        """After a successful handshake the session restarts (RFC 3207 §4.2)."""
        if self.state is not State.TLS:
            raise LocalProtocolError("tls_established() outside the TLS state")
        self._buf.clear()
        self._reset_txn()
        self.state = State.START
