"""BINARY (RFC 3516): FETCH BINARY[section], BINARY.PEEK, BINARY.SIZE,
UNKNOWN-CTE and APPEND with literal8, against the in-memory fakes."""

from __future__ import annotations

import base64

from node.imap.binary import UnknownCte, decoded_section
from tests.unit.imap.helpers import Client

PAYLOAD = bytes(range(256)) * 3  # NUL and every other octet

MIXED = (
    b"From: a@example.test\r\nSubject: bin\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
    b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"caf=C3=A9 =\r\nsoft break\r\n"
    b"--XX\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(PAYLOAD).replace(b"\n", b"\r\n")
    + b"--XX\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
    b"begin 644 x\r\n`\r\nend\r\n"
    b"--XX--\r\n"
)


def test_decoded_sections() -> None:
    # RFC 3516 §4.2: the content-transfer-decoded part.
    assert decoded_section(MIXED, (1,)) == "café soft break".encode()  # the CRLF before a boundary is the boundary's
    assert decoded_section(MIXED, (2,)) == PAYLOAD
    assert decoded_section(MIXED, (9,)) == b""
    assert decoded_section(MIXED, ()) == MIXED
    try:
        decoded_section(MIXED, (3,))
    except UnknownCte:
        pass
    else:
        raise AssertionError("x-uuencode is not a known encoding")


def _selected() -> Client:
    c = Client()
    c.login()
    c.deliver(MIXED)
    c.cmd("s SELECT INBOX")
    return c


def test_fetch_binary_peek_size_and_literal8() -> None:
    # RFC 3516 §4.2: NUL octets force literal8; BINARY.PEEK keeps \Seen off.
    c = _selected()
    out = c.feed(b"f FETCH 1 (BINARY.PEEK[2] BINARY.SIZE[2] BINARY.SIZE[1])\r\n")
    head = b"* 1 FETCH (BINARY[2] ~{%d}\r\n" % len(PAYLOAD)
    assert out.startswith(head)
    assert out[len(head) : len(head) + len(PAYLOAD)] == PAYLOAD
    assert out.endswith(
        b" BINARY.SIZE[2] %d BINARY.SIZE[1] 16)\r\nf OK FETCH completed\r\n" % len(PAYLOAD))
    assert b"\\Seen" not in c.cmd("f FETCH 1 FLAGS")[0]
    out = c.feed(b"f FETCH 1 BINARY[1]<0.4>\r\n")
    assert out.startswith(b"* 1 FETCH (BINARY[1]<0> {4}\r\ncaf\xc3 ")
    assert b"FLAGS (\\Seen)" in out  # RFC 3516 §4.2: like BODY[], sets \Seen


def test_unknown_cte_is_no() -> None:
    # RFC 3516 §4.3: NO [UNKNOWN-CTE].
    c = _selected()
    lines = c.cmd("f FETCH 1 BINARY.PEEK[3]")
    assert lines[-1] == b"f NO [UNKNOWN-CTE] unknown content-transfer-encoding"
    assert c.cmd("f FETCH 1 BINARY[1.MIME]")[-1].startswith(b"f BAD")


def test_append_literal8() -> None:
    # RFC 3516 §4.4: APPEND takes literal8 ~{n}; the octets are kept as sent.
    c = Client()
    c.login()
    raw = b"Subject: nul\r\n\r\nA\x00B\r\n"
    out = c.feed(b"a APPEND INBOX ~{%d}\r\n" % len(raw))
    assert out.startswith(b"+ ")
    assert b"a OK [APPENDUID " in c.feed(raw + b"\r\n")
    (row,) = c.store.messages("alice@example.test", "INBOX")
    assert c.store.read_message(row.blob) == raw
