"""The backup agent in a real node, against a local directory and real S3 servers.

A node (tests/support/node.py) runs with ``[backup]`` (segment_interval
0.5 s) and takes mail over SMTP and IMAP; the objects it uploads are read
back with the target API and the object format (storage/backup_target.py,
storage/backup_crypto.py), independently of the agent's code.  The S3 runs
use moto's server (faithful S3) and, for the outage, ``rclone serve s3``
(restartable on the same port with its data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import imaplib
import json
import smtplib
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cluster.directory import EtcdDirectory
from cluster.etcd import EtcdSession
from node import cli
from node.config import BackupSettings
from storage import backup_crypto
from storage.backup_target import open_target
from tests.support.node import DOMAIN, USERS, NodeProcess, to_toml
from tests.support.s3 import moto_server, rclone_server

pytestmark = pytest.mark.timeout(300)

ALICE, BOB = "alice@example.test", "bob@example.test"
DEADLINE = 90.0  # generous: a loaded 2-CPU machine; waits end as soon as done


def _node(base: Path, settings: BackupSettings, **extra: object) -> NodeProcess:
    backup = {k: v for k, v in dataclasses.asdict(settings).items() if v not in ("", None)}
    backup.update(enabled=True, segment_interval=0.5, snapshot_interval=3600.0)
    backup.update(extra)
    return NodeProcess(base / "node", {"backup": backup})


@pytest.fixture(params=["local", "s3"])
def backed_up(request, tmp_path: Path) -> Iterator[tuple[NodeProcess, BackupSettings]]:
    """A provisioned node backing up to a local directory or to moto's S3."""
    key_file = tmp_path / "backup.key"
    backup_crypto.generate_key_file(key_file)
    if request.param == "local":
        (tmp_path / "target").mkdir()
        settings = BackupSettings(target=f"file://{tmp_path}/target", key_file=str(key_file))
        with _running(tmp_path, settings) as running:
            yield running
        return
    with moto_server() as server:
        settings = server.settings("backups", "pr", key_file=str(key_file))
        open_target(settings).create_bucket()
        with _running(tmp_path, settings) as running:
            yield running


@contextmanager
def _running(base: Path, settings: BackupSettings, **extra: object
             ) -> Iterator[tuple[NodeProcess, BackupSettings]]:
    node = _node(base, settings, **extra)
    node.start()
    try:
        directory = EtcdDirectory(_session(node))  # in-process: no CLI start-up per user
        directory.add_domain(DOMAIN)
        for address, password in USERS.items():
            directory.add_user(address, password)
        yield node, settings
    finally:
        node.stop()


def _session(node: NodeProcess) -> EtcdSession:
    return EtcdSession([node.settings["etcd"]["embedded_client_url"]], "/postroom")


def _agent_status(node: NodeProcess) -> dict:
    records, _ = _session(node).get_prefix("/backup/")
    assert len(records) == 1, records
    return records[0].value


def _wait(what: str, check, deadline: float = DEADLINE):
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def _caught_up(node: NodeProcess, shards: set[int]):
    """The agent's status once every shard in ``shards`` is wholly uploaded
    (a report written after this call began)."""
    since = time.time()
    return lambda: _fully_uploaded(node, shards, since)


def _fully_uploaded(node: NodeProcess, shards: set[int], since: float):
    status = _agent_status(node)
    if status["ts"] <= since:
        return False
    rows = status["shards"]
    if not shards <= {int(n) for n in rows} or not status["target_ok"]:
        return None
    for n in shards:
        row = rows[str(n)]
        if row.get("error") or row["uploaded"][0] != row["committed"][0] or row["lag_s"] != 0:
            return None
        if not row.get("last_snapshot"):
            return None
    return status


def _send(node: NodeProcess, subject: str, rcpts=(ALICE, BOB), body: str = "") -> None:
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=60) as smtp:
        text = body or f"{subject} body\r\n"
        refused = smtp.sendmail("sender@remote.test", list(rcpts),
                                f"Subject: {subject}\r\n\r\n{text}".encode())
        assert refused == {}


