"""node/imap/mime.py: BODY[section] (RFC 3501 §6.4.5), strings (§4.3), search text (§6.4.4)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from node.imap import mime
from node.imap.mime import (
    astring,
    body_text,
    bodystructure,
    envelope,
    fetch_section,
    full_text,
    header_text,
    sent_date,
)
from storage.mime import parse_metadata, scan_header

CORPUS = Path(__file__).resolve().parents[2] / "corpus"
CORPUS_MESSAGES = [p.read_bytes() for p in sorted(CORPUS.glob("*.eml"))]

NESTED = (CORPUS / "05-rfc822-attachment.eml").read_bytes()
SIMPLE = (CORPUS / "01-rfc3501-simple.eml").read_bytes()


# -- BODY[section] ----------------------------------------------------------


def test_whole_message_header_and_text() -> None:
    header, _, text = SIMPLE.partition(b"\r\n\r\n")
    assert fetch_section(SIMPLE, (), None) == SIMPLE
    assert fetch_section(SIMPLE, (), "HEADER") == header + b"\r\n\r\n"
    assert fetch_section(SIMPLE, (), "TEXT") == text
    assert fetch_section(SIMPLE, (), "header") == header + b"\r\n\r\n"  # case-insensitive


def test_non_multipart_message_part_one_is_its_body() -> None:
    # RFC 3501 §6.4.5: "Every message has at least one part number."
    header, _, text = SIMPLE.partition(b"\r\n\r\n")
    assert fetch_section(SIMPLE, (1,), None) == text
    assert fetch_section(SIMPLE, (1,), "MIME") == header + b"\r\n\r\n"
    assert fetch_section(SIMPLE, (2,), None) == b""
    assert fetch_section(SIMPLE, (1, 1), None) == b""
    assert fetch_section(SIMPLE, (1,), "TEXT") == b""  # not a message/rfc822 part


def test_multipart_parts_and_mime_headers() -> None:
    assert fetch_section(NESTED, (1,), None) == b"FYI\r\n"
    assert (
        fetch_section(NESTED, (1,), "MIME") == b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    assert fetch_section(NESTED, (2,), "MIME") == (
        b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n"
    )
    assert fetch_section(NESTED, (3,), None) == b""
    assert fetch_section(NESTED, (0,), None) == b""
    assert fetch_section(NESTED, (), "MIME") == b""


def test_message_rfc822_part_header_text_and_subparts() -> None:
    inner = fetch_section(NESTED, (2,), None)
    assert inner.startswith(b"From: Mallory") and inner.endswith(b"Noon?\r\n")
    header = fetch_section(NESTED, (2,), "HEADER")
    assert header.startswith(b"From: Mallory") and header.endswith(b">\r\n\r\n")
    assert fetch_section(NESTED, (2,), "TEXT") == b"Noon?\r\n"
    assert header + fetch_section(NESTED, (2,), "TEXT") == inner
    assert fetch_section(NESTED, (2,), "HEADER.FIELDS", ("subject",)) == b"Subject: lunch\r\n\r\n"
    not_fields = fetch_section(NESTED, (2,), "HEADER.FIELDS.NOT", ("from", "to", "date"))
    assert not_fields == b"Subject: lunch\r\nMessage-ID: <lunch@example.com>\r\n\r\n"
    # inside the encapsulated (single-part) message, part 1 is its body
    assert fetch_section(NESTED, (2, 1), None) == b"Noon?\r\n"
    assert fetch_section(NESTED, (2, 1), "MIME") == header
    assert fetch_section(NESTED, (2, 2), None) == b""


def test_nested_multipart_numbering() -> None:
    raw = (CORPUS / "04-nested-multipart.eml").read_bytes()
    assert fetch_section(raw, (1, 1), None) == b"plain"
    assert fetch_section(raw, (1, 2), None) == b"<b>html</b>"
    assert fetch_section(raw, (1, 2), "MIME") == b"Content-Type: text/html\r\n\r\n"
    assert fetch_section(raw, (2,), None) == b"iVBORw0KGgo="
    assert fetch_section(raw, (1,), None).startswith(b"--inner\r\n")
    assert fetch_section(raw, (1, 3), None) == b""


def test_header_fields_keeps_folding_and_ends_with_blank_line() -> None:
    raw = b"Subject: a\r\n b\r\nX-A: 1\r\nsubject: again\r\nTo: t@x\r\n\r\nbody"
    got = fetch_section(raw, (), "HEADER.FIELDS", ("SUBJECT",))
    assert got == b"Subject: a\r\n b\r\nsubject: again\r\n\r\n"
    assert fetch_section(raw, (), "HEADER.FIELDS", ("nothing",)) == b"\r\n"
    got = fetch_section(raw, (), "HEADER.FIELDS.NOT", ("subject", "x-a"))
    assert got == b"To: t@x\r\n\r\n"


def test_header_fields_of_header_only_message_without_final_newline() -> None:
    raw = b"From: a@b\r\nSubject: s"
    assert fetch_section(raw, (), "HEADER.FIELDS", ("subject",)) == b"Subject: s\r\n\r\n"
    assert fetch_section(raw, (), "TEXT") == b""
    assert fetch_section(raw, (), "HEADER") == raw


def test_unknown_specifier_is_empty() -> None:
    assert fetch_section(SIMPLE, (), "BOGUS") == b""
    assert fetch_section(NESTED, (2,), "BOGUS") == b""


# -- strings (RFC 3501 §4.3) --------------------------------------------------


def test_astring_quoting() -> None:
    assert astring(None) == b"NIL"
    assert astring("") == b'""'
    assert astring('a "b" \\c') == b'"a \\"b\\" \\\\c"'
    assert astring("é") == b"{2}\r\n\xc3\xa9"
    assert astring("a\r\nb") == b"{4}\r\na\r\nb"
    assert astring("a\0b") == b'"ab"'  # NUL is allowed in neither form


# -- search helpers -----------------------------------------------------------


def test_header_text() -> None:
    raw = (CORPUS / "11-encoded-words.eml").read_bytes()
    meta = parse_metadata(raw)
    assert header_text(meta, "Subject") == "élèveПривет日本語"
    assert header_text(meta, "cc") == "Olle Järnefors <ojarnef@admin.kth.se>"
    assert header_text(meta, "X-Missing") == ""
    assert header_text(meta, "X-Missing", raw) == ""
    assert header_text(meta, "date", raw) == "Sun, 6 Apr 2025 07:00:00 +0000"
    dup = (CORPUS / "18-duplicate-headers.eml").read_bytes()
    assert header_text(parse_metadata(dup), "subject", dup) == "one\ntwo"
    assert header_text(parse_metadata(dup), "subject") == "one"


def test_body_text_decodes_transfer_encodings_and_charsets() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=z\r\n\r\n"
        b"--z\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9 au=\r\n lait\r\n"
        b"--z\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"PGI+R3LDvMOfZTwvYj4=\r\n"
        b"--z\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"c2VjcmV0\r\n"
        b"--z\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\nplain \xc3\xa9\r\n--z--\r\n"
    )
    text = body_text(raw)
    assert "café au lait" in text
    assert "<b>Grüße</b>" in text
    assert "secret" not in text  # not a text part
    assert "plain é" in text


def test_body_text_of_broken_base64_is_best_effort() -> None:
    raw = (CORPUS / "08-broken-base64.eml").read_bytes()
    assert body_text(raw).startswith("Hello world")


def test_full_text_has_decoded_headers_and_body() -> None:
    raw = (CORPUS / "11-encoded-words.eml").read_bytes()
    text = full_text(raw)
    assert "André Pirard" in text and "日本語" in text and "text" in text
    assert "Noon?" in full_text(NESTED) and "Mallory" in body_text(NESTED)


def test_sent_date() -> None:
    assert sent_date(parse_metadata(SIMPLE)) == 760686745.0
    assert sent_date(parse_metadata(b"Subject: no date\r\n\r\n")) is None
    assert sent_date({}) is None


# -- properties ---------------------------------------------------------------


def _numbered(scope: dict, prefix: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], dict]]:
    """Each part with its IMAP section number (RFC 3501 §6.4.5)."""
    if "parts" in scope:
        for i, child in enumerate(scope["parts"], 1):
            path = prefix + (i,)
            yield path, child
            if "parts" in child:
                yield from _numbered(child, path)
            elif "message" in child:
                yield from _numbered(child["message"], path)
    else:
        yield prefix + (1,), scope
        if "message" in scope:
            yield from _numbered(scope["message"], prefix + (1,))


def _check_sizes(raw: bytes) -> int:
    meta = parse_metadata(raw)
    assert fetch_section(raw, (), "HEADER") + fetch_section(raw, (), "TEXT") == raw
    if "parts" not in meta["body"]:
        assert len(fetch_section(raw, (), "TEXT")) == meta["body"]["size"]
    checked = 0
    for path, part in _numbered(meta["body"], ()):
        if "parts" in part:
            continue
        assert len(fetch_section(raw, path, None)) == part["size"], path
        if "message" in part:
            inner = fetch_section(raw, path, None)
            # the encapsulated message parsed on its own has the same structure
            assert bodystructure(parse_metadata(inner), True) == bodystructure(
                {"body": part["message"]}, True
            )
        checked += 1
    return checked


def test_sizes_are_byte_exact_over_the_corpus() -> None:
    assert sum(_check_sizes(raw) for raw in CORPUS_MESSAGES) >= 30


_SPECS = st.sampled_from([None, "HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"])
_PATHS = st.lists(st.integers(min_value=0, max_value=4), max_size=4).map(tuple)


def _exercise(raw: bytes, path: tuple[int, ...], spec: str | None) -> None:
    meta = parse_metadata(raw)
    assert envelope(meta).startswith(b"(")
    assert bodystructure(meta, True).startswith(b"(")
    assert bodystructure(meta, False).startswith(b"(")
    fetch_section(raw, path, spec, ("subject", "from"))
    header_text(meta, "subject", raw)
    full_text(raw)
    sent_date(meta)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), _PATHS, _SPECS)
def test_never_raises_on_arbitrary_bytes(
    raw: bytes, path: tuple[int, ...], spec: str | None
) -> None:
    _exercise(raw, path, spec)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(CORPUS_MESSAGES)))
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        op = draw(st.sampled_from(["delete", "insert", "flip"]))
        pos = draw(st.integers(min_value=0, max_value=len(raw)))
        if op == "delete":
            del raw[pos : pos + draw(st.integers(min_value=1, max_value=40))]
        elif op == "insert":
            raw[pos:pos] = draw(
                st.sampled_from([b"\r\n", b"\n", b"--", b'"', b"(", b"=?", b"?=", b"\xff", b";"])
            )
        elif raw:
            raw[min(pos, len(raw) - 1)] = draw(st.integers(min_value=0, max_value=255))
    return bytes(raw)


@settings(max_examples=400, deadline=None)
@given(_mutated(), _PATHS, _SPECS)
def test_mutated_corpus_never_raises_and_sizes_stay_exact(
    raw: bytes, path: tuple[int, ...], spec: str | None
) -> None:
    _exercise(raw, path, spec)
    _check_sizes(raw)


_HEADER_PIECES = st.sampled_from([
    b"From: a@x\r\n", b"To: b@y\r\n", b"Subject: s\r\n", b"subject : t\r\n", b"DATE:d\n",
    b" folded\r\n", b"\tfolded\n", b"no colon\r\n", b": empty\r\n", b"X-\xe9: 8bit\r\n",
    b"\r\n", b"\n", b"body\r\n", b"From: last", b"\r", b" ",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(_HEADER_PIECES, max_size=12), st.lists(
    st.sampled_from(["FROM", "to", "Subject", "date", "X-\xe9", "missing"]), min_size=1,
    max_size=3), st.booleans())
def test_top_header_fields_equals_the_general_path(pieces, names, negate) -> None:
    # RFC 3501 §6.4.5 HEADER.FIELDS / HEADER.FIELDS.NOT: the whole-message
    # fast path gives the same octets as the general one, folding, bare LF,
    # colon-less lines and a header without a blank line included.
    raw = b"".join(pieces)
    fields = tuple(names)
    general = mime._message_section(
        raw, scan_header(raw), "HEADER.FIELDS.NOT" if negate else "HEADER.FIELDS", fields)
    assert mime.top_header_fields(raw, fields, negate) == general
