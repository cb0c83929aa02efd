"""SORT (RFC 5256 §3, §4) and SORT=DISPLAY (RFC 5957), through the session."""

from __future__ import annotations

import pytest

from node.imap.protocol import Limits, encode_command, frame_all
from node.imap.sort import Item, base_subject, base_subject_and_reply, sort_items
from tests.unit.imap.fakes import FakeStore
from tests.unit.imap.helpers import Client


def _msg(frm: str, subject: str, date: str, body: str = "text", to: str = "x@y.test",
         cc: str | None = None) -> bytes:
    head = f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\n"
    if cc:
        head += f"Cc: {cc}\r\n"
    return (head + f"\r\n{body}\r\n").encode()


MESSAGES = [
    _msg("Zed <zed@x.test>", "Re: hello", "Mon, 7 Feb 1994 21:52:25 -0800", "bb", cc="b@x"),
    _msg("Amy <amy@x.test>", "hello", "Mon, 7 Feb 1994 20:52:25 -0800", "a", cc="a@x"),
    _msg("bob@x.test", "[list] Other", "Tue, 8 Feb 1994 21:52:25 -0800", "ccc" * 30),
    _msg("=?utf-8?q?=C3=89mile?= <emile@x.test>", "apple", "bogus date", "dd"),
]


@pytest.fixture
def client() -> Client:
    c = Client()
    c.login()
    for i, raw in enumerate(MESSAGES):
        c.store.append("alice@example.test", "INBOX", raw, internaldate=760000000.0 + i)
    assert c.cmd("s SELECT INBOX")[-1].startswith(b"s OK")
    return c


@pytest.mark.parametrize(("criteria", "expect"), [
    ("SUBJECT", "4 1 2 3"),  # RFC 5256 §2.1 base subjects: apple, hello, hello, other
    ("ARRIVAL", "1 2 3 4"),
    ("REVERSE ARRIVAL", "4 3 2 1"),
    ("DATE", "4 2 1 3"),  # §2.2: no valid Date -> INTERNALDATE (1994-01-31)
    ("REVERSE DATE", "3 1 2 4"),
    ("FROM", "2 3 4 1"),  # addr-mailbox: amy bob emile zed
    ("SIZE", "4 2 1 3"),  # 111, 106, 187, 99 octets
    ("CC", "3 4 2 1"),  # no Cc sorts as "" first, ties by sequence number
    ("TO", "1 2 3 4"),  # all equal: mailbox order
    ("DISPLAYFROM", "2 3 4 1"),  # RFC 5957: Amy, bob@x.test, Émile, Zed
    ("SUBJECT REVERSE DATE", "4 1 2 3"),
    ("SUBJECT DATE", "4 2 1 3"),
])
def test_sort_criteria_rfc5256_section_3(client, criteria, expect):
    # RFC 5256 §3: sort criteria, REVERSE applies to the key after it.
    lines = client.cmd(f"t SORT ({criteria}) UTF-8 ALL")
    assert lines == [f"* SORT {expect}".encode(), b"t OK SORT completed"]


def test_sort_with_search_keys_and_uid_form(client):
    # RFC 5256 §4: the search keys select, UID SORT answers UIDs.
    client.cmd("d STORE 2 +FLAGS (\\Deleted)")
    assert client.cmd("t UID SORT (SUBJECT) US-ASCII UNDELETED")[0] == b"* SORT 4 1 3"
    assert client.cmd('t SORT (SUBJECT) UTF-8 TEXT "not in mailbox"')[0] == b"* SORT"


def test_sort_errors(client):
    assert client.cmd("t SORT (SUBJECT) KOI8-R ALL") == [
        b"t NO [BADCHARSET (UTF-8 US-ASCII)] unsupported charset"]
    assert client.cmd("t SORT (COLOR) UTF-8 ALL")[0].startswith(b"t BAD")
    assert client.cmd("t SORT () UTF-8 ALL")[0].startswith(b"t BAD")
    assert client.cmd("t SORT (" + "SIZE " * 20 + "DATE) UTF-8 ALL")[0].startswith(b"t BAD")


def test_sort_not_allowed_before_select():
    c = Client()
    c.login()
    assert c.cmd("t SORT (DATE) UTF-8 ALL") == [b"t BAD SORT not allowed now"]


