"""The outbound queue on a real 3-node cluster: the new primary resumes.

Real processes (tests/support/cluster.py: 3 nodes on 127.0.0.2-4 over a
3-member TLS+auth etcd) relaying to tests/support/smtp_peer.py's SmtpPeer on
127.0.0.1.  A message submitted (STARTTLS + AUTH) while the receiver is down
stays queued on the primary of its queue shard.  That node is killed
(SIGKILL); once another node leads the shard, ``postroom queue`` on a
surviving node shows the entry, the receiver comes up, ``postroom queue
flush`` fans out to the primaries, and the message arrives exactly once.
"""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path

import pytest

from storage.queue import queue_shard
from tests.support.cluster import ClusterHarness
from tests.support.etcd import free_port
from tests.support.node import USERS, to_toml
from tests.support.smtp_peer import SmtpPeer

ALICE = "alice@example.test"
DEADLINE = 60.0


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


@pytest.fixture
def world(tmp_path):
    port = free_port("127.0.0.1")
    cluster = ClusterHarness(tmp_path / "cluster")
    try:
        cluster.setup()
        for node in cluster.nodes:
            node.settings["outbound"].update({
                "relay_host": f"127.0.0.1:{port}", "tls": "opportunistic",
                "mta_sts": False, "dane": False, "retry_intervals": [1]})
            node.config_path.write_text(to_toml(node.settings))
        cluster.start()
        cluster.wait_until(cluster.all_shards_led, DEADLINE, "every shard led")
        yield cluster, port
    except BaseException:
        print(cluster.log_tails())
        raise
    finally:
        cluster.close()


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
