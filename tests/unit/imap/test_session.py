"""IMAP session policy against in-memory fakes (RFC 3501 §6, RFC 2177)."""

from __future__ import annotations

import base64

import pytest

from tests.unit.imap.fakes import FakeStore
from tests.unit.imap.helpers import MESSAGE, Client

SPLITS = ["whole", "bytes", "random"]


@pytest.fixture(params=SPLITS)
def client(request) -> Client:
    return Client(split=request.param)


def test_greeting_lists_capabilities_and_loopback_allows_login() -> None:
    c = Client()
    assert c.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert c.greeting.endswith(b"] postroom ready\r\n")
    assert b"STARTTLS" in c.greeting and b"AUTH=PLAIN" in c.greeting
    assert b"LOGINDISABLED" not in c.greeting


def test_login_refused_before_tls_from_remote() -> None:
    # RFC 3501 §6.2.3: LOGINDISABLED; §7.1 PRIVACYREQUIRED (RFC 5530).
    c = Client(peer="192.0.2.7")
    assert b"LOGINDISABLED" in c.greeting and b"AUTH=PLAIN" not in c.greeting
    assert c.cmd("a LOGIN alice@example.test alice-pw-1234") == [
        b"a NO [PRIVACYREQUIRED] use STARTTLS first"
    ]
    assert c.cmd("b AUTHENTICATE PLAIN")[-1].startswith(b"b NO [PRIVACYREQUIRED]")


def test_login_refused_on_loopback_when_config_disallows() -> None:
    c = Client(node={"allow_plaintext_auth_on_loopback": False})
    assert c.cmd("a LOGIN alice@example.test alice-pw-1234")[-1].startswith(b"a NO [PRIVACY")


def test_login_allowed_over_tls_from_remote() -> None:
    c = Client(peer="192.0.2.7", tls=True)
    assert b"STARTTLS" not in c.greeting
    c.login()


def test_starttls_discards_pipelined_plaintext() -> None:
    c = Client(peer="192.0.2.7")
    out = c.feed(b"s STARTTLS\r\nx LOGIN alice@example.test alice-pw-1234\r\n")
    assert out == b"s OK begin TLS negotiation now\r\n"
    assert c.session.want_starttls
    c.session.tls_started()
    caps = c.cmd("t CAPABILITY")[0]
    assert caps.startswith(b"* CAPABILITY IMAP4rev1 SASL-IR IDLE CHILDREN UIDPLUS ")
    assert caps.endswith(b" AUTH=PLAIN") and b"STARTTLS" not in caps
    assert c.cmd("u STARTTLS") == [b"u BAD TLS is already active"]


def test_bad_password(client: Client) -> None:
    lines = client.cmd('a LOGIN alice@example.test "wrong"')
    assert lines == [b"a NO [AUTHENTICATIONFAILED] invalid credentials"]
    assert client.session.account is None


def test_too_many_failed_logins_closes() -> None:
    c = Client()
    for i in range(5):
        out = c.cmd(f"a{i} LOGIN alice@example.test nope")
    assert out[0].startswith(b"* BYE")
    assert c.session.closed


def test_login_calls_ensure_account_and_sends_capability(client: Client) -> None:
    lines = client.cmd("a LOGIN alice@example.test alice-pw-1234")
    assert lines[-1].startswith(b"a OK [CAPABILITY IMAP4rev1")
    assert "INBOX" in client.store.accounts["alice@example.test"]


def test_authenticate_plain_with_continuation(client: Client) -> None:
    # RFC 4616 §2, RFC 3501 §6.2.2
    assert client.cmd("a AUTHENTICATE PLAIN") == [b"+ "]
    token = base64.b64encode(b"\x00alice@example.test\x00alice-pw-1234")
    assert client.cmd(token)[-1].startswith(b"a OK")


def test_authenticate_plain_initial_response_and_cancel() -> None:
    c = Client()
    assert c.cmd("a AUTHENTICATE PLAIN")[-1] == b"+ "
    assert c.cmd("*") == [b"a BAD authentication cancelled"]
    assert c.cmd("b AUTHENTICATE PLAIN bm90IGJhc2U2NA-")[-1].startswith(b"b BAD")
    token = base64.b64encode(b"alice@example.test\x00alice@example.test\x00alice-pw-1234")
    assert c.cmd(b"c AUTHENTICATE PLAIN " + token)[-1].startswith(b"c OK")


