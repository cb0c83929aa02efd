"""POP3 session policy against small fakes of the directory and the store."""

from __future__ import annotations

import base64

import pytest

from node.pop3 import protocol as p
from node.pop3.locks import MaildropLocks
from node.pop3.session import Pop3Session, Response, is_loopback

from .fakes import FakeStore, make_ctx

ALICE = "alice@example.test"
PW = "alice-pw-1234"
MSG1 = b"From: bob@example.test\r\nSubject: one\r\n\r\nline 1\r\n.dot line\r\nline 3\r\n"
MSG2 = b"Subject: two\r\n\r\n.\r\n"


class Client:
    """Drives a session the way the server does, collecting its wire output."""

    def __init__(self, session: Pop3Session) -> None:
        self.session = session
        self.responses: list[Response] = []

    def send(self, data: bytes) -> bytes:
        self.session.receive_data(data)
        out = b""
        while (r := self.session.next_response()) is not None:
            self.responses.append(r)
            out += b"".join(r.chunks)
        return out

    @property
    def last(self) -> Response:
        return self.responses[-1]


def session(
    peer: str = "127.0.0.1",
    *,
    secure: bool = False,
    locks: MaildropLocks | None = None,
    store: FakeStore | None = None,
    **kw: object,
) -> Client:
    ctx = make_ctx(store=store, **kw)  # type: ignore[arg-type]
    return Client(Pop3Session(ctx, peer, secure=secure, locks=locks or MaildropLocks()))


def filled_store() -> FakeStore:
    store = FakeStore()
    store.append(ALICE, "INBOX", MSG1)
    store.append(ALICE, "INBOX", MSG2)
    return store


def login(c: Client) -> None:
    assert c.send(f"USER {ALICE}\r\nPASS {PW}\r\n".encode()).endswith(b"octets)\r\n")
    assert c.session.conn.state is p.State.TRANSACTION


def test_greeting_has_no_apop_timestamp() -> None:
    assert session().session.greeting() == b"+OK postroom ready\r\n"


def test_user_pass_stat_list_uidl_retr_quit() -> None:
    store = filled_store()
    c = session(store=store)
    login(c)
    assert c.send(b"STAT\r\n") == f"+OK 2 {len(MSG1) + len(MSG2)}\r\n".encode()
    assert c.send(b"LIST\r\n") == (
        f"+OK 2 messages\r\n1 {len(MSG1)}\r\n2 {len(MSG2)}\r\n.\r\n".encode()
    )
    assert c.send(b"LIST 2\r\n") == f"+OK 2 {len(MSG2)}\r\n".encode()
    uv = store.boxes[ALICE].uidvalidity
    assert (
        c.send(b"UIDL\r\n")
        == f"+OK unique-id listing follows\r\n1 {uv}.1\r\n2 {uv}.2\r\n.\r\n".encode()
    )
    assert c.send(b"UIDL 1\r\n") == f"+OK 1 {uv}.1\r\n".encode()
    wire = c.send(b"RETR 1\r\n")
    first, _, rest = wire.partition(b"\r\n")
    assert first == f"+OK {len(MSG1)} octets".encode()
    assert p.unstuff(rest) == MSG1  # byte-identical after un-stuffing
    assert b"\r\n..dot line\r\n" in rest
    assert p.unstuff(c.send(b"RETR 2\r\n").partition(b"\r\n")[2]) == MSG2
    assert c.send(b"NOOP\r\n") == b"+OK\r\n"
    assert c.send(b"QUIT\r\n") == b"+OK postroom signing off (2 messages left)\r\n"
    assert c.last.close
    assert store.expunged == []


def test_top() -> None:
    c = session(store=filled_store())
    login(c)
    wire = c.send(b"TOP 1 1\r\n")
    assert wire.startswith(b"+OK")
    assert p.unstuff(wire.partition(b"\r\n")[2]) == (
        b"From: bob@example.test\r\nSubject: one\r\n\r\nline 1\r\n"
    )
    assert c.send(b"TOP 1 x\r\n").startswith(b"-ERR")
    assert c.send(b"TOP 3 0\r\n") == b"-ERR no such message\r\n"


