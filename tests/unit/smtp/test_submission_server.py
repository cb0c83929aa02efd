"""serve_submission over real loopback sockets (gevent, in this process), with fakes.

STARTTLS dropping pipelined plaintext before AUTH (RFC 3207 §4.2), implicit
TLS (RFC 8314 §3.3), and the AUTH failure delay holding up only its own
connection.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import Event
from gevent.server import StreamServer

from node.config import Config, SubmissionSettings
from node.context import NodeContext
from node.net.tls import ensure_self_signed
from node.smtp.server import serve_submission
from tests.unit.smtp.fakes import FakeStore
from tests.unit.smtp.test_submission import FakeQueue, SubmissionDirectory

GOOD = base64.b64encode(b"\0alice@example.test\0alice-pw")
BAD = base64.b64encode(b"\0alice@example.test\0wrong")


class Client:
    def __init__(self, port: int, tls: gssl.SSLContext | None = None) -> None:
        sock = gsocket.create_connection(("127.0.0.1", port), timeout=10)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.buf = b""
        self.greeting = self.reply()

    def reply(self) -> list[bytes]:
        """One (multi-line) reply."""
        lines = []
        while True:
            while b"\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError(self.buf)
                self.buf += data
            line, _, self.buf = self.buf.partition(b"\n")
            lines.append(line + b"\n")
            if line[3:4] != b"-":
                return lines

    def cmd(self, line: bytes) -> list[bytes]:
        self.sock.sendall(line + b"\r\n")
        return self.reply()


@pytest.fixture
def tls(tmp_path: Path) -> tuple[gssl.SSLContext, gssl.SSLContext]:
    cert, key = ensure_self_signed(tmp_path, "localhost")
    server = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=str(cert))
    return server, client


def serve(tls_server: gssl.SSLContext, implicit_tls: bool = False, **sub) -> Iterator[int]:
    settings = dataclasses.replace(SubmissionSettings(), **sub)
    ctx = NodeContext(config=Config(submission=settings), directory=SubmissionDirectory(),  # type: ignore[arg-type]
                      store=FakeStore(), tls=tls_server, hostname="mx.example.test",  # type: ignore[arg-type]
                      queue=FakeQueue())  # type: ignore[arg-type]

    def handle(sock, address):
        if implicit_tls:  # what node/net/listener.py does before calling us
            sock = tls_server.wrap_socket(sock, server_side=True)
        serve_submission(ctx, sock, address, implicit_tls=implicit_tls)

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        yield server.server_port
    finally:
        server.stop(timeout=1)


def test_starttls_drops_pipelined_auth(tls) -> None:  # RFC 3207 §4.2
    for port in serve(tls[0]):
        c = Client(port)
        assert b"AUTH" not in b"".join(c.cmd(b"EHLO client.example"))
        assert c.cmd(b"AUTH PLAIN " + GOOD) == [b"530 5.7.0 Must issue a STARTTLS command first\r\n"]
        c.sock.sendall(b"STARTTLS\r\nAUTH PLAIN " + GOOD + b"\r\n")
        assert c.reply() == [b"220 2.0.0 ready to start TLS\r\n"]
        c.sock = tls[1].wrap_socket(c.sock, server_hostname="localhost")
        # The injected AUTH was dropped: MAIL still needs AUTH.
        assert c.cmd(b"EHLO client.example")[-1] == b"250 HELP\r\n"
        assert c.cmd(b"MAIL FROM:<alice@example.test>") == [
            b"530 5.7.0 Authentication required\r\n"]
        assert c.cmd(b"AUTH PLAIN " + GOOD) == [b"235 2.7.0 Authentication successful\r\n"]


def test_implicit_tls_offers_auth(tls) -> None:  # RFC 8314 §3.3
    for port in serve(tls[0], implicit_tls=True):
        c = Client(port, tls=tls[1])
        ehlo = b"".join(c.cmd(b"EHLO client.example"))
        assert b"250-AUTH PLAIN LOGIN SCRAM-SHA-256\r\n" in ehlo and b"STARTTLS" not in ehlo
        assert c.cmd(b"AUTH PLAIN " + GOOD)[0].startswith(b"235 ")


def test_auth_failure_delay_does_not_block_other_sessions(tls) -> None:
    # The delay is long; the other session must finish while it runs.
    for port in serve(tls[0], implicit_tls=True, auth_failure_delay=3.0):
        slow = Client(port, tls=tls[1])
        slow.cmd(b"EHLO slow.example")
        got_535 = Event()
        order: list[str] = []

        def failing(slow: Client, order: list[str], got_535: Event) -> None:
            assert slow.cmd(b"AUTH PLAIN " + BAD) == [
                b"535 5.7.8 Authentication credentials invalid\r\n"]
            order.append("535")
            got_535.set()

        g = gevent.spawn(failing, slow, order, got_535)
        gevent.sleep(0)  # let it send
        fast = Client(port, tls=tls[1])
        fast.cmd(b"EHLO fast.example")
        assert fast.cmd(b"AUTH PLAIN " + GOOD)[0].startswith(b"235 ")
        order.append("other session done")
        g.join(10)
        assert got_535.is_set()
        assert order == ["other session done", "535"]


def test_too_many_failures_close(tls) -> None:
    for port in serve(tls[0], implicit_tls=True, auth_failure_delay=0.0, max_auth_failures=2):
        c = Client(port, tls=tls[1])
        c.cmd(b"EHLO client.example")
        assert c.cmd(b"AUTH PLAIN " + BAD)[0].startswith(b"535 5.7.8")
        assert c.cmd(b"AUTH PLAIN " + BAD)[0].startswith(b"421 4.7.0")
        with pytest.raises((EOFError, OSError)):
            c.cmd(b"NOOP")
