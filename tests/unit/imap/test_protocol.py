"""The sans-I/O core: framing, parsing, encoding (RFC 3501 §2.2, §6, §9).

Every input is fed whole, one byte at a time and randomly split; the events
must be the same (dovecot's test-imap-parser does the same).
"""

from __future__ import annotations

import datetime
import random

import pytest

from node.imap.protocol import (
    NEED_DATA,
    STAR,
    Atom,
    Command,
    ContinuationRequest,
    FatalError,
    FetchItem,
    FramedCommand,
    Framer,
    Limits,
    Literal,
    LiteralTooLarge,
    ParseError,
    Raw,
    RawLine,
    Section,
    SeqSet,
    State,
    allowed,
    decode_mailbox,
    encode_command,
    encode_mailbox,
    encode_value,
    format_date_time,
    parse_command,
    parse_date_time,
)
from node.imap.search import SearchKey

LIMITS = Limits()


def events(data: bytes, split: str, limits: Limits = LIMITS, seed: int = 1) -> list:
    """Frame and parse data fed in pieces; answers continuations implicitly."""
    framer = Framer(limits)
    rng = random.Random(seed)
    if split == "whole":
        pieces = [data]
    elif split == "bytes":
        pieces = [data[i : i + 1] for i in range(len(data))]
    else:
        pieces, i = [], 0
        while i < len(data):
            n = rng.randint(1, 9)
            pieces.append(data[i : i + n])
            i += n
    out: list = []
    for piece in pieces:
        framer.receive(piece)
        while True:
            ev = framer.next_event()
            if ev is NEED_DATA:
                break
            if isinstance(ev, FramedCommand):
                try:
                    ev = parse_command(ev, limits)
                except ParseError as exc:
                    ev = ("BAD", exc.tag, exc.text)
            out.append(ev)
            if isinstance(ev, FatalError):
                return out
    return out


SPLITS = ("whole", "bytes", "random")

