"""IMAP4rev2 behaviour after ENABLE IMAP4rev2 (RFC 9051 Appendix E), and
IMAP4rev1 behaviour kept for a session that never enables it.  Each test
names the RFC 9051 section it checks."""

from __future__ import annotations

import pytest

from tests.unit.imap.fakes import FakeStore
from tests.unit.imap.helpers import Client

A = "alice@example.test"


@pytest.fixture(params=["whole", "bytes", "random"])
def client(request) -> Client:
    return Client(split=request.param)


def rev2(c: Client) -> Client:
    c.login()
    assert c.cmd("e ENABLE IMAP4rev2") == [b"* ENABLED IMAP4rev2", b"e OK ENABLE completed"]
    return c


def test_capability_lists_both_revisions(client: Client) -> None:
    # RFC 9051 §6.1.1 / Appendix A: a server for both revisions lists both.
    caps = client.cmd("c CAPABILITY")[0].split()
    assert caps[:2] == [b"*", b"CAPABILITY"]
    assert b"IMAP4rev1" in caps and b"IMAP4rev2" in caps


def test_select_without_recent_and_unseen_but_with_list(client: Client) -> None:
    # RFC 9051 §6.3.2 (SELECT) and Appendix E items on \Recent and UNSEEN:
    # no RECENT response, no [UNSEEN] code, a LIST response with the name.
    rev2(client)
    client.deliver()
    client.deliver(flags=("\\Seen",))
    lines = client.cmd("s SELECT inbox")
    assert lines[0] == b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)"
    assert lines[1] == b"* 2 EXISTS"
    assert not any(b"RECENT" in x or b"[UNSEEN" in x for x in lines)
    assert lines[-2:] == [b'* LIST () "/" "INBOX"', b"s OK [READ-WRITE] SELECT completed"]
    assert not any(b"\\Recent" in x for x in lines)


def test_examine_sends_list_too(client: Client) -> None:
    # RFC 9051 §6.3.3: EXAMINE answers like SELECT, read-only.
    rev2(client)
    client.cmd('c CREATE "Project/Q1"')
    lines = client.cmd('x EXAMINE "Project/Q1"')
    assert b'* LIST () "/" "Project/Q1"' in lines
    assert lines[-1] == b"x OK [READ-ONLY] EXAMINE completed"
    assert not any(b"RECENT" in x for x in lines)


def test_rev1_session_keeps_recent_and_unseen(client: Client) -> None:
    # RFC 3501 §6.3.1: without ENABLE IMAP4rev2 nothing changes.
    client.login()
    client.deliver(flags=("\\Seen",))
    client.deliver()
    lines = client.cmd("s SELECT INBOX")
    assert b"* 0 RECENT" in lines
    assert b"* OK [UNSEEN 2] first unseen" in lines
    assert not any(x.startswith(b"* LIST") for x in lines)
    assert client.cmd("x SEARCH NEW") == [b"* SEARCH", b"x OK SEARCH completed"]
    assert client.cmd("x SEARCH OLD") == [b"* SEARCH 1 2", b"x OK SEARCH completed"]
    assert client.cmd("x STATUS INBOX (RECENT)")[0] == b'* STATUS "INBOX" (RECENT 0)'


def test_closed_when_selection_is_replaced(client: Client) -> None:
    # RFC 9051 §7.1 (CLOSED): SELECT/EXAMINE while a mailbox is selected
    # first tells the client the old one is closed; not in IMAP4rev1.
    client.login()
    client.cmd("s SELECT INBOX")
    assert not any(b"[CLOSED]" in x for x in client.cmd("s SELECT Archive"))
    client.cmd("u UNSELECT")
    assert client.cmd("e ENABLE IMAP4rev2")[0] == b"* ENABLED IMAP4rev2"
    assert not any(b"[CLOSED]" in x for x in client.cmd("s SELECT INBOX"))
    lines = client.cmd("s EXAMINE Archive")
    assert lines[0] == b"* OK [CLOSED] previous mailbox is now closed"
    # A failed SELECT also closes the previous one (RFC 9051 §6.3.2).
    assert client.cmd("s SELECT Nope") == [
        b"* OK [CLOSED] previous mailbox is now closed", b"s NO [NONEXISTENT] no such mailbox"]
    assert client.cmd("f FETCH 1 FLAGS")[-1] == b"f BAD FETCH not allowed now"


