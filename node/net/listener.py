"""Accept connections for one protocol and hand each to its server in a greenlet.

One mechanism for every protocol: TCP_NODELAY on each socket (without it each
reply waited ~40 ms for delayed ACKs), a per-client-IP connection limit with a
protocol-specific refusal line, implicit TLS handshakes off the accept loop,
and a clean stop that closes the listening sockets and then the sessions.

Sessions of every listener share one capacity, the process's file descriptor
limit (RLIMIT_NOFILE) minus FD_RESERVE.  At capacity the listeners stop
accepting and new connections wait in the kernel's backlog until a session
ends; without it, connections from many addresses exhausted the descriptors,
so accept() failed in a loop (a traceback each time) and storage and etcd
could open nothing.
"""

from __future__ import annotations

import logging
import resource
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
from gevent.pool import Group, Pool
from gevent.server import StreamServer

from node.config import parse_listen_address

log = logging.getLogger("postroom.listener")

Handler = Callable[..., None]

# Descriptors kept for everything that is not a client connection: shard
# databases (3 files each with WAL), blobs being written or read, etcd HTTP
# connections, listening sockets, logs.
FD_RESERVE = 256
_capacity: Pool | None = None
_last_full_warning = 0.0


def session_capacity() -> Pool:
    """The process-wide pool every listener spawns its sessions in."""
    global _capacity
    if _capacity is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        size = None if soft == resource.RLIM_INFINITY else max(16, soft - FD_RESERVE)
        _capacity = Pool(size)
    return _capacity


@dataclass
class Service:
    """One protocol's listeners (plain and implicit-TLS) sharing one IP limit."""

    name: str  # "smtp", "imap", "imaps", ... (for logs and ports)
    handler: Handler = field(repr=False)  # serve_connection(sock, address, implicit_tls=...)
    addresses: list[str]
    implicit_tls: bool
    tls: ssl.SSLContext | None = field(repr=False)
    max_per_ip: int
    refusal: bytes = field(repr=False)  # sent to a client over its per-IP limit, then closed
    handshake_timeout: float = 30.0
    # Not in repr: gevent logs a server's repr with each error it reports.
    servers: list[StreamServer] = field(default_factory=list, repr=False)
    sessions: Group = field(default_factory=Group, repr=False)
    per_ip: Counter[str] = field(default_factory=Counter, repr=False)

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
            server = StreamServer(sock, self._accept, spawn=session_capacity())
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
        _warn_if_full()
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


def _warn_if_full() -> None:
    """Log (at most once a minute) that new connections now wait for a slot."""
    global _last_full_warning
    pool = session_capacity()
    if pool.size is not None and pool.free_count() == 0:
        now = time.monotonic()
        if now - _last_full_warning >= 60:
            _last_full_warning = now
            log.warning("%d connections, the process's capacity (RLIMIT_NOFILE - %d): "
                        "new connections wait until a session ends", pool.size, FD_RESERVE)
