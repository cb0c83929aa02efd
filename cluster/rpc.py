"""Node-to-node transport: multiplexed request/response calls and raw streams over mTLS.

Theory of operation
-------------------
Everything travels in *frames*: a 4-byte big-endian length, a UTF-8 JSON
object (the header), then the raw bytes of the attachments whose lengths the
header lists in ``att``.  A header may be at most :data:`MAX_HEADER` bytes and
a frame's attachments at most :data:`MAX_ATTACHMENTS` bytes in all; a peer
that breaks a limit, or sends anything that is not a well-formed frame, is
disconnected.

Every connection is mutual TLS 1.3 with the cluster CA (``cluster/ca.py``);
the handshake runs in the connection's own greenlet with a timeout, and a
peer without a certificate from the cluster CA is logged and dropped.  The
peer's name is its certificate's CN.  The first frame picks the mode:

* ``{"mode": "rpc"}``: multiplexed calls.  Requests ``{id, method, args,
  att, deadline}`` each run in their own greenlet (at most :data:`MAX_INFLIGHT` per
  connection; beyond that the server stops reading, which pushes back on the
  sender); answers ``{id, ok: true, result, att}`` or ``{id, ok: false, kind,
  message[, data]}`` go back in completion order, one writer at a time.
  ``deadline`` is the caller's give-up time (wall clock, seconds): a request
  that waited past it (plus :data:`CLOCK_SKEW`), e.g. in the buffers of a
  node frozen by SIGSTOP, is answered ``Expired`` and never run.
* ``{"mode": "stream", method, args}``: the server answers one frame
  ``{"ok": true}`` (or an error) and hands the TLS socket to the stream
  handler, which owns it until it returns.

:class:`RpcClient` keeps one persistent connection per peer address, opened
on first use.  A reader greenlet hands each answer to the waiting caller by
request id; a call that times out just stops waiting (the late answer is
dropped), so a slow handler never wedges other calls.  When the connection
breaks, every call pending on it fails at once with :class:`RpcUnavailable`
and the next call reconnects.  A write that cannot finish within its call's
timeout closes the connection (a peer that stopped reading is dead to us).

All sockets are gevent sockets (the TLS layer is gevent's), so nothing here
blocks the hub, monkey-patched or not.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import AsyncResult
from gevent.lock import Semaphore
from gevent.pool import Group
from gevent.server import StreamServer

from cluster.ca import peer_name

log = logging.getLogger("postroom.rpc")

MAX_HEADER = 16 * 1024 * 1024  # bytes of JSON header per frame
MAX_ATTACHMENTS = 1024 * 1024 * 1024  # bytes of attachments per frame, in all
MAX_INFLIGHT = 512  # requests handled at once per server connection
HANDSHAKE_TIMEOUT = 10.0  # TLS handshake plus the first frame
CLOCK_SKEW = 1.0  # seconds of clock difference between nodes tolerated for request deadlines
RESPONSE_WRITE_TIMEOUT = 60.0  # a server answer that cannot be written in this time drops the peer
_SMALL = 64 * 1024  # frames up to this size are sent in one write
_CHUNK = 256 * 1024  # read size for attachments
_BUFFER = 64 * 1024  # read-ahead of an rpc-mode connection
_LEN = struct.Struct(">I")

Handler = Callable[[str, dict, list[bytes]], tuple[dict, list[bytes]]]
StreamHandler = Callable[[str, dict, socket.socket], None]


class RpcError(Exception):
    """A call failed on the remote side: ``kind`` is the remote exception's class name.

    ``data`` carries structured details a handler attached to its exception
    as ``rpc_data`` (a JSON object), e.g. a follower's last position.
    """

    def __init__(self, kind: str, message: str = "", data: dict | None = None) -> None:
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind
        self.message = message
        self.data = data or {}


class RpcUnavailable(RpcError):
    """The peer could not be reached, did not answer in time, or the connection broke."""

    def __init__(self, message: str) -> None:
        super().__init__("Unavailable", message)


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame; the connection is dropped."""


class _Closed(Exception):
    """The peer closed the connection."""


# ---------------------------------------------------------------- frames


