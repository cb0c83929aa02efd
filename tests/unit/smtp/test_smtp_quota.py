"""Quota at SMTP delivery (RFC 9208 §5.1 STORAGE, RFC 3463 X.2.2 "mailbox full")."""

from __future__ import annotations

from node.smtp import replies as R
from node.smtp.session import Session
from tests.unit.smtp.fakes import make_ctx

EHLO = b"EHLO client.example\r\n"
MAIL = b"MAIL FROM:<a@x.example>\r\n"


def _session():
    ctx, directory, store = make_ctx()
    return Session(ctx, "192.0.2.7"), directory, store


def _talk(session: Session, *lines: bytes) -> list[bytes]:
    return [session.feed(line).data for line in lines]


def test_rcpt_refused_552_522_when_the_account_is_already_full() -> None:
    session, directory, store = _session()
    directory.quotas["alice@example.test"] = 1000
    store.used["alice@example.test"] = 1000  # at the limit: nothing more fits
    replies = _talk(session, EHLO, MAIL, b"RCPT TO:<alice@example.test>\r\n",
                    b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n", b"Subject: t\r\n\r\nhi\r\n.\r\n")
    assert replies[2] == R.MAILBOX_FULL.encode()
    assert replies[2].startswith(b"552 5.2.2 ")
    assert replies[3] == R.RECIPIENT_OK.encode()  # other recipients unaffected
    assert replies[5] == R.QUEUED.encode()
    assert [accounts for accounts, _ in store.delivered] == [["bob@example.test"]]


def test_alias_with_a_full_member_is_refused() -> None:
    session, directory, store = _session()
    directory.quotas["bob@example.test"] = 10
    store.used["bob@example.test"] = 50
    replies = _talk(session, EHLO, MAIL, b"RCPT TO:<team@example.test>\r\n")
    assert replies[2] == R.MAILBOX_FULL.encode()


def test_message_that_would_exceed_is_refused_at_data_end() -> None:
    session, directory, store = _session()
    directory.quotas["alice@example.test"] = 1000
    store.used["alice@example.test"] = 900
    body = b"Subject: big\r\n\r\n" + b"x" * 200 + b"\r\n.\r\n"
    replies = _talk(session, EHLO, MAIL, b"RCPT TO:<alice@example.test>\r\n", b"DATA\r\n", body)
    assert replies[2] == R.RECIPIENT_OK.encode()
    assert replies[4] == R.MAILBOX_FULL.encode()
    assert store.delivered == []
    # A small one still fits (the check counts the message as received, soft limit).
    replies = _talk(session, MAIL, b"RCPT TO:<alice@example.test>\r\n", b"DATA\r\n",
                    b"Subject: s\r\n\r\nhi\r\n.\r\n")
    assert replies[-1] == R.QUEUED.encode()


def test_no_quota_means_no_limit() -> None:
    session, _directory, store = _session()
    store.used["alice@example.test"] = 10**12
    replies = _talk(session, EHLO, MAIL, b"RCPT TO:<alice@example.test>\r\n")
    assert replies[2] == R.RECIPIENT_OK.encode()