# Client commands from RFC 3501 §6 and the §8 sample, with what they parse to.
RFC_EXAMPLES: list[tuple[bytes, Command]] = [
    (b"a001 login mrc secret\r\n", None),
    (b"a002 select inbox\r\n", Command("a002", "SELECT", ("INBOX",))),
    (b"a003 fetch 12 full\r\n", Command("a003", "FETCH", (SeqSet(((12, 12),)), tuple(
        FetchItem(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"))))),
    (b"a004 fetch 12 body[header]\r\n", Command("a004", "FETCH", (SeqSet(((12, 12),)), (
        FetchItem("BODY[]", Section((), "HEADER")),)))),
    (b"a005 store 12 +flags \\deleted\r\n",
     Command("a005", "STORE", (SeqSet(((12, 12),)), "add", False, ("\\Deleted",)))),
    (b"a006 logout\r\n", Command("a006", "LOGOUT")),
    (b"A654 FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE FROM)])\r\n",
     Command("A654", "FETCH", (SeqSet(((2, 4),)), (
         FetchItem("FLAGS"), FetchItem("BODY[]", Section((), "HEADER.FIELDS", ("DATE", "FROM"))))))),
    (b"A282 SEARCH FLAGGED SINCE 1-Feb-1994 NOT FROM \"Smith\"\r\n",
     Command("A282", "SEARCH", (None, SearchKey("AND", (
         SearchKey("FLAGGED"), SearchKey("SINCE", (datetime.date(1994, 2, 1),)),
         SearchKey("NOT", (SearchKey("FROM", ("Smith",)),))))))),
    (b"A284 SEARCH CHARSET UTF-8 TEXT {6}\r\nXXXXXX\r\n",
     Command("A284", "SEARCH", ("UTF-8", SearchKey("TEXT", ("XXXXXX",))))),
    (b"A999 UID FETCH 4827313:4828442 FLAGS\r\n",
     Command("A999", "FETCH", (SeqSet(((4827313, 4828442),)), (FetchItem("FLAGS"),)), uid=True)),
    (b"A202 LIST ~/Mail/ %\r\n", Command("A202", "LIST", ("~/Mail/", "%"))),
    (b"A042 STATUS blurdybloop (UIDNEXT MESSAGES)\r\n",
     Command("A042", "STATUS", ("blurdybloop", ("UIDNEXT", "MESSAGES")))),
    (b"A003 APPEND saved-messages (\\Seen) {5}\r\nhello\r\n",
     Command("A003", "APPEND", ("saved-messages", ("\\Seen",), None, b"hello"))),
    (b"A003 COPY 2:4 MEETING\r\n", Command("A003", "COPY", (SeqSet(((2, 4),)), "MEETING"))),
    (b"a1 FETCH 1:* (UID BODY.PEEK[1.2.MIME] BODY[]<10.20>)\r\n",
     Command("a1", "FETCH", (SeqSet(((1, STAR),)), (
         FetchItem("UID"), FetchItem("BODY[]", Section((1, 2), "MIME"), peek=True),
         FetchItem("BODY[]", Section(), partial=(10, 20)))))),
    (b"t IDLE\r\n", Command("t", "IDLE")),
    (b"t AUTHENTICATE plain AGFsaWNlAHB3\r\n",
     Command("t", "AUTHENTICATE", ("PLAIN", "AGFsaWNlAHB3"))),
    (b"t UID EXPUNGE 3:5,7\r\n", Command("t", "EXPUNGE", (SeqSet(((3, 5), (7, 7))),), uid=True)),
]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("wire,expected", RFC_EXAMPLES, ids=lambda v: repr(v)[:30])
def test_rfc_examples_parse_the_same_however_split(wire: bytes, expected, split: str) -> None:
    evs = [e for e in events(wire, split) if not isinstance(e, ContinuationRequest)]
    assert len(evs) == 1
    if expected is not None:
        assert evs[0] == expected
    assert isinstance(evs[0], Command)
    # encode is the inverse: parse(encode(c)) == c
    again = [e for e in events(encode_command(evs[0]), split)
             if not isinstance(e, ContinuationRequest)]
    assert again == evs


def test_login_password_is_secret() -> None:
    cmd = events(b"a LOGIN alice {6}\r\np\"w \\x\r\n", "whole")[1]
    assert cmd.args[0] == "alice" and cmd.args[1].value == b'p"w \\x'
    assert "p\"w" not in repr(cmd)


@pytest.mark.parametrize("split", SPLITS)
def test_pipelined_commands_and_continuations(split: str) -> None:
    wire = b"a NOOP\r\nb APPEND INBOX {3}\r\nxyz\r\nc LOGOUT\r\n"
    evs = events(wire, split)
    assert [type(e).__name__ for e in evs] == [
        "Command", "ContinuationRequest", "Command", "Command"]


@pytest.mark.parametrize("wire,text", [
    (b"\r\n", "missing or invalid tag"),
    (b"a\r\n", "expected SP"),
    (b"a FOO\r\n", "unknown command"),
    (b"a UID LOGIN x y\r\n", "unknown UID command"),
    (b"a FETCH 0 FLAGS\r\n", "expected non-zero number"),
    (b"a FETCH 1 (FLAGS\r\n", "expected SP"),
    (b"a FETCH 1 BODY[1.]\r\n", "bad section"),
    (b"a FETCH 1 BODY[MIME]\r\n", "bad section"),
    (b"a FETCH 1 RFC999\r\n", "unknown fetch item"),
    (b"a SELECT \"unterminated\r\n", "unterminated quoted string"),
    (b"a SELECT &Jjo\r\n", "bad mailbox name encoding"),
    (b"a STORE 1 FLAGS (\\Recent)\r\n", "\\Recent cannot be set"),
    (b"a SEARCH SINCE 31-Feb-2020\r\n", "bad date"),
    (b"a APPEND INBOX \"99-Foo-2020 00:00:00 +0000\" {1}\r\nx\r\n", "bad date-time"),
    (b"a LOGIN x y z\r\n", "unexpected extra arguments"),
    (b"a FETCH 99999999999 FLAGS\r\n", "expected number"),
    (b"a FETCH 4294967296 FLAGS\r\n", "number out of range"),
])
@pytest.mark.parametrize("split", SPLITS)
def test_syntax_errors_are_bad_with_tag(wire: bytes, text: str, split: str) -> None:
    evs = [e for e in events(wire, split) if not isinstance(e, ContinuationRequest)]
    assert evs[0][0] == "BAD" and evs[0][2] == text
    assert evs[0][1] == ("*" if wire.startswith(b"\r\n") else "a")


@pytest.mark.parametrize("split", SPLITS)
def test_line_cap_is_fatal(split: str) -> None:
    limits = Limits(max_line_length=64)
    evs = events(b"a NOOP" + b" x" * 100 + b"\r\n", split, limits)
    assert evs == [FatalError("line too long")]
    # Lines around literals share the cap.
    evs = events(b"a LOGIN {1}\r\nx " + b"{1}\r\ny" * 30 + b"\r\n", split, limits)
    assert isinstance(evs[-1], FatalError)


@pytest.mark.parametrize("split", SPLITS)
def test_literal_cap(split: str) -> None:
    limits = Limits(max_literal_size=10)
    evs = events(b"a APPEND INBOX {11}\r\nb NOOP\r\n", split, limits)
    assert evs == [LiteralTooLarge("a"), Command("b", "NOOP")]
    evs = events(b"a LOGIN {6}\r\n123456 {5}\r\n12345\r\n", split, limits)
    # The literals of one command share the cap: 6 + 5 > 10.
    assert isinstance(evs[0], ContinuationRequest)
    assert evs[1] == LiteralTooLarge("a")
    assert evs[2] == ("BAD", "12345", "expected SP")  # the unannounced data is a line
    plus = Limits(max_literal_size=10, literal_plus=True)
    assert events(b"a APPEND INBOX {11+}\r\n", split, plus) == [FatalError("literal too large")]
    evs = events(b"a APPEND INBOX {3+}\r\nabc\r\n", split, plus)
    assert evs == [Command("a", "APPEND", ("INBOX", (), None, b"abc"))]


def test_line_mode_returns_raw_lines() -> None:
    framer = Framer(LIMITS)
    framer.line_mode = True
    framer.receive(b"DONE\r\nx {5}\r\n")
    assert framer.next_event() == RawLine(b"DONE")
    assert framer.next_event() == RawLine(b"x {5}")
    assert framer.next_event() is NEED_DATA


def test_discard_buffer_drops_pipelined_input() -> None:
    framer = Framer(LIMITS)
    framer.receive(b"a STARTTLS\r\nb LOGIN x y\r\n")
    assert isinstance(framer.next_event(), FramedCommand)
    framer.discard_buffer()
    assert framer.next_event() is NEED_DATA


def test_bounded_sequence_set_and_depth() -> None:
    limits = Limits(max_ranges=10, max_depth=4)
    wire = b"a FETCH " + b",".join(b"%d" % i for i in range(1, 13)) + b" FLAGS\r\n"
    assert events(wire, "whole", limits)[0][2] == "too many ranges in sequence set"
    wire = b"a SEARCH " + b"NOT " * 6 + b"ALL\r\n"
    assert events(wire, "whole", limits)[0][2] == "search keys nested too deeply"


def test_state_table() -> None:
    # RFC 3501 §3, §6
    assert allowed(State.NOT_AUTHENTICATED, "LOGIN")
    assert not allowed(State.AUTHENTICATED, "LOGIN")
    assert allowed(State.AUTHENTICATED, "SELECT") and allowed(State.SELECTED, "SELECT")
    assert not allowed(State.AUTHENTICATED, "FETCH")
    assert allowed(State.SELECTED, "UID FETCH")
    assert not allowed(State.LOGOUT, "NOOP")
    assert not allowed(State.SELECTED, "STARTTLS")
    assert not allowed(State.SELECTED, "NOSUCH")


def test_modified_utf7_round_trip() -> None:
    # RFC 3501 §5.1.3 examples
    assert encode_mailbox("~peter/mail/台北/日本語") == b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert decode_mailbox(b"~peter/mail/&U,BTFw-/&ZeVnLIqe-") == "~peter/mail/台北/日本語"
    assert encode_mailbox("a&b") == b"a&-b" and decode_mailbox(b"a&-b") == "a&b"
    with pytest.raises(ValueError):
        decode_mailbox(b"&Jjo!")


def test_value_encoder() -> None:
    assert encode_value(None) == b"NIL"
    assert encode_value(7) == b"7"
    assert encode_value("a \"q\"") == b'"a \\"q\\""'
    assert encode_value("line\r\nbreak") == b"{11}\r\nline\r\nbreak"
    assert encode_value("é") == b"{2}\r\n\xc3\xa9"
    assert encode_value([Atom("FLAGS"), (Atom("\\Seen"),), Literal(b""), Raw(b"(x)")]) == (
        b"(FLAGS (\\Seen) {0}\r\n (x))")


def test_date_time() -> None:
    dt = parse_date_time(" 7-Feb-1994 21:52:25 -0800")
    assert dt.timestamp() == 760686745
    assert format_date_time(760686745.0) == "08-Feb-1994 05:52:25 +0000"
    assert format_date_time(dt) == "07-Feb-1994 21:52:25 -0800"
