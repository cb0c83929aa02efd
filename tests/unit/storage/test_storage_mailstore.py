"""MailStore behaviour against the node.context.MailStore contract."""

from __future__ import annotations

import hashlib
import json

import gevent
import pytest

from storage.mailstore import MailStore, StoreLayoutError, shard_of
from storage.model import (
    DEFAULT_MAILBOXES,
    InvalidFlag,
    MailboxExists,
    MailboxNotAllowed,
    NoSuchMailbox,
)
from tests.unit.storage.storage_testlib import META, msg, open_store


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "store") as s:
        yield s


def names_of(store, account):
    return [m.name for m in store.list_mailboxes(account)]


def test_deliver_autocreates_defaults_once(store):
    results = store.deliver(["Alice@Example.org", "bob@example.org"], msg(1), meta=META)
    assert [r.uid for r in results] == [1, 1]
    assert sorted(names_of(store, "alice@example.org")) == sorted(n for n, _ in DEFAULT_MAILBOXES)
    sent = [m for m in store.list_mailboxes("alice@example.org") if m.name == "Sent"][0]
    assert sent.special_use == "\\Sent" and sent.subscribed
    store.ensure_account("alice@example.org")
    store.ensure_account("carol@example.org")
    assert sorted(names_of(store, "carol@example.org")) == sorted(n for n, _ in DEFAULT_MAILBOXES)
    assert len(names_of(store, "alice@example.org")) == len(DEFAULT_MAILBOXES)
    row = store.messages("alice@example.org", "INBOX")[0]
    assert row.blob == hashlib.sha256(msg(1)).hexdigest() == results[0].blob
    assert store.read_message(row.blob) == msg(1)
    assert store.metadata("alice@example.org", "INBOX", [1, 99]) == {1: META}


def test_deliver_writes_one_blob(store):
    store.deliver([f"u{i}@x" for i in range(10)], msg(7), meta=META)
    files = [p for p in (store.data_dir / "blobs").rglob("*") if p.is_file()]
    assert len(files) == 1


def test_uids_ascend_and_modseq_grows(store):
    a = "a@x"
    seen = [store.append(a, "INBOX", msg(i), meta=META) for i in range(5)]
    assert [r.uid for r in seen] == [1, 2, 3, 4, 5]
    assert [r.modseq for r in seen] == sorted({r.modseq for r in seen})
    store.expunge(a, "INBOX", [5])
    assert store.append(a, "INBOX", msg(9), meta=META).uid == 6  # RFC 3501 §2.3.1.1: never reused
    st = store.status(a, "INBOX")
    assert (st.uidnext, st.messages, st.unseen) == (7, 5, 5)
    assert st.size == sum(len(msg(i)) for i in (0, 1, 2, 3, 9))


def test_uids_survive_restart(tmp_path):
    with open_store(tmp_path / "s") as s:
        for i in range(3):
            s.append("a@x", "INBOX", msg(i), meta=META)
        s.expunge("a@x", "INBOX", [3])
        uv = s.status("a@x", "INBOX").uidvalidity
        hms = s.status("a@x", "INBOX").highestmodseq
    with open_store(tmp_path / "s") as s:
        r = s.append("a@x", "INBOX", msg(4), meta=META)
        assert (r.uid, r.uidvalidity) == (4, uv)
        assert r.modseq > hms


def test_shard_count_mismatch_is_an_error(tmp_path):
    with open_store(tmp_path / "s", shards=4) as s:
        s.ensure_account("a@x")
    with pytest.raises(StoreLayoutError):
        MailStore(tmp_path / "s", 8).open()
    assert json.loads((tmp_path / "s" / "storage.json").read_text())["shards"] == 4


def test_shard_of_is_stable_and_case_insensitive():
    assert shard_of("Alice@Example.ORG", 64) == shard_of("alice@example.org", 64)
    # A fixed value: the mapping must never change between versions.
    assert shard_of("alice@example.org", 64) == int.from_bytes(
        hashlib.sha256(b"alice@example.org").digest()[:8], "big") % 64


