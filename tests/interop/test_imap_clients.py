"""IMAP against a whole node with real clients: imaplib, curl, mbsync.

RFC 3501 behaviour as stock clients exercise it, plus IDLE (RFC 2177)
across two sessions woken by an SMTP delivery.
"""

from __future__ import annotations

import imaplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

ALICE = ("alice@example.test", "alice-pw-1234")
BOB = ("bob@example.test", "bob-pw-1234")


def _message(subject: str, body: str = "hello\n", to: str = ALICE[0]) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Bob <bob@example.test>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@example.test>"
    msg.set_content(body)
    return bytes(msg)


def _imap(node) -> imaplib.IMAP4:
    conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    conn.login(*ALICE)
    return conn


def _smtp_send(node, raw: bytes, to: str = ALICE[0]) -> None:
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=30) as s:
        s.sendmail("bob@example.test", [to], raw)


def test_imaplib_session(postroom_node) -> None:
    node = postroom_node
    conn = _imap(node)
    try:
        typ, data = conn.list()
        assert typ == "OK"
        listing = b"\n".join(data)
        for name, attr in ((b"Sent", b"\\Sent"), (b"Trash", b"\\Trash"), (b"Junk", b"\\Junk")):
            assert attr in listing and name in listing
        assert conn.create("Projects/2026")[0] == "OK"
        raw = _message("imaplib append", "needle in body\n")
        typ, _ = conn.append("Projects/2026", "(\\Flagged)", imaplib.Time2Internaldate(
            1700000000), raw)
        assert typ == "OK"
        typ, data = conn.select("Projects/2026")
        assert typ == "OK" and data == [b"1"]
        typ, data = conn.fetch("1", "(FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE)")
        assert typ == "OK"
        text = data[0] if isinstance(data[0], bytes) else data[0][0]
        assert b"\\Flagged" in text and b"14-Nov-2023" in text and b'"imaplib append"' in text
        typ, data = conn.fetch("1", "(BODY.PEEK[])")
        assert data[0][1].replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
        assert conn.search(None, "BODY", "needle") == ("OK", [b"1"])
        assert conn.uid("SEARCH", "FLAGGED") == ("OK", [b"1"])
        typ, data = conn.fetch("1", "(BODY[TEXT])")
        assert data[0][1] == b"needle in body\r\n"
        assert b"FLAGS (\\Flagged \\Seen)" in data[1]  # RFC 3501 §6.4.5
        assert conn.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert conn.copy("1", "Archive")[0] == "OK"
        typ, data = conn.expunge()
        assert data == [b"1"]
        assert conn.status("Archive", "(MESSAGES UIDNEXT)")[0] == "OK"
        conn.close()
        assert conn.delete("Projects/2026")[0] == "OK"
    finally:
        conn.logout()


def test_idle_woken_by_smtp_delivery(postroom_node) -> None:
    node = postroom_node
    watcher, other = _imap(node), _imap(node)
    try:
        typ, data = watcher.select("INBOX")
        before = int(data[0])
        other.select("INBOX")
        tag = watcher._new_tag().decode()
        watcher.send(f"{tag} IDLE\r\n".encode())
        assert watcher.readline().startswith(b"+ ")
        _smtp_send(node, _message("wake up"))
        watcher.sock.settimeout(20)
        line = watcher.readline()
        assert line == b"* %d EXISTS\r\n" % (before + 1)
        # Another session's flag change also wakes the idler (RFC 2177 §3).
        other.noop()
        other.store(str(before + 1), "+FLAGS", "(\\Flagged)")
        line = watcher.readline()
        assert line.startswith(b"* %d FETCH (FLAGS (\\Flagged" % (before + 1))
        watcher.send(b"DONE\r\n")
        assert watcher.readline() == f"{tag} OK IDLE terminated\r\n".encode()
    finally:
        watcher.logout()
        other.logout()


