"""Outbound delivery end to end: the real queue runner against real receivers.

A gevent child process runs the real parts of a node that delivery needs --
etcd directory, MailStore, OutboundQueue, QueueRunner with the real
TransportPolicy and DSN module -- and takes JSON-line commands on stdin
(enqueue, get, inbox).  The destination zones are served by a real DNS server
on loopback; the receivers are a scriptable SMTP peer (tests/support/
smtp_peer.py) and Postfix's smtp-sink, each on its own 127.0.0.N address and
the one port the child delivers to (outbound.port).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.dns import DnsServer, Zones
from tests.support.etcd import EtcdServer, free_port, skip_without_etcd
from tests.support.smtp_peer import SmtpPeer, SmtpSink

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30.0

CHILD = r'''
from node.launch import patch; patch()  # gevent monkey-patching, as `postroom` does
import json, sys, traceback
from pathlib import Path
from gevent.fileobject import FileObjectPosix
from node import log as nodelog
from node.config import from_dict
from node.context import NodeContext
from node.net.tls import server_context
from node.outbound.runner import QueueRunner
from cluster.etcd import EtcdSession
from cluster.directory import EtcdDirectory
from storage.mailstore import MailStore
from storage.queue import OutboundQueue
from storage.model import QueuedRecipient

cfg = from_dict(json.loads(sys.argv[1]))
nodelog.setup("info")
etcd = EtcdSession([sys.argv[2]], cfg.etcd.prefix, cfg.etcd.lease_ttl, cfg.etcd.timeout)
etcd.start()
directory = EtcdDirectory(etcd)
directory.start()
if "example.test" not in directory.list_domains():
    directory.add_domain("example.test")
for user in ("alice@example.test", "bob@example.test"):
    if not directory.account_exists(user):
        directory.add_user(user, "pw-" + user)
store = MailStore(cfg.data_dir / "mail", cfg.storage.shards, fsync=False)
store.open()
for user in ("alice@example.test", "bob@example.test"):
    store.ensure_account(user)
queue = OutboundQueue(store)
ctx = NodeContext(config=cfg, directory=directory, store=store, tls=server_context(cfg),
                  hostname=cfg.hostname, queue=queue)
runner = QueueRunner(ctx)
runner.start()

def entry_json(e):
    if e is None:
        return None
    return {"id": e.id, "attempts": e.attempts, "next_attempt": e.next_attempt,
            "recipients": [{"address": r.address, "state": r.state, "code": r.code,
                            "enhanced": r.enhanced, "text": r.text, "attempts": r.attempts}
                           for r in e.recipients]}

print(json.dumps({"ready": True}), flush=True)
stdin = FileObjectPosix(sys.stdin.fileno(), "rb")
for line in stdin:
    cmd = json.loads(line)
    try:
        op = cmd["op"]
        if op == "enqueue":
            rcpts = [QueuedRecipient(r["address"], tuple(r.get("notify", ())))
                     for r in cmd["rcpts"]]
            e = queue.enqueue(cmd["sender"], rcpts, cmd["raw"].encode(),
                              requiretls=cmd.get("requiretls", False))
            out = {"id": e.id}
        elif op == "get":
            out = {"entry": entry_json(queue.get(cmd["id"]))}
        elif op == "inbox":
            rows = store.messages(cmd["account"], "INBOX")
            out = {"messages": [store.read_message(r.blob).decode("utf-8", "replace")
                                for r in rows]}
        elif op == "pause":
            runner.stop()
            out = {}
        elif op == "resume":
            runner = QueueRunner(ctx)
            runner.start()
            out = {}
        else:
            out = {"error": "unknown op"}
    except Exception:
        out = {"error": traceback.format_exc()}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
runner.stop()
store.close()
directory.stop()
etcd.close()
'''


class RunnerProcess:
    """The child: real queue runner, driven through JSON lines."""

    def __init__(self, base: Path, etcd_url: str, outbound: dict) -> None:
        base.mkdir(parents=True, exist_ok=True)
        settings = {
            "node": {"hostname": "mx.example.test", "data_dir": str(base / "data")},
            "storage": {"shards": 2, "fsync": False},
            "etcd": {"prefix": "/postroom-" + base.name},
            "outbound": {"dns_timeout": 2.0, "connect_timeout": 3.0, "greeting_timeout": 10.0,
                         "command_timeout": 10.0, "data_end_timeout": 10.0,
                         "mta_sts": False, **outbound},
        }
        self.log_path = base / "runner.log"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, json.dumps(settings), etcd_url],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=str(REPO), env=env)
        assert self.read(60) == {"ready": True}, self.log()

    def read(self, timeout: float = DEADLINE) -> dict:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"no answer from the runner child:\n{self.log()}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"runner child exited:\n{self.log()}")
        return json.loads(line)

    def call(self, **cmd) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        out = self.read()
        assert "error" not in out, out["error"]
        return out

    def enqueue(self, rcpts: list[str], raw: str, sender: str = "alice@example.test", **kw) -> str:
        return self.call(op="enqueue", sender=sender, raw=raw,
                         rcpts=[{"address": r} for r in rcpts], **kw)["id"]

    def entry(self, queue_id: str) -> dict | None:
        return self.call(op="get", id=queue_id)["entry"]

    def inbox(self, account: str) -> list[str]:
        return self.call(op="inbox", account=account)["messages"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def wait_until(check: Callable[[], object], what: str, timeout: float = DEADLINE) -> object:
    """Poll ``check`` until it returns something true, within a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def message(to: str, subject: str = "hello", body: str = "Hello there.\r\n") -> str:
    return (f"From: Alice <alice@example.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@example.test>\r\n\r\n{body}")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict]:
    skip_without_etcd()
    zones = Zones()
    port = free_port()
    with EtcdServer(tmp_path_factory.mktemp("etcd")) as etcd, DnsServer(zones) as dns:
        child = RunnerProcess(tmp_path_factory.mktemp("runner"), etcd.client_url, {
            "resolvers": [dns.address], "port": port, "retry_intervals": [1],
            "max_connections_per_domain": 1,
        })
        try:
            yield {"zones": zones, "port": port, "child": child, "etcd": etcd, "dns": dns}
        finally:
            child.stop()
            print(child.log())