@pytest.mark.parametrize(("subject", "base", "reply"), [
    # RFC 5256 §2.1 steps 1-6
    ("Re: hello", "hello", True),
    ("RE: Re: re:hello", "hello", True),
    ("Fwd: hello", "hello", True),
    ("FW: hello", "hello", True),
    ("Re[2]: hello", "hello", True),
    ("Re: [list] Fwd: report", "report", True),
    ("[list] hello", "hello", False),
    ("[list]", "[list]", False),  # step 4: removing it would leave nothing
    ("hello (fwd)", "hello", False),
    ("hello (FWD)  (fwd)  ", "hello", False),
    ("[Fwd: hello]", "hello", True),
    ("[fwd: Re: [x] hello (fwd)]", "hello", True),
    ("  hello\t  world  ", "hello world", False),
    ("=?utf-8?q?Re=3A_caf=C3=A9?=", "café", True),
    ("", "", False),
    ("Re:", "", True),
])
def test_base_subject_rfc5256_section_2_1(subject, base, reply):
    assert base_subject_and_reply(subject) == (base, reply)
    assert base_subject(base) == base  # idempotent


def test_sort_ties_keep_mailbox_order_even_reversed():
    items = [Item(seq, seq, 5.0, 10) for seq in (3, 1, 2)]
    assert [i.seq for i in sort_items(items, ((True, "SIZE"),))] == [1, 2, 3]
    assert [i.seq for i in sort_items(items, ((False, "ARRIVAL"),))] == [1, 2, 3]


@pytest.mark.parametrize("line", [
    b"t SORT (SUBJECT REVERSE DATE) UTF-8 ALL",
    b"t UID SORT (DISPLAYFROM) US-ASCII OR FROM a BODY {3}\r\nx y",
    b"t THREAD REFERENCES UTF-8 (SINCE 1-Feb-1994 NOT DELETED)",
    b"t UID THREAD ORDEREDSUBJECT UTF-8 $",
    b"t SEARCH RETURN (MIN MAX SAVE) CHARSET UTF-8 BODY x",
    b"t UID SEARCH RETURN () 1:* $",
])
def test_sort_thread_return_parse_encode_parse_is_a_fixed_point(line):
    limits = Limits()
    first = frame_all(line + b"\r\n", limits)
    cmds = [c for c in first if hasattr(c, "args")]
    assert len(cmds) == 1, first
    again = [c for c in frame_all(encode_command(cmds[0]), limits) if hasattr(c, "args")]
    assert again == cmds
    # split at every byte: the same command (style.md: parsers fed three ways)
    data = line + b"\r\n"
    c = Client()
    c.login()
    c.cmd("s SELECT INBOX")
    whole = c.feed(data)
    c2 = Client(split="bytes")
    c2.login()
    c2.cmd("s SELECT INBOX")
    assert c2.feed(data) == whole


class _CountingStore(FakeStore):
    """The fake store, counting the messages whose metadata is read."""

    def __init__(self) -> None:
        super().__init__()
        self.meta_reads = 0

    def metadata(self, account, name, uids):
        uids = list(uids)
        self.meta_reads += len(uids)
        return super().metadata(account, name, uids)


def test_sort_values_are_reused_and_new_messages_added():
    # RFC 5256 §3 answers stay exact when values of earlier SORTs of the
    # mailbox are reused (node/imap/sortcache.py): only new messages are read.
    store = _CountingStore()
    c, other = Client(store), Client(store)
    c.login()
    other.login()
    for i, raw in enumerate(MESSAGES):
        store.append("alice@example.test", "INBOX", raw, internaldate=760000000.0 + i)
    c.cmd("s SELECT INBOX")
    other.cmd("s SELECT INBOX")
    assert c.cmd("t SORT (DATE) UTF-8 ALL")[0] == b"* SORT 4 2 1 3"
    assert store.meta_reads == 4
    # Another session of the same mailbox reuses them.
    assert other.cmd("t SORT (REVERSE DATE) UTF-8 ALL")[0] == b"* SORT 3 1 2 4"
    assert store.meta_reads == 4
    earliest = _msg("a@x.test", "new", "Sun, 6 Feb 1994 10:00:00 -0800")
    store.append("alice@example.test", "INBOX", earliest, internaldate=760000010.0)
    c.cmd("n NOOP")
    assert c.cmd("t SORT (DATE) UTF-8 ALL")[0] == b"* SORT 4 5 2 1 3"
    assert store.meta_reads == 5
    # An expunged message is not sorted; a new key reads what it needs.
    c.cmd("d STORE 2 +FLAGS.SILENT (\\Deleted)")
    c.cmd("x EXPUNGE")
    assert c.cmd("t UID SORT (SUBJECT) UTF-8 ALL")[0] == b"* SORT 4 1 5 3"  # apple hello new other
