"""`postroom queue ...` against a running process serving the admin socket.

The serving process is a small gevent program that runs the real
OutboundQueue and AdminServer over a data directory laid out like a node's
(`data_dir/mail`, `data_dir/admin.sock`); the CLI is the real console command
in its own process.  The node-level test (test_queue_node.py) does the same
against `postroom serve`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gevent
import pytest

from node.admin import AdminClient, NodeNotRunning
from storage.model import PENDING, QueuedRecipient, RecipientResult
from storage.queue import OutboundQueue
from tests.support.node import REPO, to_toml
from tests.unit.storage.storage_testlib import open_store

SHARDS = 4
DEADLINE = 30.0

SERVER = textwrap.dedent("""
    from node.launch import patch
    patch()  # gevent monkey-patching, as `postroom` does
    import signal, sys
    from pathlib import Path
    import gevent
    from node.admin import AdminServer
    from storage.mailstore import MailStore
    from storage.queue import OutboundQueue

    data_dir, shards = Path(sys.argv[1]), int(sys.argv[2])
    store = MailStore(data_dir / "mail", shards)
    store.open()
    wakes = open(data_dir / "wakes", "a", buffering=1)
    server = AdminServer(data_dir / "admin.sock", OutboundQueue(store),
                         lambda: wakes.write("wake\\n"))
    server.start()
    done = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, done.set)
    done.wait()
    server.stop()
    store.close()
