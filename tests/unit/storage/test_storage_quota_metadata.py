"""Storage state for QUOTA usage (RFC 9208), SAVEDATE (RFC 8514) and
METADATA (RFC 5464): kept by the op log, equal after replay."""

from __future__ import annotations

import sqlite3

import pytest

from storage import shard as ops
from storage.model import MetadataTooMany, NoSuchMailbox, SpecialUseInUse
from storage.shard import Shard
from tests.unit.storage.storage_testlib import META, msg, open_store
from tests.unit.storage.test_storage_shard import ACCOUNTS, busy_workload, replay


def _summed(shard: Shard, account: str) -> tuple[int, int]:
    row = shard.reader.execute(
        "SELECT coalesce(sum(m.size), 0), count(*) FROM messages m JOIN mailboxes b"
        " ON b.uidvalidity = m.mailbox WHERE b.account = ?", (account,)).fetchone()
    return row[0], row[1]


def test_usage_counter_matches_the_messages_after_every_op_kind(tmp_path) -> None:
    # RFC 9208 §5.1 STORAGE / §5.2 MESSAGE: usage = what the account stores.
    with open_store(tmp_path / "s", shards=1) as store:
        busy_workload(store)
        shard = store.shard_for("a@x")
        for a in ACCOUNTS:
            assert store.usage(a) == _summed(shard, a)
        assert store.usage("a@x")[1] > 0
        expected = shard.dump_state()
        log = shard.ops_since(0)
    fresh = replay(log, tmp_path / "replayed.sqlite")
    try:
        assert fresh.dump_state() == expected  # usage, metadata and save dates too
    finally:
        fresh.close()


def test_usage_follows_append_copy_move_expunge_delete(tmp_path) -> None:
    with open_store(tmp_path / "s", shards=1) as store:
        a = "q@x"
        assert store.usage(a) == (0, 0)
        r1 = store.append(a, "INBOX", msg(1, 100), meta=META)
        size = len(msg(1, 100))
        assert store.usage(a) == (size, 1)
        store.copy(a, "INBOX", [r1.uid], "Archive")
        assert store.usage(a) == (2 * size, 2)
        store.move(a, "Archive", [1], "Trash")
        assert store.usage(a) == (2 * size, 2)
        store.expunge(a, "INBOX", [r1.uid])
        assert store.usage(a) == (size, 1)
        store.delete_mailbox(a, "Trash")
        assert store.usage(a) == (0, 0)


def test_savedate_is_the_time_of_the_op_that_saved_it(tmp_path) -> None:
    # RFC 8514 §4: APPEND, COPY and MOVE set the save date; the flags do not.
    with open_store(tmp_path / "s", shards=1) as store:
        a = "s@x"
        r = store.append(a, "INBOX", msg(1), internaldate=1_000_000.0, meta=META)
        shard = store.shard_for(a)
        ts = {o.op: o.timestamp for o in shard.ops_since(0)}
        saved = store.savedates(a, "INBOX", [r.uid])[r.uid]
        assert saved == ts["append"] and saved != 1_000_000.0
        store.store_flags(a, "INBOX", [r.uid], "add", ["\\Seen"])
        assert store.savedates(a, "INBOX", [r.uid])[r.uid] == saved
        _, pairs = store.copy(a, "INBOX", [r.uid], "Archive")
        copied = store.savedates(a, "Archive", [pairs[0][1]])[pairs[0][1]]
        assert copied == {o.op: o.timestamp for o in shard.ops_since(0)}["copy"]


def test_metadata_set_get_remove_and_mailbox_delete(tmp_path) -> None:
    with open_store(tmp_path / "s", shards=1) as store:
        a = "m@x"
        store.ensure_account(a)
        store.set_metadata(a, None, [("/private/Comment", b"hello")])
        store.set_metadata(a, "INBOX", [("/shared/comment", b"\x00bin")])
        assert store.get_metadata(a, None) == {"/private/comment": b"hello"}
        assert store.get_metadata(a, "INBOX") == {"/shared/comment": b"\x00bin"}
        store.create_mailbox(a, "Tmp")
        store.set_metadata(a, "Tmp", [("/private/x", b"1")])
        store.rename_mailbox(a, "Tmp", "Tmp2")  # follows the mailbox (same UIDVALIDITY)
        assert store.get_metadata(a, "Tmp2") == {"/private/x": b"1"}
        store.delete_mailbox(a, "Tmp2")
        store.create_mailbox(a, "Tmp2")
        assert store.get_metadata(a, "Tmp2") == {}  # RFC 5464 §3.2: deleted with it
        store.set_metadata(a, None, [("/private/comment", None)])
        assert store.get_metadata(a, None) == {}
        with pytest.raises(NoSuchMailbox):
            store.set_metadata(a, "Nope", [("/private/x", b"1")])


def test_metadata_entry_limit_is_all_or_nothing(tmp_path, monkeypatch) -> None:
    # RFC 5464 §4.3: [METADATA TOOMANY], and nothing of the command is set.
    monkeypatch.setattr(ops, "METADATA_MAX_ENTRIES", 3)
    with open_store(tmp_path / "s", shards=1) as store:
        a = "t@x"
        store.ensure_account(a)
        store.set_metadata(a, None, [("/private/a", b"1"), ("/private/b", b"2")])
        with pytest.raises(MetadataTooMany):
            store.set_metadata(a, "INBOX", [("/private/c", b"3"), ("/private/d", b"4")])
        assert store.get_metadata(a, "INBOX") == {}
        store.set_metadata(a, "INBOX", [("/private/c", b"3")])  # 3 in all: allowed
        with pytest.raises(MetadataTooMany):
            store.set_metadata(a, "INBOX", [("/private/d", b"4")])
        # Removing one while adding one keeps the count.
        store.set_metadata(a, None, [("/private/a", None), ("/private/d", b"4")])


def test_create_special_use_taken_is_refused(tmp_path) -> None:
    # RFC 6154 §3: one mailbox per special use; the refused CREATE creates nothing.
    with open_store(tmp_path / "s", shards=1) as store:
        a = "u@x"
        store.ensure_account(a)
        with pytest.raises(SpecialUseInUse):
            store.create_mailbox(a, "Parent/Arch2", "\\Archive")
        assert not any(m.name.startswith("Parent") for m in store.list_mailboxes(a))
        store.create_mailbox(a, "All Mail", "\\All")
        assert {m.name: m.special_use for m in store.list_mailboxes(a)}["All Mail"] == "\\All"


def test_old_database_is_migrated_with_usage_backfilled(tmp_path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(ops.SCHEMA)  # the schema before usage/savedate/metadata
    conn.execute("INSERT INTO mailboxes VALUES (5, 'o@x', 'INBOX', 3, 3, NULL, 1)")
    conn.execute("INSERT INTO messages VALUES (5, 1, 'b', 10, 0, '', 2, '{}')")
    conn.execute("INSERT INTO messages VALUES (5, 2, 'c', 32, 0, '', 3, '{}')")
    conn.close()
    shard = Shard(path)
    shard.open_writer()
    shard.open_reader()
    try:
        assert shard.usage("o@x") == (42, 2)
        assert shard.savedates("o@x", "INBOX", [1, 2]) == {1: None, 2: None}
        shard.close()
        shard.open_writer()  # idempotent: opening again counts nothing twice
        shard.open_reader()
        assert shard.usage("o@x") == (42, 2)
    finally:
        shard.close()
