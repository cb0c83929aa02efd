"""POP3 gevent adapter: socket, TLS, timeouts; policy lives in session.py.

`serve_connection` reads from the socket, feeds the session, and writes its
responses, coalescing the replies to pipelined commands (RFC 2449 §6.6) into
one send.  Message bodies are streamed in the chunks the core yields.  STLS
drops whatever plaintext was pipelined after the command (RFC 2595 §4) and
upgrades with `node.net.tls.starttls`.  The maildrop lock is released in a
`finally`, however the session ends (QUIT, error, timeout, dropped peer).

Cluster mode: a login for an account led by another node is handed to
cluster/proxy.py, which pipes the connection to that primary; there
`serve_resumed` runs the session.  A session whose maildrop stops being led
here gets `-ERR [SYS/TEMP] mailbox moved` between two responses (a lock
keeps it out of a response being written) and the connection is closed.
"""

from __future__ import annotations

import logging
import socket
import ssl

import gevent
from gevent.lock import Semaphore

from node.context import NodeContext
from node.net.tls import starttls
from node.pop3 import protocol as p
from node.pop3.session import ERR_MOVED, Pop3Session

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
    stream = _Stream(sock)
    try:
        if implicit_tls and not isinstance(sock, ssl.SSLSocket):
            stream.sock = starttls(sock, ctx.tls, float(ctx.config.pop3.timeout))
        _serve(ctx, stream, session, session.greeting())
    except (OSError, ssl.SSLError) as exc:  # socket.timeout is an OSError
        log.debug("pop3: connection from %s ended: %s", peer_ip, exc)
    except Exception:
        log.exception("pop3: session from %s failed", peer_ip)
    finally:
        session.close()
        stream.close()
        _close(sock)


def serve_resumed(ctx: NodeContext, sock: socket.socket, *, peer_ip: str, secure: bool,
                  account: str) -> None:
    """Serve a session another node authenticated (cluster/proxy.py): the
    first line on ``sock`` answers the login; never raises."""
    session = Pop3Session(ctx, peer_ip, secure=secure)
    stream = _Stream(sock)
    try:
        first = session.open_maildrop(account)
        if session.account is None:  # refused: the other node answers the client
            stream.sock.sendall(b"".join(first.chunks))
            return
        _serve(ctx, stream, session, b"".join(first.chunks))
    except (OSError, ssl.SSLError) as exc:
        log.debug("pop3: handed-over session of %s ended: %s", peer_ip, exc)
    except Exception:
        log.exception("pop3: handed-over session of %s failed", peer_ip)
    finally:
        session.close()
        stream.close()


class _Stream:
    """The connection's current socket (TLS after STLS) and the lock that
    keeps a "mailbox moved" notice from cutting into a response."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = Semaphore()

    def close(self) -> None:
        _close(self.sock)


def _serve(ctx: NodeContext, stream: _Stream, session: Pop3Session, first: bytes) -> None:
    stream.sock.settimeout(float(ctx.config.pop3.timeout) or None)
    session.on_moved = lambda: gevent.spawn(_moved, stream, session)
    _run(ctx, stream, session, first)


def _moved(stream: _Stream, session: Pop3Session) -> None:
    """This node stopped leading the maildrop's shard: say so, hang up
    (the blocked read then fails and the session ends)."""
    with stream.lock:
        if session.account is None:
            return
        session.close()
        try:
            stream.sock.sendall(ERR_MOVED.encode())
        except (OSError, ssl.SSLError):
            pass
        stream.close()


def _run(ctx: NodeContext, stream: _Stream, session: Pop3Session, first: bytes) -> None:
    """Serve until the session ends."""
    out = bytearray(first)
    while True:
        with stream.lock:
            if _respond(ctx, stream, session, out):
                return
        try:
            data = stream.sock.recv(RECV_SIZE)
        except TimeoutError:
            _flush(stream.sock, bytearray(ERR_TIMEOUT.encode()))
            return
        if not data:
            return
        session.receive_data(data)
        # recv returns at once while bytes are buffered: a client pipelining
        # faster than we answer would keep the hub to itself.  idle(), not
        # sleep(0): other sockets are polled first (gevent runs up to 50
        # sleep(0) callbacks back to back before it polls again).
        gevent.idle()


def _respond(ctx: NodeContext, stream: _Stream, session: Pop3Session, out: bytearray) -> bool:
    """Answer every complete command buffered; True when the session ended."""
    while True:
        response = session.next_response()
        if response is None:
            break
        if response.delay:
            _flush(stream.sock, out)
            gevent.sleep(response.delay)
        for chunk in response.chunks:
            out += chunk
            if len(out) >= FLUSH_AT:
                _flush(stream.sock, out)
        if response.close:
            _flush(stream.sock, out)
            return True
        if response.handoff is not None:
            _flush(stream.sock, out)
            from cluster.proxy import hand_over_pop3  # cluster mode only

            if hand_over_pop3(ctx, stream.sock, session, response.handoff):
                return True
        if response.starttls:
            _flush(stream.sock, out)
            dropped = session.discard_input()
            if dropped:
                log.info("pop3: dropped %d octets pipelined after STLS", len(dropped))
            stream.sock = starttls(stream.sock, ctx.tls, float(ctx.config.pop3.timeout))
            stream.sock.settimeout(float(ctx.config.pop3.timeout) or None)
            session.tls_started()
    _flush(stream.sock, out)
    return session.account is None and session.moved


def _flush(sock: socket.socket, out: bytearray) -> None:
    if out:
        sock.sendall(out)
        out.clear()


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