def test_message_numbers() -> None:
    c = session(store=filled_store())
    login(c)
    for cmd in (b"RETR 0", b"RETR 3", b"LIST 99", b"DELE 3", b"UIDL 0"):
        assert c.send(cmd + b"\r\n") == b"-ERR no such message\r\n"
    for cmd in (b"RETR x", b"RETR -1", b"LIST 1x"):
        assert c.send(cmd + b"\r\n") == b"-ERR invalid message number\r\n"


def test_dele_then_quit_expunges_after_commit() -> None:
    # RFC 1939 §6: deletions happen in UPDATE state, at QUIT.
    store = filled_store()
    c = session(store=store)
    login(c)
    assert c.send(b"DELE 1\r\n") == b"+OK message 1 deleted\r\n"
    assert c.send(b"DELE 1\r\n") == b"-ERR message already deleted\r\n"
    assert c.send(b"RETR 1\r\n") == b"-ERR message already deleted\r\n"
    assert c.send(b"LIST\r\n") == f"+OK 1 messages\r\n2 {len(MSG2)}\r\n.\r\n".encode()
    assert c.send(b"STAT\r\n") == f"+OK 1 {len(MSG2)}\r\n".encode()
    assert store.expunged == []  # nothing before QUIT
    assert c.send(b"QUIT\r\n") == b"+OK postroom signing off (1 messages left)\r\n"
    assert store.expunged == [(ALICE, [1])]
    assert c.session.conn.state is p.State.DONE


def test_rset_unmarks() -> None:
    store = filled_store()
    c = session(store=store)
    login(c)
    c.send(b"DELE 1\r\nDELE 2\r\n")
    assert c.send(b"RSET\r\n") == b"+OK maildrop has 2 messages\r\n"
    c.send(b"QUIT\r\n")
    assert store.expunged == []


def test_failed_expunge_answers_sys_temp_and_deletes_nothing() -> None:
    # Promise 1 / RFC 3206 §4: +OK to QUIT only after the commit.
    store = filled_store()
    store.fail_expunge = True
    locks = MaildropLocks()
    c = session(store=store, locks=locks)
    login(c)
    c.send(b"DELE 1\r\n")
    assert c.send(b"QUIT\r\n").startswith(b"-ERR [SYS/TEMP] ")
    assert c.last.close
    assert len(store.boxes[ALICE].rows) == 2
    assert not locks.held(ALICE)


def test_dropped_connection_deletes_nothing_and_releases_lock() -> None:
    store = filled_store()
    locks = MaildropLocks()
    c = session(store=store, locks=locks)
    login(c)
    c.send(b"DELE 1\r\nDELE 2\r\n")
    assert locks.held(ALICE)
    c.session.close()
    assert not locks.held(ALICE)
    assert store.expunged == [] and len(store.boxes[ALICE].rows) == 2


def test_second_session_gets_in_use() -> None:
    # RFC 2449 §8.1.1 / RFC 3206.
    store, locks = filled_store(), MaildropLocks()
    first = session(store=store, locks=locks)
    login(first)
    second = session(store=store, locks=locks)
    out = second.send(f"USER {ALICE}\r\nPASS {PW}\r\n".encode())
    assert out.endswith(b"-ERR [IN-USE] maildrop is locked by another session\r\n")
    assert second.session.conn.state is p.State.AUTHORIZATION
    first.send(b"QUIT\r\n")
    login(second)


def test_snapshot_hides_mail_delivered_during_the_session() -> None:
    # RFC 1939 §4: the maildrop is fixed at login.
    store = filled_store()
    c = session(store=store)
    login(c)
    store.append(ALICE, "INBOX", b"Subject: late\r\n\r\nx\r\n")
    assert c.send(b"STAT\r\n").startswith(b"+OK 2 ")
    c.send(b"QUIT\r\n")
    c2 = session(store=store)
    login(c2)
    assert c2.send(b"STAT\r\n").startswith(b"+OK 3 ")


