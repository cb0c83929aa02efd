"""QRESYNC (RFC 7162 §3.2) against the in-memory fakes."""

from __future__ import annotations

import pytest

from tests.unit.imap.helpers import Client

SPLITS = ["whole", "bytes", "random"]
ACCOUNT = "alice@example.test"


@pytest.fixture(params=SPLITS)
def client(request) -> Client:
    c = Client(split=request.param)
    c.login()
    assert c.cmd("e ENABLE QRESYNC") == [b"* ENABLED QRESYNC", b"e OK ENABLE completed"]
    return c


def _history(c: Client) -> int:
    """Five messages (MODSEQ 2..6); 2 and 4 expunged (MODSEQ 7), 5 flagged
    (MODSEQ 8).  Returns the UIDVALIDITY."""
    for _ in range(5):
        c.deliver()
    c.store.expunge(ACCOUNT, "INBOX", [2, 4])
    c.store.store_flags(ACCOUNT, "INBOX", [5], "add", ["\\Flagged"])
    return c.store.status(ACCOUNT, "INBOX").uidvalidity


def test_select_qresync_needs_enable() -> None:
    # RFC 7162 §3.2.5: QRESYNC parameter without ENABLE QRESYNC is BAD.
    c = Client()
    c.login()
    c.deliver()
    assert c.cmd("s SELECT INBOX (QRESYNC (1 1))")[-1].startswith(b"s BAD")
    assert c.session.view is None


def test_select_qresync_reports_vanished_earlier_and_changes(client: Client) -> None:
    # RFC 7162 §3.2.5.2: VANISHED (EARLIER) then FETCH for changed messages.
    uv = _history(client)
    out = client.cmd(f"s SELECT INBOX (QRESYNC ({uv} 3))")
    assert b"* 3 EXISTS" in out
    assert b"* OK [HIGHESTMODSEQ 8] highest" in out
    tail = out[out.index(b"* OK [HIGHESTMODSEQ 8] highest") + 1 :]
    assert tail == [
        b"* VANISHED (EARLIER) 2,4",
        b"* 2 FETCH (FLAGS () UID 3 MODSEQ (4))",
        b"* 3 FETCH (FLAGS (\\Flagged) UID 5 MODSEQ (8))",
        b"s OK [READ-WRITE] SELECT completed",
    ]


def test_select_qresync_known_uids_and_seq_match(client: Client) -> None:
    # RFC 7162 §3.2.5: known-uids restricts what is reported; seq-match-data
    # is accepted (the kept history is complete, so it is not needed).
    uv = _history(client)
    out = client.cmd(f"x EXAMINE INBOX (QRESYNC ({uv} 3 3:4 (1:2 1:2)))")
    assert b"* VANISHED (EARLIER) 4" in out
    assert b"* 2 FETCH (FLAGS () UID 3 MODSEQ (4))" in out
    assert not any(b"UID 5" in x for x in out)
    assert out[-1] == b"x OK [READ-ONLY] EXAMINE completed"


def test_select_qresync_other_uidvalidity_is_plain_select(client: Client) -> None:
    # RFC 7162 §3.2.5.2: a UIDVALIDITY mismatch means no resync data.
    uv = _history(client)
    out = client.cmd(f"s SELECT INBOX (QRESYNC ({uv + 1} 3))")
    assert not any(x.startswith((b"* VANISHED", b"* 2 FETCH")) for x in out)
    assert out[-1].startswith(b"s OK")


def test_closed_when_switching_mailboxes(client: Client) -> None:
    # RFC 7162 §3.2.11: [CLOSED] before the new mailbox's responses.
    client.cmd("s SELECT INBOX")
    out = client.cmd("s EXAMINE Sent")
    assert out[0] == b"* OK [CLOSED] previous mailbox is now closed"


def test_expunge_sends_vanished_and_highestmodseq(client: Client) -> None:
    # RFC 7162 §3.2.10: VANISHED instead of EXPUNGE once QRESYNC is enabled.
    for _ in range(3):
        client.deliver()
    client.cmd("s SELECT INBOX")
    client.cmd("t STORE 1,3 +FLAGS.SILENT (\\Deleted)")
    assert client.cmd("e EXPUNGE") == [b"* VANISHED 1,3", b"e OK [HIGHESTMODSEQ 7] EXPUNGE completed"]
    assert client.session.view.uids == [2]


def test_other_sessions_expunge_is_vanished_in_idle() -> None:
    # RFC 7162 §3.2.10 with RFC 2177: an expunge by another session while idling.
    a = Client()
    b = Client(a.store)
    a.login()
    b.login()
    for _ in range(3):
        a.deliver()
    a.cmd("e ENABLE QRESYNC")
    a.cmd("s SELECT INBOX")
    b.cmd("s SELECT INBOX")
    assert a.cmd("i IDLE") == [b"+ idling"]
    b.cmd("t STORE 2 +FLAGS.SILENT (\\Deleted)")
    b.cmd("e EXPUNGE")
    a.session.idle_flush()
    # The flag change and the expunge commit before the flush: only VANISHED.
    assert a.take() == b"* VANISHED 2\r\n"


def test_uid_fetch_changedsince_vanished(client: Client) -> None:
    # RFC 7162 §3.2.6: VANISHED (EARLIER) for expunged UIDs of the set, then changes.
    _history(client)
    client.cmd("s SELECT INBOX")
    assert client.cmd("f UID FETCH 1:* (FLAGS) (CHANGEDSINCE 5 VANISHED)") == [
        b"* VANISHED (EARLIER) 2,4",
        b"* 3 FETCH (UID 5 FLAGS (\\Flagged) MODSEQ (8))",
        b"f OK UID FETCH completed",
    ]
    assert client.cmd("f UID FETCH 3:4 (FLAGS) (CHANGEDSINCE 5 VANISHED)") == [
        b"* VANISHED (EARLIER) 4", b"f OK UID FETCH completed"]
    # VANISHED needs the UID form (RFC 7162 §3.2.6).
    assert client.cmd("f FETCH 1:* (FLAGS) (CHANGEDSINCE 5 VANISHED)")[-1].startswith(b"f BAD")


def test_move_source_is_vanished(client: Client) -> None:
    # RFC 6851 §4.4 with RFC 7162 §3.2.10: MOVE reports VANISHED on the source.
    for _ in range(2):
        client.deliver()
    client.cmd("s SELECT INBOX")
    out = client.cmd("m MOVE 1 Archive")
    assert out[0].startswith(b"* OK [COPYUID ")
    assert out[1:] == [b"* VANISHED 1", b"m OK MOVE completed"]
    uv = client.session.view.uidvalidity
    hms = client.store.status(ACCOUNT, "INBOX").highestmodseq
    client.cmd("u UNSELECT")
    out = client.cmd(f"s SELECT INBOX (QRESYNC ({uv} {hms - 1}))")
    assert b"* VANISHED (EARLIER) 1" in out
