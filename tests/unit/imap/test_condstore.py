"""CONDSTORE (RFC 7162 §3.1) against the in-memory fakes."""

from __future__ import annotations

import pytest

from node.imap.condstore_syntax import FetchModifiers, QresyncParams, SelectParams
from node.imap.protocol import Command, Limits, SeqSet, encode_command, frame_all
from node.imap.search import SearchKey
from tests.unit.imap.helpers import Client

SPLITS = ["whole", "bytes", "random"]


@pytest.fixture(params=SPLITS)
def client(request) -> Client:
    c = Client(split=request.param)
    c.login()
    return c


def _selected(c: Client, n: int = 4, select: str = "s SELECT INBOX") -> list[bytes]:
    for _ in range(n):
        c.deliver()  # MODSEQs 2..n+1 (the mailbox starts at 1)
    return c.cmd(select)


def _parse(line: bytes) -> Command:
    import node.imap.session  # noqa: F401  (registers the extension parsers)

    (cmd,) = frame_all(line, Limits())
    assert isinstance(cmd, Command), cmd
    return cmd


def test_capability_lists_condstore() -> None:
    # RFC 7162 §3.1 / §3.2: the capabilities are advertised.
    c = Client()
    assert b" CONDSTORE " in c.greeting and b" QRESYNC " in c.greeting


def test_select_condstore_sends_highestmodseq(client: Client) -> None:
    # RFC 7162 §3.1.2.1 / §3.1.8: SELECT (CONDSTORE) enables it and reports HIGHESTMODSEQ.
    lines = _selected(client, select="s SELECT INBOX (CONDSTORE)")
    assert b"* OK [HIGHESTMODSEQ 5] highest" in lines
    assert lines[-1] == b"s OK [READ-WRITE] SELECT completed"


def test_plain_select_has_no_highestmodseq_until_enabled(client: Client) -> None:
    # RFC 7162 §3.1: the server sends CONDSTORE data only once it is enabled.
    assert not any(b"HIGHESTMODSEQ" in x for x in _selected(client))
    client.cmd("u UNSELECT")  # RFC 5161 §3.1: ENABLE only in the authenticated state
    assert client.cmd("e ENABLE CONDSTORE") == [b"* ENABLED CONDSTORE", b"e OK ENABLE completed"]
    assert b"* OK [HIGHESTMODSEQ 5] highest" in client.cmd("x EXAMINE INBOX")


def test_status_highestmodseq_enables_condstore(client: Client) -> None:
    # RFC 7162 §3.1.2.2
    client.deliver()
    assert client.cmd("x STATUS INBOX (HIGHESTMODSEQ MESSAGES)") == [
        b'* STATUS "INBOX" (HIGHESTMODSEQ 2 MESSAGES 1)', b"x OK STATUS completed"]
    assert b"* OK [HIGHESTMODSEQ 2] highest" in client.cmd("s SELECT INBOX")


def test_fetch_modseq_item(client: Client) -> None:
    # RFC 7162 §3.1.4.1: MODSEQ (n) per message.
    _selected(client, 2)
    assert client.cmd("f FETCH 1:* (UID MODSEQ)") == [
        b"* 1 FETCH (UID 1 MODSEQ (2))", b"* 2 FETCH (UID 2 MODSEQ (3))", b"f OK FETCH completed"]
    assert "CONDSTORE" in client.session.enabled


def test_fetch_body_that_sets_seen_reports_new_modseq(client: Client) -> None:
    # RFC 7162 §3.1.4.1 with RFC 3501 §6.4.5: \Seen set by the fetch changes MODSEQ.
    _selected(client, 1)
    out = b"\r\n".join(client.cmd("f FETCH 1 (MODSEQ BODY[TEXT])"))
    assert out.startswith(b"* 1 FETCH (MODSEQ (3) BODY[TEXT] {")
    assert b" FLAGS (\\Seen))\r\nf OK FETCH completed" in out


def test_fetch_changedsince(client: Client) -> None:
    # RFC 7162 §3.1.4.1: only messages with MODSEQ > n; MODSEQ implied.
    _selected(client, 4)
    client.cmd("t STORE 2 +FLAGS.SILENT (\\Flagged)")  # MODSEQ 6
    assert client.cmd("f FETCH 1:* (FLAGS) (CHANGEDSINCE 4)") == [
        b"* 2 FETCH (FLAGS (\\Flagged) MODSEQ (6))",
        b"* 4 FETCH (FLAGS () MODSEQ (5))",
        b"f OK FETCH completed",
    ]
    assert client.cmd("f UID FETCH 1:3 (FLAGS) (CHANGEDSINCE 4)") == [
        b"* 2 FETCH (UID 2 FLAGS (\\Flagged) MODSEQ (6))", b"f OK UID FETCH completed"]
    assert client.cmd("f FETCH 1:* FLAGS (CHANGEDSINCE 6)") == [b"f OK FETCH completed"]


def test_store_reports_modseq_once_enabled(client: Client) -> None:
    # RFC 7162 §3.1.3: untagged FETCH after STORE carries MODSEQ, even for .SILENT.
    _selected(client, 2, "s SELECT INBOX (CONDSTORE)")
    assert client.cmd("t STORE 1 +FLAGS (\\Seen)") == [
        b"* 1 FETCH (FLAGS (\\Seen) MODSEQ (4))", b"t OK STORE completed"]
    assert client.cmd("t UID STORE 1:2 +FLAGS.SILENT (\\Seen)") == [
        b"* 2 FETCH (UID 2 MODSEQ (5))", b"t OK UID STORE completed"]


