"""IMAP SEARCH on a large mailbox (issue 3): full-text index vs. scanning.

Builds one mailbox of N messages (default 100,000) directly through the
MailStore (concurrent appends, group-committed; fsync off: this measures
search, not the disk), then times SEARCH commands through a real IMAP
Session (parse, index query, evaluation, response), each the median of
several runs, and, for comparison, a few of them with the index switched
off (the scanning path every message).  Reported, never asserted.

    python3 -m tests.bench.imap_search [--messages 100000] [--runs 5] [--no-scan]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import gevent

from storage import fts
from storage.mailstore import MailStore
from tests.bench import imapfixture as fx
from tests.unit.imap.helpers import Client

ACCOUNT = "alice@example.test"
WORDS = ["report", "meeting", "budget", "invoice", "travel", "project", "deadline", "quarterly", "review", "lunch", "coffee", "release", "server", "cluster", "mailbox", "search", "index", "launch", "design", "customer", "contract", "holiday", "schedule", "payment", "refund", "ticket", "upgrade", "backup", "postroom", "dovecot", "stalwart", "thunderbird", "outlook", "network", "storage", "weekend"]
NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy"]


def message(rng: random.Random, i: int) -> bytes:
    sender = rng.choice(NAMES)
    subject = " ".join(rng.choices(WORDS, k=4))
    body = "\r\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(rng.randint(5, 30)))
    if i % 1000 == 7:
        body += "\r\nthe rare word zanzibar appears here\r\n"
    return (
        f"From: {sender} <{sender.lower()}{i % 50}@example.test>\r\n"
        f"To: Alice <alice@example.test>\r\n"
        f"Subject: {subject} #{i}\r\n"
        f"Date: Mon, 6 Nov 2023 10:{i % 60:02d}:00 +0000\r\n"
        f"Message-ID: <{i}@bench.example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{body}\r\n"
    ).encode()


def build(store: MailStore, count: int, distinct: int = 5000, batch: int = 1000) -> float:
    """Append count messages; returns seconds taken.

    Fast path for building a test mailbox: ``distinct`` different messages
    are generated and parsed once (metadata and index text), then appended
    round-robin; per batch the append intents (the same ones MailStore.append
    submits) go to the shard's group committer together.  Every message
    still gets its own row in the index.
    """
    rng = random.Random(42)
    raws = [message(rng, i) for i in range(min(count, distinct))]
    return fx.fill(store, [ACCOUNT], count, raws, internaldate=lambda n: 1_699_000_000.0 + n,
                   batch=batch)


class Scanning:
    """The store with the index off: what SEARCH costs without it."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def search_text(self, *args: Any) -> None:
        return None


QUERIES = [
    "SEARCH BODY zanzibar",
    "SEARCH BODY quarterly",
    "SEARCH TEXT zanzibar",
    "SEARCH FROM grace7@",
    "SEARCH SUBJECT \"#4242\"",
    "SEARCH UNSEEN",
    "SEARCH SUBJECT zz",
    "SEARCH BODY zanzibar UNSEEN",
    "UID SEARCH RETURN (COUNT MIN MAX) BODY zanzibar",
    "SORT (ARRIVAL) UTF-8 UNSEEN",
    "SORT (SUBJECT) UTF-8 BODY zanzibar",
    "THREAD REFERENCES UTF-8 BODY zanzibar",
]
SCANNED = ["SEARCH BODY zanzibar", "SEARCH FROM grace7@"]


def time_queries(store: Any, queries: list[str], runs: int) -> list[tuple[str, float, int]]:
    c = Client(store)
    c.login()
    lines = c.cmd("s SELECT INBOX")
    assert lines[-1].startswith(b"s OK"), lines
    out = []
    for q in queries:
        samples = []
        hits = 0
        for _ in range(runs):
            t0 = time.perf_counter()
            lines = c.cmd(f"q {q}")
            samples.append(time.perf_counter() - t0)
            assert lines[-1].startswith(b"q OK"), (q, lines[-1])
            first = lines[0].split()
            if first[1] in (b"SEARCH", b"SORT"):
                hits = len(first) - 2
            elif b"COUNT" in first:
                hits = int(first[first.index(b"COUNT") + 1])
            else:
                hits = -1
        out.append((q, statistics.median(samples), hits))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-scan", action="store_true", help="skip the scanning comparison")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = MailStore(Path(tmp), 1, fsync=False)
        store.open()
        try:
            took = build(store, args.messages)
            shard = store.shard_for(ACCOUNT)
            assert not fts.has_work(shard.reader)
            size = sum(p.stat().st_size for p in (Path(tmp) / "shards").iterdir())
            print(f"built {args.messages} messages in {took:.1f} s "
                  f"({args.messages / took:.0f}/s); shard database {size / 2**20:.0f} MiB")
            print(f"{'query':52} {'median ms':>10} {'hits':>7}")
            for q, t, hits in time_queries(store, QUERIES, args.runs):
                print(f"{q:52} {t * 1000:10.1f} {hits:7}")
            if not args.no_scan:
                print("without the index (scanning every message):")
                for q, t, hits in time_queries(Scanning(store), SCANNED, 1):
                    print(f"{q:52} {t * 1000:10.1f} {hits:7}")
        finally:
            store.close()
    gevent.get_hub().threadpool.kill()


if __name__ == "__main__":
    main()
