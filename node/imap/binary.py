"""BINARY (RFC 3516): FETCH BINARY[section], BINARY.PEEK and BINARY.SIZE.

The server undoes the Content-Transfer-Encoding of a leaf part (RFC 3516
§4.2) so the client gets the decoded octets; 7bit, 8bit and binary parts
are sent as stored.  An encoding we do not know is `NO [UNKNOWN-CTE]`
(§4.3).  Data with NUL octets goes out as literal8 ``~{n}`` (§4.2, RFC 9051
§4.3), everything else as an ordinary literal.  Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re

from node.imap.mime import _resolve
from node.imap.protocol import Atom, FetchItem, Raw
from storage.mime import scan

IDENTITY = frozenset({"7bit", "8bit", "binary", ""})


class UnknownCte(Exception):
    """The part's Content-Transfer-Encoding cannot be decoded (RFC 3516 §4.3)."""


def decoded_section(raw: bytes, part: tuple[int, ...]) -> bytes:
    """The decoded content of BINARY[part]; b"" for a part that does not exist.

    An empty part is the whole message, unchanged.  Composite parts
    (multipart, message/rfc822) can only be 7bit/8bit/binary and are sent as
    stored.  Raises UnknownCte.
    """
    if not part:
        return raw
    sel = _resolve(scan(raw), part)
    if sel is None:
        return b""
    body = raw[sel.bstart : sel.end]
    enc = (sel.encoding or "").strip().lower()
    if sel.multipart or sel.message is not None or enc in IDENTITY:
        return body
    if enc == "base64":
        # Tolerant like deployed servers: ignore line breaks and stray octets.
        clean = re.sub(rb"[^A-Za-z0-9+/]", b"", body)
        if len(clean) % 4 == 1:
            clean = clean[:-1]
        try:
            return base64.b64decode(clean + b"=" * (-len(clean) % 4))
        except (binascii.Error, ValueError):
            raise UnknownCte(enc) from None
    if enc == "quoted-printable":
        return binascii.a2b_qp(body)
    raise UnknownCte(enc)


def literal(data: bytes) -> Raw:
    """literal8 when the data carries NUL (RFC 3516 §4.2), else a literal."""
    prefix = b"~" if b"\x00" in data else b""
    return Raw(prefix + b"{%d}\r\n" % len(data) + data)


def fetch_item(raw: bytes, item: FetchItem) -> list[object]:
    """[name, value] of one BINARY[...]<p> or BINARY.SIZE[...] fetch item."""
    assert item.section is not None
    data = decoded_section(raw, item.section.part)
    if item.name == "BINARY.SIZE[]":
        return [Atom(item.response_name()), len(data)]
    if item.partial is not None:
        origin, count = item.partial
        data = data[origin : origin + count]
    return [Atom(item.response_name()), literal(data)]
