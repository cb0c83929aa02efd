"""storage/mime.py: metadata parsed once at delivery (RFC 5322, RFC 2045-2047, RFC 2231)."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from storage.mime import (
    MAX_ADDRESSES,
    MAX_DEPTH,
    MAX_PARTS,
    decode_param,
    decode_words,
    parse_addresses,
    parse_date,
    parse_metadata,
    scan,
)

CORPUS = Path(__file__).resolve().parents[2] / "corpus"


def _corpus() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.glob("*.eml"))]


def _walk(part: dict):
    yield part
    for child in part.get("parts", []):
        yield from _walk(child)
    if "message" in part:
        yield from _walk(part["message"])


# -- offsets are byte-exact ------------------------------------------------


def test_offsets_and_sizes_of_multipart() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\none\r\n"
        b"--b\r\n\r\ntwo\r\n\r\n--b--\r\n"
    )
    body = parse_metadata(raw)["body"]
    one, two = body["parts"]
    hs, bs, end = one["offsets"]
    assert raw[hs:bs] == b"Content-Type: text/plain\r\n\r\n"
    # RFC 2046 §5.1.1: the CRLF before a delimiter belongs to the delimiter.
    assert raw[bs:end] == b"one"
    assert one["size"] == 3 and one["lines"] == 0
    hs, bs, end = two["offsets"]
    assert raw[hs:bs] == b"\r\n"
    assert raw[bs:end] == b"two\r\n"
    assert two["size"] == 5 and two["lines"] == 1


def test_every_part_size_matches_its_offsets_in_the_corpus() -> None:
    count = 0
    for raw in _corpus():
        meta = parse_metadata(raw)
        assert meta["size"] == len(raw)
        for part in _walk(meta["body"]):
            hs, bs, end = part["offsets"]
            assert 0 <= hs <= bs <= end <= len(raw)
            assert part["size"] == end - bs
            count += 1
    assert count >= 20


def test_rfc822_part_carries_inner_envelope_and_offsets() -> None:
    raw = (CORPUS / "05-rfc822-attachment.eml").read_bytes()
    part = parse_metadata(raw)["body"]["parts"][1]
    assert part["envelope"]["subject"] == "lunch"
    inner = part["message"]
    assert inner["offsets"][0] == part["offsets"][1]  # inner header starts at the body
    assert raw[inner["offsets"][1] : inner["offsets"][2]] == b"Noon?\r\n"


def test_header_only_and_empty_body() -> None:
    meta = parse_metadata(b"Subject: x\r\n")
    assert meta["body"]["offsets"] == [0, 12, 12] and meta["body"]["size"] == 0
    meta = parse_metadata(b"Subject: x\r\n\r\n")
    assert meta["body"]["offsets"] == [0, 14, 14]
    meta = parse_metadata(b"")
    assert meta["body"]["size"] == 0 and meta["envelope"]["subject"] is None


def test_lf_only_message_is_measured_as_stored() -> None:
    meta = parse_metadata(b"Subject: lf\n\nline one\nline two\n")
    assert meta["body"]["size"] == 18 and meta["body"]["lines"] == 2


def test_delimiter_needs_line_start() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\ntext --b not here\n--b--\n"
    parts = parse_metadata(raw)["body"]["parts"]
    assert len(parts) == 1 and parts[0]["size"] == len(b"text --b not here")


def test_outer_boundary_ends_unterminated_inner_multipart() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=outer\n\n"
        b"--outer\nContent-Type: multipart/alternative; boundary=inner\n\n"
        b"--inner\n\na\n--outer\n\nb\n--outer--\n"
    )
    body = parse_metadata(raw)["body"]
    assert len(body["parts"]) == 2
    assert body["parts"][0]["parts"][0]["size"] == 1  # "a", cut at the outer delimiter


def test_encoded_message_rfc822_is_opaque() -> None:
    # RFC 2046 §5.2.1: message/rfc822 may not be encoded; if it is, it cannot
    # carry an envelope, so it is reported as application/octet-stream.
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"RnJvbTogYUBiDQoNCng=\r\n--b--\r\n"
    )
    part = parse_metadata(raw)["body"]["parts"][0]
    assert (part["type"], part["subtype"]) == ("application", "octet-stream")
    assert "message" not in part and part["encoding"] == "base64" and part["size"] == 20


# -- limits ---------------------------------------------------------------


def test_nesting_depth_is_capped() -> None:
    depth = MAX_DEPTH + 20
    head = b"".join(
        b"--b%03dx\nContent-Type: multipart/mixed; boundary=b%03dx\n\n" % (i, i + 1)
        for i in range(depth)
    )
    raw = (
        b"Content-Type: multipart/mixed; boundary=b000x\n\n" + head + b"--b%03dx\n\nleaf\n" % depth
    )
    meta = parse_metadata(raw)
    levels, part = 0, meta["body"]
    while "parts" in part and part["parts"]:
        part = part["parts"][0]
        levels += 1
    assert levels == MAX_DEPTH
    assert (part["type"], part["subtype"]) == ("application", "octet-stream")


def test_part_count_is_capped() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b\n\n" + b"--b\n\nx\n" * (MAX_PARTS + 50)
    parts = parse_metadata(raw)["body"]["parts"]
    assert len(parts) < MAX_PARTS


def test_deep_rfc822_nesting_is_capped() -> None:
    raw = b"Content-Type: message/rfc822\n\n" * (MAX_DEPTH + 10) + b"end\n"
    root = scan(raw)
    levels = 0
    while root.message is not None:
        root = root.message
        levels += 1
    assert levels == MAX_DEPTH and root.overflow


# -- header decoding ------------------------------------------------------


def test_rfc2047_decoding_several_charsets() -> None:
    # RFC 2047 §8 examples and multi-octet charsets.
    assert decode_words("=?ISO-8859-1?Q?Andr=E9?= Pirard") == "André Pirard"
    assert decode_words("(=?ISO-8859-1?Q?a?= =?ISO-8859-1?Q?b?=)") == "(ab)"
    assert decode_words("=?ISO-8859-1?Q?a?=  \t =?ISO-8859-2?Q?_b?=") == "a b"
    assert decode_words("=?KOI8-R?B?8NLJ18XU?=") == "Привет"
    assert decode_words("=?Shift_JIS?B?k/qWe4zq?=") == "日本語"
    assert decode_words("=?windows-1252?q?=80uro?=") == "€uro"
    assert decode_words("a =?utf-8?q?b?= c") == "a b c"


def test_rfc2047_word_split_inside_a_character() -> None:
    # "é" is C3 A9 in UTF-8; split across two adjacent words it must still decode.
    assert decode_words("=?utf-8?q?caf=C3?= =?utf-8?q?=A9?=") == "café"


def test_rfc2047_bad_words_do_not_raise() -> None:
    assert decode_words("=?no-such-charset?q?abc?=") == "abc"
    assert decode_words("=?utf-8?b?####?=") == ""
    assert decode_words("=?utf-8?x?abc?=") == "=?utf-8?x?abc?="
    assert decode_words("=?base64?b?YWJj?=") == "abc"  # not a text codec: fallback


def test_subject_and_addresses_decoded_for_search() -> None:
    raw = (CORPUS / "11-encoded-words.eml").read_bytes()
    headers = parse_metadata(raw)["headers"]
    assert headers["subject"] == "élèveПривет日本語"
    assert headers["from"]["decoded"] == "André Pirard <PIRARD@vm1.ulg.ac.be>"
    assert headers["cc"]["raw"].startswith("=?ISO-8859-1?Q?Olle")
    assert headers["date"] == 1743922800.0


def test_8bit_header_kept_as_utf8_with_replacement() -> None:
    meta = parse_metadata("Subject: Grüße\r\n\r\n".encode())
    assert meta["envelope"]["subject"] == "Grüße"
    meta = parse_metadata(b"Subject: caf\xe9\r\n\r\n")
    assert meta["envelope"]["subject"] == "caf\ufffd"


def test_rfc2231_parameters() -> None:
    raw = (CORPUS / "19-rfc2231-continuations.eml").read_bytes()
    part = parse_metadata(raw)["body"]["parts"][0]
    assert part["params"] == [["name", "very long file name.bin"]]
    assert part["disposition"][1] == [["filename*", "utf-8''%E2%82%AC%20rates.txt"]]
    assert part["filename"] == "€ rates.txt"
    assert decode_param("title*", "us-ascii'en'This%20is") == "This is"
    assert decode_param("title*", "broken") == "broken"


def test_date_parsing_is_tolerant() -> None:
    assert parse_date("Mon, 7 Feb 1994 21:52:25 -0800") == 760686745.0
    assert parse_date("7 Feb 1994 21:52:25 PST") == 760686745.0  # obsolete zone, RFC 5322 §4.3
    assert parse_date("Mon, 7 Feb 94 21:52:25 -0800") == 760686745.0  # two-digit year
    assert parse_date("garbage") is None
    assert parse_date("") is None
    assert parse_date("Mon, 7 Feb 99999999999 21:52:25 -0800") is None


# -- addresses (RFC 5322 §3.4 into RFC 3501 §7.4.2) -------------------------


def test_addresses() -> None:
    assert parse_addresses("a@b.c") == [[None, None, "a", "b.c"]]
    assert parse_addresses('"Last, First" <f@x.y>') == [["Last, First", None, "f", "x.y"]]
    assert parse_addresses('"quoted local"@x.y') == [[None, None, '"quoted local"', "x.y"]]
    assert parse_addresses("g:;") == [[None, None, "g", None], [None, None, None, None]]
    # an unterminated group is closed so clients see balanced markers
    assert parse_addresses("g: a@b") == [
        [None, None, "g", None],
        [None, None, "a", "b"],
        [None, None, None, None],
    ]
    assert parse_addresses("") is None
    assert parse_addresses(None) is None
    assert parse_addresses("@") is None
    assert parse_addresses("a@") == [[None, None, "a", "MISSING_DOMAIN"]]
    assert parse_addresses("@b") == [[None, None, "MISSING_MAILBOX", "b"]]
    assert parse_addresses("Name <a@[127.0.0.1]>") == [["Name", None, "a", "[127.0.0.1]"]]


def test_address_count_is_capped_and_groups_stay_balanced() -> None:
    many = ", ".join(f"u{i}@example.org" for i in range(MAX_ADDRESSES * 3))
    assert len(parse_addresses(many) or []) == MAX_ADDRESSES
    grouped = parse_addresses("big: " + many + ";") or []
    assert grouped[0] == [None, None, "big", None]
    assert grouped[-1] == [None, None, None, None]


def test_sender_and_reply_to_default_to_from() -> None:
    env = parse_metadata(b"From: a@b\r\nSender:\r\nReply-To: \r\n\r\n")["envelope"]
    assert env["sender"] == env["from"] == env["reply_to"] == [[None, None, "a", "b"]]
    env = parse_metadata(b"From: a@b\r\nSender: s@b\r\n\r\n")["envelope"]
    assert env["sender"] == [[None, None, "s", "b"]]


# -- never raise ------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_parse_metadata_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    meta = parse_metadata(raw)
    json.dumps(meta)  # JSON-serializable
    assert meta["size"] == len(raw)


_MIME_ALPHABET = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"--b",
        b"--b--",
        b": ",
        b"Content-Type: multipart/mixed; boundary=b",
        b"Content-Type: message/rfc822",
        b"=?utf-8?q?",
        b"?=",
        b'"',
        b"(",
        b")",
        b"<",
        b">",
        b"@",
        b",",
        b";",
        b":",
        b"\t",
        b" ",
        b"x",
        b"\xff",
        b"\x00",
        b"*0*=",
        b"'",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MIME_ALPHABET, max_size=200).map(b"".join))
def test_parse_metadata_never_raises_on_mime_shaped_noise(raw: bytes) -> None:
    meta = parse_metadata(raw)
    for part in _walk(meta["body"]):
        hs, bs, end = part["offsets"]
        assert 0 <= hs <= bs <= end <= len(raw)