def test_search_answers_with_esearch(client: Client) -> None:
    # RFC 9051 §6.4.4 and §7.3.4: SEARCH results are ESEARCH responses with
    # the command's tag (and UID for UID SEARCH); an empty result has no ALL.
    rev2(client)
    for flags in ((), ("\\Seen",), (), ("\\Flagged",)):
        client.deliver(flags=flags)
    client.cmd("s SELECT INBOX")
    client.cmd("d STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert client.cmd("t1 SEARCH UNSEEN") == [
        b'* ESEARCH (TAG "t1") ALL 1,3:4', b"t1 OK SEARCH completed"]
    assert client.cmd("t2 UID SEARCH UNDELETED") == [
        b'* ESEARCH (TAG "t2") UID ALL 2:4', b"t2 OK UID SEARCH completed"]
    assert client.cmd("t3 SEARCH DRAFT") == [b'* ESEARCH (TAG "t3")', b"t3 OK SEARCH completed"]
    assert client.cmd("t4 SEARCH RETURN (MIN COUNT) ALL") == [
        b'* ESEARCH (TAG "t4") MIN 1 COUNT 4', b"t4 OK SEARCH completed"]
    assert client.cmd("t5 SEARCH CHARSET UTF-8 BODY needle")[0] == (
        b'* ESEARCH (TAG "t5") ALL 1:4')


def test_recent_search_keys_are_gone(client: Client) -> None:
    # RFC 9051 §6.4.4 (search-key grammar) / Appendix E: RECENT, NEW and OLD
    # are not IMAP4rev2 search keys, nested or not, in SEARCH/SORT/THREAD.
    rev2(client)
    client.deliver()
    client.cmd("s SELECT INBOX")
    for line in ("x SEARCH RECENT", "x SEARCH NEW", "x UID SEARCH OR ALL NOT OLD",
                 "x SEARCH (SEEN (NEW))", "x SORT (ARRIVAL) UTF-8 NEW",
                 "x THREAD REFERENCES UTF-8 RECENT"):
        reply = client.cmd(line)
        assert len(reply) == 1 and reply[0].startswith(b"x BAD "), (line, reply)
    assert client.cmd("x SEARCH NOT DELETED")[-1] == b"x OK SEARCH completed"


def test_status_recent_is_gone_deleted_and_size_exist(client: Client) -> None:
    # RFC 9051 §6.3.11 (STATUS) and §7.4 status-att: no RECENT; DELETED and
    # SIZE are IMAP4rev2 status items (also inside LIST-STATUS, RFC 5819).
    rev2(client)
    client.deliver()
    client.deliver(flags=("\\Deleted",))
    assert client.cmd("x STATUS INBOX (RECENT)")[0].startswith(b"x BAD ")
    assert client.cmd('x LIST "" "%" RETURN (STATUS (MESSAGES RECENT))')[0].startswith(
        b"x BAD ")
    size = sum(r.size for r in client.store.messages(A, "INBOX"))
    assert client.cmd("x STATUS INBOX (MESSAGES DELETED SIZE UNSEEN)") == [
        f'* STATUS "INBOX" (MESSAGES 2 DELETED 1 SIZE {size} UNSEEN 2)'.encode(),
        b"x OK STATUS completed"]