def test_starttls_then_login_and_plaintext_refused(node_factory) -> None:
    node = node_factory(node={"allow_plaintext_auth_on_loopback": False})
    conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    try:
        assert "LOGINDISABLED" in conn.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            conn.login(*ALICE)
        ctx = ssl.create_default_context(cafile=str(node.cafile))
        ctx.check_hostname = False
        conn.starttls(ssl_context=ctx)
        assert "AUTH=PLAIN" in conn.capabilities
        assert conn.login(*ALICE)[0] == "OK"
    finally:
        conn.logout()
    ctx = ssl.create_default_context(cafile=str(node.cafile))
    ctx.check_hostname = False
    tls = imaplib.IMAP4_SSL(node.host, node.ports["imaps"], ssl_context=ctx, timeout=30)
    try:
        assert tls.authenticate("PLAIN", lambda _: b"\0" + ALICE[0].encode() + b"\0"
                                + ALICE[1].encode())[0] == "OK"
    finally:
        tls.logout()


def test_garbage_does_not_hurt_the_node(postroom_node) -> None:
    node = postroom_node
    with socket.create_connection((node.host, node.ports["imap"]), timeout=30) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"* OK [CAPABILITY")
        s.sendall(b"\x00\xff garbage\r\n" + b"a FETCH (((\r\n" + b"b LOGIN {99999999999}\r\n")
        assert f.readline().startswith(b"* BAD")
        assert f.readline().startswith(b"a BAD")
        assert f.readline().startswith(b"b BAD [TOOBIG]")
        s.sendall(b"x" * 70000)
        assert f.readline().startswith(b"* BYE")
    conn = _imap(node)  # still serving
    conn.logout()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_fetches_a_message(postroom_node) -> None:
    node = postroom_node
    _smtp_send(node, _message("for curl", "curl body marker\n", to=BOB[0]), to=BOB[0])
    url = f"imap://{node.host}:{node.ports['imap']}/INBOX;UID=1"
    res = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-u", f"{BOB[0]}:{BOB[1]}", url],
        capture_output=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert b"curl body marker" in res.stdout
    res = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-u", f"{BOB[0]}:{BOB[1]}",
         f"imap://{node.host}:{node.ports['imap']}/", "-X", "LIST \"\" *"],
        capture_output=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert b"\\Sent" in res.stdout


def _wait_for(predicate, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        threading.Event().wait(0.05)


@pytest.mark.skipif(shutil.which("mbsync") is None, reason="isync (mbsync) not installed")
def test_mbsync_two_way_sync(postroom_node, tmp_path: Path) -> None:
    node = postroom_node
    conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    conn.login(*BOB)
    conn.create("Sync")
    for i in range(2):
        conn.append("Sync", None, None, _message(f"sync {i}", f"server message {i}\n", BOB[0]))
    maildir = tmp_path / "mail"
    maildir.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"""IMAPAccount test
Host {node.host}
Port {node.ports['imap']}
User {BOB[0]}
Pass {BOB[1]}
SSLType None
AuthMechs PLAIN

IMAPStore remote
Account test

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:Sync
Near :local:Sync
Create Near
Sync All
Expunge Both
SyncState *
""")

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["mbsync", "-D", "-c", str(rc), "sync"], capture_output=True,
                              timeout=120, text=True)

    res = run()
    assert res.returncode == 0, res.stdout + res.stderr
    cur = list((maildir / "Sync" / "new").iterdir()) + list((maildir / "Sync" / "cur").iterdir())
    assert len(cur) == 2
    # A local message goes up to the server.
    local = maildir / "Sync" / "new" / f"{int(time.time())}.local.host"
    local.write_bytes(_message("from local", "local body\n", BOB[0]))
    res = run()
    assert res.returncode == 0, res.stdout + res.stderr
    conn.select("Sync")
    typ, data = conn.search(None, "SUBJECT", '"from local"')
    assert data[0] != b""
    conn.logout()
