"""Backup transfer throughput: sealed objects through ``Target`` versus a plain
boto3 transfer of the same bytes to the same S3 server on this machine.

    python3 tests/bench/backup.py [--server rclone|moto] [--large-mib 64]
                                  [--small-count 64] [--small-kib 512] [--rounds 3]

Scenarios (each timed end to end, the median of ``--rounds``):

- large: one file of ``--large-mib`` MiB (a shard snapshot).  Ours:
  ``Target.put(key, SealedFile(...))`` (hash pass, then parts sealed on
  demand in the threadpool, multipart 8 MiB, 4 in flight); the "staging
  file" row: ``seal_file`` into a temporary file, then ``Target.put(key,
  Path)``.  Back: ``get_to_file`` (ranged GETs, 4 in flight), then
  ``open_to_file`` (decrypt, verify, fsync the plaintext).  Plain: boto3 ``upload_file`` / ``download_file`` (s3transfer,
  same 16 MiB threshold and 8 MiB parts, its default 10 threads).
- small: ``--small-count`` objects of ``--small-kib`` KiB (message blobs).
  Ours: ``seal`` + ``Target.put``; back: ``Target.get`` + ``open_object``.
  Plain: ``put_object`` / ``get_object``.

MB/s are plaintext megabytes (10^6) per wall second; the ratio is ours / plain
(issue 6 target: >= 0.8).  CPU seconds are reported for this process and for
the server process (rclone, or moto run as its own process): on a 2-CPU
machine the server's own cost is part of every figure.  The pure AES-GCM cost
(seal/open in memory, one core) is printed for reference.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import boto3  # noqa: E402  (benchmark baseline: plain boto3)
from boto3.s3.transfer import TransferConfig  # noqa: E402
from botocore.config import Config  # noqa: E402

from storage.backup_crypto import (  # noqa: E402
    Key,
    SealedFile,
    open_object,
    open_remote_to_file,
    seal,
    seal_file,
)
from storage.backup_target import (  # noqa: E402
    CONCURRENCY,
    MULTIPART_THRESHOLD,
    PART_SIZE,
    open_target,
)
from tests.support.etcd import free_port  # noqa: E402
from tests.support.s3 import RcloneServer, S3Server, wait_http  # noqa: E402

MB = 1_000_000
BUCKET = "bench"


class MotoProcess(S3Server):
    """moto's server as its own process (so its CPU is measured apart)."""

    def __init__(self) -> None:
        port = free_port()
        super().__init__(f"http://127.0.0.1:{port}")
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", *argv]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        wait_http("127.0.0.1", port, time.monotonic() + 30, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall, this process's CPU and the server's CPU over one timed block."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def run(self, fn: Callable[[], None]) -> tuple[float, float, float]:
        # Write back what the previous scenario left dirty (plain download_file
        # does not fsync its 64 MiB), so no run pays for another's writeback.
        os.sync()
        w, c, s = time.perf_counter(), time.process_time(), cpu_of(self.server_pid)
        fn()
        return (
            time.perf_counter() - w,
            time.process_time() - c,
            cpu_of(self.server_pid) - s,
        )


def plain_client(server: S3Server):
    config = Config(
        region_name=server.region,
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=config,
    )


def scenarios(
    server: S3Server, args: argparse.Namespace, work: Path
) -> dict[str, Callable[[], None]]:
    key = Key(os.urandom(32))
    target = open_target(server.settings(BUCKET, "ours"), concurrency=args.concurrency)
    target.create_bucket()
    client = plain_client(server)
    transfer = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=PART_SIZE,
        max_concurrency=args.plain_concurrency,
    )
    large = work / "large"
    with open(large, "wb") as f:
        for _ in range(args.large_mib):
            f.write(os.urandom(1024 * 1024))
    small = [os.urandom(args.small_kib * 1024) for _ in range(args.small_count)]

    def plain_large_up() -> None:
        client.upload_file(str(large), BUCKET, "plain/large", Config=transfer)

    def plain_large_down() -> None:
        client.download_file(BUCKET, "plain/large", str(work / "plain.out"), Config=transfer)

    def ours_large_up() -> None:
        with SealedFile(key, "snapshot", large, {"shard": 0}) as sealed:
            target.put("snap/large", sealed)

    def ours_large_up_staged() -> None:
        sealed = work / "large.sealed"
        seal_file(key, "snapshot", large, sealed, {"shard": 0})
        target.put("snap/large", sealed)
        sealed.unlink()

    def ours_large_down() -> None:
        open_remote_to_file(key, target, "snap/large", work / "ours.out")

    def plain_small_up() -> None:
        for i, data in enumerate(small):
            client.put_object(Bucket=BUCKET, Key=f"plain/small/{i}", Body=data)

    def plain_small_down() -> None:
        for i in range(len(small)):
            client.get_object(Bucket=BUCKET, Key=f"plain/small/{i}")["Body"].read()

    def ours_small_up() -> None:
        for i, data in enumerate(small):
            target.put(f"blobs/{i}", seal(key, "blob", data, {}))

    def ours_small_down() -> None:
        for i in range(len(small)):
            open_object(key, target.get(f"blobs/{i}"))

    return {
        "large up plain": plain_large_up,
        "large up ours": ours_large_up,
        "large up (staging file) ours": ours_large_up_staged,
        "large down plain": plain_large_down,
        "large down ours": ours_large_down,
        "small up plain": plain_small_up,
        "small up ours": ours_small_up,
        "small down plain": plain_small_down,
        "small down ours": ours_small_down,
    }


