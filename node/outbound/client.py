"""The outbound SMTP client's transport: one connection to one host address.

Sockets are gevent's (the node process is monkey-patched); the protocol
decisions live in node/outbound/client_protocol.py.  A ``Connection``:

- connects within ``outbound.connect_timeout``, reads the greeting
  (RFC 5321 §4.5.3.2.1), sends EHLO and falls back to HELO on 500/502;
- negotiates STARTTLS (RFC 3207) when offered (opportunistic) or when the
  ``TlsPolicy`` requires it; after the handshake the policy checks the peer
  (MTA-STS/DANE, ``TransportPolicy.check_peer``), any buffered plaintext is
  dropped and EHLO is sent again (RFC 3207 §4.2).  An opportunistic
  handshake failure is retried once in plaintext on a new connection; a
  required one is never sent in clear;
- sends transactions (``send``): with PIPELINING (RFC 2920) RSET (on a
  reused connection), MAIL, every RCPT and DATA in one write, then the
  dot-stuffed message: two round trips per message; without it each command
  on its own, RSET before each further message; BDAT chunks (RFC 3030) when
  offered; each phase under its RFC 5321 §4.5.3.2 timeout.

Connection-level failures raise ``ConnectFailed`` (with ``next_host``: try
the next address/MX, RFC 5321 §5.1) or ``ConnectionLost`` mid-transaction.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from node.config import OutboundSettings
from node.net.tls import describe
from node.outbound.client_protocol import (
    DELIVERED,
    Envelope,
    Extensions,
    Outcome,
    Reply,
    ReplyError,
    ReplyParser,
    bdat_chunks,
    check_transaction,
    deferred,
    dot_stuff,
    envelope_plan,
)

log = logging.getLogger("postroom.outbound.client")

READ_SIZE = 65536
WRITE_BLOCK = 65536


class ConnectFailed(Exception):
    """No session with this address; ``outcome`` says why (for the log/DSN)."""

    def __init__(self, outcome: Outcome, *, next_host: bool = True, plaintext_retry: bool = False):
        super().__init__(str(outcome))
        self.outcome = outcome
        self.next_host = next_host
        self.plaintext_retry = plaintext_retry


class ConnectionLost(Exception):
    """The session broke; ``outcome`` is temporary.  ``before_transaction``:
    nothing of this message was sent yet (a reused connection that died
    idle), so another connection may be tried at once."""

    def __init__(self, outcome: Outcome, *, before_transaction: bool = False):
        super().__init__(str(outcome))
        self.outcome = outcome
        self.before_transaction = before_transaction


class Connection:
    """One SMTP client session to ``address``:``port`` for MX ``mx_host``.

    ``policy`` is a node.outbound.policy.TlsPolicy and ``engine`` the
    TransportPolicy that builds its SSLContext and checks the peer.
    """

    def __init__(
        self,
        settings: OutboundSettings,
        helo_name: str,
        mx_host: str,
        address: str,
        port: int,
        policy: Any,
        engine: Any,
        *,
        allow_tls: bool = True,
    ) -> None:
        self.settings = settings
        self.helo_name = helo_name
        self.mx_host = mx_host
        self.address = address
        self.port = port
        self.policy = policy
        self.engine = engine
        self.allow_tls = allow_tls
        self.sock: socket.socket | None = None
        self.parser = ReplyParser()
        self._replies: list[Reply] = []
        self.ext = Extensions.helo()
        self.tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" once encrypted
        self.messages = 0
        self.usable = False
        self.policy_label = "none"  # TLS policy sources for the delivery log line
        self.requiretls = False  # opened for a REQUIRETLS message (RFC 8689)

    # -- opening -------------------------------------------------------------

    def open(self) -> None:
        """Connect, greet, EHLO, STARTTLS; raises ConnectFailed."""
        s = self.settings
        try:
            self.sock = socket.create_connection((self.address, self.port), timeout=s.connect_timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise ConnectFailed(deferred(451, "4.4.1", f"connect to {self._where()} failed: "
                                         f"{exc.strerror or type(exc).__name__}")) from None
        try:
            greeting = self._read(s.greeting_timeout)
            if not greeting.positive:
                # RFC 5321 §3.1: a 554 (or 4xx) greeting; try the next MX.
                self.close(quit=True)
                raise ConnectFailed(Outcome.from_reply(greeting))
            self._ehlo()
            if self._wants_tls():
                self._starttls()
            elif self.policy.require_tls:
                self.close(quit=True)
                raise ConnectFailed(deferred(
                    451, "4.7.4", f"TLS is required but {self.mx_host} does not offer STARTTLS"))
        except ConnectionLost as exc:
            self.close()
            raise ConnectFailed(exc.outcome) from None
        self.usable = True

    def _where(self) -> str:
        return f"{self.mx_host}[{self.address}]:{self.port}"

    def _wants_tls(self) -> bool:
        return self.ext.starttls and (self.allow_tls or self.policy.require_tls)

    def _ehlo(self) -> None:
        reply = self._command(f"EHLO {self.helo_name}\r\n".encode(), self.settings.command_timeout)
        if reply.positive:
            self.ext = Extensions.from_ehlo(reply)
            return
        if reply.code in (500, 502, 550) and not self.tls:
            reply = self._command(f"HELO {self.helo_name}\r\n".encode(), self.settings.command_timeout)
            if reply.positive:
                self.ext = Extensions.helo()
                return
        self.close(quit=True)
        raise ConnectFailed(Outcome.from_reply(reply))

    def _starttls(self) -> None:
        assert self.sock is not None
        reply = self._command(b"STARTTLS\r\n", self.settings.command_timeout)
        if not reply.positive:
            if self.policy.require_tls:
                self.close(quit=True)
                raise ConnectFailed(deferred(451, "4.7.5", f"STARTTLS refused: {reply}"))
            return  # opportunistic: carry on in plaintext (RFC 3207 §4.1)
        context = self.engine.client_context(self.policy)
        self.sock.settimeout(self.settings.command_timeout)
        try:
            tls = context.wrap_socket(self.sock, server_hostname=self.mx_host)
        except (OSError, ssl.SSLError) as exc:
            self.close()
            reason = f"TLS handshake with {self._where()} failed: {exc}"
            if self.policy.require_tls or self.policy.verify_certificate or self.policy.tlsa:
                raise ConnectFailed(deferred(451, "4.7.5", reason)) from None
            raise ConnectFailed(deferred(451, "4.7.5", reason), plaintext_retry=True) from None
        self.sock = tls
        problem = self.engine.check_peer(tls, self.policy, self.mx_host)
        if problem is not None:
            self.close(quit=True)
            raise ConnectFailed(deferred(451, "4.7.5", f"TLS policy: {problem}"))
        self.tls = describe(tls) or "TLS"
        # RFC 3207 §4.2: forget everything learned before TLS.
        self.parser = ReplyParser()
        self._replies = []
        self.ext = Extensions.helo()
        self._ehlo()

    # -- transactions --------------------------------------------------------

    def send(self, env: Envelope, raw: bytes) -> list[Outcome]:
        """One transaction; an outcome per recipient of ``env``, in order.

        Raises ConnectionLost when the session breaks; the connection is then
        unusable.  A refusal decided before sending (SIZE, SMTPUTF8, ...)
        sends nothing and keeps the connection usable.
        """
        reused = self.messages > 0
        if reused and not self.ext.pipelining:
            self._reset()
        self.messages += 1
        refusal = check_transaction(env, self.ext)
        if refusal is not None:
            return [refusal] * len(env.recipients)
        try:
            replies, data = self._envelope(env, reset=reused and self.ext.pipelining)
        except ConnectionLost as exc:
            if not reused:
                raise
            # Nothing of the message was sent: a reused connection that died
            # idle; the caller may try a new one at once.
            raise ConnectionLost(exc.outcome, before_transaction=True) from None
        mail = replies[0]
        rcpt_outcomes = [Outcome.from_reply(r) for r in replies[1:]]
        accepted = mail.positive and any(o.state == DELIVERED for o in rcpt_outcomes)
        if not accepted:
            if data is not None and data.code == 354:
                self._payload(b".\r\n")  # RFC 2920 §3.1: end the DATA nobody needs
            if not mail.positive:
                return [Outcome.from_reply(mail)] * len(env.recipients)
            return rcpt_outcomes
        if data is None:
            final = self._data(env, raw) if not self.ext.chunking else self._bdat(env, raw)
        else:
            final = data if data.code != 354 else self._payload(dot_stuff(raw))
        outcome = Outcome.from_reply(final)
        return [outcome if o.state == DELIVERED else o for o in rcpt_outcomes]

    def _reset(self) -> None:
        """RSET on its own (servers without PIPELINING)."""
        try:
            reset = self._command(b"RSET\r\n", self.settings.command_timeout)
        except ConnectionLost as exc:
            raise ConnectionLost(exc.outcome, before_transaction=True) from None
        if not reset.positive:
            self.close(quit=True)
            raise ConnectionLost(deferred(451, "4.4.2", f"RSET refused: {reset}"),
                                 before_transaction=True)

    def _envelope(self, env: Envelope, *, reset: bool) -> tuple[list[Reply], Reply | None]:
        """(MAIL and RCPT replies, DATA reply or None).

        With PIPELINING (RFC 2920 §3.1) one write carries RSET (on a reused
        connection), MAIL, every RCPT and -- unless CHUNKING is used -- DATA,
        the last command of a group: one round trip instead of three.
        """
        s = self.settings
        groups = envelope_plan(env, self.ext)
        with_data = self.ext.pipelining and not self.ext.chunking
        if with_data:
            groups[-1] = groups[-1] + [b"DATA\r\n"]
        if reset:
            groups[0] = [b"RSET\r\n"] + groups[0]
        replies: list[Reply] = []
        for group in groups:
            self._write(b"".join(group), s.command_timeout)
            for _ in group:
                replies.append(self._read(s.command_timeout))
            if len(replies) == 1 and not replies[0].positive and not self.ext.pipelining:
                break  # MAIL refused: no RCPT without pipelining
        if reset:
            rset = replies.pop(0)
            if not rset.positive:
                self.close(quit=True)
                raise ConnectionLost(deferred(451, "4.4.2", f"RSET refused: {rset}"))
        data = replies.pop() if with_data else None
        return replies, data

    def _data(self, env: Envelope, raw: bytes) -> Reply:
        s = self.settings
        start = self._command(b"DATA\r\n", s.data_init_timeout)
        if start.code != 354:
            return start
        return self._payload(dot_stuff(raw))

    def _payload(self, payload: bytes) -> Reply:
        """The message after a 354 (dot-stuffed, ending CRLF.CRLF); the final reply."""
        s = self.settings
        for i in range(0, len(payload), WRITE_BLOCK):
            self._write(payload[i : i + WRITE_BLOCK], s.data_block_timeout)
        return self._read(s.data_end_timeout)

    def _bdat(self, env: Envelope, raw: bytes) -> Reply:
        s = self.settings
        reply: Reply | None = None
        for chunk in bdat_chunks(raw, binary=env.body == "BINARYMIME"):
            for i in range(0, len(chunk), WRITE_BLOCK):
                self._write(chunk[i : i + WRITE_BLOCK], s.data_block_timeout)
            last = chunk.split(b"\r\n", 1)[0].endswith(b"LAST")
            reply = self._read(s.data_end_timeout if last else s.data_block_timeout)
            if not reply.positive:
                return reply  # RFC 3030 §2: the transaction is over; RSET follows
        assert reply is not None
        return reply

    # -- I/O ---------------------------------------------------------------------

    def _command(self, line: bytes, timeout: float) -> Reply:
        self._write(line, timeout)
        return self._read(timeout)

    def _write(self, data: bytes, timeout: float) -> None:
        if self.sock is None:
            raise ConnectionLost(deferred(451, "4.4.2", "connection closed"))
        try:
            self.sock.settimeout(timeout)
            # One send() takes a command group or a 5 KB message whole on a
            # connected socket; sendall (a getsockopt and a loop) only for the rest.
            sent = self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
        except TimeoutError:
            self.close()
            raise ConnectionLost(deferred(451, "4.4.2", f"timeout writing to {self._where()}")) from None
        except OSError as exc:
            self.close()
            raise ConnectionLost(deferred(451, "4.4.2", f"connection to {self._where()} lost: "
                                          f"{exc.strerror or type(exc).__name__}")) from None

    def _read(self, timeout: float) -> Reply:
        """The next reply within ``timeout`` seconds (RFC 5321 §4.5.3.2)."""
        while not self._replies:
            if self.sock is None:
                raise ConnectionLost(deferred(451, "4.4.2", "connection closed"))
            try:
                self.sock.settimeout(timeout)
                data = self.sock.recv(READ_SIZE)
            except TimeoutError:
                self.close()
                raise ConnectionLost(deferred(
                    451, "4.4.2", f"timeout ({timeout:g}s) waiting for {self._where()}")) from None
            except OSError as exc:
                self.close()
                raise ConnectionLost(deferred(451, "4.4.2", f"connection to {self._where()} lost: "
                                              f"{exc.strerror or type(exc).__name__}")) from None
            if not data:
                self.close()
                raise ConnectionLost(deferred(451, "4.4.2", f"{self._where()} closed the connection"))
            try:
                self._replies.extend(self.parser.feed(data))
            except ReplyError as exc:
                self.close()
                raise ConnectionLost(deferred(451, "4.5.0", f"protocol error from {self._where()}: {exc}")) from None
        reply = self._replies.pop(0)
        if reply.code == 421:
            # RFC 5321 §3.8: the server is closing; every open transaction is lost.
            self.close()
            raise ConnectionLost(Outcome.from_reply(reply))
        return reply

    def close(self, *, quit: bool = False) -> None:
        """QUIT politely when asked (short timeout), then close the socket."""
        self.usable = False
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if quit:
            try:
                sock.settimeout(min(5.0, self.settings.command_timeout))
                sock.sendall(b"QUIT\r\n")
                sock.recv(READ_SIZE)
            except OSError:
                pass
        try:
            sock.close()
        except OSError:
            pass


def open_connection(
    settings: OutboundSettings,
    helo_name: str,
    mx_host: str,
    addresses: Sequence[str],
    port: int,
    policy: Any,
    engine: Any,
) -> tuple[Connection | None, list[tuple[str, Outcome]]]:
    """The first address of one host that gives a session, and the failures on the way.

    An opportunistic STARTTLS handshake failure is retried once in
    plaintext on the same address.  Returns (None, failures) when no address
    worked; a failure with next_host=False stops the walk.
    """
    failures: list[tuple[str, Outcome]] = []
    for address in addresses:
        allow_tls = True
        for _ in range(2):
            conn = Connection(settings, helo_name, mx_host, address, port, policy, engine,
                              allow_tls=allow_tls)
            try:
                conn.open()
                return conn, failures
            except ConnectFailed as exc:
                failures.append((address, exc.outcome))
                if exc.plaintext_retry and allow_tls:
                    allow_tls = False
                    continue
                if not exc.next_host:
                    return None, failures
                break
    return None, failures