def mx(zones: Zones, domain: str, *hosts: tuple[int, str, str]) -> None:
    for preference, name, ip in hosts:
        zones.add(domain, "MX", f"{preference} {name}.")
        if ip:
            zones.add(name, "A", ip)


def test_delivery_over_starttls(world):
    mx(world["zones"], "tls.test", (10, "mx.tls.test", "127.0.0.2"))
    child = world["child"]
    with SmtpPeer("127.0.0.2", world["port"], starttls=True, ehlo=["PIPELINING", "8BITMIME"]) as peer:
        qid = child.enqueue(["bob@tls.test"], message("bob@tls.test", "over tls"))
        (tx,) = peer.wait_for_messages(1)
        assert tx.tls and tx.rcpt_to == ["RCPT TO:<bob@tls.test>"]
        assert b"Subject: over tls" in tx.data
        wait_until(lambda: child.entry(qid) is None, "the entry to leave the queue")
    line = wait_until(lambda: [ln for ln in child.log().splitlines()
                               if f"queue={qid}" in ln and "result=delivered" in ln], "log line")
    assert "mx=mx.tls.test ip=127.0.0.2" in line[0] and "tls=TLSv1." in line[0]
    assert "policy=tls=opportunistic" in line[0]


def test_temporary_failure_then_success(world):
    mx(world["zones"], "retry.test", (10, "mx.retry.test", "127.0.0.3"))
    child = world["child"]
    with SmtpPeer("127.0.0.3", world["port"], replies={"RCPT": ["450 4.2.0 mailbox busy"]}) as peer:
        qid = child.enqueue(["carol@retry.test"], message("carol@retry.test", "retry me"))
        (tx,) = peer.wait_for_messages(1)  # the retry (retry_intervals = [1])
        assert b"retry me" in tx.data
        assert sum(c.startswith("RCPT") for conn in peer.connections for c in conn.commands) == 2
        wait_until(lambda: child.entry(qid) is None, "the entry to leave the queue")
    assert not [m for m in child.inbox("alice@example.test") if "retry me" in m]


def test_permanent_failure_bounces_to_sender_inbox(world):
    mx(world["zones"], "fail.test", (10, "mx.fail.test", "127.0.0.4"))
    child = world["child"]
    with SmtpPeer("127.0.0.4", world["port"], replies={"RCPT": ["550 5.1.1 no such user"]}) as peer:
        qid = child.enqueue(["nobody@fail.test"], message("nobody@fail.test", "doomed"))
        reports = wait_until(lambda: [m for m in child.inbox("alice@example.test")
                                      if "doomed" in m and "multipart/report" in m], "the DSN")
        assert child.entry(qid) is None
        assert not peer.transactions
    report = reports[0]
    # RFC 3464: failed action, the remote status, who said it; null reverse-path.
    assert "Return-Path: <>" in report
    assert "Action: failed" in report and "Status: 5.1.1" in report
    assert "nobody@fail.test" in report


def test_mx_fallback_when_first_refuses(world):
    # 127.0.0.5 has nothing listening on the port: connection refused.
    mx(world["zones"], "fallback.test", (10, "mx1.fallback.test", "127.0.0.5"),
       (20, "mx2.fallback.test", "127.0.0.6"))
    child = world["child"]
    with SmtpPeer("127.0.0.6", world["port"]) as peer:
        qid = child.enqueue(["dave@fallback.test"], message("dave@fallback.test", "fallback"))
        (tx,) = peer.wait_for_messages(1)
        assert b"fallback" in tx.data
        wait_until(lambda: child.entry(qid) is None, "the entry to leave the queue")
    log = child.log()
    assert f"queue={qid} to=dave@fallback.test mx=mx1.fallback.test ip=127.0.0.5 result=pending" in log


