"""POP3 gevent adapter: socket, TLS, timeouts; policy lives in session.py.

`serve_connection` reads from the socket, feeds the session, and writes its
responses, coalescing the replies to pipelined commands (RFC 2449 §6.6) into
one send.  Message bodies are streamed in the chunks the core yields.  STLS
drops whatever plaintext was pipelined after the command (RFC 2595 §4) and
upgrades with `node.net.tls.starttls`.  The maildrop lock is released in a
`finally`, however the session ends (QUIT, error, timeout, dropped peer).
"""

from __future__ import annotations

import logging
import socket
import ssl

import gevent

from node.context import NodeContext
from node.net.tls import starttls
from node.pop3 import protocol as p
from node.pop3.session import Pop3Session

log = logging.getLogger("postroom.pop3")

RECV_SIZE = 16 * 1024
FLUSH_AT = 64 * 1024  # octets of pending output that force a send
ERR_TIMEOUT = p.err("autologout: idle for too long")  # RFC 1939 §3


def serve_connection(
    ctx: NodeContext, sock: socket.socket, address: tuple, *, implicit_tls: bool
) -> None:
    """Serve one POP3 (or POP3S, `implicit_tls`) connection until it ends.

    Never raises for peer errors: they are logged and the connection closed.
    """
    peer_ip = str(address[0]) if address else ""
    session = Pop3Session(ctx, peer_ip, secure=implicit_tls)
    try:
        if implicit_tls and not isinstance(sock, ssl.SSLSocket):
            sock = starttls(sock, ctx.tls, float(ctx.config.pop3.timeout))
        sock.settimeout(float(ctx.config.pop3.timeout) or None)
        _run(ctx, sock, session)
    except (OSError, ssl.SSLError) as exc:  # socket.timeout is an OSError
        log.debug("pop3: connection from %s ended: %s", peer_ip, exc)
    except Exception:
        log.exception("pop3: session from %s failed", peer_ip)
    finally:
        session.close()
        try:
            sock.close()
        except OSError:
            pass


def _run(ctx: NodeContext, sock: socket.socket, session: Pop3Session, greet: bool = True) -> None:
    """Serve until the session ends; after STLS, recurse once on the TLS socket."""
    out = bytearray(session.greeting() if greet else b"")
    while True:
        while True:
            response = session.next_response()
            if response is None:
                break
            if response.delay:
                _flush(sock, out)
                gevent.sleep(response.delay)
            for chunk in response.chunks:
                out += chunk
                if len(out) >= FLUSH_AT:
                    _flush(sock, out)
            if response.close:
                _flush(sock, out)
                return
            if response.starttls:
                _flush(sock, out)
                dropped = session.discard_input()
                if dropped:
                    log.info("pop3: dropped %d octets pipelined after STLS", len(dropped))
                tls_sock = starttls(sock, ctx.tls, float(ctx.config.pop3.timeout))
                tls_sock.settimeout(float(ctx.config.pop3.timeout) or None)
                session.tls_started()
                try:
                    _run(ctx, tls_sock, session, greet=False)
                finally:
                    tls_sock.close()
                return
        _flush(sock, out)
        try:
            data = sock.recv(RECV_SIZE)
        except TimeoutError:
            _flush(sock, bytearray(ERR_TIMEOUT.encode()))
            return
        if not data:
            return
        session.receive_data(data)
        # recv returns at once while bytes are buffered: a client pipelining
        # faster than we answer would keep the hub to itself.  idle(), not
        # sleep(0): other sockets are polled first (gevent runs up to 50
        # sleep(0) callbacks back to back before it polls again).
        gevent.idle()


def _flush(sock: socket.socket, out: bytearray) -> None:
    if out:
        sock.sendall(out)
        out.clear()