class EncodedArgs:
    """Call arguments encoded to JSON once (``RpcClient.call`` takes them as
    ``args``): a request sent to several peers is not encoded once per peer."""

    __slots__ = ("json",)

    def __init__(self, args: dict) -> None:
        self.json = json.dumps(args, separators=(",", ":")).encode()


def encode_frame(header: dict, attachments: Sequence[bytes] = ()) -> list[bytes | memoryview]:
    """The chunks of one frame; raises TypeError/ValueError if it cannot be sent."""
    sizes = [len(a) for a in attachments]
    if sum(sizes) > MAX_ATTACHMENTS:
        raise ValueError(f"attachments of {sum(sizes)} bytes exceed {MAX_ATTACHMENTS}")
    args = header.get("args")
    if isinstance(args, EncodedArgs):  # splice the encoded args into the header object
        rest = {k: v for k, v in header.items() if k != "args"}
        body = json.dumps({**rest, "att": sizes}, separators=(",", ":")).encode()
        body = b"".join((body[:-1], b',"args":', args.json, b"}"))
    else:
        body = json.dumps({**header, "att": sizes}, separators=(",", ":")).encode()
    if len(body) > MAX_HEADER:
        raise ValueError(f"header of {len(body)} bytes exceeds {MAX_HEADER}")
    head = _LEN.pack(len(body)) + body
    if len(head) + sum(sizes) <= _SMALL:
        return [b"".join([head, *attachments])]
    return [head, *(memoryview(a) for a in attachments if len(a))]


def send_chunks(sock: Any, chunks: list[bytes | memoryview]) -> None:
    """Each chunk in full.  ``send`` in a loop rather than ``sendall``:
    gevent's sendall asks the kernel for SO_SNDBUF (a getsockopt) and
    slices the data on every call, while a frame nearly always goes in one
    send (gevent waits for room in the buffer)."""
    for chunk in chunks:
        n, size = sock.send(chunk), len(chunk)
        if n < size:
            view = memoryview(chunk)
            while n < size:
                n += sock.send(view[n:])


def write_frame(sock: Any, header: dict, attachments: Sequence[bytes] = ()) -> None:
    """Send one frame (callers serialize writers)."""
    send_chunks(sock, encode_frame(header, attachments))


def read_frame(sock: Any) -> tuple[dict, list[bytes]]:
    """Read one frame, not a byte more; _Closed on EOF, ProtocolError if malformed."""
    return _parse_frame(lambda n: _recv_exact(sock, n))


def _parse_frame(read: Callable[[int], bytes]) -> tuple[dict, list[bytes]]:
    (length,) = _LEN.unpack(read(4))
    if length > MAX_HEADER:
        raise ProtocolError(f"header of {length} bytes exceeds {MAX_HEADER}")
    try:
        header = json.loads(read(length))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    sizes = header.pop("att", [])
    if (
        not isinstance(sizes, list)
        or not all(type(n) is int and n >= 0 for n in sizes)
        or sum(sizes) > MAX_ATTACHMENTS
    ):
        raise ProtocolError(f"bad attachment lengths {str(sizes)[:80]}")
    return header, [read(n) for n in sizes]


def _recv_exact(sock: Any, n: int, parts: list[bytes] | None = None) -> bytes:
    """``n`` bytes from ``sock`` (after the ``parts`` already in hand)."""
    parts = parts or []
    left = n - sum(len(p) for p in parts)
    while left > 0:
        data = sock.recv(min(left, _CHUNK))
        if not data:
            raise _Closed("connection closed by peer")
        parts.append(data)
        left -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class FrameReader:
    """Reads the frames of an rpc-mode connection through a buffer.

    One TLS read usually brings several small frames; only the connection's
    own reader may use it (never before a stream hand-off: it reads ahead).
    """

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._buf = b""
        self._pos = 0

    def read_frame(self) -> tuple[dict, list[bytes]]:
        return _parse_frame(self._read)

    def _read(self, n: int) -> bytes:
        end = self._pos + n
        if end <= len(self._buf):
            self._pos = end
            return self._buf[end - n : end]
        head = self._buf[self._pos :]
        self._buf, self._pos = b"", 0
        if n - len(head) >= _BUFFER:  # a large attachment: read it straight
            return _recv_exact(self.sock, n, [head] if head else [])
        while len(head) < n:
            data = self.sock.recv(_BUFFER)
            if not data:
                raise _Closed("connection closed by peer")
            head += data
        self._buf, self._pos = head, n
        return head[:n]


