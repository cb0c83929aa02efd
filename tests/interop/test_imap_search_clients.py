"""SEARCH, ESEARCH, SORT and THREAD against a whole node with imaplib.

Messages arrive by SMTP (so the index is filled at delivery, off the test's
process) and by APPEND; imaplib's own search/sort/thread parse the answers.
"""

from __future__ import annotations

import imaplib
import smtplib
from email.message import EmailMessage

import pytest

pytestmark = pytest.mark.interop

ALICE = ("alice@example.test", "alice-pw-1234")


def _message(subject: str, body: str, mid: str, refs: str | None = None,
             date: str = "Mon, 6 Nov 2023 10:00:00 +0000") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Bob <bob@example.test>"
    msg["To"] = ALICE[0]
    msg["Subject"] = subject
    msg["Date"] = date
    msg["Message-ID"] = mid
    if refs:
        msg["References"] = refs
    msg.set_content(body, charset="utf-8", cte="quoted-printable")
    return bytes(msg)


def test_imaplib_search_sort_thread(postroom_node) -> None:
    node = postroom_node
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=30) as s:
        s.sendmail("bob@example.test", [ALICE[0]], _message(
            "Lunch plans", "Shall we meet at the café?\n", "<1@x.test>",
            date="Mon, 6 Nov 2023 10:00:00 +0000"))
        s.sendmail("bob@example.test", [ALICE[0]], _message(
            "Re: Lunch plans", "Yes, the postroom café.\n", "<2@x.test>", "<1@x.test>",
            date="Mon, 6 Nov 2023 11:00:00 +0000"))
    conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    try:
        conn.login(*ALICE)
        caps = conn.capabilities
        for cap in ("ESEARCH", "SEARCHRES", "SORT", "THREAD=REFERENCES"):
            assert cap in caps
        raw = _message("Budget report", "the quarterly numbers\n", "<3@x.test>",
                       date="Sun, 5 Nov 2023 09:00:00 +0000")
        assert conn.append("INBOX", None, None, raw)[0] == "OK"
        conn.select("INBOX")
        # RFC 3501 §6.4.4: decoded (quoted-printable), case-insensitive substring
        conn.literal = "CAFÉ".encode()  # imaplib sends 8-bit text as a literal
        assert conn.search("UTF-8", "BODY") == ("OK", [b"1 2"])
        assert conn.uid("SEARCH", "TEXT", "quarterly") == ("OK", [b"3"])
        assert conn.search(None, "SUBJECT", "lunch") == ("OK", [b"1 2"])
        # RFC 5256 §4
        assert conn.sort("(DATE)", "UTF-8", "ALL") == ("OK", [b"3 1 2"])
        assert conn.sort("(REVERSE SUBJECT)", "UTF-8", "ALL") == ("OK", [b"1 2 3"])
        assert conn.thread("REFERENCES", "UTF-8", "ALL") == ("OK", [b"(3)(1 2)"])
        # RFC 4731: ESEARCH answers arrive as untagged ESEARCH
        conn.literal = "café".encode()
        typ, _ = conn._simple_command("SEARCH", "RETURN", "(COUNT MIN)", "CHARSET", "UTF-8",
                                      "BODY")
        assert typ == "OK"
        _, data = conn._untagged_response(typ, [None], "ESEARCH")
        assert data[0].endswith(b"MIN 1 COUNT 2")
    finally:
        conn.logout()