def _flag_and_expunge(node: NodeProcess, flag: bool = True) -> None:
    """Alice's message 2 flagged (if ``flag``), message 1 expunged."""
    imap = imaplib.IMAP4(node.host, node.ports["imap"])
    try:
        imap.login(ALICE, USERS[ALICE])
        imap.select("INBOX")
        assert not flag or imap.store("2", "+FLAGS", "(\\Flagged)")[0] == "OK"
        assert imap.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert imap.expunge()[0] == "OK"
    finally:
        imap.logout()


def _shard_of(node: NodeProcess, account: str) -> int:
    for path in (node.data_dir / "mail" / "shards").glob("shard-*.sqlite"):
        with sqlite3.connect(path) as conn:
            if conn.execute("SELECT 1 FROM mailboxes WHERE account = ?", (account,)).fetchone():
                return int(path.stem.removeprefix("shard-"))
    raise AssertionError(f"no shard holds {account}")


def _oplog_last(node: NodeProcess, shard: int) -> int:
    path = node.data_dir / "mail" / "shards" / f"shard-{shard:04d}.sqlite"
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT max(idx) FROM oplog").fetchone()[0]


def _check_chain(target, key, cid: str, shard: int, upto: int) -> list[list]:
    """Segments of a shard: contiguous, hash-linked, after a snapshot, up to ``upto``."""
    head = f"{cid}/shards/{shard:04d}/"
    snaps = [i.key for i in target.list(head + "snap/")]
    segs = sorted(i.key for i in target.list(head + "seg/"))
    assert snaps, f"no snapshot of shard {shard}"
    snap_header, _ = backup_crypto.open_object(key, target.get(snaps[0]))
    assert snap_header.kind == "snapshot" and snap_header.key_id == key.key_id
    base = snap_header.meta["last_index"]
    assert int(snaps[0].rsplit("/", 1)[1]) == base
    expected_first, prev_key, prev_sha, ops = base + 1, None, None, []
    for seg in segs:
        data = target.get(seg)
        header, plain = backup_crypto.open_object(key, data)
        lines = [json.loads(line) for line in plain.splitlines()]
        meta = header.meta
        assert meta["first"] == expected_first == lines[0][0], seg
        assert [ln[0] for ln in lines] == list(range(meta["first"], meta["last"] + 1))
        assert (meta["prev"], meta["prev_sha256"]) == (prev_key, prev_sha), seg
        expected_first = meta["last"] + 1
        prev_key, prev_sha = seg, hashlib.sha256(data).hexdigest()
        ops += lines
    assert expected_first - 1 == upto, f"shard {shard}: uploaded up to {expected_first - 1}"
    return ops


def _verify(node: NodeProcess, capsys) -> tuple[int, str]:
    """``postroom backup verify`` in this process (the subprocess runs are
    the status, list and deep verify): (exit status, stdout)."""
    capsys.readouterr()
    code = cli.main(["--config", str(node.config_path), "backup", "verify"])
    return code, capsys.readouterr().out


