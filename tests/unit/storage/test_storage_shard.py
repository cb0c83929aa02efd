"""The operation log: replay determinism, replication entry points, epochs."""

from __future__ import annotations

import functools
import random
import sqlite3

import pytest

from storage import shard as ops
from storage.mailstore import shard_of
from storage.model import StorageError
from storage.shard import Op, Shard
from tests.unit.storage.storage_testlib import META, msg, open_store

ACCOUNTS = ["a@x", "b@x", "c@x"]


def busy_workload(store, seed: int = 7) -> None:
    """Every op kind, in a random but reproducible order."""
    rnd = random.Random(seed)
    for a in ACCOUNTS:
        store.ensure_account(a)
        store.create_mailbox(a, "Work/Projects")
    for i in range(60):
        a = rnd.choice(ACCOUNTS)
        box = rnd.choice(["INBOX", "Work/Projects", "Archive"])
        kind = rnd.randrange(6)
        uids = [m.uid for m in store.messages(a, box)]
        if kind <= 1 or not uids:
            store.append(a, box, msg(i), flags=rnd.sample(["\\Seen", "$A", "\\Flagged"], 2),
                         internaldate=1_700_000_000.0 + i, meta={"n": i})
        elif kind == 2:
            store.store_flags(a, box, rnd.sample(uids, 1), rnd.choice(["set", "add", "remove"]),
                              ["\\Seen", "$B"])
        elif kind == 3:
            store.expunge(a, box, rnd.sample(uids, 1))
        elif kind == 4:
            store.copy(a, box, uids[:2], rnd.choice(["INBOX", "Archive"]))
        else:
            store.set_subscribed(a, box, rnd.random() < 0.5)
    store.deliver(ACCOUNTS, msg(1000), meta=META)
    for a in ACCOUNTS:  # RFC 6851 MOVE, to another mailbox and within one
        store.move(a, "INBOX", [m.uid for m in store.messages(a, "INBOX")][:2], "Archive")
        store.move(a, "Archive", [m.uid for m in store.messages(a, "Archive")][:1], "Archive")
    for a in ACCOUNTS:  # RFC 5464 METADATA, server and mailbox entries
        store.set_metadata(a, None, [("/private/comment", b"server note")])
        store.set_metadata(a, "Work/Projects", [("/shared/comment", b"x"),
                                                ("/private/vendor/x", b"\x00\xff")])
        store.set_metadata(a, "Work/Projects", [("/private/vendor/x", None)])
    store.rename_mailbox("a@x", "INBOX", "Old")
    store.rename_mailbox("b@x", "Work", "Play")
    store.delete_mailbox("c@x", "Work/Projects")
    store.create_mailbox("c@x", "Work/Projects")
    store.delete_account("c@x")
    store.ensure_account("c@x")


def replay(ops_: list[Op], path) -> Shard:
    fresh = Shard(path)
    fresh.open_writer()
    fresh.open_reader()
    [(ok, value, _)] = fresh.run_batch([functools.partial(ops.intent_apply_ops, ops=ops_)])
    assert ok, value
    return fresh


def test_replaying_the_log_rebuilds_identical_state(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        busy_workload(store)
        rows = store.messages("a@x", "Archive")  # an in-place restore: the newest expunged
        status, meta = store.status("a@x", "Archive"), store.metadata("a@x", "Archive",
                                                                     [r.uid for r in rows])
        store.restore_mailbox("a@x", "Archive", {
            "uidvalidity": status.uidvalidity, "uidnext": status.uidnext,
            "messages": [{"uid": r.uid, "blob": r.blob, "size": r.size, "flags": [],
                          "internaldate": r.internaldate, "meta": meta[r.uid]}
                         for r in rows[:-1]]})
        original = store.shard_for("a@x")
        log = original.ops_since(0)
        assert {o.op for o in log} == set(ops.MAILBOX_APPLY)  # every mailbox op kind
        assert [o.index for o in log] == list(range(1, len(log) + 1))
        assert all(o.epoch == 0 for o in log)
        expected = original.dump_state()
    copy = replay(log, tmp_path / "replayed.sqlite")
    try:
        assert copy.dump_state() == expected
        assert copy.ops_since(0) == log
    finally:
        copy.close()


def test_replay_in_pieces_matches(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        busy_workload(store, seed=3)
        log = store.shard_for("a@x").ops_since(0)
        expected = store.shard_for("a@x").dump_state()
    fresh = replay(log[:10], tmp_path / "r.sqlite")
    try:
        [(ok, last, _)] = fresh.run_batch([functools.partial(ops.intent_apply_ops, ops=log[10:])])
        assert ok and last == len(log)
        assert fresh.dump_state() == expected
    finally:
        fresh.close()


def test_replayed_shard_continues_uids(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        for i in range(3):
            store.append("a@x", "INBOX", msg(i), meta=META)
        store.expunge("a@x", "INBOX", [3])
        log = store.shard_for("a@x").ops_since(0)
    # A replica built from the log is a store in its own right.
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "shards").mkdir()
    replay(log, tmp_path / "r" / "shards" / "shard-0000.sqlite").close()
    with open_store(tmp_path / "r", shards=1) as replica:
        assert replica.append("a@x", "INBOX", msg(9), meta=META).uid == 4


def test_apply_ops_rejects_gaps_and_older_epochs(tmp_path):
    with open_store(tmp_path / "s", shards=1) as store:
        store.ensure_account("a@x")
        store.append("a@x", "INBOX", msg(1), meta=META)
        log = store.shard_for("a@x").ops_since(0)
        number = shard_of("a@x", 1)
        with pytest.raises(StorageError):
            store.apply_ops(number, log[:1])  # index 1 again: not last + 1
        last = store.shard_for("a@x").last_index()
        newer = Op(last + 1, 2, 0.0, "create_mailbox", {"account": "a@x", "mailboxes": [
            {"name": "Z", "uidvalidity": 5, "special_use": None, "subscribed": False}]})
        assert store.apply_ops(number, [newer]) == last + 1
        assert "Z" in [m.name for m in store.list_mailboxes("a@x")]
        older = Op(last + 2, 1, 0.0, "delete_account", {"account": "a@x"})
        with pytest.raises(StorageError):
            store.apply_ops(number, [older])  # design.md promise 2
        assert store.list_mailboxes("a@x")
        assert store.ops_since(number, last) == store.shard_for("a@x").ops_since(last)


def test_database_is_wal_and_full_sync(tmp_path):
    with open_store(tmp_path / "s", shards=2) as store:
        store.ensure_account("a@x")
        path = store.shard_for("a@x").path
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
