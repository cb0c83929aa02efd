"""RFC 9051 §7.1 [EXPUNGEISSUED] (RFC 2180 §4.1.2): a FETCH of a message
another session expunged, before this session was told (§7.4.1)."""

from __future__ import annotations

from tests.unit.imap.fakes import FakeStore
from tests.unit.imap.helpers import Client


def _two_sessions() -> tuple[Client, Client]:
    store = FakeStore()
    a, b = Client(store), Client(store)
    a.login()
    b.login()
    for _ in range(3):
        a.deliver()
    a.cmd("s SELECT INBOX")
    b.cmd("s SELECT INBOX")
    b.cmd("x STORE 2 +FLAGS.SILENT (\\Deleted)")
    b.cmd("x EXPUNGE")
    return a, b


def test_fetch_of_a_message_expunged_elsewhere_is_no_expungeissued() -> None:
    # RFC 9051 §7.1: the other messages are answered, the tagged reply is NO
    # [EXPUNGEISSUED], and no EXPUNGE is sent during FETCH (§7.4.1).
    a, _ = _two_sessions()
    lines = a.cmd("f FETCH 1:3 (FLAGS)")
    assert lines[:-1] == [b"* 1 FETCH (FLAGS ())", b"* 3 FETCH (FLAGS ())"]
    assert lines[-1].startswith(b"f NO [EXPUNGEISSUED] ")
    # Still not reported: the next FETCH of it (answered from the view) says so again.
    lines = a.cmd("g FETCH 2 (FLAGS UID)")
    assert lines == [lines[-1]] and lines[-1].startswith(b"g NO [EXPUNGEISSUED] ")
    # Messages that still exist are answered with OK.
    assert a.cmd("h FETCH 3 (UID)") == [b"* 3 FETCH (UID 3)", b"h OK FETCH completed"]
    # NOOP reports the expunge; afterwards the numbers are exact again.
    assert a.cmd("n NOOP") == [b"* 2 EXPUNGE", b"n OK NOOP completed"]
    assert a.cmd("f FETCH 1:2 (UID)") == [
        b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 3)", b"f OK FETCH completed"]


def test_uid_fetch_ignores_expunged_uids() -> None:
    # RFC 9051 §6.4.9: UIDs that no longer exist are ignored, so UID FETCH is OK.
    a, _ = _two_sessions()
    lines = a.cmd("u UID FETCH 1:* (FLAGS)")
    assert lines == [b"* 1 FETCH (UID 1 FLAGS ())", b"* 3 FETCH (UID 3 FLAGS ())",
                     b"u OK UID FETCH completed"]


def test_body_fetch_of_expunged_message() -> None:
    # The same for data read from the store (rows, bodies), not only the view.
    a, _ = _two_sessions()
    lines = a.cmd("f FETCH 2:3 (RFC822.SIZE)")
    assert len(lines) == 2 and lines[0].startswith(b"* 3 FETCH (RFC822.SIZE ")
    assert lines[-1].startswith(b"f NO [EXPUNGEISSUED] ")
