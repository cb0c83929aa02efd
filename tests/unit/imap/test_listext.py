"""LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819), SPECIAL-USE and
CREATE-SPECIAL-USE (RFC 6154), STATUS=SIZE (RFC 8438) against the fakes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.imap import objectid, session  # noqa: F401  (session registers the families)
from node.imap.commands import listext
from node.imap.protocol import Command, FramedCommand, Limits, ParseError, parse_command
from tests.unit.imap.helpers import MESSAGE, Client

SPLITS = ["whole", "bytes", "random"]


def _parse(line: bytes):
    return parse_command(FramedCommand([line], []), Limits())


@pytest.fixture(params=SPLITS)
def client(request) -> Client:
    c = Client(split=request.param)
    c.login()
    return c


def _list_lines(lines: list[bytes]) -> list[bytes]:
    return [ln for ln in lines if ln.startswith((b"* LIST", b"* STATUS"))]


def test_capabilities_advertised() -> None:
    c = Client()
    c.login()
    caps = c.cmd("c CAPABILITY")[0].split()
    for atom in (b"LIST-EXTENDED", b"LIST-STATUS", b"SPECIAL-USE", b"CREATE-SPECIAL-USE",
                 b"STATUS=SIZE"):
        assert atom in caps


@pytest.mark.parametrize("line", [
    b'l LIST "" *',
    b'l LIST () "" (INBOX "Work/%")',
    b'l LIST (SUBSCRIBED RECURSIVEMATCH) "" % RETURN (CHILDREN)',
    b'l LIST (SPECIAL-USE) "" * RETURN (SUBSCRIBED STATUS (MESSAGES SIZE))',
    b'l LIST "" % RETURN ()',
])
def test_parse_encode_parse_is_a_fixed_point(line: bytes) -> None:
    # RFC 5258 §3 syntax.
    cmd = _parse(line)
    again = _parse(listext.encode_list(cmd).rstrip(b"\r\n"))
    assert again == cmd


@pytest.mark.parametrize("line", [
    b'l LIST (BOGUS) "" *',  # RFC 5258 §3: unknown selection option is BAD
    b'l LIST (RECURSIVEMATCH) "" *',  # RFC 5258 §3: RECURSIVEMATCH alone is BAD
    b'l LIST "" * RETURN (BOGUS)',
    b'l LIST "" * RETURN (STATUS (BOGUS))',
    b'l LIST "" * WHATEVER (CHILDREN)',
])
def test_bad_options_are_parse_errors(line: bytes) -> None:
    with pytest.raises(ParseError):
        _parse(line)


def test_basic_list_unchanged(client: Client) -> None:
    # RFC 3501 §6.3.8: the basic form parses to (reference, pattern).
    assert _parse(b'l LIST "" %').args == ("", "%")
    lines = client.cmd('l LIST "" INBOX')
    assert lines == [b'* LIST (\\HasNoChildren) "/" "INBOX"', b"l OK LIST completed"]


def test_multiple_patterns_and_special_use_return(client: Client) -> None:
    # RFC 5258 §3 (several patterns), RFC 6154 §5.1 (RETURN (SPECIAL-USE)).
    lines = client.cmd('l LIST "" (INBOX Sent Nothing) RETURN (SPECIAL-USE)')
    assert _list_lines(lines) == [
        b'* LIST (\\HasNoChildren) "/" "INBOX"',
        b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"',
    ]
    assert lines[-1] == b"l OK LIST completed"


def test_special_use_selection(client: Client) -> None:
    # RFC 6154 §5.3: only mailboxes with a special use.
    lines = _list_lines(client.cmd('l LIST (SPECIAL-USE) "" *'))
    assert lines == [
        b'* LIST (\\HasNoChildren \\Archive) "/" "Archive"',
        b'* LIST (\\HasNoChildren \\Drafts) "/" "Drafts"',
        b'* LIST (\\HasNoChildren \\Junk) "/" "Junk"',
        b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"',
        b'* LIST (\\HasNoChildren \\Trash) "/" "Trash"',
    ]


def test_subscribed_selection_recursivematch_and_nonexistent(client: Client) -> None:
    # RFC 5258 §3.5 (RECURSIVEMATCH, CHILDINFO) and §3.4 (\NonExistent).
    client.cmd("c CREATE Work/Reports/2024")
    client.cmd("c DELETE Work")  # inferiors stay: Work is now only a superior name
    client.cmd("s SUBSCRIBE Work/Reports/2024")
    client.cmd("u UNSUBSCRIBE Junk")
    lines = _list_lines(client.cmd('l LIST (SUBSCRIBED) "" "Work/*"'))
    assert lines == [b'* LIST (\\HasNoChildren \\Subscribed) "/" "Work/Reports/2024"']
    lines = _list_lines(client.cmd('l LIST (SUBSCRIBED RECURSIVEMATCH) "" %'))
    assert b'* LIST (\\NonExistent \\HasChildren) "/" "Work" ("CHILDINFO" ("SUBSCRIBED"))' in lines
    assert not any(b" Junk" in ln for ln in lines)
    assert b'* LIST (\\HasNoChildren \\Subscribed) "/" "INBOX"' in lines
    lines = _list_lines(client.cmd('l LIST "" % RETURN (SUBSCRIBED CHILDREN)'))
    assert b'* LIST (\\NonExistent \\HasChildren) "/" "Work"' in lines
    assert b'* LIST (\\HasNoChildren) "/" "Junk"' in lines


def test_list_status(client: Client) -> None:
    # RFC 5819 §2: STATUS after each selectable mailbox's LIST response.
    client.deliver()
    client.cmd("c CREATE Parent/Child")
    client.cmd("d DELETE Parent")
    lines = _list_lines(client.cmd(
        'l LIST "" (INBOX Parent) RETURN (STATUS (MESSAGES UNSEEN SIZE))'))
    assert lines == [
        b'* LIST (\\HasNoChildren) "/" "INBOX"',
        b'* STATUS "INBOX" (MESSAGES 1 UNSEEN 1 SIZE %d)' % len(MESSAGE),
        b'* LIST (\\NonExistent \\HasChildren) "/" "Parent"',  # no STATUS: not selectable
    ]


def test_status_size_and_mailboxid(client: Client) -> None:
    # RFC 8438 §2 SIZE; RFC 8474 §4.2 STATUS MAILBOXID.
    client.deliver()
    client.deliver()
    uv = client.store.status("alice@example.test", "INBOX").uidvalidity
    mid = objectid.mailbox_id("alice@example.test", uv)
    lines = client.cmd("s STATUS INBOX (SIZE MAILBOXID MESSAGES)")
    assert lines == [
        b'* STATUS "INBOX" (SIZE %d MAILBOXID (%s) MESSAGES 2)' % (2 * len(MESSAGE), mid.encode()),
        b"s OK STATUS completed",
    ]


def test_create_special_use(client: Client) -> None:
    # RFC 6154 §3 CREATE-SPECIAL-USE, RFC 8474 §4.1 MAILBOXID on CREATE.
    client.cmd("d DELETE Trash")
    lines = client.cmd("c CREATE Bin (USE (\\Trash))")
    assert lines[-1].startswith(b"c OK [MAILBOXID (M")
    assert _list_lines(client.cmd('l LIST (SPECIAL-USE) "" Bin')) == [
        b'* LIST (\\HasNoChildren \\Trash) "/" "Bin"']
    assert client.cmd("c CREATE All (USE (\\All))")[-1].startswith(b"c OK")


@pytest.mark.parametrize("line", [
    "c CREATE X (USE (\\Bogus))",  # unknown
    "c CREATE X (USE (\\Archive))",  # Archive already has it
    "c CREATE X (USE (\\Flagged \\All))",  # one use per mailbox here
])
def test_create_special_use_refused_with_useattr(client: Client, line: str) -> None:
    # RFC 6154 §3: NO [USEATTR], and nothing is created.
    lines = client.cmd(line)
    assert lines[-1].startswith(b"c NO [USEATTR]"), lines
    assert "X" not in client.store.accounts["alice@example.test"]


def test_create_bad_parameter_is_bad(client: Client) -> None:
    assert client.cmd("c CREATE X (SIZE 10)")[-1].startswith(b"c BAD")


_PATTERN = st.text(alphabet="abcXYZ/%*&é-", min_size=1, max_size=8).filter(
    lambda s: "&" not in s or s.endswith("&-"))


@settings(max_examples=200, deadline=None)
@given(
    select=st.lists(st.sampled_from(listext.SELECT_OPTIONS), unique=True),
    ref=st.text(alphabet="abc/", max_size=4),
    patterns=st.lists(_PATTERN, min_size=1, max_size=4),
    returns=st.lists(st.sampled_from(["SUBSCRIBED", "CHILDREN", "SPECIAL-USE"]), unique=True),
    status=st.lists(st.sampled_from(["MESSAGES", "UIDNEXT", "SIZE", "MAILBOXID"]), unique=True),
)
def test_property_extended_list_round_trips(select, ref, patterns, returns, status) -> None:
    # RFC 5258 §3: parse -> encode -> parse is a fixed point for every extended LIST.
    opts = listext.ListOptions(tuple(select), tuple(patterns), tuple(returns), tuple(status))
    cmd = Command("t", "LIST", (ref, patterns[0], opts))
    wire = listext.encode_list(cmd).rstrip(b"\r\n")
    if "RECURSIVEMATCH" in select and not set(select) - {"RECURSIVEMATCH", "REMOTE"}:
        with pytest.raises(ParseError):
            _parse(wire)
        return
    assert _parse(wire) == cmd
