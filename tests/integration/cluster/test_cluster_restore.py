"""Disaster recovery of a whole cluster from S3 (storage/restore.py, node/backupcli.py).

A 3-node cluster (tests/support/cluster.py: TLS+auth etcd, 8 shards, RF 3)
backs up to a real S3-compatible server on loopback (moto, tests/support/s3.py)
every 0.5 s.  Mail goes in through every node; flags and an expunge by
IMAP.  Once the target holds every shard's last op, everything is lost: the
nodes stop, their data directories (shards, blobs, certificates) are wiped
and every key under the cluster's etcd prefix is deleted.  Then, by the
book: ``postroom restore cluster --node n1`` with n1's configuration,
``postroom cluster join`` on each node, start the three fresh nodes.  Every
message is there with its UIDVALIDITY, UID and flags (read through every
node), the expunged one is not, the controller promotes n1 and the others
catch up as replicas; a restore drill against the restored cluster passes,
and an in-place mailbox restore goes through the shard primary (RPC).
"""

from __future__ import annotations

import dataclasses
import imaplib
import json
import re
import shutil
import smtplib
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from storage import backup_crypto
from storage.backup_target import open_target
from tests.support.cluster import ClusterHarness, ClusterNode
from tests.support.etcd import skip_without_etcd
from tests.support.node import USERS, merge, to_toml
from tests.support.s3 import moto_server

ALICE, BOB = "alice@example.test", "bob@example.test"
DEADLINE = 90.0
FETCH_RE = re.compile(rb"UID (\d+) FLAGS \(([^)]*)\)")


class BackedUpCluster(ClusterHarness):
    """The harness with [backup] in every node's configuration."""

    def __init__(self, base_dir: Path, backup: dict) -> None:
        # A longer lease than the harness's 3 s: three nodes starting at once on
        # a loaded machine may block their hubs past 3 s (no failover is tested).
        super().__init__(base_dir, lease_ttl=10)
        self.backup = backup

    def _make_node(self, i: int) -> ClusterNode:
        node = super()._make_node(i)
        node.settings = merge(node.settings, {"backup": self.backup})
        node.config_path.write_text(to_toml(node.settings))
        return node


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    skip_without_etcd()
    base = tmp_path_factory.mktemp("cluster-restore")
    key = base / "backup.key"
    backup_crypto.generate_key_file(key)
    with moto_server() as server:
        settings = server.settings("postroom-backup", "prod",
                                   enabled=True, key_file=str(key), segment_interval=0.5)
        target = open_target(settings)
        target.create_bucket()
        target.close()
        yield base, settings


@pytest.fixture(scope="module")
def cluster(s3):
    base, settings = s3
    harness = BackedUpCluster(base / "cluster", dataclasses.asdict(settings))
    with harness:
        harness.wait_until(harness.all_shards_led, DEADLINE, "every shard led")
        yield harness


def _send(node: ClusterNode, rcpt: str, subject: str) -> None:
    body = (f"From: s@remote.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@remote.test>\r\n\r\n{subject}\r\n")
    host, port = node.address("smtp")
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.sendmail("s@remote.test", [rcpt], body.encode())


def _imap(node: ClusterNode, user: str) -> imaplib.IMAP4:
    host, port = node.address("imap")
    conn = imaplib.IMAP4(host, port, timeout=30)
    conn.login(user, USERS[user])
    return conn


def _view(node: ClusterNode, user: str) -> tuple[int, dict]:
    """(UIDVALIDITY, {uid: (subject, flags)}) of INBOX through ``node``."""
    conn = _imap(node, user)
    try:
        typ, data = conn.select("INBOX", readonly=True)
        assert typ == "OK", data
        typ, data = conn.status("INBOX", "(UIDVALIDITY)")
        uidvalidity = int(re.search(rb"UIDVALIDITY (\d+)", data[0])[1])
        typ, data = conn.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out = {}
        for item in data:
            if isinstance(item, tuple):
                m = FETCH_RE.search(item[0])
                out[int(m[1])] = (item[1].decode().split(":", 1)[1].strip(),
                                  frozenset(m[2].decode().split()))
        return uidvalidity, out
    finally:
        conn.logout()


def _change(node: ClusterNode, user: str, subject: str, change: str, flags: str) -> None:
    conn = _imap(node, user)
    try:
        conn.select("INBOX")
        typ, data = conn.uid("SEARCH", "HEADER", "Subject", subject)
        (uid,) = data[0].split()
        assert conn.uid("STORE", uid.decode(), change, f"({flags})")[0] == "OK"
        if "Deleted" in flags:
            assert conn.expunge()[0] == "OK"
    finally:
        conn.logout()


