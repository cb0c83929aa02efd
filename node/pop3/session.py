"""POP3 policy: what to answer, and what to ask the node's services.

One `Pop3Session` per connection.  It owns the sans-I/O core, decides each
reply and calls `ctx.directory` / `ctx.store`; it does no socket I/O and never
sleeps: a reply that must be delayed (a failed login) says so in
`Response.delay`, and the server waits.

Promises kept here:
- Authentication only over TLS, or from loopback when
  `node.allow_plaintext_auth_on_loopback` is set (RFC 2595 §2.3); before that
  CAPA advertises neither USER nor SASL.  APOP is not offered.
- The maildrop is INBOX as it was at login (RFC 1939 §4); mail delivered
  during the session appears in the next one.  Unique ids are
  "<uidvalidity>.<uid>", stable across sessions (RFC 1939 §7 UIDL).
- One session per maildrop: a second login gets `-ERR [IN-USE]` (RFC 2449
  §8.1.1).  The lock is released by `close()`, however the session ends.
- DELE only marks; the messages are expunged at QUIT in UPDATE state, and
  `+OK` is sent only after that commit; if it fails the client gets
  `-ERR [SYS/TEMP]` and nothing is deleted (RFC 1939 §6, RFC 3206 §4).  A
  dropped connection deletes nothing.
- Cluster mode (ctx.cluster set): a login for an account whose shard another
  node leads answers a `Response` with `handoff` set; the server hands the
  connection to that primary (cluster/proxy.py), where `open_maildrop`
  continues.  A session whose maildrop is led here ends with
  `-ERR [SYS/TEMP] mailbox moved` once this node stops leading the shard.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from node.context import NodeContext
from node.pop3 import protocol as p
from node.pop3.locks import LOCKS, MaildropLocks
from storage.model import MessageRow, NoSuchBlob

log = logging.getLogger("postroom.pop3")

GREETING = p.ok("postroom ready")  # no APOP timestamp: APOP is not offered
MAILDROP = "INBOX"
SASL_MECHANISMS = ("PLAIN",)

ERR_PLAINTEXT = p.err(
    "Plaintext authentication disallowed on non-secure connection, use STLS", p.RespCode.AUTH
)
ERR_AUTH_FAILED = p.err("authentication failed", p.RespCode.AUTH)  # RFC 3206 §5
ERR_TOO_MANY_FAILURES = p.err("too many authentication failures, closing", p.RespCode.AUTH)
ERR_IN_USE = p.err("maildrop is locked by another session", p.RespCode.IN_USE)
ERR_SYS_TEMP = p.err("system temporarily unavailable, try again later", p.RespCode.SYS_TEMP)
ERR_QUIT_FAILED = p.err("deletions could not be committed, nothing deleted", p.RespCode.SYS_TEMP)
ERR_NO_MESSAGE = p.err("no such message")
ERR_DELETED = p.err("message already deleted")
ERR_GONE = p.err("message no longer exists (removed by another client)")
ERR_BAD_NUMBER = p.err("invalid message number")
ERR_USER_FIRST = p.err("send USER first")
ERR_MECHANISM = p.err("unsupported authentication mechanism")
ERR_BASE64 = p.err("invalid base64 in SASL response")  # RFC 5034 §4
ERR_CANCELLED = p.err("authentication cancelled")  # RFC 5034 §4
ERR_TOO_MANY_ERRORS = p.err("too many bad commands, closing")
ERR_ALREADY_TLS = p.err("already using TLS")
ERR_NO_TLS = p.err("TLS not available")
ERR_MOVED = p.err("mailbox moved", p.RespCode.SYS_TEMP)  # cluster: reconnect to the new primary


@dataclass
class Response:
    """What the server does next: wait `delay` seconds, send `chunks` in
    order, then upgrade to TLS (`starttls`) or close (`close`)."""

    chunks: Iterable[bytes]
    close: bool = False
    starttls: bool = False
    delay: float = 0.0
    handoff: str | None = None  # cluster: serve this account on its primary


def _reply(reply: p.Reply, **kw: object) -> Response:
    return Response([reply.encode()], **kw)  # type: ignore[arg-type]


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


class Pop3Session:
    """Policy for one POP3 connection (see the module docstring)."""

    def __init__(
        self,
        ctx: NodeContext,
        peer_ip: str,
        *,
        secure: bool,
        locks: MaildropLocks = LOCKS,
    ) -> None:
        self.ctx = ctx
        self.cfg = ctx.config.pop3
        self.peer_ip = peer_ip
        self.secure = secure
        self.locks = locks
        self.conn = p.Pop3Connection(self.cfg.max_line_length)
        self.account: str | None = None  # set while the maildrop lock is held
        self._user: str | None = None  # USER given, PASS awaited
        self._sasl_pending = False
        self._auth_failures = 0
        self._bad_commands = 0
        self._uidvalidity = 0
        self._rows: list[MessageRow] = []
        self._deleted: set[int] = set()  # message numbers, 1-based
        self.moved = False  # this node stopped leading the maildrop's shard (cluster)
        self.on_moved: Callable[[], None] | None = None  # set by the server
        self._unrole: Callable[[], None] | None = None

    # ------------------------------------------------------------ server API

    def greeting(self) -> bytes:
        return GREETING.encode()

    def receive_data(self, data: bytes) -> None:
        self.conn.receive_data(data)

    def next_response(self) -> Response | None:
        """The response to the next complete input line, or None for more data."""
        if self.conn.state is p.State.DONE:
            return None
        event = self.conn.next_event()
        if event is p.NEED_DATA:
            return None
        if isinstance(event, p.BadInput):
            return self._bad(event.reply)
        if isinstance(event, p.SaslCancel):
            self._sasl_pending = False
            return _reply(ERR_CANCELLED)
        if isinstance(event, p.SaslResponse):
            self._sasl_pending = False
            return self._sasl_plain(event.data)
        assert isinstance(event, p.Command)
        handler = getattr(self, f"_cmd_{event.name.lower()}")
        return handler(*event.args)

    def tls_started(self) -> None:
        """The STLS handshake succeeded: forget what was said in plaintext."""
        self.secure = True
        self._user = None

    def discard_input(self) -> bytes:
        return self.conn.discard_input()

    def close(self) -> None:
        """End the session: release the maildrop lock; deletes nothing."""
        if self._unrole is not None:
            unrole, self._unrole = self._unrole, None
            unrole()
        if self.account is not None:
            self.locks.release(self.account)
            self.account = None
        if self.conn.state is not p.State.DONE:
            self.conn.transition(p.State.DONE)

    # ------------------------------------------------------------ helpers

    @property
    def auth_allowed(self) -> bool:
        """RFC 2595 §2.3: no cleartext passwords without TLS, loopback aside."""
        if self.secure:
            return True
        return self.ctx.config.node.allow_plaintext_auth_on_loopback and is_loopback(self.peer_ip)

    def _bad(self, reply: p.Reply) -> Response:
        self._sasl_pending = False
        self._bad_commands += 1
        if self.cfg.max_bad_commands and self._bad_commands >= self.cfg.max_bad_commands:
            self.close()
            return Response([reply.encode(), ERR_TOO_MANY_ERRORS.encode()], close=True)
        return _reply(reply)

    def _live(self) -> tuple[int, int]:
        """Count and octets of the messages not marked deleted."""
        live = [r for i, r in enumerate(self._rows, 1) if i not in self._deleted]
        return len(live), sum(r.size for r in live)

    def _message(self, arg: str) -> tuple[int, MessageRow] | p.Reply:
        n = p.parse_number(arg)
        if n is None:
            return ERR_BAD_NUMBER
        if not 1 <= n <= len(self._rows):
            return ERR_NO_MESSAGE
        if n in self._deleted:
            return ERR_DELETED
        return n, self._rows[n - 1]

    def _uid(self, row: MessageRow) -> str:
        return f"{self._uidvalidity}.{row.uid}"

    # ------------------------------------------------------------ AUTHORIZATION

    def _cmd_capa(self) -> Response:
        """RFC 2449 §5; capabilities depend on state and on TLS."""
        caps = ["TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"]
        if self.conn.state is p.State.AUTHORIZATION:
            if self.auth_allowed:
                caps += ["USER", "SASL " + " ".join(SASL_MECHANISMS)]
            if not self.secure and self.ctx.tls is not None:
                caps.append("STLS")
        caps.append("IMPLEMENTATION postroom")
        return Response(p.multiline(p.ok("Capability list follows"), p.lines_body(caps)))

    def _cmd_stls(self) -> Response:
        """RFC 2595 §4."""
        if self.secure:
            return _reply(ERR_ALREADY_TLS)
        if self.ctx.tls is None:
            return _reply(ERR_NO_TLS)
        self._user = None
        return _reply(p.ok("Begin TLS negotiation"), starttls=True)

    def _cmd_user(self, name: str) -> Response:
        """RFC 1939 §7 USER."""
        if not self.auth_allowed:
            return _reply(ERR_PLAINTEXT)
        self._user = name
        return _reply(p.ok("send PASS"))

    def _cmd_pass(self, password: str) -> Response:
        """RFC 1939 §7 PASS."""
        if not self.auth_allowed:
            return _reply(ERR_PLAINTEXT)
        user, self._user = self._user, None
        if user is None:
            return _reply(ERR_USER_FIRST)
        return self._login(user, password, authzid="")

    def _cmd_auth(self, mechanism: str | None = None, initial: str | None = None) -> Response:
        """RFC 5034 §4 AUTH; without a mechanism, list the mechanisms."""
        if not self.auth_allowed:
            return _reply(ERR_PLAINTEXT)
        if mechanism is None:
            return Response(
                p.multiline(p.ok("SASL mechanisms follow"), p.lines_body(SASL_MECHANISMS))
            )
        if mechanism.upper() not in SASL_MECHANISMS:
            return _reply(ERR_MECHANISM)
        self._user = None
        if initial is None:
            self._sasl_pending = True
            self.conn.expect_sasl_response()
            return Response([p.SASL_CONTINUE])
        return self._sasl_plain(b"" if initial == "=" else initial.encode("ascii", "replace"))

    def _sasl_plain(self, data: bytes) -> Response:
        """RFC 4616: authzid NUL authcid NUL passwd, base64 encoded."""
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return self._failed(ERR_BASE64)
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return self._failed(ERR_AUTH_FAILED)
        try:
            authzid, authcid, password = (x.decode("utf-8") for x in parts)
        except UnicodeDecodeError:
            return self._failed(ERR_AUTH_FAILED)
        if not authcid or not password:
            return self._failed(ERR_AUTH_FAILED)
        return self._login(authcid, password, authzid=authzid)

    def _failed(self, reply: p.Reply) -> Response:
        """A failed login: delayed, and the session ends after too many."""
        self._auth_failures += 1
        log.info("pop3: failed login from %s (%d)", self.peer_ip, self._auth_failures)
        if self.cfg.max_auth_failures and self._auth_failures >= self.cfg.max_auth_failures:
            self.close()
            return Response(
                [ERR_TOO_MANY_FAILURES.encode()], close=True, delay=self.cfg.auth_failure_delay
            )
        return _reply(reply, delay=self.cfg.auth_failure_delay)

    def _login(self, username: str, password: str, *, authzid: str) -> Response:
        try:
            account = self.ctx.directory.authenticate(username, password)
        except Exception:
            log.exception("pop3: directory failed authenticating a login from %s", self.peer_ip)
            return _reply(ERR_SYS_TEMP)
        if account is None:
            return self._failed(ERR_AUTH_FAILED)
        if authzid and authzid.lower() not in (username.lower(), account.lower()):
            return self._failed(ERR_AUTH_FAILED)  # no proxy authorization
        if self._led_elsewhere(account):
            return Response([], handoff=account)  # the server hands over (cluster/proxy.py)
        return self.open_maildrop(account)

    def _led_elsewhere(self, account: str) -> bool:
        cluster = self.ctx.cluster
        return cluster is not None and not cluster.is_local_primary(cluster.shard_of(account))

    def open_maildrop(self, account: str) -> Response:
        """Lock and open ``account``'s maildrop (TRANSACTION state); also how a
        session handed over by another node starts (cluster/proxy.py)."""
        if self._led_elsewhere(account):
            return _reply(ERR_SYS_TEMP)
        if not self.locks.acquire(account):
            return _reply(ERR_IN_USE)
        try:
            self.ctx.store.ensure_account(account)
            status = self.ctx.store.status(account, MAILDROP)
            rows = self.ctx.store.messages(account, MAILDROP)
        except Exception:
            self.locks.release(account)
            log.exception("pop3: cannot open the maildrop of %s", account)
            return _reply(ERR_SYS_TEMP)
        self.account = account
        self._uidvalidity = status.uidvalidity
        self._rows = list(rows)
        self._deleted = set()
        self.conn.transition(p.State.TRANSACTION)
        if self.ctx.cluster is not None:
            self._unrole = self.ctx.cluster.on_role_change(self._on_role_change)
        log.info("pop3: %s logged in from %s (%d messages)", account, self.peer_ip, len(rows))
        count, size = self._live()
        return _reply(p.ok(f"maildrop has {count} messages ({size} octets)"))

    def _on_role_change(self, shard: int) -> None:
        """ClusterView callback (on the hub): never does I/O itself."""
        cluster = self.ctx.cluster
        account = self.account
        if (cluster is None or account is None or shard != cluster.shard_of(account)
                or cluster.is_local_primary(shard)):
            return
        self.moved = True
        if self.on_moved is not None:
            self.on_moved()

    # ------------------------------------------------------------ TRANSACTION

    def _cmd_stat(self) -> Response:
        """RFC 1939 §5 STAT: "+OK count octets"."""
        count, size = self._live()
        return _reply(p.ok(f"{count} {size}"))

    def _cmd_list(self, arg: str | None = None) -> Response:
        """RFC 1939 §5 LIST [msg]."""
        if arg is not None:
            found = self._message(arg)
            if isinstance(found, p.Reply):
                return _reply(found)
            n, row = found
            return _reply(p.ok(f"{n} {row.size}"))
        lines = [f"{i} {r.size}" for i, r in enumerate(self._rows, 1) if i not in self._deleted]
        return Response(p.multiline(p.ok(f"{len(lines)} messages"), p.lines_body(lines)))

    def _cmd_uidl(self, arg: str | None = None) -> Response:
        """RFC 1939 §7 UIDL [msg]."""
        if arg is not None:
            found = self._message(arg)
            if isinstance(found, p.Reply):
                return _reply(found)
            n, row = found
            return _reply(p.ok(f"{n} {self._uid(row)}"))
        lines = [
            f"{i} {self._uid(r)}" for i, r in enumerate(self._rows, 1) if i not in self._deleted
        ]
        return Response(p.multiline(p.ok("unique-id listing follows"), p.lines_body(lines)))

    def _read(self, row: MessageRow) -> bytes | p.Reply:
        """The stored bytes, or the -ERR to send instead."""
        try:
            return self.ctx.store.read_message(row.blob)
        except NoSuchBlob:
            return ERR_GONE  # expunged (e.g. over IMAP) and collected since login
        except Exception:
            log.exception("pop3: cannot read message %s of %s", row.uid, self.account)
            return ERR_SYS_TEMP

    def _cmd_retr(self, arg: str) -> Response:
        """RFC 1939 §5 RETR: the message exactly as stored, dot-stuffed."""
        found = self._message(arg)
        if isinstance(found, p.Reply):
            return _reply(found)
        _, row = found
        raw = self._read(row)
        if isinstance(raw, p.Reply):
            return _reply(raw)
        return Response(p.multiline(p.ok(f"{len(raw)} octets"), [raw]))

    def _cmd_top(self, arg: str, count: str) -> Response:
        """RFC 1939 §7 TOP msg n: headers, blank line, first n body lines."""
        found = self._message(arg)
        if isinstance(found, p.Reply):
            return _reply(found)
        lines = p.parse_number(count)
        if lines is None:
            return _reply(p.ERR_SYNTAX)
        _, row = found
        raw = self._read(row)
        if isinstance(raw, p.Reply):
            return _reply(raw)
        return Response(p.multiline(p.ok("top of message follows"), [p.top_of_message(raw, lines)]))

    def _cmd_dele(self, arg: str) -> Response:
        """RFC 1939 §5 DELE: only marks; QUIT expunges."""
        found = self._message(arg)
        if isinstance(found, p.Reply):
            return _reply(found)
        n, _ = found
        self._deleted.add(n)
        return _reply(p.ok(f"message {n} deleted"))

    def _cmd_noop(self) -> Response:
        return _reply(p.ok())

    def _cmd_rset(self) -> Response:
        """RFC 1939 §5 RSET: unmark every deleted message."""
        self._deleted.clear()
        return _reply(p.ok(f"maildrop has {len(self._rows)} messages"))

    def _cmd_quit(self) -> Response:
        """RFC 1939 §4 (AUTHORIZATION) and §6 (UPDATE)."""
        if self.conn.state is p.State.AUTHORIZATION:
            self.close()
            return _reply(p.ok("postroom signing off"), close=True)
        self.conn.transition(p.State.UPDATE)
        account = self.account
        assert account is not None
        uids = [self._rows[n - 1].uid for n in sorted(self._deleted)]
        if uids:
            try:
                self.ctx.store.expunge(account, MAILDROP, uids)
            except Exception:
                log.exception("pop3: expunge at QUIT failed for %s", account)
                self.close()
                return _reply(ERR_QUIT_FAILED, close=True)
        left = len(self._rows) - len(uids)
        self.close()
        return _reply(p.ok(f"postroom signing off ({left} messages left)"), close=True)