def test_objects_chain_and_verify(backed_up, capsys) -> None:
    node, settings = backed_up
    _send(node, "first")
    shards = {_shard_of(node, ALICE), _shard_of(node, BOB)}
    _wait("the first snapshots", _caught_up(node, shards))
    _send(node, "second")  # from here on, in segments after the snapshots
    _flag_and_expunge(node)
    _wait("the backup to catch up", _caught_up(node, shards))

    target = open_target(settings)
    key = backup_crypto.load_key(settings.key_file)
    cid = (node.data_dir / "node-id").read_text().strip()
    # Blobs: each message once (two recipients, one blob), named by its SHA-256.
    blob_keys = [i.key for i in target.list(f"{cid}/blobs/")]
    local = {p.name for p in (node.data_dir / "mail" / "blobs").rglob("*")
             if p.is_file() and len(p.name) == 64}
    assert sorted(k.rsplit("/", 1)[1] for k in blob_keys) == sorted(local)
    assert len(local) == 2
    for blob in blob_keys:
        header, plain = backup_crypto.open_object(key, target.get(blob))
        assert header.kind == "blob" and hashlib.sha256(plain).hexdigest() == blob[-64:]
    # Segments: contiguous and chained from the first snapshot to the log's end;
    # the flag change and the expunge are in alice's shard's segments or snapshot.
    ops = []
    for shard in shards:
        ops += _check_chain(target, key, cid, shard, _oplog_last(node, shard))
    assert [i.key for i in target.list(f"{cid}/etcd/")], "no etcd export"
    names = {op[3] for op in ops}
    assert {"append", "store_flags", "expunge"} <= names, names

    status = node.cli("backup", "status")
    assert status.returncode == 0, status.stderr
    assert "target ok" in status.stdout and "0.0s" in status.stdout
    listing = node.cli("backup", "list")
    assert listing.returncode == 0 and "point-in-time window" in listing.stdout, listing.stderr
    deep = node.cli("backup", "verify", "--deep")
    assert deep.returncode == 0, deep.stdout + deep.stderr
    assert "100.0%" in deep.stderr and "/s" in deep.stderr  # the progress bar

    node.stop()  # nothing changes the target from here on
    segs = sorted(i.key for s in shards for i in target.list(f"{cid}/shards/{s:04d}/seg/"))
    victim = segs[0]
    original = target.get(victim)
    flipped = bytearray(original)
    flipped[-5] ^= 0x01  # in the final chunk's GCM tag
    assert _verify(node, capsys)[0] == 0
    target.put(victim, bytes(flipped))
    code, out = _verify(node, capsys)
    assert code == 1 and f"{victim}: damaged" in out, out
    target.put(victim, original)

    referenced = {op[4]["blob"] for op in ops if isinstance(op[4].get("blob"), str)}
    gone = next(k for k in blob_keys if k[-64:] in referenced)
    target.delete([gone])
    code, out = _verify(node, capsys)
    assert code == 1 and f"{gone}: missing; referenced by {cid}/shards/" in out, out


def test_outage_keeps_mail_flowing_and_lag_recovers(tmp_path: Path, capsys) -> None:
    """rclone's S3 stops: SMTP still answers 250, the lag grows and is
    reported; once it is back the agent catches up (lag 0)."""
    key_file = tmp_path / "backup.key"
    backup_crypto.generate_key_file(key_file)
    with rclone_server(tmp_path / "s3data") as server:
        settings = server.settings("backups", "pr", key_file=str(key_file))
        open_target(settings).create_bucket()
        with _running(tmp_path, settings) as (node, _settings):
            _send(node, "before")
            shards = {_shard_of(node, ALICE), _shard_of(node, BOB)}
            _wait("the first upload", _caught_up(node, shards))
            server.stop()
            _send(node, "during the outage")  # sendmail asserts 250 for both

            def lagging():
                s = _agent_status(node)
                lags = [s["shards"][str(n)]["lag_s"] for n in shards]
                return s if not s["target_ok"] and min(lags) > 1.0 else None
            down = _wait("the lag to be reported", lagging)
            assert down["last_error"]
            shown = node.cli("backup", "status")
            assert "UNREACHABLE" in shown.stdout, shown.stdout + shown.stderr
            server.start()
            _wait("the backup to catch up after the outage",
                  _caught_up(node, shards))
            assert _verify(node, capsys)[0] == 0


def _snapshots(target, cid: str, shard: int) -> list[int]:
    return [int(i.key.rsplit("/", 1)[1]) for i in target.list(f"{cid}/shards/{shard:04d}/snap/")]