# ---------------------------------------------------------------- sockets


def split_address(address: str) -> tuple[str, int]:
    """'127.0.0.2:7400' or '[::1]:7400' -> (host, port); ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad node address {address!r} (expected HOST:PORT)")
    return host, int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tune(sock: Any) -> None:
    """TCP_NODELAY (no delayed-ACK stalls) and keepalives (dead peers are noticed)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _wrap(sock: Any, context: ssl.SSLContext, server_side: bool) -> Any:
    """A gevent TLS socket over ``sock``, not yet handshaken.

    A plain ``ssl.SSLContext`` (unpatched process) would wrap into a blocking
    stdlib socket; gevent's SSLSocket accepts any context (as its own
    SSLContext.wrap_socket does, through ``_context``).
    """
    if isinstance(context, gssl.SSLContext):
        return context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    return gssl.SSLSocket(
        sock=sock, server_side=server_side, do_handshake_on_connect=False, _context=context
    )


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


# ---------------------------------------------------------------- server


class RpcServer:
    """Accepts mTLS connections on one address and runs registered handlers."""

    def __init__(
        self, listen: str, ssl_context: ssl.SSLContext, handshake_timeout: float = HANDSHAKE_TIMEOUT
    ) -> None:
        self.listen = listen
        self._context = ssl_context
        self._handshake_timeout = handshake_timeout
        self._handlers: dict[str, Handler] = {}
        self._streams: dict[str, StreamHandler] = {}
        self._server: StreamServer | None = None
        self._sockets: set[Any] = set()  # every live connection (raw until wrapped)
        self._connections = Group()  # one greenlet per connection
        self._calls = Group()  # one greenlet per request being handled

    def register(self, method: str, handler: Handler) -> None:
        self._handlers[method] = handler

    def register_stream(self, method: str, handler: StreamHandler) -> None:
        self._streams[method] = handler

    @property
    def bound_address(self) -> str:
        if self._server is None:
            raise RuntimeError("RpcServer is not started")
        host, port = self._server.socket.getsockname()[:2]
        return join_address(host, port)

    @property
    def connection_count(self) -> int:
        """Connections open right now (after their TLS handshake)."""
        return sum(1 for s in self._sockets if isinstance(s, gssl.SSLSocket))

    def start(self) -> None:
        host, port = split_address(self.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = gsocket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"rpc: cannot listen on {self.listen}: {exc.strerror}"
            ) from None
        self._server = StreamServer(sock, self._accept)
        self._server.start()
        log.info("rpc listening on %s", self.bound_address)

    def stop(self, timeout: float = 2.0) -> None:
        """Close the listener and every connection; handlers get ``timeout`` to finish."""
        if self._server is not None:
            self._server.close()
        for sock in list(self._sockets):
            _close(sock)
        self._connections.kill(block=True, timeout=timeout)
        self._calls.join(timeout=timeout)
        self._calls.kill(block=True, timeout=timeout)

    # -- one connection

    def _accept(self, raw: Any, address: tuple) -> None:
        self._connections.add(gevent.getcurrent())
        self._sockets.add(raw)
        where = join_address(*address[:2])
        peer = "?"
        sock = raw
        try:
            _tune(raw)
            raw.settimeout(self._handshake_timeout)
            sock = _wrap(raw, self._context, server_side=True)
            self._sockets.discard(raw)
            self._sockets.add(sock)
            try:
                sock.do_handshake()
                peer = peer_name(sock)
            except (OSError, ssl.SSLError) as exc:
                log.warning(
                    "rpc: refused %s: TLS handshake failed (not a cluster node?): %s", where, exc
                )
                return
            header, _ = read_frame(sock)
            sock.settimeout(None)
            self._serve(sock, peer, header)
        except ProtocolError as exc:
            log.warning("rpc: dropping %s (%s): %s", peer, where, exc)
        except (_Closed, OSError, ssl.SSLError) as exc:
            log.debug("rpc: connection from %s (%s) ended: %s", peer, where, exc)
        except ValueError as exc:
            if sock.fileno() != -1:
                log.exception("rpc: connection from %s (%s) failed", peer, where)
            else:  # stop() closed it under our read ("Read on closed ... SSL socket")
                log.debug("rpc: connection from %s (%s) closed: %s", peer, where, exc)
        except Exception:
            log.exception("rpc: connection from %s (%s) failed", peer, where)
        finally:
            self._sockets.discard(raw)
            self._sockets.discard(sock)
            _close(sock)

    def _serve(self, sock: Any, peer: str, header: dict) -> None:
        mode = header.get("mode")
        if mode == "rpc":
            self._serve_calls(sock, peer)
        elif mode == "stream":
            self._serve_stream(sock, peer, header)
        else:
            raise ProtocolError(f"unknown mode {str(mode)[:40]!r}")

    def _serve_calls(self, sock: Any, peer: str) -> None:
        lock = Semaphore()
        slots = Semaphore(MAX_INFLIGHT)  # a Pool's bound without its Group (per call: less)
        reader = FrameReader(sock)
        while True:
            header, attachments = reader.read_frame()
            rid, method, args = header.get("id"), header.get("method"), header.get("args", {})
            if (
                type(rid) not in (int, str)
                or not isinstance(method, str)
                or not isinstance(args, dict)
            ):
                raise ProtocolError("request needs an id (int or str), a method and args (object)")
            deadline = header.get("deadline")
            slots.acquire()
            self._calls.add(gevent.spawn(
                self._run_call, sock, lock, slots, peer, rid, method, args, attachments, deadline
            ))

    def _run_call(
        self,
        sock: Any,
        lock: Semaphore,
        slots: Semaphore,
        peer: str,
        rid: Any,
        method: str,
        args: dict,
        attachments: list[bytes],
        deadline: Any,
    ) -> None:
        try:
            self._answer_call(sock, lock, peer, rid, method, args, attachments, deadline)
        finally:
            slots.release()

    def _answer_call(
        self,
        sock: Any,
        lock: Semaphore,
        peer: str,
        rid: Any,
        method: str,
        args: dict,
        attachments: list[bytes],
        deadline: Any,
    ) -> None:
        if _expired(deadline):
            log.debug("rpc: %s from %s arrived after its caller gave up", method, peer)
            answer, out = _error(rid, "Expired", f"{method}: the caller's deadline passed"), ()
        else:
            answer, out = self._invoke(peer, rid, method, args, attachments)
        try:
            chunks = encode_frame(answer, out)
        except (TypeError, ValueError, RecursionError) as exc:
            log.warning("rpc: %s from %s: cannot send the result: %s", method, peer, exc)
            chunks = encode_frame(_error(rid, "BadResult", f"{method}: {exc}"))
        timer = gevent.Timeout(RESPONSE_WRITE_TIMEOUT)
        try:
            with lock:
                timer.start()
                send_chunks(sock, chunks)
        except (OSError, ssl.SSLError) as exc:
            log.debug("rpc: answer to %s for %s lost: %s", peer, method, exc)
            _close(sock)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            log.warning("rpc: %s reads nothing for %.0f s; dropped", peer, RESPONSE_WRITE_TIMEOUT)
            _close(sock)  # a partly written frame leaves the stream unusable
        except BaseException:
            _close(sock)
            raise
        finally:
            timer.close()

    def _invoke(
        self, peer: str, rid: Any, method: str, args: dict, attachments: list[bytes]
    ) -> tuple[dict, Sequence[bytes]]:
        handler = self._handlers.get(method)
        if handler is None:
            return _error(rid, "NoSuchMethod", f"no RPC method {method!r}"), ()
        try:
            result, out = handler(peer, args, attachments)
        except Exception as exc:
            _log_handler_error(method, peer, exc)
            return _error(rid, type(exc).__name__, str(exc), getattr(exc, "rpc_data", None)), ()
        if not isinstance(result, dict):
            return _error(rid, "BadResult", f"{method} returned {type(result).__name__}"), ()
        return {"id": rid, "ok": True, "result": result}, list(out or ())

    def _serve_stream(self, sock: Any, peer: str, header: dict) -> None:
        method, args = header.get("method"), header.get("args", {})
        if not isinstance(method, str) or not isinstance(args, dict):
            raise ProtocolError("stream needs a method and args (object)")
        handler = self._streams.get(method)
        if handler is None:
            write_frame(
                sock, {"ok": False, "kind": "NoSuchMethod", "message": f"no stream {method!r}"}
            )
            return
        write_frame(sock, {"ok": True})
        try:
            handler(peer, args, sock)
        except (OSError, ssl.SSLError) as exc:
            log.debug("rpc: stream %s with %s ended: %s", method, peer, exc)
        except Exception:
            log.warning("rpc: stream %s with %s failed", method, peer, exc_info=True)


