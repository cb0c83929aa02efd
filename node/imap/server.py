"""The gevent side of IMAP: socket reads, writes, STARTTLS and timeouts.

One greenlet reads and feeds the session.  The session's wakeup (a
store.watch callback while the client IDLEs, RFC 2177) spawns a short-lived
greenlet that reports the change at once, with no polling; none exists
while nothing changes, so an idle session costs one greenlet.  A lock keeps
the two from running session code at the same time.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

import gevent
from gevent.lock import RLock

from node.context import NodeContext
from node.imap.compress import DeflateSocket
from node.imap.session import Session
from node.net.tls import starttls

log = logging.getLogger("postroom.imap")

READ_SIZE = 65536
TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds


def serve_connection(ctx: NodeContext, sock: Any, address: Any, *, implicit_tls: bool) -> None:
    """Serve one client until LOGOUT, timeout, error or disconnect; never raises."""
    peer_ip = address[0] if isinstance(address, tuple) else str(address)
    lock = RLock()
    conn = [sock]
    flushing = [False]  # a flush greenlet is already on its way

    def send(data: bytes) -> None:
        conn[0].sendall(data)

    def flush() -> None:
        flushing[0] = False
        with lock:
            if session.closed:
                return
            try:
                session.idle_flush()
            except (OSError, ssl.SSLError):
                session.close()
                _shutdown(conn[0])

    def wakeup() -> None:
        # A greenlet per burst of changes, not one per session waiting all
        # the time: idle sessions hold no notifier (memory per IDLE session).
        if not flushing[0] and not session.closed:
            flushing[0] = True
            gevent.spawn(flush)

    session = Session(ctx, send, peer_ip=peer_ip, tls=implicit_tls, wakeup=wakeup)
    timeout = float(ctx.config.imap.idle_timeout)
    try:
        if implicit_tls and not isinstance(sock, ssl.SSLSocket):
            # The listener normally handshakes; a bare socket is wrapped here.
            conn[0] = starttls(sock, ctx.tls, TLS_HANDSHAKE_TIMEOUT)
        conn[0].settimeout(timeout)
        with lock:
            session.greeting()
        while not session.closed:
            try:
                data = conn[0].recv(READ_SIZE)
            except TimeoutError:
                with lock:
                    session.timeout()
                break
            if not data:
                break
            with lock:
                session.feed(data)
            # recv returns at once while bytes are buffered: a client that
            # pipelines faster than we answer would keep the hub to itself.
            # idle(), not sleep(0): other sockets are polled first.
            gevent.idle()
            if session.want_starttls and not session.closed:
                try:
                    conn[0] = starttls(conn[0], ctx.tls, TLS_HANDSHAKE_TIMEOUT)
                except (OSError, ssl.SSLError) as exc:
                    log.info("imap: STARTTLS with %s failed: %s", peer_ip, exc)
                    break
                conn[0].settimeout(timeout)
                with lock:
                    session.tls_started()
            if session.want_compress and not session.closed:
                # RFC 4978 §3: what follows the tagged OK is DEFLATE, including
                # anything the client pipelined after COMPRESS.
                with lock:
                    session.want_compress = False
                    session.compressed = True
                    conn[0] = DeflateSocket(conn[0], session.framer.take_buffer())
    except (OSError, ssl.SSLError) as exc:
        log.debug("imap: connection from %s ended: %s", peer_ip, exc)
    except Exception:
        log.exception("imap: session with %s failed", peer_ip)
    finally:
        session.close()
        try:
            conn[0].close()
        except OSError:
            pass


def _shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
