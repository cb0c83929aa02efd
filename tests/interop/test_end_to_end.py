"""A message sent over SMTP reads back byte-identical over IMAP and POP3.

The server may only prepend header fields (Received, Return-Path); what the
client sent must be an exact suffix of what IMAP BODY[] and POP3 RETR give.
The cases cover the bytes most likely to be mangled: dot-leading lines
(dot-stuffing in both directions), 8-bit UTF-8, long lines, trailing spaces,
an empty body and a binary-looking base64 attachment.
"""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import smtplib

import pytest

CASES = {
    "plain": b"Subject: plain\r\n\r\nHello.\r\n",
    "dots": b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\n. \r\nend\r\n",
    "utf8": "Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\nCafé ünïcödé — ✓\r\n".encode(),
    "long_line": b"Subject: long\r\n\r\n" + b"x" * 990 + b"\r\n",
    "trailing_space": b"Subject: spaces   \r\n\r\nline with trailing spaces   \r\n\t\r\n",
    "empty_body": b"Subject: empty\r\n\r\n",
    "attachment": b"Subject: att\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
    b"Content-Type: text/plain\r\n\r\nsee attached\r\n--b1\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(os.urandom(3000)).replace(b"\n", b"\r\n")
    + b"--b1--\r\n",
}


def headers(name: str) -> bytes:
    return (
        f"From: sender@remote.test\r\nTo: alice@example.test\r\n"
        f"Message-ID: <e2e-{name}@remote.test>\r\n"
    ).encode()


@pytest.mark.parametrize("name", sorted(CASES))
def test_smtp_to_imap_and_pop3_byte_identical(postroom_node, name: str) -> None:
    node = postroom_node
    raw = headers(name) + CASES[name]
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=10) as smtp:
        smtp.ehlo("client.remote.test")
        refused = smtp.sendmail("sender@remote.test", ["alice@example.test"], raw)
        assert refused == {}

    imap = imaplib.IMAP4(node.host, node.ports["imap"])
    try:
        imap.login("alice@example.test", "alice-pw-1234")
        imap.select("INBOX", readonly=True)
        typ, data = imap.uid("SEARCH", "HEADER", "Message-ID", f"<e2e-{name}@remote.test>")
        assert typ == "OK"
        uids = data[0].split()
        assert len(uids) == 1
        typ, data = imap.uid("FETCH", uids[0], "(BODY.PEEK[] RFC822.SIZE)")
        assert typ == "OK"
        stored = data[0][1]
        assert stored.endswith(raw)
        assert stored[: len(stored) - len(raw)].startswith(b"Received: ") or stored.startswith(
            b"Return-Path: "
        )
        rest = b"".join(part[0] if isinstance(part, tuple) else part for part in data)
        assert f"RFC822.SIZE {len(stored)}".encode() in rest
    finally:
        imap.logout()

    pop = poplib.POP3(node.host, node.ports["pop3"], timeout=10)
    try:
        pop.user("alice@example.test")
        pop.pass_("alice-pw-1234")
        found = []
        for n in range(1, len(pop.list()[1]) + 1):
            _, lines, _ = pop.retr(n)
            # poplib strips the CRLF of each line and un-stuffs dots.
            message = b"\r\n".join(lines) + b"\r\n"
            if f"<e2e-{name}@remote.test>".encode() in message:
                found.append(message)
        assert len(found) == 1
        assert found[0] == stored
    finally:
        pop.quit()
