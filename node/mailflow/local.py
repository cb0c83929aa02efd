"""Local delivery: resolve recipients, add trace fields, store durably.

``deliver`` returns only after ``ctx.store.deliver`` has made the message
durable for every account; it raises whatever the store raises (the SMTP
session answers 451 4.3.0 and nothing is visible).  Filters (SPF, DKIM,
Sieve, ...) hook in here in later work.
"""

from __future__ import annotations

import email.utils
import logging
import secrets
import time

from node.context import Directory, NodeContext
from node.mailflow.envelope import Envelope
from node.outbound import dsn
from storage.model import AppendResult

log = logging.getLogger(__name__)


def resolve(directory: Directory, address: str) -> list[str] | None:
    """Accounts for an address after alias expansion; None when unknown."""
    accounts = directory.resolve_recipient(address)
    if accounts is None:
        return None
    return list(dict.fromkeys(accounts))


_last_date: tuple[int, str] = (-1, "")


def rfc5322_date(now: float | None = None) -> str:
    """``email.utils.formatdate(now, localtime=True)``, remembered for the
    current second (it names whole seconds; formatting costs ~0.1 ms)."""
    global _last_date
    second = int(now if now is not None else time.time())
    if _last_date[0] != second:
        _last_date = (second, email.utils.formatdate(second, localtime=True))
    return _last_date[1]


def received_header(
    envelope: Envelope, hostname: str, now: float | None = None, *, authenticated: bool = False
) -> bytes:
    """RFC 5321 §4.4 Received trace field (with-protocol per RFC 3848).

    The TLS version and cipher are a comment; "for" names the recipient
    only when there is exactly one, so Bcc recipients are not disclosed.
    A submitted message says only "(authenticated)": never who, never how.
    """
    when = rfc5322_date(now)
    ident = secrets.token_hex(8)
    ip = envelope.peer_ip
    literal = f"IPv6:{ip}" if ":" in ip else ip
    lines = [f"Received: from {envelope.helo or 'unknown'} ([{literal}])"]
    if authenticated:
        lines[0] += " (authenticated)"
    by = f"\tby {hostname} (postroom) with {envelope.protocol}"
    if envelope.tls:
        by += f" ({envelope.tls})"
    lines.append(by + f" id {ident}")
    if len(envelope.recipients) == 1:
        rcpt = envelope.recipients[0].address
        lines.append(f"\tfor <{rcpt}>; {when}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{when}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def return_path(envelope: Envelope) -> bytes:
    """RFC 5321 §4.4: the final delivery adds Return-Path with the reverse-path."""
    return f"Return-Path: <{envelope.sender}>\r\n".encode()


def deliver(
    ctx: NodeContext, envelope: Envelope, message: bytes, *, trace: bytes | None = None
) -> list[AppendResult]:
    """Store ``message`` once for every distinct account of the envelope.

    ``trace`` is the Received field to use (submission shares one between
    the local and the queued copies); by default one is made here.
    """
    accounts = envelope.accounts()
    if not accounts:
        return []
    if trace is None:
        trace = received_header(envelope, ctx.hostname)
    raw = return_path(envelope) + trace + message
    results = ctx.store.deliver(accounts, raw)
    try:  # RFC 3461 NOTIFY=SUCCESS; the message is durable: never turn 250 into a failure
        dsn.report_local_success(ctx, envelope, message)
    except Exception as exc:
        log.warning("dsn: success report to <%s> not sent (%s: %s)",
                    envelope.sender, type(exc).__name__, exc)
    return results