def test_mailbox_names_are_utf8_both_ways(client: Client) -> None:
    # RFC 9051 §5.1 and §6.3.1: after ENABLE IMAP4rev2 names are UTF-8 in
    # commands and responses; an IMAP4rev1 session of the same account still
    # sees modified UTF-7 (RFC 3501 §5.1.3).
    rev2(client)
    assert client.cmd('c CREATE "Entwürfe/Ärger"'.encode())[-1].startswith(b"c OK")
    lines = client.cmd(b'l LIST "" "Entw*"')
    assert lines == ['* LIST (\\HasChildren) "/" "Entwürfe"'.encode(),
                     '* LIST (\\HasNoChildren) "/" "Entwürfe/Ärger"'.encode(),
                     b"l OK LIST completed"]
    st = client.cmd('x STATUS "Entwürfe/Ärger" (MESSAGES)'.encode())
    assert st[0] == '* STATUS "Entwürfe/Ärger" (MESSAGES 0)'.encode()
    sel = client.cmd('s SELECT "Entwürfe/Ärger"'.encode())
    assert '* LIST () "/" "Entwürfe/Ärger"'.encode() in sel
    # "&" is an ordinary character now, not the start of modified base64.
    assert client.cmd('c CREATE "R&D"')[-1].startswith(b"c OK")
    assert client.cmd('l LIST "" "R&D"') == [b'* LIST (\\HasNoChildren) "/" "R&D"',
                                              b"l OK LIST completed"]
    old = Client(client.store)
    old.login()
    assert old.cmd('l LIST "" "Entw*"')[0] == b'* LIST (\\HasChildren) "/" "Entw&APw-rfe"'
    assert old.cmd('l LIST "" "R&-D"')[0] == b'* LIST (\\HasNoChildren) "/" "R&-D"'
    assert old.cmd('c CREATE "R&D2"')[-1].startswith(b"c BAD")  # unterminated base64
    assert {m.name for m in client.store.list_mailboxes(A)} >= {
        "Entwürfe", "Entwürfe/Ärger", "R&D"}


def test_utf8_name_that_cannot_be_quoted_is_a_literal() -> None:
    # RFC 9051 §4.3: a string that cannot be quoted is sent as a literal.
    from node.imap.protocol import encode_utf8_string

    assert encode_utf8_string("Ärger") == '"Ärger"'.encode()
    assert encode_utf8_string('a"b\\c') == b'"a\\"b\\\\c"'
    assert encode_utf8_string("x" * 1025) == b"{1025}\r\n" + b"x" * 1025
    assert encode_utf8_string("a\rb") == b"{3}\r\na\rb"


def test_typed_response_codes(client: Client) -> None:
    # RFC 9051 §7.1: NONEXISTENT, ALREADYEXISTS, CANNOT, TRYCREATE.
    rev2(client)
    assert client.cmd("s SELECT Nope") == [b"s NO [NONEXISTENT] no such mailbox"]
    assert client.cmd("x STATUS Nope (MESSAGES)") == [b"x NO [NONEXISTENT] no such mailbox"]
    assert client.cmd("x DELETE Nope") == [b"x NO [NONEXISTENT] no such mailbox"]
    assert client.cmd("c CREATE Archive") == [b"c NO [ALREADYEXISTS] mailbox already exists"]
    assert client.cmd("c CREATE INBOX")[-1].startswith(b"c NO [ALREADYEXISTS]")
    assert client.cmd("x DELETE INBOX")[-1].startswith(b"x NO [CANNOT]")
    assert client.cmd("a APPEND Nope {1+}\r\nx")[-1] == b"a NO [TRYCREATE] no such mailbox"


