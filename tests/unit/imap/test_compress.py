"""COMPRESS=DEFLATE (RFC 4978) through the gevent server on loopback sockets;
the test client compresses and decompresses with zlib (wbits=-15)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import pytest
from gevent import socket as gsocket

from node.imap.compress import DeflateSocket
from tests.unit.imap.fakes import FakeStore, make_context
from tests.unit.imap.test_server import serve


class Deflating:
    """A raw-DEFLATE IMAP client (RFC 4978 §3)."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.out = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.inf = zlib.decompressobj(-15)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.out.compress(data) + self.out.flush(zlib.Z_SYNC_FLUSH))

    def until(self, end: bytes) -> bytes:
        while end not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += self.inf.decompress(data)
        head, _, self.buf = self.buf.partition(end)
        return head + end


@pytest.fixture
def port() -> Iterator[int]:
    yield from serve(make_context(FakeStore()))


def _plain_until(sock, end: bytes) -> bytes:
    buf = b""
    while end not in buf:
        data = sock.recv(65536)
        assert data, buf
        buf += data
    return buf


def _login_and_compress(port: int, pipelined: bytes = b"") -> tuple[object, Deflating]:
    sock = gsocket.create_connection(("127.0.0.1", port), timeout=10)
    _plain_until(sock, b"ready\r\n")
    sock.sendall(b"l LOGIN alice@example.test alice-pw-1234\r\n")
    _plain_until(sock, b"l OK")
    z = Deflating(sock)
    # RFC 4978 §3: data pipelined after COMPRESS is already compressed.
    sock.sendall(b"z COMPRESS DEFLATE\r\n" + pipelined)
    line = b""
    while not line.endswith(b"\r\n"):  # one octet at a time: DEFLATE follows
        line += sock.recv(1)
    assert line == b"z OK DEFLATE active\r\n"
    return sock, z


def test_compress_both_directions(port: int) -> None:
    # RFC 4978 §3: after the tagged OK both directions are DEFLATE.
    sock, z = _login_and_compress(port)
    z.send(b"a SELECT INBOX\r\n")
    assert z.until(b"a OK").startswith(b"* FLAGS ")
    z.until(b"\r\n")
    z.send(b"c CAPABILITY\r\n")
    caps = z.until(b"c OK")
    assert b"COMPRESS=DEFLATE" not in caps
    z.until(b"\r\n")
    # Only once per session: NO [COMPRESSIONACTIVE].
    z.send(b"z COMPRESS DEFLATE\r\n")
    assert z.until(b"\r\n") == b"z NO [COMPRESSIONACTIVE] compression is already active\r\n"
    z.send(b"o LOGOUT\r\n")
    assert b"o OK" in z.until(b"o OK")
    sock.close()


def test_compressed_command_pipelined_after_compress(port: int) -> None:
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    early = deflate.compress(b"n NOOP\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH)
    sock, z = _login_and_compress(port, early)
    z.out = deflate  # the stream the client already started
    assert z.until(b"\r\n") == b"n OK NOOP completed\r\n"
    sock.close()


def test_unknown_mechanism_and_state(port: int) -> None:
    sock = gsocket.create_connection(("127.0.0.1", port), timeout=10)
    _plain_until(sock, b"ready\r\n")
    sock.sendall(b"z COMPRESS DEFLATE\r\n")  # RFC 4978 §3: after authentication
    assert _plain_until(sock, b"\r\n") == b"z BAD COMPRESS not allowed now\r\n"
    sock.sendall(b"l LOGIN alice@example.test alice-pw-1234\r\n")
    _plain_until(sock, b"l OK")
    sock.sendall(b"z COMPRESS GZIP\r\n")
    assert _plain_until(sock, b"\r\n").endswith(b"z BAD unknown compression mechanism\r\n")
    sock.close()


def test_zip_bomb_hits_the_line_cap(port: int) -> None:
    # 64 MB of "A" without a line end compress to ~64 KB; the server inflates
    # at most one read at a time, so the framer's line cap ends it with BYE.
    sock, z = _login_and_compress(port)
    chunk = b"A" * (1 << 20)
    for _ in range(64):
        sock.sendall(z.out.compress(chunk))
    sock.sendall(z.out.flush(zlib.Z_SYNC_FLUSH))
    assert z.until(b"\r\n").startswith(b"* BYE protocol error")
    sock.close()


class _Pipe:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def recv(self, n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_deflate_socket_recv_is_bounded() -> None:
    # RFC 4978 §6 (security): a small input never becomes a large buffer.
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = bomb.compress(b"\0" * 10_000_000) + bomb.flush()
    wrapped = DeflateSocket(_Pipe([data]))
    total = 0
    while piece := wrapped.recv(4096):
        assert len(piece) <= 4096
        total += len(piece)
    assert total == 10_000_000
