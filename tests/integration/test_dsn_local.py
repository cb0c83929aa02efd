"""Success DSNs on local delivery against a real node (RFC 3461 §4.1, §6.2.7.1;
RFC 3464): the report reaches the sender's INBOX, read back over IMAP."""

from __future__ import annotations

import email
import email.policy
import imaplib
import smtplib
import time

from tests.support.node import USERS

ALICE, BOB = "alice@example.test", "bob@example.test"
DEADLINE = 30.0


def _inbox(node, user: str) -> list[bytes]:
    """Every message in the user's INBOX, in UID order."""
    imap = imaplib.IMAP4(node.host, node.ports["imap"])
    try:
        imap.login(user, USERS[user])
        imap.select("INBOX", readonly=True)
        _, data = imap.uid("SEARCH", "ALL")
        uids = data[0].split()
        out = []
        for uid in uids:
            _, fetched = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            out.append(fetched[0][1])
        return out
    finally:
        imap.logout()


def _wait_for(node, user: str, count: int) -> list[bytes]:
    deadline = time.monotonic() + DEADLINE
    while True:
        messages = _inbox(node, user)
        if len(messages) >= count or time.monotonic() > deadline:
            return messages
        time.sleep(0.1)  # polling with a deadline


def _send(node, sender: str, rcpt_options: list[str], mail_options: list[str] = ()) -> None:
    body = (f"From: <{sender}>\r\nTo: <{ALICE}>\r\nSubject: dsn probe\r\n"
            "Message-ID: <probe-1@example.test>\r\n\r\nhello\r\n")
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("dsn")
        refused = smtp.sendmail(sender, [ALICE], body, mail_options=list(mail_options),
                                rcpt_options=rcpt_options)
        assert refused == {}


def test_notify_success_puts_delivered_report_in_senders_inbox(postroom_node) -> None:
    node = postroom_node  # the module's node: count from what is there already
    alice, before = len(_inbox(node, ALICE)), len(_inbox(node, BOB))
    _send(node, BOB, ["NOTIFY=SUCCESS", "ORCPT=rfc822;Alice@example.test"],
          ["RET=HDRS", "ENVID=env+2Bprobe"])
    assert len(_wait_for(node, ALICE, alice + 1)) == alice + 1  # the message itself
    reports = _wait_for(node, BOB, before + 1)[before:]
    assert len(reports) == 1, node.log_tail()
    raw = reports[0]
    assert raw.startswith(b"Return-Path: <>\r\n")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    text, status, headers = msg.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_msg, per_rcpt = status.get_payload()
    assert per_msg["Reporting-MTA"] == "dns; mx.example.test"
    assert per_msg["Original-Envelope-Id"] == "env+probe"  # xtext decoded (RFC 3461 §4.4)
    assert per_rcpt["Action"] == "delivered"
    assert per_rcpt["Status"] == "2.0.0"
    assert per_rcpt["Final-Recipient"] == f"rfc822; {ALICE}"
    assert per_rcpt["Original-Recipient"] == "rfc822; Alice@example.test"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: dsn probe" in headers.get_payload(decode=True)


def test_no_report_without_notify_success_or_from_null_sender(postroom_node) -> None:
    node = postroom_node  # the module's node: count from what is there already
    alice, bob = len(_inbox(node, ALICE)), _inbox(node, BOB)
    _send(node, BOB, [])  # default NOTIFY: failure and delay only
    _send(node, BOB, ["NOTIFY=FAILURE,DELAY"])
    _send(node, "", ["NOTIFY=SUCCESS"])  # RFC 3461 §6.2: never a report to <>
    assert len(_wait_for(node, ALICE, alice + 3)) == alice + 3
    # The three deliveries are committed; a report would have been stored
    # before the 250 of its message, so bob's INBOX is final now.
    assert _inbox(node, BOB) == bob