def test_uidl_stable_across_sessions_and_deletions() -> None:
    store = filled_store()
    c = session(store=store)
    login(c)
    before = c.send(b"UIDL 2\r\n").split()[-1]
    c.send(b"DELE 1\r\nQUIT\r\n")
    c2 = session(store=store)
    login(c2)
    assert c2.send(b"UIDL 1\r\n").split()[-1] == before


def test_wrong_password_is_delayed_and_closes_after_max_failures() -> None:
    c = session(pop3={"max_auth_failures": 3})
    out = c.send(f"USER {ALICE}\r\nPASS nope\r\n".encode())
    assert out == b"+OK send PASS\r\n-ERR [AUTH] authentication failed\r\n"
    assert c.last.delay == 0.25 and not c.last.close
    c.send(f"USER {ALICE}\r\nPASS nope\r\n".encode())
    out = c.send(f"USER {ALICE}\r\nPASS {PW}x\r\n".encode())
    assert out.endswith(b"-ERR [AUTH] too many authentication failures, closing\r\n")
    assert c.last.close and c.last.delay == 0.25
    assert c.send(f"USER {ALICE}\r\nPASS {PW}\r\n".encode()) == b""  # session over


def test_pass_without_user() -> None:
    assert session().send(b"PASS x\r\n") == b"-ERR send USER first\r\n"


def test_plaintext_auth_refused_off_loopback_and_not_advertised() -> None:
    # RFC 2595 §2.3; AUTH-RESP-CODE (RFC 3206 §6) reply code.
    c = session("192.0.2.7", tls=object())  # type: ignore[arg-type]
    caps = c.send(b"CAPA\r\n")
    assert b"USER\r\n" not in caps and b"SASL" not in caps and b"STLS\r\n" in caps
    assert c.send(b"USER alice\r\n").startswith(b"-ERR [AUTH] ")
    assert c.send(b"PASS x\r\n").startswith(b"-ERR [AUTH] ")
    assert c.send(b"AUTH PLAIN\r\n").startswith(b"-ERR [AUTH] ")


def test_plaintext_auth_refused_on_loopback_when_not_allowed() -> None:
    c = session("127.0.0.1", loopback_plaintext=False)
    assert c.send(b"USER alice\r\n").startswith(b"-ERR [AUTH] ")


def test_auth_allowed_after_tls_anywhere() -> None:
    c = session("192.0.2.7", secure=True, store=filled_store())
    caps = c.send(b"CAPA\r\n")
    assert b"USER\r\n" in caps and b"SASL PLAIN\r\n" in caps and b"STLS" not in caps
    login(c)


def test_capa_lists_rfc2449_capabilities() -> None:
    c = session(tls=object())  # type: ignore[arg-type]
    wire = c.send(b"CAPA\r\n")
    caps = p.unstuff(wire.partition(b"\r\n")[2]).decode().split("\r\n")[:-1]
    assert caps == [
        "TOP",
        "UIDL",
        "RESP-CODES",
        "PIPELINING",
        "AUTH-RESP-CODE",
        "USER",
        "SASL PLAIN",
        "STLS",
        "IMPLEMENTATION postroom",
    ]


def plain(authz: str, user: str, pw: str) -> str:
    return base64.b64encode(f"{authz}\0{user}\0{pw}".encode()).decode()


def test_auth_plain_with_initial_response() -> None:
    c = session(store=filled_store())
    out = c.send(f"AUTH PLAIN {plain('', ALICE, PW)}\r\n".encode())
    assert out.startswith(b"+OK maildrop has 2 messages")


def test_auth_plain_with_continuation_and_authzid() -> None:
    c = session(store=filled_store())
    assert c.send(b"AUTH plain\r\n") == b"+ \r\n"
    assert c.send(f"{plain(ALICE, ALICE, PW)}\r\n".encode()).startswith(b"+OK")


