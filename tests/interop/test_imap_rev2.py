"""IMAP4rev2 session extensions against a whole node with imaplib and raw
sockets: ENABLE, ID, NAMESPACE, MOVE/UID MOVE, UNSELECT, BINARY, LITERAL+
and COMPRESS=DEFLATE (each names its RFC section)."""

from __future__ import annotations

import base64
import imaplib
import socket
import zlib

import pytest

pytestmark = pytest.mark.interop

ALICE = ("alice@example.test", "alice-pw-1234")
RAW = (
    b"From: a@example.test\r\nSubject: rev2\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(b"\x00\x01binary\xff").replace(b"\n", b"\r\n")
)


def test_imaplib_rev2_commands(postroom_node) -> None:
    node = postroom_node
    conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    try:
        conn.login(*ALICE)
        for atom in ("IMAP4REV2", "MOVE", "UNSELECT", "NAMESPACE", "ID", "BINARY", "LITERAL-"):
            assert atom in conn.capabilities  # as seen before login (RFC 7888 §5)
        assert b"LITERAL+" in conn.capability()[1][0].split()  # after login (§4)
        # RFC 2971 §3.1, RFC 2342 §5, RFC 5161 §3.1.
        typ, data = conn.xatom("ID", '("name" "imaplib")')
        assert typ == "OK"
        assert conn.namespace() == ("OK", [b'(("" "/")) NIL NIL'])
        typ, data = conn.xatom("ENABLE", "IMAP4rev2")
        assert typ == "OK" and conn.untagged_responses.pop("ENABLED") == [b"IMAP4rev2"]
        for _ in range(2):
            assert conn.append("INBOX", None, None, RAW)[0] == "OK"
        conn.select("INBOX")
        # RFC 3516 §4.2: the decoded octets; RFC 6851 §3.3 MOVE.
        typ, data = conn.fetch("1", "(BINARY.PEEK[1] BINARY.SIZE[1])")
        assert typ == "OK" and data[0][1] == b"\x00\x01binary\xff"
        typ, data = conn.uid("MOVE", "1:2", "Archive")
        assert typ == "OK"
        assert conn.untagged_responses.get("EXPUNGE") in ([b"1", b"1"], [b"2", b"1"])
        assert conn.select("Archive") == ("OK", [b"2"])
        assert conn.unselect()[0] == "OK"  # RFC 3691
        assert conn.select("INBOX") == ("OK", [b"0"])
    finally:
        conn.logout()


def test_compress_deflate_over_the_wire(postroom_node) -> None:
    # RFC 4978 §3 with the zlib raw DEFLATE stream on both sides.
    node = postroom_node
    with socket.create_connection((node.host, node.ports["imap"]), timeout=30) as s:
        f = s.makefile("rb")
        assert b"COMPRESS=DEFLATE" in f.readline()
        s.sendall(b"l LOGIN alice@example.test alice-pw-1234\r\n")
        assert f.readline().startswith(b"l OK")
        s.sendall(b"z COMPRESS DEFLATE\r\n")
        assert f.readline() == b"z OK DEFLATE active\r\n"
        out, inf = zlib.compressobj(6, zlib.DEFLATED, -15), zlib.decompressobj(-15)
        s.sendall(out.compress(b"n NAMESPACE\r\n") + out.flush(zlib.Z_SYNC_FLUSH))
        got = b""
        while b"n OK" not in got:
            data = s.recv(65536)
            assert data
            got += inf.decompress(data)
        assert got == b'* NAMESPACE (("" "/")) NIL NIL\r\nn OK NAMESPACE completed\r\n'
