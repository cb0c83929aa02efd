"""CONDSTORE/QRESYNC and NOTIFY against a whole node, with Python's imaplib.

A client caches a mailbox, goes away while another session changes flags and
expunges, and comes back with SELECT (QRESYNC ...) (RFC 7162 §3.2.5): it must
learn exactly the expunged UIDs (VANISHED (EARLIER), kept in the shard's
expunge history) and the changed flags, over the real storage.
"""

from __future__ import annotations

import imaplib
import re

import pytest

pytestmark = pytest.mark.interop

ALICE = ("alice@example.test", "alice-pw-1234")
RAW = b"From: b@example.test\r\nTo: alice@example.test\r\nSubject: q\r\n\r\nbody\r\n"


def _imap(node) -> imaplib.IMAP4:
    conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    conn.login(*ALICE)
    return conn


def _code(conn: imaplib.IMAP4, name: str) -> int:
    return int(conn.untagged_responses.pop(name)[-1])


def test_qresync_resync_after_changes_by_another_session(postroom_node) -> None:
    # RFC 7162 §3.2.5 (QRESYNC SELECT), §3.2.6 (UID FETCH VANISHED), §3.1.3 (UNCHANGEDSINCE).
    a, b = _imap(postroom_node), _imap(postroom_node)
    try:
        assert a.create("Sync")[0] == "OK"
        for _ in range(5):
            assert b.append("Sync", None, None, RAW)[0] == "OK"
        assert a.enable("QRESYNC")[0] == "OK"
        typ, _ = a._simple_command("SELECT", "Sync (CONDSTORE)")
        assert typ == "OK"
        a.state = "SELECTED"
        uv = _code(a, "UIDVALIDITY")
        hms = _code(a, "HIGHESTMODSEQ")
        assert a.logout()[0] == "BYE"

        b.select("Sync")
        b.uid("STORE", "2,4", "+FLAGS.SILENT", "(\\Deleted)")
        assert b.expunge()[0] == "OK"
        b.uid("STORE", "5", "+FLAGS.SILENT", "(\\Flagged)")

        c = _imap(postroom_node)
        try:
            assert c.enable("QRESYNC")[0] == "OK"
            typ, _ = c._simple_command("SELECT", f"Sync (QRESYNC ({uv} {hms} 1:5))")
            assert typ == "OK"
            c.state = "SELECTED"
            assert c.untagged_responses.pop("VANISHED") == [b"(EARLIER) 2,4"]
            fetched = b" ".join(c.untagged_responses.pop("FETCH"))
            assert re.search(rb"FLAGS \(\\Flagged\) UID 5 MODSEQ \(\d+\)", fetched)
            new_hms = _code(c, "HIGHESTMODSEQ")
            assert new_hms > hms

            # RFC 7162 §3.1.3: a STORE conditional on a stale MODSEQ fails.
            tag = c._command("UID", "STORE", "5", f"(UNCHANGEDSINCE {hms})", "+FLAGS", "(\\Seen)")
            typ, data = c._get_tagged_response(tag)
            assert typ == "OK" and data[0].startswith(b"[MODIFIED 5]")
            typ, _ = c._simple_command("UID", "FETCH", "1:*", "(FLAGS)",
                                       f"(CHANGEDSINCE {hms} VANISHED)")
            assert typ == "OK"
            assert c.untagged_responses.pop("VANISHED") == [b"(EARLIER) 2,4"]
            # RFC 7162 §3.2.10: after QRESYNC, expunges are VANISHED.
            c.uid("STORE", "1", "+FLAGS.SILENT", "(\\Deleted)")
            typ, data = c.expunge()
            assert typ == "OK"
            assert c.untagged_responses.pop("VANISHED") == [b"1"]
        finally:
            c.logout()
    finally:
        b.logout()


def test_notify_status_for_another_mailbox(postroom_node) -> None:
    # RFC 5465 §5.1: NOTIFY SET; a delivery to a non-selected mailbox gives STATUS.
    a, b = _imap(postroom_node), _imap(postroom_node)
    try:
        assert a.create("Watched")[0] == "OK"
        a.select("INBOX")
        typ, _ = a.xatom("NOTIFY", "SET (mailboxes Watched (MessageNew MessageExpunge))")
        assert typ == "OK"
        assert b.append("Watched", None, None, RAW)[0] == "OK"
        # The notifier pushes it unsolicited; a NOOP collects whatever arrived.
        status: list[bytes] = []
        for _ in range(50):  # bounded: each NOOP is a round trip
            a.noop()
            status = a.untagged_responses.pop("STATUS", [])
            if status:
                break
        assert status and status[0].startswith(b'"Watched" (MESSAGES 1 UIDNEXT 2 ')
    finally:
        a.logout()
        b.logout()
