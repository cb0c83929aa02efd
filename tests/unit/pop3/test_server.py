"""The POP3 gevent server over real loopback sockets, with fake services.

Runs in this process on gevent sockets (the node monkey-patches; tests do not
need to): STLS and implicit TLS with a freshly generated certificate, large
messages streamed byte-identically, the lock released on a dropped peer, the
idle timeout, and garbage that never kills the server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.server import StreamServer

from node.context import NodeContext
from node.net.tls import ensure_self_signed
from node.pop3 import protocol as p
from node.pop3.locks import LOCKS
from node.pop3.server import serve_connection

from .fakes import FakeStore, make_ctx

ALICE = "alice@example.test"
PW = "alice-pw-1234"


class Pop3Client:
    def __init__(self, port: int, tls: gssl.SSLContext | None = None) -> None:
        sock = gsocket.create_connection(("127.0.0.1", port), timeout=10)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.buf = b""

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def cmd(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.readline()

    def multiline(self) -> bytes:
        out = []
        while (line := self.readline()) != b".\r\n":
            out.append(line)
        return p.unstuff(b"".join(out) + b".\r\n")

    def eof(self) -> bool:
        try:
            self.readline()
        except EOFError:
            return True
        return False


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    return ensure_self_signed(tmp_path, "localhost")


def serve(ctx: NodeContext, implicit_tls: bool = False) -> Iterator[int]:
    server = StreamServer(
        ("127.0.0.1", 0), lambda s, a: serve_connection(ctx, s, a, implicit_tls=implicit_tls)
    )
    server.start()
    try:
        yield server.server_port
    finally:
        server.stop(timeout=5)


def server_tls(certs: tuple[Path, Path]) -> gssl.SSLContext:
    ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs[0]), str(certs[1]))
    return ctx


def client_tls(certs: tuple[Path, Path]) -> gssl.SSLContext:
    ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)  # create_default_context is not gevent's
    ctx.load_verify_locations(cafile=str(certs[0]))
    return ctx


def wait_for(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        gevent.sleep(0.01)


def test_large_message_streamed_byte_identical_and_quit_deletes() -> None:
    store = FakeStore()
    big = b"Subject: big\r\n\r\n" + b"".join(
        (b"." if i % 3 == 0 else b"") + b"line %d\r\n" % i for i in range(200_000)
    )
    store.append(ALICE, "INBOX", big)
    store.append(ALICE, "INBOX", b"Subject: small\r\n\r\n.\r\n")
    for port in serve(make_ctx(store=store)):
        c = Pop3Client(port)
        assert c.readline() == b"+OK postroom ready\r\n"
        assert c.cmd(f"USER {ALICE}").startswith(b"+OK")
        assert c.cmd(f"PASS {PW}").startswith(b"+OK")
        assert c.cmd("RETR 1") == f"+OK {len(big)} octets\r\n".encode()
        assert c.multiline() == big
        assert c.cmd("DELE 2") == b"+OK message 2 deleted\r\n"
        assert c.cmd("QUIT").startswith(b"+OK")
        assert c.eof()
        assert [u for u in store.boxes[ALICE].rows] == [1]


def test_dropped_connection_releases_lock_and_deletes_nothing() -> None:
    store = FakeStore()
    store.append(ALICE, "INBOX", b"Subject: x\r\n\r\nx\r\n")
    for port in serve(make_ctx(store=store)):
        c = Pop3Client(port)
        c.readline()
        c.cmd(f"USER {ALICE}")
        assert c.cmd(f"PASS {PW}").startswith(b"+OK")
        assert c.cmd("DELE 1").startswith(b"+OK")
        c2 = Pop3Client(port)
        c2.readline()
        c2.cmd(f"USER {ALICE}")
        assert c2.cmd(f"PASS {PW}").startswith(b"-ERR [IN-USE]")
        c.sock.close()
        wait_for(lambda: not LOCKS.held(ALICE))
        c2.cmd(f"USER {ALICE}")
        assert c2.cmd(f"PASS {PW}").startswith(b"+OK maildrop has 1 messages")
        assert c2.cmd("QUIT").startswith(b"+OK")
        assert store.expunged == [] and list(store.boxes[ALICE].rows) == [1]


def test_stls_drops_pipelined_plaintext(certs: tuple[Path, Path]) -> None:
    # RFC 2595 §4: what follows STLS in the same packet must not be acted on.
    ctx = make_ctx(tls=server_tls(certs), loopback_plaintext=False)
    for port in serve(ctx):
        c = Pop3Client(port)
        c.readline()
        caps = c.cmd("CAPA") + c.multiline()
        assert b"STLS\r\n" in caps and b"USER\r\n" not in caps
        c.sock.sendall(b"STLS\r\nUSER injected\r\n")
        assert c.readline() == b"+OK Begin TLS negotiation\r\n"
        assert c.buf == b""
        c.sock = client_tls(certs).wrap_socket(c.sock, server_hostname="localhost")
        caps = c.cmd("CAPA") + c.multiline()
        assert b"USER\r\n" in caps and b"SASL PLAIN\r\n" in caps and b"STLS" not in caps
        assert c.cmd(f"PASS {PW}") == b"-ERR send USER first\r\n"  # USER was discarded
        assert c.cmd(f"USER {ALICE}").startswith(b"+OK")
        assert c.cmd(f"PASS {PW}").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")


def test_implicit_tls(certs: tuple[Path, Path]) -> None:
    ctx = make_ctx(tls=server_tls(certs), loopback_plaintext=False)
    for port in serve(ctx, implicit_tls=True):
        c = Pop3Client(port, tls=client_tls(certs))
        assert c.readline() == b"+OK postroom ready\r\n"
        caps = c.cmd("CAPA") + c.multiline()
        assert b"STLS" not in caps and b"USER\r\n" in caps
        assert c.cmd(f"USER {ALICE}").startswith(b"+OK")
        assert c.cmd(f"PASS {PW}").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")


def test_idle_timeout_closes() -> None:
    for port in serve(make_ctx(pop3={"timeout": 1})):
        c = Pop3Client(port)
        c.readline()
        assert c.readline() == b"-ERR autologout: idle for too long\r\n"
        assert c.eof()


def test_garbage_and_overlong_lines_never_kill_the_server() -> None:
    for port in serve(make_ctx(pop3={"max_bad_commands": 1000})):
        c = Pop3Client(port)
        c.readline()
        c.sock.sendall(b"\x00\xff\xfe garbage\r\n" + b"A" * 100_000 + b"\r\n\r\n")
        assert c.readline() == b"-ERR command is not valid UTF-8\r\n"
        assert c.readline() == b"-ERR line too long\r\n"
        assert c.readline() == b"-ERR empty command\r\n"
        assert c.cmd("NOOP") == b"-ERR command not valid in this state\r\n"
        assert c.cmd("QUIT") == b"+OK postroom signing off\r\n"
        assert c.eof()