def test_mailbox_lifecycle_and_uidvalidity(store):
    a = "a@x"
    info = store.create_mailbox(a, "Projects/2026/Q1")
    assert {"Projects", "Projects/2026", "Projects/2026/Q1"} <= set(names_of(store, a))  # RFC 3501 §6.3.3
    with pytest.raises(MailboxExists):
        store.create_mailbox(a, "Projects/2026/Q1")
    with pytest.raises(MailboxExists):
        store.create_mailbox(a, "inbox")
    with pytest.raises(MailboxNotAllowed):
        store.create_mailbox(a, "bad//name")
    store.append(a, "Projects/2026/Q1", msg(1), meta=META)
    store.delete_mailbox(a, "Projects/2026/Q1")
    with pytest.raises(NoSuchMailbox):
        store.status(a, "Projects/2026/Q1")
    again = store.create_mailbox(a, "Projects/2026/Q1")
    assert again.uidvalidity != info.uidvalidity  # RFC 3501 §2.3.1.1
    st = store.status(a, "Projects/2026/Q1")
    assert (st.messages, st.uidnext) == (0, 1)
    with pytest.raises(MailboxNotAllowed):
        store.delete_mailbox(a, "INBOX")
    with pytest.raises(NoSuchMailbox):
        store.delete_mailbox(a, "nope")


def test_rename_moves_inferiors(store):
    a = "a@x"
    store.create_mailbox(a, "A/B")
    uv = store.status(a, "A/B").uidvalidity
    store.append(a, "A/B", msg(1), meta=META)
    store.rename_mailbox(a, "A", "Z")  # RFC 3501 §6.3.5
    assert "A" not in names_of(store, a) and "A/B" not in names_of(store, a)
    assert store.status(a, "Z/B").uidvalidity == uv
    assert [m.uid for m in store.messages(a, "Z/B")] == [1]
    with pytest.raises(MailboxNotAllowed):
        store.rename_mailbox(a, "Z", "Z/inner")
    with pytest.raises(MailboxExists):
        store.rename_mailbox(a, "Z", "Sent")
    with pytest.raises(NoSuchMailbox):
        store.rename_mailbox(a, "missing", "other")


def test_rename_inbox_moves_messages_and_leaves_it_empty(store):
    a = "a@x"
    store.create_mailbox(a, "INBOX/child")
    for i in range(3):
        store.append(a, "INBOX", msg(i), flags=["\\Seen"], meta=META)
    before = store.status(a, "INBOX")
    store.rename_mailbox(a, "INBOX", "Old")  # RFC 3501 §6.3.5 special case
    after = store.status(a, "INBOX")
    assert after.messages == 0
    assert after.uidvalidity == before.uidvalidity and after.uidnext == before.uidnext
    assert after.highestmodseq > before.highestmodseq
    assert store.changes_since(a, "INBOX", before.highestmodseq).expunged == [1, 2, 3]
    old = store.status(a, "Old")
    assert old.messages == 3 and old.uidvalidity != before.uidvalidity
    assert "INBOX/child" in names_of(store, a)
    assert store.append(a, "INBOX", msg(9), meta=META).uid == 4


def test_store_flags_modes_and_unchangedsince(store):
    a = "a@x"
    for i in range(3):
        store.append(a, "INBOX", msg(i), meta=META)
    ch = store.store_flags(a, "INBOX", [1, 2, 99], "add", ["\\seen", "$Work"])
    assert [c.uid for c in ch] == [1, 2]
    assert ch[0].flags == frozenset({"\\Seen", "$Work"})
    assert ch[0].modseq < ch[1].modseq  # each change a new MODSEQ
    assert store.store_flags(a, "INBOX", [1], "add", ["\\Seen"]) == []  # unchanged: no change
    ch = store.store_flags(a, "INBOX", [1], "remove", ["$Work"])
    assert ch[0].flags == frozenset({"\\Seen"})
    ch = store.store_flags(a, "INBOX", [3], "set", ["\\Flagged"])
    assert ch[0].flags == frozenset({"\\Flagged"})
    # RFC 7162 §3.1.3: messages modified after UNCHANGEDSINCE are not changed.
    m1 = {m.uid: m.modseq for m in store.messages(a, "INBOX")}
    ch = store.store_flags(a, "INBOX", [1, 2], "set", ["\\Deleted"], unchanged_since=m1[2])
    assert [c.uid for c in ch] == [2]
    assert store.status(a, "INBOX").unseen == 2  # 2 lost \\Seen, 3 never had it
    with pytest.raises(InvalidFlag):
        store.store_flags(a, "INBOX", [1], "add", ["\\Nope"])
    with pytest.raises(NoSuchMailbox):
        store.store_flags(a, "Nope", [1], "add", ["\\Seen"])