def _last_index(db: Path) -> int:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT value FROM shard_meta WHERE key = 'last_index'").fetchone()
    return row[0] if row else 0


def _backed_up(cluster: ClusterHarness, settings) -> bool:
    """Every shard's newest segment in S3 ends at its primary's last op."""
    target = open_target(settings)
    try:
        for n, record in cluster.shard_records().items():
            db = cluster.by_name(record["primary"]).data_dir / "mail" / "shards" \
                / f"shard-{n:04d}.sqlite"
            last = _last_index(db) if db.exists() else 0
            segs = [i.key for i in target.list(f"{cluster.cluster_id}/shards/{n:04d}/seg/")]
            if last != (int(segs[-1].rsplit("-", 1)[1]) if segs else 0):
                return False
        return True
    finally:
        target.close()


def test_whole_cluster_restored_from_s3(cluster: BackedUpCluster, s3) -> None:
    _, settings = s3
    for i, node in enumerate(cluster.nodes):  # through every node
        for j in range(3):
            _send(node, ALICE, f"c-a{i}{j}")
            _send(node, BOB, f"c-b{i}{j}")
    first, second, third = cluster.nodes
    _change(second, ALICE, "c-a00", "+FLAGS", "\\Flagged \\Seen")
    _change(third, BOB, "c-b11", "+FLAGS", "$Later")
    _change(first, BOB, "c-b22", "+FLAGS", "\\Deleted")
    before = {u: _view(first, u) for u in (ALICE, BOB)}
    assert len(before[ALICE][1]) == 9 and len(before[BOB][1]) == 8
    cluster.wait_until(lambda: _backed_up(cluster, settings), DEADLINE, "backup caught up")
    time.sleep(2 * settings.segment_interval)  # an etcd export after the last change

    # Lose everything: every node's data directory and the cluster's etcd keys.
    cluster._parallel(lambda n: n.terminate(), cluster.nodes)
    for node in cluster.nodes:
        shutil.rmtree(node.data_dir)
    cluster.session.delete_prefix("/")
    assert cluster.session.get_prefix("/")[0] == []

    result = first.cli("restore", "cluster", "--node", "n1", "--cluster-id", cluster.cluster_id)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOST" not in result.stdout
    records = cluster.shard_records()
    assert len(records) == cluster.shards
    assert all(r["primary"] == "n1" and r["isr"] == ["n1"] and r["primary_lease"] == 0
               for r in records.values())
    cluster.cli_batch([(n.index, ("cluster", "join"), "") for n in cluster.nodes])  # raises
    cluster._parallel(lambda n: n.start(), cluster.nodes)
    cluster.wait_until(cluster.all_shards_led, DEADLINE, "every shard led again")

    for node in cluster.nodes:  # every message, UID and flag, through every node
        for user in (ALICE, BOB):
            assert cluster.wait_until(lambda n=node, u=user: _view(n, u) == before[u],
                                      DEADLINE, f"{user} through {node.name}")
    assert "c-b22" not in {s for s, _ in before[BOB][1].values()}
    cluster.wait_until(  # the controller brings the other nodes back as replicas
        lambda: all(len(r["isr"]) == 3 for r in cluster.shard_records().values()),
        DEADLINE, "replicas caught up")

    drill = first.cli("drill", "restore", "--json")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    report = json.loads(drill.stdout)
    assert report["ok"] and report["messages"] >= 17 and not report["violations"]

    # In place through the shard primary (RPC store.call, blobs attached).
    at = time.time()
    time.sleep(0.05)
    _change(second, ALICE, "c-a00", "-FLAGS", "\\Flagged")
    _change(second, ALICE, "c-a11", "+FLAGS", "\\Deleted")
    assert _view(first, ALICE) != before[ALICE]
    result = third.cli("restore", "mailbox", ALICE, "INBOX", "--in-place", "--at", f"{at:.6f}",
                       "--cluster-id", cluster.cluster_id)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _view(second, ALICE) == before[ALICE]

    # Into a new folder, from another node (create_mailbox + append on the primary).
    result = second.cli("restore", "account", BOB, "--into-folder", "Back")
    assert result.returncode == 0, result.stdout + result.stderr
    conn = _imap(third, BOB)
    try:
        typ, data = conn.status('"Back/INBOX"', "(MESSAGES)")
        assert typ == "OK" and b"MESSAGES 8" in data[0], data
    finally:
        conn.logout()
