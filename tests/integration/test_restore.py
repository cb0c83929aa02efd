"""Restores from a real backup of a real node (storage/restore.py, node/backupcli.py).

One single-node postroom process (tests/support/node.py, embedded etcd)
backs up to a local-directory target every 0.5 s (storage/backup.py).  Mail
goes in by SMTP, flags and expunges by IMAP; the tests wait until the
target holds every committed op (the newest segment of each shard ends at
the shard database's last op), then restore with the ``postroom`` CLI:

- disaster recovery: stop the node, wipe its data directory (embedded etcd
  included), ``restore cluster``, start: same shard digests, same
  UIDVALIDITY/UIDs/flags over IMAP, expunged mail gone, logins work;
- point in time: one account to a moment between two deliveries, into a
  new folder (exactly the messages before that moment, flags kept);
- in place: a mailbox back to an earlier state with its UIDVALIDITY, UIDs
  and flags (a message delivered since is expunged, HIGHESTMODSEQ grows);
- a wrong key, ``--at`` outside the window, a damaged segment and a missing
  blob (exactly those reported, exit 2, everything else restored), and a
  restore drill against the live node.

The tests share the node and run in file order.
"""

from __future__ import annotations

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
from storage.shard import Shard
from tests.support.node import USERS, NodeProcess

ALICE, BOB = "alice@example.test", "bob@example.test"
DEADLINE = 60.0
FETCH_RE = re.compile(rb"UID (\d+) FLAGS \(([^)]*)\)")


# -- fixtures and helpers ------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("restore")
    key = base / "backup.key"
    backup_crypto.generate_key_file(key)
    target = base / "target"
    target.mkdir()
    return {"base": base, "key": key, "target": target}


def _backup(env: dict, target: Path | None = None, key: Path | None = None) -> dict:
    return {"backup": {"enabled": True, "target": f"file://{target or env['target']}",
                       "key_file": str(key or env["key"]), "segment_interval": 0.5,
                       "snapshot_interval": 3600.0}}


@pytest.fixture(scope="module")
def node(env: dict):
    proc = NodeProcess(env["base"] / "node", _backup(env))
    proc.start()
    try:
        proc.provision()
        _wait_chains_started(proc, env)
        yield proc
    finally:
        proc.stop()


def _wait_chains_started(node: NodeProcess, env: dict) -> None:
    """Until every shard that exists has its backup chain's base snapshot in the
    target, so that the mail the tests send reaches it as segments (a chain
    started after the mail would hold it all in its snapshot, and the
    damaged-segment test needs segments), whatever the agent's timing."""
    cid = _cid(node)
    deadline = time.monotonic() + DEADLINE

    def unstarted() -> list[int]:
        shards = [int(db.stem.removeprefix("shard-"))
                  for db in (node.data_dir / "mail" / "shards").glob("shard-*.sqlite")]
        return [n for n in shards
                if not any((env["target"] / cid / "shards" / f"{n:04d}" / "snap").glob("*"))]

    while (late := unstarted()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not late, f"no backup chain for shards {late}\n{node.log_tail()}"


def _send(node: NodeProcess, rcpt: str, subject: str) -> None:
    body = (f"From: sender@remote.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@remote.test>\r\n\r\n{subject} body\r\n")
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=30) as smtp:
        smtp.sendmail("sender@remote.test", [rcpt], body.encode())


def _imap(node: NodeProcess, user: str) -> imaplib.IMAP4:
    conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    conn.login(user, USERS[user])
    return conn


def _view(node: NodeProcess, user: str, mailbox: str = "INBOX") -> dict:
    """{uidvalidity, messages: {uid: (subject, flags)}} of a mailbox over IMAP."""
    conn = _imap(node, user)
    try:
        typ, data = conn.status(f'"{mailbox}"', "(UIDVALIDITY HIGHESTMODSEQ)")
        assert typ == "OK", data
        uidvalidity = int(re.search(rb"UIDVALIDITY (\d+)", data[0])[1])
        modseq = int(re.search(rb"HIGHESTMODSEQ (\d+)", data[0])[1])
        conn.select(f'"{mailbox}"', readonly=True)
        typ, data = conn.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        messages = {}
        for item in data:
            if isinstance(item, tuple):
                m = FETCH_RE.search(item[0])
                subject = item[1].decode().split(":", 1)[1].strip()
                messages[int(m[1])] = (subject, frozenset(m[2].decode().split()))
        return {"uidvalidity": uidvalidity, "highestmodseq": modseq, "messages": messages}
    finally:
        conn.logout()


