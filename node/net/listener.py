"""Accept connections for one protocol and hand each to its server in a greenlet.

One mechanism for every protocol: TCP_NODELAY on each socket (without it each
reply waited ~40 ms for delayed ACKs), a per-client-IP connection limit with a
protocol-specific refusal line, implicit TLS handshakes off the accept loop,
and a clean stop that closes the listening sockets and then the sessions.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
from gevent.pool import Group
from gevent.server import StreamServer

from node.config import parse_listen_address

log = logging.getLogger("postroom.listener")

Handler = Callable[..., None]


@dataclass
class Service:
    """One protocol's listeners (plain and implicit-TLS) sharing one IP limit."""

    name: str  # "smtp", "imap", "imaps", ... (for logs and ports)
    handler: Handler  # serve_connection(sock, address, implicit_tls=...)
    addresses: list[str]
    implicit_tls: bool
    tls: ssl.SSLContext | None
    max_per_ip: int
    refusal: bytes  # sent to a client over its per-IP limit, then closed
    handshake_timeout: float = 30.0
    servers: list[StreamServer] = field(default_factory=list)
    sessions: Group = field(default_factory=Group)
    per_ip: Counter[str] = field(default_factory=Counter)

    def start(self) -> None:
        for addr in self.addresses:
            host, port = parse_listen_address(addr, self.name)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                raise OSError(
                    exc.errno, f"{self.name}: cannot listen on {addr}: {exc.strerror}"
                ) from None
            sock.listen(1024)
            server = StreamServer(sock, self._accept)
            server.start()
            self.servers.append(server)
            log.info("%s listening on %s", self.name, self.bound_addresses()[-1])

    def bound_addresses(self) -> list[str]:
        out = []
        for server in self.servers:
            host, port = server.socket.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    def _accept(self, sock: socket.socket, address: tuple) -> None:
        # StreamServer already runs this in its own greenlet.
        self.sessions.add(gevent.getcurrent())
        ip = address[0]
        self.per_ip[ip] += 1
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.max_per_ip and self.per_ip[ip] > self.max_per_ip:
                log.warning("%s: refusing %s: over %d connections", self.name, ip, self.max_per_ip)
                if not self.implicit_tls:
                    sock.sendall(self.refusal)
                return
            if self.implicit_tls:
                assert self.tls is not None
                sock.settimeout(self.handshake_timeout)
                sock = self.tls.wrap_socket(sock, server_side=True)
                sock.settimeout(None)
            self.handler(sock, address, implicit_tls=self.implicit_tls)
        except (OSError, ssl.SSLError) as exc:
            log.debug("%s: connection from %s ended: %s", self.name, ip, exc)
        except Exception:
            log.exception("%s: session from %s failed", self.name, ip)
        finally:
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
            try:
                sock.close()
            except OSError:
                pass

    def stop(self, timeout: float = 5.0) -> None:
        for server in self.servers:
            server.close()
        self.sessions.join(timeout=timeout)
        self.sessions.kill(block=True, timeout=timeout)
