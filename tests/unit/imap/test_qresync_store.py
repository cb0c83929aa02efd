"""The expunge history QRESYNC relies on, in the real store (RFC 7162 §3.2).

RFC 7162 §3.2: every EXPUNGE, UID EXPUNGE, CLOSE and MOVE raises the
mailbox's MODSEQ and keeps the expunged UIDs with that MODSEQ; changes_since
reads messages and the history through (mailbox, modseq) indexes.
"""

from __future__ import annotations

import pytest

from tests.unit.storage.storage_testlib import msg, open_store

A = "alice@example.test"


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "store") as s:
        yield s


def test_expunge_and_move_keep_history_and_raise_highestmodseq(store) -> None:
    for i in range(6):
        store.deliver([A], msg(i))
    hms0 = store.status(A, "INBOX").highestmodseq
    assert store.expunge(A, "INBOX", [2, 3]) == [2, 3]
    hms1 = store.status(A, "INBOX").highestmodseq
    assert hms1 == hms0 + 1  # one MODSEQ for the whole expunge
    store.move(A, "INBOX", [5], "Archive")
    hms2 = store.status(A, "INBOX").highestmodseq
    assert hms2 > hms1  # RFC 7162 §3.2: MOVE's expunge raises the source too
    ch = store.changes_since(A, "INBOX", hms0)
    assert ch.expunged == [2, 3, 5] and ch.highestmodseq == hms2
    assert store.changes_since(A, "INBOX", hms1).expunged == [5]
    assert store.changes_since(A, "INBOX", hms2).expunged == []
    # The history is state built from the log (the expunged table).
    shard = store.shard_for(A)
    rows = shard.dump_state()["expunged"]
    assert sorted(u for _mb, u, _m in rows) == [2, 3, 5]


def test_rename_inbox_records_moved_uids_as_expunged(store) -> None:
    # RFC 3501 §6.3.5: INBOX stays; its messages are gone from it.
    for i in range(2):
        store.deliver([A], msg(i))
    hms = store.status(A, "INBOX").highestmodseq
    store.rename_mailbox(A, "INBOX", "Old")
    ch = store.changes_since(A, "INBOX", hms)
    assert ch.expunged == [1, 2] and ch.highestmodseq > hms


def test_changes_since_uses_modseq_indexes(store) -> None:
    store.deliver([A], msg(1))
    conn = store.shard_for(A).reader
    for table, index in (("messages", "messages_modseq"), ("expunged", "expunged_modseq")):
        plan = " ".join(str(r) for r in conn.execute(
            f"EXPLAIN QUERY PLAN SELECT uid FROM {table} WHERE mailbox = 1 AND modseq > 5"))
        assert index in plan, plan
