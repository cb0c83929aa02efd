"""The IMAP session against the real MailStore, and the fake checked against it.

The same scripted sessions run over tests/unit/imap/fakes.FakeStore and over
storage.mailstore.MailStore (SQLite shards, blobs, group commit, watchers);
the transcripts must match once UIDVALIDITY values are masked.  This keeps
the fake used by the unit tests honest (style: fakes checked against the
real thing).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from storage.mailstore import MailStore
from tests.unit.imap.fakes import FakeStore
from tests.unit.imap.helpers import MESSAGE, Client

ACCOUNT = "alice@example.test"


def _mask(data: bytes) -> bytes:
    data = re.sub(rb"UIDVALIDITY \d+", b"UIDVALIDITY N", data)
    data = re.sub(rb"(APPENDUID|COPYUID) \d+", rb"\1 N", data)
    data = re.sub(rb"MAILBOXID \(M[0-9a-f]+\)", b"MAILBOXID (M)", data)  # from UIDVALIDITY
    return data


def _script(make_store) -> list[bytes]:
    store = make_store()
    a, b = Client(store), Client(store)
    out: list[bytes] = []

    def run(c: Client, line: bytes) -> None:
        out.append(_mask(c.feed(line + b"\r\n")))

    run(a, b"l LOGIN alice@example.test alice-pw-1234")
    run(b, b"l LOGIN alice@example.test alice-pw-1234")
    run(a, b'l LIST "" *')
    run(a, b"c CREATE Work/Reports/")
    run(a, b'l LIST "" Work/%')
    run(a, b"c SUBSCRIBE Work/Reports")
    run(a, b'l LSUB "" Work/*')
    for i, flags in enumerate((b"", b" (\\Seen)", b" (\\Flagged $Work)")):
        raw = MESSAGE.replace(b"Hello there", b"Message %d" % i)
        run(a, b'a APPEND INBOX%s "14-Nov-2023 22:13:20 +0000" {%d}' % (flags, len(raw)))
        run(a, raw)
    run(a, b"s SELECT INBOX")
    run(b, b"s SELECT INBOX")
    run(a, b"f FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE)")
    run(a, b"f FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY[TEXT]<0.9>)")
    run(a, b"f FETCH 1 RFC822.TEXT")
    run(a, b"q SEARCH SUBJECT message NOT SEEN")
    run(a, b"q UID SEARCH OR FLAGGED KEYWORD $Work BODY needle")
    run(a, b"t STORE 1:2 +FLAGS (\\Answered)")
    run(b, b"n NOOP")
    run(b, b"t STORE 3 +FLAGS.SILENT (\\Deleted)")
    run(b, b"c COPY 3 Work/Reports")
    run(b, b"e EXPUNGE")
    run(a, b"f FETCH 1:* FLAGS")
    run(a, b"n NOOP")
    run(a, b"x STATUS Work/Reports (MESSAGES UIDNEXT UNSEEN)")
    run(a, b"r RENAME Work/Reports Old")
    run(a, b"d DELETE Old")
    run(a, b"i IDLE")
    store.append(ACCOUNT, "INBOX", MESSAGE, internaldate=1700000000.0)
    a.session.idle_flush()
    out.append(a.take())
    run(a, b"DONE")
    run(a, b"z LOGOUT")
    return out


@pytest.fixture
def real_store(tmp_path: Path):
    stores: list[MailStore] = []

    def make() -> MailStore:
        store = MailStore(tmp_path / f"store{len(stores)}", 4, fsync=False)
        store.open()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def test_session_transcript_is_the_same_over_fake_and_real_store(real_store) -> None:
    fake = _script(FakeStore)
    real = _script(real_store)
    assert len(fake) == len(real)
    for i, (f, r) in enumerate(zip(fake, real, strict=True)):
        assert f == r, f"step {i}:\nfake: {f!r}\nreal: {r!r}"
    joined = b"".join(real)
    assert b"BAD" not in joined
    assert b"* 3 EXPUNGE" in joined  # b's expunge, reported to a at its next command
    assert real[-3] == b"* 3 EXISTS\r\n"  # the delivery during IDLE
