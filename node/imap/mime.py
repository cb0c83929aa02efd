"""IMAP views of a message: ENVELOPE, BODYSTRUCTURE, BODY[section], search text.

`envelope` and `bodystructure` encode the metadata that storage/mime.py
computed at delivery (RFC 3501 §7.4.2); they never touch the message bytes.
`fetch_section` cuts RFC 3501 §6.4.5 sections out of the stored bytes,
octet-exact.  The search helpers decode text for SEARCH (RFC 3501 §6.4.4).

Wire strings: a quoted string when every octet is 7-bit and neither CR nor
LF, else a literal `{n}\\r\\n...`; NUL octets are dropped (RFC 3501 §9:
neither quoted nor literal strings may carry them); None is NIL.  Each
encoder returns one complete parenthesized value.  Nothing here raises on
any message; a malformed one gets a best-effort answer.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from typing import Any

from storage.mime import (
    Part,
    decode_charset,
    decode_words,
    header_values,
    scan,
    scan_header,
)

_EMPTY_BODY = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'
# In BODYSTRUCTURE the stand-in child carries its (empty) extension data too,
# as every other part does and as Dovecot sends it (RFC 3501 §7.4.2).
_EMPTY_BODY_EXT = _EMPTY_BODY[:-1] + b" NIL NIL NIL NIL)"


# --------------------------------------------------------------------------
# Strings (RFC 3501 §4.3, §4.5)


def astring(value: str | None) -> bytes:
    """NIL, a quoted string, or a literal when the text needs one."""
    if value is None:
        return b"NIL"
    data = value.encode("utf-8", "replace")
    if b"\0" in data:
        data = data.replace(b"\0", b"")
    if data.isascii() and b"\r" not in data and b"\n" not in data:
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def _number(value: Any) -> bytes:
    return b"%d" % (value if isinstance(value, int) and value >= 0 else 0)


def _params(params: Any) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(astring(str(k)) + b" " + astring(str(v)) for k, v in params) + b")"


def _list_or_nil(items: Any) -> bytes:
    if not items:
        return b"NIL"
    return b"(" + b" ".join(astring(str(i)) for i in items) + b")"


# --------------------------------------------------------------------------
# ENVELOPE (RFC 3501 §7.4.2)


def _addresses(addrs: Any) -> bytes:
    if not addrs:
        return b"NIL"
    return (
        b"("
        + b"".join(
            b"(" + b" ".join(astring(x) for x in (list(a) + [None] * 4)[:4]) + b")" for a in addrs
        )
        + b")"
    )


def _envelope(env: dict[str, Any]) -> bytes:
    return (
        b"("
        + b" ".join(
            [
                astring(env.get("date")),
                astring(env.get("subject")),
                _addresses(env.get("from")),
                _addresses(env.get("sender")),
                _addresses(env.get("reply_to")),
                _addresses(env.get("to")),
                _addresses(env.get("cc")),
                _addresses(env.get("bcc")),
                astring(env.get("in_reply_to")),
                astring(env.get("message_id")),
            ]
        )
        + b")"
    )


def envelope(meta: dict) -> bytes:
    """The ENVELOPE of a message, e.g. `("date" "subject" ((...)) ... "<id>")`."""
    return _envelope(meta.get("envelope") or {})


# --------------------------------------------------------------------------
# BODY / BODYSTRUCTURE (RFC 3501 §7.4.2)


def _disposition(disp: Any) -> bytes:
    if not disp:
        return b"NIL"
    return b"(" + astring(str(disp[0])) + b" " + _params(disp[1] if len(disp) > 1 else None) + b")"


def _body(p: dict[str, Any], ext: bool) -> bytes:
    if "parts" in p:
        children = b"".join(_body(c, ext) for c in p["parts"]) or (
            _EMPTY_BODY_EXT if ext else _EMPTY_BODY
        )
        out = [children + b" " + astring(p.get("subtype") or "x-unknown")]
        if ext:
            out += [
                _params(p.get("params")),
                _disposition(p.get("disposition")),
                _list_or_nil(p.get("language")),
                astring(p.get("location")),
            ]
        return b"(" + b" ".join(out) + b")"
    out = [
        astring(p.get("type") or "text"),
        astring(p.get("subtype") or "plain"),
        _params(p.get("params")),
        astring(p.get("id")),
        astring(p.get("description")),
        astring(p.get("encoding") or "7bit"),
        _number(p.get("size")),
    ]
    if "message" in p:
        out += [
            _envelope(p.get("envelope") or {}),
            _body(p["message"], ext),
            _number(p.get("lines")),
        ]
    elif p.get("lines") is not None:
        out.append(_number(p["lines"]))
    if ext:
        out += [
            astring(p.get("md5")),
            _disposition(p.get("disposition")),
            _list_or_nil(p.get("language")),
            astring(p.get("location")),
        ]
    return b"(" + b" ".join(out) + b")"


def bodystructure(meta: dict, extensible: bool) -> bytes:
    """BODYSTRUCTURE (extensible=True, with extension data) or BODY (False)."""
    return _body(meta.get("body") or {}, extensible)


# --------------------------------------------------------------------------
# BODY[section] (RFC 3501 §6.4.5)


def _resolve(root: Part, path: tuple[int, ...]) -> Part | None:
    """The part a section number names.

    In a message whose body is not multipart, part 1 is that body; numbers
    after a message/rfc822 part descend into the encapsulated message.
    """
    scope = root
    for i, n in enumerate(path):
        if scope.multipart:
            if not 1 <= n <= len(scope.children):
                return None
            sel = scope.children[n - 1]
        elif n == 1:
            sel = scope
        else:
            return None
        if i == len(path) - 1:
            return sel
        if sel.multipart:
            scope = sel
        elif sel.message is not None:
            scope = sel.message
        else:
            return None
    return None


# One header field: its first line, then lines that start with SP or HTAB
# (RFC 5322 §2.2.3 folding), each with its LF if it has one.
_FIELD = re.compile(rb"[^\n]*\n?(?:[ \t][^\n]*\n?)*")
_HEADER_END = re.compile(rb"\n\r?\n")


def top_header_fields(raw: bytes, names: tuple[str, ...], negate: bool) -> bytes:
    """BODY[HEADER.FIELDS (names)] (or .NOT) of the whole message: the same
    octets as _header_fields over scan_header, without building a Field per
    line (the hot part of a client's header FETCH)."""
    if not raw or raw[0] == 0x0A or raw.startswith(b"\r\n"):
        return b"\r\n"  # no header fields; the blank line ends the returned header
    blank = _HEADER_END.search(raw)
    hend = len(raw) if blank is None else blank.start() + 1
    if not negate and raw[0] not in b" \t":
        # One C-level scan for just the wanted fields (a field starts at
        # every line that does not begin with SP/HTAB).
        out = [m[0] if m[0][-1] == 0x0A else m[0] + b"\r\n"
               for m in _wanted_fields(names).finditer(raw, 0, hend)]
        out.append(b"\r\n")
        return b"".join(out)
    wanted = {n.lower() for n in names}
    out = []
    pos = 0
    while pos < hend:
        m = _FIELD.match(raw, pos, hend)
        assert m is not None  # every part is optional: always matches
        end = m.end()
        first = raw.find(b"\n", pos, end)
        colon = raw.find(b":", pos, end if first < 0 else first)
        if colon > pos:
            name = raw[pos:colon].strip(b" \t").lower().decode("latin-1")
            if name and (name in wanted) != negate:
                chunk = raw[pos:end]
                out.append(chunk if chunk.endswith(b"\n") else chunk + b"\r\n")
        pos = end
    out.append(b"\r\n")  # the blank line ends the returned header
    return b"".join(out)


@functools.lru_cache(maxsize=256)
def _wanted_fields(names: tuple[str, ...]) -> re.Pattern[bytes]:
    """Matches a whole field (folded lines included) whose name, lower-cased
    as top_header_fields does (ASCII only, latin-1), is one of ``names``."""
    wanted = {n.lower() for n in names}
    alts = sorted(re.escape(n.encode("latin-1")) for n in wanted if n and max(n) <= "\xff")
    if not alts:
        return re.compile(rb"(?!)")
    return re.compile(rb"(?im)^(?:" + b"|".join(alts)
                      + rb")[ \t]*:[^\n]*\n?(?:[ \t][^\n]*\n?)*")


def _header_fields(raw: bytes, msg: Part, names: tuple[str, ...], negate: bool) -> bytes:
    wanted = {n.lower() for n in names}
    out = []
    for f in msg.fields:
        if not f.name or (f.name in wanted) == negate:
            continue
        chunk = raw[f.start : f.end]
        out.append(chunk if chunk.endswith(b"\n") else chunk + b"\r\n")
    out.append(b"\r\n")  # the blank line ends the returned header
    return b"".join(out)


def _message_section(raw: bytes, msg: Part, spec: str | None, fields: tuple[str, ...]) -> bytes:
    if spec is None:
        return raw[msg.hstart : msg.end]
    if spec == "HEADER":
        return raw[msg.hstart : msg.bstart]
    if spec == "TEXT":
        return raw[msg.bstart : msg.end]
    if spec == "HEADER.FIELDS":
        return _header_fields(raw, msg, fields, False)
    if spec == "HEADER.FIELDS.NOT":
        return _header_fields(raw, msg, fields, True)
    return b""


def fetch_section(
    raw: bytes,
    part: tuple[int, ...],
    specifier: str | None,
    fields: tuple[str, ...] = (),
) -> bytes:
    """The octets of BODY[section]; b"" for a part or specifier that does not exist.

    part=() addresses the whole message; specifier is None, "HEADER",
    "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT" or (with a part) "MIME".
    HEADER.FIELDS output keeps folded lines as stored and ends with the
    blank line.
    """
    spec = specifier.upper() if specifier else None
    if not part:
        if spec == "MIME":
            return b""
        if spec is None:
            return raw
        if spec in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            return top_header_fields(raw, fields, spec == "HEADER.FIELDS.NOT")
        return _message_section(raw, scan_header(raw), spec, fields)
    if any(n < 1 for n in part):
        return b""
    sel = _resolve(scan(raw), part)
    if sel is None:
        return b""
    if spec is None:
        return raw[sel.bstart : sel.end]
    if spec == "MIME":
        return raw[sel.hstart : sel.bstart]
    if sel.message is None:
        return b""
    return _message_section(raw, sel.message, spec, fields)


# --------------------------------------------------------------------------
# SEARCH helpers (RFC 3501 §6.4.4)


def header_text(meta: dict, name: str, raw: bytes | None = None) -> str:
    """Decoded (RFC 2047) value of a header field; "" if absent.

    With raw, every occurrence is read from the message (joined by newlines);
    without it, only the fields kept in the metadata are available.
    """
    lname = name.lower()
    if raw is not None:
        return "\n".join(decode_words(v) for v in header_values(raw, lname))
    headers = meta.get("headers") or {}
    if lname == "subject":
        return headers.get("subject") or ""
    if lname in ("from", "to", "cc", "bcc"):
        return (headers.get(lname) or {}).get("decoded") or ""
    if lname in ("message-id", "in-reply-to", "references"):
        return headers.get(lname.replace("-", "_")) or ""
    if lname == "date":
        return (meta.get("envelope") or {}).get("date") or ""
    return ""


def _charset(part: Part) -> str:
    for name, value in part.params:
        if name == "charset":
            return value
    return "us-ascii"


def _decode_transfer(data: bytes, encoding: str | None) -> bytes:
    """Undo a Content-Transfer-Encoding (RFC 2045 §6), tolerating damage."""
    enc = (encoding or "").lower()
    try:
        if enc == "base64":
            clean = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
            if len(clean) % 4 == 1:
                clean = clean[:-1]
            return base64.b64decode(clean + b"=" * (-len(clean) % 4))
        if enc == "quoted-printable":
            return binascii.a2b_qp(data)
    except (binascii.Error, ValueError):
        return data
    return data


def _headers_text(raw: bytes, msg: Part) -> list[str]:
    out = []
    for f in msg.fields:
        if not f.name:
            continue
        value = raw[f.vstart : f.end].replace(b"\r", b"").replace(b"\n", b"")
        out.append(f.name + ": " + decode_words(value.strip().decode("utf-8", "replace")))
    return out


def _collect(raw: bytes, part: Part, out: list[str]) -> None:
    if part.multipart:
        for child in part.children:
            _collect(raw, child, out)
    elif part.message is not None:
        out.extend(_headers_text(raw, part.message))
        _collect(raw, part.message, out)
    elif part.type.lower() == "text" and not part.overflow:
        data = _decode_transfer(raw[part.bstart : part.end], part.encoding)
        out.append(decode_charset(data, _charset(part)))


def body_text(raw: bytes) -> str:
    """Decoded text of the text/* parts (and embedded messages) for SEARCH BODY."""
    out: list[str] = []
    _collect(raw, scan(raw), out)
    return "\n".join(out)


def full_text(raw: bytes) -> str:
    """Decoded header fields and body text, for SEARCH TEXT."""
    root = scan(raw)
    out = _headers_text(raw, root)
    _collect(raw, root, out)
    return "\n".join(out)


def sent_date(meta: dict) -> float | None:
    """The Date: header as seconds since the epoch (RFC 5322 §3.3), or None."""
    value = (meta.get("headers") or {}).get("date")
    return float(value) if isinstance(value, int | float) else None
