"""Parsing of MAIL/RCPT arguments: paths (RFC 5321 §4.1.2) and ESMTP parameters.

Pure functions, no I/O.  Parse errors raise ``AddressError`` carrying the
reply hint.  Routing syntax that could make a mail server relay (source
routes, "%" hack, bang paths, quoted "@", address literals) is parsed here
and *flagged*; the session refuses anything flagged that is not plainly local.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from node.smtp import replies as R
from node.smtp.replies import Reply

# RFC 5322 §3.2.3 atext, plus any non-ASCII character (RFC 6531 §3.3 UTF8-non-ascii).
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]+")
_LABEL = re.compile(r"[A-Za-z0-9_\u0080-\U0010ffff](?:[A-Za-z0-9_\-\u0080-\U0010ffff]*[A-Za-z0-9_\u0080-\U0010ffff])?")
_ESMTP_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
_MAX_PATH = 256  # RFC 5321 §4.5.3.1.3
_MAX_LOCAL = 64  # §4.5.3.1.1
_MAX_DOMAIN = 255  # §4.5.3.1.2


class AddressError(ValueError):
    """Unparseable argument; ``reply`` is what to answer."""

    def __init__(self, reply: Reply, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply


@dataclass(frozen=True)
class Mailbox:
    """local@domain as received; ``local`` is unquoted."""

    local: str
    domain: str
    quoted: bool = False
    literal: bool = False  # domain is an address literal "[...]"
    route: tuple[str, ...] = ()  # obsolete source route (§4.1.2 A-d-l), ignored

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def ascii(self) -> bool:
        return self.address.isascii()

    def wire(self) -> str:
        """Mailbox form for trace headers; quoted local parts re-quoted."""
        local = self.local
        if self.quoted or not _dot_string_ok(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}"


def _dot_string_ok(local: str) -> bool:
    return all(_ATEXT.fullmatch(atom) for atom in local.split("."))


def is_domain(text: str) -> bool:
    """RFC 5321 §4.1.2 Domain (U-labels allowed, RFC 6531 §3.3)."""
    if not text or len(text) > _MAX_DOMAIN:
        return False
    return all(_LABEL.fullmatch(label) and len(label) <= 63 for label in text.split("."))


def is_address_literal(text: str) -> bool:
    """RFC 5321 §4.1.3: "[" IPv4 / "IPv6:" ... / tag ":" ... "]"."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        return False
    inner = text[1:-1]
    return bool(re.fullmatch(r"[\x21-\x5a\x5e-\x7e]+", inner))


def _split_path(arg: str) -> tuple[str, str]:
    """'<...> params' -> (inside, params).  Honours quotes and backslashes."""
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        raise AddressError(R.BAD_ADDRESS, "path without angle brackets")
    if '"' not in arg:  # no quoted string: the first ">" ends the path
        i = arg.find(">", 1)
        if i < 0:
            raise AddressError(R.BAD_ADDRESS, "unterminated path")
        rest = arg[i + 1 :]
        if rest and not rest.startswith(" "):
            raise AddressError(R.ARG_SYNTAX, "junk after path")
        return arg[1:i], rest.strip(" ")
    quoted = escaped = False
    for i in range(1, len(arg)):
        ch = arg[i]
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            rest = arg[i + 1 :]
            if rest and not rest.startswith(" "):
                raise AddressError(R.ARG_SYNTAX, "junk after path")
            return arg[1:i], rest.strip(" ")
    raise AddressError(R.BAD_ADDRESS, "unterminated path")


def _parse_local(text: str) -> tuple[str, bool]:
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            raise AddressError(R.BAD_ADDRESS, "bad quoted string")
        out = []
        i, inner = 0, text[1:-1]
        while i < len(inner):
            ch = inner[i]
            if ch == "\\":
                if i + 1 >= len(inner) or not (" " <= inner[i + 1] <= "~"):
                    raise AddressError(R.BAD_ADDRESS, "bad quoted pair")
                out.append(inner[i + 1])
                i += 2
                continue
            if ch == '"' or (ch < " " or ch == "\x7f"):
                raise AddressError(R.BAD_ADDRESS, "bad character in quoted string")
            out.append(ch)
            i += 1
        return "".join(out), True
    if not _dot_string_ok(text):
        raise AddressError(R.BAD_ADDRESS, "bad local part")
    return text, False


