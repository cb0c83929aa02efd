"""The POP3 sans-I/O core: framing, state table, SASL framing, dot-stuffing.

Every framing test feeds its input whole, one byte at a time and randomly
split; the events must be the same (the dovecot test-imap-parser habit).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest

from node.pop3 import protocol as p

RFC1939_TRANSACTION_EXAMPLE = (  # RFC 1939 §10, the client's side, plus §7 extras
    b"USER mrose\r\nPASS tanstaaf\r\nSTAT\r\nLIST\r\nRETR 1\r\nDELE 1\r\n"
    b"RETR 2\r\nDELE 2\r\nTOP 1 10\r\nUIDL\r\nUIDL 2\r\nNOOP\r\nRSET\r\nQUIT\r\n"
)


def splits(data: bytes, seeds: int = 20) -> Iterator[list[bytes]]:
    """The same input whole, bytewise, and randomly split."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for seed in range(seeds):
        rnd = random.Random(seed)
        cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randint(1, 8))))
        yield [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def run(
    pieces: list[bytes],
    after: Callable[[p.Pop3Connection, object], None] = lambda c, e: None,
    max_line_length: int = 512,
) -> list[object]:
    conn = p.Pop3Connection(max_line_length)
    out: list[object] = []
    for piece in pieces:
        conn.receive_data(piece)
        while (ev := conn.next_event()) is not p.NEED_DATA:
            out.append(ev)
            after(conn, ev)
    return out


def login_after_pass(conn: p.Pop3Connection, ev: object) -> None:
    if isinstance(ev, p.Command) and ev.name == "PASS":
        conn.transition(p.State.TRANSACTION)
    if isinstance(ev, p.Command) and ev.name == "QUIT":
        conn.transition(p.State.UPDATE)


def test_rfc1939_example_session_every_split() -> None:
    expected = [
        p.Command("USER", ("mrose",)),
        p.Command("PASS", ("tanstaaf",)),
        p.Command("STAT"),
        p.Command("LIST"),
        p.Command("RETR", ("1",)),
        p.Command("DELE", ("1",)),
        p.Command("RETR", ("2",)),
        p.Command("DELE", ("2",)),
        p.Command("TOP", ("1", "10")),
        p.Command("UIDL"),
        p.Command("UIDL", ("2",)),
        p.Command("NOOP"),
        p.Command("RSET"),
        p.Command("QUIT"),
    ]
    n = 0
    for pieces in splits(RFC1939_TRANSACTION_EXAMPLE):
        assert run(pieces, login_after_pass) == expected
        n += 1
    assert n == 22


def test_keywords_are_case_insensitive_and_bare_lf_accepted() -> None:
    for pieces in splits(b"capa\nQuIt\r\n"):
        assert run(pieces) == [p.Command("CAPA"), p.Command("QUIT")]


def test_pass_keeps_spaces_in_the_password() -> None:
    # RFC 1939 §7: a server may treat spaces in the PASS argument as part of it.
    assert run([b"PASS  two words \r\n"]) == [p.Command("PASS", (" two words ",))]


def test_state_table_refuses_commands_of_another_state() -> None:
    # RFC 1939 §4: only USER/PASS/APOP/QUIT (and CAPA, STLS, AUTH) before login.
    for name in ("STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 1", "UIDL"):
        assert run([name.encode() + b"\r\n"]) == [p.BadInput(p.ERR_BAD_STATE)]
    for name in ("USER a", "PASS b", "AUTH PLAIN", "STLS"):
        conn = p.Pop3Connection()
        conn.transition(p.State.TRANSACTION)
        conn.receive_data(name.encode() + b"\r\n")
        assert conn.next_event() == p.BadInput(p.ERR_BAD_STATE), name
    conn = p.Pop3Connection()
    conn.transition(p.State.TRANSACTION)
    conn.transition(p.State.UPDATE)
    conn.receive_data(b"QUIT\r\n")
    assert conn.next_event() == p.BadInput(p.ERR_BAD_STATE)


def test_non_ascii_keyword_never_folds_into_a_command() -> None:
    assert "\u017fTAT".upper() == "STAT"
    conn = p.Pop3Connection()
    conn.transition(p.State.TRANSACTION)
    conn.receive_data("\u017ftat\r\n".encode())
    assert conn.next_event() == p.BadInput(p.ERR_UNKNOWN)


def test_apop_is_not_offered() -> None:
    assert run([b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"]) == [p.BadInput(p.ERR_UNKNOWN)]


@pytest.mark.parametrize(
    "line",
    [b"STAT 1", b"RETR", b"TOP 1", b"TOP 1 2 3", b"LIST 1 2", b"USER", b"CAPA x", b"QUIT now"],
)
def test_argument_counts(line: bytes) -> None:
    conn = p.Pop3Connection()
    if not line.startswith((b"USER", b"CAPA", b"QUIT")):
        conn.transition(p.State.TRANSACTION)
    conn.receive_data(line + b"\r\n")
    assert conn.next_event() == p.BadInput(p.ERR_SYNTAX)


def test_empty_unknown_and_non_utf8_lines() -> None:
    assert run([b"\r\n", b"XYZZY\r\n", b"US\xffER x\r\n"]) == [
        p.BadInput(p.ERR_EMPTY),
        p.BadInput(p.ERR_UNKNOWN),
        p.BadInput(p.ERR_NOT_UTF8),
    ]


def test_line_too_long_gives_one_error_and_resyncs_every_split() -> None:
    # RFC 2449 §4; the cap counts the CRLF.
    data = b"USER " + b"x" * 600 + b"\r\nCAPA\r\n"
    for pieces in splits(data):
        assert run(pieces, max_line_length=64) == [
            p.BadInput(p.ERR_LINE_TOO_LONG),
            p.Command("CAPA"),
        ]


def test_line_exactly_at_the_cap_is_accepted() -> None:
    line = b"USER " + b"x" * (64 - 7) + b"\r\n"
    assert len(line) == 64
    for pieces in splits(line + line + b"x" + line):
        evs = run(pieces, max_line_length=64)
        assert evs == [
            p.Command("USER", ("x" * 57,)),
            p.Command("USER", ("x" * 57,)),
            p.BadInput(p.ERR_LINE_TOO_LONG),
        ]


def test_sasl_exchange_framing() -> None:
    # RFC 5034 §4: after "+ " the next line is a response, "*" cancels.
    def after(conn: p.Pop3Connection, ev: object) -> None:
        if isinstance(ev, p.Command) and ev.name == "AUTH" and len(ev.args) == 1:
            conn.expect_sasl_response()

    data = b"AUTH PLAIN\r\nAGFsaWNlAHB3\r\nAUTH PLAIN\r\n*\r\nAUTH PLAIN AGFsaWNlAHB3\r\nNOOP\r\n"
    for pieces in splits(data):
        assert run(pieces, after) == [
            p.Command("AUTH", ("PLAIN",)),
            p.SaslResponse(b"AGFsaWNlAHB3"),
            p.Command("AUTH", ("PLAIN",)),
            p.SaslCancel(),
            p.Command("AUTH", ("PLAIN", "AGFsaWNlAHB3")),
            p.BadInput(p.ERR_BAD_STATE),
        ]


def test_discard_input_drops_pipelined_plaintext() -> None:
    # RFC 2595 §4: nothing pipelined after STLS may be acted on.
    conn = p.Pop3Connection()
    conn.receive_data(b"STLS\r\nUSER evil\r\nPASS x")
    assert conn.next_event() == p.Command("STLS")
    assert conn.discard_input() == b"USER evil\r\nPASS x"
    assert conn.next_event() is p.NEED_DATA


def test_illegal_transition_is_our_bug() -> None:
    conn = p.Pop3Connection()
    with pytest.raises(p.LocalProtocolError):
        conn.transition(p.State.UPDATE)


def test_reply_encoding_with_response_codes() -> None:
    # RFC 2449 §8, RFC 3206.
    assert p.ok("hi").encode() == b"+OK hi\r\n"
    assert p.ok().encode() == b"+OK\r\n"
    assert p.err("locked", p.RespCode.IN_USE).encode() == b"-ERR [IN-USE] locked\r\n"
    assert p.err("x\r\nEVIL", p.RespCode.SYS_TEMP).encode() == b"-ERR [SYS/TEMP] x  EVIL\r\n"
    assert p.err("x", p.RespCode.SYS_TEMP).temporary
    assert not p.err("x", p.RespCode.AUTH).temporary


def stuffed(body: bytes, chunk: int = 7) -> bytes:
    return b"".join(p.multiline(p.ok(), [body], chunk_size=chunk))


def test_dot_stuffing_rfc1939_section3() -> None:
    body = b".starts with dot\r\nmiddle\r\n.\r\n..two\r\nend\r\n"
    wire = stuffed(body)
    assert wire == (b"+OK\r\n..starts with dot\r\nmiddle\r\n..\r\n...two\r\nend\r\n.\r\n")
    assert p.unstuff(wire[len(b"+OK\r\n") :]) == body


def test_dot_stuffing_across_every_chunk_boundary() -> None:
    body = b"a\r\n.b\r\n.\r\n\n.c\r\n"
    expected = stuffed(body, chunk=1 << 20)
    for chunk in range(1, len(body) + 1):
        assert stuffed(body, chunk) == expected


def test_body_without_final_crlf_gets_one_and_empty_body() -> None:
    assert stuffed(b"no newline") == b"+OK\r\nno newline\r\n.\r\n"
    assert stuffed(b"") == b"+OK\r\n.\r\n"
    assert p.unstuff(b".\r\n") == b""


def test_top_of_message() -> None:
    msg = b"From: a\r\nSubject: s\r\n\r\nl1\r\nl2\r\nl3\r\n"
    assert p.top_of_message(msg, 0) == b"From: a\r\nSubject: s\r\n\r\n"
    assert p.top_of_message(msg, 2) == b"From: a\r\nSubject: s\r\n\r\nl1\r\nl2\r\n"
    assert p.top_of_message(msg, 99) == msg
    assert p.top_of_message(b"From: a\r\n", 5) == b"From: a\r\n"  # no body
    assert p.top_of_message(b"\r\nbody\r\n", 0) == b"\r\n"
    assert p.top_of_message(b"A: b\n\nx\ny\n", 1) == b"A: b\n\nx\n"


def test_parse_number() -> None:
    assert p.parse_number("1") == 1
    for bad in ("", "0x1", "-1", "+1", "1.0", "١", "12345678901", " 1"):
        assert p.parse_number(bad) is None
