"""SMTP session policy (RFC 5321 MX role) against small Directory/MailStore fakes."""

from __future__ import annotations

import pytest

from node.smtp import replies as R
from node.smtp.session import Session
from storage.model import StorageUnavailable
from tests.unit.smtp.fakes import make_ctx

EHLO = b"EHLO client.example\r\n"


def talk(session: Session, *lines: bytes) -> list[bytes]:
    """Send each chunk separately; return the reply bytes for each."""
    return [session.feed(line).data for line in lines]


@pytest.fixture
def env():
    ctx, directory, store = make_ctx()
    return Session(ctx, "192.0.2.7"), store


def test_greeting_and_ehlo_keywords(env):  # RFC 5321 §4.2, §4.1.1.1
    session, _ = env
    assert session.greeting() == b"220 mx.example.test ESMTP postroom\r\n"
    reply = session.feed(EHLO).data.decode()
    for kw in ("PIPELINING", "SIZE 52428800", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
               "STARTTLS", "CHUNKING", "DSN", "HELP"):
        assert f"250-{kw}\r\n" in reply or f"250 {kw}\r\n" in reply
    assert reply.startswith("250-mx.example.test greets client.example\r\n")


def test_no_starttls_after_tls():  # RFC 3207 §4.2
    ctx, _, _ = make_ctx()
    session = Session(ctx, "192.0.2.7", tls="TLSv1.3 X")
    assert b"STARTTLS" not in session.feed(EHLO).data
    assert session.feed(b"STARTTLS\r\n").data == R.ALREADY_TLS.encode()


def test_starttls_output_and_reset(env):
    session, _ = env
    session.feed(EHLO)
    out = session.feed(b"STARTTLS\r\nMAIL FROM:<x@y.example>\r\n")
    assert out.data == R.READY_TLS.encode() and out.starttls and out.discarded == len(b"MAIL FROM:<x@y.example>\r\n")
    session.tls_established("TLSv1.3 TLS_AES_128_GCM_SHA256")
    assert session.feed(b"MAIL FROM:<>\r\n").data == R.NEED_EHLO.encode()
    assert b"STARTTLS" not in session.feed(EHLO).data


def test_bad_ehlo_argument(env):
    session, _ = env
    assert session.feed(b"EHLO a(b)\r\n").data.startswith(b"501 5.5.4")
    assert session.feed(b"HELO [127.0.0.1]\r\n").data.startswith(b"250 mx.example.test")


def deliver_one(session: Session, mail: bytes, rcpts: list[bytes], body: bytes) -> list[bytes]:
    return talk(session, EHLO, mail, *rcpts, b"DATA\r\n", body + b"\r\n.\r\n")


def test_simple_delivery_with_trace_headers(env):  # RFC 5321 §4.4
    session, store = env
    replies = deliver_one(session, b"MAIL FROM:<a@x.example>\r\n",
                          [b"RCPT TO:<Alice@EXAMPLE.test>\r\n"], b"Subject: t\r\n\r\nhi")
    assert replies[1:] == [R.SENDER_OK.encode(), R.RECIPIENT_OK.encode(),
                           R.START_DATA.encode(), R.QUEUED.encode()]
    [(accounts, raw)] = store.delivered
    assert accounts == ["alice@example.test"]
    assert raw.startswith(b"Return-Path: <a@x.example>\r\nReceived: from client.example ([192.0.2.7])\r\n")
    assert b"with ESMTP id " in raw and b"for <Alice@EXAMPLE.test>;" in raw
    assert raw.endswith(b"\r\nSubject: t\r\n\r\nhi\r\n")


def test_alias_and_direct_deduplicated(env):
    session, store = env
    deliver_one(session, b"MAIL FROM:<>\r\n",
                [b"RCPT TO:<team@example.test>\r\n", b"RCPT TO:<alice@example.test>\r\n",
                 b"RCPT TO:<al@example.test>\r\n"], b"x")
    [(accounts, raw)] = store.delivered
    assert accounts == ["alice@example.test", "bob@example.test"]
    assert b" for <" not in raw  # several recipients: not named (RFC 5321 §7.2)


def test_storage_failure_gives_451_and_nothing_stored(env):  # promise 1
    session, store = env
    store.fail = StorageUnavailable("disk on fire: /secret/path")
    replies = deliver_one(session, b"MAIL FROM:<>\r\n", [b"RCPT TO:<bob@example.test>\r\n"], b"x")
    assert replies[-1] == R.STORAGE_FAILED.encode() and store.delivered == []
    assert b"secret" not in b"".join(replies)
    store.fail = RuntimeError("unexpected")
    replies = deliver_one(session, b"MAIL FROM:<>\r\n", [b"RCPT TO:<bob@example.test>\r\n"], b"x")
    assert replies[-1] == R.STORAGE_FAILED.encode()
    # The session goes on: the next transaction works.
    store.fail = None
    replies = deliver_one(session, b"MAIL FROM:<>\r\n", [b"RCPT TO:<bob@example.test>\r\n"], b"x")
    assert replies[-1] == R.QUEUED.encode() and len(store.delivered) == 1