def test_state_table_rejects_commands_in_wrong_state(client: Client) -> None:
    assert client.cmd("a SELECT INBOX") == [b"a BAD SELECT not allowed now"]
    assert client.cmd("b FETCH 1 FLAGS") == [b"b BAD FETCH not allowed now"]
    client.login()
    assert client.cmd("c UID FETCH 1 FLAGS") == [b"c BAD UID FETCH not allowed now"]
    assert client.cmd("d LOGIN x y") == [b"d BAD LOGIN not allowed now"]


def test_select_responses(client: Client) -> None:
    client.login()
    client.deliver(flags=("\\Seen",))
    client.deliver()
    lines = client.cmd("s SELECT inbox")
    assert lines[0] == b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)"
    assert b"* 2 EXISTS" in lines and b"* 0 RECENT" in lines
    assert b"* OK [UNSEEN 2] first unseen" in lines
    assert any(line.startswith(b"* OK [UIDVALIDITY ") for line in lines)
    assert b"* OK [UIDNEXT 3] predicted next UID" in lines
    assert any(b"PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)" in x
               for x in lines)
    assert lines[-1] == b"s OK [READ-WRITE] SELECT completed"
    lines = client.cmd("e EXAMINE INBOX")
    assert lines[-1] == b"e OK [READ-ONLY] EXAMINE completed"
    assert client.cmd("f STORE 1 +FLAGS (\\Flagged)")[-1].startswith(b"f NO [READ-ONLY]")


def test_select_missing_mailbox(client: Client) -> None:
    client.login()
    assert client.cmd("s SELECT Nope") == [b"s NO [NONEXISTENT] no such mailbox"]
    assert client.cmd("f FETCH 1 FLAGS") == [b"f BAD FETCH not allowed now"]


def test_list_special_use_and_wildcards(client: Client) -> None:
    client.login()
    created = client.cmd("c CREATE Work/Projects/")[-1]  # RFC 8474 §4.1: MAILBOXID
    assert created.startswith(b"c OK [MAILBOXID (M") and created.endswith(b" CREATE completed")
    lines = client.cmd('l LIST "" *')
    assert b'* LIST (\\HasNoChildren) "/" "INBOX"' in lines
    assert b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"' in lines
    assert b'* LIST (\\HasNoChildren \\Junk) "/" "Junk"' in lines
    assert b'* LIST (\\HasChildren) "/" "Work"' in lines
    assert b'* LIST (\\HasNoChildren) "/" "Work/Projects"' in lines
    lines = client.cmd('l LIST "" %')
    assert not any(b"Work/Projects" in x for x in lines)
    lines = client.cmd('l LIST "Work/" %')
    assert lines == [b'* LIST (\\HasNoChildren) "/" "Work/Projects"', b"l OK LIST completed"]
    assert client.cmd('l LIST "" ""')[0] == b'* LIST (\\Noselect) "/" ""'
    assert client.cmd("c CREATE inbox")[-1] == b"c NO [ALREADYEXISTS] INBOX always exists"
    assert client.cmd("c CREATE Work")[-1] == b"c NO [ALREADYEXISTS] mailbox already exists"


def test_lsub_subscribe_unsubscribe(client: Client) -> None:
    client.login()
    client.cmd("c CREATE Lists/a")
    client.cmd("s SUBSCRIBE Lists/a")
    lines = client.cmd('l LSUB "" Lists/%')
    assert lines == [b'* LSUB () "/" "Lists/a"', b"l OK LSUB completed"]
    lines = client.cmd('l LSUB "" %')
    assert b'* LSUB (\\Noselect) "/" "Lists"' in lines
    client.cmd("u UNSUBSCRIBE Lists/a")
    assert client.cmd('l LSUB "" Lists/*') == [b"l OK LSUB completed"]


def test_rename_delete_and_utf7_names(client: Client) -> None:
    client.login()
    assert client.cmd("c CREATE &ZeVnLIqe-")[-1].endswith(b"] CREATE completed")
    assert "日本語" in client.store.accounts["alice@example.test"]
    assert client.cmd("r RENAME &ZeVnLIqe- Other")[-1] == b"r OK RENAME completed"
    assert client.cmd("d DELETE Other")[-1] == b"d OK DELETE completed"
    assert client.cmd("d DELETE Other")[-1] == b"d NO [NONEXISTENT] no such mailbox"
    assert client.cmd("d DELETE INBOX")[-1] == b"d NO [CANNOT] INBOX cannot be deleted"


