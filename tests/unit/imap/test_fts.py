"""The full-text index (storage/fts.py) against RFC 3501 §6.4.4 substring semantics.

SEARCH string keys match "case-insensitive substring" of the decoded text;
the index must answer exactly what the unindexed path (node/imap/mime.py
body_text/full_text/header_text + search.matches) answers.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import fts
from storage.mailstore import MailStore
from storage.mime import parse_metadata
from storage.shard import Shard

ACCOUNT = "alice@example.test"
CORPUS = Path(__file__).resolve().parents[2] / "corpus"


def _conn() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE messages (mailbox INTEGER, uid INTEGER, blob TEXT, meta TEXT,"
                 " PRIMARY KEY (mailbox, uid))")
    fts.create(conn)
    return conn


def _doc(*values: str) -> fts.Doc:
    return fts.Doc(tuple(v.casefold() for v in values))


_alphabet = st.sampled_from(list("abcAB ßẞéÉıİ\u00e9\u0301-:x"))
_text = st.text(alphabet=_alphabet, max_size=30)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.tuples(_text, _text), min_size=1, max_size=6),
       needle=st.text(alphabet=_alphabet, min_size=1, max_size=5),
       field=st.sampled_from(["text", "hdr", "body"]))
def test_fts_search_equals_python_casefold_substring(texts, needle, field):
    # RFC 3501 §6.4.4: case-insensitive substring, for needles of any length
    # (trigram MATCH for >= 3 characters, instr() below that).
    conn = _conn()
    docs = {}
    for uid, (hdr, body) in enumerate(texts, start=1):
        conn.execute("INSERT INTO messages VALUES (7, ?, 'b', '{}')", (uid,))
        docs[uid] = _doc(hdr, body, "", "", "", "", "")
        fts.index_doc(conn, 7, uid, docs[uid])
    if not fts.usable(needle):
        return
    found, pending = fts.search(conn, 7, fts.Query(field, needle))
    assert pending == set()
    expect = {u for u, d in docs.items() if fts.doc_matches(d, field, needle)}
    assert found == expect
    # and doc_matches is the plain RFC definition
    for u, (hdr, body) in enumerate(texts, start=1):
        whole = {"text": [hdr, body], "hdr": [hdr], "body": [body]}[field]
        assert (u in found) == any(needle.casefold() in t.casefold() for t in whole)


def test_fts_rowids_keep_mailboxes_apart_even_above_2_31():
    conn = _conn()
    for mb in (5, 2**31 + 3, 2**32 - 1):
        conn.execute("INSERT INTO messages VALUES (?, 9, 'b', '{}')", (mb,))
        fts.index_doc(conn, mb, 9, _doc("h", f"word{mb}", "", "", "", "", ""))
    for mb in (5, 2**31 + 3, 2**32 - 1):
        assert fts.search(conn, mb, fts.Query("body", "word"))[0] == {9}
        assert fts.search(conn, mb, fts.Query("body", f"word{mb}"))[0] == {9}


def test_fts_messages_table_triggers_follow_delete_and_move():
    conn = _conn()
    conn.execute("INSERT INTO messages VALUES (1, 1, 'b', '{}')")
    fts.index_doc(conn, 1, 1, _doc("", "hello world", "", "", "", "", ""))
    conn.execute("INSERT INTO messages VALUES (1, 2, 'b', '{}')")  # not indexed yet
    assert fts.search(conn, 1, fts.Query("body", "hello")) == ({1}, {2})
    conn.execute("UPDATE messages SET mailbox = 3 WHERE mailbox = 1")
    assert fts.search(conn, 1, fts.Query("body", "hello")) == (set(), set())
    assert fts.search(conn, 3, fts.Query("body", "hello")) == ({1}, {2})
    conn.execute("DELETE FROM messages WHERE mailbox = 3")
    assert fts.search(conn, 3, fts.Query("body", "hello")) == (set(), set())
    for table in ("fts_text", "fts_addr"):
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


def test_fts_extract_matches_the_unindexed_search_text():
    from node.imap import mime

    ran = 0
    for path in sorted(CORPUS.glob("*.eml")):
        raw = path.read_bytes()
        meta = parse_metadata(raw)
        doc = fts.extract(raw, meta)
        if doc is None:
            continue
        ran += 1
        hdr, body = doc.values[0], doc.values[1]
        assert body == mime.body_text(raw).casefold()
        full = mime.full_text(raw).casefold()
        assert full in (hdr + "\n" + body, hdr, body, hdr + "\n")
        for i, name in enumerate(fts.FIELDS[2:], start=2):
            assert doc.values[i] == mime.header_text(meta, name).casefold()
    assert ran >= 10  # the corpus ran


def test_fts_header_with_control_octets_is_left_to_the_slow_path():
    raw = b"Subject: a\x00b\r\nFrom: x@y\r\n\r\nbody\r\n"
    assert fts.extract(raw, parse_metadata(raw)) is None


def test_fts_needles_it_cannot_answer():
    assert not fts.usable("")
    assert not fts.usable("a\r\nb")
    assert fts.usable("ab")


# -- through the real store ---------------------------------------------------

QP = (b"From: =?utf-8?q?Ren=C3=A9e?= <renee@example.test>\r\n"
      b"To: bob@example.test\r\nSubject: =?utf-8?b?UsOpc3Vtw6k=?= quarterly\r\n"
      b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
      b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
      b"Caf=C3=A9 au lait, the postroom=\r\n report.\r\n")
B64 = (b"From: carol@example.test\r\nSubject: attachment\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
       b"Content-Type: text/plain\r\n\r\nsee attached\r\n--XX\r\n"
       b"Content-Type: text/csv; name=a.csv\r\nContent-Transfer-Encoding: base64\r\n\r\n"
       b"aWQsbmFtZQoxLFplcGh5cg==\r\n--XX--\r\n")


@pytest.fixture
def store(tmp_path):
    s = MailStore(tmp_path, 2, fsync=False)
    s.open()
    yield s
    s.close()


def _wait_indexed(store: MailStore) -> None:
    deadline = 200
    shard = store.shard_for(ACCOUNT)
    while fts.has_work(shard.reader) or store._indexing:
        deadline -= 1
        assert deadline > 0, "indexer did not finish"
        gevent.sleep(0.01)


def test_fts_store_decodes_qp_base64_and_rfc2047(store):
    # RFC 2045 §6.7/§6.8 transfer encodings and RFC 2047 words are searched decoded.
    store.append(ACCOUNT, "INBOX", QP)
    store.append(ACCOUNT, "INBOX", B64)
    _wait_indexed(store)  # the indexer runs right after the commit

    def hits(field, needle):
        h = store.search_text(ACCOUNT, "INBOX", field, needle)
        assert h is not None and h.unindexed == frozenset()
        return set(h.uids)

    assert hits("body", "CAFÉ") == {1}
    assert hits("body", "postroom report") == {1}  # soft line break joined
    assert hits("body", "zephyr") == {2}  # text part of an attachment, base64
    assert hits("subject", "résumé") == {1}
    assert hits("from", "renée") == {1}
    assert hits("text", "quarterly") == {1}
    assert hits("text", "content-type: text/csv") == set()  # part headers are not TEXT
    assert hits("body", "quarterly") == set()
    assert hits("to", "bob@") == {1}
    assert hits("cc", "bob") == set()


def test_fts_delivery_does_not_wait_for_the_index(store):
    # The text is never in the op log, and a SEARCH right after delivery
    # is complete: what the indexer has not reached yet is named unindexed.
    store.append(ACCOUNT, "INBOX", B64)
    h = store.search_text(ACCOUNT, "INBOX", "body", "zephyr")
    assert h is not None and {1} == h.uids | h.unindexed
    _wait_indexed(store)
    assert store.search_text(ACCOUNT, "INBOX", "body", "zephyr").uids == {1}


def test_fts_copy_expunge_rename_keep_the_index_in_step(store):
    store.append(ACCOUNT, "INBOX", QP)
    store.append(ACCOUNT, "INBOX", B64)
    _wait_indexed(store)
    store.copy(ACCOUNT, "INBOX", [1], "Archive")
    first = store.search_text(ACCOUNT, "Archive", "body", "café")
    assert first is not None and set(first.uids) | set(first.unindexed) == {1}
    _wait_indexed(store)
    assert store.search_text(ACCOUNT, "Archive", "body", "café").uids == {1}
    store.expunge(ACCOUNT, "INBOX", [1])
    assert store.search_text(ACCOUNT, "INBOX", "body", "café").uids == frozenset()
    store.rename_mailbox(ACCOUNT, "INBOX", "Old")  # RFC 3501 §6.3.5: messages move
    assert store.search_text(ACCOUNT, "Old", "body", "zephyr").uids == {2}
    assert store.search_text(ACCOUNT, "INBOX", "body", "zephyr").uids == frozenset()
    store.delete_mailbox(ACCOUNT, "Old")
    reader = store.shard_for(ACCOUNT).reader
    for table in ("fts_text", "fts_addr"):  # only the Archive copy is left
        assert reader.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)


def test_fts_replayed_log_is_indexed_from_the_blobs(tmp_path, store):
    # The op log never carries the text: a replica (apply_ops) queues the
    # messages and indexes them from the blobs (storage/fts.py).
    store.append(ACCOUNT, "INBOX", QP)
    store.append(ACCOUNT, "INBOX", B64)
    number = [n for n in store.existing_shards()
              if store.shard_by_number(n)[0] is store.shard_for(ACCOUNT)][0]
    ops = store.ops_since(number, 0)
    assert all("text" not in op.args for op in ops)
    replica = MailStore(tmp_path / "replica", 2, fsync=False)
    replica.open()
    try:
        for sha in {op.args["blob"] for op in ops if op.op == "append"}:
            replica.blobs.put(store.read_message(sha))
        replica.apply_ops(number, ops)
        h = replica.search_text(ACCOUNT, "INBOX", "body", "zephyr")
        # exact for what is indexed, the rest named for the slow path
        assert h is not None and h.uids <= {2} and {2} <= h.uids | h.unindexed
        _wait_indexed(replica)
        h = replica.search_text(ACCOUNT, "INBOX", "body", "zephyr")
        assert h.uids == {2} and h.unindexed == frozenset()
    finally:
        replica.close()


@pytest.mark.parametrize("layout", ["none", "first"])
def test_fts_database_from_before_the_index_queues_every_message(tmp_path, layout):
    # A shard from before the index (or with the first, one-table layout)
    # gets every message queued for indexing when it is opened.
    shard = Shard(tmp_path / "s.sqlite", fsync=False)
    shard.open_writer()
    conn = shard._writer
    assert conn is not None
    for t in ("fts_msg_insert", "fts2_msg_delete", "fts2_msg_move"):
        conn.execute(f"DROP TRIGGER {t}")
    for t in ("fts_text", "fts_addr", "fts_pending"):
        conn.execute(f"DROP TABLE {t}")
    if layout == "first":
        conn.execute("CREATE VIRTUAL TABLE fts USING fts5(hdr, body)")
        conn.execute("CREATE TABLE fts_pending (mailbox INTEGER, uid INTEGER,"
                     " skip INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (mailbox, uid))")
        conn.execute("CREATE TRIGGER fts_msg_delete AFTER DELETE ON messages BEGIN"
                     " DELETE FROM fts WHERE rowid = OLD.uid; END")
    conn.execute("INSERT INTO messages (mailbox, uid, blob, size, internaldate, flags,"
                 " modseq, meta) VALUES (1, 1, 'b', 1, 0, '', 1, '{}')")
    shard.close()
    shard.open_writer()
    conn = shard._writer
    assert conn.execute("SELECT mailbox, uid FROM fts_pending").fetchall() == [(1, 1)]
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "fts" not in names and "fts_msg_delete" not in names
    conn.execute("DELETE FROM messages")  # the new triggers work
    assert conn.execute("SELECT count(*) FROM fts_pending").fetchone() == (0,)
    shard.close()
