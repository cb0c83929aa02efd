"""SMTP session policy for the MX and submission roles (RFC 5321, RFC 6409).

The session owns one ``SmtpCore`` and turns its events into replies.  It is
still free of sockets: ``feed(bytes)`` returns what to send and whether to
start TLS or close; the gevent server (server.py) does the I/O.  The only
blocking call is local delivery (``ctx.store.deliver``), which yields to the
hub while the store commits.

Policy in brief:
- mail is accepted only for local domains; anything that could relay
  (other domains, address literals, "%" hack, bang paths, quoted "@",
  source routes ending elsewhere) gets 554 5.7.1;
- ``250`` to DATA/BDAT LAST is sent only after the store returned; any
  failure gives 451 4.3.0 (promise 1), and exceptions never reach the peer;
- after ``smtp.max_errors`` negative replies the session ends with 421.

The submission role (ports 587/465, RFC 6409, RFC 8314) differs:
- AUTH (RFC 4954) with PLAIN, LOGIN, SCRAM-SHA-256 is offered only once TLS
  is up (530 5.7.0 before); MAIL needs AUTH first (530 5.7.0); failures get
  535 5.7.8 after ``submission.auth_failure_delay`` (``Output.delay``: the
  server sleeps cooperatively) and the session ends with 421 4.7.0 after
  ``submission.max_auth_failures``;
- the sender must be the account or an alias of it (553 5.7.1), or any
  address of its domain for ``submission.any_sender_accounts``; <> is refused;
- recipients may be anywhere: local ones are resolved as on the MX, remote
  ones are queued (node/mailflow/submit.py); REQUIRETLS (RFC 8689) is offered
  over TLS; limits and timeout come from [submission].
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass

from node.auth import sasl
from node.context import NodeContext
from node.mailflow import local, quota, submit
from node.mailflow.envelope import Envelope, Recipient
from node.smtp import replies as R
from node.smtp.address import (
    AddressError,
    Mailbox,
    decode_xtext,
    is_address_literal,
    is_domain,
    parse_mail,
    parse_rcpt,
)
from node.smtp.protocol import (
    NEED_DATA,
    PAUSED,
    AuthResponse,
    BdatEnd,
    Command,
    DataChunk,
    DataEnd,
    ProtocolViolation,
    SmtpCore,
    State,
)
from node.smtp.replies import Reply

log = logging.getLogger("postroom.smtp")

_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_RELAY_CHARS = ("@", "%", "!")  # RFC 5321 §3.6.1 / §3.6.2: never route on these


@dataclass
class Output:
    """What the server must do after ``feed``."""

    data: bytes = b""  # replies to send, in order
    close: bool = False  # close after sending
    starttls: bool = False  # send data, then handshake (RFC 3207)
    discarded: int = 0  # plaintext octets dropped after STARTTLS
    delay: float = 0.0  # seconds to wait (cooperatively) before sending data


class Session:
    """Policy for one SMTP connection; see the module docstring."""

    def __init__(
        self, ctx: NodeContext, peer_ip: str, *, tls: str | None = None, role: str = "mx"
    ) -> None:
        if role not in ("mx", "submission"):
            raise ValueError(f"unknown SMTP role {role!r}")
        cfg = ctx.config.smtp
        self.ctx = ctx
        self.peer_ip = peer_ip
        self.tls = tls  # description of the TLS in use, or None
        self.role = role
        self.submission = role == "submission"
        sub = ctx.config.submission
        self.max_message_size = sub.max_message_size if self.submission else cfg.max_message_size
        self.max_recipients = sub.max_recipients if self.submission else cfg.max_recipients
        self.core = SmtpCore(
            max_command_length=cfg.max_command_length,
            max_line_length=cfg.max_line_length,
            max_message_size=self.max_message_size,
            auth=self.submission,
        )
        self.errors = 0
        self.helo = ""
        self.esmtp = False
        self.envelope: Envelope | None = None
        self._message = bytearray()
        self.account: str | None = None  # authenticated account (submission)
        self.auth_failures = 0
        self._mechanism: sasl.Mechanism | None = None
        self._auth_final: str | None = None  # account, once SCRAM's server-final is sent
        self._requiretls = False  # RFC 8689 for the current transaction
        self._delay = 0.0

    # -- server interface -------------------------------------------------
    def greeting(self) -> bytes:
        """RFC 5321 §4.2: 220 greeting (no enhanced code, RFC 2034 §3)."""
        return Reply(220, None, (f"{self.ctx.hostname} ESMTP postroom",)).encode()

    def timeout_reply(self) -> bytes:
        """421 4.4.2 sent when the client was silent too long (§4.5.3.2)."""
        return R.TIMEOUT.encode()

    def feed(self, data: bytes) -> Output:
        """Process peer bytes; returns the replies and what to do next."""
        self.core.receive_data(data)
        out = Output()
        chunks: list[bytes] = []
        while True:
            event = self.core.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            if isinstance(event, DataChunk):
                self._message += event.data  # the core never exceeds the size cap
                continue
            try:
                reply, fatal = self._handle(event)
            except Exception as exc:  # e.g. the directory is unreachable: retry later
                log.warning("smtp %s: %s failed (%s: %s); answered 451", self.peer_ip,
                            type(event).__name__, type(exc).__name__, exc)
                if isinstance(event, DataEnd | BdatEnd):
                    self._reset()
                self._mechanism = self._auth_final = None  # any SASL exchange is over
                reply, fatal = R.TEMPORARY_FAILURE, False
            if not reply.positive and not fatal and not reply.closes:
                self.errors += 1
                if self.errors >= self.ctx.config.smtp.max_errors:
                    chunks.append(self.core.respond(reply))
                    self.core.close()  # RFC 5321 §4.2.2 421: nothing after this counts
                    chunks.append(R.TOO_MANY_ERRORS.encode())
                    out.close = True
                    break
            chunks.append(self.core.respond(reply))
            if fatal or self.core.state is State.CLOSED:
                out.close = True
                break
            if self.core.state is State.TLS:
                assert isinstance(event, Command)
                out.starttls = True
                out.discarded = len(event.discarded)
                break
        out.data = b"".join(chunks)
        out.delay, self._delay = self._delay, 0.0
        return out

    def tls_established(self, description: str | None) -> None:
        """Handshake done: forget everything, as RFC 3207 §4.2 requires."""
        self.core.tls_established()
        self.tls = description or "TLS"
        self.helo = ""
        self.esmtp = False
        self._reset()

    # -- dispatch -----------------------------------------------------------
    def _handle(self, event: object) -> tuple[Reply, bool]:
        if isinstance(event, ProtocolViolation):
            log.info("smtp %s: %s", self.peer_ip, event.reason)
            if event.fatal:
                self._reset()
            return event.reply, event.fatal
        if isinstance(event, DataEnd):
            return self._end_data(event), False
        if isinstance(event, BdatEnd):
            return self._end_bdat(event), False
        if isinstance(event, AuthResponse):
            return self._auth_response(event.line)
        assert isinstance(event, Command)
        if event.verb == "AUTH":  # only reaches us on the submission role (core auth=True)
            return self._cmd_auth(event.args)
        handler = getattr(self, "_cmd_" + event.verb.lower())
        return handler(event.args), False

    # -- commands -------------------------------------------------------------
    def _cmd_ehlo(self, args: str) -> Reply:
        return self._hello(args, esmtp=True)

    def _cmd_helo(self, args: str) -> Reply:
        return self._hello(args, esmtp=False)

    def _hello(self, args: str, *, esmtp: bool) -> Reply:
        name = args.strip(" ")
        if not (is_domain(name) or is_address_literal(name)):
            return R.ARG_SYNTAX.with_text("EHLO/HELO needs a domain or address literal")
        self.helo = name
        self.esmtp = esmtp
        self._reset()
        greeting = f"{self.ctx.hostname} greets {name}"
        if not esmtp:
            return Reply(250, None, (greeting,))  # RFC 2034 §3: no enhanced code
        lines = [
            greeting,
            "PIPELINING",  # RFC 2920
            f"SIZE {self.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "BINARYMIME",  # RFC 3030 §3
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
        ]
        if self.tls is None:
            lines.append("STARTTLS")  # RFC 3207 §4.2: not after TLS
        elif self.submission:
            # RFC 4954 §4 / RFC 8314 §3.3: credentials only over TLS.
            lines.append("AUTH " + " ".join(sasl.MECHANISMS))
            lines.append("REQUIRETLS")  # RFC 8689 §4: only over TLS
        lines += ["CHUNKING", "DSN", "HELP"]  # RFC 3030, RFC 3461, RFC 5321 §4.1.1.8
        return Reply(250, None, tuple(lines))

    def _cmd_mail(self, args: str) -> Reply:
        try:
            parsed = parse_mail(args)
        except AddressError as exc:
            log.info("smtp %s: MAIL refused: %s", self.peer_ip, exc)
            return exc.reply
        params = dict(parsed.params)
        env = Envelope(sender=parsed.sender.address if parsed.sender else "")
        smtputf8 = False
        if "SMTPUTF8" in params:
            if params.pop("SMTPUTF8") is not None:
                return R.ARG_SYNTAX
            smtputf8 = True
        if not self.esmtp and parsed.params:
            return R.PARAM_NOT_RECOGNIZED  # parameters need EHLO (RFC 5321 §4.1.1.11)
        if parsed.sender and not parsed.sender.ascii and not smtputf8:
            return R.NEEDS_SMTPUTF8
        env.smtputf8 = smtputf8
        if "SIZE" in params:
            value = params.pop("SIZE")
            if value is None or not value.isdigit() or len(value) > 20:
                return R.ARG_SYNTAX
            env.size = int(value)
            if env.size > self.max_message_size:
                return R.MESSAGE_TOO_BIG  # RFC 1870 §6.1
        if "BODY" in params:
            value = (params.pop("BODY") or "").upper()
            if value not in ("7BIT", "8BITMIME", "BINARYMIME"):
                return R.ARG_SYNTAX
            env.body = value
        if "RET" in params:
            value = (params.pop("RET") or "").upper()
            if value not in ("FULL", "HDRS"):
                return R.ARG_SYNTAX  # RFC 3461 §4.3
            env.ret = value
        if "ENVID" in params:
            value = params.pop("ENVID") or ""
            try:
                env.envid = decode_xtext(value)
            except AddressError as exc:
                return exc.reply
            if not value or len(value) > 100:
                return R.ARG_SYNTAX  # RFC 3461 §4.4
        params.pop("AUTH", None)  # RFC 4954 §5: we never trust a client's AUTH= claim
        requiretls = False
        if self.submission and "REQUIRETLS" in params:
            if params.pop("REQUIRETLS") is not None or self.tls is None:
                return R.ARG_SYNTAX if self.tls else R.PARAM_NOT_RECOGNIZED  # RFC 8689 §4.1
            requiretls = True
        if params:
            return R.PARAM_NOT_RECOGNIZED
        if self.submission:
            refusal = self._sender_check(parsed.sender)
            if refusal is not None:
                return refusal
        env.helo = self.helo
        env.peer_ip = self.peer_ip
        env.tls = self.tls
        env.protocol = self._with_protocol(smtputf8)
        self._reset()
        self.envelope = env
        self._requiretls = requiretls
        return R.SENDER_OK

    def _with_protocol(self, smtputf8: bool) -> str:
        """RFC 3848 / RFC 6531 §3.7.3 with-protocol keyword."""
        auth = "A" if self.account else ""  # RFC 3848 §2: ESMTPA / ESMTPSA
        if smtputf8:
            return ("UTF8SMTPS" if self.tls else "UTF8SMTP") + auth
        if not self.esmtp:
            return "SMTP"
        return ("ESMTPS" if self.tls else "ESMTP") + auth

    def _cmd_rcpt(self, args: str) -> Reply:
        env = self.envelope
        assert env is not None  # the core's table allows RCPT only after MAIL
        try:
            parsed = parse_rcpt(args)
        except AddressError as exc:
            log.info("smtp %s: RCPT refused: %s", self.peer_ip, exc)
            return exc.reply
        if len(env.recipients) >= self.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        params = dict(parsed.params)
        notify: tuple[str, ...] | None = None
        orcpt: str | None = None
        if "NOTIFY" in params:
            values = tuple((params.pop("NOTIFY") or "").upper().split(","))
            if values != ("NEVER",) and not (set(values) <= _NOTIFY_VALUES and values):
                return R.ARG_SYNTAX  # RFC 3461 §4.1
            notify = values
        if "ORCPT" in params:
            value = params.pop("ORCPT") or ""
            addr_type, sep, xtext = value.partition(";")
            if not sep or not addr_type or not xtext:
                return R.ARG_SYNTAX  # RFC 3461 §4.2
            try:
                orcpt = f"{addr_type};{decode_xtext(xtext)}"
            except AddressError as exc:
                return exc.reply
        if params:
            return R.PARAM_NOT_RECOGNIZED
        if parsed.recipient is None:
            address, accounts = self._bare_postmaster()
        else:
            mbox = parsed.recipient
            if not mbox.ascii and not env.smtputf8:
                return R.NEEDS_SMTPUTF8
            if self.submission and not self.ctx.directory.is_local_domain(mbox.domain.lower()):
                return self._remote_recipient(env, mbox, notify, orcpt)
            refusal = self._relay_check(mbox)
            if refusal is not None:
                log.info("smtp %s: relay refused for %r", self.peer_ip, mbox.address)
                return refusal
            address = mbox.address
            accounts = local.resolve(self.ctx.directory, address)
        if accounts is None:
            return R.UNKNOWN_USER
        if not accounts:
            # postmaster@ a local domain with no account anywhere (RFC 5321
            # §4.5.1 forbids refusing it): a temporary failure, never a loss.
            return R.NO_MAILBOX_YET
        if quota.full_accounts(self.ctx.directory, self.ctx.store, accounts, 0):
            log.info("smtp %s: RCPT %r refused: over quota", self.peer_ip, address)
            return R.MAILBOX_FULL  # RFC 3463 X.2.2, per recipient
        env.recipients.append(Recipient(address, tuple(accounts), notify, orcpt))
        return R.RECIPIENT_OK

    def _relay_check(self, mbox: Mailbox) -> Reply | None:
        """Refuse anything that is not plainly a local mailbox (no open relay).

        Source routes are ignored only when the final mailbox is local
        (RFC 5321 §3.6.1, Appendix C); the "%" hack, bang paths, "@" inside
        a quoted local part and address literals are never delivered.
        """
        if mbox.literal:
            return R.RELAY_DENIED
        if any(ch in mbox.local for ch in _RELAY_CHARS):
            return R.RELAY_DENIED
        if not self.ctx.directory.is_local_domain(mbox.domain.lower()):
            return R.RELAY_DENIED
        return None

    def _bare_postmaster(self) -> tuple[str, list[str] | None]:
        """RFC 5321 §4.5.1: <postmaster> without a domain must be accepted.

        It goes to postmaster@ smtp.postmaster_domain, or else the node's
        hostname or its nearest parent that is a local domain.
        """
        configured = self.ctx.config.smtp.postmaster_domain
        candidates = [configured] if configured else []
        labels = self.ctx.hostname.lower().split(".")
        candidates += [".".join(labels[i:]) for i in range(len(labels) - 1)]
        for domain in candidates:
            if domain and self.ctx.directory.is_local_domain(domain):
                address = f"postmaster@{domain}"
                return address, local.resolve(self.ctx.directory, address)
        return "postmaster", None

    def _cmd_data(self, args: str) -> Reply:
        if args:
            return R.ARG_SYNTAX
        env = self.envelope
        assert env is not None and env.recipients
        if env.body == "BINARYMIME":
            return R.BINARY_NEEDS_BDAT  # RFC 3030 §3
        self._message = bytearray()
        return R.START_DATA

    def _end_data(self, event: DataEnd) -> Reply:
        if event.error is not None:
            self._reset()
            return event.error
        return self._deliver()

    def _end_bdat(self, event: BdatEnd) -> Reply:
        if event.error is not None:
            if event.in_sequence:
                self._reset()
            return event.error
        if not event.last:
            return R.CHUNK_OK.with_text(f"{event.chunk_size} octets received")
        return self._deliver()

    def _deliver(self) -> Reply:
        env = self.envelope
        message = bytes(self._message)
        requiretls = self._requiretls
        self._reset()
        assert env is not None
        if self.submission:
            assert self.account is not None
            return submit.submit(self.ctx, env, message, account=self.account,
                                 requiretls=requiretls)
        full = quota.full_accounts(self.ctx.directory, self.ctx.store, env.accounts(),
                                   len(message))
        if full:
            # This message would take an account past its quota (RFC 9208 §5.1).
            # One reply covers every recipient after DATA, so the whole
            # message is refused; accounts already full were refused at RCPT.
            log.info("smtp %s: message of %d octets refused: over quota for %s",
                     self.peer_ip, len(message), ", ".join(full))
            return R.MAILBOX_FULL
        try:
            results = local.deliver(self.ctx, env, message)
        except Exception as exc:  # promise 1: never a silent loss, never str(exc) to the peer
            log.warning(
                "smtp %s: delivery failed (%s: %s); answered 451",
                self.peer_ip, type(exc).__name__, exc,
            )
            return R.STORAGE_FAILED
        log.info(
            "smtp %s: delivered %d octets from <%s> to %d account(s)",
            self.peer_ip, len(message), env.sender, len(results),
        )
        return R.QUEUED

    def _cmd_rset(self, args: str) -> Reply:
        self._reset()
        return R.RESET_OK

    def _cmd_noop(self, args: str) -> Reply:
        return R.NOOP_OK

    def _cmd_quit(self, args: str) -> Reply:
        self._reset()
        return R.BYE

    def _cmd_vrfy(self, args: str) -> Reply:
        return R.VRFY_CANNOT if args else R.ARG_SYNTAX  # never disclose (§3.5.3)

    def _cmd_expn(self, args: str) -> Reply:
        return R.EXPN_CANNOT if args else R.ARG_SYNTAX

    def _cmd_help(self, args: str) -> Reply:
        return R.HELP

    def _cmd_starttls(self, args: str) -> Reply:
        if args:
            return R.ARG_SYNTAX  # RFC 3207 §4: no parameters
        if self.tls is not None:
            return R.ALREADY_TLS
        return R.READY_TLS

    def _reset(self) -> None:
        self.envelope = None
        self._message = bytearray()
        self._requiretls = False

    # -- submission (RFC 6409, RFC 4954) ------------------------------------------
    def _sender_check(self, sender: Mailbox | None) -> Reply | None:
        """AUTH first (RFC 4954 §6); then the sender must belong to the account."""
        if self.account is None:
            return R.AUTH_REQUIRED
        if sender is None:
            return R.NULL_SENDER_REFUSED  # a user never sends bounces
        address = sender.address
        if not sender.literal and self._may_send_as(address):
            return None
        log.info("submission %s: %s may not send as <%s>", self.peer_ip, self.account, address)
        return R.SENDER_NOT_OWNED.with_text(
            f"Sender address rejected: not owned by user {self.account}"
        )

    def _may_send_as(self, address: str) -> bool:
        account = self.account
        assert account is not None
        if self.ctx.directory.sender_allowed(account, address):
            return True
        special = {a.lower() for a in self.ctx.config.submission.any_sender_accounts}
        if account.lower() in special:
            domain = address.rpartition("@")[2].lower()
            return domain == account.rpartition("@")[2].lower()
        return False

    def _remote_recipient(
        self, env: Envelope, mbox: Mailbox, notify: tuple[str, ...] | None, orcpt: str | None
    ) -> Reply:
        """An authenticated user may send anywhere (RFC 6409 §4); it is queued."""
        if mbox.literal:
            return R.RELAY_DENIED  # no delivery to address literals
        if self.ctx.queue is None:
            log.warning("submission %s: no outbound queue; remote RCPT deferred", self.peer_ip)
            return R.TEMPORARY_FAILURE
        env.recipients.append(Recipient(mbox.address, (), notify, orcpt))
        return R.RECIPIENT_OK

    def _cmd_auth(self, args: str) -> tuple[Reply, bool]:
        """RFC 4954 §4: AUTH mechanism [initial-response]."""
        if self.tls is None:
            return R.MUST_STARTTLS, False
        if self.account is not None:
            return R.ALREADY_AUTHENTICATED, False
        name, _, initial = args.partition(" ")
        mechanism = sasl.make_mechanism(
            name, self.ctx.directory.authenticate,
            self.ctx.directory.scram_credentials,
        )
        if mechanism is None:
            return R.UNKNOWN_MECHANISM, False
        data: bytes | None = None
        if initial:
            data = _b64(initial.strip(" "))
            if data is None:
                return R.AUTH_BAD_BASE64, False
        self._mechanism = mechanism
        return self._auth_step(mechanism.start(data))

    def _auth_response(self, line: bytes) -> tuple[Reply, bool]:
        if self._auth_final is not None:  # answer to the server-final 334 (RFC 4954 §4)
            account, self._auth_final = self._auth_final, None
            if line.strip():
                return self._auth_failed("data after the server's final message")
            return self._auth_ok(account)
        mechanism = self._mechanism
        assert mechanism is not None  # the core sends lines only after our 334
        if line.strip() == b"*":
            self._mechanism = None
            return R.AUTH_CANCELLED, False  # RFC 4954 §4
        data = _b64(line.decode("ascii", "replace"))
        if data is None:
            self._mechanism = None
            return R.AUTH_BAD_BASE64, False
        return self._auth_step(mechanism.step(data))

    def _auth_step(self, step: sasl.Step) -> tuple[Reply, bool]:
        if isinstance(step, sasl.Challenge):
            return Reply(334, None, (base64.b64encode(step.data).decode(),)), False
        self._mechanism = None
        if isinstance(step, sasl.Failure):
            return self._auth_failed(step.reason)
        if step.data is not None:  # RFC 4954 §4: additional data with success
            self._auth_final = step.account
            return Reply(334, None, (base64.b64encode(step.data).decode(),)), False
        return self._auth_ok(step.account)

    def _auth_ok(self, account: str) -> tuple[Reply, bool]:
        self.account = account
        log.info("submission %s: authenticated as %s", self.peer_ip, account)
        return R.AUTH_OK, False

    def _auth_failed(self, reason: str) -> tuple[Reply, bool]:
        self.auth_failures += 1
        self._delay += self.ctx.config.submission.auth_failure_delay
        log.info("submission %s: authentication failed: %s", self.peer_ip, reason)
        if self.auth_failures >= self.ctx.config.submission.max_auth_failures:
            return R.TOO_MANY_AUTH_FAILURES, True
        return R.AUTH_FAILED, False


def _b64(text: str) -> bytes | None:
    """RFC 4954 §4: base64 client data; "=" alone is an empty response."""
    text = text.strip()
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
