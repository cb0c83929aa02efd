"""MailStore.move: RFC 6851 MOVE as ONE op of the shard log."""

from __future__ import annotations

import pytest

from storage.model import NoSuchMailbox
from tests.unit.storage.storage_testlib import META, msg, open_store

A = "a@x"


def test_move_is_one_op_keeping_flags_and_date(tmp_path) -> None:
    # RFC 6851 §3.3: the moved messages keep flags and internal date, get
    # new UIDs in the target, and are expunged from the source.
    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account(A)
        for i in range(3):
            store.append(A, "INBOX", msg(i), flags=["\\Seen", "$K"], internaldate=1e9 + i,
                         meta=META)
        before = store.status(A, "INBOX").highestmodseq
        last = store.shard_for(A).last_index()
        seen: list[str] = []
        stop = store.watch(A, seen.append)
        uv, pairs = store.move(A, "INBOX", [1, 3, 99], "Archive")
        stop()
        log = store.shard_for(A).ops_since(last)
        assert [o.op for o in log] == ["move"]  # atomic: never both or neither
        assert uv == store.status(A, "Archive").uidvalidity
        assert pairs == [(1, 1), (3, 2)]
        assert [m.uid for m in store.messages(A, "INBOX")] == [2]
        moved = store.messages(A, "Archive")
        assert [(m.uid, m.flags, m.internaldate) for m in moved] == [
            (1, frozenset({"\\Seen", "$K"}), 1e9),
            (2, frozenset({"\\Seen", "$K"}), 1e9 + 2),
        ]
        changes = store.changes_since(A, "INBOX", before)
        assert changes.expunged == [1, 3]
        assert changes.highestmodseq > before
        assert set(seen) == {"INBOX", "Archive"}


def test_move_within_one_mailbox_and_missing_target(tmp_path) -> None:
    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account(A)
        store.append(A, "INBOX", msg(1), meta=META)
        start = store.status(A, "INBOX").highestmodseq
        _, pairs = store.move(A, "INBOX", [1], "INBOX")
        assert pairs == [(1, 2)]
        assert [m.uid for m in store.messages(A, "INBOX")] == [2]
        changes = store.changes_since(A, "INBOX", start)
        assert changes.expunged == [1] and [r.uid for r in changes.changed] == [2]
        # The expunge's MODSEQ follows the copy's: MODSEQ only grows.
        assert changes.highestmodseq == start + 2
        with pytest.raises(NoSuchMailbox):
            store.move(A, "INBOX", [2], "Nope")
        assert [m.uid for m in store.messages(A, "INBOX")] == [2]
