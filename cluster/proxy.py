"""IMAP and POP3 sessions proxied to the account's primary after login.

Theory of operation: any node accepts IMAP/POP3 clients.  Greeting,
STARTTLS/STLS and authentication happen on the node the client reached (the
directory is replicated everywhere).  When the authenticated account's
shard is led here the session simply goes on.  When another node leads it,
the protocol server (node/imap/server.py, node/pop3/server.py) calls
`hand_over_imap` / `hand_over_pop3`, which

1. opens an `imap.session` / `pop3.session` stream (cluster/rpc.py, mTLS) to
   the primary with what the session needs: account, login tag, client IP,
   whether the client's connection is TLS, ENABLEd capabilities;
2. reads the primary's answer to the login: the primary starts the session
   in the authenticated state (`Session.resume`, `Pop3Session.open_maildrop`)
   and writes the login's reply itself (`tag OK [CAPABILITY ...]`, `+OK
   maildrop has ...`).  While placement settles (no primary yet, a new
   primary still syncing, one that no longer leads and says `NO
   [UNAVAILABLE]` / `-ERR [SYS/TEMP]`, one not reachable) the login is
   re-routed for at most ``[cluster] settle`` seconds (the router's window), each reason logged; a
   shard that comes to be led here meanwhile is served here.  Any other
   refusal (say `-ERR [IN-USE]`), or a shard still unavailable at the end
   (or a primary that did not answer within the RPC timeout), is answered
   locally and the client stays unauthenticated;
3. forwards that reply, then the bytes the client pipelined after its login,
   then pipes both directions until either side closes.  COMPRESS, IDLE and
   everything else after login are the primary's business: bytes pass
   through unchanged.

A piped session costs two greenlets (one per direction) blocked in recv,
and one role-change callback; nothing polls.  When the view says the
shard's primary changed, the proxy closes the stream, sends `* BYE
[UNAVAILABLE] Mailbox moved, reconnect` (RFC 9051 §7.1.5) or `-ERR [SYS/TEMP]
mailbox moved` and hangs up; the client reconnects and lands on the new
primary.  Sessions served on a primary that loses the shard end the same way
(node/imap/session.py, node/pop3/session.py).  The notice goes out between
two chunks of the primary's output, so a client may see it after a response
cut short: the session is over either way.

The RPC client and timeout are those of the node's ClusterStore (ctx.store
in cluster mode, cluster/router.py).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import gevent

from cluster.router import SETTLE, ClusterStore
from cluster.rpc import RpcError, RpcServer
from node.context import NodeContext
from node.pop3.session import ERR_SYS_TEMP

log = logging.getLogger("postroom.cluster.proxy")

MOVED_IMAP = b"* BYE [UNAVAILABLE] Mailbox moved, reconnect\r\n"
MOVED_POP3 = b"-ERR [SYS/TEMP] mailbox moved\r\n"
PIPE_SIZE = 65536
YIELD_AT = 16384  # octets read at once (a full TLS record) after which the relay yields
MAX_FIRST_LINE = 16384  # octets of the primary's answer to the login
LOCAL = object()  # _settled: the shard is led here now, serve the login locally
TIMED_OUT = "the primary did not answer the login in time"


# ---------------------------------------------------------- the proxy side


def hand_over_imap(ctx: NodeContext, conn: Any) -> bool:
    """Serve an IMAP login (``conn.session.want_proxy``) on the account's
    primary; True once the piped session is over, False if the login was
    answered here instead (node/imap/server.py Connection)."""
    session = conn.session
    tag, account = session.want_proxy
    args = {"account": account, "tag": tag, "peer_ip": session.peer_ip, "tls": session.tls,
            "enabled": sorted(session.enabled)}
    outcome = _settled(ctx, "imap.session", account, args, MOVED_IMAP,
                       f"{tag} OK ".encode(), f"{tag} NO ".encode(), b"[UNAVAILABLE]")
    if outcome is LOCAL:
        with conn.lock:
            session.proxy_local()
        return False
    if not isinstance(outcome, Pipe):
        with conn.lock:
            session.proxy_refused(outcome or None)  # b"": NO [UNAVAILABLE]
        return False
    pipe = outcome
    with conn.lock:
        pending = session.framer.take_buffer()
        session.proxy_started()
    log.info("imap: %s from %s proxied to %s", account, session.peer_ip, pipe.primary)
    pipe.run(conn.sock, pending)
    return True


def hand_over_pop3(ctx: NodeContext, sock: Any, session: Any, account: str) -> bool:
    """The same for a POP3 login (node/pop3/server.py); False: the client
    got the refusal (the session stays in the AUTHORIZATION state) or the
    maildrop was opened here after all."""
    args = {"account": account, "peer_ip": session.peer_ip, "tls": session.secure}
    outcome = _settled(ctx, "pop3.session", account, args, MOVED_POP3, b"+OK", b"-ERR ",
                       b"[SYS/TEMP]")
    if outcome is LOCAL:
        sock.sendall(b"".join(session.open_maildrop(account).chunks))
        return False
    if not isinstance(outcome, Pipe):
        sock.sendall(outcome or ERR_SYS_TEMP.encode())
        return False
    pipe = outcome
    pending = session.discard_input()
    session.close()
    log.info("pop3: %s from %s proxied to %s", account, session.peer_ip, pipe.primary)
    pipe.run(sock, pending)
    return True


def _settled(ctx: NodeContext, method: str, account: str, args: dict, goodbye: bytes,
             accepted: bytes, refused: bytes, transient: bytes) -> Pipe | bytes | object:
    """A pipe to the account's primary, re-routed while placement settles.

    A shard between two primaries (no primary yet, a new primary still
    syncing its followers, a primary that no longer leads, an unreachable
    one) is retried for at most the ClusterStore's ``settle`` seconds, as the
    router does for SMTP (cluster/router.py), so the client sees a short
    delay, not a refusal.
    Returns the Pipe, LOCAL if the shard came to be led here meanwhile, or
    the refusal line to send (b"": the generic "unavailable" one)."""
    view = ctx.cluster
    number = view.shard_of(account) if view is not None else -1
    deadline = time.monotonic() + getattr(ctx.store, "settle", SETTLE)
    delay = 0.05
    tries = 0
    while True:
        tries += 1
        if view is not None and view.is_local_primary(number):
            log.info("%s: shard %d of %s is led here now: served locally", method, number,
                     account)
            return LOCAL
        pipe, why = Pipe.open(ctx, method, account, args, goodbye)
        refusal = _refusal(pipe, accepted, refused)
        if pipe is not None and refusal is None:
            if tries > 1:
                log.info("%s: %s reached its primary %s after %d tries", method, account,
                         pipe.primary, tries)
            return pipe
        if refusal is not None:
            why = f"the primary refused: {refusal.strip()[:120]!r}"
            if refusal and transient not in refusal:
                return refusal  # final (e.g. the maildrop is in use)
        if why == TIMED_OUT or time.monotonic() + delay > deadline:
            log.warning("%s: %s refused as unavailable after %d tries: %s", method, account,
                        tries, why)
            return refusal or b""
        log.info("%s: %s: %s; retrying", method, account, why)
        gevent.sleep(delay)
        delay = min(delay * 2, 0.5)


def _refusal(pipe: Pipe | None, accepted: bytes, refused: bytes) -> bytes | None:
    """None if there is no pipe or the primary accepted the login (its
    answer starts with ``accepted``); else the primary's refusal line to
    forward (b"" when it gave none usable), and the pipe is closed."""
    if pipe is None or pipe.first.startswith(accepted):
        return None
    pipe.close()
    line, newline, _ = pipe.first.partition(b"\n")
    return line + newline if newline and line.startswith(refused) else b""


class Pipe:
    """A stream to the account's primary, piped to a client socket."""

    def __init__(self, upstream: Any, primary: str, goodbye: bytes) -> None:
        self.upstream = upstream
        self.primary = primary
        self.goodbye = goodbye
        self.first = b""  # the primary's first output: the answer to the login
        self.moved = False
        self._cancel: Callable[[], None] | None = None

    @classmethod
    def open(cls, ctx: NodeContext, method: str, account: str, args: dict,
             goodbye: bytes) -> tuple[Pipe | None, str]:
        """Open the stream and read the primary's answer: (pipe, "") or
        (None, why there is no primary to reach now)."""
        view, store = ctx.cluster, ctx.store
        if view is None or not isinstance(store, ClusterStore):
            return None, "not in cluster mode"
        number = view.shard_of(account)
        primary = view.primary_of(number)
        if primary is None:
            return None, f"shard {number} has no primary"
        if primary == view.node_name:
            return None, f"shard {number}: this node is named primary but not leading yet"
        address = view.rpc_address(primary)
        if address is None:
            return None, f"shard {number}: primary {primary} is not a member"
        pipe: Pipe | None = None

        def changed(shard: int) -> None:
            if shard == number and view.primary_of(number) != primary and pipe is not None:
                pipe.primary_moved()

        try:
            upstream = store.rpc.open_stream(address, method, args, timeout=store.timeout)
        except RpcError as exc:
            return None, f"primary {primary} unreachable: {exc}"
        except Exception:  # e.g. a malformed address: the login is answered "unavailable"
            log.exception("%s: cannot open a stream to %s at %s", method, primary, address)
            return None, f"cannot open a stream to {primary}"
        pipe = cls(upstream, primary, goodbye)
        pipe._cancel = view.on_role_change(changed)
        if view.primary_of(number) != primary:
            pipe.close()
            return None, f"shard {number}: the primary changed from {primary}"
        why = pipe._read_first(store.timeout)
        if why:
            pipe.close()
            return None, why
        return pipe, ""

    def _read_first(self, timeout: float) -> str:
        """Read the answer to the login: "" once a line came, else why not."""
        try:
            self.upstream.settimeout(timeout)
            while b"\n" not in self.first and len(self.first) < MAX_FIRST_LINE:
                data = self.upstream.recv(PIPE_SIZE)
                if not data:
                    break
                self.first += data
            self.upstream.settimeout(None)
        except TimeoutError:
            return TIMED_OUT
        except (OSError, ssl.SSLError, ValueError) as exc:
            return f"primary {self.primary} did not answer the login: {exc}"
        return "" if self.first else f"primary {self.primary} closed without an answer"

    def primary_moved(self) -> None:
        """The shard's primary changed: end the session with the notice."""
        self.moved = True
        _close(self.upstream)  # wakes both directions

    def close(self) -> None:
        if self._cancel is not None:
            cancel, self._cancel = self._cancel, None
            cancel()
        _close(self.upstream)

    def run(self, client: Any, pending: bytes) -> None:
        """Forward the answer and the client's pipelined bytes, then copy
        both ways until either side closes; closes both."""
        try:
            client.settimeout(None)  # the primary's session times out, not the pipe
            client.sendall(self.first)
            if pending:
                self.upstream.sendall(pending)
        except (OSError, ssl.SSLError, ValueError):
            self.close()
            self._down(client)  # the notice, if the primary moved meanwhile
            return
        down = gevent.spawn(self._down, client)
        try:
            _copy(client, self.upstream)
        finally:
            _close(self.upstream)
            down.join()
            self.close()

    def _down(self, client: Any) -> None:
        """Primary -> client, then the notice if the primary moved; closing
        the client ends the other direction."""
        try:
            if not self.moved:
                _copy(self.upstream, client)
            if self.moved:
                client.sendall(self.goodbye)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            _close(client)