@pytest.mark.parametrize(
    ("rcpt", "reply"),
    [
        (b"<nobody@example.test>", R.UNKNOWN_USER),
        (b"<alice@elsewhere.example>", R.RELAY_DENIED),
        (b"<alice%elsewhere.example@example.test>", R.RELAY_DENIED),  # percent hack
        (b"<elsewhere.example!alice@example.test>", R.RELAY_DENIED),  # bang path
        (b'<"alice@elsewhere.example"@example.test>', R.RELAY_DENIED),  # quoted @
        (b'<"alice%elsewhere.example"@example.test>', R.RELAY_DENIED),
        (b"<alice@[127.0.0.1]>", R.RELAY_DENIED),  # address literal
        (b"<alice@[IPv6:::1]>", R.RELAY_DENIED),
        (b"<@example.test:alice@elsewhere.example>", R.RELAY_DENIED),  # source route out
        (b"<@relay.example,@example.test:alice@example.test>", R.RECIPIENT_OK),  # route ignored
        (b"<alice@example.test.>", R.BAD_ADDRESS),
        (b"alice@example.test", R.BAD_ADDRESS),
        (b"<>", R.BAD_ADDRESS),
        (b"<postmaster@example.test>", R.RECIPIENT_OK),
        (b"<PostMaster@Example.Test>", R.RECIPIENT_OK),
        (b"<postmaster>", R.RECIPIENT_OK),  # RFC 5321 §4.5.1
        (b"<alice@example.test> FOO=bar", R.PARAM_NOT_RECOGNIZED),
        (b"<alice@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice+40example.test",
         R.RECIPIENT_OK),
        (b"<alice@example.test> NOTIFY=NEVER,SUCCESS", R.ARG_SYNTAX),
        (b"<alice@example.test> ORCPT=rfc822;bad+zz", R.ARG_SYNTAX),
        ("<ålice@example.test>".encode(), R.NEEDS_SMTPUTF8),
    ],
)
def test_rcpt_policy(env, rcpt, reply):  # RFC 5321 §3.6, §4.1.1.3; RFC 3461 §4
    session, _ = env
    replies = talk(session, EHLO, b"MAIL FROM:<a@x.example>\r\n", b"RCPT TO:" + rcpt + b"\r\n")
    assert replies[-1] == reply.encode()


def test_no_relay_ever_reaches_the_store(env):
    session, store = env
    replies = talk(session, EHLO, b"MAIL FROM:<a@x.example>\r\n",
                   b"RCPT TO:<alice%evil.example@example.test>\r\n", b"DATA\r\n")
    assert replies[-1] == R.NEED_RCPT.encode() and store.delivered == []


@pytest.mark.parametrize(
    ("mail", "reply"),
    [
        (b"MAIL FROM:<>", R.SENDER_OK),
        (b"MAIL FROM: <a@x.example>", R.SENDER_OK),
        (b"MAIL FROM:<a@x.example> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=abc+2Bd", R.SENDER_OK),
        (b"MAIL FROM:<a@x.example> BODY=BINARYMIME SMTPUTF8", R.SENDER_OK),
        (b"MAIL FROM:<a@x.example> SIZE=999999999999", R.MESSAGE_TOO_BIG),  # RFC 1870 §6.1
        (b"MAIL FROM:<a@x.example> SIZE=x", R.ARG_SYNTAX),
        (b"MAIL FROM:<a@x.example> BODY=9BIT", R.ARG_SYNTAX),
        (b"MAIL FROM:<a@x.example> RET=ALL", R.ARG_SYNTAX),
        (b"MAIL FROM:<a@x.example> SIZE=1 SIZE=2", R.ARG_SYNTAX),
        (b"MAIL FROM:<a@x.example> SMTPUTF8=yes", R.ARG_SYNTAX),
        (b"MAIL FROM:<a@x.example> XYZ", R.PARAM_NOT_RECOGNIZED),
        (b"MAIL FROM:<a@@x.example>", R.BAD_SENDER),
        (b"MAIL TO:<a@x.example>", R.ARG_SYNTAX),
        ("MAIL FROM:<ä@x.example>".encode(), R.NEEDS_SMTPUTF8),
        ("MAIL FROM:<ä@x.example> SMTPUTF8".encode(), R.SENDER_OK),
    ],
)
def test_mail_parameters(env, mail, reply):  # RFC 5321 §4.1.1.2, RFC 1870, RFC 3461, RFC 6531
    session, _ = env
    assert talk(session, EHLO, mail + b"\r\n")[-1] == reply.encode()


def test_mail_params_need_ehlo(env):
    session, _ = env
    assert talk(session, b"HELO c.example\r\n", b"MAIL FROM:<> SIZE=10\r\n")[-1] == \
        R.PARAM_NOT_RECOGNIZED.encode()


