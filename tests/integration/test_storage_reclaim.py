"""Space comes back on a real node: deliver over SMTP, expunge over IMAP,
`postroom storage reclaim`, and the bodies' files are gone (storage/reclaim.py)."""

from __future__ import annotations

import imaplib
import smtplib
from pathlib import Path

from tests.support.node import USERS

ALICE = "alice@example.test"
BOB = "bob@example.test"


def blob_files(node) -> dict[str, int]:
    root = Path(node.data_dir) / "mail" / "blobs"
    return {p.name: p.stat().st_size for p in root.glob("??/??/*") if p.is_file()}


def send(node, rcpts: list[str], body: bytes) -> None:
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=30) as smtp:
        smtp.sendmail("sender@remote.test", rcpts, body)


def message(n: int, size: int) -> bytes:
    return (b"From: sender@remote.test\r\nTo: alice@example.test\r\n"
            b"Subject: reclaim %d\r\n\r\n" % n + (b"x" * 78 + b"\r\n") * (size // 80))


def imap(node, user: str) -> imaplib.IMAP4:
    conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    conn.login(user, USERS[user])
    conn.select("INBOX")
    return conn


def test_expunged_mail_gives_the_disk_back(node_factory):
    node = node_factory(storage={"log_keep_ops": 0, "blob_gc_grace": 0.0})
    for n in range(6):
        send(node, [ALICE], message(n, 200_000))
    shared = message(99, 50_000)
    send(node, [ALICE, BOB], shared)  # one body, two mailboxes
    before = blob_files(node)
    assert len(before) == 7
    conn = imap(node, ALICE)
    try:
        conn.store("1:7", "+FLAGS", "(\\Deleted)")
        conn.expunge()
    finally:
        conn.logout()

    done = node.cli("storage", "reclaim", "--settle", "0.5")
    assert done.returncode == 0, done.stderr
    assert "blobs: 6 deleted (" in done.stdout, done.stdout
    after = blob_files(node)
    assert len(after) == 1
    assert sum(after.values()) < sum(before.values()) - 6 * 200_000
    assert "blob sweep: 6 unreferenced blobs deleted" in node.log_tail(200)

    conn = imap(node, BOB)  # the shared body is still there for bob
    try:
        typ, data = conn.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1].endswith(shared)
    finally:
        conn.logout()
    send(node, [ALICE], message(0, 200_000))  # a body seen before comes back
    conn = imap(node, ALICE)
    try:
        typ, data = conn.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1].endswith(message(0, 200_000))
    finally:
        conn.logout()
