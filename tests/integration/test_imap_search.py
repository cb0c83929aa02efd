"""SEARCH over the real store: the full-text index answers exactly what the
unindexed path answers (RFC 3501 §6.4.4 / RFC 9051 §6.4.4 string keys), for
the whole golden corpus and for the fake store the unit tests use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storage.mailstore import MailStore
from tests.unit.imap.fakes import FakeStore
from tests.unit.imap.helpers import Client

ACCOUNT = "alice@example.test"
CORPUS = Path(__file__).resolve().parents[1] / "corpus"
EXTRA = [
    b"Subject: a\x00b c\r\nFrom: nul@example.test\r\n\r\nheader with NUL, body text\r\n",
    b"From: Dora <dora@example.test>\r\nSubject: Re: [list] Fwd: report\r\n\r\nshort\r\n",
]
QUERIES = [
    "SEARCH BODY the", "SEARCH BODY a", "SEARCH TEXT subject", "SEARCH TEXT message",
    "SEARCH SUBJECT re", "SEARCH FROM example", "SEARCH TO example.test", "SEARCH CC a",
    "SEARCH BCC x", 'SEARCH HEADER Content-Type "multipart"', 'SEARCH HEADER subject ""',
    "SEARCH OR BODY text FROM dora", "SEARCH NOT BODY the", "SEARCH BODY body SEEN",
    "UID SEARCH TEXT \"b c\"", "SEARCH CHARSET UTF-8 BODY {5}\r\ncafé", "SEARCH BODY \"nul,\"",
    "SEARCH SUBJECT \"b c\"", "SEARCH TEXT \"\"", "SEARCH 2:4 BODY e",
]


class Unindexed:
    """The same store with the index switched off: the reference answers."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def search_text(self, *args: Any) -> None:
        return None


def _messages() -> list[bytes]:
    msgs = [p.read_bytes() for p in sorted(CORPUS.glob("*.eml"))]
    assert len(msgs) >= 10  # the corpus ran
    return msgs + EXTRA


def _answers(store: Any) -> list[bytes]:
    store.ensure_account(ACCOUNT)
    for i, raw in enumerate(_messages()):
        store.append(ACCOUNT, "INBOX", raw, flags=["\\Seen"] if i % 3 == 0 else [],
                     internaldate=1700000000.0 + i)
    out = []
    for s in (store, Unindexed(store)):
        c = Client(s)
        c.login()
        c.cmd("s SELECT INBOX")
        answers = []
        for q in QUERIES:
            lines = c.feed(b"t " + q.encode() + b"\r\n")  # the literal is sent at once
            assert b"OK" in lines.split(b"\r\n")[-2], (q, lines)
            answers.append(lines)
        out.append(answers)
    indexed, reference = out
    for q, a, b in zip(QUERIES, indexed, reference, strict=True):
        assert a == b, f"{q}: index {a!r} != unindexed {b!r}"
    return indexed


@pytest.fixture
def real_store(tmp_path: Path):
    store = MailStore(tmp_path, 4, fsync=False)
    store.open()
    yield store
    store.close()


def test_imap_search_index_equals_unindexed_path_on_the_corpus(real_store) -> None:
    answers = _answers(real_store)
    assert any(len(a.split(b" ")) > 4 for a in answers)  # some searches found several


def test_imap_search_fake_store_answers_like_the_real_one(real_store) -> None:
    # The fake used by unit tests is checked against the real store (style.md).
    assert _answers(FakeStore()) == _answers(real_store)