def _count(node: NodeProcess, user: str) -> int:
    """Messages in every mailbox of the user (IMAP LIST + STATUS)."""
    conn = _imap(node, user)
    try:
        total = 0
        for line in conn.list()[1]:
            name = re.search(rb'"([^"]*)"$|(\S+)$', line)
            box = (name[1] or name[2]).decode()
            total += int(re.search(rb"MESSAGES (\d+)", conn.status(f'"{box}"', "(MESSAGES)")[1][0])[1])
        return total
    finally:
        conn.logout()


def _uid_of(node: NodeProcess, user: str, subject: str) -> int:
    found = [u for u, (s, _) in _view(node, user)["messages"].items() if s == subject]
    assert len(found) == 1, (subject, found)
    return found[0]


def _store(node: NodeProcess, user: str, uid: int, change: str, flags: str) -> None:
    conn = _imap(node, user)
    try:
        conn.select("INBOX")
        assert conn.uid("STORE", str(uid), change, f"({flags})")[0] == "OK"
        if "Deleted" in flags:
            assert conn.expunge()[0] == "OK"
    finally:
        conn.logout()


def _last_index(db: Path) -> int:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT value FROM shard_meta WHERE key = 'last_index'").fetchone()
    return row[0] if row else 0


def _cid(node: NodeProcess) -> str:
    return (node.data_dir / "node-id").read_text().strip()


def _segments(target: Path, cid: str, shard: int) -> list[Path]:
    return sorted((target / cid / "shards" / f"{shard:04d}" / "seg").glob("*"))


