"""Any node serves any client, end to end, on a real 3-node cluster.

Real processes (tests/support/cluster.py: 3 nodes on 127.0.0.2-4 over a
3-member TLS+auth etcd) and real clients (smtplib, imaplib, poplib, a raw
socket for IDLE, swaks and curl).  Mail goes in through every node and is
read back through every node: on the nodes that do not lead the account's
shard the IMAP/POP3 session is proxied to the primary (cluster/proxy.py) and
SMTP deliveries go by RPC to it (cluster/router.py).  At the end every
replica of every shard has the same position (/positions/ in etcd) and the
same ``repl.digest``.

The tests share one module-scoped cluster and run in file order; each one
uses its own Message-IDs and looks only at its own messages.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path

import pytest

from cluster import drill
from node.statuscli import read_snapshot
from tests.support.cluster import ClusterHarness, ClusterNode
from tests.support.node import USERS

ALICE, BOB = "alice@example.test", "bob@example.test"
DEADLINE = 60.0  # seconds to wait for the cluster to settle or catch up
MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


@pytest.fixture(scope="module")
def ready(cluster: ClusterHarness) -> ClusterHarness:
    """The cluster once every shard has a live primary and full replicas."""
    cluster.wait_until(cluster.fully_replicated, DEADLINE, "every shard led and replicated")
    return cluster


@pytest.fixture(scope="module")
def rpc_call(ready: ClusterHarness) -> Iterator[Callable[[str, str, dict], dict]]:
    from cluster import ca, rpc

    client = rpc.RpcClient(ca.client_context(Path(ready.node(0).data_dir) / "cluster"))

    def call(address: str, method: str, args: dict) -> dict:
        return client.call(address, method, args, timeout=10.0)[0]

    yield call
    client.close()


def _primary(cluster: ClusterHarness, account: str) -> ClusterNode:
    snap = read_snapshot(cluster.session)
    name = snap.primary(drill.shard_of(account, snap.shard_count))
    assert name is not None, snap.shards
    return cluster.by_name(name)


def _others(cluster: ClusterHarness, node: ClusterNode) -> list[ClusterNode]:
    return [n for n in cluster.nodes if n is not node]


def _message(tag: str, to: str, body: str = "") -> tuple[str, bytes]:
    msgid = f"<{tag}.{os.urandom(4).hex()}@test.example>"
    raw = (f"From: sender@remote.example\r\nTo: {to}\r\nSubject: {tag}\r\n"
           f"Date: {formatdate()}\r\nMessage-ID: {msgid}\r\n\r\n"
           f"{body or 'Hello from ' + tag}\r\nline two\r\n").encode()
    return msgid, raw


def _smtp(node: ClusterNode, rcpts: list[str], raw: bytes) -> tuple[int, bytes]:
    """One delivery through node's SMTP listener: the DATA reply."""
    with smtplib.SMTP(*node.address("smtp"), local_hostname="client.remote.example",
                      timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail("sender@remote.example")[0] == 250
        for rcpt in rcpts:
            code, reply = smtp.rcpt(rcpt)
            assert code == 250, (node.name, rcpt, code, reply)
        return smtp.data(raw)


def _imap(node: ClusterNode, account: str) -> imaplib.IMAP4:
    imap = imaplib.IMAP4(*node.address("imap"), timeout=30)
    imap.login(account, USERS[account])
    return imap


def _messages(imap: imaplib.IMAP4) -> dict[str, tuple[int, bytes]]:
    """Message-ID -> (UID, the whole message) of the selected mailbox."""
    typ, data = imap.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
    assert typ == "OK", data
    out: dict[str, tuple[int, bytes]] = {}
    for item in data:
        if not isinstance(item, tuple):
            continue
        uid = int(re.search(rb"UID (\d+)", item[0]).group(1))
        found = MESSAGE_ID.search(item[1])
        if found:
            out[found.group(1).decode()] = (uid, item[1])
    return out


def _inbox(node: ClusterNode, account: str) -> dict[str, tuple[int, bytes]]:
    imap = _imap(node, account)
    try:
        assert imap.select("INBOX")[0] == "OK"
        return _messages(imap)
    finally:
        imap.logout()


# -- SMTP in through every node, IMAP and POP3 out through every node ----------

SENT: dict[str, dict[str, bytes]] = {ALICE: {}, BOB: {}}  # account -> Message-ID -> raw


def test_smtp_through_each_node_is_accepted(ready: ClusterHarness) -> None:
    for node in ready.nodes:
        msgid, raw = _message(f"smtp-{node.name}", f"{ALICE}, {BOB}")
        code, reply = _smtp(node, [ALICE, BOB], raw)
        assert code == 250, (node.name, reply, node.log_tail())
        for account in (ALICE, BOB):
            SENT[account][msgid] = raw
    # the accounts' primaries are real members, and some sessions below are proxied
    assert {_primary(ready, a).name for a in (ALICE, BOB)} <= {n.name for n in ready.nodes}


def test_imap_through_each_node_sees_every_message_byte_identical(ready: ClusterHarness) -> None:
    assert all(SENT.values()), "needs the SMTP test's messages"
    for account, sent in SENT.items():
        views = {node.name: _inbox(node, account) for node in ready.nodes}
        primary = _primary(ready, account).name
        for msgid, raw in sent.items():
            seen = {name: view.get(msgid) for name, view in views.items()}
            assert all(seen.values()), (account, msgid, {k: bool(v) for k, v in seen.items()})
            # the stored message is what was sent (after the trace headers we add) ...
            uid, stored = seen[primary]
            assert stored.endswith(raw), (account, msgid, stored[:300])
            # ... and every node (proxied sessions included) serves the very same bytes
            assert all(v == (uid, stored) for v in seen.values()), (account, msgid)


def test_pop3_through_each_node(ready: ClusterHarness) -> None:
    for account, sent in SENT.items():
        expected = set(sent)
        bodies: dict[str, dict[str, bytes]] = {}
        for node in ready.nodes:  # one maildrop lock at a time: sessions in turn
            pop = poplib.POP3(*node.address("pop3"), timeout=30)
            try:
                pop.user(account)
                assert pop.pass_(USERS[account]).startswith(b"+OK")
                count, _ = pop.stat()
                got: dict[str, bytes] = {}
                for i in range(1, count + 1):
                    _, lines, _ = pop.retr(i)
                    message = b"\r\n".join(lines) + b"\r\n"
                    found = MESSAGE_ID.search(message)
                    if found and found.group(1).decode() in expected:
                        got[found.group(1).decode()] = message
                bodies[node.name] = got
            finally:
                pop.quit()
        for name, got in bodies.items():
            assert set(got) == expected, (account, name)
            assert all(got[m].endswith(sent[m]) for m in expected), (account, name)
        assert len({tuple(sorted(g.items())) for g in bodies.values()}) == 1, account


# -- IMAP writes through a node that does not lead the account ----------------


def test_imap_writes_through_a_proxy_are_visible_on_the_primary(ready: ClusterHarness) -> None:
    primary = _primary(ready, BOB)
    proxy = _others(ready, primary)[0]
    keep_id, keep = _message("append-keep", BOB)
    gone_id, gone = _message("append-gone", BOB)
    imap = _imap(proxy, BOB)
    try:
        assert imap.select("INBOX")[0] == "OK"
        for raw in (keep, gone):
            typ, data = imap.append("INBOX", None, None, raw)
            assert typ == "OK", data
        mine = _messages(imap)
        keep_uid, gone_uid = mine[keep_id][0], mine[gone_id][0]
        assert gone_uid > keep_uid
        assert imap.uid("STORE", str(keep_uid), "+FLAGS", r"(\Flagged)")[0] == "OK"
        assert imap.uid("STORE", str(gone_uid), "+FLAGS", r"(\Deleted)")[0] == "OK"
        typ, data = imap.expunge()
        assert typ == "OK" and data != [None], data  # an EXPUNGE response came back
    finally:
        imap.logout()

    direct = _imap(primary, BOB)
    try:
        assert direct.select("INBOX")[0] == "OK"
        view = _messages(direct)
        assert gone_id not in view
        assert view[keep_id] == (keep_uid, keep)
        typ, data = direct.uid("FETCH", str(keep_uid), "(FLAGS)")
        assert typ == "OK" and b"\\Flagged" in data[0], data
        # the expunged UID is gone for good: nothing answers to it
        typ, data = direct.uid("FETCH", str(gone_uid), "(FLAGS)")
        assert typ == "OK" and data in ([None], []), data
    finally:
        direct.logout()


# -- IDLE through a proxied session --------------------------------------------


class RawImap:
    """Just enough IMAP over a socket for IDLE (imaplib has none before 3.14)."""

    def __init__(self, node: ClusterNode) -> None:
        self.sock = socket.create_connection(node.address("imap"), timeout=30)
        self.file = self.sock.makefile("rb")
        self.line()  # greeting
        self.tags = 0

    def line(self) -> bytes:
        data = self.file.readline()
        if not data:
            raise ConnectionError("connection closed")
        return data

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\r\n")

    def command(self, text: str) -> list[bytes]:
        self.tags += 1
        tag = f"r{self.tags}"
        self.send(f"{tag} {text}")
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag.encode() + b" "):
                assert line.split()[1] == b"OK", lines
                return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_idle_through_a_proxied_session_wakes_on_a_delivery_elsewhere(
        ready: ClusterHarness) -> None:
    primary = _primary(ready, ALICE)
    proxy, sender = _others(ready, primary)
    client = RawImap(proxy)
    try:
        client.command(f'LOGIN "{ALICE}" "{USERS[ALICE]}"')
        exists = next(int(x.split()[1]) for x in client.command("SELECT INBOX")
                      if x.endswith(b"EXISTS\r\n"))
        client.send("i1 IDLE")
        assert client.line().startswith(b"+"), "no IDLE continuation"
        msgid, raw = _message("idle", ALICE)
        assert _smtp(sender, [ALICE], raw)[0] == 250
        client.sock.settimeout(DEADLINE)  # a deadline for the push, not a speed test
        line = client.line()
        while not line.endswith(b"EXISTS\r\n"):
            line = client.line()
        assert int(line.split()[1]) == exists + 1, line
        client.send("DONE")
        while not (line := client.line()).startswith(b"i1 "):
            pass
        assert line.startswith(b"i1 OK"), line
        SENT[ALICE][msgid] = raw
    finally:
        client.close()


