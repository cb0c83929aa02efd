"""Thin gevent adapter for the SMTP session: socket, TLS, timeouts.

``serve_connection`` sends the greeting, then reads, feeds the session and
writes its replies until the session ends.  Replies to pipelined commands
(RFC 2920) are written together once everything already read has been
processed.  ``serve_submission`` is the same loop for ports 587/465 (RFC 6409,
RFC 8314) with the submission role and the [submission] timeout.  A delay the
session asks for (after a failed AUTH) is a cooperative sleep: it holds up
this connection only.  Silence longer than smtp.timeout gets 421 4.4.2 (RFC 5321
§4.5.3.2.7).  No input ever escapes as an exception: peer errors are logged
and the connection is closed.
"""

from __future__ import annotations

import logging
import socket
import ssl

import gevent

from node.context import NodeContext
from node.net import tls as nettls
from node.smtp.session import Session

log = logging.getLogger("postroom.smtp")

READ_SIZE = 65536


def serve_connection(
    ctx: NodeContext, sock: socket.socket, address: tuple, *, implicit_tls: bool
) -> None:
    """Serve one SMTP connection until QUIT, error, timeout or peer close."""
    peer_ip = str(address[0]) if address else "unknown"
    timeout = float(ctx.config.smtp.timeout)
    try:
        description = nettls.describe(sock) if implicit_tls else None
        session = Session(ctx, peer_ip, tls=(description or "TLS") if implicit_tls else None)
        _run(session, sock, timeout, ctx)
    except (OSError, ssl.SSLError) as exc:
        log.debug("smtp %s: connection ended: %s", peer_ip, exc)
    except Exception:
        log.exception("smtp %s: session failed", peer_ip)


def serve_submission(
    ctx: NodeContext, sock: socket.socket, address: tuple, *, implicit_tls: bool
) -> None:
    """Serve one submission connection (587 with STARTTLS, 465 implicit TLS)."""
    peer_ip = str(address[0]) if address else "unknown"
    timeout = float(ctx.config.submission.timeout)
    try:
        description = nettls.describe(sock) if implicit_tls else None
        tls = (description or "TLS") if implicit_tls else None
        session = Session(ctx, peer_ip, tls=tls, role="submission")
        _run(session, sock, timeout, ctx)
    except (OSError, ssl.SSLError) as exc:
        log.debug("submission %s: connection ended: %s", peer_ip, exc)
    except Exception:
        log.exception("submission %s: session failed", peer_ip)


def _run(
    session: Session, sock: socket.socket, timeout: float, ctx: NodeContext, *, greet: bool = True
) -> None:
    sock.settimeout(timeout)
    if greet:
        sock.sendall(session.greeting())
    while True:
        try:
            data = sock.recv(READ_SIZE)
        except TimeoutError:
            _send_quietly(sock, session.timeout_reply())
            return
        if not data:
            return
        out = session.feed(data)
        if out.delay:
            gevent.sleep(out.delay)  # slows password guessing; other sessions go on
        if out.data:
            sock.sendall(out.data)
        if out.close:
            return
        # recv returns at once while bytes are buffered: a client streaming
        # faster than we parse would keep the hub to itself.  idle(), not
        # sleep(0): other sockets are polled first (gevent runs up to 50
        # sleep(0) callbacks back to back before it polls again).
        gevent.idle()
        if out.starttls:
            if out.discarded:
                log.info("smtp %s: dropped %d octets pipelined after STARTTLS",
                         session.peer_ip, out.discarded)
            try:
                upgraded = nettls.starttls(sock, ctx.tls, timeout)
            except (OSError, ssl.SSLError) as exc:
                log.info("smtp %s: TLS handshake failed: %s", session.peer_ip, exc)
                return
            # The listener closes the plain socket; we own the TLS one.
            session.tls_established(nettls.describe(upgraded))
            upgraded.settimeout(timeout)
            try:
                _run(session, upgraded, timeout, ctx, greet=False)
            finally:
                upgraded.close()
            return


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass
