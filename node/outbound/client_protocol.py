"""Sans-I/O core of the outbound SMTP client (RFC 5321 client side).

Theory of operation: the transport (node/outbound/client.py) reads bytes and
feeds them to a ``ReplyParser``, which returns whole replies (multiline ones
joined, RFC 5321 §4.2.1).  The EHLO reply becomes ``Extensions`` (RFC 5321
§4.1.1.1, keywords case-insensitive).  ``check_transaction`` decides, before
a single byte of the message is sent, whether the next hop can take it at
all (SIZE, 8BITMIME, SMTPUTF8, REQUIRETLS); ``mail_command`` and
``rcpt_command`` build the envelope with only the parameters the server
advertised; ``dot_stuff`` and ``bdat_chunks`` frame the body for DATA
(§4.5.2) or BDAT (RFC 3030).  Nothing here touches sockets, gevent or
storage.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

MAX_REPLY_LINE = 4096  # octets; RFC 5321 §4.5.3.1.5 says 512, servers exceed it
MAX_REPLY_LINES = 256  # lines of one multiline reply
BDAT_CHUNK = 1024 * 1024  # octets per BDAT chunk (RFC 3030 §2)

DELIVERED, FAILED, PENDING = "delivered", "failed", "pending"

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


class ReplyError(Exception):
    """The server broke the reply grammar (RFC 5321 §4.2); close the connection."""


@dataclass(frozen=True)
class Reply:
    """One server reply; ``lines`` are the texts without code and separator."""

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str | None:
        """The RFC 2034 enhanced status code of the first line, if it matches the class."""
        m = _ENHANCED.match(self.lines[0] if self.lines else "")
        if m and m.group(1) == str(self.code)[0]:
            return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        return None

    @property
    def text(self) -> str:
        """All lines, enhanced codes stripped, joined by a space (for logs and DSNs)."""
        out = []
        for line in self.lines:
            m = _ENHANCED.match(line)
            out.append(line[m.end():] if m else line)
        return " ".join(part for part in out if part)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        enhanced = self.enhanced
        return f"{self.code} {enhanced + ' ' if enhanced else ''}{self.text}".rstrip()


class ReplyParser:
    """Bytes in, whole replies out; works for any split of the input.

    Lines end in CRLF (a bare LF is tolerated, as servers in the wild send
    it).  A line longer than MAX_REPLY_LINE, a reply of more than
    MAX_REPLY_LINES, a bad code or a code that changes inside a multiline
    reply raise ReplyError.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._code: int | None = None
        self._lines: list[str] = []

    def feed(self, data: bytes) -> list[Reply]:
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
        lines = data.split(b"\n")  # one split per read, not a find per line
        rest = lines.pop()
        replies: list[Reply] = []
        for raw in lines:
            if len(raw) > MAX_REPLY_LINE:
                raise ReplyError("reply line too long")
            reply = self._line(raw.rstrip(b"\r").decode("utf-8", "replace"))
            if reply is not None:
                replies.append(reply)
        if len(rest) > MAX_REPLY_LINE:
            raise ReplyError("reply line too long")
        self._buf = bytearray(rest)
        return replies

    @property
    def pending(self) -> bool:
        """True when part of a reply has been read."""
        return bool(self._buf) or self._code is not None

    def _line(self, line: str) -> Reply | None:
        if len(line) < 3 or not line[:3].isdigit() or line[0] not in "12345":
            raise ReplyError(f"bad reply line {line[:40]!r}")
        if len(line) > 3 and line[3] not in " -":
            raise ReplyError(f"bad reply separator {line[:40]!r}")
        code = int(line[:3])
        if self._code is not None and code != self._code:
            raise ReplyError("reply code changed inside a multiline reply")
        self._code = code
        self._lines.append(line[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            raise ReplyError("multiline reply too long")
        if len(line) > 3 and line[3] == "-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._code, self._lines = None, []
        return reply


@dataclass(frozen=True)
class Extensions:
    """Service extensions from an EHLO reply (RFC 5321 §4.1.1.1).

    ``keywords`` maps the upper-cased keyword to its parameter string.
    After HELO (no EHLO) it is empty: plain RFC 5321, no parameters at all.
    """

    keywords: dict[str, str] = field(default_factory=dict)
    esmtp: bool = True

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Extensions:
        keywords: dict[str, str] = {}
        for line in reply.lines[1:]:  # the first line is the greeting
            parts = line.strip().split(None, 1)
            if parts:
                keywords[parts[0].upper()] = parts[1] if len(parts) > 1 else ""
        return cls(keywords)

    @classmethod
    def helo(cls) -> Extensions:
        return cls({}, esmtp=False)

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @property
    def size_limit(self) -> int | None:
        """RFC 1870 §4: 'SIZE n' (0 or absent number: no fixed limit)."""
        if "SIZE" not in self.keywords:
            return None
        value = self.keywords["SIZE"].strip()
        return int(value) if value.isdigit() and int(value) > 0 else None

    # Keywords are stored upper-cased: plain membership tests (several per message).
    pipelining = property(lambda self: "PIPELINING" in self.keywords)  # RFC 2920
    starttls = property(lambda self: "STARTTLS" in self.keywords)  # RFC 3207
    eightbitmime = property(lambda self: "8BITMIME" in self.keywords)  # RFC 6152
    smtputf8 = property(lambda self: "SMTPUTF8" in self.keywords)  # RFC 6531
    chunking = property(lambda self: "CHUNKING" in self.keywords)  # RFC 3030
    binarymime = property(lambda self: "BINARYMIME" in self.keywords)  # RFC 3030 §3
    dsn = property(lambda self: "DSN" in self.keywords)  # RFC 3461
    requiretls = property(lambda self: "REQUIRETLS" in self.keywords)  # RFC 8689


@dataclass(frozen=True)
class Recipient:
    address: str
    notify: tuple[str, ...] = ()  # RFC 3461 §4.1, upper-case
    orcpt: str | None = None  # "type;address" (address not xtext-encoded)


@dataclass(frozen=True)
class Envelope:
    """What one transaction sends; built from a queue entry by the runner."""

    sender: str
    recipients: tuple[Recipient, ...]
    size: int
    body: str = "7BIT"  # "7BIT" | "8BITMIME" | "BINARYMIME"
    smtputf8: bool = False
    requiretls: bool = False
    envid: str | None = None
    ret: str | None = None


@dataclass(frozen=True)
class Outcome:
    """Result for one recipient (or the whole transaction) and who said it."""

    state: str  # DELIVERED | FAILED | PENDING
    code: int | None
    enhanced: str | None
    text: str

    @classmethod
    def from_reply(cls, reply: Reply, *, positive_state: str = DELIVERED) -> Outcome:
        if reply.positive:
            state = positive_state
        elif reply.permanent:
            state = FAILED
        else:
            state = PENDING
        return cls(state, reply.code, reply.enhanced, reply.text)

    @property
    def permanent(self) -> bool:
        return self.state == FAILED

    def __str__(self) -> str:
        code = f"{self.code} " if self.code is not None else ""
        enhanced = f"{self.enhanced} " if self.enhanced else ""
        return f"{code}{enhanced}{self.text}".strip()


def failed(code: int, enhanced: str, text: str) -> Outcome:
    return Outcome(FAILED, code, enhanced, text)


def deferred(code: int, enhanced: str, text: str) -> Outcome:
    return Outcome(PENDING, code, enhanced, text)


def check_transaction(env: Envelope, ext: Extensions) -> Outcome | None:
    """Why the next hop cannot take this message at all, decided before sending.

    None when it can.  Each refusal is permanent: another attempt to the same
    kind of server gives the same answer.
    """
    limit = ext.size_limit
    if limit is not None and env.size > limit:
        # RFC 1870 §6: fail early, without sending the message.
        return failed(552, "5.3.4", f"message size {env.size} exceeds the next hop's limit {limit}")
    if env.smtputf8 and not ext.smtputf8:
        # RFC 6531 §3.2: no SMTPUTF8 at the next hop and no downgrade: bounce.
        return failed(550, "5.6.7", "next hop does not support SMTPUTF8")
    if env.body == "8BITMIME" and not ext.eightbitmime:
        # RFC 6152 §3: 8-bit data to a server without 8BITMIME must be
        # converted or returned; we do not convert.
        return failed(554, "5.6.3", "next hop does not support 8BITMIME")
    if env.body == "BINARYMIME" and not (ext.binarymime and ext.chunking):
        return failed(554, "5.6.3", "next hop does not support BINARYMIME")
    if env.requiretls and not ext.requiretls:
        # RFC 8689 §4.2.1: the next hop must offer REQUIRETLS after STARTTLS.
        return failed(550, "5.7.30", "REQUIRETLS support required but not offered by the next hop")
    return None


def xtext(text: str) -> str:
    """RFC 3461 §4: '+' followed by two upper-case hex digits for '+', '=',
    controls, space and non-ASCII (as UTF-8 octets)."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (ord("+"), ord("=")):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def mail_command(env: Envelope, ext: Extensions) -> bytes:
    """MAIL FROM with the parameters the server advertised (RFC 5321 §4.1.1.2)."""
    params = []
    if ext.has("SIZE"):
        params.append(f"SIZE={env.size}")  # RFC 1870 §6
    if env.body in ("8BITMIME", "BINARYMIME") and ext.esmtp:
        params.append(f"BODY={env.body}")  # RFC 6152 §2, RFC 3030 §3
    if env.smtputf8 and ext.smtputf8:
        params.append("SMTPUTF8")  # RFC 6531 §3.4
    if ext.dsn:
        if env.ret:
            params.append(f"RET={env.ret}")  # RFC 3461 §4.3
        if env.envid:
            params.append(f"ENVID={xtext(env.envid)}")  # RFC 3461 §4.4
    if env.requiretls and ext.requiretls:
        params.append("REQUIRETLS")  # RFC 8689 §4.1
    line = f"MAIL FROM:<{env.sender}>"
    if params:
        line += " " + " ".join(params)
    return (line + "\r\n").encode("utf-8")


def rcpt_command(rcpt: Recipient, ext: Extensions) -> bytes:
    """RCPT TO with NOTIFY/ORCPT when the server speaks DSN (RFC 3461 §4.1-4.2)."""
    line = f"RCPT TO:<{rcpt.address}>"
    if ext.dsn:
        if rcpt.notify:
            line += " NOTIFY=" + ",".join(rcpt.notify)
        if rcpt.orcpt:
            kind, _, addr = rcpt.orcpt.partition(";")
            line += f" ORCPT={kind};{xtext(addr)}"
    return (line + "\r\n").encode("utf-8")


def envelope_plan(env: Envelope, ext: Extensions) -> list[list[bytes]]:
    """Groups of commands to write before reading their replies.

    With PIPELINING (RFC 2920 §3.1) MAIL and every RCPT go in one write;
    without it each command is its own group.  BDAT is never part of a group;
    node/outbound/client.py appends DATA to a pipelined group (ending it, as
    §3.1 requires) and otherwise sends DATA once a RCPT was accepted.
    """
    commands = [mail_command(env, ext)] + [rcpt_command(r, ext) for r in env.recipients]
    if ext.pipelining:
        return [commands]
    return [[c] for c in commands]


_LINE_END = re.compile(rb"\r\n|\r|\n")


def normalize_line_ends(raw: bytes) -> bytes:
    """Every bare CR or LF becomes CRLF (RFC 5321 §2.3.8), ending in CRLF."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") == crlf and raw.count(b"\r") == crlf:  # already CRLF only
        out = raw
    else:
        out = _LINE_END.sub(b"\r\n", raw)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def dot_stuff(raw: bytes) -> bytes:
    """The DATA payload: CRLF-normalized, leading dots doubled, then CRLF.CRLF
    (RFC 5321 §4.5.2).  A message can therefore never end the data early."""
    body = normalize_line_ends(raw)
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\r\n.", b"\r\n..")
    return body + b".\r\n"


def bdat_chunks(raw: bytes, chunk_size: int = BDAT_CHUNK, *, binary: bool = False) -> Iterator[bytes]:
    """BDAT commands with their chunk (RFC 3030 §2); the last has LAST.

    Text bodies are CRLF-normalized first; BINARYMIME bodies are sent as is.
    An empty message is one 'BDAT 0 LAST'.
    """
    body = raw if binary else normalize_line_ends(raw)
    if not body:
        yield b"BDAT 0 LAST\r\n"
        return
    for start in range(0, len(body), chunk_size):
        chunk = body[start : start + chunk_size]
        last = start + chunk_size >= len(body)
        head = f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode()
        yield head + chunk