# -- real clients: swaks in through one node, curl IMAP out through another -----


@pytest.mark.interop
def test_swaks_in_and_curl_imap_out_on_different_nodes(ready: ClusterHarness) -> None:
    if not (shutil.which("swaks") and shutil.which("curl")):
        pytest.skip("swaks and curl are needed")
    primary = _primary(ready, ALICE)
    via_smtp, via_imap = _others(ready, primary)  # both go through a non-primary node
    msgid = f"<swaks.{os.urandom(4).hex()}@test.example>"
    host, port = via_smtp.address("smtp")
    swaks = subprocess.run(
        ["swaks", "--server", f"{host}:{port}", "--helo", "client.remote.example",
         "--from", "sender@remote.example", "--to", ALICE, "--header", f"Message-Id: {msgid}",
         "--header", "Subject: swaks through the cluster", "--body", "sent by swaks"],
        capture_output=True, text=True, timeout=60)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    assert re.search(r"^ -> \.\n<-\s+250 ", swaks.stdout, re.MULTILINE), swaks.stdout  # DATA

    host, port = via_imap.address("imap")
    base = f"imap://{host}:{port}/INBOX"
    user = ["--user", f"{ALICE}:{USERS[ALICE]}", "--max-time", "60", "-s", "-S"]
    search = subprocess.run(["curl", *user, "-X", f"SEARCH HEADER Message-ID {msgid}", base],
                            capture_output=True, text=True, timeout=90)
    assert search.returncode == 0, search.stderr
    numbers = re.findall(r"\d+", search.stdout.split("SEARCH", 1)[1])
    assert len(numbers) == 1, search.stdout
    fetch = subprocess.run(["curl", *user, f"{base};MAILINDEX={numbers[0]}"],
                           capture_output=True, timeout=90)
    assert fetch.returncode == 0, fetch.stderr
    assert f"Message-Id: {msgid}".encode() in fetch.stdout
    assert b"sent by swaks" in fetch.stdout
    # curl saw exactly what the primary stores
    stored = _inbox(primary, ALICE)[msgid][1]
    assert fetch.stdout.replace(b"\r\n", b"\n") == stored.replace(b"\r\n", b"\n")