def _find_at(text: str) -> int:
    """Index of the '@' separating local part and domain (outside quotes)."""
    if '"' not in text:  # nothing quoted: the last "@"
        return text.rfind("@")
    quoted = escaped = False
    at = -1
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "@" and not quoted:
            at = i
    return at


def parse_mailbox(inside: str) -> Mailbox:
    """The text between angle brackets (no null path) -> Mailbox."""
    if len(inside) > _MAX_PATH:
        raise AddressError(R.BAD_ADDRESS, "path too long")
    route: tuple[str, ...] = ()
    if inside.startswith("@"):
        adl, sep, inside = inside.partition(":")
        if not sep:
            raise AddressError(R.BAD_ADDRESS, "bad source route")
        hops = tuple(h.strip() for h in adl.split(","))
        if not all(h.startswith("@") and is_domain(h[1:]) for h in hops):
            raise AddressError(R.BAD_ADDRESS, "bad source route")
        route = tuple(h[1:] for h in hops)
    at = _find_at(inside)
    if at <= 0:
        raise AddressError(R.BAD_ADDRESS, "no domain in address")
    local_text, domain = inside[:at], inside[at + 1 :]
    local, quoted = _parse_local(local_text)
    if len(local_text.encode()) > _MAX_LOCAL:
        raise AddressError(R.BAD_ADDRESS, "local part too long")
    literal = is_address_literal(domain)
    if not literal and not is_domain(domain):
        raise AddressError(R.BAD_ADDRESS, "bad domain")
    return Mailbox(local, domain, quoted=quoted, literal=literal, route=route)


def parse_params(text: str) -> dict[str, str | None]:
    """'KEY=VALUE KEY2' -> {'KEY': 'VALUE', 'KEY2': None} (RFC 5321 §4.1.2).

    Keys are upper-cased; a repeated key is a syntax error.
    """
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _ESMTP_KEY.fullmatch(key) or (eq and not value):
            raise AddressError(R.ARG_SYNTAX, "bad ESMTP parameter")
        if eq and any(c == "=" or ord(c) < 33 or ord(c) == 127 for c in value):
            raise AddressError(R.ARG_SYNTAX, "bad ESMTP parameter value")
        key = key.upper()
        if key in params:
            raise AddressError(R.ARG_SYNTAX, "repeated ESMTP parameter")
        params[key] = value if eq else None
    return params


@dataclass(frozen=True)
class MailArgs:
    sender: Mailbox | None  # None: the null reverse-path <>
    params: dict[str, str | None]


@dataclass(frozen=True)
class RcptArgs:
    recipient: Mailbox | None  # None: the special <postmaster> (§4.5.1)
    params: dict[str, str | None]


def parse_mail(args: str) -> MailArgs:
    """'FROM:<path> params' (RFC 5321 §4.1.1.2); a space after the colon is tolerated."""
    if args[:5].upper() != "FROM:":
        raise AddressError(R.ARG_SYNTAX, "expected FROM:")
    inside, rest = _split_path(args[5:])
    params = parse_params(rest)
    if inside == "":
        return MailArgs(None, params)
    try:
        return MailArgs(parse_mailbox(inside), params)
    except AddressError as exc:
        raise AddressError(R.BAD_SENDER, str(exc)) from None


def parse_rcpt(args: str) -> RcptArgs:
    """'TO:<path> params' (RFC 5321 §4.1.1.3)."""
    if args[:3].upper() != "TO:":
        raise AddressError(R.ARG_SYNTAX, "expected TO:")
    inside, rest = _split_path(args[3:])
    params = parse_params(rest)
    if inside.lower() == "postmaster":
        return RcptArgs(None, params)
    if inside == "":
        raise AddressError(R.BAD_ADDRESS, "empty recipient")
    return RcptArgs(parse_mailbox(inside), params)


def decode_xtext(value: str) -> str:
    """RFC 3461 §4: '+' HEX HEX escapes; raises AddressError when malformed."""
    out = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            hx = value[i + 1 : i + 3]
            if len(hx) != 2 or not re.fullmatch(r"[0-9A-F]{2}", hx):
                raise AddressError(R.ARG_SYNTAX, "bad xtext")
            out.append(chr(int(hx, 16)))
            i += 3
            continue
        if not ("!" <= ch <= "~") or ch == "=":
            raise AddressError(R.ARG_SYNTAX, "bad xtext")
        out.append(ch)
        i += 1
    return "".join(out)