def test_status(client: Client) -> None:
    client.login()
    client.deliver()
    lines = client.cmd("s STATUS INBOX (MESSAGES UNSEEN UIDNEXT RECENT)")
    assert lines[0] == b'* STATUS "INBOX" (MESSAGES 1 UNSEEN 1 UIDNEXT 2 RECENT 0)'


def test_append_with_flags_date_and_literal(client: Client) -> None:
    client.login()
    msg = MESSAGE
    out = client.feed(b'a APPEND Drafts (\\Draft $Label) "07-Feb-1994 21:52:25 -0800" {%d}\r\n'
                      % len(msg))
    assert out.startswith(b"+ ")
    out = client.feed(msg + b"\r\n")
    assert out.startswith(b"a OK [APPENDUID ") and out.endswith(b" 1] APPEND completed\r\n")
    row = client.store.messages("alice@example.test", "Drafts")[0]
    assert row.flags == {"\\Draft", "$Label"}
    assert row.internaldate == 760686745.0
    # LITERAL+ (RFC 7888 §4) after login: "{1+}" needs no continuation.
    lines = client.cmd("b APPEND Nope {1+}\r\nx")
    assert lines == [b"b NO [TRYCREATE] no such mailbox"]


def test_append_to_missing_mailbox_says_trycreate() -> None:
    c = Client()
    c.login()
    c.feed(b"a APPEND Nope {3}\r\n")
    assert c.feed(b"abc\r\n") == b"a NO [TRYCREATE] no such mailbox\r\n"


def test_storage_unavailable_is_no_unavailable() -> None:
    c = Client()
    c.login()
    c.store.unavailable = True
    assert c.cmd("c CREATE X") == [b"c NO [UNAVAILABLE] try again later"]


def test_literal_too_large_is_bad_and_stream_stays_in_sync() -> None:
    c = Client(imap={"max_literal_size": 100})
    c.login()
    # RFC 7889 §4 (APPENDLIMIT): NO [TOOBIG] for APPEND, BAD for others.
    assert c.feed(b"a APPEND INBOX {5000}\r\n") == b"a NO [TOOBIG] message too large\r\n"
    assert c.cmd("b NOOP") == [b"b OK NOOP completed"]


def test_line_too_long_is_bye() -> None:
    c = Client(imap={"max_line_length": 200})
    out = c.feed(b"a NOOP " + b"x" * 300)
    assert out.startswith(b"* BYE")
    assert c.session.closed


def test_fetch_items(client: Client) -> None:
    client.login()
    client.deliver()
    client.cmd("s SELECT INBOX")
    lines = client.cmd("f FETCH 1 (FLAGS UID RFC822.SIZE INTERNALDATE)")
    assert lines[0].startswith(b"* 1 FETCH (FLAGS () UID 1 RFC822.SIZE %d INTERNALDATE \""
                               % len(MESSAGE))
    out = client.feed(b"f FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]\r\n")
    assert out == (b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {24}\r\n"
                   b"Subject: Hello there\r\n\r\n)\r\nf OK FETCH completed\r\n")
    out = client.feed(b"f FETCH 1 BODY.PEEK[]<0.4>\r\n")
    assert out == b"* 1 FETCH (BODY[]<0> {4}\r\nFrom)\r\nf OK FETCH completed\r\n"
    out = client.feed(b"f FETCH 1 ENVELOPE\r\n")
    assert b'"Hello there"' in out and b'("Alice Example" NIL "alice" "example.test")' in out
    out = client.feed(b"f FETCH 1 (BODYSTRUCTURE BODY)\r\n")
    assert b'BODYSTRUCTURE ("TEXT" "PLAIN"' in out.upper()
    assert client.store.messages("alice@example.test", "INBOX")[0].flags == frozenset()
    # RFC 3501 §6.4.5: a non-PEEK body fetch sets \Seen and reports FLAGS.
    out = client.feed(b"f FETCH 1 BODY[TEXT]\r\n")
    assert out == (b"* 1 FETCH (BODY[TEXT] {32}\r\nBody text with a needle in it.\r\n"
                   b" FLAGS (\\Seen))\r\nf OK FETCH completed\r\n")
    out = client.feed(b"f UID FETCH 1 RFC822.HEADER\r\n")
    assert out.startswith(b"* 1 FETCH (UID 1 RFC822.HEADER {")


