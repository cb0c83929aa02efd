"""What happens to a message an authenticated user submitted (RFC 6409).

1. Header fixes (RFC 6409 §8): Date (§8.1) and Message-ID (§8.3) are added
   when missing; nothing else in the message is changed.
2. One Received field (RFC 5321 §4.4) is made, saying "(authenticated)" but
   never who; the local and the queued copies share it.
3. Local recipients are delivered as on the MX (``local.deliver``, which adds
   Return-Path).  Then the remote recipients are signed once with DKIM (when
   ``ctx.dkim`` is set) and queued in one ``ctx.queue.enqueue``; no
   Return-Path on the queued copy (the final MTA adds it).
4. ``250 2.0.0`` (with the queue id) only after both committed; any failure
   is ``451 4.3.0`` (promise 1).  Local delivery comes first: if queueing
   then fails, the client's retry may deliver the local copies twice, which
   is the at-least-once side we choose over losing mail or duplicating it
   on other people's servers.
"""

from __future__ import annotations

import logging
import re
import secrets

from node.context import NodeContext
from node.mailflow import local
from node.mailflow.envelope import Envelope
from node.smtp import replies as R
from node.smtp.replies import Reply
from storage.model import QueuedRecipient

log = logging.getLogger("postroom.submission")

_HEADER_SCAN_LIMIT = 1024 * 1024  # octets of header searched for Date/Message-ID
# A Date or Message-ID field name at the start of a header line (not a folded
# continuation, RFC 5322 §2.2.3), blanks allowed before the colon.
_DATE_OR_ID = re.compile(rb"(?:^|\r\n)(date|message-id)[ \t]*:", re.IGNORECASE)


def _header_section(message: bytes) -> bytes:
    """The header section (up to the first empty line, at most the scan limit)."""
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n", 0, _HEADER_SCAN_LIMIT)
    return message[: end if end >= 0 else _HEADER_SCAN_LIMIT]


def header_names(message: bytes) -> set[str]:
    """Lower-cased field names of the header section (RFC 5322 §2.2)."""
    head = _header_section(message)
    names = set()
    for line in head.split(b"\r\n"):
        if not line or line[:1] in (b" ", b"\t"):
            continue  # folded continuation (RFC 5322 §2.2.3)
        name, sep, _ = line.partition(b":")
        if sep:
            names.add(name.strip().decode("ascii", "replace").lower())
    return names


def missing_headers(message: bytes, hostname: str, now: float | None = None) -> bytes:
    """The Date and Message-ID fields to prepend, or b"" (RFC 6409 §8.1, §8.3)."""
    names = {m.decode("ascii").lower() for m in _DATE_OR_ID.findall(_header_section(message))}
    out = b""
    if "date" not in names:
        out += f"Date: {local.rfc5322_date(now)}\r\n".encode()
    if "message-id" not in names:
        out += f"Message-ID: <{secrets.token_hex(16)}@{hostname}>\r\n".encode()
    return out


def submit(
    ctx: NodeContext, envelope: Envelope, message: bytes, *, account: str, requiretls: bool
) -> Reply:
    """Deliver and queue one submitted message; the reply for DATA/BDAT."""
    fixed = missing_headers(message, ctx.hostname) + message
    trace = local.received_header(envelope, ctx.hostname, authenticated=True)
    remote = [r for r in envelope.recipients if not r.accounts]
    try:
        delivered = local.deliver(ctx, envelope, fixed, trace=trace)
        queue_id = None
        if remote:
            if ctx.queue is None:
                raise RuntimeError("no outbound queue on this node")
            raw = trace + fixed
            domain = envelope.sender.rpartition("@")[2].lower()
            if ctx.dkim is not None:
                raw = ctx.dkim.sign(raw, domain)
            entry = ctx.queue.enqueue(
                envelope.sender,
                [QueuedRecipient(r.address, r.notify or (), r.orcpt) for r in remote],
                raw,
                envid=envelope.envid,
                ret=envelope.ret,
                requiretls=requiretls,
                smtputf8=envelope.smtputf8,
                body=envelope.body or "7BIT",
            )
            queue_id = entry.id
    except Exception as exc:  # promise 1: never a silent loss, never str(exc) to the peer
        log.warning("submission %s: %s failed (%s: %s); answered 451",
                    envelope.peer_ip, account, type(exc).__name__, exc)
        return R.STORAGE_FAILED
    log.info(
        "submission %s: %s sent %d octets from <%s>: %d local account(s), "
        "%d remote recipient(s)%s",
        envelope.peer_ip, account, len(fixed), envelope.sender, len(delivered), len(remote),
        f" queued as {queue_id}" if queue_id else "",
    )
    if queue_id:
        return R.QUEUED.with_text(f"message accepted for delivery, queued as {queue_id}")
    return R.QUEUED