def crypto_only(mib: int) -> tuple[float, float]:
    """(seal MB/s, open MB/s) in memory, one core."""
    key = Key(os.urandom(32))
    data = os.urandom(mib * 1024 * 1024)
    t = time.process_time()
    sealed = seal(key, "blob", data, {})
    seal_s = time.process_time() - t
    t = time.process_time()
    open_object(key, sealed)
    open_s = time.process_time() - t
    return len(data) / MB / seal_s, len(data) / MB / open_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", choices=["rclone", "moto"], default="rclone")
    parser.add_argument("--large-mib", type=int, default=64)
    parser.add_argument("--small-count", type=int, default=64)
    parser.add_argument("--small-kib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=int, default=CONCURRENCY, help="our parts/ranges in flight"
    )
    parser.add_argument(
        "--plain-concurrency", type=int, default=10, help="s3transfer threads (its default: 10)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="postroom-bench-backup-"))
    server: RcloneServer | MotoProcess
    if args.server == "rclone":
        server = RcloneServer(work / "s3data")
        server.start()
        pid = server.proc.pid  # type: ignore[union-attr]
    else:
        server = MotoProcess()
        pid = server.proc.pid
    try:
        runs = scenarios(server, args, work)
        meter = Meter(pid)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                results[name].append(meter.run(fn))
        report(args, results)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, results: dict[str, list[tuple[float, float, float]]]) -> None:
    sizes = {
        "large": args.large_mib * 1024 * 1024,
        "small": args.small_count * args.small_kib * 1024,
    }
    print(
        f"# backup transfer, server {args.server}, {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, median of {args.rounds}"
    )
    print(f"large: 1 x {args.large_mib} MiB; small: {args.small_count} x {args.small_kib} KiB\n")
    print(
        "| transfer | plain MB/s | ours MB/s | ratio | client CPU s plain / ours | server CPU s plain / ours |"
    )
    print("|---|---|---|---|---|---|")
    for scenario in ("large up", "large up (staging file)", "large down", "small up", "small down"):
        base = scenario.split(" (")[0]
        plain = [statistics.median(x) for x in zip(*results[f"{base} plain"], strict=True)]
        ours = [statistics.median(x) for x in zip(*results[f"{scenario} ours"], strict=True)]
        size = sizes[scenario.split()[0]] / MB
        print(
            f"| {scenario} | {size / plain[0]:.1f} | {size / ours[0]:.1f} | "
            f"{plain[0] / ours[0]:.2f} | {plain[1]:.2f} / {ours[1]:.2f} | "
            f"{plain[2]:.2f} / {ours[2]:.2f} |"
        )
    plain = statistics.median(w for w, _c, _s in results["large down plain"])
    ours = statistics.median(w for w, _c, _s in results["large down ours"])
    gib = sizes["large"] / 2**30
    print(
        f"\nrestore of a shard snapshot (the large down row: ranged GETs, decrypt, verify, "
        f"fsync): {ours / gib:.1f} s/GiB; plain boto3 download_file of the same bytes "
        f"(no fsync): {plain / gib:.1f} s/GiB"
    )
    print(
        f"settings: ours {args.concurrency} parts/ranges in flight, "
        f"{PART_SIZE >> 20} MiB parts (whole sealed chunks); "
        f"plain s3transfer {args.plain_concurrency} threads, {PART_SIZE >> 20} MiB parts"
    )
    seal_rate, open_rate = crypto_only(64)
    print(
        f"\nAES-256-GCM in memory (one core): seal {seal_rate:.0f} MB/s, open {open_rate:.0f} MB/s"
    )


if __name__ == "__main__":
    main()
