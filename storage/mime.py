"""Message metadata, parsed once at delivery (RFC 5322, RFC 2045-2047, RFC 2231).

Theory of operation
-------------------
`scan(raw)` walks the stored bytes once with a hand-written, bounded MIME
scanner and returns a tree of `Part` objects holding byte offsets only:
``hstart`` (first header octet), ``bstart`` (first body octet, just after the
blank line) and ``end`` (one past the last body octet).  Every IMAP size and
section (RFC 3501 §6.4.5, §7.4.2) is an octet count over these stored bytes,
so nothing is ever re-encoded: CRLF and bare-LF messages are measured as they
are.  Boundaries follow RFC 2046 §5.1.1: a delimiter is a line starting with
"--" + boundary, and the line break before it belongs to the delimiter.

`parse_metadata(raw)` turns the tree into a JSON-serializable dict that the
storage layer keeps next to the message: the ENVELOPE fields, the body
structure with offsets, and the few header fields SEARCH/SORT read.  The IMAP
wire encoding of that dict lives in node/imap/mime.py.

Limits: nesting depth at most MAX_DEPTH, at most MAX_PARTS parts; beyond them a
container part is kept as an opaque application/octet-stream leaf (as Dovecot
does).  Nothing here raises on any input: malformed messages get a
best-effort structure.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_DEPTH = 100  # nested multipart / message/rfc822 levels
MAX_PARTS = 10_000  # MIME parts per message
MAX_ADDRESSES = 1_000  # per ENVELOPE address field; the rest is left out
METADATA_VERSION = 1

_LF = 10
_CR = 13
_WSP = b" \t"


# --------------------------------------------------------------------------
# Header scanning (RFC 5322 §2.2, §3.2.2 folding)


@dataclass(slots=True)
class Field:
    """One header field: lower-cased name and its octet range in the message."""

    name: str  # lower-cased field name, "" for a line without a colon
    start: int  # first octet of the field (its name)
    end: int  # one past the last octet, line break of the last line included
    vstart: int  # first octet after the colon


_BLANK_LINE = re.compile(rb"\n\r?\n")


def _split_header(raw: bytes, start: int, end: int) -> tuple[list[Field], int]:
    """Fields of the header in raw[start:end] and the offset of the body.

    The header ends at the first empty line (CRLF or bare LF); the body starts
    after it.  Without an empty line the whole range is header and the body
    is empty (offset == end).
    """
    fields: list[Field] = []
    if start >= end:
        return fields, end
    if raw[start] == _LF:
        return fields, start + 1
    if raw.startswith(b"\r\n", start, end):
        return fields, start + 2
    blank = _BLANK_LINE.search(raw, start, end)
    if blank is None:
        hend = bstart = end
    else:
        hend, bstart = blank.start() + 1, blank.end()
    pos = start
    append = fields.append
    for line in raw[start:hend].split(b"\n"):
        if pos >= hend:
            break
        line_end = min(pos + len(line) + 1, hend)
        first = line[0] if line else _LF
        if (first == 32 or first == 9) and fields:
            fields[-1].end = line_end  # folded continuation (RFC 5322 §2.2.3)
        else:
            colon = line.find(b":")
            if colon > 0:
                name = line[:colon].strip(b" \t").lower().decode("latin-1")
                append(Field(name, pos, line_end, pos + colon + 1))
            else:
                append(Field("", pos, line_end, line_end))
        pos = line_end
    return fields, bstart


def _index(fields: list[Field]) -> dict[str, Field]:
    """The first field of each name (RFC 5322 §3.6 allows most only once)."""
    index: dict[str, Field] = {}
    for f in fields:
        if f.name not in index:
            index[f.name] = f
    return index


def _field_value(raw: bytes, f: Field) -> str:
    """The unfolded value of a field: line breaks removed, outer blanks stripped.

    8-bit octets are read as UTF-8; invalid sequences become U+FFFD.
    """
    value = raw[f.vstart : f.end].replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
    return value.strip(b" \t").decode("utf-8", "replace")


def _first(raw: bytes, index: dict[str, Field], name: str) -> str | None:
    f = index.get(name)
    return None if f is None else _field_value(raw, f)


# --------------------------------------------------------------------------
# Structured field values (RFC 2045 §5.1, RFC 2231)

_TOKEN = re.compile(r'[^()<>@,;:\\"/\[\]?=\x00-\x20\x7f]+')  # RFC 2045 §5.1 token


class _Cursor:
    """A tolerant scanner over one header value (RFC 2045 tokens, RFC 5322 CFWS)."""

    __slots__ = ("s", "i", "n")

    def __init__(self, s: str) -> None:
        self.s = s
        self.i = 0
        self.n = len(s)

    def skip_cfws(self) -> None:
        s, n = self.s, self.n
        while self.i < n:
            c = s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "(":
                self.comment()
            else:
                return

    def comment(self) -> str:
        """Consume a (possibly nested) comment starting at "(", return its text."""
        s, n = self.s, self.n
        depth = 0
        out: list[str] = []
        while self.i < n:
            c = s[self.i]
            self.i += 1
            if c == "\\" and self.i < n:
                out.append(s[self.i])
                self.i += 1
                continue
            if c == "(":
                depth += 1
                if depth == 1:
                    continue
            elif c == ")":
                depth -= 1
                if depth == 0:
                    break
            out.append(c)
        return "".join(out)

    def token(self) -> str:
        m = _TOKEN.match(self.s, self.i)
        if m is None:
            return ""
        self.i = m.end()
        return m.group()

    def quoted(self) -> str:
        """Consume a quoted-string starting at '"'; an unterminated one runs to the end."""
        s, n = self.s, self.n
        self.i += 1
        out: list[str] = []
        while self.i < n:
            c = s[self.i]
            self.i += 1
            if c == "\\" and self.i < n:
                out.append(s[self.i])
                self.i += 1
            elif c == '"':
                break
            else:
                out.append(c)
        return "".join(out)

    def peek(self) -> str:
        return self.s[self.i] if self.i < self.n else ""


def _parse_params(cur: _Cursor) -> list[list[str]]:
    """`; name=value` parameters, RFC 2231 continuations joined.

    Names are lower-cased (RFC 2045 §5.1: case-insensitive).  A parameter
    with any extended (`*`) section is reported once as `name*` with the
    value still in RFC 2231 form (charset'lang'%XX...), as Dovecot does;
    decoding is left to `decode_param`.
    """
    raw_params: list[tuple[str, str, bool]] = []
    s, n = cur.s, cur.n
    while cur.i < n:
        semi = s.find(";", cur.i)
        if semi < 0:
            break
        cur.i = semi + 1
        cur.skip_cfws()
        name = cur.token().lower()
        cur.skip_cfws()
        if not name or cur.peek() != "=":
            continue
        cur.i += 1
        cur.skip_cfws()
        if cur.peek() == '"':
            value, quoted = cur.quoted(), True
        else:
            start = cur.i
            while cur.i < n and s[cur.i] not in ';"( \t':
                cur.i += 1
            value, quoted = s[start : cur.i], False
        raw_params.append((name, value, quoted))
        if len(raw_params) >= 1000:  # bounded: no real message has more
            break
    if not any("*" in p[0] for p in raw_params):
        return [[name, value] for name, value, _ in raw_params]
    # RFC 2231 §3 (continuations) and §4 (charset/language, %XX encoding).
    out: list[list[str]] = []
    sections: dict[str, list[tuple[int, str, bool]]] = {}
    for name, value, _ in raw_params:
        if "*" not in name:
            out.append([name, value])
            continue
        base, _, rest = name.partition("*")
        extended = rest.endswith("*") or rest == ""
        number = rest.rstrip("*")
        if number and not number.isdigit():
            out.append([name, value])
            continue
        if base not in sections:
            sections[base] = []
            out.append([base, ""])  # placeholder keeps first-seen order
        sections[base].append((int(number) if number else 0, value, extended))
    result: list[list[str]] = []
    for name, value in out:
        parts = sections.get(name) if value == "" else None
        if parts is None:
            result.append([name, value])
            continue
        parts.sort(key=lambda p: p[0])
        joined: list[str] = []
        any_ext = any(p[2] for p in parts)
        for expect, (num, text, ext) in enumerate(parts):
            if num != expect:
                break  # a missing section ends the value (RFC 2231 §3)
            if any_ext and not ext:
                text = _pct_encode(text)
            joined.append(text)
        result.append([name + "*" if any_ext else name, "".join(joined)])
    return result


def _pct_encode(text: str) -> str:
    return "".join(
        c
        if (c.isascii() and (c.isalnum() or c in "!#$&+-.^_`|~"))
        else "".join(f"%{b:02X}" for b in c.encode("utf-8"))
        for c in text
    )


def decode_param(name: str, value: str) -> str:
    """The text of a parameter value: RFC 2231 (`name*`) or RFC 2047 decoded."""
    if not name.endswith("*"):
        return decode_words(value)
    charset, q1, rest = value.partition("'")
    if not q1:
        return value
    _lang, q2, text = rest.partition("'")
    if not q2:
        return value
    try:
        data = re.sub(
            rb"%([0-9A-Fa-f]{2})",
            lambda m: bytes([int(m.group(1), 16)]),
            text.encode("utf-8", "replace"),
        )
    except Exception:
        return value
    return decode_charset(data, charset or "us-ascii")


def parse_content_type(value: str | None) -> tuple[str, str, list[list[str]]] | None:
    """(type, subtype, params) of a Content-Type value; None if absent or unusable."""
    if value is None:
        return None
    cur = _Cursor(value)
    cur.skip_cfws()
    ctype = cur.token()
    cur.skip_cfws()
    if not ctype or cur.peek() != "/":
        return None
    cur.i += 1
    cur.skip_cfws()
    subtype = cur.token()
    if not subtype:
        return None
    return ctype, subtype, _parse_params(cur)


# --------------------------------------------------------------------------
# The MIME tree


@dataclass(slots=True)
class Part:
    """One MIME entity: its offsets, header fields and children (no copies of bytes)."""

    hstart: int
    bstart: int
    end: int
    fields: list[Field]
    first: dict[str, Field] = field(default_factory=dict)  # first field of each name
    type: str = "text"  # as written in the header (case kept)
    subtype: str = "plain"
    params: list[list[str]] = field(default_factory=list)
    encoding: str | None = None
    children: list[Part] = field(default_factory=list)  # multipart/*
    message: Part | None = None  # message/rfc822: the encapsulated message
    multipart: bool = False
    # Opaque: a container beyond MAX_DEPTH / MAX_PARTS, or an encoded
    # message/rfc822; reported as application/octet-stream.
    overflow: bool = False


class _Budget:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts = 0


def _boundary(params: list[list[str]]) -> bytes | None:
    for name, value in params:
        if name == "boundary" and value:
            return value.encode("utf-8", "replace")
    return None


def _encoding_token(value: str | None) -> str | None:
    if value is None:
        return None
    cur = _Cursor(value)
    cur.skip_cfws()
    tok = cur.token()
    return tok or None


def _make_part(
    raw: bytes, hstart: int, end: int, depth: int, budget: _Budget, digest: bool
) -> Part:
    """Parse the entity in raw[hstart:end] (header, blank line, body)."""
    budget.parts += 1
    fields, bstart = _split_header(raw, hstart, end)
    part = Part(hstart, bstart, end, fields, _index(fields))
    ct = parse_content_type(_first(raw, part.first, "content-type"))
    if ct is None:
        if digest:  # RFC 2046 §5.1.5
            part.type, part.subtype = "message", "rfc822"
    else:
        part.type, part.subtype, part.params = ct
    part.encoding = _encoding_token(_first(raw, part.first, "content-transfer-encoding"))
    ltype, lsub = part.type.lower(), part.subtype.lower()
    rfc822 = ltype == "message" and lsub == "rfc822"
    if rfc822 and (part.encoding or "7bit").lower() not in ("7bit", "8bit", "binary"):
        # RFC 2046 §5.2.1 forbids encoding message/rfc822; the body is not a
        # message we can show, and a "message" "rfc822" without envelope and
        # body would break the BODYSTRUCTURE grammar (RFC 3501 §9 body-type-msg).
        part.overflow = True
        return part
    if ltype != "multipart" and not rfc822:
        return part
    if depth >= MAX_DEPTH or budget.parts >= MAX_PARTS:
        part.overflow = True
        return part
    if ltype == "message":
        part.message = _make_part(raw, bstart, end, depth + 1, budget, False)
        return part
    boundary = _boundary(part.params)
    if boundary is None:
        # No boundary: the body cannot be split; show it as text (RFC 2046 §5.1.1
        # makes the parameter mandatory, so this is a best-effort reading).
        part.type, part.subtype, part.params = "text", "plain", []
        return part
    part.multipart = True
    for start, stop in _split_multipart(raw, bstart, end, boundary):
        if budget.parts >= MAX_PARTS:
            break
        part.children.append(_make_part(raw, start, stop, depth + 1, budget, lsub == "digest"))
    return part


def _split_multipart(raw: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """Octet ranges of the body parts of a multipart body (RFC 2046 §5.1.1).

    A delimiter is a line that starts with "--" + boundary; the line break in
    front of it belongs to it.  "--" + boundary + "--" closes; without a close
    delimiter the last part runs to the end.  Preamble and epilogue are
    dropped.
    """
    delim = b"--" + boundary
    dlen = len(delim)
    find = raw.find
    ranges: list[tuple[int, int]] = []
    part_start = -1
    pos = start
    while True:
        hit = find(delim, pos, end)
        if hit < 0:
            break
        if hit != start and raw[hit - 1] != _LF:
            pos = hit + 1
            continue
        nl = find(b"\n", hit + dlen, end)
        line_end = end if nl < 0 else nl + 1
        closing = raw[hit + dlen : hit + dlen + 2] == b"--"
        if part_start >= 0:
            stop = hit
            if stop > part_start and raw[stop - 1] == _LF:
                stop -= 1
                if stop > part_start and raw[stop - 1] == _CR:
                    stop -= 1
            ranges.append((part_start, stop))
            if len(ranges) >= MAX_PARTS:
                return ranges
        if closing:
            return ranges
        part_start = line_end
        if nl < 0:
            # a delimiter on the last line without a line break opens nothing
            part_start = -1
            break
        pos = line_end
    if part_start >= 0:
        ranges.append((part_start, end))
    return ranges


def scan(raw: bytes) -> Part:
    """The MIME tree of a whole message; never raises on bytes input."""
    return _make_part(raw, 0, len(raw), 0, _Budget(), False)


# --------------------------------------------------------------------------
# RFC 2047 encoded words and charsets

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_QP_HEX = re.compile(rb"=([0-9A-Fa-f]{2})")


def decode_charset(data: bytes, charset: str) -> str:
    """Bytes in a named charset to text, with replacement; unknown charsets as UTF-8."""
    cs = charset.strip().lower()
    if cs in ("", "us-ascii", "ascii", "utf-8", "utf8", "unknown-8bit", "x-unknown"):
        return data.decode("utf-8", "replace")
    try:
        return data.decode(cs, "replace")
    except Exception:  # LookupError, or a codec that is not a text encoding
        return data.decode("utf-8", "replace")


def _word_bytes(enc: str, text: str) -> bytes | None:
    try:
        if enc in "bB":
            clean = re.sub(r"[^A-Za-z0-9+/]", "", text)
            if len(clean) % 4 == 1:
                clean = clean[:-1]
            return base64.b64decode(clean + "=" * (-len(clean) % 4))
        data = text.replace("_", " ").encode("ascii", "replace")
        return _QP_HEX.sub(lambda m: bytes([int(m.group(1), 16)]), data)
    except (binascii.Error, ValueError):
        return None


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words in a header value (RFC 2047 §6).

    Whitespace between adjacent encoded words is dropped (§6.2); adjacent
    words in the same charset are joined before decoding, so a multi-octet
    character split across words survives.  Undecodable words stay as written.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending: list[bytes] = []
    pending_cs = ""
    pos = 0
    after_word = False
    for m in _ENCODED_WORD.finditer(value):
        data = _word_bytes(m.group(2), m.group(3))
        if data is None:
            continue  # stays in the text, as written
        gap = value[pos : m.start()]
        charset = m.group(1).split("*", 1)[0]  # RFC 2231 §5 language suffix
        if after_word and gap.strip(" \t") == "":
            if charset.lower() != pending_cs.lower():
                out.append(decode_charset(b"".join(pending), pending_cs))
                pending = []
        else:
            if pending:
                out.append(decode_charset(b"".join(pending), pending_cs))
                pending = []
            out.append(gap)
        pending.append(data)
        pending_cs = charset
        after_word = True
        pos = m.end()
    if pending:
        out.append(decode_charset(b"".join(pending), pending_cs))
    out.append(value[pos:])
    return "".join(out)


# --------------------------------------------------------------------------
# Addresses (RFC 5322 §3.4, RFC 3501 §7.4.2 ENVELOPE address structure)

_ADDR_SPECIALS = '()<>@,;:\\".[]'

Address = list[str | None]  # [name, adl, mailbox, host]


_ADDR_TOKEN = re.compile(
    r"""(?P<ws>[ \t\r\n]+)
    |(?P<q>"(?P<qt>(?:[^"\\]++|\\.)*+)"?)
    |(?P<d>\[[^\]]*\]?)
    |(?P<a>[^ \t\r\n()<>@,;:\\".\[\]]+)
    |(?P<c>\()
    |(?P<s>.)""",
    re.X | re.S,
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)


def _unpair(m: re.Match[str]) -> str:
    return m.group(1)


def _addr_tokens(s: str) -> Iterator[tuple[str, str]]:
    """("a", atom) ("q", quoted text) ("c", comment) ("d", [literal]) or (special, "").

    Lazy, so a caller that stops early (MAX_ADDRESSES) does no further work.
    """
    pos, n = 0, len(s)
    match = _ADDR_TOKEN.match
    while pos < n:
        m = match(s, pos)
        if m is None:  # cannot happen: the last alternative matches any character
            return
        kind = m.lastgroup
        pos = m.end()
        if kind == "ws":
            continue
        if kind == "c":
            cur = _Cursor(s)
            cur.i = m.start()
            text = cur.comment().strip()
            pos = cur.i
            yield ("c", text)
        elif kind == "q":
            qt = m.group("qt")
            yield ("q", _QUOTED_PAIR.sub(_unpair, qt) if "\\" in qt else qt)
        elif kind == "s":
            yield (m.group(), "")
        else:
            yield (kind or "a", m.group())


def _phrase(tokens: list[tuple[str, str]]) -> str | None:
    words: list[str] = []
    for kind, text in tokens:
        if kind in ("a", "q", "d"):
            words.append(text)
        elif kind == ".":
            if words:
                words[-1] += "."
            else:
                words.append(".")
    phrase = " ".join(w for w in words if w != "")
    return phrase or None


def _quote_local(text: str) -> str:
    if text and all(c not in _ADDR_SPECIALS and c > " " for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _addr_spec(tokens: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(local part, domain) of an addr-spec; None where missing."""
    at = next((i for i, t in enumerate(tokens) if t[0] == "@"), -1)
    local_toks = tokens if at < 0 else tokens[:at]
    dom_toks = [] if at < 0 else tokens[at + 1 :]
    local = "".join(
        _quote_local(t) if k == "q" else (t if k in ("a", "d") else k)
        for k, t in local_toks
        if k != "c"
    )
    domain = "".join(t if k in ("a", "d") else k for k, t in dom_toks if k not in ("c", "@"))
    return (local or None), (domain or None)


def _mailbox(tokens: list[tuple[str, str]]) -> Address | None:
    """One mailbox (name-addr or addr-spec) as [name, adl, mailbox, host]."""
    if not tokens:
        return None
    if any(k == "<" for k, _ in tokens):
        lt = next(i for i, t in enumerate(tokens) if t[0] == "<")
        gt = next((i for i in range(lt + 1, len(tokens)) if tokens[i][0] == ">"), len(tokens))
        name = _phrase([t for t in tokens[:lt] if t[0] != "c"])
        inner = [t for t in tokens[lt + 1 : gt] if t[0] != "c"]
        if name is None:
            comments = [t for k, t in tokens if k == "c" and t]
            name = comments[0] if comments else None
        adl = None
        colon = next((i for i, t in enumerate(inner) if t[0] == ":"), -1)
        if colon >= 0 and inner and inner[0][0] == "@":  # obs-route (RFC 5322 §4.4)
            adl = "".join(t if k in ("a", "d") else k for k, t in inner[:colon]) or None
            inner = inner[colon + 1 :]
        if not inner:
            return [name, adl, "", ""]  # "<>", e.g. a bounce's null sender
        local, domain = _addr_spec(inner)
        return [name, adl, local or "MISSING_MAILBOX", domain or "MISSING_DOMAIN"]
    plain = [t for t in tokens if t[0] != "c"]
    comments = [t for k, t in tokens if k == "c" and t]
    if not plain:
        return None
    local, domain = _addr_spec(plain)
    name = comments[-1] if comments else None
    if local is None and domain is None:
        return None
    return [name, None, local or "MISSING_MAILBOX", domain or "MISSING_DOMAIN"]


def parse_addresses(value: str | None) -> list[Address] | None:
    """An address-list as ENVELOPE address structures (RFC 3501 §7.4.2).

    A group is a start marker [None, None, group-name, None], its members,
    and an end marker [None, None, None, None].  None when the field is
    absent or holds no address.  At most MAX_ADDRESSES entries are returned.
    """
    if value is None:
        return None
    out: list[Address] = []
    current: list[tuple[str, str]] = []
    in_group = False
    in_angle = False
    truncated = False
    for tok in _addr_tokens(value):
        if len(out) >= MAX_ADDRESSES:
            truncated = True
            break
        kind = tok[0]
        if kind == "<":
            in_angle = True
        elif kind == ">":
            in_angle = False
        if in_angle:
            current.append(tok)
            continue
        if kind == ",":
            addr = _mailbox(current)
            if addr:
                out.append(addr)
            current = []
        elif kind == ":" and not in_group and not any(k == "<" for k, _ in current):
            name = _phrase([t for t in current if t[0] != "c"]) or ""
            out.append([None, None, name, None])
            in_group = True
            current = []
        elif kind == ";" and in_group:
            addr = _mailbox(current)
            if addr:
                out.append(addr)
            out.append([None, None, None, None])
            in_group = False
            current = []
        else:
            current.append(tok)
    addr = None if truncated else _mailbox(current)
    if addr:
        out.append(addr)
    if in_group:
        out.append([None, None, None, None])  # unterminated group: close it
    return out or None


# --------------------------------------------------------------------------
# Dates (RFC 5322 §3.3)


def parse_date(value: str | None) -> float | None:
    """Seconds since the epoch, tolerant of obsolete forms; None if unusable."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return float(email.utils.mktime_tz(parsed))
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


# --------------------------------------------------------------------------
# Metadata


def _envelope(raw: bytes, fields: dict[str, Field]) -> dict[str, Any]:
    """ENVELOPE fields (RFC 3501 §7.4.2); sender/reply-to default to from."""
    from_ = parse_addresses(_first(raw, fields, "from"))
    sender = parse_addresses(_first(raw, fields, "sender")) or from_
    reply_to = parse_addresses(_first(raw, fields, "reply-to")) or from_
    return {
        "date": _first(raw, fields, "date") or None,
        "subject": _first(raw, fields, "subject"),
        "from": from_,
        "sender": sender,
        "reply_to": reply_to,
        "to": parse_addresses(_first(raw, fields, "to")),
        "cc": parse_addresses(_first(raw, fields, "cc")),
        "bcc": parse_addresses(_first(raw, fields, "bcc")),
        "in_reply_to": _first(raw, fields, "in-reply-to") or None,
        "message_id": _first(raw, fields, "message-id") or None,
    }


def _disposition(value: str | None) -> list[Any] | None:
    if value is None:
        return None
    cur = _Cursor(value)
    cur.skip_cfws()
    tok = cur.token()
    if not tok:
        return None
    return [tok, _parse_params(cur)]


def _language(value: str | None) -> list[str] | None:
    if value is None:
        return None
    langs: list[str] = []
    for item in value.split(","):
        cur = _Cursor(item)
        cur.skip_cfws()
        tok = cur.token()
        if tok:
            langs.append(tok)
    return langs or None


def _part_meta(raw: bytes, part: Part) -> dict[str, Any]:
    f = part.first
    size = part.end - part.bstart
    ltype = part.type.lower()
    params = part.params
    if ltype == "text" and not any(n == "charset" for n, _ in params):
        params = [*params, ["charset", "us-ascii"]]  # RFC 2045 §5.2 default
    disposition = _disposition(_first(raw, f, "content-disposition"))
    filename = None
    for name, value in (disposition[1] if disposition else []) + params:
        if name in ("filename", "filename*", "name", "name*"):
            filename = decode_param(name, value)
            break
    meta: dict[str, Any] = {
        "type": "application" if part.overflow else part.type,
        "subtype": "octet-stream" if part.overflow else part.subtype,
        "params": params,
        "id": _first(raw, f, "content-id"),
        "description": _first(raw, f, "content-description"),
        "encoding": part.encoding or "7bit",
        "size": size,
        "lines": None,
        "md5": _first(raw, f, "content-md5"),  # RFC 1864, body-fld-md5 (RFC 3501 §9)
        "disposition": disposition,
        "language": _language(_first(raw, f, "content-language")),
        "location": _first(raw, f, "content-location"),
        "filename": filename,
        "offsets": [part.hstart, part.bstart, part.end],
    }
    if part.multipart:
        meta["parts"] = [_part_meta(raw, child) for child in part.children]
    elif part.message is not None:
        inner = part.message
        meta["envelope"] = _envelope(raw, inner.first)
        meta["message"] = _part_meta(raw, inner)
        meta["lines"] = raw.count(b"\n", part.bstart, part.end)
    elif ltype == "text" and not part.overflow:
        meta["lines"] = raw.count(b"\n", part.bstart, part.end)
    return meta


def _addresses_text(value: str | None) -> dict[str, str] | None:
    if value is None:
        return None
    return {"raw": value, "decoded": decode_words(value)}


def parse_metadata(raw: bytes) -> dict[str, Any]:
    """Everything IMAP needs about a message, computed once at delivery.

    Returns a JSON-serializable dict:
      - ``size``: octets of raw;
      - ``envelope``: RFC 3501 §7.4.2 fields, addresses as [name, adl, mailbox, host];
      - ``body``: the structure tree, each part with type/subtype/params/id/
        description/encoding/size/lines/md5/disposition/language/location,
        ``offsets`` [header start, body start, end] into raw, ``parts`` for
        multipart/*, ``envelope`` and ``message`` for message/rfc822;
      - ``headers``: SEARCH/SORT fields: subject (RFC 2047 decoded), from/to/
        cc/bcc {raw, decoded}, date (epoch seconds or None), message_id,
        in_reply_to, references.
    Never raises on bytes input.
    """
    root = scan(raw)
    fields = root.first
    subject = _first(raw, fields, "subject")
    date = _first(raw, fields, "date")
    return {
        "v": METADATA_VERSION,
        "size": len(raw),
        "envelope": _envelope(raw, fields),
        "body": _part_meta(raw, root),
        "headers": {
            "subject": decode_words(subject) if subject is not None else None,
            "from": _addresses_text(_first(raw, fields, "from")),
            "to": _addresses_text(_first(raw, fields, "to")),
            "cc": _addresses_text(_first(raw, fields, "cc")),
            "bcc": _addresses_text(_first(raw, fields, "bcc")),
            "date": parse_date(date),
            "message_id": _first(raw, fields, "message-id"),
            "in_reply_to": _first(raw, fields, "in-reply-to"),
            "references": _first(raw, fields, "references"),
        },
    }


def header_values(raw: bytes, name: str, part: Part | None = None) -> list[str]:
    """Every value of a header field of the message (or of `part`), unfolded."""
    target = part if part is not None else scan_header(raw)
    lname = name.lower()
    return [_field_value(raw, f) for f in target.fields if f.name == lname]


def scan_header(raw: bytes) -> Part:
    """Only the top-level header of a message (cheaper than scan)."""
    fields, bstart = _split_header(raw, 0, len(raw))
    return Part(0, bstart, len(raw), fields, _index(fields))
