"""SMTP session, submission role (RFC 6409, RFC 4954), against small fakes.

The real directory, queue and store are exercised by
tests/interop/test_submission.py against a running node.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.auth import sasl
from node.config import Config, SubmissionSettings
from node.context import NodeContext
from node.smtp import replies as R
from node.smtp.session import Session
from storage.model import QueuedRecipient, QueueEntry, StorageUnavailable
from tests.unit.smtp.fakes import FakeDirectory, FakeStore

EHLO = b"EHLO client.example\r\n"
TLS = "TLSv1.3 TLS_AES_128_GCM_SHA256"
PASSWORDS = {"alice@example.test": "alice-pw", "bob@example.test": "bob-pw"}


class SubmissionDirectory(FakeDirectory):
    """FakeDirectory plus what submission needs (same rules as EtcdDirectory)."""

    def __init__(self) -> None:
        super().__init__()
        self.scram = {
            a: sasl.derive_scram(a, pw, salt=b"saltsaltsaltsalt") for a, pw in PASSWORDS.items()
        }

    def authenticate(self, username: str, password: str) -> str | None:
        account = username.lower()
        return account if PASSWORDS.get(account) == password else None

    def scram_credentials(self, username: str) -> sasl.ScramCredentials | None:
        return self.scram.get(username.lower())

    def sender_allowed(self, account: str, address: str) -> bool:
        address = address.lower()
        if address == account:
            return True
        return account in self.aliases.get(address, [])


class FakeQueue:
    def __init__(self) -> None:
        self.entries: list[QueueEntry] = []
        self.fail: Exception | None = None

    def enqueue(self, sender: str, recipients: Iterable[QueuedRecipient], raw: bytes,
                **kw) -> QueueEntry:
        if self.fail is not None:
            raise self.fail
        entry = QueueEntry(id=f"Q{len(self.entries) + 1:04d}", sender=sender,
                           recipients=tuple(recipients), blob=raw.decode("utf-8", "replace"),
                           size=len(raw), created=0.0, next_attempt=0.0,
                           envid=kw.get("envid"), ret=kw.get("ret"),
                           requiretls=kw.get("requiretls", False),
                           smtputf8=kw.get("smtputf8", False), body=kw.get("body", "7BIT"))
        self.entries.append(entry)
        return entry


class FakeSigner:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def sign(self, raw: bytes, domain: str) -> bytes:
        self.calls.append(domain)
        return b"DKIM-Signature: v=1; d=" + domain.encode() + b"\r\n" + raw


@dataclasses.dataclass
class Env:
    session: Session
    store: FakeStore
    queue: FakeQueue
    dkim: FakeSigner
    directory: SubmissionDirectory

    def feed(self, *chunks: bytes) -> list[bytes]:
        return [self.session.feed(c).data for c in chunks]


def make(tls: str | None = TLS, **submission) -> Env:
    settings = dataclasses.replace(SubmissionSettings(), auth_failure_delay=0.5, **submission)
    directory, store, queue, dkim = SubmissionDirectory(), FakeStore(), FakeQueue(), FakeSigner()
    ctx = NodeContext(config=Config(submission=settings), directory=directory,  # type: ignore[arg-type]
                      store=store, tls=None, hostname="mx.example.test",  # type: ignore[arg-type]
                      queue=queue, dkim=dkim)  # type: ignore[arg-type]
    return Env(Session(ctx, "192.0.2.9", tls=tls, role="submission"), store, queue, dkim,
               directory)


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def login(env: Env, user: str = "alice@example.test", password: str = "alice-pw") -> bytes:
    env.feed(EHLO)
    return env.session.feed(b"AUTH PLAIN " + plain(user, password) + b"\r\n").data


def test_587_before_starttls_no_auth_and_auth_refused():  # RFC 3207 §4, RFC 8314 §3.3
    env = make(tls=None)
    ehlo = env.feed(EHLO)[0]
    assert b"250-STARTTLS\r\n" in ehlo and b"AUTH" not in ehlo and b"REQUIRETLS" not in ehlo
    reply = env.feed(b"AUTH PLAIN " + plain("alice@example.test", "alice-pw") + b"\r\n")[0]
    assert reply == R.MUST_STARTTLS.encode()
    assert reply == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    assert env.session.account is None
    assert env.feed(b"MAIL FROM:<alice@example.test>\r\n")[0] == R.AUTH_REQUIRED.encode()


def test_ehlo_after_tls_offers_auth_and_requiretls():  # RFC 4954 §3, RFC 8689 §4
    env = make()
    ehlo = env.feed(EHLO)[0].decode()
    assert "250-AUTH PLAIN LOGIN SCRAM-SHA-256\r\n" in ehlo
    assert "250-REQUIRETLS\r\n" in ehlo and "STARTTLS" not in ehlo
    assert f"250-SIZE {SubmissionSettings().max_message_size}\r\n" in ehlo


def test_starttls_then_auth():
    env = make(tls=None)
    env.feed(EHLO)
    out = env.session.feed(b"STARTTLS\r\n")
    assert out.starttls
    env.session.tls_established(TLS)
    assert login(env) == b"235 2.7.0 Authentication successful\r\n"


def test_mail_before_auth():  # RFC 4954 §6
    env = make()
    env.feed(EHLO)
    assert env.feed(b"MAIL FROM:<alice@example.test>\r\n")[0] == (
        b"530 5.7.0 Authentication required\r\n")


def test_wrong_password_delay_and_limit():  # RFC 4954 §6 535 5.7.8
    env = make(max_auth_failures=3)
    env.feed(EHLO)
    for _attempt in range(2):
        out = env.session.feed(b"AUTH PLAIN " + plain("alice@example.test", "bad") + b"\r\n")
        assert out.data == b"535 5.7.8 Authentication credentials invalid\r\n"
        assert out.delay == 0.5 and not out.close
    out = env.session.feed(b"AUTH PLAIN " + plain("alice@example.test", "bad") + b"\r\n")
    assert out.data == R.TOO_MANY_AUTH_FAILURES.encode() and out.close and out.delay == 0.5
    assert out.data.startswith(b"421 4.7.0")


def test_auth_login_exchange_and_cancel():  # draft-murchison-sasl-login, RFC 4954 §4 "*"
    env = make()
    env.feed(EHLO)
    assert env.feed(b"AUTH LOGIN\r\n")[0] == b"334 " + base64.b64encode(b"Username:") + b"\r\n"
    assert env.feed(b"*\r\n")[0] == R.AUTH_CANCELLED.encode()
    assert env.feed(b"AUTH LOGIN\r\n")[0].startswith(b"334 ")
    assert env.feed(base64.b64encode(b"bob@example.test") + b"\r\n")[0] == (
        b"334 " + base64.b64encode(b"Password:") + b"\r\n")
    assert env.feed(base64.b64encode(b"bob-pw") + b"\r\n")[0] == R.AUTH_OK.encode()
    assert env.session.account == "bob@example.test"
    assert env.feed(b"AUTH PLAIN " + plain("bob@example.test", "bob-pw") + b"\r\n")[0] == (
        R.ALREADY_AUTHENTICATED.encode())


def test_auth_plain_empty_initial_response_and_bad_base64():
    env = make()
    env.feed(EHLO)
    assert env.feed(b"AUTH PLAIN =\r\n")[0] == R.AUTH_FAILED.encode()  # "=" is empty data
    assert env.feed(b"AUTH PLAIN\r\n")[0] == b"334\r\n"  # RFC 4954 §4: empty challenge
    assert env.feed(b"%%%\r\n")[0] == R.AUTH_BAD_BASE64.encode()
    assert env.feed(b"AUTH CRAM-MD5\r\n")[0] == R.UNKNOWN_MECHANISM.encode()
    assert env.feed(b"NOOP\r\n")[0] == R.NOOP_OK.encode()  # back in command mode


def test_auth_scram_sha256_with_final_message():  # RFC 7677, RFC 4954 §4 additional data
    env = make()
    env.feed(EHLO)
    first = b"n,,n=alice@example.test,r=clientnonce"
    reply = env.feed(b"AUTH SCRAM-SHA-256 " + base64.b64encode(first) + b"\r\n")[0]
    assert reply.startswith(b"334 ")
    server_first = base64.b64decode(reply[4:-2]).decode()
    final = scram_final(first.decode()[3:], server_first, "alice-pw")
    reply = env.feed(base64.b64encode(final.encode()) + b"\r\n")[0]
    assert reply.startswith(b"334 ") and base64.b64decode(reply[4:-2]).startswith(b"v=")
    assert env.feed(b"\r\n")[0] == R.AUTH_OK.encode()
    assert env.session.account == "alice@example.test"


def test_auth_scram_wrong_password_and_no_credentials():
    env = make()
    env.directory.scram.pop("bob@example.test")  # an account from before SCRAM
    env.feed(EHLO)
    for user, pw in (("alice@example.test", "wrong"), ("bob@example.test", "bob-pw")):
        first = f"n,,n={user},r=cn"
        reply = env.feed(b"AUTH SCRAM-SHA-256 " + base64.b64encode(first.encode()) + b"\r\n")[0]
        final = scram_final(first[3:], base64.b64decode(reply[4:-2]).decode(), pw)
        assert env.feed(base64.b64encode(final.encode()) + b"\r\n")[0] == R.AUTH_FAILED.encode()


def scram_final(client_first_bare: str, server_first: str, password: str) -> str:
    import hashlib
    import hmac

    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                 int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    without = f"c=biws,r={attrs['r']}"
    msg = f"{client_first_bare},{server_first},{without}".encode()
    sig = hmac.new(hashlib.sha256(client_key).digest(), msg, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
    return f"{without},p={base64.b64encode(proof).decode()}"


@pytest.mark.parametrize("sender, ok", [
    ("alice@example.test", True),
    ("Alice@Example.TEST", True),
    ("al@example.test", True),  # alias delivering only to alice
    ("team@example.test", True),  # alias that includes alice
    ("bob@example.test", False),  # someone else: RFC 6409 §6.1
    ("alice@elsewhere.example", False),
    ("", False),  # null sender never from a user
])
def test_sender_rules(sender, ok):
    env = make()
    assert login(env) == R.AUTH_OK.encode()
    reply = env.feed(f"MAIL FROM:<{sender}>\r\n".encode())[0]
    if ok:
        assert reply == R.SENDER_OK.encode()
    else:
        assert reply.startswith(b"553 5.7.1 Sender address rejected")
    if sender == "bob@example.test":
        assert reply == b"553 5.7.1 Sender address rejected: not owned by user alice@example.test\r\n"


def test_any_sender_accounts_within_own_domain():
    env = make(any_sender_accounts=["alice@example.test"])
    login(env)
    assert env.feed(b"MAIL FROM:<bob@example.test>\r\n")[0] == R.SENDER_OK.encode()
    env.feed(b"RSET\r\n")
    assert env.feed(b"MAIL FROM:<x@elsewhere.example>\r\n")[0].startswith(b"553 5.7.1")


def test_local_and_remote_recipients_headers_added_and_signed():  # RFC 6409 §8.1, §8.3
    env = make()
    login(env)
    replies = env.feed(b"MAIL FROM:<alice@example.test> RET=HDRS ENVID=e1\r\n",
                       b"RCPT TO:<bob@example.test>\r\n",
                       b"RCPT TO:<carol@remote.example> NOTIFY=SUCCESS,FAILURE "
                       b"ORCPT=rfc822;carol@remote.example\r\n",
                       b"RCPT TO:<nobody@example.test>\r\n",
                       b"DATA\r\n", b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert replies[:3] == [R.SENDER_OK.encode(), R.RECIPIENT_OK.encode(),
                           R.RECIPIENT_OK.encode()]
    assert replies[3] == R.UNKNOWN_USER.encode()  # unknown local user: 550 5.1.1
    assert replies[5] == b"250 2.0.0 message accepted for delivery, queued as Q0001\r\n"
    [(accounts, local_raw)] = env.store.delivered
    assert accounts == ["bob@example.test"]
    assert local_raw.startswith(b"Return-Path: <alice@example.test>\r\nReceived: from "
                                b"client.example ([192.0.2.9]) (authenticated)\r\n")
    assert b"with ESMTPSA" in local_raw and b"alice-pw" not in local_raw
    [entry] = env.queue.entries
    queued = entry.blob.encode()
    assert queued.startswith(b"DKIM-Signature: v=1; d=example.test\r\nReceived: ")
    assert b"Return-Path" not in queued
    assert env.dkim.calls == ["example.test"]
    for raw in (local_raw, queued):
        assert b"\r\nDate: " in raw and b"\r\nMessage-ID: <" in raw
        assert b"@mx.example.test>\r\n" in raw and raw.endswith(b"Subject: hi\r\n\r\nbody\r\n")
    assert entry.sender == "alice@example.test" and entry.ret == "HDRS" and entry.envid == "e1"
    assert entry.recipients == (QueuedRecipient("carol@remote.example", ("SUCCESS", "FAILURE"),
                                                "rfc822;carol@remote.example"),)


def test_existing_date_and_message_id_kept():
    env = make()
    login(env)
    env.feed(b"MAIL FROM:<alice@example.test>\r\n", b"RCPT TO:<bob@example.test>\r\n",
             b"DATA\r\n",
             b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nmessage-id:\r\n <x@y>\r\n\r\nb\r\n.\r\n")
    [(_, raw)] = env.store.delivered
    assert raw.count(b"Date:") == 1 and raw.count(b"essage-") == 1
    assert env.queue.entries == [] and env.dkim.calls == []


def test_queue_failure_answers_451():  # promise 1
    env = make()
    env.queue.fail = StorageUnavailable("disk gone")
    login(env)
    replies = env.feed(b"MAIL FROM:<alice@example.test>\r\n", b"RCPT TO:<x@remote.example>\r\n",
                       b"DATA\r\n", b"x\r\n.\r\n")
    assert replies[-1] == b"451 4.3.0 temporary failure, please try again later\r\n"


def test_requiretls_param():  # RFC 8689 §4.1
    env = make()
    login(env)
    replies = env.feed(b"MAIL FROM:<alice@example.test> REQUIRETLS\r\n",
                       b"RCPT TO:<x@remote.example>\r\n", b"BDAT 3 LAST\r\nx\r\n")
    assert replies[0] == R.SENDER_OK.encode() and replies[-1].startswith(b"250 2.0.0")
    assert env.queue.entries[0].requiretls
    assert env.feed(b"MAIL FROM:<alice@example.test> REQUIRETLS=yes\r\n")[0] == (
        R.ARG_SYNTAX.encode())
    mx = make(tls=None)
    mx_ehlo = mx.feed(EHLO)[0]
    assert b"REQUIRETLS" not in mx_ehlo


def test_requiretls_refused_without_tls_even_on_mx_role():
    from tests.unit.smtp.fakes import make_ctx

    ctx, _, _ = make_ctx()
    mx = Session(ctx, "192.0.2.7", tls=TLS)  # MX role never offers REQUIRETLS
    mx.feed(EHLO)
    assert mx.feed(b"MAIL FROM:<a@b.example> REQUIRETLS\r\n").data == (
        R.PARAM_NOT_RECOGNIZED.encode())
    assert mx.feed(b"AUTH PLAIN AAAA\r\n").data == R.NOT_IMPLEMENTED.encode()


def test_submission_limits_from_config():
    env = make(max_recipients=1, max_message_size=100)
    login(env)
    replies = env.feed(b"MAIL FROM:<alice@example.test> SIZE=101\r\n")
    assert replies[0] == R.MESSAGE_TOO_BIG.encode()
    replies = env.feed(b"MAIL FROM:<alice@example.test>\r\n", b"RCPT TO:<bob@example.test>\r\n",
                       b"RCPT TO:<al@example.test>\r\n")
    assert replies[2] == R.TOO_MANY_RECIPIENTS.encode()


def test_long_auth_line_accepted():  # RFC 4954 §4: 12288 octets
    env = make()
    env.feed(EHLO)
    long_pw = "p" * 3000
    reply = env.feed(b"AUTH PLAIN " + plain("alice@example.test", long_pw) + b"\r\n")[0]
    assert reply == R.AUTH_FAILED.encode()


def test_auth_bytewise_same_as_whole():
    whole = make()
    whole_replies = whole.feed(EHLO + b"AUTH LOGIN\r\n")
    split = make()
    data = EHLO + b"AUTH LOGIN\r\n"
    split_replies = b"".join(split.session.feed(data[i:i + 1]).data for i in range(len(data)))
    assert whole_replies[0] == split_replies
    assert split.session.core.in_sasl


class _Boom(Exception):
    pass


def test_directory_failure_during_auth_is_451_and_exchange_ends():
    env = make()

    def broken(username: str, password: str) -> str | None:
        raise _Boom("etcd unreachable")

    env.directory.authenticate = broken  # type: ignore[method-assign]
    env.feed(EHLO)
    assert env.feed(b"AUTH LOGIN\r\n", base64.b64encode(b"alice@example.test") + b"\r\n",
                    base64.b64encode(b"alice-pw") + b"\r\n")[2] == R.TEMPORARY_FAILURE.encode()
    assert not env.session.core.in_sasl and env.session.core.state.value == "ready"
    assert env.feed(b"NOOP\r\n")[0] == R.NOOP_OK.encode()


TRANSCRIPT = (EHLO + b"AUTH LOGIN\r\n" + base64.b64encode(b"alice@example.test") + b"\r\n"
              + base64.b64encode(b"alice-pw") + b"\r\nMAIL FROM:<alice@example.test>\r\n"
              + b"RCPT TO:<x@remote.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
              + b"Subject: s\r\n\r\n.. dot\r\nbody\r\n.\r\nQUIT\r\n")


def _replies_without_ids(data: bytes) -> bytes:
    import re

    return re.sub(rb"queued as \S+", b"queued as ID", data)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(TRANSCRIPT)), max_size=20))
def test_transcript_split_anywhere_gives_the_same_replies(cuts):  # whole/bytewise/random
    whole = make()
    expected = _replies_without_ids(whole.session.feed(TRANSCRIPT).data)
    assert expected.endswith(b"221 2.0.0 closing connection\r\n")
    assert b"250 2.0.0 message accepted for delivery, queued as ID\r\n" in expected
    split = make()
    got = b""
    points = sorted(set(cuts)) + [len(TRANSCRIPT)]
    start = 0
    for point in points:
        got += split.session.feed(TRANSCRIPT[start:point]).data
        start = point
    assert _replies_without_ids(got) == expected
    assert len(split.queue.entries) == 1 and len(split.store.delivered) == 1


@settings(deadline=None)
@given(st.binary(max_size=400))
def test_any_input_after_auth_never_raises(data):  # promise 4
    env = make()
    env.feed(EHLO)
    env.feed(b"AUTH PLAIN\r\n")
    out = env.session.feed(data)
    assert isinstance(out.data, bytes)
    out = env.session.feed(b"\r\nNOOP\r\n")
    assert isinstance(out.data, bytes)


def test_transcript_bytewise_gives_the_same_replies():
    whole, split = make(), make()
    expected = _replies_without_ids(whole.session.feed(TRANSCRIPT).data)
    got = b"".join(split.session.feed(TRANSCRIPT[i:i + 1]).data for i in range(len(TRANSCRIPT)))
    assert _replies_without_ids(got) == expected


def test_sasl_response_over_the_cap_closes():  # RFC 4954 §4: 12288 octets at most
    env = make()
    env.feed(EHLO)
    env.feed(b"AUTH PLAIN\r\n")
    out = env.session.feed(b"A" * 13000)
    assert out.data == R.LINE_TOO_LONG.encode() and out.close
    assert env.session.account is None
