"""A session's own writes and re-SELECT without re-reading the mailbox
(node/imap/session.py ``_own_only``, ``_reopen``): what the client sees must
be what the full changes_since path and a fresh SELECT give, also when other
sessions change the mailbox in between.  Fake and real store."""

from __future__ import annotations

import re

import pytest

from storage.mailstore import MailStore
from tests.unit.imap.fakes import FakeStore
from tests.unit.imap.helpers import Client

ACCOUNT = "alice@example.test"


@pytest.fixture(params=["fake", "real"])
def store(request, tmp_path):
    if request.param == "fake":
        yield FakeStore()
        return
    real = MailStore(tmp_path / "store", 2, fsync=False)
    real.open()
    try:
        yield real
    finally:
        real.close()


def _client(store, messages: int = 0) -> Client:
    c = Client(store)
    c.login()
    for i in range(messages):
        c.deliver(b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i),
                  flags=["\\Seen"] if i % 2 else [])
    return c


def _untagged(lines: list[bytes]) -> list[bytes]:
    return [line for line in lines if line.startswith(b"* ")]


def _select_lines(c: Client, verb: str = "SELECT") -> list[bytes]:
    lines = c.cmd(f"s {verb} INBOX")
    assert lines[-1].startswith(b"s OK"), lines
    return lines


def _state(c: Client) -> list[bytes]:
    lines = c.cmd("f FETCH 1:* (UID FLAGS MODSEQ)")
    assert lines[-1].startswith(b"f OK"), lines
    return lines


def test_own_store_reports_other_sessions_changes(store) -> None:
    a = _client(store, 4)
    _select_lines(a)
    # Only its own change: the answer to STORE and nothing else.
    assert a.cmd("t STORE 1 +FLAGS (\\Flagged)") == [
        b"* 1 FETCH (FLAGS (\\Flagged))", b"t OK STORE completed"]
    assert a.cmd("t STORE 1 +FLAGS.SILENT (\\Answered)") == [b"t OK STORE completed"]
    # Another session's change in between: reported with the own one.
    store.store_flags(ACCOUNT, "INBOX", [3], "add", ["$Other"])
    lines = a.cmd("t STORE 2 -FLAGS (\\Seen)")
    assert lines[-1] == b"t OK STORE completed"
    assert b"* 2 FETCH (FLAGS ())" in lines
    assert b"* 3 FETCH (FLAGS ($Other) UID 3)" in lines
    assert any(line.startswith(b"* FLAGS (") and b"$Other" in line for line in lines)
    # After a change made elsewhere following the own one, NOOP reports it.
    assert a.cmd("t STORE 4 +FLAGS.SILENT (\\Draft)") == [b"t OK STORE completed"]
    store.store_flags(ACCOUNT, "INBOX", [1], "remove", ["\\Flagged"])
    assert a.cmd("n NOOP") == [b"* 1 FETCH (FLAGS (\\Answered) UID 1)", b"n OK NOOP completed"]


def test_own_expunge_and_another_sessions_expunge(store) -> None:
    a = _client(store, 5)
    _select_lines(a)
    a.cmd("t STORE 2 +FLAGS.SILENT (\\Deleted)")
    assert a.cmd("x EXPUNGE") == [b"* 2 EXPUNGE", b"x OK EXPUNGE completed"]
    # The view shrank by one: message 4 (UID 5) is what another session expunges.
    a.cmd("t UID STORE 3 +FLAGS.SILENT (\\Deleted)")
    store.expunge(ACCOUNT, "INBOX", [5])
    assert a.cmd("x UID EXPUNGE 3") == [b"* 4 EXPUNGE", b"* 2 EXPUNGE",
                                        b"x OK UID EXPUNGE completed"]
    assert _untagged(a.cmd("f FETCH 1:* (UID)")) == [b"* 1 FETCH (UID 1)",
                                                     b"* 2 FETCH (UID 4)"]


def test_own_append_is_announced(store) -> None:
    a = _client(store, 2)
    _select_lines(a)
    a.cmd("t STORE 1 +FLAGS.SILENT (\\Flagged)")
    lines = a.feed(b"a APPEND INBOX (\\Seen) {10+}\r\nSubject: x\r\n").split(b"\r\n")[:-1]
    assert lines[0] == b"* 3 EXISTS" and lines[-1].startswith(b"a OK"), lines