def test_null_mx_bounced_at_once(world):
    world["zones"].add("nullmx.test", "MX", "0 .")
    child = world["child"]
    qid = child.enqueue(["erin@nullmx.test"], message("erin@nullmx.test", "to null mx"))
    reports = wait_until(lambda: [m for m in child.inbox("alice@example.test")
                                  if "to null mx" in m and "multipart/report" in m], "the DSN")
    assert "Status: 5.1.10" in reports[0]  # RFC 7505 §4.2
    assert child.entry(qid) is None


def test_message_larger_than_remote_size_fails_early(world):
    mx(world["zones"], "size.test", (10, "mx.size.test", "127.0.0.7"))
    child = world["child"]
    with SmtpPeer("127.0.0.7", world["port"], ehlo=["SIZE 200", "PIPELINING"]) as peer:
        qid = child.enqueue(["frank@size.test"], message("frank@size.test", "too big", "x" * 500))
        reports = wait_until(lambda: [m for m in child.inbox("alice@example.test")
                                      if "too big" in m and "multipart/report" in m], "the DSN")
        assert "Status: 5.3.4" in reports[0]
        assert child.entry(qid) is None
        # RFC 1870 §6: not a byte of the message, not even MAIL FROM.
        assert not any(c.startswith(("MAIL", "DATA", "BDAT"))
                       for conn in peer.connections for c in conn.commands)


def test_smtp_sink_receives_plain_delivery(world):
    mx(world["zones"], "sink.test", (10, "mx.sink.test", "127.0.0.8"))
    child = world["child"]
    with SmtpSink("127.0.0.8", world["port"]) as sink:
        qid = child.enqueue(["gina@sink.test"], message("gina@sink.test", "into the sink"))
        wait_until(lambda: child.entry(qid) is None, "the entry to leave the queue")
        (dump,) = sink.wait_for_messages(1)
        assert b"X-Rcpt-Args: <gina@sink.test>" in dump and b"Subject: into the sink" in dump


def test_local_domain_never_leaves_the_cluster(world):
    # Even with an MX for the local domain pointing at a listening server.
    mx(world["zones"], "example.test", (10, "mx.example.test", "127.0.0.9"))
    child = world["child"]
    with SmtpPeer("127.0.0.9", world["port"]) as peer:
        qid = child.enqueue(["bob@example.test"], message("bob@example.test", "stay home"))
        wait_until(lambda: [m for m in child.inbox("bob@example.test") if "stay home" in m],
                   "local delivery")
        wait_until(lambda: child.entry(qid) is None, "the entry to leave the queue")
        assert peer.connections == []


def test_connection_reused_for_several_messages(world):
    mx(world["zones"], "reuse.test", (10, "mx.reuse.test", "127.0.0.10"))
    child = world["child"]
    with SmtpPeer("127.0.0.10", world["port"], ehlo=["PIPELINING"]) as peer:
        child.call(op="pause")
        ids = [child.enqueue([f"u{i}@reuse.test"], message(f"u{i}@reuse.test", f"reuse {i}"))
               for i in range(3)]
        child.call(op="resume")
        peer.wait_for_messages(3)
        for qid in ids:
            wait_until(lambda q=qid: child.entry(q) is None, "the entries to leave the queue")
        peer.wait_for_command("QUIT")
        assert len(peer.connections) == 1  # max_connections_per_domain = 1, reused
        assert sum(c.startswith("RSET") for c in peer.connections[0].commands) == 2


def test_required_tls_against_server_without_starttls_is_deferred(tmp_path):
    skip_without_etcd()
    zones = Zones()
    mx(zones, "plain.test", (10, "mx.plain.test", "127.0.0.11"))
    port = free_port()
    with EtcdServer(tmp_path / "etcd") as etcd, DnsServer(zones) as dns, \
            SmtpPeer("127.0.0.11", port) as peer:
        child = RunnerProcess(tmp_path / "runner", etcd.client_url, {
            "resolvers": [dns.address], "port": port, "retry_intervals": [3600],
            "tls": "required"})
        try:
            qid = child.enqueue(["hank@plain.test"], message("hank@plain.test", "secret"))
            entry = wait_until(lambda: (e := child.entry(qid)) and e["attempts"] >= 1 and e,
                               "the first attempt")
            (rcpt,) = entry["recipients"]
            assert rcpt["state"] == "pending" and rcpt["enhanced"] == "4.7.4"
            assert entry["next_attempt"] > time.time() + 3000
            peer.wait_for_command("QUIT")
            # Never sent in clear: no MAIL, no DATA.
            assert not any(c.startswith(("MAIL", "DATA")) for c in peer.connections[0].commands)
            assert "policy=tls=required(config)" in child.log()
        finally:
            child.stop()
