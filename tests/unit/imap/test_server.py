"""The IMAP gevent server over real loopback sockets, with fake services.

Runs in this process on gevent sockets: STARTTLS dropping pipelined
plaintext (RFC 3501 §6.2.1), IMAPS, IDLE woken by another connection's
change (RFC 2177), the autologout timer, and input that never kills it.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.server import StreamServer

from node.context import NodeContext
from node.imap.server import serve_connection
from node.net.tls import ensure_self_signed
from tests.unit.imap.fakes import FakeStore, make_context
from tests.unit.imap.helpers import MESSAGE


class ImapClient:
    def __init__(self, port: int, tls: gssl.SSLContext | None = None) -> None:
        sock = gsocket.create_connection(("127.0.0.1", port), timeout=10)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.buf = b""
        self.greeting = self.readline()

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, tag: str, line: str) -> list[bytes]:
        self.send(f"{tag} {line}\r\n".encode())
        out = []
        while True:
            out.append(self.readline())
            if out[-1].startswith(tag.encode() + b" "):
                return out

    def eof(self) -> bool:
        try:
            self.readline()
        except EOFError:
            return True
        return False


@pytest.fixture
def tls_ctx(tmp_path: Path) -> tuple[ssl.SSLContext, gssl.SSLContext]:
    cert, key = ensure_self_signed(tmp_path, "localhost")
    server = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)  # create_default_context is not gevent's
    client.load_verify_locations(cafile=str(cert))
    return server, client


def serve(ctx: NodeContext, implicit_tls: bool = False) -> Iterator[int]:
    server = StreamServer(
        ("127.0.0.1", 0), lambda s, a: serve_connection(ctx, s, a, implicit_tls=implicit_tls)
    )
    server.start()
    try:
        yield server.server_port
    finally:
        server.stop(timeout=1)


@pytest.fixture
def store() -> FakeStore:
    s = FakeStore()
    s.ensure_account("alice@example.test")
    return s


def test_starttls_discards_pipelined_plaintext(store: FakeStore, tls_ctx) -> None:
    ctx = make_context(store, node={"allow_plaintext_auth_on_loopback": False})
    ctx.tls = tls_ctx[0]
    for port in serve(ctx):
        c = ImapClient(port)
        assert b"LOGINDISABLED" in c.greeting and b"STARTTLS" in c.greeting
        # An injected command after STARTTLS must never run (RFC 3501 §6.2.1).
        c.send(b"s STARTTLS\r\nx LOGIN alice@example.test alice-pw-1234\r\n")
        assert c.readline() == b"s OK begin TLS negotiation now\r\n"
        assert c.buf == b""
        c.sock = tls_ctx[1].wrap_socket(c.sock, server_hostname="localhost")
        lines = c.cmd("t", "CAPABILITY")
        assert lines[0].startswith(b"* CAPABILITY") and b"AUTH=PLAIN" in lines[0]
        assert b"STARTTLS" not in lines[0]
        assert c.cmd("l", "LOGIN alice@example.test alice-pw-1234")[-1].startswith(b"l OK")


def test_implicit_tls(store: FakeStore, tls_ctx) -> None:
    ctx = make_context(store, node={"allow_plaintext_auth_on_loopback": False})
    ctx.tls = tls_ctx[0]
    for port in serve(ctx, implicit_tls=True):
        c = ImapClient(port, tls=tls_ctx[1])
        assert b"AUTH=PLAIN" in c.greeting and b"STARTTLS" not in c.greeting


def test_idle_is_woken_by_another_connection(store: FakeStore) -> None:
    ctx = make_context(store)
    for _ in range(2):
        store.append("alice@example.test", "INBOX", MESSAGE)
    for port in serve(ctx):
        a, b = ImapClient(port), ImapClient(port)
        for c in (a, b):
            c.cmd("l", "LOGIN alice@example.test alice-pw-1234")
            c.cmd("s", "SELECT INBOX")
        a.send(b"i IDLE\r\n")
        assert a.readline() == b"+ idling\r\n"
        b.cmd("x", "STORE 2 +FLAGS.SILENT (\\Deleted)")
        assert a.readline() == b"* 2 FETCH (FLAGS (\\Deleted) UID 2)\r\n"
        b.cmd("e", "EXPUNGE")
        assert a.readline() == b"* 2 EXPUNGE\r\n"
        store.append("alice@example.test", "INBOX", MESSAGE)  # a delivery
        assert a.readline() == b"* 2 EXISTS\r\n"
        a.send(b"DONE\r\n")
        assert a.readline() == b"i OK IDLE terminated\r\n"
        assert a.cmd("n", "NOOP") == [b"n OK NOOP completed\r\n"]


def test_autologout_timer(store: FakeStore) -> None:
    ctx = make_context(store, imap={"idle_timeout": 1})
    for port in serve(ctx):
        c = ImapClient(port)
        assert c.readline().startswith(b"* BYE")
        assert c.eof()


def test_garbage_and_oversize_input(store: FakeStore) -> None:
    ctx = make_context(store, imap={"max_line_length": 1000, "max_literal_size": 100})
    for port in serve(ctx):
        c = ImapClient(port)
        c.send(b"\xff\xfe\x00\r\n")
        assert c.readline().startswith(b"* BAD")
        c.send(b"a APPEND INBOX {101}\r\n")
        # RFC 7889 §4 (APPENDLIMIT): an over-size APPEND is NO [TOOBIG].
        assert c.readline() == b"a NO [TOOBIG] message too large\r\n"
        c.send(b"y" * 2000)
        assert c.readline().startswith(b"* BYE")
        assert c.eof()
        ok = ImapClient(port)  # the server still serves
        assert ok.cmd("n", "NOOP") == [b"n OK NOOP completed\r\n"]
        ok.send(b"z LOGOUT\r\n")
        assert ok.readline() == b"* BYE logging out\r\n"
        assert ok.readline() == b"z OK LOGOUT completed\r\n"
        assert ok.eof()
