"""Connection reuse by the queue runner against a real SMTP receiver.

A gevent child process (monkey-patched, like a node) runs a real MailStore,
OutboundQueue and QueueRunner relaying to tests/support/smtp_peer.py's
SmtpPeer (PIPELINING) on loopback; the test counts the receiver's
connections and reads its commands.  The linger time is raised to 30 s so
that no connection expires during the test, however slow the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30.0

CHILD = r'''
from node.launch import patch; patch()  # gevent monkey-patching, as `postroom` does
import json, random, sys, traceback
from gevent.fileobject import FileObjectPosix
from node.config import from_dict
from node.context import NodeContext
from node.outbound import runner as runnermod
from storage.mailstore import MailStore
from storage.model import QueuedRecipient
from storage.queue import OutboundQueue
from tests.support.smtp_peer import SmtpPeer

class Directory:
    def is_local_domain(self, domain): return False
    def resolve_recipient(self, address): return None

runnermod.CONNECTION_LINGER = 30.0
peer = SmtpPeer(ehlo=["PIPELINING", "8BITMIME"]).start()
cfg = from_dict({"node": {"data_dir": sys.argv[1]},
                 "outbound": {"resolvers": ["127.0.0.1:9"], "mta_sts": False,
                              "relay_host": f"127.0.0.1:{peer.port}",
                              "max_connections_per_domain": 3}})
store = MailStore(cfg.data_dir / "mail", 4, fsync=False)
store.open()
queue = OutboundQueue(store)
ctx = NodeContext(config=cfg, directory=Directory(), store=store, tls=None,
                  hostname="mx.example.test", queue=queue)
runner = runnermod.QueueRunner(ctx, rng=random.Random(1))
runner.start()
print(json.dumps({"ready": True}), flush=True)
for line in FileObjectPosix(sys.stdin.fileno(), "rb"):
    cmd = json.loads(line)
    try:
        if cmd["op"] == "enqueue":
            ids = [queue.enqueue("a@example.test", [QueuedRecipient(f"r{i}@remote.test")],
                                 b"Subject: x\r\n\r\nbody\r\n").id for i in range(cmd["n"])]
            out = {"ids": ids}
        elif cmd["op"] == "queued":
            out = {"n": len(queue.list())}
        elif cmd["op"] == "peer":
            with peer.lock:
                out = {"connections": len(peer.connections),
                       "messages": len(peer.transactions),
                       "commands": [list(c.commands) for c in peer.connections]}
        else:
            out = {"error": "unknown op"}
    except Exception:
        out = {"error": traceback.format_exc()}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
runner.stop(timeout=1)
peer.stop()
store.close()
'''


class Child:
    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data_dir)], cwd=REPO, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(self.proc.stderr.read() if self.proc.stderr else "child died")
        assert json.loads(line) == {"ready": True}

    def __call__(self, op: str, **args) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        assert "error" not in answer, answer["error"]
        return answer

    def delivered(self, total: int) -> dict:
        """Wait until the receiver has ``total`` messages and the queue is empty."""
        deadline = time.monotonic() + DEADLINE
        while True:
            peer = self("peer")
            if peer["messages"] >= total and self("queued")["n"] == 0:
                return peer
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out: {peer['messages']} of {total} messages")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def child(tmp_path):
    c = Child(tmp_path / "data")
    try:
        yield c
    finally:
        c.stop()


def test_lingering_connections_are_reused_one_job_at_a_time(child):
    child("enqueue", n=30)  # a burst: up to max_connections_per_domain = 3 connections
    child.delivered(30)
    for total in range(31, 37):  # one message at a time: wakes one lingering worker
        child("enqueue", n=1)
        child.delivered(total)
    child("enqueue", n=30)  # another burst: the lingering connections are still open
    peer = child.delivered(66)
    # No connection was closed (a worker woken for a job another one took used
    # to QUIT), so no more were ever opened than may be open at once.
    assert not any(c.startswith("QUIT") for conn in peer["commands"] for c in conn)
    assert 1 <= peer["connections"] <= 3
    # RFC 2920: on a reused connection RSET, MAIL, RCPT and DATA go in one
    # write; the receiver saw one RSET per further message.
    rsets = sum(c.startswith("RSET") for conn in peer["commands"] for c in conn)
    assert rsets == 66 - peer["connections"]
