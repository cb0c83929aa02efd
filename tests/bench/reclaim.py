"""What reclaiming space costs (storage/reclaim.py): CPU per op compacted and
per blob swept, and the longest the hub waited meanwhile.

Builds one store of N messages delivered to a few accounts (fsync off: the
disk is not what is measured), expunges a fraction, then runs one log
compaction and one blob sweep (settle 0), each measured as process CPU
(utime + stime) and wall time, while a greenlet ticking every 1 ms records
the longest gap between its ticks (how long the hub was kept from serving).
Reported, never asserted.

    python3 -m tests.bench.reclaim [--messages 20000] [--expunge 0.5] [--size 2000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import gevent

from storage.mailstore import MailStore
from storage.reclaim import Reclaimer

ACCOUNTS = [f"user{i}@example.test" for i in range(8)]


class HubWatch:
    """The longest gap between 1 ms ticks of a greenlet (hub latency)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._g = gevent.spawn(self._tick)

    def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            gevent.sleep(0.001)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last)
            last = now

    def stop(self) -> float:
        self._g.kill()
        return self.worst


def measure(what: str, fn):
    cpu0, wall0 = sum(os.times()[:2]), time.perf_counter()
    watch = HubWatch()
    result = fn()
    worst = watch.stop()
    cpu, wall = sum(os.times()[:2]) - cpu0, time.perf_counter() - wall0
    return result, {"what": what, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                    "hub_max_gap_ms": round(worst * 1000, 1)}


def build(store: MailStore, messages: int, size: int) -> None:
    pad = b"x" * size
    jobs = []
    for n in range(messages):
        raw = b"Subject: bench %d\r\n\r\n%d\r\n" % (n, n) + pad
        jobs.append(gevent.spawn(store.deliver, [ACCOUNTS[n % len(ACCOUNTS)]], raw,
                                 meta={"subject": "bench"}))
        if len(jobs) >= 200:
            gevent.joinall(jobs, raise_error=True)
            jobs = []
    gevent.joinall(jobs, raise_error=True)


def expunge(store: MailStore, fraction: float) -> int:
    gone = 0
    for account in ACCOUNTS:
        uids = [r.uid for r in store.messages(account, "INBOX")]
        cut = uids[: int(len(uids) * fraction)]
        for i in range(0, len(cut), 1000):
            gone += len(store.expunge(account, "INBOX", cut[i:i + 1000]))
    return gone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--expunge", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=2000)
    args = parser.parse_args()
    settings = SimpleNamespace(log_keep_ops=0, compact_interval=0.0, blob_gc_interval=0.0,
                               blob_gc_grace=0.0, blob_gc_settle=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        store = MailStore(Path(tmp) / "mail", 4, fsync=False)
        store.open()
        try:
            t0 = time.perf_counter()
            build(store, args.messages, args.size)
            gone = expunge(store, args.expunge)
            gevent.sleep(2.0)
            while store._indexing:  # the full-text indexer's CPU is not ours
                gevent.sleep(0.5)
            print(f"built {args.messages} messages, expunged {gone}"
                  f" in {time.perf_counter() - t0:.1f} s; load {os.getloadavg()[0]:.2f}")
            reclaimer = Reclaimer(store, settings)
            compacted, row = measure("compaction", reclaimer.compact_now)
            ops = sum(compacted.values())
            print(row, f"ops={ops}", f"cpu_ms_per_1000_ops={1e6 * row['cpu_s'] / max(1, ops):.1f}")
            swept, row = measure("blob sweep", lambda: reclaimer.sweep_now(0.0))
            files = args.messages
            print(row, f"deleted={swept.deleted}", f"freed={swept.freed}",
                  f"cpu_ms_per_1000_blobs={1e6 * row['cpu_s'] / files:.1f}")
            print(f"load {os.getloadavg()[0]:.2f}")
        finally:
            store.close()


if __name__ == "__main__":
    main()