def _copy(src: Any, dst: Any) -> None:
    """Bytes from src to dst until src ends or either fails.

    One buffer per direction, reused; bytes pass unparsed.  A read that
    filled a TLS record (or the buffer) may have more queued behind it, and
    gevent's recv returns at once while data is buffered: only then does
    the loop yield, so a bulk transfer cannot keep the hub to itself while
    the command/response ping-pong (short reads) pays no extra hub cycle."""
    buf = bytearray(PIPE_SIZE)
    view = memoryview(buf)
    recv_into, send = src.recv_into, dst.send
    try:
        while True:
            n = recv_into(buf)
            if not n:
                return
            # send, not sendall: gevent's sendall asks the kernel for SO_SNDBUF
            # (a getsockopt) and slices into chunks on every call; a relayed
            # chunk nearly always goes in one send (gevent waits for room).
            sent = send(view[:n])
            while sent < n:
                sent += send(view[sent:n])
            if n >= YIELD_AT:
                gevent.idle()
    except (OSError, ssl.SSLError, ValueError):
        # ValueError: gevent's TLS socket read after it was closed elsewhere.
        return


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


# -------------------------------------------------------- the primary side


def register_handlers(rpc_server: RpcServer, ctx: NodeContext) -> None:
    """Serve `imap.session` and `pop3.session` streams: sessions other nodes
    authenticated, for accounts of shards led here."""

    def imap_session(peer: str, args: dict, sock: Any) -> None:
        from node.imap.server import Connection

        conn = Connection(ctx, sock, str(args.get("peer_ip", "")), tls=bool(args.get("tls")))
        with conn.lock:
            conn.session.resume(str(args.get("tag", "*")), str(args.get("account", "")),
                                [str(e) for e in args.get("enabled") or ()])
        log.debug("imap: session of %s handed over by %s", args.get("account"), peer)
        conn.serve(greet=False)

    def pop3_session(peer: str, args: dict, sock: Any) -> None:
        from node.pop3.server import serve_resumed

        log.debug("pop3: session of %s handed over by %s", args.get("account"), peer)
        serve_resumed(ctx, sock, peer_ip=str(args.get("peer_ip", "")),
                      secure=bool(args.get("tls")), account=str(args.get("account", "")))

    rpc_server.register_stream("imap.session", imap_session)
    rpc_server.register_stream("pop3.session", pop3_session)