def _expired(deadline: Any) -> bool:
    """True if a request's wall-clock deadline passed (beyond CLOCK_SKEW): never run it."""
    if type(deadline) not in (int, float):
        return False
    return time.time() > deadline + CLOCK_SKEW


def _error(rid: Any, kind: str, message: str, data: Any = None) -> dict:
    answer = {"id": rid, "ok": False, "kind": kind, "message": message}
    if isinstance(data, dict):
        answer["data"] = data
    return answer


def _log_handler_error(method: str, peer: str, exc: Exception) -> None:
    """Built-in exception classes are likely bugs (traceback); others are domain answers."""
    if type(exc).__module__ == "builtins":
        log.warning("rpc: %s from %s raised %r", method, peer, exc, exc_info=exc)
    else:
        log.debug("rpc: %s from %s raised %r", method, peer, exc)


# ---------------------------------------------------------------- client


class _Connection:
    """One multiplexed client connection and the calls waiting on it."""

    def __init__(self, sock: Any, address: str, on_dead: Callable[[_Connection], None]) -> None:
        self.sock = sock
        self.address = address
        self.dead: str | None = None
        self._on_dead = on_dead
        self._pending: dict[int, AsyncResult] = {}
        self._ids = itertools.count(1)
        self._lock = Semaphore()
        self._reader = gevent.spawn(self._read_loop)

    def call(
        self, method: str, args: dict | EncodedArgs, attachments: Sequence[bytes],
        deadline: float,
    ) -> tuple[dict, list[bytes]]:
        rid = next(self._ids)
        header = {"id": rid, "method": method, "args": args}
        header["deadline"] = round(time.time() + max(0.0, deadline - time.monotonic()), 3)
        chunks = encode_frame(header, attachments)
        waiter = AsyncResult()
        self._pending[rid] = waiter
        try:
            self._send(chunks, deadline)
            waiter.wait(timeout=max(0.0, deadline - time.monotonic()))
            if not waiter.ready():
                raise RpcUnavailable(f"{self.address}: {method} timed out")
            return waiter.get()
        finally:
            self._pending.pop(rid, None)

    def _send(self, chunks: list[bytes | memoryview], deadline: float) -> None:
        """Write one frame within the deadline; a write cut short kills the connection."""
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise RpcUnavailable(f"{self.address}: timed out waiting to write")
        timer = gevent.Timeout(max(0.001, deadline - time.monotonic()))
        writing = False
        try:
            if self.dead:
                raise RpcUnavailable(f"{self.address}: {self.dead}")
            timer.start()
            writing = True
            send_chunks(self.sock, chunks)
            writing = False
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise RpcUnavailable(f"{self.address}: write timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise RpcUnavailable(f"{self.address}: connection lost: {exc}") from None
        finally:
            timer.close()
            if writing:  # cut short: the peer would take what follows for garbage
                self.close("connection lost: a write was cut short")
            self._lock.release()

    def _read_loop(self) -> None:
        reason = "connection closed"
        reader = FrameReader(self.sock)
        try:
            while True:
                header, attachments = reader.read_frame()
                self._dispatch(header, attachments)
        except gevent.GreenletExit:
            reason = self.dead or "connection closed"
        except (_Closed, OSError, ssl.SSLError) as exc:
            reason = f"connection lost: {exc}"
        except Exception as exc:
            log.warning("rpc: bad answer from %s: %s", self.address, exc)
            reason = f"bad answer: {exc}"
        finally:
            self.close(reason)

    def _dispatch(self, header: dict, attachments: list[bytes]) -> None:
        rid = header.get("id")
        waiter = self._pending.pop(rid, None) if type(rid) is int else None
        if waiter is None:
            return  # its caller gave up (timeout)
        if header.get("ok") is True:
            result = header.get("result")
            waiter.set((result if isinstance(result, dict) else {}, attachments))
        else:
            data = header.get("data")
            waiter.set_exception(
                RpcError(
                    str(header.get("kind", "RemoteError")),
                    str(header.get("message", "")),
                    data if isinstance(data, dict) else None,
                )
            )

    def close(self, reason: str) -> None:
        """Fail every pending call at once and drop the socket (idempotent)."""
        if self.dead is None:
            self.dead = reason
            self._on_dead(self)
        _close(self.sock)
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.set_exception(RpcUnavailable(f"{self.address}: {self.dead}"))
        if self._reader is not gevent.getcurrent():
            self._reader.kill(block=False)


class RpcClient:
    """Calls other nodes; one persistent multiplexed connection per peer address."""

    def __init__(self, ssl_context: ssl.SSLContext, connect_timeout: float = 3.0) -> None:
        self._context = ssl_context
        self.connect_timeout = connect_timeout
        self._connections: dict[str, _Connection] = {}
        self._connecting: dict[str, Semaphore] = {}
        self._closed = False

    def call(
        self,
        address: str,
        method: str,
        args: dict | EncodedArgs,
        attachments: Sequence[bytes] = (),
        timeout: float = 10.0,
    ) -> tuple[dict, list[bytes]]:
        """Run ``method`` on the node at ``address`` -> (result, attachments).
        ``args`` may be :class:`EncodedArgs` (the same JSON object, encoded once).

        Raises RpcError(kind, message) when the handler raised, RpcUnavailable
        when the peer cannot be reached or does not answer within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        connection = self._connection(address, deadline)
        return connection.call(method, args, attachments, deadline)

    def open_stream(self, address: str, method: str, args: dict, timeout: float = 10.0) -> Any:
        """A TLS socket handed to the peer's stream handler ``method`` (caller closes it)."""
        deadline = time.monotonic() + timeout
        sock = self._open(address, deadline)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            write_frame(sock, {"mode": "stream", "method": method, "args": args})
            header, _ = read_frame(sock)
            sock.settimeout(None)
        except (_Closed, OSError, ssl.SSLError, ProtocolError) as exc:
            _close(sock)
            raise RpcUnavailable(f"{address}: stream {method}: {exc}") from None
        if header.get("ok") is not True:
            _close(sock)
            raise RpcError(str(header.get("kind", "RemoteError")), str(header.get("message", "")))
        return sock

    def close(self) -> None:
        """Close every connection; pending calls fail with RpcUnavailable."""
        self._closed = True
        for connection in list(self._connections.values()):
            connection.close("client closed")
        self._connections.clear()

    def _connection(self, address: str, deadline: float) -> _Connection:
        connection = self._connections.get(address)
        if connection is not None and not connection.dead:
            return connection
        lock = self._connecting.setdefault(address, Semaphore())
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise RpcUnavailable(f"{address}: connect timed out")
        try:
            connection = self._connections.get(address)
            if connection is not None and not connection.dead:
                return connection
            sock = self._open(address, deadline)
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                write_frame(sock, {"mode": "rpc"})
                sock.settimeout(None)
            except (OSError, ssl.SSLError) as exc:
                _close(sock)
                raise RpcUnavailable(f"{address}: {exc}") from None
            if self._closed:  # closed while we were connecting
                _close(sock)
                raise RpcUnavailable(f"{address}: client closed")
            connection = _Connection(sock, address, self._forget)
            self._connections[address] = connection
            return connection
        finally:
            lock.release()

    def _open(self, address: str, deadline: float) -> Any:
        """Connect and handshake within connect_timeout (and the call's deadline)."""
        if self._closed:
            raise RpcUnavailable(f"{address}: client closed")
        try:
            host, port = split_address(address)
        except ValueError as exc:
            raise RpcUnavailable(str(exc)) from None
        timeout = max(0.001, min(self.connect_timeout, deadline - time.monotonic()))
        sock = None
        try:
            sock = gsocket.create_connection((host, port), timeout=timeout)
            _tune(sock)
            sock = _wrap(sock, self._context, server_side=False)
            sock.do_handshake()
            return sock
        except (OSError, ssl.SSLError) as exc:
            if sock is not None:
                _close(sock)
            raise RpcUnavailable(f"{address}: cannot connect: {exc}") from None

    def _forget(self, connection: _Connection) -> None:
        if self._connections.get(connection.address) is connection:
            del self._connections[connection.address]
