"""Log compaction never outruns the backup (storage/reclaim.py): a real node
backing up to a local directory keeps every op the agent has not uploaded,
compacts once it has, and the agent's chain goes on across compactions and
restarts (no segment moved to diverged/)."""

from __future__ import annotations

import smtplib
import sqlite3
import time
from pathlib import Path

import pytest

from cluster.directory import EtcdDirectory
from cluster.etcd import EtcdSession
from storage import backup_crypto
from storage.backup_target import open_target
from tests.support.node import DOMAIN, USERS, NodeProcess, to_toml

pytestmark = pytest.mark.timeout(300)

ALICE = "alice@example.test"
DEADLINE = 90.0


def wait(what: str, check):
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def send(node: NodeProcess, n: int) -> None:
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=60) as smtp:
        assert smtp.sendmail("sender@remote.test", [ALICE],
                             b"Subject: kept %d\r\n\r\nbody %d\r\n" % (n, n)) == {}


def shard_path(node: NodeProcess) -> Path:
    for path in (node.data_dir / "mail" / "shards").glob("shard-*.sqlite"):
        with sqlite3.connect(path) as conn:
            if conn.execute("SELECT 1 FROM mailboxes WHERE account = ?", (ALICE,)).fetchone():
                return path
    raise AssertionError("no shard holds alice")


def log_span(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT min(idx), max(idx) FROM oplog").fetchone()


def uploaded(node: NodeProcess, number: int, since: float) -> int | None:
    session = EtcdSession([node.settings["etcd"]["embedded_client_url"]], "/postroom")
    try:
        records = session.get_prefix("/backup/")[0]
    finally:
        session.close()
    if len(records) != 1:
        return None  # a restarted agent has not published its status yet
    status = records[0].value
    row = status["shards"].get(str(number))
    return row["uploaded"][0] if status["ts"] > since and row and not row["error"] else None


def restart(node: NodeProcess, **backup: object) -> None:
    node.stop()
    node.settings["backup"].update(backup)
    node.config_path.write_text(to_toml(node.settings))
    node.start()


def test_compaction_keeps_what_the_backup_has_not_uploaded(tmp_path: Path) -> None:
    key_file = tmp_path / "backup.key"
    backup_crypto.generate_key_file(key_file)
    (tmp_path / "target").mkdir()
    backup = {"enabled": True, "target": f"file://{tmp_path}/target", "key_file": str(key_file),
              "segment_interval": 3600.0, "snapshot_interval": 3600.0}
    storage = {"log_keep_ops": 0, "compact_interval": 0.0, "blob_gc_interval": 0.0}
    node = NodeProcess(tmp_path / "node", {"backup": backup, "storage": storage})
    node.start()
    try:
        session = EtcdSession([node.settings["etcd"]["embedded_client_url"]], "/postroom")
        directory = EtcdDirectory(session)
        directory.add_domain(DOMAIN)
        directory.add_user(ALICE, USERS[ALICE])
        session.close()
        # segment_interval 3600: the agent ships nothing of these for an hour.
        for n in range(6):
            send(node, n)
        path = shard_path(node)
        number = int(path.stem.removeprefix("shard-"))
        first, last = log_span(path)
        assert node.cli("storage", "reclaim", "--settle", "0").returncode == 0
        assert log_span(path) == (first, last)  # the backup has none of it

        restart(node, segment_interval=0.5)
        since = time.time()
        wait("the backup to catch up", lambda: uploaded(node, number, since) == last)
        assert node.cli("storage", "reclaim", "--settle", "0").returncode == 0
        assert log_span(path) == (last, last)  # the op at the chain's tail stays
        send(node, 6)
        wait("a segment", lambda: uploaded(node, number, since) == last + 1)
        assert node.cli("storage", "reclaim", "--settle", "0").returncode == 0
        assert log_span(path) == (last + 1, last + 1)

        restart(node)  # the agent finds its tail (op last + 1) in the compacted log
        send(node, 7)
        since = time.time()
        wait("the upload after the restart", lambda: uploaded(node, number, since) == last + 2)
        cid = (node.data_dir / "node-id").read_text().strip()
        target = open_target(backup_settings(backup))
        assert not list(target.list(f"{cid}/shards/{number:04d}/diverged/"))
        assert "not in this node's log" not in node.log_tail(400)
    finally:
        node.stop()


def backup_settings(values: dict):
    from node.config import BackupSettings

    return BackupSettings(**{k: v for k, v in values.items()
                             if k in ("target", "key_file")})