def test_fetch_macros_and_bad_sequence(client: Client) -> None:
    client.login()
    client.deliver()
    client.cmd("s SELECT INBOX")
    lines = client.feed(b"f FETCH 1:* FAST\r\n").split(b"\r\n")
    assert lines[0].startswith(b"* 1 FETCH (FLAGS () INTERNALDATE ")
    assert client.cmd("f FETCH 2 FLAGS") == [b"f BAD invalid message sequence number"]
    assert client.cmd("f UID FETCH 5:7 FLAGS") == [b"f OK UID FETCH completed"]
    # RFC 3501 §6.4.8: n:* includes the highest UID even if n is above it.
    assert client.cmd("f UID FETCH 9:* FLAGS")[0] == b"* 1 FETCH (UID 1 FLAGS ())"


def test_store_variants(client: Client) -> None:
    client.login()
    client.deliver()
    client.deliver()
    client.cmd("s SELECT INBOX")
    assert client.cmd("a STORE 1:2 +FLAGS (\\Flagged work)") == [
        b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft work)",
        b"* 1 FETCH (FLAGS (\\Flagged work))",
        b"* 2 FETCH (FLAGS (\\Flagged work))",
        b"a OK STORE completed",
    ]
    assert client.cmd("b STORE 1 -FLAGS.SILENT (work)") == [b"b OK STORE completed"]
    assert client.cmd("c UID STORE 2 FLAGS (\\Seen)") == [
        b"* 2 FETCH (FLAGS (\\Seen) UID 2)", b"c OK UID STORE completed"]
    assert client.cmd("d STORE 1 FLAGS (\\Recent)")[-1].startswith(b"d BAD")


def test_copy_and_trycreate(client: Client) -> None:
    client.login()
    client.deliver()
    client.cmd("s SELECT INBOX")
    client.deliver()
    client.deliver()
    client.cmd("n NOOP")
    uv = client.store.status("alice@example.test", "Archive").uidvalidity
    # RFC 4315 §3: COPYUID
    assert client.cmd("c COPY 1,3 Archive") == [f"c OK [COPYUID {uv} 1,3 1:2] COPY completed".encode()]
    assert len(client.store.messages("alice@example.test", "Archive")) == 2
    assert client.cmd("c UID COPY 1 Nope") == [b"c NO [TRYCREATE] no such mailbox"]


