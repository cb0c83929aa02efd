"""mbsync (isync) two-way sync against a real node, changes on both sides.

An initial sync copies the account into a local Maildir.  Then both sides
change: on the server (imaplib) a message is flagged, one deleted, one added
and a folder created with a message; locally a message is marked seen, one is
deleted, one added and a folder created with a message.  Two more sync runs
follow (the second must change nothing), and the server's state is compared,
folder by folder, with the Maildir: the same messages (by Message-ID) with the
same \\Seen, \\Flagged, \\Answered and \\Draft flags.

Exercises RFC 3501 (SELECT, UID FETCH/STORE, EXPUNGE, APPEND, CREATE, LIST),
RFC 4315 UIDPLUS (APPENDUID, UID EXPUNGE, which mbsync uses when advertised)
and, when advertised, RFC 7162 CONDSTORE.
"""

from __future__ import annotations

import email
import imaplib
import os
import re
import shutil
import socket
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("mbsync") is None, reason="isync (mbsync) not installed"),
]

USER = ("mbsync2way@example.test", "mbsync-pw-1234")
# Maildir info flags (https://cr.yp.to/proto/maildir.html) <-> IMAP system flags.
MAILDIR_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen"}
COMPARED = set(MAILDIR_FLAGS.values())


def _message(tag: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Sync Tester <tester@example.test>"
    msg["To"] = USER[0]
    msg["Subject"] = f"mbsync {tag}"
    msg["Message-ID"] = f"<{tag}@mbsync.example.test>"
    msg["Date"] = "Mon, 05 May 2025 10:00:00 +0000"
    msg.set_content(f"body of {tag}\n")
    return bytes(msg).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _imap(node) -> imaplib.IMAP4:
    conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    conn.login(*USER)
    return conn


def _server_state(node) -> dict[str, dict[str, set[str]]]:
    """{folder: {message-id: compared flags}} for every selectable folder."""
    conn = _imap(node)
    try:
        typ, listing = conn.list('""', "*")
        assert typ == "OK"
        state: dict[str, dict[str, set[str]]] = {}
        for line in listing:
            m = re.match(rb'\(([^)]*)\) (?:"."|NIL) "?([^"]*)"?$', line)
            assert m, line
            if b"\\Noselect" in m.group(1) or b"\\NonExistent" in m.group(1):
                continue
            folder = m.group(2).decode()
            typ, _ = conn.select(f'"{folder}"', readonly=True)
            assert typ == "OK", folder
            typ, data = conn.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            assert typ == "OK", data
            messages: dict[str, set[str]] = {}
            for item in data:
                if not isinstance(item, tuple):
                    continue
                flags = set(re.findall(rb"\\\w+", re.search(rb"FLAGS \(([^)]*)\)", item[0])
                                       .group(1)))
                mid = email.message_from_bytes(item[1])["Message-ID"].strip()
                messages[mid] = {f.decode() for f in flags} & COMPARED
            state[folder] = messages
        return state
    finally:
        conn.logout()


def _local_state(root: Path) -> dict[str, dict[str, set[str]]]:
    """The same view of the Maildir (INBOX at root/INBOX, folders verbatim)."""
    state: dict[str, dict[str, set[str]]] = {}
    for folder in sorted(p for p in root.iterdir() if (p / "cur").is_dir()):
        messages: dict[str, set[str]] = {}
        for sub in ("new", "cur"):
            for f in (folder / sub).iterdir():
                info = f.name.partition(":2,")[2]
                if "T" in info:  # trashed, not yet expunged: gone for the user
                    continue
                mid = email.message_from_bytes(f.read_bytes())["Message-ID"].strip()
                messages[mid] = {MAILDIR_FLAGS[c] for c in info if c in MAILDIR_FLAGS}
        state[folder.name] = messages
    return state


def _files(root: Path) -> set[str]:
    """Every message file name (Maildir flags included), skipping mbsync's state files."""
    return {str(f.relative_to(root)) for f in root.glob("*/*/*") if f.parent.name in ("new", "cur")}


def _find(root: Path, folder: str, tag: str) -> Path:
    for sub in ("new", "cur"):
        for f in (root / folder / sub).iterdir():
            if f"<{tag}@".encode() in f.read_bytes():
                return f
    raise AssertionError(f"{tag} not in local {folder}")


def _deliver_local(root: Path, folder: str, tag: str, info: str = "") -> None:
    """Write a message the Maildir way: tmp/ then rename into new/ or cur/."""
    base = root / folder
    for sub in ("tmp", "new", "cur"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    name = f"{int(time.time())}.{os.getpid()}_{tag}.{socket.gethostname()}"
    tmp = base / "tmp" / name
    tmp.write_bytes(_message(tag))
    if info:
        tmp.rename(base / "cur" / f"{name}:2,{info}")
    else:
        tmp.rename(base / "new" / name)


def _mbsync(rc: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True, timeout=120,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_mbsync_two_way_changes_on_both_sides(postroom_node, tmp_path: Path) -> None:
    node = postroom_node
    node.add_user(*USER)
    conn = _imap(node)
    for tag in ("m1", "m2", "m3", "m4"):
        typ, _ = conn.append("INBOX", None, None, _message(tag))
        assert typ == "OK"
    conn.logout()

    root = tmp_path / "mail"
    root.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"""IMAPAccount postroom
Host {node.host}
Port {node.ports['imap']}
User {USER[0]}
Pass {USER[1]}
SSLType None
AuthMechs PLAIN

IMAPStore remote
Account postroom

MaildirStore local
Path {root}/
Inbox {root}/INBOX
SubFolders Verbatim

Channel all
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
Sync All
SyncState *
""")
    _mbsync(rc)
    first = _local_state(root)
    assert set(first["INBOX"]) == {f"<m{i}@mbsync.example.test>" for i in range(1, 5)}
    assert {"Sent", "Drafts", "Trash"} <= set(first)
    assert _server_state(node) == first

    # Changes on the server.
    conn = _imap(node)
    conn.select("INBOX")
    typ, data = conn.search(None, "HEADER", "Message-ID", "m1@mbsync")
    assert conn.store(data[0].decode(), "+FLAGS", "(\\Flagged)")[0] == "OK"
    typ, data = conn.search(None, "HEADER", "Message-ID", "m2@mbsync")
    assert conn.store(data[0].decode(), "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert conn.expunge()[0] == "OK"
    assert conn.append("INBOX", None, None, _message("s-new"))[0] == "OK"
    assert conn.create("FromServer")[0] == "OK"
    assert conn.append("FromServer", "(\\Seen)", None, _message("s-folder"))[0] == "OK"
    conn.logout()

    # Changes in the Maildir.
    m3 = _find(root, "INBOX", "m3")
    name = m3.name.partition(":2,")[0]
    m3.rename(root / "INBOX" / "cur" / f"{name}:2,S")
    _find(root, "INBOX", "m4").unlink()
    _deliver_local(root, "INBOX", "l-new")
    _deliver_local(root, "FromLocal", "l-folder", info="FS")

    _mbsync(rc)
    server = _server_state(node)
    local = _local_state(root)
    files = _files(root)
    _mbsync(rc)  # converged: a second run changes nothing on either side
    assert _server_state(node) == server
    assert _local_state(root) == local
    assert _files(root) == files

    assert server == local
    mid = "<{}@mbsync.example.test>".format
    assert server["INBOX"] == {
        mid("m1"): {"\\Flagged"},
        mid("m3"): {"\\Seen"},
        mid("s-new"): set(),
        mid("l-new"): set(),
    }
    assert server["FromServer"] == {mid("s-folder"): {"\\Seen"}}
    assert server["FromLocal"] == {mid("l-folder"): {"\\Seen", "\\Flagged"}}