""")

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
           b"Subject: stuck in the queue\r\nMessage-ID: <q1@example.test>\r\n\r\nhello\r\n")


def until(predicate, what: str):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (tmp_path / "postroom.toml").write_text(
        to_toml({"node": {"data_dir": str(d)}, "storage": {"shards": SHARDS}}))
    return d


def seed(data_dir: Path) -> dict[str, str]:
    """Three entries: one deferred with a reply, one held, one from another sender."""
    with open_store(data_dir / "mail", shards=SHARDS) as store:
        q = OutboundQueue(store)
        deferred = q.enqueue("alice@example.test",
                             [QueuedRecipient("bob@remote.test"),
                              QueuedRecipient("carol@other.test")], MESSAGE)
        q.record_attempt(deferred.id, [RecipientResult(
            "bob@remote.test", PENDING, 451, "4.7.1", "greylisted, come back later",
            "mx1.remote.test")], time.time() + 3600)
        held = q.enqueue("alice@example.test", [QueuedRecipient("dan@remote.test")], MESSAGE)
        q.hold(held.id)
        other = q.enqueue("zed@example.test", [QueuedRecipient("eve@far.test")], MESSAGE)
        q.record_attempt(other.id, [], time.time() + 7200)
        return {"deferred": deferred.id, "held": held.id, "other": other.id}


@pytest.fixture
def served(data_dir):
    ids = seed(data_dir)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(data_dir), str(SHARDS)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        client = AdminClient(data_dir / "admin.sock", timeout=10)

        def up():
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode())
            try:
                return client.call("ping")
            except NodeNotRunning:
                return None

        until(up, "the admin socket")
        yield ids, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        proc.stdout.close()


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node", "--config", str(data_dir.parent / "postroom.toml"),
         "queue", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )


def wakes(data_dir: Path) -> int:
    path = data_dir / "wakes"
    return path.read_text().count("wake") if path.exists() else 0


def test_cli_without_a_running_node(data_dir):
    result = cli(data_dir, "list")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"postroom: error: node not running (no admin socket at {data_dir / 'admin.sock'})\n")


def test_cli_list_and_filters(data_dir, served):
    ids, _ = served
    result = cli(data_dir, "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "AGE", "SIZE", "NEXT", "HELD"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert set(rows) == set(ids.values())
    assert "bob@remote.test (pending), carol@other.test (pending)" in rows[ids["deferred"]]
    assert " yes " in rows[ids["held"]] and " yes " not in rows[ids["deferred"]]
    assert f" {len(MESSAGE)} " in rows[ids["deferred"]] and " in 59m" in rows[ids["deferred"]]
    assert lines[-1] == "3 message(s), 4 recipient(s)"

    def listed(*args):
        out = cli(data_dir, "list", *args)
        assert out.returncode == 0, out.stderr
        return {line.split()[0] for line in out.stdout.splitlines()[1:-1]}

    assert listed("--domain", "other.test") == {ids["deferred"]}
    assert listed("--domain", "REMOTE.test") == {ids["deferred"], ids["held"]}
    assert listed("--sender", "zed@example.test") == {ids["other"]}
    assert listed("--sender", "@example.test") == set(ids.values())
    empty = cli(data_dir, "list", "--older-than", "1h")
    assert (empty.returncode, empty.stdout) == (0, "no matching messages\n")
    bad = cli(data_dir, "list", "--older-than", "soon")
    assert bad.returncode == 2 and "bad age" in bad.stderr


def test_cli_show(data_dir, served):
    ids, _ = served
    result = cli(data_dir, "show", ids["deferred"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"id: {ids['deferred']}\n" in out and "sender: <alice@example.test>\n" in out
    assert ("  bob@remote.test  pending  attempts 1  last: 451 4.7.1 greylisted, come back"
            " later (mx1.remote.test)\n") in out
    assert "  carol@other.test  pending  attempts 0\n" in out
    assert "headers:\n  From: Alice <alice@example.test>\n" in out
    assert "  Subject: stuck in the queue\n" in out and "hello" not in out
    missing = cli(data_dir, "show", "0123456789abcdef")
    assert missing.returncode == 1
    assert missing.stderr == "postroom: error: no queue entry 0123456789abcdef\n"


def test_cli_actions_change_the_queue(data_dir, served):
    ids, proc = served
    run = {}
    for args in (("hold", ids["deferred"]), ("release", ids["held"]),
                 ("retry", ids["other"]), ("delete", ids["other"])):
        run[args[0]] = cli(data_dir, *args)
        assert run[args[0]].returncode == 0, run[args[0]].stderr
    assert run["hold"].stdout == f"{ids['deferred']}: on hold\n"
    assert run["delete"].stdout == f"{ids['other']}: deleted\n"
    assert wakes(data_dir) == 2  # release and retry woke the runner
    flush = cli(data_dir, "flush")
    assert (flush.returncode, flush.stdout) == (0, "1 message(s) scheduled for delivery now\n")
    retry_all = cli(data_dir, "retry", "--all")
    assert retry_all.stdout == "1 message(s) scheduled for delivery now\n"
    assert wakes(data_dir) == 4
    again = cli(data_dir, "delete", ids["other"])
    assert again.returncode == 1 and "no queue entry" in again.stderr

    # The changes are committed in the shard logs: they survive the process.
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=DEADLINE) == 0
    assert not (data_dir / "admin.sock").exists()
    with open_store(data_dir / "mail", shards=SHARDS) as store:
        q = OutboundQueue(store)
        entries = {e.id: e for e in q.list()}
        assert set(entries) == {ids["deferred"], ids["held"]}
        assert entries[ids["deferred"]].held and not entries[ids["held"]].held
        assert [e.id for e in q.due(time.time(), 10)] == [ids["held"]]
        log = [op.op for n in store.existing_shards() for op in store.ops_since(n, 0)]
        assert sorted(set(log)) == sorted(
            ["enqueue", "attempt_result", "hold", "release", "retry", "dequeue"])


def test_many_concurrent_clients(data_dir, served):
    client = AdminClient(data_dir / "admin.sock", timeout=20)
    pool = gevent.get_hub().threadpool
    results = [pool.spawn(client.call, "queue.list") for _ in range(20)]
    assert all(len(r.get()["entries"]) == 3 for r in results)
    assert json.dumps(results[0].get())  # plain JSON data