def test_binarymime_requires_bdat_and_bdat_delivers(env):  # RFC 3030 §3
    session, store = env
    replies = talk(session, EHLO, b"MAIL FROM:<> BODY=BINARYMIME\r\n",
                   b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n")
    assert replies[-1] == R.BINARY_NEEDS_BDAT.encode()
    out = session.feed(b"BDAT 4\r\nab\r\nBDAT 3 LAST\r\n\x00\n.").data
    assert out == b"250 2.0.0 4 octets received\r\n" + R.QUEUED.encode()
    [(accounts, raw)] = store.delivered
    assert raw.endswith(b"\r\nab\r\n\x00\n.")


def test_recipient_limit(env):  # RFC 5321 §4.5.3.1.8
    ctx, _, _ = make_ctx(max_recipients=2)
    session = Session(ctx, "192.0.2.7")
    replies = talk(session, EHLO, b"MAIL FROM:<>\r\n", *[b"RCPT TO:<bob@example.test>\r\n"] * 3)
    assert replies[-1] == R.TOO_MANY_RECIPIENTS.encode()


def test_too_many_errors_closes():
    ctx, _, _ = make_ctx(max_errors=3)
    session = Session(ctx, "192.0.2.7")
    out = session.feed(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert out.close
    assert out.data == R.SYNTAX_ERROR.encode() * 3 + R.TOO_MANY_ERRORS.encode()


def test_vrfy_expn_help_rset_noop_quit(env):  # RFC 5321 §3.5.3, §4.1.1.5-10
    session, _ = env
    replies = talk(session, EHLO, b"VRFY alice\r\n", b"EXPN team\r\n", b"HELP\r\n",
                   b"RSET\r\n", b"NOOP\r\n")
    assert replies[1:] == [R.VRFY_CANNOT.encode(), R.EXPN_CANNOT.encode(), R.HELP.encode(),
                           R.RESET_OK.encode(), R.NOOP_OK.encode()]
    out = session.feed(b"QUIT\r\n")
    assert out.data == R.BYE.encode() and out.close


def test_rset_drops_the_transaction(env):
    session, store = env
    replies = talk(session, EHLO, b"MAIL FROM:<>\r\n", b"RCPT TO:<bob@example.test>\r\n",
                   b"RSET\r\n", b"DATA\r\n")
    assert replies[-1] == R.NEED_MAIL.encode()


def test_size_exceeded_in_data(env):
    ctx, _, store = make_ctx(max_message_size=100)
    session = Session(ctx, "192.0.2.7")
    replies = deliver_one(session, b"MAIL FROM:<>\r\n", [b"RCPT TO:<bob@example.test>\r\n"],
                          b"x" * 200)
    assert replies[-1] == R.MESSAGE_TOO_BIG.encode() and store.delivered == []


def test_pipelined_transaction_in_one_read(env):  # RFC 2920 §3.1
    session, store = env
    out = session.feed(EHLO + b"MAIL FROM:<>\r\nRCPT TO:<nobody@example.test>\r\n"
                       b"RCPT TO:<bob@example.test>\r\nDATA\r\n")
    assert out.data.endswith(R.SENDER_OK.encode() + R.UNKNOWN_USER.encode()
                             + R.RECIPIENT_OK.encode() + R.START_DATA.encode())
    assert session.feed(b"hi\r\n.\r\nQUIT\r\n").data == R.QUEUED.encode() + R.BYE.encode()
    assert len(store.delivered) == 1


def test_smtputf8_protocol_keyword(env):  # RFC 6531 §3.7.3
    session, store = env
    deliver_one(session, "MAIL FROM:<ä@x.example> SMTPUTF8\r\n".encode(),
                [b"RCPT TO:<bob@example.test>\r\n"], b"x")
    assert b"with UTF8SMTP id" in store.delivered[0][1]


def test_directory_failure_is_temporary(env):
    session, store = env

    def broken(address):
        raise ConnectionError("etcd at 10.0.0.1 unreachable")

    session.ctx.directory.resolve_recipient = broken
    replies = talk(session, EHLO, b"MAIL FROM:<>\r\n", b"RCPT TO:<bob@example.test>\r\n",
                   b"NOOP\r\n")
    assert replies[2] == R.TEMPORARY_FAILURE.encode() and b"etcd" not in replies[2]
    assert replies[3] == R.NOOP_OK.encode()


def test_postmaster_without_any_mailbox_is_a_temporary_failure():  # RFC 5321 §4.5.1
    # The directory knows postmaster@ but no account exists to receive it:
    # refusing would break §4.5.1, accepting would lose the message.
    ctx, directory, store = make_ctx()
    directory.aliases["postmaster@example.test"] = []
    session = Session(ctx, "192.0.2.7")
    replies = talk(session, EHLO, b"MAIL FROM:<>\r\n", b"RCPT TO:<postmaster@example.test>\r\n")
    assert replies[-1] == R.NO_MAILBOX_YET.encode()
    assert R.NO_MAILBOX_YET.temporary