def _wait_backed_up(node: NodeProcess, env: dict) -> None:
    """Until every shard's newest segment in the target ends at its last op."""
    cid = _cid(node)
    deadline = time.monotonic() + DEADLINE

    def behind() -> list[str]:
        late = []
        for db in sorted((node.data_dir / "mail" / "shards").glob("shard-*.sqlite")):
            shard = int(db.stem.removeprefix("shard-"))
            segs = _segments(env["target"], cid, shard)
            uploaded = int(segs[-1].name.split("-")[1]) if segs else 0
            if uploaded != _last_index(db):
                late.append(f"shard {shard}: {uploaded} of {_last_index(db)}")
        return late

    while (late := behind()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not late, f"backup behind: {late}\n{node.log_tail()}"


def _digests(data_dir: Path) -> dict[int, tuple]:
    out = {}
    for db in sorted((data_dir / "mail" / "shards").glob("shard-*.sqlite")):
        shard = Shard(db, fsync=False)
        out[int(db.stem.removeprefix("shard-"))] = shard.state_digest()
    return out


def _moment() -> float:
    """A time strictly between what was logged before and what comes after."""
    time.sleep(0.05)
    at = time.time()
    time.sleep(0.05)
    return at


# -- disaster recovery ---------------------------------------------------------


def test_disaster_recovery_single_node(node: NodeProcess, env: dict) -> None:
    for i in range(6):
        _send(node, ALICE, f"dr-a{i}")
    for i in range(3):
        _send(node, BOB, f"dr-b{i}")
    _store(node, ALICE, _uid_of(node, ALICE, "dr-a0"), "+FLAGS", "\\Flagged \\Seen")
    _store(node, ALICE, _uid_of(node, ALICE, "dr-a1"), "+FLAGS", "$Work")
    _store(node, ALICE, _uid_of(node, ALICE, "dr-a2"), "+FLAGS", "\\Deleted")
    _store(node, BOB, _uid_of(node, BOB, "dr-b0"), "+FLAGS", "\\Deleted")
    before = {user: _view(node, user) for user in (ALICE, BOB)}
    assert "dr-a2" not in {s for s, _ in before[ALICE]["messages"].values()}
    _wait_backed_up(node, env)
    cid = _cid(node)
    node.stop()
    digests = _digests(node.data_dir)

    shutil.rmtree(node.data_dir)  # the shards, the blobs, the embedded etcd, the node id
    result = node.cli("restore", "cluster")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOST" not in result.stdout
    assert (node.data_dir / "node-id").read_text().strip() == cid
    assert _digests(node.data_dir) == digests  # same positions, same state tables

    node.start()
    for user in (ALICE, BOB):  # logins (directory from etcd), UIDs, flags
        assert _view(node, user)["uidvalidity"] == before[user]["uidvalidity"]
        assert _view(node, user)["messages"] == before[user]["messages"]
    _send(node, BOB, "dr-after")  # the restored node takes mail
    assert "dr-after" in {s for s, _ in _view(node, BOB)["messages"].values()}


# -- point in time, new folder -----------------------------------------------------


def test_point_in_time_account_into_folder(node: NodeProcess, env: dict) -> None:
    _send(node, BOB, "pit-1")
    _store(node, BOB, _uid_of(node, BOB, "pit-1"), "+FLAGS", "\\Answered")
    at = _moment()
    _send(node, BOB, "pit-2")
    _store(node, BOB, _uid_of(node, BOB, "dr-b1"), "+FLAGS", "\\Deleted")
    _wait_backed_up(node, env)
    live = {s: f for s, f in _view(node, BOB)["messages"].values()}

    result = node.cli("restore", "account", BOB, "--at", f"{at:.6f}")
    assert result.returncode == 0, result.stdout + result.stderr
    folder = time.strftime("Restored %Y-%m-%d", time.gmtime(at)) + "/INBOX"
    restored = {s: f for s, f in _view(node, BOB, folder)["messages"].values()}
    # Exactly bob's INBOX at `at`: dr-b1 still there, pit-2 not yet, flags as then.
    assert set(restored) == {"dr-b1", "dr-b2", "dr-after", "pit-1"}
    assert restored["pit-1"] == frozenset({"\\Answered"})
    assert {s: f for s, f in live.items() if s in restored} == \
        {s: f for s, f in restored.items() if s in live}
    assert "pit-2" in live and "dr-b1" not in live  # the live mailbox is untouched


# -- in place ---------------------------------------------------------------------------


def test_in_place_mailbox_restore(node: NodeProcess, env: dict) -> None:
    _wait_backed_up(node, env)
    then = _view(node, ALICE)
    at = _moment()
    _store(node, ALICE, _uid_of(node, ALICE, "dr-a3"), "+FLAGS", "\\Deleted")
    _store(node, ALICE, _uid_of(node, ALICE, "dr-a0"), "-FLAGS", "\\Flagged")
    _store(node, ALICE, _uid_of(node, ALICE, "dr-a4"), "+FLAGS", "\\Seen")
    _send(node, ALICE, "inplace-new")
    changed = _view(node, ALICE)
    assert changed["messages"] != then["messages"]

    result = node.cli("restore", "mailbox", ALICE, "INBOX", "--in-place", "--at", f"{at:.6f}")
    assert result.returncode == 0, result.stdout + result.stderr
    now = _view(node, ALICE)
    assert now["uidvalidity"] == then["uidvalidity"]
    assert now["messages"] == then["messages"]  # UIDs, subjects and flags of `at`
    assert now["highestmodseq"] > changed["highestmodseq"]  # clients resync


def test_in_place_restore_of_a_recreated_mailbox(node: NodeProcess, env: dict) -> None:
    conn = _imap(node, ALICE)
    try:
        assert conn.create("Projects")[0] == "OK"
        for i, flags in enumerate(("(\\Seen)", "($Plan)")):
            msg = f"Subject: proj-{i}\r\nMessage-ID: <proj-{i}@x>\r\n\r\nplan {i}\r\n"
            assert conn.append("Projects", flags, None, msg.encode())[0] == "OK"
    finally:
        conn.logout()
    _wait_backed_up(node, env)
    then = _view(node, ALICE, "Projects")
    at = _moment()
    conn = _imap(node, ALICE)
    try:  # deleted and made again: another UIDVALIDITY, other mail
        assert conn.delete("Projects")[0] == "OK"
        assert conn.create("Projects")[0] == "OK"
        assert conn.append("Projects", "()", None, b"Subject: other\r\n\r\nx\r\n")[0] == "OK"
    finally:
        conn.logout()
    assert _view(node, ALICE, "Projects")["uidvalidity"] != then["uidvalidity"]

    result = node.cli("restore", "account", ALICE, "--mailbox", "Projects", "--in-place",
                      "--at", f"{at:.6f}")
    assert result.returncode == 0, result.stdout + result.stderr
    now = _view(node, ALICE, "Projects")
    assert now["uidvalidity"] == then["uidvalidity"]  # the backup's incarnation
    assert now["messages"] == then["messages"]
    assert set(then["messages"].values()) == {("proj-0", frozenset({"\\Seen"})),
                                              ("proj-1", frozenset({"$Plan"}))}


# -- errors -------------------------------------------------------------------------------


def _other_config(node: NodeProcess, env: dict, name: str, **backup: str) -> Path:
    """node's configuration with other [backup] settings."""
    text = node.config_path.read_text()
    for key, value in backup.items():
        text = re.sub(rf'(?m)^{key} = .*$', f'{key} = "{value}"', text)
    path = env["base"] / name
    path.write_text(text)
    return path


def _cli(node: NodeProcess, config: Path, *args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "node", "--config", str(config), *args],
                          capture_output=True, text=True, env=node.env, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[2]))


