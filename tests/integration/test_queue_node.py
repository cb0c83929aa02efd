"""`postroom queue ...` against a real node (`postroom serve`).

A message submitted on port 587 for a remote domain is relayed to a smart
host on loopback that refuses connections, so it stays queued (deferred).
The operator sees it with `queue list/show`, holds it, restarts the node
(the entry and its per-recipient state survive), releases it (the runner
tries again at once) and deletes it.
"""

from __future__ import annotations

import smtplib
import ssl
import time

from node.admin import AdminClient
from tests.support.etcd import free_port
from tests.support.node import USERS

DEADLINE = 60.0
ALICE = "alice@example.test"


def until(predicate, what: str):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def entries(node) -> list[dict]:
    return AdminClient(node.data_dir / "admin.sock", timeout=20).call("queue.list")["entries"]


def test_queue_commands_on_a_running_node(node_factory):
    closed = free_port()  # nothing listens here: every attempt is deferred
    node = node_factory(outbound={"relay_host": f"127.0.0.1:{closed}"})
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=30) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=node.cafile))
        smtp.login(ALICE, USERS[ALICE])
        smtp.sendmail(ALICE, ["friend@remote.test"],
                      b"From: alice@example.test\r\nTo: friend@remote.test\r\n"
                      b"Subject: for the queue\r\n\r\nhi\r\n")

    def attempted():
        found = entries(node)
        return found if found and found[0]["attempts"] >= 1 else None

    [entry] = until(attempted, "the first delivery attempt")
    qid = entry["id"]
    [rcpt] = entry["recipients"]
    assert rcpt["address"] == "friend@remote.test" and rcpt["state"] == "pending"

    # Four commands in one CLI process (node.cli.main each, as `postroom` runs it).
    listed, other, shown, held = node.cli_batch(
        [(["--config", str(node.config_path), *args], "") for args in (
            ("queue", "list"), ("queue", "list", "--domain", "elsewhere.test"),
            ("queue", "show", qid), ("queue", "hold", qid))])
    assert listed["rc"] == 0, listed["stderr"]
    assert qid in listed["stdout"] and "friend@remote.test (pending)" in listed["stdout"]
    assert "<alice@example.test>" in listed["stdout"]
    assert other["stdout"] == "no matching messages\n"
    assert shown["rc"] == 0, shown["stderr"]
    assert "  friend@remote.test  pending  attempts 1  last: " in shown["stdout"]
    assert "  Subject: for the queue\n" in shown["stdout"]
    assert "  Message-ID: " in shown["stdout"]  # added by submission

    assert held["stdout"] == f"{qid}: on hold\n"
    node.stop()
    gone = node.cli("queue", "list")
    assert gone.returncode == 1
    assert gone.stderr == (
        f"postroom: error: node not running (no admin socket at {node.data_dir}/admin.sock)\n")

    node.start()
    [after] = entries(node)
    assert after["id"] == qid and after["held"] and after["attempts"] == entry["attempts"]
    assert after["recipients"] == entry["recipients"]

    assert node.cli("queue", "release", qid).stdout == f"{qid}: released\n"
    until(lambda: entries(node)[0]["attempts"] > entry["attempts"],
          "the attempt after release")
    deleted, empty = node.cli_many((("queue", "delete", qid), ""), (("queue", "list"), ""))
    assert deleted == f"{qid}: deleted\n"
    assert empty == "queue is empty\n"
