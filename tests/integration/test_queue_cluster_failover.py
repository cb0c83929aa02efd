"""The outbound queue on a real 3-node cluster: failover and planned hand-off.

Real processes (tests/support/cluster.py: 3 nodes on 127.0.0.2-4 over a
3-member TLS+auth etcd) relaying to tests/support/smtp_peer.py's SmtpPeer on
127.0.0.1.  Both tests share one cluster; after each, ``restore()`` restarts
what was killed, drops the drain request, and the next test starts once every
replica is back in every ISR.

* **Crash.**  A message submitted (STARTTLS + AUTH) while the receiver is
  down stays queued on the primary of its queue shard.  That node is killed
  (SIGKILL); once another node leads the shard, ``postroom queue`` on a
  surviving node shows the entry, the receiver comes up, ``postroom queue
  flush`` fans out to the primaries, and the message arrives exactly once.
* **Hand-off.**  While messages are submitted to node n1 one after another,
  ``postroom node drain n1 --wait`` moves every shard away from it: its queue
  runner's hand-off hook lets each attempt in flight record its result before
  the new primary takes over, and once n1 leads nothing its submissions are
  forwarded to a primary (``queue.enqueue``).  Every message must reach the
  receiver exactly once.
"""

from __future__ import annotations

import collections
import re
import smtplib
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.queue import queue_shard
from tests.support.cluster import ClusterHarness
from tests.support.etcd import free_port, skip_without_etcd
from tests.support.node import USERS, to_toml
from tests.support.smtp_peer import SmtpPeer

ALICE = "alice@example.test"
DEADLINE = 90.0
SUBJECT = re.compile(rb"^Subject: (handoff \d+)\r$", re.MULTILINE)


def submit(host: str, port: int, subject: str) -> None:
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE  # the node's self-signed loopback certificate
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.starttls(context=tls)
        smtp.login(ALICE, USERS[ALICE])
        message = (f"From: {ALICE}\r\nTo: far@remote.test\r\nSubject: {subject}\r\n\r\n"
                   "queued through a failover\r\n")
        smtp.sendmail(ALICE, ["far@remote.test"], message.encode())


def queue_list(cluster: ClusterHarness, node: int) -> dict:
    """`postroom queue list` data through node's admin socket (cluster-wide)."""
    from node.admin import AdminClient

    return AdminClient(Path(cluster.node(node).data_dir) / "admin.sock").call("queue.list")


def queue_entries(cluster: ClusterHarness, node: int) -> list:
    return queue_list(cluster, node)["entries"]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClusterHarness, int]]:
    """The shared cluster, relaying everything to 127.0.0.1:port (retry after 1 s)."""
    skip_without_etcd()
    port = free_port("127.0.0.1")
    cluster = ClusterHarness(tmp_path_factory.mktemp("queue-cluster"))
    try:
        cluster.setup()
        for node in cluster.nodes:
            node.settings["outbound"].update({
                "relay_host": f"127.0.0.1:{port}", "tls": "opportunistic",
                "mta_sts": False, "dane": False, "retry_intervals": [1]})
            node.config_path.write_text(to_toml(node.settings))
        cluster.start()
        yield cluster, port
    except BaseException:
        print(cluster.log_tails())
        raise
    finally:
        cluster.close()


@pytest.fixture
def world(relay: tuple[ClusterHarness, int]) -> Iterator[tuple[ClusterHarness, int]]:
    """The shared cluster, whole: every node running and in every ISR, none draining."""
    cluster, port = relay
    cluster.wait_until(cluster.fully_replicated, DEADLINE, "every replica in every ISR")
    try:
        yield cluster, port
    finally:
        cluster.restore()


def test_new_primary_resumes_the_queue_after_a_crash(world):
    cluster, port = world
    host, sub_port = cluster.node(0).address("submission")
    submit(host, sub_port, "failover one")
    (entry,) = cluster.wait_until(lambda: queue_list(cluster, 0)["entries"], DEADLINE,
                                  "the queued entry")
    # The receiver is down: the primary keeps the entry with attempts recorded.
    cluster.wait_until(lambda: queue_list(cluster, 0)["entries"][0]["attempts"] >= 1,
                       DEADLINE, "a failed attempt")
    shard = queue_shard(entry["id"], cluster.shards)
    old = cluster.shard_record(shard)["primary"]
    victim = cluster.by_name(old)
    victim.kill()
    survivor = next(i for i, n in enumerate(cluster.nodes) if n.name != old)
    cluster.wait_until(
        lambda: cluster.shard_record(shard)["primary"] not in (None, old), DEADLINE,
        f"a new primary for queue shard {shard}")
    listed = cluster.wait_until(
        lambda: [e for e in queue_list(cluster, survivor)["entries"] if e["id"] == entry["id"]],
        DEADLINE, "the entry on the new primary")
    assert listed[0]["recipients"][0]["address"] == "far@remote.test"

    with SmtpPeer("127.0.0.1", port) as peer:
        flushed = cluster.cli("queue", "flush", node=survivor)
        assert "scheduled for delivery now" in flushed
        (tx,) = peer.wait_for_messages(1, timeout=DEADLINE)
        assert b"Subject: failover one" in tx.data
        cluster.wait_until(lambda: not queue_list(cluster, survivor)["entries"], DEADLINE,
                           "the queue to empty")
        # Delivered exactly once: the dead primary's attempts had all failed.
        assert len(peer.transactions) == 1, [t.rcpt_to for t in peer.transactions]


def test_drain_hands_the_queue_over_without_duplicates(world):
    cluster, peer_port = world
    host, port = cluster.node(0).address("submission")
    sent: list[str] = []
    failures: list[str] = []
    done = threading.Event()

    def submit_until_done() -> None:
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE  # the node's self-signed loopback certificate
        i = 0
        while not done.is_set() or len(sent) < 20:
            subject = f"handoff {i}"
            i += 1
            try:
                with smtplib.SMTP(host, port, timeout=30) as smtp:
                    smtp.starttls(context=tls)
                    smtp.login(ALICE, USERS[ALICE])
                    smtp.sendmail(ALICE, ["far@remote.test"],
                                  f"Subject: {subject}\r\n\r\nbody\r\n".encode())
                sent.append(subject)  # 250: acknowledged
            except (OSError, smtplib.SMTPException) as exc:  # 451 while a shard moves
                failures.append(f"{subject}: {exc}")

    with SmtpPeer("127.0.0.1", peer_port, ehlo=["PIPELINING", "8BITMIME"]) as peer:
        sender = threading.Thread(target=submit_until_done)
        sender.start()
        try:
            cluster.wait_until(lambda: len(sent) >= 5, DEADLINE, "the first submissions")
            cluster.cli("node", "drain", "n1", "--wait", "--timeout", str(int(DEADLINE)), node=1)
            assert "n1" not in set(cluster.primaries().values())
        finally:
            done.set()
            sender.join(DEADLINE)
        assert not sender.is_alive()
        cluster.wait_until(lambda: len(peer.transactions) >= len(sent), DEADLINE,
                           f"{len(sent)} messages at the receiver")
        cluster.wait_until(lambda: not queue_entries(cluster, 1), DEADLINE, "an empty queue")
        with peer.lock:
            received = collections.Counter(
                m.group(1).decode() for tx in peer.transactions if (m := SUBJECT.search(tx.data)))
        assert set(received) == set(sent), failures
        assert [s for s, n in received.items() if n > 1] == []  # no duplicate
