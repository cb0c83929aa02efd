"""IMAP4rev1 session policy (RFC 3501): decides every reply, calls the store.

Theory of operation: the server feeds received bytes to `Session.feed`;
the session frames and parses them (protocol.py), checks the state table,
runs the command and queues replies, which it hands to `send` in batches.
The session never touches a socket and never sleeps; the store calls may
block the calling greenlet (they run their work off the hub).

Mailbox view: while a mailbox is selected the session keeps its own view,
the list of UIDs whose positions are the message sequence numbers, each
message's last reported flags, and the MODSEQ up to which it has looked.
`store.watch` marks the view dirty after any committed change; at the sync
points RFC 3501 §5.2/§7.4.1 allow, `_sync` asks `changes_since` and reports
EXISTS, FETCH (FLAGS) and, except while answering FETCH/STORE/SEARCH (UID
forms included), EXPUNGE.  An expunge learned at another point is kept in
`View.gone` until it may be reported, so sequence numbers never shift under
the client mid-command.  After the session's own STORE/EXPUNGE/APPEND the
sync needs no changes_since when nobody else changed the mailbox (`_own_only`;
an own APPEND's message joins the view with EXISTS),
and a SELECT of the selected mailbox reuses the view (`_reopen`).  \\Recent is not tracked: RECENT is always 0 (the
flag is gone from IMAP4rev2, RFC 9051 §7.3.2; see docs/imap.md).

Cluster mode (ctx.cluster set): a login for an account whose shard another
node leads sets `want_proxy` instead of logging in; the server hands the
connection to that primary (cluster/proxy.py), where `resume` continues
the session authenticated.  A session logged in here ends with
`* BYE [UNAVAILABLE]` once this node stops leading the account's shard.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextvars
import dataclasses
import functools
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from node.context import NodeContext
from node.imap import binary, esearch, mime, objectid, subscriptions
from node.imap.protocol import (
    NEED_DATA,
    STAR,
    SYSTEM_FLAGS,
    Atom,
    Command,
    ContinuationRequest,
    FatalError,
    FetchItem,
    FramedCommand,
    Framer,
    Limits,
    Literal,
    LiteralTooLarge,
    ParseError,
    Raw,
    RawLine,
    Section,
    SeqSet,
    State,
    allowed,
    continuation,
    encode_mailbox,
    encode_string,
    encode_utf8_string,
    encode_value,
    format_date_time,
    parse_command_cached,
    status_untagged,
    tagged,
    untagged,
)
from node.imap.view import FLAGS_ONLY, View, fetch_flags_line, flag_list_bytes
from node.imap.wildcard import Pattern
from node.mailflow import quota as quota_policy
from storage.model import (
    MailboxExists,
    MailboxNotAllowed,
    MessageRow,
    NoSuchMailbox,
    StorageError,
    StorageUnavailable,
)
from storage.names import canonical_flags

log = logging.getLogger("postroom.imap")

MAX_AUTH_FAILURES = 5  # then BYE: slows password guessing per connection
FLUSH_AT = 256 * 1024  # octets of queued output before handing it to send()
FETCH_BATCH = 128  # messages whose metadata/body are loaded at once
PERMANENT_FLAGS = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)"
DELIMITER = "/"


# Handlers of extension command families (node/imap/commands/*), by command
# name: handler(session, cmd) -> Reply | None.  Filled at the end of this module.
COMMAND_HANDLERS: dict[str, Callable[..., Any]] = {}
# Checks run before any handler: check(session, cmd) -> Reply | None, a reply
# refuses the command (commands/rev2.py: what IMAP4rev2's grammar dropped).
COMMAND_CHECKS: list[Callable[..., Any]] = []
# True while a session that ENABLEd IMAP4rev2 runs a command: _mbox then
# writes UTF-8 names (RFC 9051 §5.1); per greenlet, so sessions never mix.
_UTF8_NAMES: contextvars.ContextVar[bool] = contextvars.ContextVar("utf8_names", default=False)


@dataclass
class Reply:
    """The tagged completion of a command (RFC 3501 §7.1)."""

    status: str  # OK | NO | BAD
    text: str
    code: str | None = None


def ok(text: str, code: str | None = None) -> Reply:
    return Reply("OK", text, code)


def no(text: str, code: str | None = None) -> Reply:
    return Reply("NO", text, code)


def bad(text: str, code: str | None = None) -> Reply:
    return Reply("BAD", text, code)


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _flag_list(flags: frozenset[str] | set[str]) -> Raw:
    ordered = [f for f in SYSTEM_FLAGS if f in flags] + sorted(
        f for f in flags if f not in SYSTEM_FLAGS
    )
    return Raw(("(" + " ".join(ordered) + ")").encode("utf-8"))


class Session:
    """One client connection's IMAP state.  Not thread-safe; the server
    serializes calls (feed, idle_flush, timeout) with a lock."""

    def __init__(
        self,
        ctx: NodeContext,
        send: Callable[[bytes], None],
        *,
        peer_ip: str,
        tls: bool,
        wakeup: Callable[[], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self._send = send
        self.peer_ip = peer_ip
        self.tls = tls
        self.wakeup = wakeup
        cfg = ctx.config.imap
        self.limits = Limits(
            max_line_length=cfg.max_line_length, max_literal_size=cfg.max_literal_size,
            literal_plus=True, max_nonsync_literal=4096,  # LITERAL- until login (RFC 7888 §5)
        )
        self.framer = Framer(self.limits)
        self.state = State.NOT_AUTHENTICATED
        self.account: str | None = None
        self.view: View | None = None
        self.closed = False
        self.want_starttls = False
        self.want_compress = False  # COMPRESS answered: the server wraps the socket
        self.compressed = False  # RFC 4978: once per session
        self.enabled: set[str] = set()  # ENABLEd capabilities, upper-case (RFC 5161)
        self.notify: Any = None  # active NOTIFY SET (node/imap/notify.py, RFC 5465)
        self.idle_tag: str | None = None
        self.want_proxy: tuple[str, str] | None = None  # (tag, account): hand over (cluster)
        self.moved = False  # this node stopped leading the account's shard (cluster)
        self._unrole: Callable[[], None] | None = None
        self._auth_tag: str | None = None
        self._auth_failures = 0
        self._dirty = False
        # MODSEQs this session's own STORE/EXPUNGE/APPEND took in the selected
        # mailbox since view.modseq; their effects are in the view (_own_only).
        self._own = 0
        # (UID, flags) of own APPENDs to the selected mailbox, counted in _own:
        # _own_only adds them to the view and reports EXISTS (RFC 9051 §6.3.12).
        self._own_added: list[tuple[int, frozenset[str]]] = []
        self._unwatch: Callable[[], None] | None = None
        self._out: list[bytes] = []
        self._out_size = 0

    # ---------------------------------------------------------------- I/O

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out, self._out_size = [], 0
            self._send(data)

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "SASL-IR", "IDLE", "CHILDREN", "UIDPLUS"]
        # RFC 9051, 5161, 2971, 2342, 3691, 6851, 7888, 7889, 3516, 4978
        # (node/imap/commands/rev2.py, node/imap/binary.py, node/imap/compress.py)
        caps += ["IMAP4rev2", "ENABLE", "ID", "NAMESPACE", "UNSELECT", "MOVE", "BINARY",
                 "LITERAL-" if self.limits.max_nonsync_literal else "LITERAL+",
                 f"APPENDLIMIT={self.limits.max_literal_size}"]
        caps += ["CONDSTORE", "QRESYNC", "NOTIFY"]  # RFC 7162, RFC 5465 (commands/condstore.py, notify.py)
        # RFC 5258, 5819, 6154, 8438, 8474 (node/imap/commands/listext.py, node/imap/objectid.py)
        caps += ["LIST-EXTENDED", "LIST-STATUS", "SPECIAL-USE", "CREATE-SPECIAL-USE",
                 "STATUS=SIZE", "QUOTA", "QUOTA=RES-STORAGE",  # + RFC 9208 (commands/quota.py)
                 "METADATA",  # RFC 5464 (commands/metadata.py)
                 "OBJECTID", "SAVEDATE"]  # RFC 8474 (objectid.py), RFC 8514
        # RFC 4731, 5182, 5256, 5957 (node/imap/commands/searchext.py)
        caps += ["ESEARCH", "SEARCHRES", "SORT", "SORT=DISPLAY", "THREAD=ORDEREDSUBJECT",
                 "THREAD=REFERENCES"]
        if not (self.compressed or self.want_compress):
            caps.append("COMPRESS=DEFLATE")
        if self.state is State.NOT_AUTHENTICATED:
            if not self.tls:
                caps.append("STARTTLS")
            caps.append("AUTH=PLAIN" if self._plaintext_ok() else "LOGINDISABLED")
        return " ".join(caps)

    def _plaintext_ok(self) -> bool:
        if self.tls:
            return True
        return self.ctx.config.node.allow_plaintext_auth_on_loopback and _is_loopback(self.peer_ip)

    def greeting(self) -> None:
        """The server greeting (RFC 3501 §7.1.1) with capabilities (§7.2.1)."""
        self._write(status_untagged("OK", "postroom ready", f"CAPABILITY {self.capabilities()}"))
        self.flush()

    def timeout(self) -> None:
        """The client was silent for imap.idle_timeout (RFC 3501 §5.4)."""
        self._write(status_untagged("BYE", "autologout; idle for too long"))
        self.flush()
        self.close()

    def close(self) -> None:
        self.closed = True
        if self._unrole is not None:
            unrole, self._unrole = self._unrole, None
            unrole()
        if self._unwatch is not None:
            unwatch, self._unwatch = self._unwatch, None
            try:
                unwatch()
            except Exception:  # the store going away must not break logout
                log.exception("imap: unwatch failed")

    def tls_started(self) -> None:
        """The server finished the STARTTLS handshake."""
        self.want_starttls = False
        self.tls = True
        self.framer.discard_buffer()

    def feed(self, data: bytes) -> None:
        """Process received bytes; replies go to send().  Stops early (and
        drops the rest) when the session closes or STARTTLS begins."""
        self.framer.receive(data)
        while (not self.closed and not self.want_starttls and not self.want_compress
               and self.want_proxy is None):
            ev = self.framer.next_event()
            if ev is NEED_DATA:
                break
            self._event(ev)
        if self.want_starttls:
            # RFC 3501 §6.2.1 / RFC 3207 §4.2: plaintext pipelined after
            # STARTTLS must not be acted on.
            self.framer.discard_buffer()
        self.flush()

    def _event(self, ev: Any) -> None:
        if isinstance(ev, ContinuationRequest):
            self._write(continuation("Ready for literal data"))
            self.flush()
        elif isinstance(ev, FatalError):
            self._write(status_untagged("BYE", f"protocol error: {ev.text}"))
            self.close()
        elif isinstance(ev, LiteralTooLarge):
            if ev.command == "APPEND":  # RFC 7889 §4 (APPENDLIMIT)
                self._write(tagged(ev.tag, "NO", "message too large", "TOOBIG"))
            else:
                self._write(tagged(ev.tag, "BAD", "literal too large", "TOOBIG"))
        elif isinstance(ev, RawLine):
            self._raw_line(ev.line)
        elif isinstance(ev, FramedCommand):
            try:
                cmd = parse_command_cached(ev, self.limits)
            except ParseError as exc:
                self._write(tagged(exc.tag, "BAD", exc.text))
                return
            self._command(cmd)

    # ------------------------------------------------------------ dispatch

    def _command(self, cmd: Command) -> None:
        token = _UTF8_NAMES.set(self.limits.utf8_mailboxes)
        try:
            self._run_command(cmd)
        finally:
            _UTF8_NAMES.reset(token)

    def _run_command(self, cmd: Command) -> None:
        if not allowed(self.state, cmd.full_name):
            self._write(tagged(cmd.tag, "BAD", f"{cmd.full_name} not allowed now"))
            return
        for check in COMMAND_CHECKS:
            refused = check(self, cmd)
            if refused is not None:
                self._write(tagged(cmd.tag, refused.status, refused.text, refused.code))
                return
        # An extension family (node/imap/commands/*) may add or extend a command.
        ext = COMMAND_HANDLERS.get(cmd.name)
        handler = (
            functools.partial(ext, self) if ext else getattr(self, "_cmd_" + cmd.name.lower())
        )
        reply = self._guarded(cmd.full_name, handler, cmd)
        if reply is None:  # the command continues (IDLE, AUTHENTICATE) or ended the session
            return
        if self.state is State.SELECTED and self.view is not None and reply.status != "BAD":
            self._sync_safe(expunge=cmd.name not in ("FETCH", "STORE", "SEARCH", "SORT", "THREAD"))
        if not self.closed:
            self._write(tagged(cmd.tag, reply.status, reply.text, reply.code))

    def _guarded(self, what: str, fn: Callable[..., Reply | None], *args: Any) -> Reply | None:
        """Run fn, turning storage errors into typed NO replies (the reason is
        logged, never sent) and any other failure into NO [SERVERBUG]."""
        try:
            return fn(*args)
        except StorageUnavailable:
            return no("try again later", "UNAVAILABLE")
        except NoSuchMailbox:
            return no("no such mailbox", "NONEXISTENT")
        except MailboxExists:
            return no("mailbox already exists", "ALREADYEXISTS")
        except MailboxNotAllowed:
            return no("not allowed for this mailbox", "CANNOT")
        except binary.UnknownCte:
            return no("unknown content-transfer-encoding", "UNKNOWN-CTE")  # RFC 3516 §4.3
        except StorageError:
            log.exception("imap: storage error in %s", what)
            return no("storage error", "SERVERBUG")
        except Exception:
            # A bug must not end the connection mid-stream (design promise 4).
            log.exception("imap: internal error in %s", what)
            return no("internal server error", "SERVERBUG")

    def _sync_safe(self, *, expunge: bool) -> None:
        try:
            self._sync(expunge=expunge)
        except NoSuchMailbox:
            # The selected mailbox was deleted or renamed by another session.
            self._write(status_untagged("BYE", "selected mailbox no longer exists"))
            self.close()
        except StorageError:
            log.warning("imap: could not refresh the mailbox view", exc_info=True)

    def _raw_line(self, line: bytes) -> None:
        """A line outside command syntax: IDLE's DONE or a SASL response."""
        if self.idle_tag is not None:
            tag, self.idle_tag = self.idle_tag, None
            self.framer.line_mode = False
            if line.strip().upper() == b"DONE":
                self._write(tagged(tag, "OK", "IDLE terminated"))
            else:
                self._write(tagged(tag, "BAD", "expected DONE"))
        elif self._auth_tag is not None:
            tag, self._auth_tag = self._auth_tag, None
            self.framer.line_mode = False
            if line.strip() == b"*":
                self._write(tagged(tag, "BAD", "authentication cancelled"))
                return
            self._finish_plain(tag, line.strip())
        else:  # not reachable: line mode is only set with one of the tags
            self.framer.line_mode = False

    # ------------------------------------------------------ any state

    def _cmd_capability(self, cmd: Command) -> Reply:
        self._write(untagged("CAPABILITY", self.capabilities()))
        return ok("CAPABILITY completed")

    def _cmd_noop(self, cmd: Command) -> Reply:
        if self.view is not None:
            self._dirty = True
        return ok("NOOP completed")

    def _cmd_logout(self, cmd: Command) -> Reply | None:
        self._write(status_untagged("BYE", "logging out"))
        self._write(tagged(cmd.tag, "OK", "LOGOUT completed"))
        self.state = State.LOGOUT
        self.close()
        return None

    # ---------------------------------------------- not authenticated

    def _cmd_starttls(self, cmd: Command) -> Reply | None:
        if self.tls:
            return bad("TLS is already active")
        self._write(tagged(cmd.tag, "OK", "begin TLS negotiation now"))
        self.want_starttls = True
        return None

    def _cmd_login(self, cmd: Command) -> Reply:
        if not self._plaintext_ok():
            return no("use STARTTLS first", "PRIVACYREQUIRED")
        user, secret = cmd.args
        try:
            password = secret.value.decode("utf-8")
        except UnicodeDecodeError:
            return self._auth_failed()
        return self._login(cmd.tag, user, password)

    def _login(self, tag: str, user: str, password: str) -> Reply | None:
        account = self.ctx.directory.authenticate(user, password)
        if account is None:
            return self._auth_failed()
        if self._led_elsewhere(account):
            self.want_proxy = (tag, account)  # the server hands over (cluster/proxy.py)
            return None
        return self._start(account)

    def _start(self, account: str) -> Reply:
        """Enter the authenticated state for ``account`` (led here)."""
        self.ctx.store.ensure_account(account)
        self._unwatch = self.ctx.store.watch(account, self._on_change)
        cluster = self.ctx.cluster
        if cluster is not None:
            self._unrole = cluster.on_role_change(self._on_role_change)
        self.account = account
        self.state = State.AUTHENTICATED
        # LITERAL+ once authenticated (RFC 7888 §4); before, LITERAL- bounds them.
        self.limits = dataclasses.replace(self.limits, max_nonsync_literal=None)
        self.framer.limits = self.limits
        log.info("imap: %s logged in from %s", account, self.peer_ip)
        return ok("logged in", f"CAPABILITY {self.capabilities()}")

    def _led_elsewhere(self, account: str) -> bool:
        cluster = self.ctx.cluster
        return cluster is not None and not cluster.is_local_primary(cluster.shard_of(account))

    # ---------------------------------------------------- cluster hand-over

    def resume(self, tag: str, account: str, enabled: Iterable[str] = ()) -> None:
        """Continue a session another node authenticated (cluster/proxy.py):
        answers its login ``tag`` here, as a local login would have."""
        self.enabled.update(e.upper() for e in enabled)
        if "IMAP4REV2" in self.enabled:  # ENABLE needs a login: normally empty here
            self.limits = dataclasses.replace(self.limits, utf8_mailboxes=True)
            self.framer.limits = self.limits
        if self._led_elsewhere(account):
            reply = no("try again later", "UNAVAILABLE")
        else:
            reply = self._guarded("LOGIN", self._start, account) or no("failed", "SERVERBUG")
        self._write(tagged(tag, reply.status, reply.text, reply.code))
        if reply.status != "OK":
            self.close()
        self.flush()

    def proxy_refused(self, line: bytes | None) -> None:
        """The hand-over did not happen: send the primary's answer ``line``
        (or NO [UNAVAILABLE]), stay unauthenticated, go on with pipelined input."""
        assert self.want_proxy is not None
        tag, _ = self.want_proxy
        self.want_proxy = None
        self._write(line if line is not None else tagged(tag, "NO", "try again later",
                                                          "UNAVAILABLE"))
        self.feed(b"")

    def proxy_local(self) -> None:
        """The account's shard came to be led here while the hand-over waited
        for placement to settle: the login is served here after all."""
        assert self.want_proxy is not None
        tag, account = self.want_proxy
        self.want_proxy = None
        reply = self._guarded("LOGIN", self._start, account) or no("failed", "SERVERBUG")
        self._write(tagged(tag, reply.status, reply.text, reply.code))
        self.feed(b"")

    def proxy_started(self) -> None:
        """The primary serves the client from now on; this session is over."""
        assert self.want_proxy is not None
        self.account = self.want_proxy[1]
        self.want_proxy = None
        self.close()

    def _on_role_change(self, shard: int) -> None:
        """ClusterView callback (on the hub): never does I/O itself."""
        cluster = self.ctx.cluster
        if (cluster is None or self.account is None or self.closed
                or shard != cluster.shard_of(self.account) or cluster.is_local_primary(shard)):
            return
        self.moved = True
        if self.wakeup is not None:
            self.wakeup()

    def end_moved(self) -> None:
        """RFC 9051 §7.1.5: the mailbox is led by another node now."""
        self._write(status_untagged("BYE", "Mailbox moved, reconnect", "UNAVAILABLE"))
        self.flush()
        self.close()

    def _auth_failed(self) -> Reply:
        self._auth_failures += 1
        if self._auth_failures >= MAX_AUTH_FAILURES:
            self._write(status_untagged("BYE", "too many failed logins"))
            self.close()
        return no("invalid credentials", "AUTHENTICATIONFAILED")

    def _cmd_authenticate(self, cmd: Command) -> Reply | None:
        mech, initial = cmd.args
        if mech != "PLAIN":
            return no("unsupported mechanism", "CANNOT")
        if not self._plaintext_ok():
            return no("use STARTTLS first", "PRIVACYREQUIRED")
        if initial is None:
            self._auth_tag = cmd.tag
            self.framer.line_mode = True
            self._write(continuation("").rstrip(b"\r\n") + b"\r\n")
            self.flush()
            return None
        self._finish_plain(cmd.tag, initial.encode("ascii"))
        return None

    def _finish_plain(self, tag: str, response: bytes) -> None:
        """RFC 4616: authzid NUL authcid NUL passwd, base64 (RFC 3501 §6.2.2)."""
        try:
            data = b"" if response == b"=" else base64.b64decode(response, validate=True)
            authzid, authcid, passwd = data.split(b"\x00")
            user, password = authcid.decode("utf-8"), passwd.decode("utf-8")
            authz = authzid.decode("utf-8")
        except (ValueError, binascii.Error):
            self._write(tagged(tag, "BAD", "malformed PLAIN response"))
            return
        if authz and authz.lower() != user.lower():
            reply: Reply | None = no("proxy authorization not supported", "AUTHORIZATIONFAILED")
        else:
            reply = self._guarded("AUTHENTICATE", self._login, tag, user, password)
        if reply is not None:
            self._write(tagged(tag, reply.status, reply.text, reply.code))

    # --------------------------------------------------- authenticated

    @property
    def _acct(self) -> str:
        assert self.account is not None
        return self.account

    def _cmd_select(self, cmd: Command) -> Reply:
        return self._select(cmd.args[0], readonly=False)

    def _cmd_examine(self, cmd: Command) -> Reply:
        return self._select(cmd.args[0], readonly=True)

    def _select(self, name: str, *, readonly: bool) -> Reply:
        # RFC 3501 §6.3.1: a failed SELECT leaves no mailbox selected.
        old, self.view = self.view, None
        own, self._own = self._own, 0
        if self._own_added:  # not in the old view yet: take the changes_since path
            own, self._own_added = 0, []
        self.state = State.AUTHENTICATED
        store = self.ctx.store
        # The mailbox row only: SELECT reports no count/unseen/size aggregate.
        uidvalidity, uidnext, modseq = store.mailbox_state(self._acct, name)
        view = self._reopen(old, own, name, readonly, uidvalidity, modseq)
        if view is None:
            # UIDs and flags only (node/imap/view.py): no row per message.
            view = View.build(name, readonly, uidvalidity, modseq,
                              store.uid_flags(self._acct, name))
        uids = view.uids
        self.view = view
        self._dirty = False
        self.state = State.SELECTED
        self._write(untagged("FLAGS", self._flags_atom()))
        self._write(untagged(len(uids), "EXISTS"))
        rev2 = "IMAP4REV2" in self.enabled  # RFC 9051 §6.3.2: no RECENT, no [UNSEEN]
        if not rev2:
            self._write(untagged(0, "RECENT"))
            unseen = view.first_unseen()
            if unseen is not None:
                self._write(status_untagged("OK", "first unseen", f"UNSEEN {unseen}"))
        self._write(status_untagged("OK", "UIDs valid", f"UIDVALIDITY {uidvalidity}"))
        mailbox_id = objectid.mailbox_id(self._acct, uidvalidity)  # RFC 8474 §4.2
        self._write(status_untagged("OK", "mailbox id", f"MAILBOXID ({mailbox_id})"))
        uidnext = max(uidnext, (uids[-1] + 1) if uids else 1)
        self._write(status_untagged("OK", "predicted next UID", f"UIDNEXT {uidnext}"))
        perm = "()" if readonly else PERMANENT_FLAGS
        self._write(status_untagged("OK", "flags permitted", f"PERMANENTFLAGS {perm}"))
        if rev2:  # RFC 9051 §6.3.2: a LIST response with the canonical name
            self._write(untagged("LIST", "()", f'"{DELIMITER}"', _mbox(view.name)))
        if readonly:
            return ok("EXAMINE completed", "READ-ONLY")
        return ok("SELECT completed", "READ-WRITE")

    def _reopen(self, old: View | None, own: int, name: str, readonly: bool,
                uidvalidity: int, modseq: int) -> View | None:
        """A SELECT of the mailbox already selected: the new view from the old
        one and the changes since its MODSEQ (none, or only this session's
        own, already in it: no query), instead of reading every message
        again.  None when it must be built afresh: another mailbox, a new
        UIDVALIDITY, or a change the incremental view cannot take (a UID
        below its newest that it does not hold, one expunged and back)."""
        if old is None or old.name != name or old.uidvalidity != uidvalidity:
            return None
        if modseq != old.modseq + own:
            changes = self.ctx.store.changes_since(self._acct, name, old.modseq)
            newest = old.uids[-1] if old.uids else 0
            back = set(changes.expunged)
            if any(r.uid in back or (r.uid <= newest and r.uid not in old.flags)
                   for r in changes.changed):
                return None
            old.apply(changes)
        else:
            old.modseq = modseq
        return old.reopened(readonly)

    def _flags_atom(self) -> str:
        assert self.view is not None
        kws = sorted(self.view.keywords)
        return "(" + " ".join(list(SYSTEM_FLAGS) + kws) + ")"

    def _cmd_create(self, cmd: Command) -> Reply:
        name = cmd.args[0].rstrip(DELIMITER)  # RFC 3501 §6.3.3: trailing delimiter
        if not name or name.upper() == "INBOX":
            if name:
                return no("INBOX always exists", "ALREADYEXISTS")
            return no("empty mailbox name", "CANNOT")
        if not _valid_name(name):
            return no("invalid mailbox name", "CANNOT")
        # RFC 3501 §6.3.3: the store creates missing superior names too.
        self.ctx.store.create_mailbox(self._acct, name)
        return ok("CREATE completed")

    def _cmd_delete(self, cmd: Command) -> Reply:
        name = cmd.args[0]
        if name == "INBOX":
            return no("INBOX cannot be deleted", "CANNOT")
        store = self.ctx.store
        was_subscribed = any(m.name == name and m.subscribed
                             for m in store.list_mailboxes(self._acct))
        try:
            store.delete_mailbox(self._acct, name)
        except NoSuchMailbox:
            # RFC 9051 §6.3.5: a \Noselect name with inferiors cannot go.
            boxes = self.ctx.store.list_mailboxes(self._acct)
            if any(m.name.startswith(name + DELIMITER) for m in boxes):
                return no("mailbox has inferior names", "HASCHILDREN")
            raise
        if was_subscribed:  # RFC 9051 §6.3.7: the subscription stays (subscriptions.py)
            subscriptions.keep(store, self._acct, name)
        return ok("DELETE completed")

    def _cmd_rename(self, cmd: Command) -> Reply:
        old, new = cmd.args
        new = new.rstrip(DELIMITER)
        if not new or not _valid_name(new) or new.upper() == "INBOX":
            return no("invalid new mailbox name", "CANNOT")
        self.ctx.store.rename_mailbox(self._acct, old, new)
        if self.view is not None and old != "INBOX":
            # Keep following the selected mailbox (and its inferiors) under
            # the new name; UIDVALIDITY does not change on RENAME.
            name = self.view.name
            if name == old or name.startswith(old + DELIMITER):
                self.view.name = new + name[len(old) :]
        return ok("RENAME completed")

    def _cmd_subscribe(self, cmd: Command) -> Reply:
        self.ctx.store.set_subscribed(self._acct, cmd.args[0], True)
        return ok("SUBSCRIBE completed")

    def _cmd_unsubscribe(self, cmd: Command) -> Reply:
        try:
            self.ctx.store.set_subscribed(self._acct, cmd.args[0], False)
        except NoSuchMailbox:
            # RFC 9051 §6.3.8: OK also when the name is not subscribed; a
            # subscription kept after DELETE goes now.
            subscriptions.forget(self.ctx.store, self._acct, cmd.args[0])
        return ok("UNSUBSCRIBE completed")

    def _cmd_list(self, cmd: Command) -> Reply:
        return self._list(cmd, subscribed_only=False)

    def _cmd_lsub(self, cmd: Command) -> Reply:
        return self._list(cmd, subscribed_only=True)

    def _list(self, cmd: Command, *, subscribed_only: bool) -> Reply:
        """RFC 3501 §6.3.8/§6.3.9 with RFC 3348 children and RFC 6154 attributes."""
        ref, pattern = cmd.args
        word = "LSUB" if subscribed_only else "LIST"
        if pattern == "" and not subscribed_only:
            # The hierarchy delimiter and root of the reference (§6.3.8).
            root = ref.split(DELIMITER, 1)[0] + DELIMITER if DELIMITER in ref else ""
            self._write(untagged(word, "(\\Noselect)", f'"{DELIMITER}"', _mbox(root)))
            return ok(f"{word} completed")
        matcher = Pattern.compile(ref + pattern, DELIMITER)
        boxes = self.ctx.store.list_mailboxes(self._acct)
        by_name = {m.name: m for m in boxes}
        chosen = {m.name for m in boxes if m.subscribed or not subscribed_only}
        # Subscribed names whose mailbox was deleted (RFC 9051 §6.3.7).
        kept = set(subscriptions.kept(self.ctx.store, self._acct)) if subscribed_only else set()
        chosen |= kept
        # Superior names that exist only as parents of chosen ones.
        all_names = set(chosen)
        for name in chosen:
            parts = name.split(DELIMITER)
            for i in range(1, len(parts)):
                all_names.add(DELIMITER.join(parts[:i]))
        has_children = {n.rsplit(DELIMITER, 1)[0] for n in by_name if DELIMITER in n}
        for name in sorted(all_names, key=lambda n: (n != "INBOX", n)):
            if not matcher.matches(name):
                continue
            attrs = []
            if name not in chosen or name in kept and name not in by_name:
                # A superior name shown only because a child matched (§6.3.9).
                attrs.append("\\Noselect")
            if not subscribed_only:
                attrs.append("\\HasChildren" if name in has_children else "\\HasNoChildren")
                info = by_name.get(name)
                if info is not None and info.special_use:
                    attrs.append(info.special_use)
            self._write(_list_line(word, " ".join(attrs), name, _UTF8_NAMES.get()))
        return ok(f"{word} completed")

    def _cmd_status(self, cmd: Command) -> Reply:
        name, items = cmd.args
        self._write(untagged("STATUS", _mbox(name), self._status_data(name, items)))
        return ok("STATUS completed")

    def _status_data(self, name: str, items: tuple[str, ...]) -> list[Any]:
        """The STATUS attribute list (RFC 3501 §6.3.10; also LIST-STATUS, RFC 5819)."""
        st = self.ctx.store.status(self._acct, name)
        values = {
            "MESSAGES": st.messages,
            "RECENT": 0,
            "UIDNEXT": st.uidnext,
            "UIDVALIDITY": st.uidvalidity,
            "UNSEEN": st.unseen,
            "HIGHESTMODSEQ": st.highestmodseq,  # RFC 7162 §3.1.2.2
            "SIZE": st.size,  # RFC 8438 §2
            "MAILBOXID": Raw(f"({objectid.mailbox_id(self._acct, st.uidvalidity)})".encode()),
        }
        if "DELETED" in items or "DELETED-STORAGE" in items:  # RFC 9208 §4.2.1, §4.2.2
            doomed = [r.size for r in self.ctx.store.messages(self._acct, name)
                      if "\\Deleted" in r.flags]
            values["DELETED"] = len(doomed)
            values["DELETED-STORAGE"] = (sum(doomed) + 1023) // 1024  # 1024-octet units
        if "HIGHESTMODSEQ" in items:
            self.enabled.add("CONDSTORE")  # a CONDSTORE-enabling command (RFC 7162 §3.1)
        out: list[Any] = []
        for item in dict.fromkeys(items):
            out += [Atom(item), values[item]]
        return out

    def _cmd_append(self, cmd: Command) -> Reply:
        name, flags, date, message = cmd.args
        internaldate = date.timestamp() if date is not None else None
        if self._over_quota(len(message)):
            return no("over quota", "OVERQUOTA")  # RFC 9208 §4.3
        try:
            res = self.ctx.store.append(
                self._acct, name, message, flags=flags, internaldate=internaldate
            )
        except NoSuchMailbox:
            return no("no such mailbox", "TRYCREATE")  # RFC 3501 §6.3.11
        view = self.view
        if view is not None and view.name == name:
            self._dirty = True
            if res.uidvalidity == view.uidvalidity:  # one MODSEQ, flags as stored
                self._own += 1
                self._own_added.append((res.uid, frozenset(canonical_flags(flags))))
        return ok("APPEND completed", f"APPENDUID {res.uidvalidity} {res.uid}")  # RFC 4315 §3

    def _cmd_idle(self, cmd: Command) -> Reply | None:
        """RFC 2177: report changes as they commit until DONE."""
        self.idle_tag = cmd.tag
        self.framer.line_mode = True
        self._write(continuation("idling"))
        if self.view is not None:
            self._dirty = True
            self._sync_safe(expunge=True)
        self.flush()
        return None

    def idle_flush(self) -> None:
        """Called by the server after wakeup(): report changes while idling."""
        if self.notify is not None and not self.closed:  # RFC 5465 §3: also outside IDLE
            token = _UTF8_NAMES.set(self.limits.utf8_mailboxes)
            try:
                self.notify.flush(self)
            finally:
                _UTF8_NAMES.reset(token)
            self.flush()
        if self.idle_tag is not None and self.view is not None and self._dirty:
            self._sync_safe(expunge=True)
            self.flush()

    def _on_change(self, mailbox: str) -> None:
        """store.watch callback (on the hub): never does I/O itself."""
        if self.notify is not None and self.notify.on_change(self, mailbox) and self.wakeup:
            self.wakeup()
        if self.view is not None and mailbox == self.view.name:
            self._dirty = True
            if self.idle_tag is not None and self.wakeup is not None:
                self.wakeup()

    # ---------------------------------------------------------- selected

    def _cmd_check(self, cmd: Command) -> Reply:
        self._dirty = True
        return ok("CHECK completed")

    def _cmd_close(self, cmd: Command) -> Reply:
        view = self.view
        assert view is not None
        self.view = None
        self.state = State.AUTHENTICATED
        if not view.readonly:
            # RFC 3501 §6.4.2: expunge silently.
            rows = self.ctx.store.rows(self._acct, view.name, view.uids).values()
            doomed = [r.uid for r in rows if "\\Deleted" in r.flags]
            if doomed:
                self.ctx.store.expunge(self._acct, view.name, doomed)
        return ok("CLOSE completed")

    def _cmd_expunge(self, cmd: Command) -> Reply:
        view = self.view
        assert view is not None
        if view.readonly:
            return no("mailbox is read-only", "READ-ONLY")
        only: set[int] | None = None
        if cmd.uid:  # RFC 4315 §2.1: only the given UIDs
            picked = self._resolve(cmd.args[0], True)
            only = set(picked or ())
        rows = self.ctx.store.rows(self._acct, view.name, view.uids if only is None else only)
        doomed = [r.uid for r in rows.values() if "\\Deleted" in r.flags and r.uid in view.flags]
        if doomed:
            present = self.ctx.store.expunge(self._acct, view.name, doomed)
            self._own += 1 if present else 0  # one MODSEQ per expunge
            for uid in present:
                if uid in view.flags:
                    view.gone.add(uid)
        return ok(f"{cmd.full_name} completed")

    def _resolve(self, seqs: SeqSet, uid: bool) -> list[int] | None:
        """UIDs named by a sequence set, in view order; None if a message
        sequence number is out of range (RFC 3501 §9 BAD)."""
        view = self.view
        assert view is not None
        if seqs.saved:  # "$": the saved SEARCH result, as UIDs (RFC 5182 §2.2)
            return [u for u in sorted(esearch.saved_uids(self)) if u in view.flags]
        uids = view.uids
        if len(seqs.ranges) == 1:  # one range: a slice, already ascending and unique
            if uid:
                lo, hi = seqs.resolve(uids[-1] if uids else 0)[0]
                return uids[bisect.bisect_left(uids, lo) : bisect.bisect_right(uids, hi)]
            lo, hi = seqs.resolve(len(uids))[0]
            if lo >= 1 and hi <= len(uids):
                return uids[lo - 1 : hi]
        picked: set[int] = set()
        if uid:
            largest = uids[-1] if uids else 0
            for lo, hi in seqs.resolve(largest):
                a = bisect.bisect_left(uids, lo)
                b = bisect.bisect_right(uids, hi)
                picked.update(uids[a:b])
        else:
            n = len(uids)
            for lo, hi in seqs.resolve(n):
                if hi > n or lo < 1:
                    if n == 0 and any(STAR in r for r in seqs.ranges):
                        continue
                    return None
                picked.update(uids[lo - 1 : hi])
        return sorted(picked)

    def _over_quota(self, extra: int) -> bool:
        """Would ``extra`` more octets exceed the account's quota (RFC 9208)?"""
        return quota_policy.would_exceed(self.ctx.directory, self.ctx.store, self._acct,
                                         max(extra, 1))

    def _cmd_copy(self, cmd: Command) -> Reply:
        seqs, dest = cmd.args
        uids = self._resolve(seqs, cmd.uid)
        if uids is None:
            return bad("invalid message sequence number")
        uids = [u for u in uids if u not in self.view.gone]  # type: ignore[union-attr]
        if not uids:
            return ok(f"{cmd.full_name} completed")
        if self.ctx.directory.quota(self._acct) is not None:
            rows = self._rows(uids)
            if self._over_quota(sum(r.size for r in rows.values())):
                return no("over quota", "OVERQUOTA")  # RFC 9208 §4.4 (COPY)
        try:
            uidvalidity, pairs = self.ctx.store.copy(self._acct, self.view.name, uids, dest)  # type: ignore[union-attr]
        except NoSuchMailbox:
            return no("no such mailbox", "TRYCREATE")  # RFC 3501 §6.4.7
        if dest == self.view.name:  # type: ignore[union-attr]
            self._dirty = True
        if not pairs:
            return ok(f"{cmd.full_name} completed")
        src = _compact([a for a, _ in pairs])
        dst = _compact([b for _, b in pairs])
        return ok(f"{cmd.full_name} completed", f"COPYUID {uidvalidity} {src} {dst}")

    def _cmd_store(self, cmd: Command) -> Reply:
        seqs, mode, silent, flags = cmd.args[:4]  # [4]: UNCHANGEDSINCE (commands/condstore.py)
        view = self.view
        assert view is not None
        uids = self._resolve(seqs, cmd.uid)
        if uids is None:
            return bad("invalid message sequence number")
        if view.readonly:
            return no("mailbox is read-only", "READ-ONLY")
        uids = [u for u in uids if u not in view.gone]
        if uids:
            changes = self.ctx.store.store_flags(self._acct, view.name, uids, mode, flags)
            self._own += len(changes)  # one MODSEQ per changed message
            for ch in changes:
                view.flags[ch.uid] = ch.flags
            self._announce_keywords(flags)
        if not silent:
            for u in uids:  # written directly: encode_value was most of STORE's CPU
                fl = flag_list_bytes(view.flags[u])
                if cmd.uid:
                    self._write(b"* %d FETCH (FLAGS %s UID %d)\r\n" % (view.seq_of(u), fl, u))
                else:
                    self._write(b"* %d FETCH (FLAGS %s)\r\n" % (view.seq_of(u), fl))
        return ok(f"{cmd.full_name} completed")

    def _announce_keywords(self, flags: Any) -> None:
        view = self.view
        assert view is not None
        new = {f for f in flags if not f.startswith("\\")} - view.keywords
        if new:
            view.keywords |= new
            self._write(untagged("FLAGS", self._flags_atom()))

    def _rows(self, uids: list[int]) -> dict[int, MessageRow]:
        """Rows of those UIDs still in the store: only what a command names
        is read, never the whole mailbox (node/imap/view.py)."""
        view = self.view
        assert view is not None
        return self.ctx.store.rows(self._acct, view.name, uids)

    def _cmd_search(self, cmd: Command) -> Reply:
        """RFC 9051 §6.4.4 with ESEARCH (RFC 4731) and SEARCHRES (RFC 5182):
        node/imap/esearch.py, backed by the full-text index."""
        charset = cmd.args[0]
        if charset not in (None, "UTF-8", "US-ASCII"):
            return no("unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
        self._write(esearch.answer(self, cmd))
        return ok(f"{cmd.full_name} completed")

    def _cmd_fetch(self, cmd: Command) -> Reply:
        seqs, items = cmd.args[:2]  # [2:]: RFC 7162 modifiers (commands/condstore.py)
        view = self.view
        assert view is not None
        uids = self._resolve(seqs, cmd.uid)
        if uids is None:
            return bad("invalid message sequence number")
        items = list(items)
        if cmd.uid and not any(i.name == "UID" for i in items):
            items.insert(0, FetchItem("UID"))  # RFC 3501 §6.4.8
        plan, need_meta, need_raw, sets_seen, flags_only = _fetch_plan(tuple(items))
        sets_seen = sets_seen and not view.readonly
        live = view.live(uids)
        answered = len(live)
        if not self._dirty and flags_only:
            # No change committed since the last sync, so the view is exact:
            # answer from it without reading rows (UID FETCH 1:* (FLAGS)).
            for u in live:
                self._write(fetch_flags_line(view, u, items))
            return self._fetch_done(cmd, len(uids) - answered)
        store = self.ctx.store
        for start in range(0, len(live), FETCH_BATCH):
            rows = self._rows(live[start : start + FETCH_BATCH])
            batch = list(rows)
            answered -= min(FETCH_BATCH, len(live) - start) - len(batch)
            metas = store.metadata(self._acct, view.name, batch) if need_meta else {}
            seen_now: set[int] = set()
            if sets_seen:
                unseen = [u for u in batch if "\\Seen" not in view.flags.get(u, frozenset())]
                if unseen:
                    changes = store.store_flags(self._acct, view.name, unseen, "add", ["\\Seen"])
                    self._own += len(changes)
                    for ch in changes:
                        view.flags[ch.uid] = ch.flags
                        seen_now.add(ch.uid)
                        rows[ch.uid] = dataclasses.replace(rows[ch.uid], modseq=ch.modseq)
            for u in batch:
                row = rows[u]
                raw = store.read_message(row.blob) if need_raw else b""
                self._write(self._fetch_one(view, row, plan, metas.get(u, {}), raw, u in seen_now))
        return self._fetch_done(cmd, len(uids) - answered)

    @staticmethod
    def _fetch_done(cmd: Command, unanswered: int) -> Reply:
        """The tagged FETCH reply.  A message another session expunged (not
        yet reported as EXPUNGE, RFC 9051 §7.4.1) has no data to send: a
        sequence-number FETCH then ends NO [EXPUNGEISSUED] after answering
        the others (RFC 9051 §7.1, RFC 2180 §4.1.2), so the client knows to
        NOOP.  UID FETCH ignores UIDs that no longer exist (§6.4.9)."""
        if unanswered and not cmd.uid:
            return no("some of the requested messages no longer exist", "EXPUNGEISSUED")
        return ok(f"{cmd.full_name} completed")

    def _fetch_one(
        self,
        view: View,
        row: MessageRow,
        plan: tuple[tuple[int, FetchItem, bytes], ...],
        meta: dict,
        raw: bytes,
        flags_changed: bool,
    ) -> bytes:
        """``* n FETCH (...)`` for one message, written as bytes directly (the
        generic encode_value was a third of FETCH's CPU); ``plan`` is
        the first part of _fetch_plan of the command's items."""
        out: list[bytes] = []
        flags = view.flags.get(row.uid, row.flags)
        wants_flags = False
        for kind, item, name in plan:
            if kind == _F_FLAGS:
                out.append(b"FLAGS " + flag_list_bytes(flags))
                wants_flags = True
            elif kind == _F_UID:
                out.append(b"UID %d" % row.uid)
            elif kind == _F_SIZE:
                out.append(b"RFC822.SIZE %d" % row.size)
            elif kind == _F_SECTION:
                section = item.section
                assert section is not None
                if not section.part and section.specifier is None:
                    data = raw  # BODY[]: the whole message (RFC 3501 §6.4.5)
                else:
                    data = mime.fetch_section(raw, section.part, section.specifier,
                                              section.fields)
                if item.partial is not None:
                    origin, count = item.partial
                    data = data[origin : origin + count]
                out.append(name + b" {%d}\r\n" % len(data) + data)
            else:
                out.append(encode_value(self._fetch_value(view, row, item, meta, raw))[1:-1])
        if flags_changed and not wants_flags:
            out.append(b"FLAGS " + flag_list_bytes(flags))  # RFC 3501 §6.4.5: \Seen set
        return b"* %d FETCH (%s)\r\n" % (view.seq_of(row.uid), b" ".join(out))

    def _fetch_value(
        self, view: View, row: MessageRow, item: FetchItem, meta: dict, raw: bytes
    ) -> list[Any]:
        """[name, value] of the less common fetch items (encode_value parts)."""
        name = item.name
        if name == "INTERNALDATE":
            return [Atom("INTERNALDATE"), format_date_time(row.internaldate)]
        if name == "MODSEQ":  # RFC 7162 §3.1.4.1
            return [Atom("MODSEQ"), Raw(b"(%d)" % row.modseq)]
        if name == "SAVEDATE":  # RFC 8514 §4.3: NIL if saved before dates were kept
            saved = self.ctx.store.savedates(self._acct, view.name, [row.uid]).get(row.uid)
            return [Atom("SAVEDATE"), None if saved is None else format_date_time(saved)]
        if name == "EMAILID":  # RFC 8474 §5.1
            return [Atom("EMAILID"), Raw(f"({objectid.email_id(row.blob)})".encode())]
        if name == "THREADID":  # RFC 8474 §5.2 (node/imap/objectid.py)
            tid = objectid.thread_id(meta.get("headers") or {}, row.blob)
            return [Atom("THREADID"), Raw(f"({tid})".encode())]
        if name == "ENVELOPE":
            return [Atom("ENVELOPE"), Raw(mime.envelope(meta))]
        if name == "BODYSTRUCTURE":
            return [Atom("BODYSTRUCTURE"), Raw(mime.bodystructure(meta, True))]
        if name == "BODY":
            return [Atom("BODY"), Raw(mime.bodystructure(meta, False))]
        if name == "RFC822":
            return [Atom("RFC822"), Literal(raw)]
        if name == "RFC822.HEADER":
            return [Atom("RFC822.HEADER"), Literal(_section(raw, Section((), "HEADER")))]
        if name == "RFC822.TEXT":
            return [Atom("RFC822.TEXT"), Literal(_section(raw, Section((), "TEXT")))]
        if name in ("BINARY[]", "BINARY.SIZE[]"):
            return binary.fetch_item(raw, item)  # RFC 3516 §4.2
        raise ValueError(f"unknown fetch item {name}")  # the parser builds no other

    # -------------------------------------------------------------- sync

    def _sync(self, *, expunge: bool) -> None:
        """Report committed changes to the view (RFC 3501 §5.2, §7.4.1)."""
        view = self.view
        if view is None:
            return
        if self._dirty:
            self._dirty = False
            if not self._own_only(view):
                self._report_changes(view)
        self._report_expunged(view, expunge)

    def _report_changes(self, view: View) -> None:
        """Fold changes_since(view.modseq) into the view; FETCH (FLAGS) for
        other sessions' flag changes, EXISTS for new messages."""
        changes = self.ctx.store.changes_since(self._acct, view.name, view.modseq)
        # node/imap/view.py: expunges to view.gone, new UIDs appended.
        flag_updates, added = view.apply(changes)
        keywords = {f for u in flag_updates + added for f in view.flags[u]}
        self._announce_keywords(keywords)
        modseqs = {r.uid: r.modseq for r in changes.changed}
        for u in flag_updates:
            items = [Atom("FLAGS"), _flag_list(view.flags[u]), Atom("UID"), u]
            if self.enabled & {"CONDSTORE", "QRESYNC"}:  # RFC 7162 §3.1 (unsolicited)
                items += [Atom("MODSEQ"), Raw(b"(%d)" % modseqs[u])]
            self._write(untagged(view.seq_of(u), "FETCH", items))
        if added:
            self._write(b"* %d EXISTS\r\n" % len(view.uids))

    def _own_only(self, view: View) -> bool:
        """True if every change committed to the selected mailbox since
        view.modseq is this session's own STORE/EXPUNGE (in the view already)
        or APPEND, so no changes_since is needed.  Every change takes the next MODSEQ of
        its mailbox (storage/shard.py), so HIGHESTMODSEQ = view.modseq + the
        MODSEQs own writes took proves nobody else changed it meanwhile;
        anything else (own COPY/MOVE not counted) takes the full path.  Own
        APPENDs are counted too: their messages join the view here, reported
        with EXISTS as changes_since would have (RFC 9051 §6.3.12, §7.4.1)."""
        own, self._own = self._own, 0
        added, self._own_added = self._own_added, []
        if not own:
            return False
        uidvalidity, _, modseq = self.ctx.store.mailbox_state(self._acct, view.name)
        if uidvalidity != view.uidvalidity or modseq != view.modseq + own:
            return False
        newest = view.uids[-1] if view.uids else 0
        if any(uid <= newest for uid, _ in added):
            return False  # not a plain addition (cannot happen): the full path decides
        view.modseq = modseq
        if added:
            for uid, flags in sorted(added):
                view.uids.append(uid)
                view.flags[uid] = flags
            self._announce_keywords({f for _, fs in added for f in fs})
            self._write(b"* %d EXISTS\r\n" % len(view.uids))
        return True

    def _report_expunged(self, view: View, expunge: bool) -> None:
        """EXPUNGE (VANISHED with QRESYNC) for view.gone, where allowed."""
        if expunge and view.gone and "QRESYNC" in self.enabled:
            # RFC 7162 §3.2.10: VANISHED (UIDs) instead of EXPUNGE.
            gone = sorted(view.gone)
            view.take_expunged()
            self._write(b"* VANISHED " + _compact(gone).encode("ascii") + b"\r\n")
        if expunge and view.gone:
            # Highest sequence number first, so earlier numbers stay valid.
            for seq in view.take_expunged():
                self._write(b"* %d EXPUNGE\r\n" % seq)


def _compact(uids: list[int]) -> str:
    """Ascending UIDs as a uid-set with runs joined ("1:3,7")."""
    ranges: list[tuple[int, int]] = []
    for u in uids:
        if ranges and ranges[-1][1] + 1 == u:
            ranges[-1] = (ranges[-1][0], u)
        else:
            ranges.append((u, u))
    return SeqSet(tuple(ranges)).encode()


_F_FLAGS, _F_UID, _F_SIZE, _F_SECTION, _F_OTHER = range(5)
_F_KINDS = {"FLAGS": _F_FLAGS, "UID": _F_UID, "RFC822.SIZE": _F_SIZE, "BODY[]": _F_SECTION}


@functools.lru_cache(maxsize=1024)
def _fetch_plan(
    items: tuple[FetchItem, ...],
) -> tuple[tuple[tuple[int, FetchItem, bytes], ...], bool, bool, bool, bool]:
    """(plan, need_meta, need_raw, sets_seen, flags_only) of a fetch item
    list, worked out once per distinct list rather than per command or
    message.  plan: (kind, item, echoed name) per item, the name being
    BODY[...] sections' ``BODY[HEADER.FIELDS (FROM TO)]<0>`` as echoed in
    FETCH responses; sets_seen before the mailbox's read-only check."""
    plan = []
    for item in items:
        kind = _F_KINDS.get(item.name, _F_OTHER)
        name = item.response_name().encode("utf-8") if kind == _F_SECTION else b""
        plan.append((kind, item, name))
    need_meta = any(i.name in ("ENVELOPE", "BODYSTRUCTURE", "BODY", "THREADID") for i in items)
    need_raw = any(
        i.section is not None or i.name.startswith("RFC822") and i.name != "RFC822.SIZE"
        for i in items
    )
    sets_seen = any(
        (i.section is not None and not i.peek) or i.name in ("RFC822", "RFC822.TEXT")
        for i in items
    )
    flags_only = {i.name for i in items} <= FLAGS_ONLY
    return tuple(plan), need_meta, need_raw, sets_seen, flags_only


def _section(raw: bytes, section: Section) -> bytes:
    if not section.part and section.specifier is None:
        return raw  # BODY[]: the whole message (RFC 3501 §6.4.5)
    return mime.fetch_section(raw, section.part, section.specifier, section.fields)


@functools.lru_cache(maxsize=1024)
def _list_line(word: str, attrs: str, name: str, utf8: bool) -> bytes:
    """``* LIST (attrs) "/" name``: the same few lines every LIST repeats,
    encoded once (modified UTF-7 per name was most of LIST's hub CPU)."""
    mbox = encode_utf8_string(name) if utf8 else encode_string(encode_mailbox(name))
    return untagged(word, "(" + attrs + ")", f'"{DELIMITER}"', Raw(mbox))


def _mbox(name: str) -> Raw:
    """A mailbox name in a response: UTF-8 after ENABLE IMAP4rev2 (RFC 9051
    §5.1), else modified UTF-7 (RFC 3501 §5.1.3)."""
    if _UTF8_NAMES.get():
        return Raw(encode_utf8_string(name))
    return Raw(encode_string(encode_mailbox(name)))


_BAD_NAME = re.compile(r"[*%\x00-\x1f\x7f]")


def _valid_name(name: str) -> bool:
    return (
        not _BAD_NAME.search(name)
        and not name.startswith(DELIMITER)
        and "//" not in name
        and len(name.encode("utf-8")) <= 1024
    )


# Extension command families register their handlers (and, through
# protocol.register_command, their parsers and state-table rows).
from node.imap.commands import register_all as _register_commands  # noqa: E402

_register_commands(COMMAND_HANDLERS)
