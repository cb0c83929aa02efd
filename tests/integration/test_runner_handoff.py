"""The queue runner's hand-off hook against a real SMTP exchange.

A gevent child process (monkey-patched, like a node) runs a real MailStore,
OutboundQueue and QueueRunner in cluster mode with a ClusterView double, and
a receiving SMTP server on loopback that holds its reply to the end of DATA
until the test releases it.  So an attempt can be caught "in flight"
deterministically: the hook must not return while the receiver holds the
reply, must return once the result is recorded, and entries of the shard
that had not started must not be sent (the new primary sends them).
Commands are JSON lines on the child's stdin; every answer is one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 20.0

CHILD = r'''
from node.launch import patch; patch()  # gevent monkey-patching, as `postroom` does
import json, random, sys, traceback
import gevent, gevent.event
from gevent.fileobject import FileObjectPosix
from gevent.server import StreamServer
from node.config import from_dict
from node.context import NodeContext
from node.outbound.runner import QueueRunner
from storage.mailstore import MailStore
from storage.model import QueuedRecipient
from storage.queue import OutboundQueue

SHARDS = 4

class View:
    node_name = "n1"
    def __init__(self, led): self.led, self.callbacks = set(led), []
    def shard_of(self, account): raise AssertionError("unused")
    def primary_of(self, n): return self.node_name if n in self.led else "n2"
    def rpc_address(self, node): return None
    def is_local_primary(self, n): return n in self.led
    def local_primary_shards(self): return sorted(self.led)
    def on_role_change(self, cb):
        self.callbacks.append(cb)
        return lambda: self.callbacks.remove(cb)
    def set_led(self, led):
        changed, self.led = self.led ^ set(led), set(led)
        for n in sorted(changed):
            for cb in list(self.callbacks):
                cb(n)

class Directory:
    def is_local_domain(self, domain): return False
    def resolve_recipient(self, address): return None

class Peer:
    """Receives mail; the reply to the end of DATA waits for release()."""
    def __init__(self):
        self.gate = gevent.event.Event()
        self.held = 0      # transactions whose data arrived
        self.answered = 0  # transactions answered 250
        self.server = StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()
    def handle(self, sock, addr):
        f = sock.makefile("rb")
        sock.sendall(b"220 peer.test ESMTP\r\n")
        while True:
            line = f.readline()
            if not line:
                break
            verb = line[:4].upper()
            if verb == b"EHLO":
                sock.sendall(b"250-peer.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                sock.sendall(b"354 go ahead\r\n")
                while f.readline() not in (b".\r\n", b""):
                    pass
                self.held += 1
                self.gate.wait()
                self.answered += 1
                sock.sendall(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                sock.sendall(b"221 bye\r\n")
                break
            else:
                sock.sendall(b"250 ok\r\n")
        sock.close()

peer = Peer()
data_dir = sys.argv[1]
cfg = from_dict({"node": {"data_dir": data_dir},
                 "outbound": {"resolvers": ["127.0.0.1:9"], "mta_sts": False,
                              "relay_host": f"127.0.0.1:{peer.server.server_port}",
                              "max_connections_per_domain": 1}})
store = MailStore(cfg.data_dir / "mail", SHARDS, fsync=False)
store.open()
queue = OutboundQueue(store)
steer = View(set())
queue.use_cluster(steer, None)  # enqueue goes to the one shard `steer` leads
view = View(range(SHARDS))
ctx = NodeContext(config=cfg, directory=Directory(), store=store, tls=None,
                  hostname="mx.example.test", queue=queue, cluster=view)
runner = QueueRunner(ctx, rng=random.Random(1))
runner.start()
hooks = {}

def entry(qid):
    e = queue.get(qid)
    return None if e is None else {"attempts": e.attempts, "pending": len(e.pending)}

print(json.dumps({"ready": True}), flush=True)
for line in FileObjectPosix(sys.stdin.fileno(), "rb"):
    cmd = json.loads(line)
    try:
        op = cmd["op"]
        if op == "enqueue":
            steer.led = {cmd["shard"]}
            e = queue.enqueue("a@example.test", [QueuedRecipient(cmd["to"])],
                              b"Subject: x\r\n\r\nbody\r\n")
            out = {"id": e.id}
        elif op == "peer":
            out = {"held": peer.held, "answered": peer.answered}
        elif op == "release":
            peer.gate.set()
            out = {}
        elif op == "handoff":
            hooks[cmd["name"]] = gevent.spawn(runner.handoff, cmd["shard"], cmd["timeout"])
            gevent.sleep(0)
            out = {}
        elif op == "hook":
            g = hooks[cmd["name"]]
            out = {"done": g.ready(), "result": g.value if g.ready() else None}
        elif op == "lead":
            view.set_led(cmd["shards"])
            out = {}
        elif op == "get":
            out = {"entry": entry(cmd["id"])}
        else:
            out = {"error": "unknown op"}
    except Exception:
        out = {"error": traceback.format_exc()}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
runner.stop(timeout=1)
peer.server.stop()
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

    def wait(self, op: str, check, what: str, **args) -> dict:
        deadline = time.monotonic() + DEADLINE
        while True:
            answer = self(op, **args)
            if check(answer):
                return answer
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {answer}")
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


def test_handoff_waits_for_the_attempt_in_flight_and_drops_unstarted(child):
    first = child("enqueue", shard=0, to="r1@remote.test")["id"]
    child.wait("peer", lambda a: a["held"] == 1, "the first message to reach the receiver")
    # One connection per destination: the second entry waits behind the first.
    second = child("enqueue", shard=0, to="r2@remote.test")["id"]

    # A bounded hook gives up while the receiver still holds the reply.
    child("handoff", name="short", shard=0, timeout=0.3)
    assert child.wait("hook", lambda a: a["done"], "the short hook", name="short")["result"] \
        is False
    child("handoff", name="hook", shard=0, timeout=15)
    assert child("hook", name="hook")["done"] is False  # the attempt has no result yet
    assert child("get", id=first)["entry"] == {"attempts": 0, "pending": 1}

    child("release")
    assert child.wait("hook", lambda a: a["done"], "the hook", name="hook")["result"] is True
    assert child("get", id=first)["entry"] is None  # delivered and recorded before returning

    # Shard 0 moves to another node: its not-started entry was never sent here.
    child("lead", shards=[1, 2, 3])
    third = child("enqueue", shard=1, to="r3@remote.test")["id"]
    child.wait("get", lambda a: a["entry"] is None, "delivery in shard 1", id=third)
    assert child("peer") == {"held": 2, "answered": 2}  # the first and the third
    assert child("get", id=second)["entry"] == {"attempts": 0, "pending": 1}