def test_store_unchangedsince_modified(client: Client) -> None:
    # RFC 7162 §3.1.3, example: messages changed after UNCHANGEDSINCE fail and
    # are listed in MODIFIED; the others are stored.
    _selected(client, 3)
    client.cmd("t STORE 2 +FLAGS.SILENT (\\Answered)")  # 2 -> MODSEQ 5
    out = client.cmd("t STORE 1:3 (UNCHANGEDSINCE 4) +FLAGS.SILENT (\\Deleted)")
    assert out == [b"* 1 FETCH (MODSEQ (6))", b"* 3 FETCH (MODSEQ (7))",
                   b"t OK [MODIFIED 2] conditional STORE failed"]
    assert client.store.messages("alice@example.test", "INBOX")[1].flags == {"\\Answered"}
    out = client.cmd("u UID STORE 2 (UNCHANGEDSINCE 0) FLAGS (\\Seen)")
    assert out == [b"u OK [MODIFIED 2] conditional STORE failed"]


def test_unsolicited_flag_change_carries_modseq() -> None:
    # RFC 7162 §3.1: once enabled, unsolicited FETCH FLAGS responses carry MODSEQ.
    a = Client()
    b = Client(a.store)
    a.login()
    b.login()
    a.deliver()
    assert a.cmd("e ENABLE CONDSTORE")[0] == b"* ENABLED CONDSTORE"
    a.cmd("s SELECT INBOX")
    b.cmd("s SELECT INBOX")
    b.cmd("t STORE 1 +FLAGS (\\Flagged)")
    assert a.cmd("n NOOP") == [
        b"* 1 FETCH (FLAGS (\\Flagged) UID 1 MODSEQ (3))", b"n OK NOOP completed"]


def test_search_modseq(client: Client) -> None:
    # RFC 7162 §3.1.5: MODSEQ key (>=) and the (MODSEQ n) of the highest match.
    _selected(client, 4)
    client.cmd("t STORE 2 +FLAGS.SILENT (\\Seen)")  # MODSEQ 6
    assert client.cmd("q SEARCH MODSEQ 5") == [b"* SEARCH 2 4 (MODSEQ 6)", b"q OK SEARCH completed"]
    assert client.cmd('q UID SEARCH MODSEQ "/flags/\\\\seen" all 6') == [
        b"* SEARCH 2 (MODSEQ 6)", b"q OK UID SEARCH completed"]
    assert client.cmd("q SEARCH MODSEQ 7") == [b"* SEARCH", b"q OK SEARCH completed"]


def test_bad_modifiers(client: Client) -> None:
    # RFC 7162 §3.1.4.1 / §3.2.6 syntax and rules.
    _selected(client, 1)
    assert client.cmd("f FETCH 1 FLAGS (CHANGEDSINCE x)")[-1].startswith(b"f BAD")
    assert client.cmd("f FETCH 1 FLAGS (BOGUS 1)")[-1].startswith(b"f BAD")
    assert client.cmd("f UID FETCH 1 FLAGS (VANISHED)")[-1].startswith(b"f BAD")
    assert client.cmd("t STORE 1 (UNCHANGEDSINCE 99999999999999999999) FLAGS ()")[-1].startswith(
        b"t BAD")
    assert client.cmd("s SELECT INBOX (NOSUCH)")[-1].startswith(b"s BAD")


@pytest.mark.parametrize("line", [
    b"a SELECT INBOX (CONDSTORE)",
    b"a EXAMINE INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))",
    b"a SELECT INBOX (QRESYNC (67890007 90060115194045000 1:29997 (5000,7500,9000 15000,22500,27000)))",
    b"a SELECT INBOX (QRESYNC (1 2 (1:3 4:6)))",
    b"a UID FETCH 300:500 (FLAGS) (CHANGEDSINCE 12345 VANISHED)",
    b"a FETCH 1:* (UID FLAGS MODSEQ) (CHANGEDSINCE 0)",
    b"a STORE 7,5,9 (UNCHANGEDSINCE 320162338) +FLAGS.SILENT (\\Deleted)",
    b'a SEARCH MODSEQ "/flags/\\\\draft" all 620162338',
    b"a SEARCH OR NOT MODSEQ 720162338 LARGER 50000",
    b"a STATUS INBOX (HIGHESTMODSEQ UIDNEXT)",
])
def test_parse_encode_parse_fixed_point(line: bytes) -> None:
    # Every RFC 7162 §3 example form: parse -> encode -> parse is a fixed point.
    cmd = _parse(line + b"\r\n")
    assert _parse(encode_command(cmd)) == cmd


def test_parsed_values() -> None:
    q = _parse(b"a SELECT INBOX (QRESYNC (7 9 1:5 (2 3)))\r\n")
    assert q.args == ("INBOX", SelectParams(qresync=QresyncParams(
        7, 9, SeqSet(((1, 5),)), (SeqSet(((2, 2),)), SeqSet(((3, 3),))))))
    f = _parse(b"a UID FETCH 1:* FLAGS (CHANGEDSINCE 3 VANISHED)\r\n")
    assert f.args[2] == FetchModifiers(3, True)
    s = _parse(b"a STORE 1 (UNCHANGEDSINCE 5) FLAGS ()\r\n")
    assert s.args[4] == 5
    k = _parse(b"a SEARCH MODSEQ 5\r\n")
    assert k.args[1] == SearchKey("MODSEQ", (5, None, None))