def test_lsub_still_answered_and_nonexistent_in_list(client: Client) -> None:
    # RFC 9051 §6.3.9 (LIST \NonExistent, with RECURSIVEMATCH / CHILDINFO) and
    # Appendix E: LSUB is deprecated, yet still answered.
    rev2(client)
    client.cmd('c CREATE "p/q"')
    client.cmd('x SUBSCRIBE "p/q"')
    client.cmd("d DELETE p")
    assert b'* LSUB () "/" "p/q"' in client.cmd('l LSUB "" "*"')
    lines = client.cmd('l LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
    assert b'* LIST (\\NonExistent \\HasChildren) "/" "p" ("CHILDINFO" ("SUBSCRIBED"))' in lines


def test_sessions_of_both_revisions_share_a_mailbox() -> None:
    # RFC 9051 §5.2 / §7.5.1: changes reach each session in its own dialect.
    store = FakeStore()
    new, old = Client(store), Client(store)
    rev2(new)
    old.login()
    new.deliver()
    new.cmd("s SELECT INBOX")
    old.cmd("s SELECT INBOX")
    old.deliver()
    assert new.cmd("n NOOP") == [b"* 2 EXISTS", b"n OK NOOP completed"]
    # The search runs over the view as it was; EXISTS follows (RFC 9051 §7.4.1).
    assert old.cmd("x SEARCH ALL") == [b"* SEARCH 1", b"* 2 EXISTS", b"x OK SEARCH completed"]
    assert old.cmd("x SEARCH ALL")[0] == b"* SEARCH 1 2"
    assert new.cmd("x SEARCH ALL")[0] == b'* ESEARCH (TAG "x") ALL 1:2'


def test_notify_names_are_utf8_after_rev2() -> None:
    # RFC 9051 §5.1 with RFC 5465 §5.1/§5.4: pushed STATUS and LIST use the
    # session's name encoding, UTF-8 once IMAP4rev2 is enabled.
    store = FakeStore()
    a, b, old = Client(store), Client(store), Client(store)
    rev2(a)
    b.login()
    old.login()
    events = "(personal (MessageNew MessageExpunge MailboxName))"
    assert a.cmd(f"n NOTIFY SET {events}")[-1] == b"n OK NOTIFY completed"
    assert old.cmd(f"n NOTIFY SET {events}")[-1] == b"n OK NOTIFY completed"
    b.cmd('c CREATE "Entw&APw-rfe"')
    for c in (a, old):
        c.session.idle_flush()
    assert a.take() == '* LIST () "/" "Entwürfe"\r\n'.encode()
    assert old.take() == b'* LIST () "/" "Entw&APw-rfe"\r\n'
    b.cmd('r RENAME "Entw&APw-rfe" "&AMQ-rger"')
    for c in (a, old):
        c.session.idle_flush()
    assert a.take() == '* LIST () "/" "Ärger" ("OLDNAME" ("Entwürfe"))\r\n'.encode()
    assert old.take() == b'* LIST () "/" "&AMQ-rger" ("OLDNAME" ("Entw&APw-rfe"))\r\n'
    b.deliver(mailbox="Ärger")
    a.session.idle_flush()
    assert a.take().startswith('* STATUS "Ärger" (MESSAGES 1 '.encode())


def test_delete_noselect_parent_is_haschildren(client: Client) -> None:
    # RFC 9051 §6.3.5 and §7.1 (HASCHILDREN): deleting a \Noselect name that
    # still has inferiors is an error; a name that never existed is NONEXISTENT.
    rev2(client)
    client.cmd('c CREATE "p/q"')
    assert client.cmd("d DELETE p") == [b"d OK DELETE completed"]
    assert client.cmd("d DELETE p") == [b"d NO [HASCHILDREN] mailbox has inferior names"]
    assert client.cmd("d DELETE p/q") == [b"d OK DELETE completed"]
    assert client.cmd("d DELETE pq")[-1] == b"d NO [NONEXISTENT] no such mailbox"


def test_unsubscribe_not_subscribed_is_ok(client: Client) -> None:
    # RFC 9051 §6.3.8: UNSUBSCRIBE answers OK when the name is not subscribed.
    rev2(client)
    assert client.cmd("u UNSUBSCRIBE Nope") == [b"u OK UNSUBSCRIBE completed"]
    assert client.cmd("u UNSUBSCRIBE Archive") == [b"u OK UNSUBSCRIBE completed"]
    assert client.cmd("u UNSUBSCRIBE Archive") == [b"u OK UNSUBSCRIBE completed"]
    assert b'"Archive"' not in b"".join(client.cmd('l LSUB "" "*"'))
