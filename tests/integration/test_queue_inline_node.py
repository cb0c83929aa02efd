"""Inline queued bodies through a real node (`postroom serve`).

A message submitted on port 587 is queued with its body in the enqueue op
and the queue row (no blob file).  Its first attempts find no receiver, the
node is stopped (the row on disk holds the body) and started again, a real
SMTP receiver appears, and the message arrives with the body intact.  A
message the receiver refuses comes back to the sender as a failure report
with RET=FULL, the original inside.
"""

from __future__ import annotations

import imaplib
import smtplib
import sqlite3
import ssl
import time
from contextlib import closing

from node.admin import AdminClient
from tests.support.etcd import free_port
from tests.support.node import USERS
from tests.support.smtp_peer import SmtpPeer

DEADLINE = 60.0
ALICE = "alice@example.test"
# 8-bit text and long lines: the body must come out byte for byte.
BODY = ("Grüße aus dem Büro, ça va? " * 30 + "\r\n").encode() * 40


def until(predicate, what: str, node=None):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tail = node.log_tail(60) if node is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def entries(node) -> list[dict]:
    return AdminClient(node.data_dir / "admin.sock", timeout=20).call("queue.list")["entries"]


def tls(node) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=node.cafile)
    ctx.check_hostname = False
    return ctx


def submit(node, to: str, message: bytes, **options) -> None:
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=30) as smtp:
        smtp.starttls(context=tls(node))
        smtp.login(ALICE, USERS[ALICE])
        smtp.sendmail(ALICE, [to], message, **options)


def queue_rows(node) -> list[tuple]:
    """(id, blob, data) of every queue row, read from the stopped node's shards."""
    rows = []
    for path in sorted((node.data_dir / "mail" / "shards").glob("*.sqlite")):
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows += conn.execute("SELECT id, blob, data FROM queue").fetchall()
    return rows


def inbox(node) -> list[bytes]:
    with imaplib.IMAP4(node.host, node.ports["imap"]) as conn:
        conn.starttls(ssl_context=tls(node))
        conn.login(ALICE, USERS[ALICE])
        conn.select("INBOX")
        _, data = conn.uid("SEARCH", None, "ALL")
        out = []
        for uid in data[0].split():
            _, parts = conn.uid("FETCH", uid, "(BODY.PEEK[])")
            out.append(parts[0][1])
        return out


def message(subject: str) -> bytes:
    return (f"From: {ALICE}\r\nTo: friend@remote.test\r\nSubject: {subject}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + BODY


def test_a_queued_inline_body_survives_a_restart_and_is_delivered_intact(node_factory):
    port = free_port()  # nothing listens yet: every attempt is deferred
    node = node_factory(outbound={"relay_host": f"127.0.0.1:{port}", "retry_intervals": [1]})
    sent = message("inline and restarted")
    submit(node, "friend@remote.test", sent, mail_options=["BODY=8BITMIME"])
    [entry] = until(lambda: [e for e in entries(node) if e["attempts"] >= 1],
                    "the first deferred attempt", node)
    assert entry["blob"] == "" and entry["size"] > len(sent)
    node.stop()

    [(qid, blob, data)] = queue_rows(node)  # the body is in the row, on disk
    assert qid == entry["id"] and blob == "" and data.endswith(sent)
    blobs = node.data_dir / "mail" / "blobs"
    assert not [p for p in blobs.rglob("*") if p.is_file()
                and p.relative_to(blobs).parts[0] not in ("tmp", "trash")]

    with SmtpPeer(port=port) as peer:
        node.start()
        [received] = peer.wait_for_messages(1, timeout=DEADLINE)
        assert received.data == data  # exactly what was queued
        assert received.data.endswith(sent) and b"Received: " in received.data
        until(lambda: entries(node) == [], "the delivered entry to leave the queue", node)


def test_a_failure_report_with_ret_full_holds_the_inline_original(node_factory):
    with SmtpPeer(replies={"RCPT": ["550 5.1.1 no such user"]}) as peer:
        node = node_factory(outbound={"relay_host": f"127.0.0.1:{peer.port}"})
        sent = message("bounced in full")
        submit(node, "nobody@remote.test", sent, mail_options=["RET=FULL"],
               rcpt_options=["NOTIFY=FAILURE"])

        def report() -> bytes | None:
            found = [m for m in inbox(node) if b"multipart/report" in m]
            return found[0] if found else None

        dsn = until(report, "the failure report in alice's INBOX", node)
        assert b"nobody@remote.test" in dsn and b"5.1.1" in dsn
        assert b"Subject: bounced in full" in dsn
        assert BODY in dsn  # RET=FULL: the whole original, from the queue row
        until(lambda: entries(node) == [], "the failed entry to leave the queue", node)
