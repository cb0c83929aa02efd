"""Promise 1 on one node: a message that got 250 survives SIGKILL.

Ten SMTP clients deliver to two accounts while the node is SIGKILLed.  After
a restart every acknowledged message is there exactly once, byte-identical
to what was sent (the server only prepends headers), and every shard
database passes SQLite's integrity check.
"""

from __future__ import annotations

import hashlib
import imaplib
import re
import smtplib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.support.node import USERS, NodeProcess

CLIENTS = 10
RECIPIENTS = list(USERS)


def message(client: int, seq: int) -> bytes:
    body = (f"client {client} message {seq} " * 40 + "\r\n") * 5
    return (
        f"From: sender{client}@remote.test\r\n"
        f"To: {RECIPIENTS[seq % 2]}\r\n"
        f"Subject: crash test {client}/{seq}\r\n"
        f"Message-ID: <crash-{client}-{seq}@remote.test>\r\n"
        "\r\n" + body
    ).encode()


def sender(node: NodeProcess, client: int, acked: dict, stop: threading.Event) -> None:
    seq = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP(node.host, node.ports["smtp"], timeout=10) as smtp:
                while not stop.is_set():
                    raw = message(client, seq)
                    smtp.sendmail(f"sender{client}@remote.test", [RECIPIENTS[seq % 2]], raw)
                    # Reached only after "250": the message is acknowledged.
                    acked[f"<crash-{client}-{seq}@remote.test>"] = raw
                    seq += 1
        except (OSError, smtplib.SMTPException):
            return  # the node died under us: anything unacknowledged may be lost


def fetch_all(node: NodeProcess, user: str) -> list[bytes]:
    imap = imaplib.IMAP4(node.host, node.ports["imap"])
    try:
        imap.login(user, USERS[user])
        typ, data = imap.select("INBOX", readonly=True)
        assert typ == "OK"
        if int(data[0]) == 0:
            return []
        typ, data = imap.fetch("1:*", "(BODY.PEEK[])")
        assert typ == "OK"
        return [item[1] for item in data if isinstance(item, tuple)]
    finally:
        imap.logout()


@pytest.mark.slow
def test_acknowledged_messages_survive_sigkill(node_factory) -> None:
    node = node_factory()
    acked: dict[str, bytes] = {}
    stop = threading.Event()
    threads = [
        threading.Thread(target=sender, args=(node, c, acked, stop), daemon=True)
        for c in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    node.kill()
    stop.set()
    for t in threads:
        t.join(15)
    assert len(acked) >= 50, "too few deliveries before the kill to test anything"

    for db in sorted(Path(node.data_dir).rglob("*.db")) + sorted(
        Path(node.data_dir).rglob("*.sqlite")
    ):
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", db

    node.start()
    stored: dict[str, list[bytes]] = {}
    for user in RECIPIENTS:
        for raw in fetch_all(node, user):
            match = re.search(rb"Message-ID: (<crash-\d+-\d+@remote\.test>)", raw)
            assert match, raw[:300]
            stored.setdefault(match.group(1).decode(), []).append(raw)

    lost = [mid for mid in acked if mid not in stored]
    duplicated = [mid for mid, copies in stored.items() if len(copies) > 1]
    assert lost == []
    assert duplicated == []
    for mid, raw in acked.items():
        copy = stored[mid][0]
        # Only headers are prepended: the original is a byte-exact suffix.
        assert hashlib.sha256(copy[len(copy) - len(raw) :]).hexdigest() == hashlib.sha256(
            raw
        ).hexdigest(), mid
