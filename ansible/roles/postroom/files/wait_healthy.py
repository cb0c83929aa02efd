#!/usr/bin/env python3
"""Wait until a postroom node is healthy in the cluster, as ``postroom status --json`` shows it.

Theory of operation
-------------------
``wait_healthy.py --node NAME [--version V] [--in-sync] [--timeout S] -- CLI...``
reads the cluster status every half second until, in one snapshot:

* NAME is a member (running ``V`` when given);
* every shard has a live primary (``without_primary`` is empty);
* with ``--in-sync``: no hand-off is pending, every shard's ISR equals its
  replicas (every replica caught up), NAME is in the ISR of every shard
  that lists it, and NAME holds at least its fair share of replicas,
  ``floor(shards * min(rf, members) / members)`` (after ``undrain`` the
  controller moves replicas back; placement keeps nodes within one replica
  of each other, docs/cluster.md), so a just-undrained node counts as
  healthy only once it is back in the ISRs it should be in.

The status is what ``CLI status --json`` prints (CLI is the node's ``python
-m node --config FILE``).  Run by the node's own Python (as the roles do),
the script reads it in-process: one etcd session, one snapshot per poll
(node.statuscli.read_snapshot, the code behind that command), instead of
starting the CLI (a second of CPU) for every poll.  Under any other Python
it runs the CLI each time.

Exit 0 when healthy, 1 at the deadline with the last reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable

POLL_INTERVAL = 0.5  # seconds between snapshots; the status decides


def verdict(status: dict, node: str, version: str, in_sync: bool) -> str:
    """"" when healthy, else why not."""
    members = {m["name"]: m for m in status.get("members", [])}
    if node not in members:
        return f"{node} is not a member"
    if version and members[node].get("version") != version:
        return f"{node} runs {members[node].get('version')}, not {version}"
    if status.get("without_primary"):
        return f"shards without a live primary: {status['without_primary']}"
    if not in_sync:
        return ""
    shards = status.get("shards", [])
    for shard in shards:
        if shard.get("transfer_to"):
            return f"shard {shard['shard']}: hand-off to {shard['transfer_to']} pending"
        if sorted(shard.get("isr") or []) != sorted(shard.get("replicas") or []):
            return f"shard {shard['shard']}: replicas {shard.get('replicas')} isr {shard.get('isr')}"
    active = [m for m in members.values() if not m.get("draining")]
    factor = int((status.get("cluster") or {}).get("replication_factor") or 1)
    if members[node].get("draining"):
        return f"{node} is draining"
    fair = len(shards) * min(factor, len(active)) // max(1, len(active))
    held = sum(1 for s in shards if node in (s.get("isr") or []))
    if held < fair:
        return f"{node} is in {held} ISRs, expects at least {fair}"
    return ""


def cli_reader(cli: list[str]) -> Callable[[], dict]:
    """Reads the status by running ``CLI status --json``."""

    def read() -> dict:
        result = subprocess.run([*cli, "status", "--json"], capture_output=True, text=True,
                                timeout=60, check=False)
        try:
            return json.loads(result.stdout)
        except ValueError:
            raise RuntimeError(f"status failed: {result.stderr.strip()[-300:]}") from None

    return read


def in_process_reader(cli: list[str]) -> Callable[[], dict] | None:
    """Reads the status with this Python's postroom packages, the etcd
    settings taken from CLI's ``--config FILE``; None when that cannot be."""
    if "--config" not in cli[:-1]:
        return None
    try:
        from cluster.etcd import session_from_config
        from node.config import load
        from node.statuscli import read_snapshot
    except ImportError:
        return None
    config = cli[cli.index("--config") + 1]
    sessions: list = []

    def read() -> dict:
        if not sessions:  # opened on first use: a config or etcd error is a poll's reason
            sessions.append(session_from_config(load(config).etcd))
        return read_snapshot(sessions[0]).to_json()

    return read


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--node", required=True)
    parser.add_argument("--version", default="")
    parser.add_argument("--in-sync", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("cli", nargs="+")
    args = parser.parse_args(argv)
    read = in_process_reader(args.cli) or cli_reader(args.cli)
    deadline = time.monotonic() + args.timeout
    reason = "no answer yet"
    while time.monotonic() < deadline:
        try:
            reason = verdict(read(), args.node, args.version, args.in_sync)
        except Exception as exc:  # noqa: BLE001 - etcd down, config unreadable: poll again
            reason = f"status failed: {exc}"[:400]
        if not reason:
            print(f"{args.node}: healthy")
            return 0
        time.sleep(POLL_INTERVAL)
    print(f"{args.node}: not healthy after {args.timeout:g} s: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
