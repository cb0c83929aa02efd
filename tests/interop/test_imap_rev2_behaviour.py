"""IMAP4rev2 behaviour (RFC 9051) on a whole node: a raw-socket session that
ENABLEs IMAP4rev2 next to an imaplib (IMAP4rev1) session of the same account,
over the real store (each check names its RFC 9051 section)."""

from __future__ import annotations

import imaplib
import socket
import time

import pytest

pytestmark = pytest.mark.interop

ALICE = ("alice@example.test", "alice-pw-1234")
RAW = (b"From: a@example.test\r\nTo: alice@example.test\r\nSubject: rev2 behaviour\r\n"
       b"Message-ID: <rev2b@example.test>\r\n\r\nneedle in the body\r\n")


class Raw:
    """A line-oriented IMAP client on a socket; reads poll with a deadline."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.buf = b""
        self.line()  # greeting

    def line(self) -> bytes:
        deadline = time.monotonic() + 30
        while b"\r\n" not in self.buf:
            assert time.monotonic() < deadline, self.buf
            data = self.sock.recv(65536)
            assert data, "connection closed"
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def cmd(self, tag: str, text: bytes | str) -> list[bytes]:
        data = text.encode() if isinstance(text, str) else text
        self.sock.sendall(tag.encode() + b" " + data + b"\r\n")
        out = []
        while True:
            line = self.line()
            out.append(line)
            if line.startswith(tag.encode() + b" "):
                return out

    def close(self) -> None:
        self.sock.close()


def test_rev2_session_next_to_a_rev1_session(postroom_node) -> None:
    node = postroom_node
    new = Raw(node.host, node.ports["imap"])
    old = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    try:
        assert new.cmd("a", f"LOGIN {ALICE[0]} {ALICE[1]}")[-1].startswith(b"a OK")
        old.login(*ALICE)
        assert new.cmd("e", "ENABLE IMAP4rev2") == [b"* ENABLED IMAP4rev2",
                                                     b"e OK ENABLE completed"]
        # §5.1: UTF-8 names in, UTF-8 out; the rev1 session sees modified UTF-7.
        assert new.cmd("c", 'CREATE "Entwürfe"'.encode())[-1].startswith(b"c OK")
        assert new.cmd("l", b'LIST "" "Entw*"')[0] == (
            '* LIST (\\HasNoChildren) "/" "Entwürfe"'.encode())
        typ, data = old.list('""', "Entw*")
        assert typ == "OK" and data == [b'(\\HasNoChildren) "/" "Entw&APw-rfe"']
        assert old.append("Entw&APw-rfe", None, None, RAW)[0] == "OK"
        assert old.append("Entw&APw-rfe", "(\\Seen)", None, RAW)[0] == "OK"
        # §6.3.2: no RECENT, no [UNSEEN], a LIST response with the name.
        sel = new.cmd("s", 'SELECT "Entwürfe"'.encode())
        assert b"* 2 EXISTS" in sel
        assert '* LIST () "/" "Entwürfe"'.encode() in sel
        assert not any(b"RECENT" in x or b"[UNSEEN" in x for x in sel)
        # §6.4.4 / §7.3.4: ESEARCH with the tag; UTF-8 full-text search.
        assert new.cmd("t", "UID SEARCH CHARSET UTF-8 BODY needle UNSEEN") == [
            b'* ESEARCH (TAG "t") UID ALL 1', b"t OK UID SEARCH completed"]
        assert new.cmd("t", "SEARCH NEW")[-1].startswith(b"t BAD")
        # §7.1 CLOSED when the selection is replaced.
        assert new.cmd("s", "EXAMINE INBOX")[0] == (
            b"* OK [CLOSED] previous mailbox is now closed")
        # The rev1 session is unchanged (RFC 3501 §6.3.1, §7.2.5).
        typ, _ = old.select("Entw&APw-rfe")
        assert typ == "OK" and old.untagged_responses.get("RECENT") == [b"0"]
        assert old.search(None, "NEW") == ("OK", [b""])
        assert new.cmd("x", 'STATUS "Entwürfe" (MESSAGES UNSEEN)'.encode())[0] == (
            '* STATUS "Entwürfe" (MESSAGES 2 UNSEEN 1)'.encode())
    finally:
        new.close()
        old.logout()