# -- a proxied session when the primary moves -----------------------------------


def test_proxied_session_ends_with_bye_when_the_primary_moves(ready: ClusterHarness) -> None:
    primary = _primary(ready, ALICE)
    proxy = _others(ready, primary)[0]
    client = RawImap(proxy)
    try:
        client.command(f'LOGIN "{ALICE}" "{USERS[ALICE]}"')
        client.command("SELECT INBOX")
        ready.cli("node", "drain", primary.name, "--wait", "--timeout", str(DEADLINE))
        try:
            moved_to = _primary(ready, ALICE)
            assert moved_to is not primary
            client.sock.settimeout(DEADLINE)  # a deadline for the notice, not a speed test
            lines = []
            try:
                while True:
                    lines.append(client.line())
            except ConnectionError:
                pass  # the proxy hung up after its notice
            assert any(x.startswith(b"* BYE") for x in lines), lines
            # reconnecting through the same node lands on the new primary: all mail there
            assert set(SENT[ALICE]) <= set(_inbox(proxy, ALICE))
            assert set(SENT[ALICE]) <= set(_inbox(moved_to, ALICE))
        finally:
            ready.cli("node", "undrain", primary.name)
    finally:
        client.close()
    ready.wait_until(ready.fully_replicated, DEADLINE, f"{primary.name} a replica again")


# -- every replica of every shard alike at the end ----------------------------


def test_replicas_have_equal_positions_and_digests(ready: ClusterHarness, rpc_call) -> None:
    ready.wait_until(ready.fully_replicated, DEADLINE, "every shard fully replicated")
    snap = drill.wait_caught_up(ready.session, time.monotonic() + DEADLINE)
    names = {n.name for n in ready.nodes}
    for n in range(snap.shard_count):
        record = snap.shards[n]
        assert set(record["replicas"]) == set(record["isr"]) == names, record
        positions = {r: snap.positions[r][n] for r in record["replicas"]}
        assert len(set(positions.values())) == 1, (n, positions)
    digests, violations = drill.check_replicas(ready.session, rpc_call,
                                               time.monotonic() + DEADLINE)
    assert violations == []
    assert sorted(digests) == list(range(snap.shard_count))
    for n, by_node in digests.items():
        assert set(by_node) == names, (n, by_node)
        assert len({(tuple(last), digest) for last, digest in by_node.values()}) == 1, by_node
    # the shards that took this module's mail moved past the empty log
    for account in SENT:
        shard = drill.shard_of(account, snap.shard_count)
        assert all(tuple(last)[0] > 0 for last, _ in digests[shard].values()), digests[shard]
