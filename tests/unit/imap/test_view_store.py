"""The store calls behind the session view (MailStore.rows, uid_flags,
changes_since) on the real SQLite store, against the fake used by the
session unit tests, and the query plans that keep them fast on large
mailboxes (tests/bench/imap_large.py measures them)."""

from __future__ import annotations

import gevent
import pytest

from storage.mailstore import MailStore
from storage.model import NoSuchMailbox
from tests.unit.imap.fakes import FakeStore

ACCOUNT = "alice@example.test"


def _fill(store) -> None:
    store.ensure_account(ACCOUNT)
    for i in range(12):
        flags = ["\\Seen"] if i % 2 else ["\\Flagged", "$Work"] if i % 3 == 0 else []
        store.append(ACCOUNT, "INBOX", b"Subject: m%d\r\n\r\nbody\r\n" % i, flags=flags,
                     internaldate=1700000000.0 + i)
    store.expunge(ACCOUNT, "INBOX", [3, 4])
    store.store_flags(ACCOUNT, "INBOX", [5, 6], "add", ["\\Answered"])


@pytest.fixture
def real(tmp_path):
    store = MailStore(tmp_path, 2, fsync=False)
    store.open()
    yield store
    store.close()


def test_rows_and_uid_flags_match_the_fake(real) -> None:
    fake = FakeStore()
    for store in (real, fake):
        _fill(store)
    for store in (real, fake):
        pairs = store.uid_flags(ACCOUNT, "INBOX")
        assert [u for u, _ in pairs] == [1, 2, 5, 6, 7, 8, 9, 10, 11, 12]
    assert real.uid_flags(ACCOUNT, "INBOX") == fake.uid_flags(ACCOUNT, "INBOX")
    want = [2, 3, 5, 99, 12]  # 3 was expunged, 99 never existed
    got_real = real.rows(ACCOUNT, "INBOX", want)
    got_fake = fake.rows(ACCOUNT, "INBOX", want)
    assert list(got_real) == list(got_fake) == [2, 5, 12]
    for uid in got_real:
        r, f = got_real[uid], got_fake[uid]
        assert (r.flags, r.size, r.internaldate, r.blob) == (f.flags, f.size, f.internaldate,
                                                             f.blob)


def test_rows_keep_to_their_mailbox_and_refuse_a_missing_one(real) -> None:
    # rows() finds the mailbox inside its one query: another account's or
    # mailbox's messages with the same UIDs never leak in, and a missing
    # mailbox raises whether or not any UID is asked.
    _fill(real)
    other = "bob@example.test"
    real.ensure_account(other)
    real.create_mailbox(ACCOUNT, "Other")
    for store_account, box in ((other, "INBOX"), (ACCOUNT, "Other")):
        real.append(store_account, box, b"Subject: x\r\n\r\nx\r\n", flags=["\\Deleted"])
    assert list(real.rows(ACCOUNT, "INBOX", [1, 2])) == [1, 2]
    assert all(not r.flags & {"\\Deleted"} for r in real.rows(ACCOUNT, "INBOX", [1]).values())
    assert list(real.rows(ACCOUNT, "Other", [1, 2])) == [1]
    assert real.rows(ACCOUNT, "Other", [7]) == {}
    for uids in ([1], [], [99]):
        with pytest.raises(NoSuchMailbox):
            real.rows(ACCOUNT, "Missing", uids)


def test_equal_flag_lists_share_one_set(real) -> None:
    # Interned flag sets keep a 100,000-message view to a list and a dict.
    _fill(real)
    seen = [f for u, f in real.uid_flags(ACCOUNT, "INBOX") if f == frozenset({"\\Seen"})]
    assert len(seen) > 2 and all(f is seen[0] for f in seen)


def test_changes_since_reports_ascending_and_nothing_when_unchanged(real) -> None:
    # RFC 7162 §3.1: changes after a MODSEQ; the view relies on UID order.
    _fill(real)
    hms = real.status(ACCOUNT, "INBOX").highestmodseq
    real.store_flags(ACCOUNT, "INBOX", [9, 2, 7], "add", ["\\Deleted"])
    real.expunge(ACCOUNT, "INBOX", [7, 2])
    changes = real.changes_since(ACCOUNT, "INBOX", hms)
    assert [r.uid for r in changes.changed] == [9] and changes.expunged == [2, 7]
    again = real.changes_since(ACCOUNT, "INBOX", changes.highestmodseq)
    assert (again.changed, again.expunged) == ([], [])


def test_view_queries_use_their_indexes(real) -> None:
    # Regression guard: a full scan of the message rows (with their metadata
    # JSON) made SELECT and the view refresh take seconds at 100,000 messages.
    _fill(real)
    conn = real.shard_for(ACCOUNT).reader

    def plan(sql: str, *params: int) -> str:
        return " ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))

    assert "COVERING INDEX messages_view" in plan(
        "SELECT uid, flags FROM messages WHERE mailbox = ? ORDER BY uid", 1)
    assert "COVERING INDEX messages_view" in plan(  # STATUS's counts and sizes
        "SELECT count(uid), sum(size), sum(instr(flags, 'Seen') = 0) FROM messages"
        " WHERE mailbox = ?", 1)
    assert "messages_modseq" in plan(
        "SELECT uid, flags, modseq, size, internaldate, blob FROM messages"
        " INDEXED BY messages_modseq WHERE mailbox = ? AND modseq > ?", 1, 1)


def test_changes_since_is_shared_until_the_next_commit(real) -> None:
    # Sessions woken by one delivery share one answer; a commit ends the reuse,
    # so no session ever misses a change (RFC 9051 §5.2 updates).
    _fill(real)
    hms = real.status(ACCOUNT, "INBOX").highestmodseq
    shard = real.shard_for(ACCOUNT)
    for _ in range(100):  # the full-text indexer may commit in between: retry
        commits = shard.commits
        first = real.changes_since(ACCOUNT, "INBOX", hms)
        second = real.changes_since(ACCOUNT, "INBOX", hms)
        if shard.commits == commits:
            break
        gevent.sleep(0.01)
    assert second is first
    real.store_flags(ACCOUNT, "INBOX", [1], "add", ["\\Draft"])
    after = real.changes_since(ACCOUNT, "INBOX", hms)
    assert [r.uid for r in after.changed] == [1] and after.highestmodseq > hms
