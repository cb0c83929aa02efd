"""The gevent side of IMAP: socket reads, writes, STARTTLS and timeouts.

One greenlet reads and feeds the session; a second one, the notifier, waits
for the session's wakeup (a store.watch callback while the client IDLEs,
RFC 2177) and lets it report the change at once, with no polling.  A lock
keeps the two from running session code at the same time.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

import gevent
from gevent.event import Event
from gevent.lock import RLock

from node.context import NodeContext
from node.imap.session import Session
from node.net.tls import starttls

log = logging.getLogger("postroom.imap")

READ_SIZE = 65536
TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds


def serve_connection(ctx: NodeContext, sock: Any, address: Any, *, implicit_tls: bool) -> None:
    """Serve one client until LOGOUT, timeout, error or disconnect; never raises."""
    peer_ip = address[0] if isinstance(address, tuple) else str(address)
    lock = RLock()
    wake = Event()
    conn = [sock]

    def send(data: bytes) -> None:
        conn[0].sendall(data)

    session = Session(ctx, send, peer_ip=peer_ip, tls=implicit_tls, wakeup=wake.set)

    def notifier() -> None:
        while not session.closed:
            wake.wait()
            wake.clear()
            with lock:
                try:
                    session.idle_flush()
                except (OSError, ssl.SSLError):
                    session.close()
                    _shutdown(conn[0])

    watcher = gevent.spawn(notifier)
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
            if session.want_starttls and not session.closed:
                try:
                    conn[0] = starttls(conn[0], ctx.tls, TLS_HANDSHAKE_TIMEOUT)
                except (OSError, ssl.SSLError) as exc:
                    log.info("imap: STARTTLS with %s failed: %s", peer_ip, exc)
                    break
                conn[0].settimeout(timeout)
                with lock:
                    session.tls_started()
    except (OSError, ssl.SSLError) as exc:
        log.debug("imap: connection from %s ended: %s", peer_ip, exc)
    except Exception:
        log.exception("imap: session with %s failed", peer_ip)
    finally:
        session.close()
        wake.set()
        watcher.kill(block=False)
        try:
            conn[0].close()
        except OSError:
            pass


def _shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