def test_wrong_key_is_named(node: NodeProcess, env: dict) -> None:
    other = env["base"] / "other.key"
    backup_crypto.generate_key_file(other)
    config = _other_config(node, env, "wrong-key.toml", key_file=str(other))
    result = _cli(node, config, "restore", "account", ALICE)
    assert result.returncode == 1
    ours = backup_crypto.load_key(env["key"]).key_id
    theirs = backup_crypto.load_key(other).key_id
    assert "wrong backup key" in result.stderr
    assert ours in result.stderr and theirs in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_bucket_and_at_outside_window(node: NodeProcess, env: dict) -> None:
    config = _other_config(node, env, "no-dir.toml", target=f"file://{env['base']}/nowhere")
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    missing, outside = node.cli_batch(  # one CLI process (node.cli.main per command)
        [(["--config", str(config), "restore", "account", ALICE], ""),
         (["--config", str(node.config_path), "restore", "account", ALICE, "--at", future], "")])
    assert missing["rc"] == 1 and "nowhere" in missing["stderr"], missing["stderr"]
    assert outside["rc"] == 1
    assert "outside the backup's point-in-time window" in outside["stderr"], outside["stderr"]
    assert "Traceback" not in outside["stderr"]


# -- drill -------------------------------------------------------------------------------


