"""Cost of one DKIM signature: dkimpy's pure-Python RSA, the fast RSA path
(cryptography for the RSA step, dkimpy for the rest), and Ed25519 (dkimpy +
PyNaCl), over 5 KB messages; plus a whole ``Signer.sign`` with both keys.

    python3 tests/bench/dkim_cost.py [--count 200] [--size 5120]

Prints a Markdown table: wall time per signature (median, p95), CPU time per
signature, and signatures per CPU-second (one core; CPU time is the figure to
trust on a loaded machine).  Each timed call signs a different message (a counter in the
Subject), so nothing is cached across calls.  Figures go to docs/dkim.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dkim  # noqa: E402

from node.config import DkimSettings  # noqa: E402
from node.outbound import dkim as pdkim  # noqa: E402

DOMAIN = "bench.test"


def make_message(index: int, size: int) -> bytes:
    head = (
        f"From: Sender <sender@{DOMAIN}>\r\nTo: rcpt@remote.test\r\n"
        f"Subject: dkim bench {index}\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        f"Message-ID: <{index}.bench@{DOMAIN}>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again. 0123456789\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body


def measure(name: str, count: int, size: int, fn: Callable[[bytes], bytes]) -> dict:
    messages = [make_message(i, size) for i in range(count)]
    fn(messages[0])  # warm-up: key loading, the fast path's one-time self-check
    walls = []
    cpu_start = time.process_time()
    for raw in messages:
        start = time.perf_counter()
        out = fn(raw)
        walls.append(time.perf_counter() - start)
        assert out.startswith(b"DKIM-Signature:"), name
    cpu = (time.process_time() - cpu_start) / count
    return {
        "name": name,
        "median_ms": statistics.median(walls) * 1000,
        "p95_ms": sorted(walls)[int(0.95 * (len(walls) - 1))] * 1000,
        "cpu_ms": cpu * 1000,
        "per_cpu_s": 1 / cpu if cpu > 0 else float("inf"),
    }


class Keys:
    def __init__(self, *entries: tuple[str, dict]) -> None:
        self.records = [{**r, "domain": DOMAIN, "selector": s} for s, r in entries]

    def dkim_keys(self, domain: str) -> list[dict]:
        return list(self.records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="signatures per row")
    parser.add_argument("--size", type=int, default=5120, help="message size in octets")
    args = parser.parse_args()

    rsa_record = pdkim.generate_key(pdkim.RSA)
    ed_record = pdkim.generate_key(pdkim.ED25519)
    rsa_key = pdkim.load_key(DOMAIN, "r", rsa_record)
    ed_key = pdkim.load_key(DOMAIN, "e", ed_record)
    wanted = list(DkimSettings().headers)

    def slow_rsa(raw: bytes) -> bytes:
        message = dkim.DKIM(raw)
        names = pdkim.sign_headers_list(message.headers, wanted)
        return pdkim.dkimpy_signature(message, rsa_key, names)

    def fast_rsa(raw: bytes) -> bytes:
        message = dkim.DKIM(raw)
        names = pdkim.sign_headers_list(message.headers, wanted)
        return pdkim.fast_rsa_signature(message.headers, message.body, rsa_key, names)

    def ed25519(raw: bytes) -> bytes:
        message = dkim.DKIM(raw)
        names = pdkim.sign_headers_list(message.headers, wanted)
        return pdkim.dkimpy_signature(message, ed_key, names)

    both = pdkim.Signer(Keys(("r", rsa_record), ("e", ed_record)), DkimSettings(fast_rsa=True))
    both_slow = pdkim.Signer(
        Keys(("r", rsa_record), ("e", ed_record)), DkimSettings(fast_rsa=False)
    )
    rows = [
        measure("RSA-2048, dkimpy (pure Python)", args.count, args.size, slow_rsa),
        measure("RSA-2048, fast path (cryptography)", args.count, args.size, fast_rsa),
        measure("Ed25519, dkimpy + PyNaCl", args.count, args.size, ed25519),
        measure(
            "Signer.sign, RSA + Ed25519, fast_rsa = true",
            args.count,
            args.size,
            lambda raw: both.sign(raw, DOMAIN),
        ),
        measure(
            "Signer.sign, RSA + Ed25519, fast_rsa = false",
            args.count,
            args.size,
            lambda raw: both_slow.sign(raw, DOMAIN),
        ),
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.count} signatures per row, {args.size}-octet messages; "
        f"Python {platform.python_version()}, dkimpy {_version('dkimpy')}, "
        f"cryptography {_version('cryptography')}, load average {load:.2f}\n"
    )
    print("| path | wall median ms | wall p95 ms | CPU ms | per CPU-second |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} | "
            f"{r['cpu_ms']:.2f} | {r['per_cpu_s']:.0f} |"
        )
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
