"""The gevent side of IMAP: socket reads, writes, STARTTLS and timeouts.

One greenlet reads and feeds the session.  The session's wakeup (a
store.watch callback while the client IDLEs, RFC 2177) spawns a short-lived
greenlet that reports the change at once, with no polling; none exists
while nothing changes, so an idle session costs one greenlet.  A lock keeps
the two from running session code at the same time.

`Connection` serves one socket-like stream: a client's socket
(`serve_connection`), or in cluster mode a stream another node handed over
after the client logged in there (cluster/proxy.py; `serve(greet=False)`).
When a login names an account led by another node the connection is handed
to cluster/proxy.py, which pipes it to that primary.
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
    Connection(ctx, sock, peer_ip, tls=implicit_tls).serve(greet=True)


class Connection:
    """One stream served by one Session until either side ends it."""

    def __init__(self, ctx: NodeContext, sock: Any, peer_ip: str, *, tls: bool) -> None:
        self.ctx = ctx
        self.sock = sock
        self.peer_ip = peer_ip
        self.lock = RLock()
        self._flushing = False  # a flush greenlet is already on its way
        self.session = Session(ctx, self.send, peer_ip=peer_ip, tls=tls, wakeup=self._wakeup)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _flush(self) -> None:
        self._flushing = False
        session = self.session
        with self.lock:
            if session.closed:
                return
            try:
                if session.moved:  # this node no longer leads the account's shard
                    session.end_moved()
                    _shutdown(self.sock)
                    return
                session.idle_flush()
            except (OSError, ssl.SSLError):
                session.close()
                _shutdown(self.sock)

    def _wakeup(self) -> None:
        # A greenlet per burst of changes, not one per session waiting all
        # the time: idle sessions hold no notifier (memory per IDLE session).
        if not self._flushing and not self.session.closed:
            self._flushing = True
            gevent.spawn(self._flush)

    def serve(self, *, greet: bool) -> None:
        """Run the session on the stream until it ends, then close the stream;
        never raises.  ``greet`` False: the session was resumed (no greeting)."""
        session = self.session
        try:
            if session.tls and greet and not isinstance(self.sock, ssl.SSLSocket):
                # The listener normally handshakes; a bare socket is wrapped here.
                self.sock = starttls(self.sock, self.ctx.tls, TLS_HANDSHAKE_TIMEOUT)
            self.sock.settimeout(float(self.ctx.config.imap.idle_timeout))
            if greet:
                with self.lock:
                    session.greeting()
            self._loop()
        except (OSError, ssl.SSLError) as exc:
            log.debug("imap: connection from %s ended: %s", self.peer_ip, exc)
        except Exception:
            log.exception("imap: session with %s failed", self.peer_ip)
        finally:
            session.close()
            try:
                self.sock.close()
            except OSError:
                pass

    def _loop(self) -> None:
        session = self.session
        timeout = float(self.ctx.config.imap.idle_timeout)
        while not session.closed:
            try:
                data = self.sock.recv(READ_SIZE)
            except TimeoutError:
                with self.lock:
                    session.timeout()
                break
            if not data:
                break
            with self.lock:
                session.feed(data)
            # recv returns at once while bytes are buffered: a client that
            # pipelines faster than we answer would keep the hub to itself.
            # idle(), not sleep(0): other sockets are polled first.
            gevent.idle()
            while session.want_proxy is not None and not session.closed:
                from cluster.proxy import hand_over_imap  # cluster mode only

                if hand_over_imap(self.ctx, self):  # else a pipelined login may want it again
                    return
            if session.want_starttls and not session.closed:
                try:
                    self.sock = starttls(self.sock, self.ctx.tls, TLS_HANDSHAKE_TIMEOUT)
                except (OSError, ssl.SSLError) as exc:
                    log.info("imap: STARTTLS with %s failed: %s", self.peer_ip, exc)
                    break
                self.sock.settimeout(timeout)
                with self.lock:
                    session.tls_started()
            if session.want_compress and not session.closed:
                # RFC 4978 §3: what follows the tagged OK is DEFLATE, including
                # anything the client pipelined after COMPRESS.
                with self.lock:
                    session.want_compress = False
                    session.compressed = True
                    self.sock = DeflateSocket(self.sock, session.framer.take_buffer())


def _shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