def test_auth_plain_cancel_bad_base64_and_bad_password() -> None:
    c = session(pop3={"max_auth_failures": 10})
    assert c.send(b"AUTH PLAIN\r\n*\r\n") == b"+ \r\n-ERR authentication cancelled\r\n"
    assert c.send(b"AUTH PLAIN\r\n!!!\r\n") == b"+ \r\n-ERR invalid base64 in SASL response\r\n"
    assert c.send(f"AUTH PLAIN {plain('', ALICE, 'bad')}\r\n".encode()) == (
        b"-ERR [AUTH] authentication failed\r\n"
    )
    assert c.send(f"AUTH PLAIN {plain('bob@example.test', ALICE, PW)}\r\n".encode()).startswith(
        b"-ERR [AUTH]"
    )  # no proxy authorization
    assert c.send(b"AUTH PLAIN =\r\n").startswith(b"-ERR [AUTH]")
    assert c.send(b"AUTH CRAM-MD5\r\n") == b"-ERR unsupported authentication mechanism\r\n"
    assert c.send(b"AUTH\r\n") == b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n"


def test_stls() -> None:
    c = session("192.0.2.7", tls=object())  # type: ignore[arg-type]
    assert c.send(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    assert c.last.starttls
    c.session.tls_started()
    assert c.send(b"STLS\r\n") == b"-ERR already using TLS\r\n"
    assert session(tls=None).send(b"STLS\r\n") == b"-ERR TLS not available\r\n"


def test_storage_down_at_login_is_sys_temp_and_unlocks() -> None:
    store, locks = FakeStore(), MaildropLocks()
    store.fail_open = True
    c = session(store=store, locks=locks)
    assert c.send(f"USER {ALICE}\r\nPASS {PW}\r\n".encode()).endswith(
        b"-ERR [SYS/TEMP] system temporarily unavailable, try again later\r\n"
    )
    assert not locks.held(ALICE)


def test_too_many_bad_commands_close() -> None:
    c = session(pop3={"max_bad_commands": 3})
    out = c.send(b"FOO\r\nBAR\r\nBAZ\r\nCAPA\r\n")
    assert out == (
        b"-ERR unknown command\r\n-ERR unknown command\r\n-ERR unknown command\r\n"
        b"-ERR too many bad commands, closing\r\n"
    )
    assert c.last.close


def test_quit_in_authorization() -> None:
    c = session()
    assert c.send(b"QUIT\r\n") == b"+OK postroom signing off\r\n"
    assert c.last.close


def test_pipelined_commands_answered_in_order() -> None:
    # RFC 2449 §6.6 PIPELINING.
    c = session(store=filled_store())
    out = c.send(f"USER {ALICE}\r\nPASS {PW}\r\nSTAT\r\nDELE 2\r\nSTAT\r\nNOOP\r\n".encode())
    lines = out.split(b"\r\n")
    assert lines[2].startswith(b"+OK 2 ") and lines[3] == b"+OK message 2 deleted"
    assert lines[4] == f"+OK 1 {len(MSG1)}".encode() and lines[5] == b"+OK"


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("192.0.2.1", False),
        ("::ffff:192.0.2.1", False),
        ("", False),
        ("garbage", False),
    ],
)
def test_is_loopback(ip: str, expected: bool) -> None:
    assert is_loopback(ip) is expected


def test_retr_of_a_message_removed_since_login() -> None:
    store = filled_store()
    c = session(store=store)
    login(c)
    del store.blobs[store.boxes[ALICE].rows[1].blob]  # expunged over IMAP, blob collected
    assert c.send(b"RETR 1\r\n") == b"-ERR message no longer exists (removed by another client)\r\n"
    assert c.send(b"TOP 1 0\r\n").startswith(b"-ERR message no longer exists")
    store.fail_read = True
    assert c.send(b"RETR 2\r\n").startswith(b"-ERR [SYS/TEMP] ")
    store.fail_read = False
    assert c.send(b"RETR 2\r\n").startswith(b"+OK")
