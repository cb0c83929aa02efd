"""Planned hand-off of queue shards on a real 3-node cluster: nothing twice.

Real processes (tests/support/cluster.py: 3 nodes on 127.0.0.2-4 over a
3-member TLS+auth etcd) relaying to tests/support/smtp_peer.py's SmtpPeer on
127.0.0.1.  While messages are submitted (STARTTLS + AUTH) to node n1 one
after another, ``postroom node drain n1 --wait`` moves every shard away from
it: its queue runner's hand-off hook lets each attempt in flight record its
result before the new primary takes over, and once n1 leads nothing its
submissions are forwarded to a primary (``queue.enqueue``).  Every message
must reach the receiver exactly once.
"""

from __future__ import annotations

import collections
import re
import smtplib
import ssl
import threading
from pathlib import Path

import pytest

from tests.support.cluster import ClusterHarness
from tests.support.etcd import free_port
from tests.support.node import USERS, to_toml
from tests.support.smtp_peer import SmtpPeer

ALICE = "alice@example.test"
DEADLINE = 90.0
SUBJECT = re.compile(rb"^Subject: (handoff \d+)\r$", re.MULTILINE)


def queue_entries(cluster: ClusterHarness, node: int) -> list:
    from node.admin import AdminClient

    path = Path(cluster.node(node).data_dir) / "admin.sock"
    return AdminClient(path).call("queue.list")["entries"]


@pytest.fixture
def world(tmp_path):
    port = free_port("127.0.0.1")
    cluster = ClusterHarness(tmp_path / "cluster")
    peer = SmtpPeer("127.0.0.1", port, ehlo=["PIPELINING", "8BITMIME"]).start()
    try:
        cluster.setup()
        for node in cluster.nodes:
            node.settings["outbound"].update({
                "relay_host": f"127.0.0.1:{port}", "tls": "opportunistic",
                "mta_sts": False, "dane": False})
            node.config_path.write_text(to_toml(node.settings))
        cluster.start()
        cluster.wait_until(cluster.all_shards_led, DEADLINE, "every shard led")
        yield cluster, peer
    except BaseException:
        print(cluster.log_tails())
        raise
    finally:
        cluster.close()
        peer.stop()


def test_drain_hands_the_queue_over_without_duplicates(world):
    cluster, peer = world
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