def test_drill_restore(node: NodeProcess, env: dict) -> None:
    _wait_backed_up(node, env)
    result = node.cli("drill", "restore", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and not report["violations"] and not report["lost"]
    assert report["messages"] == sum(_count(node, u) for u in (ALICE, BOB))
    assert report["bytes"] > 0 and report["rpo_seconds"] >= 0


# -- damage ------------------------------------------------------------------------------


def test_damaged_segment_and_missing_blob(node: NodeProcess, env: dict) -> None:
    _wait_backed_up(node, env)
    cid = _cid(node)
    copy = env["base"] / "damaged"
    shutil.copytree(env["target"], copy)
    shards = {int(p.name): _segments(copy, cid, int(p.name))
              for p in (copy / cid / "shards").iterdir()}
    victim = max(shards, key=lambda n: len(shards[n]))
    segs = shards[victim]
    assert len(segs) >= 3
    bad = segs[len(segs) // 2]  # a segment in the middle of the chain
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0x40
    bad.write_bytes(bytes(data))
    first_lost = int(bad.name.split("-")[0])
    # A blob of a message of another shard, delivered before the damage.
    other = next(n for n in shards if n != victim)
    db = node.data_dir / "mail" / "shards" / f"shard-{other:04d}.sqlite"
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        account, name, uid, blob = conn.execute(
            "SELECT b.account, b.name, m.uid, m.blob FROM messages m JOIN mailboxes b"
            " ON b.uidvalidity = m.mailbox ORDER BY m.uid LIMIT 1").fetchone()
    (copy / cid / "blobs" / blob[:2] / blob).unlink()

    fresh = NodeProcess(env["base"] / "fresh", _backup(env, copy))
    result = fresh.cli("restore", "cluster", "--cluster-id", cid)
    assert result.returncode == 2, result.stdout + result.stderr
    lost = [line for line in result.stdout.splitlines() if line.startswith("LOST")]
    rel = str(bad.relative_to(copy))
    last = int(segs[-1].name.split("-")[1])
    assert len(lost) == 3, lost
    assert lost[0] == f"LOST shard {victim:04d}: {rel}: damaged (chunk 0 of 1 failed authentication)"
    assert lost[1].startswith(f"LOST shard {victim:04d}: operations {first_lost}..{last} (after ")
    assert lost[2] == f"LOST message {account}/{name} uid {uid}: blob {blob[:12]}… missing"
    restored = fresh.data_dir / "mail"
    assert _last_index(restored / "shards" / f"shard-{victim:04d}.sqlite") == first_lost - 1
    for n, n_segs in shards.items():  # every other shard whole
        if n != victim:
            whole = int(n_segs[-1].name.split("-")[1])
            assert _last_index(restored / "shards" / f"shard-{n:04d}.sqlite") == whole
    assert not (restored / "blobs" / blob[:2] / blob[2:4] / blob).exists()
    assert sum(1 for p in (restored / "blobs").rglob("*") if p.is_file()) > 1

    # The catalog's chain check names the same object and range.
    from storage.backup_target import LocalTarget
    from storage.restore import Catalog

    chain = Catalog(LocalTarget(copy), backup_crypto.load_key(env["key"]), cid).verify_chain(victim)
    assert chain.problems == [lost[0].split(": ", 1)[1]]
    assert chain.lost == (first_lost, last) and chain.last == first_lost - 1

    # A drill against that backup fails (lost objects), naming them.
    config = _other_config(node, env, "damaged.toml", target=f"file://{copy}")
    drill = _cli(node, config, "drill", "restore", "--json")
    assert drill.returncode == 1, drill.stdout + drill.stderr
    report = json.loads(drill.stdout)
    assert not report["ok"] and not report["violations"]
    assert any(rel in line for line in report["lost"])
    assert any(f"{account}/{name} uid {uid}" in line for line in report["lost"])
    assert report["newer_live"] > 0  # what the lost segments held is only live now


def test_damaged_snapshot(node: NodeProcess, env: dict) -> None:
    """A damaged snapshot: the shard comes back from the log when the chain
    starts at op 1; else the ops before the chain are lost and so is the
    shard (each reported), and the other shards are whole."""
    _wait_backed_up(node, env)
    cid = _cid(node)
    copy = env["base"] / "bad-snapshot"
    shutil.copytree(env["target"], copy)
    for shard in range(4):  # every shard's only snapshot
        for snap in (copy / cid / "shards" / f"{shard:04d}" / "snap").glob("*"):
            data = bytearray(snap.read_bytes())
            data[len(data) // 2] ^= 0x01
            snap.write_bytes(bytes(data))

    fresh = NodeProcess(env["base"] / "fresh-2", _backup(env, copy))
    result = fresh.cli("restore", "cluster", "--cluster-id", cid)
    assert result.returncode == 2, result.stdout + result.stderr
    lost = [line for line in result.stdout.splitlines() if line.startswith("LOST")]
    expected = []
    for shard in sorted(int(p.name) for p in (copy / cid / "shards").iterdir()):
        segs = _segments(copy, cid, shard)
        snaps = sorted((copy / cid / "shards" / f"{shard:04d}" / "snap").glob("*"))
        held = int(snaps[-1].name)  # ops the snapshot held
        expected += [f"LOST shard {shard:04d}: {s.relative_to(copy)}: damaged (chunk 0 of 1"
                     " failed authentication)" for s in snaps]
        db = fresh.data_dir / "mail" / "shards" / f"shard-{shard:04d}.sqlite"
        live = node.data_dir / "mail" / "shards" / f"shard-{shard:04d}.sqlite"
        first = int(segs[0].name.split("-")[0]) if segs else held + 1
        last = int(segs[-1].name.split("-")[1]) if segs else held
        if first == 1:  # rebuilt from the log: the live state
            assert Shard(db, fsync=False).state_digest() == Shard(live, fsync=False).state_digest()
        elif segs:  # the ops before the chain are gone, and with them the rest
            expected += [f"LOST shard {shard:04d}: {cid}/shards/{shard:04d}/seg: ops 1..{first - 1}"
                         " missing",
                         f"LOST shard {shard:04d}: operations 1..{last} (after the beginning)"
                         " are not restored"]
            assert _last_index(db) == 0
        elif held:  # only the snapshot held them
            expected.append(f"LOST shard {shard:04d}: operations 1..{held} (after the"
                            " beginning) are not restored")
            assert _last_index(db) == 0
    assert lost == expected