def test_restart_moves_a_diverged_tail_aside_then_retention(tmp_path: Path, capsys) -> None:
    """A restarted agent continues the chain, moving aside a tail that is not
    in its log; retention then keeps the newest snapshot before the window and
    what follows it, and drops the blob only older objects referenced."""
    key_file = tmp_path / "backup.key"
    backup_crypto.generate_key_file(key_file)
    (tmp_path / "target").mkdir()
    settings = BackupSettings(target=f"file://{tmp_path}/target", key_file=str(key_file))
    key = backup_crypto.load_key(key_file)
    target = open_target(settings)
    with _running(tmp_path, settings, snapshot_interval=1.0) as (node, _):
        cid = (node.data_dir / "node-id").read_text().strip()
        _send(node, "gone soon", [ALICE])
        shard = _shard_of(node, ALICE)
        _wait("the first upload", _caught_up(node, {shard}))
        _flag_and_expunge(node, flag=False)  # message 1 (the only one) expunged
        _send(node, "stays", [ALICE])
        big = ("x" * 78 + "\r\n") * ((9 << 20) // 80)  # above STREAM_BLOB: sealed file to file
        _send(node, "big", [ALICE], big)
        last, uploaded = _oplog_last(node, shard), _caught_up(node, {shard})
        _wait("a snapshot after the expunge",
              lambda: max(_snapshots(target, cid, shard)) >= last and uploaded())
    local = {p.name for p in (node.data_dir / "mail" / "blobs").rglob("*") if len(p.name) == 64}
    with sqlite3.connect(node.data_dir / "mail" / "shards" / f"shard-{shard:04d}.sqlite") as db:
        kept = {b for (b,) in db.execute("SELECT blob FROM messages")}
    (expunged,) = local - kept

    # A tail the log does not hold (as after restoring the cluster to an
    # earlier point): sealed with our key, chained to the real tail.
    segs = sorted(i.key for i in target.list(f"{cid}/shards/{shard:04d}/seg/"))
    tail = target.get(segs[-1])
    tail_last = int(segs[-1][-12:])
    fake_key = f"{cid}/shards/{shard:04d}/seg/{tail_last + 1:012d}-{tail_last + 5:012d}"
    lines = b"".join(json.dumps([i, 99, time.time(), "noop", {}]).encode() + b"\n"
                     for i in range(tail_last + 1, tail_last + 6))
    meta = {"shard": shard, "first": tail_last + 1, "last": tail_last + 5, "prev": segs[-1],
            "prev_sha256": hashlib.sha256(tail).hexdigest()}
    target.put(fake_key, backup_crypto.seal(key, "segment", lines, meta))

    with _running_again(node, snapshot_interval=3600.0):
        _send(node, "after the restart", [ALICE])
        _wait("the upload after the restart", _caught_up(node, {shard}))
        assert fake_key not in [i.key for i in target.list(f"{cid}/shards/")]
        aside = [i.key for i in target.list(f"{cid}/shards/{shard:04d}/diverged/")]
        assert len(aside) == 1 and aside[0].endswith(fake_key.rsplit("/", 1)[1]), aside
        assert "not in this node's log" in node.log_tail(200)
        (following,) = [i.key for i in target.list(f"{cid}/shards/{shard:04d}/seg/")
                        if int(i.key[-25:-13]) == tail_last + 1]
        header, _ = backup_crypto.open_object(key, target.get(following))
        assert header.meta["prev"] == segs[-1]  # the chain continued, no new start
    code, out = _verify(node, capsys)
    assert code == 0, out

    from storage import backup

    snaps = _snapshots(target, cid, shard)
    assert len(snaps) >= 2
    report = backup.prune(backup.Sealer(target, key), None, cid, 1, now=time.time() + 2 * 86400)
    assert not report.errors, report.errors
    assert _snapshots(target, cid, shard) == [max(snaps)]
    assert report.deleted_segments
    assert [i.key for i in target.list(f"{cid}/shards/{shard:04d}/seg/")] == [following]
    assert aside[0] in report.deleted_segments  # diverged/ leaves with the window
    assert not list(target.list(f"{cid}/shards/{shard:04d}/diverged/"))
    stored = {i.key[-64:] for i in target.list(f"{cid}/blobs/")}
    assert expunged not in stored and kept <= stored
    code, out = _verify(node, capsys)  # the first retained segment rests on the snapshot
    assert code == 0, out


@contextmanager
def _running_again(node: NodeProcess, **backup: object) -> Iterator[NodeProcess]:
    """Restart a stopped node (same data) with some [backup] settings changed."""
    node.settings["backup"].update(backup)
    node.config_path.write_text(to_toml(node.settings))
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_keygen_writes_a_private_key_once(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("POSTROOM_CONFIG", raising=False)
    path = tmp_path / "backup.key"
    assert cli.main(["backup", "keygen", str(path)]) == 0
    key = backup_crypto.load_key(path)  # refuses group/world-readable files
    assert key.key_id in capsys.readouterr().out
    assert path.stat().st_mode & 0o777 == 0o600
    assert cli.main(["backup", "keygen", str(path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert backup_crypto.load_key(path) == key
