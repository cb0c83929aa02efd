"""Log compaction on a real 3-node cluster: a follower that was down while
the primary compacted its log past the follower's position comes back, is
caught up by a snapshot (cluster/replication.py), and every replica ends
byte-identical (state digest and every referenced body).

Real processes over a TLS+auth etcd cluster (tests/support/cluster.py); the
compaction is triggered with `postroom storage reclaim` on the primary.
"""

from __future__ import annotations

import hashlib
import smtplib
import sqlite3
from pathlib import Path

import pytest

from storage.mailstore import shard_of
from storage.shard import Shard
from tests.support.cluster import ClusterHarness, ClusterNode
from tests.support.etcd import skip_without_etcd
from tests.support.node import merge, to_toml

ALICE = "alice@example.test"
SHARDS = 2
DEADLINE = 90.0
KEEP = 5


def shard_file(node: ClusterNode, number: int) -> Path:
    return Path(node.data_dir) / "mail" / "shards" / f"shard-{number:04d}.sqlite"


def read_only(path: Path, sql: str) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchone()[0] or 0


def replica_state(node: ClusterNode, number: int) -> tuple[tuple[int, int], str, dict[str, str]]:
    """(position, state digest, {blob: sha256 of its file}) of one replica."""
    shard = Shard(shard_file(node, number))
    position, digest = shard.state_digest()
    root = Path(node.data_dir) / "mail" / "blobs"
    bodies = {b: hashlib.sha256((root / b[:2] / b[2:4] / b).read_bytes()).hexdigest()
              for b in shard.blob_names()}
    return position, digest, bodies


def send(node: ClusterNode, n: int) -> None:
    with smtplib.SMTP(*node.address("smtp"), timeout=30) as smtp:
        smtp.sendmail("sender@remote.test", [ALICE],
                      b"From: sender@remote.test\r\nTo: alice@example.test\r\n"
                      b"Subject: compacted %d\r\n\r\nbody %d\r\n" % (n, n))


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    skip_without_etcd()
    cluster = ClusterHarness(tmp_path_factory.mktemp("reclaim"), shards=SHARDS)
    try:
        cluster.setup()
        for node in cluster.nodes:  # manual compaction only, a short log
            merge(node.settings, {"storage": {"log_keep_ops": KEEP, "compact_interval": 0.0,
                                              "blob_gc_interval": 0.0}})
            node.config_path.write_text(to_toml(node.settings))
        cluster.start()
        cluster.wait_until(cluster.fully_replicated, DEADLINE, "every shard led and replicated")
        yield cluster
    finally:
        cluster.close()


def test_follower_behind_the_compacted_log_catches_up_by_snapshot(harness):
    number = shard_of(ALICE, SHARDS)
    primary = harness.by_name(harness.shard_record(number)["primary"])
    send(primary, 0)
    harness.wait_until(harness.fully_replicated, DEADLINE, "the first message everywhere")
    follower, third = [n for n in harness.nodes if n is not primary]

    follower.terminate()
    behind = read_only(shard_file(follower, number),
                       "SELECT value FROM shard_meta WHERE key = 'last_index'")
    for n in range(1, 31):
        send(primary, n)
    last = read_only(shard_file(primary, number),
                     "SELECT value FROM shard_meta WHERE key = 'last_index'")
    assert last >= behind + 30

    def third_published() -> bool:  # its position protects nothing older than KEEP
        kv = harness.session.get(f"/positions/{third.name}")
        return bool(kv and kv.value["shards"][str(number)][0] == last)

    harness.wait_until(third_published, DEADLINE, "the live follower's position published")
    done = primary.cli("storage", "reclaim", "--settle", "0")
    assert done.returncode == 0, done.stderr
    start = read_only(shard_file(primary, number), "SELECT min(idx) FROM oplog")
    assert start == last - KEEP + 1 > behind + 1  # the follower's next op is gone

    follower.start()
    harness.wait_until(harness.fully_replicated, DEADLINE, "the follower back in the ISR")
    assert f"shard {number}: installed a snapshot from {primary.name}" in follower.log_tail(400)
    assert "not in our log: snapshot" in primary.log_tail(400)

    states = {n.name: replica_state(n, number) for n in harness.nodes}
    assert len({(pos, digest) for pos, digest, _ in states.values()}) == 1, states
    bodies = [b for _, _, b in states.values()]
    assert len(bodies[0]) >= 31 and bodies[0] == bodies[1] == bodies[2]
    assert all(name == digest for name, digest in bodies[0].items())