def test_copy_preserves_flags_and_date(store):
    a = "a@x"
    store.append(a, "INBOX", msg(1), flags=["\\Flagged"], internaldate=1_000_000.0, meta=META)
    store.append(a, "INBOX", msg(2), meta=META)
    store.append(a, "Archive", msg(3), meta=META)
    uv, pairs = store.copy(a, "INBOX", [1, 2, 7], "Archive")
    assert uv == store.status(a, "Archive").uidvalidity
    assert pairs == [(1, 2), (2, 3)]
    rows = {m.uid: m for m in store.messages(a, "Archive")}
    assert rows[2].flags == frozenset({"\\Flagged"}) and rows[2].internaldate == 1_000_000.0
    assert store.metadata(a, "Archive", [2]) == {2: META}
    with pytest.raises(NoSuchMailbox):
        store.copy(a, "INBOX", [1], "Missing")


def test_changes_since_reports_new_changed_and_expunged(store):
    a = "a@x"
    for i in range(4):
        store.append(a, "INBOX", msg(i), meta=META)
    mark = store.status(a, "INBOX").highestmodseq
    store.store_flags(a, "INBOX", [2], "add", ["\\Seen"])
    assert store.expunge(a, "INBOX", [3, 4, 50]) == [3, 4]
    store.append(a, "INBOX", msg(9), meta=META)
    ch = store.changes_since(a, "INBOX", mark)
    assert [m.uid for m in ch.changed] == [2, 5]
    assert ch.expunged == [3, 4]
    assert ch.highestmodseq == store.status(a, "INBOX").highestmodseq
    assert store.changes_since(a, "INBOX", ch.highestmodseq).changed == []


def test_subscribe(store):
    store.create_mailbox("a@x", "News")
    store.set_subscribed("a@x", "News", True)
    assert [m.subscribed for m in store.list_mailboxes("a@x") if m.name == "News"] == [True]
    store.set_subscribed("a@x", "News", False)
    assert [m.subscribed for m in store.list_mailboxes("a@x") if m.name == "News"] == [False]
    with pytest.raises(NoSuchMailbox):
        store.set_subscribed("a@x", "Nope", True)


def test_delete_account_keeps_blobs_and_new_uidvalidity(store):
    r = store.append("a@x", "INBOX", msg(1), meta=META)
    store.delete_account("a@x")
    assert store.list_mailboxes("a@x") == []
    assert store.read_message(r.blob) == msg(1)  # blobs are never deleted on expunge/delete
    r2 = store.append("a@x", "INBOX", msg(2), meta=META)
    assert r2.uidvalidity != r.uidvalidity


def test_watch_runs_after_commit(store):
    a = "a@x"
    store.ensure_account(a)
    seen = []

    def callback(mailbox):
        # Only committed state is visible through a fresh read.
        seen.append((mailbox, store.status(a, mailbox).messages))

    stop = store.watch(a, callback)
    store.append(a, "INBOX", msg(1), meta=META)
    store.append("other@x", "INBOX", msg(1), meta=META)
    assert seen == [("INBOX", 1)]
    stop()
    store.append(a, "INBOX", msg(2), meta=META)
    assert seen == [("INBOX", 1)]


def test_watch_callback_errors_do_not_break_writes(store):
    store.watch("a@x", lambda mailbox: 1 / 0)
    assert store.append("a@x", "INBOX", msg(1), meta=META).uid == 1
    assert store.append("a@x", "INBOX", msg(2), meta=META).uid == 2


def test_concurrent_appends_get_distinct_ascending_uids(store):
    jobs = [gevent.spawn(store.append, "a@x", "INBOX", msg(i), meta=META) for i in range(100)]
    gevent.joinall(jobs, raise_error=True)
    uids = sorted(j.value.uid for j in jobs)
    assert uids == list(range(1, 101))
    assert len({j.value.modseq for j in jobs}) == 100


@pytest.mark.parametrize("size", [10, 200_000])
def test_metadata_is_parsed_once_at_delivery(store, size):
    from storage.mime import parse_metadata

    raw = b"From: a@example.org\r\nSubject: Parsed\r\n\r\n" + b"word " * (size // 5) + b"\r\n"
    r = store.deliver(["a@x"], raw)
    assert store.metadata("a@x", "INBOX", [r[0].uid]) == {r[0].uid: json.loads(json.dumps(parse_metadata(raw)))}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_internaldate_is_refused_before_anything_is_written(store, bad):
    from storage.model import StorageError

    with pytest.raises(StorageError):
        store.append("a@x", "INBOX", msg(1), internaldate=bad, meta=META)
    assert store.list_mailboxes("a@x") == []