def test_expunge_and_close(client: Client) -> None:
    client.login()
    for _ in range(4):
        client.deliver()
    client.cmd("s SELECT INBOX")
    client.cmd("a STORE 2,4 +FLAGS.SILENT (\\Deleted)")
    assert client.cmd("e EXPUNGE") == [b"* 4 EXPUNGE", b"* 2 EXPUNGE", b"e OK EXPUNGE completed"]
    client.cmd("a STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert client.cmd("c CLOSE") == [b"c OK CLOSE completed"]
    assert [r.uid for r in client.store.messages("alice@example.test", "INBOX")] == [3]
    assert client.cmd("f FETCH 1 FLAGS") == [b"f BAD FETCH not allowed now"]


def test_uid_expunge_only_given_uids(client: Client) -> None:
    # RFC 4315 §2.1
    client.login()
    for _ in range(3):
        client.deliver()
    client.cmd("s SELECT INBOX")
    client.cmd("a STORE 1:3 +FLAGS.SILENT (\\Deleted)")
    assert client.cmd("e UID EXPUNGE 2:3") == [
        b"* 3 EXPUNGE", b"* 2 EXPUNGE", b"e OK UID EXPUNGE completed"]
    assert [r.uid for r in client.store.messages("alice@example.test", "INBOX")] == [1]


def test_search_keys(client: Client) -> None:
    client.login()
    client.deliver(flags=("\\Seen",))
    client.deliver(MESSAGE.replace(b"Hello there", b"Other topic").replace(b"needle", b"hay"))
    client.deliver(MESSAGE + b"x" * 500, flags=("\\Flagged", "Work"))
    client.cmd("s SELECT INBOX")

    def search(q: str) -> bytes:
        return client.cmd(f"q {q}")[0]

    assert search("SEARCH ALL") == b"* SEARCH 1 2 3"
    assert search("SEARCH SEEN") == b"* SEARCH 1"
    assert search("SEARCH UNSEEN") == b"* SEARCH 2 3"
    assert search("SEARCH FLAGGED KEYWORD work") == b"* SEARCH 3"
    assert search("SEARCH UNKEYWORD Work") == b"* SEARCH 1 2"
    assert search("SEARCH LARGER 400") == b"* SEARCH 3"
    assert search("SEARCH SMALLER 400") == b"* SEARCH 1 2"
    assert search("SEARCH SUBJECT hello") == b"* SEARCH 1 3"
    assert search("SEARCH FROM alice") == b"* SEARCH 1 2 3"
    assert search("SEARCH TO \"bob@example\"") == b"* SEARCH 1 2 3"
    assert search("SEARCH CC bob") == b"* SEARCH"
    assert search("SEARCH BODY NEEDLE") == b"* SEARCH 1 3"
    assert search("SEARCH TEXT \"other topic\"") == b"* SEARCH 2"
    assert search("SEARCH HEADER Message-ID <1@") == b"* SEARCH 1 2 3"
    assert search('SEARCH HEADER X-Missing ""') == b"* SEARCH"
    assert search("SEARCH OR SEEN FLAGGED") == b"* SEARCH 1 3"
    assert search("SEARCH NOT (SEEN FLAGGED)") == b"* SEARCH 1 2 3"
    assert search("SEARCH NOT SEEN 2:*") == b"* SEARCH 2 3"
    assert search("UID SEARCH UID 2:3 NEW") == b"* SEARCH"
    assert search("SEARCH OLD 1") == b"* SEARCH 1"
    assert search("SEARCH SENTON 7-Feb-1994") == b"* SEARCH"  # 05:52 UTC on the 8th
    assert search("SEARCH SENTON 8-Feb-1994") == b"* SEARCH 1 2 3"
    assert search("SEARCH SENTBEFORE 1-Jan-2000 SENTSINCE 1-Jan-1990") == b"* SEARCH 1 2 3"
    assert search("SEARCH SINCE 1-Jan-2000 BEFORE 1-Jan-2200") == b"* SEARCH 1 2 3"
    assert search("SEARCH ON 1-Jan-2000") == b"* SEARCH"
    assert search("SEARCH CHARSET UTF-8 ANSWERED") == b"* SEARCH"
    assert search("SEARCH UNANSWERED UNDELETED UNDRAFT UNFLAGGED") == b"* SEARCH 1 2"
    assert search("SEARCH DELETED") == b"* SEARCH"
    assert search("SEARCH DRAFT") == b"* SEARCH"
    assert search("SEARCH RECENT") == b"* SEARCH"
    assert search("SEARCH BCC x") == b"* SEARCH"
    assert client.cmd("q SEARCH CHARSET KOI8-R ALL") == [
        b"q NO [BADCHARSET (UTF-8 US-ASCII)] unsupported charset"]
    assert client.cmd("q SEARCH FOO")[0].startswith(b"q BAD")


def test_search_nesting_is_bounded() -> None:
    c = Client()
    c.login()
    c.cmd("s SELECT INBOX")
    assert c.cmd("q SEARCH " + "NOT " * 100 + "ALL") == [b"q BAD search keys nested too deeply"]
    assert c.cmd("q SEARCH " + "(" * 100 + "ALL" + ")" * 100)[0].startswith(b"q BAD")
    many = ",".join(str(i) for i in range(1, 5000))
    assert c.cmd(f"q SEARCH {many}") == [b"q BAD too many ranges in sequence set"]


def test_other_sessions_changes_reported_at_allowed_points() -> None:
    store = FakeStore()
    a, b = Client(store), Client(store)
    a.login()
    b.login()
    for _ in range(3):
        a.deliver()
    a.cmd("s SELECT INBOX")
    b.cmd("s SELECT INBOX")
    b.cmd("x STORE 2 +FLAGS.SILENT (\\Deleted \\Seen)")
    b.cmd("x EXPUNGE")
    a.deliver()
    # RFC 3501 §7.4.1: no EXPUNGE during FETCH/STORE/SEARCH (nor UID forms).
    lines = a.cmd("f FETCH 1:* (FLAGS)")
    assert not any(x.endswith(b" EXPUNGE") for x in lines)
    assert b"* 4 EXISTS" in lines
    assert lines[-1].startswith(b"f NO [EXPUNGEISSUED]")  # RFC 9051 §7.1 (message 2)
    lines = a.cmd("u UID SEARCH ALL")
    assert not any(b"EXPUNGE" in x for x in lines)
    assert lines[0] == b"* SEARCH 1 3 4"  # the expunged message is no longer found
    assert a.cmd("n NOOP") == [b"* 2 EXPUNGE", b"n OK NOOP completed"]
    b.cmd("x STORE 1 +FLAGS.SILENT (\\Answered)")
    assert a.cmd("n NOOP") == [b"* 1 FETCH (FLAGS (\\Answered) UID 1)", b"n OK NOOP completed"]
    assert a.cmd("n NOOP") == [b"n OK NOOP completed"]


def test_idle_wakes_and_reports_then_done() -> None:
    store = FakeStore()
    a = Client(store)
    a.login()
    a.cmd("s SELECT INBOX")
    assert a.cmd("i IDLE") == [b"+ idling"]
    assert a.wakeups == 0
    a.deliver()
    assert a.wakeups == 1
    a.session.idle_flush()
    assert a.take() == b"* 1 EXISTS\r\n"
    assert a.cmd("DONE") == [b"i OK IDLE terminated"]
    assert a.cmd("n NOOP") == [b"n OK NOOP completed"]


def test_logout(client: Client) -> None:
    assert client.cmd("z LOGOUT") == [b"* BYE logging out", b"z OK LOGOUT completed"]
    assert client.session.closed


def test_timeout_says_bye() -> None:
    c = Client()
    c.session.timeout()
    assert c.take().startswith(b"* BYE")


def _rfc_sample(split: str) -> bytes:
    c = Client(split=split)
    c.store.ensure_account("alice@example.test")
    for _ in range(12):
        c.deliver()
    script = (b"a001 login alice@example.test alice-pw-1234\r\n"
              b"a002 select inbox\r\n"
              b"a003 fetch 12 full\r\n"
              b"a004 fetch 12 body[header]\r\n"
              b"a005 store 12 +flags \\deleted\r\n"
              b"a006 logout\r\n")
    return c.feed(script)


def test_rfc3501_section8_sample_same_however_split() -> None:
    # RFC 3501 §8, with our users: every split gives the same transcript.
    whole = _rfc_sample("whole")
    assert _rfc_sample("bytes") == whole
    assert _rfc_sample("random") == whole
    lines = whole.split(b"\r\n")
    assert lines[0].startswith(b"a001 OK")
    assert b"* 12 EXISTS" in lines and lines.index(b"* 12 EXISTS") < 10
    assert any(x.startswith(b"* 12 FETCH (FLAGS () INTERNALDATE ") and b"ENVELOPE (" in x
               and b"BODY (" in x for x in lines)
    assert any(x.startswith(b"* 12 FETCH (BODY[HEADER] {") for x in lines)
    assert b"* 12 FETCH (FLAGS (\\Deleted \\Seen))" in lines  # body[header] set \Seen
    assert lines[-3:] == [b"* BYE logging out", b"a006 OK LOGOUT completed", b""]


def test_selected_mailbox_deleted_by_another_session_says_bye() -> None:
    store = FakeStore()
    a, b = Client(store), Client(store)
    a.login()
    b.login()
    a.cmd("c CREATE Doomed")
    a.cmd("s SELECT Doomed")
    b.cmd("d DELETE Doomed")
    a.session._dirty = True  # the real store notifies; the fake only on message changes
    assert a.cmd("n NOOP") == [b"* BYE selected mailbox no longer exists"]
    assert a.session.closed


def test_internal_error_is_no_serverbug_and_session_goes_on() -> None:
    c = Client()
    c.login()
    c.deliver()
    c.cmd("s SELECT INBOX")

    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    c.store.metadata = broken
    assert c.cmd("f FETCH 1 ENVELOPE") == [b"f NO [SERVERBUG] internal server error"]
    assert c.cmd("n NOOP") == [b"n OK NOOP completed"]


def test_renaming_the_selected_mailbox_keeps_it_selected() -> None:
    c = Client()
    c.login()
    c.cmd("c CREATE Box")
    c.store.append("alice@example.test", "Box", MESSAGE)
    c.cmd("s SELECT Box")
    assert c.cmd("r RENAME Box Renamed") == [b"r OK RENAME completed"]
    c.store.append("alice@example.test", "Renamed", MESSAGE)
    assert c.cmd("n NOOP") == [b"* 2 EXISTS", b"n OK NOOP completed"]
