"""parse_command_cached (node/imap/protocol.py): a line seen before gives
the Command parse_command gives, under its own tag and limits; bad tags and
secrets are never taken from the cache."""

from __future__ import annotations

import dataclasses

import pytest

from node.imap import protocol
from node.imap.protocol import (
    Command,
    FramedCommand,
    Framer,
    Limits,
    ParseError,
    parse_command,
    parse_command_cached,
)
from tests.unit.imap.test_protocol import RFC_EXAMPLES

LIMITS = Limits(literal_plus=True)
MIX = [
    b"x SELECT INBOX", b"x UID SEARCH UNSEEN", b'x SEARCH SUBJECT "topic 3"',
    b"x UID SORT (DATE) UTF-8 ALL", b"x STATUS Sent (MESSAGES UNSEEN UIDNEXT)",
    b'x LIST "" "*"', b"x UID STORE 7 +FLAGS (\\Seen)", b"x UID EXPUNGE 9", b"x NOOP",
    b"x UID FETCH 1,3:5 (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO)])",
    b"x STORE 1 (UNCHANGEDSINCE 5) FLAGS.SILENT ($x)", b"x FETCH 1:* (FLAGS) (CHANGEDSINCE 5)",
    b"x SELECT INBOX (QRESYNC (1 2 1:5))", b"x SELECT &AOk-t&AOk-",
]


def _framed(wire: bytes) -> list[FramedCommand]:
    framer = Framer(LIMITS)
    framer.receive(wire)
    out = []
    while (ev := framer.next_event()) is not protocol.NEED_DATA:
        if isinstance(ev, FramedCommand):
            out.append(ev)
    return out


def _parse(fn, framed: FramedCommand, limits: Limits = LIMITS) -> Command | tuple:
    try:
        return fn(framed, limits)
    except ParseError as exc:
        return ("BAD", exc.tag, exc.text)


@pytest.fixture(autouse=True)
def _empty_cache():
    protocol._PARSED.clear()
    yield
    protocol._PARSED.clear()


@pytest.mark.parametrize("wire", [w for w, _ in RFC_EXAMPLES] + [m + b"\r\n" for m in MIX],
                         ids=lambda v: repr(v)[:40])
def test_same_command_as_parse_command_under_any_tag(wire: bytes) -> None:
    (framed,) = _framed(wire)
    want = _parse(parse_command, framed)
    assert _parse(parse_command_cached, framed) == want
    assert _parse(parse_command_cached, framed) == want  # from the cache, if kept
    tail = framed.lines[0][framed.lines[0].find(b" "):]
    other = FramedCommand([b"Z9.1" + tail, *framed.lines[1:]], framed.literals)
    again = _parse(parse_command_cached, other)
    expect = _parse(parse_command, other)
    assert again == expect
    if isinstance(want, Command):
        assert again == dataclasses.replace(want, tag="Z9.1")


def test_a_bad_tag_is_bad_after_the_line_was_kept() -> None:
    (good,) = _framed(b"a SELECT INBOX\r\n")
    parse_command_cached(good, LIMITS)
    assert protocol._PARSED  # kept
    for tag in (b"a{", b"a(b", b"a%", b"a*", b'"a"'):
        bad = FramedCommand([tag + b" SELECT INBOX"], [])
        with pytest.raises(ParseError):
            parse_command_cached(bad, LIMITS)


def test_limits_are_part_of_the_key() -> None:
    (framed,) = _framed(b"a SELECT &AOk-\r\n")
    utf7 = parse_command_cached(framed, LIMITS)
    utf8 = parse_command_cached(framed, dataclasses.replace(LIMITS, utf8_mailboxes=True))
    assert utf7.args == ("\u00e9",) and utf8.args == ("&AOk-",)


def test_secrets_and_literals_are_not_kept() -> None:
    for wire in (b"a LOGIN alice secret-pw\r\n", b"a AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n",
                 b"a APPEND INBOX {5+}\r\nhello\r\n", b"a SEARCH TEXT {3+}\r\nabc\r\n"):
        (framed,) = _framed(wire)
        parse_command_cached(framed, LIMITS)
    assert protocol._PARSED == {}


def test_long_lines_are_parsed_but_not_kept() -> None:
    """The cache's memory is bounded: a line longer than _PARSED_LINE_MAX is
    parsed every time and never stored (a client may send up to
    max_line_length octets per line)."""
    uids = ",".join(str(n) for n in range(1, 400)).encode()
    wire = b"a UID FETCH " + uids + b" (FLAGS)\r\n"
    assert len(wire) > protocol._PARSED_LINE_MAX
    (framed,) = _framed(wire)
    assert _parse(parse_command_cached, framed) == _parse(parse_command, framed)
    assert protocol._PARSED == {}
    (short,) = _framed(b"b UID FETCH 1:5 (FLAGS)\r\n")
    parse_command_cached(short, LIMITS)
    assert len(protocol._PARSED) == 1
