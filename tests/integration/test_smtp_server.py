"""The SMTP gevent server on a real node: timeouts, error limit, STARTTLS
injection, handshake failures and slow clients (RFC 5321 §4.5.3.2, RFC 3207)."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

ALICE = "alice@example.test"


def _connect(node) -> socket.socket:
    sock = socket.create_connection((node.host, node.ports["smtp"]), timeout=30)
    assert _read_reply(sock).startswith(b"220 mx.example.test ESMTP postroom")
    return sock


def _read_reply(sock) -> bytes:
    """One complete (possibly multi-line) reply."""
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return buf
        buf += chunk
        lines = buf.split(b"\r\n")
        if len(lines) > 1 and any(len(ln) >= 4 and ln[3:4] == b" " for ln in lines[:-1]):
            return buf


def _read_until_closed(sock) -> bytes:
    out = b""
    while chunk := sock.recv(4096):
        out += chunk
    return out


@pytest.fixture(scope="module")
def strict_node(tmp_path_factory):
    from tests.support.node import NodeProcess

    node = NodeProcess(tmp_path_factory.mktemp("smtpnode"),
                       {"smtp": {"timeout": 1, "max_errors": 3}})
    node.start()
    try:
        node.provision()
        yield node
    finally:
        node.stop()


def test_idle_client_gets_421_timeout(strict_node) -> None:  # RFC 5321 §4.5.3.2.7
    sock = _connect(strict_node)
    with sock:
        start = time.monotonic()
        out = _read_until_closed(sock)
    assert out == b"421 4.4.2 timeout exceeded, closing connection\r\n"
    assert time.monotonic() - start < 20


def test_too_many_errors_closes(strict_node) -> None:
    with _connect(strict_node) as sock:
        sock.sendall(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
        out = _read_until_closed(sock)
    assert out.endswith(b"421 4.7.0 too many errors, closing connection\r\n")
    assert b"250" not in out


def test_starttls_plaintext_injection_dropped(postroom_node) -> None:  # RFC 3207 §4.2
    node = postroom_node
    with _connect(node) as sock:
        sock.sendall(b"EHLO c.example\r\n")
        assert b"STARTTLS" in _read_reply(sock)
        sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@remote.example>\r\n")
        assert _read_reply(sock) == b"220 2.0.0 ready to start TLS\r\n"
        ctx = ssl.create_default_context(cafile=node.cafile)
        ctx.check_hostname = False
        tls = ctx.wrap_socket(sock, server_hostname="mx.example.test")
        # The injected MAIL was dropped: after TLS the session starts over.
        tls.sendall(b"RCPT TO:<alice@example.test>\r\n")
        assert _read_reply(tls).startswith(b"503 5.5.1")
        tls.sendall(b"EHLO c.example\r\n")
        ehlo = _read_reply(tls)
        assert b"STARTTLS" not in ehlo and b"PIPELINING" in ehlo
        tls.sendall(b"QUIT\r\n")
        assert _read_reply(tls).startswith(b"221")


def test_failed_handshake_does_not_hurt_the_node(postroom_node) -> None:
    node = postroom_node
    with _connect(node) as sock:
        sock.sendall(b"EHLO c.example\r\n")
        _read_reply(sock)
        sock.sendall(b"STARTTLS\r\n")
        assert _read_reply(sock).startswith(b"220")
        sock.sendall(b"this is not a TLS client hello\r\n" * 4)
        try:
            out = _read_until_closed(sock)  # at most a TLS alert, never an SMTP reply
        except ConnectionResetError:
            out = b""
        assert not out.startswith((b"2", b"5", b"4"))
    with _connect(node) as sock:  # the node still serves
        sock.sendall(b"NOOP\r\n")
        assert _read_reply(sock) == b"250 2.0.0 OK\r\n"


def test_slow_client_does_not_block_others(postroom_node) -> None:
    node = postroom_node
    slow = _connect(node)
    try:
        slow.sendall(b"EHLO c.example\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        assert _read_reply(slow)
        slow.sendall(b"Subject: half a line")  # and then nothing
        with _connect(node) as other:
            other.sendall(b"EHLO other.example\r\n")
            assert _read_reply(other).startswith(b"250-mx.example.test")
    finally:
        slow.close()


def test_garbage_never_crashes(postroom_node) -> None:
    node = postroom_node
    payloads = [b"\x00\xff" * 5000 + b"\r\n", b"\r\n" * 50, b"EHLO \xc3\x28\r\n",
                b"BDAT 99999999999999999999999\r\n", b"MAIL FROM:<" + b"a" * 5000 + b">\r\n"]
    for payload in payloads:
        with _connect(node) as sock:
            sock.sendall(payload + b"QUIT\r\n")
            out = _read_until_closed(sock)
            assert out and all(line[:1] in b"245" for line in out.split(b"\r\n") if line)
    with _connect(node) as sock:
        sock.sendall(b"NOOP\r\n")
        assert _read_reply(sock) == b"250 2.0.0 OK\r\n"