def _append(c: Client, flags: str, tag: str = "a") -> list[bytes]:
    body = b"Subject: own\r\n\r\nown\r\n"
    lines = c.feed(b"%s APPEND INBOX (%s) {%d+}\r\n%s\r\n" % (
        tag.encode(), flags.encode(), len(body), body)).split(b"\r\n")[:-1]
    assert lines[-1].startswith(tag.encode() + b" OK"), lines
    return lines


def test_own_append_counted_as_own_and_others_still_reported(store) -> None:
    a = _client(store, 3)
    a.cmd("e ENABLE CONDSTORE")
    _select_lines(a)
    # Own APPEND alone (stored flags canonical: \seen is \Seen): a new
    # keyword first, then EXISTS, as the changes_since path answers.
    lines = _append(a, "\\seen $New")
    assert lines[:-1] == [
        b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $New)", b"* 4 EXISTS"]
    assert a.cmd("n NOOP") == [b"n OK NOOP completed"]
    _same_as_fresh(store, a)
    # Own STORE and APPEND with another session's change between them: the
    # other change is reported too, and the appended message exactly once.
    a.cmd("t STORE 1 +FLAGS.SILENT (\\Flagged)")
    store.store_flags(ACCOUNT, "INBOX", [2], "add", ["$Theirs"])
    lines = _append(a, "")
    assert b"* 5 EXISTS" in lines
    assert any(line.startswith(b"* 2 FETCH (FLAGS (") and b"$Theirs" in line for line in lines)
    assert a.cmd("n NOOP") == [b"n OK NOOP completed"]
    _same_as_fresh(store, a)
    # Two own APPENDs, then another session's delivery: all three, in order.
    _append(a, "", "a1")
    store.append(ACCOUNT, "INBOX", b"Subject: theirs\r\n\r\nx\r\n")
    assert b"* 8 EXISTS" in _append(a, "\\Draft", "a2")
    _same_as_fresh(store, a)


def _same_as_fresh(store, a: Client, verb: str = "SELECT") -> None:
    """a's re-SELECT answers as a new session's SELECT, and so does its view."""
    again = _select_lines(a, verb)
    fresh = _client(store)
    fresh.cmd("e ENABLE CONDSTORE")
    first = _select_lines(fresh, verb)
    closed = [line for line in again if b"[CLOSED]" not in line]
    assert _untagged(closed) == _untagged(first)
    assert _state(a) == _state(fresh)


@pytest.mark.parametrize("verb", ["SELECT", "EXAMINE"])
def test_reselect_answers_as_a_fresh_select(store, verb) -> None:
    a = _client(store, 6)
    a.cmd("e ENABLE CONDSTORE")
    _select_lines(a)
    _same_as_fresh(store, a, verb)  # nothing changed
    a.cmd("t STORE 1 +FLAGS (\\Flagged $Mine)")
    a.cmd("t STORE 1 -FLAGS ($Mine)")  # the keyword no message holds is not listed
    _same_as_fresh(store, a, verb)  # own changes only
    a.cmd("t STORE 2 +FLAGS.SILENT (\\Deleted)")
    # Other sessions: a flag change, an expunge and a delivery, none reported yet.
    store.store_flags(ACCOUNT, "INBOX", [4], "set", ["$Theirs"])
    store.expunge(ACCOUNT, "INBOX", [3])
    a.deliver(b"Subject: late\r\n\r\nlate\r\n")
    _same_as_fresh(store, a, verb)
    # Messages expunged while the view held them are gone after a re-SELECT.
    store.expunge(ACCOUNT, "INBOX", [1, 6])
    lines = a.cmd("f FETCH 1 (FLAGS)")  # no EXPUNGE during FETCH (RFC 9051 §7.4.1)
    assert not any(re.match(rb"\* \d+ EXPUNGE", line) for line in lines)
    _same_as_fresh(store, a, verb)


def test_reselect_after_another_mailbox(store) -> None:
    a = _client(store, 3)
    a.cmd("e ENABLE CONDSTORE")
    _select_lines(a)
    a.cmd("c CREATE Other")
    assert a.cmd("s SELECT Other")[-1].startswith(b"s OK")
    store.store_flags(ACCOUNT, "INBOX", [2], "add", ["\\Flagged"])
    _same_as_fresh(store, a)
