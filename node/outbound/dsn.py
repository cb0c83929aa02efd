"""Delivery status notifications: RFC 3464 reports, RFC 3461 rules, RFC 6533.

Theory of operation.  ``build_report`` is pure: queue state and the original
message in, the bytes of one ``multipart/report; report-type=delivery-status``
message out (CRLF, every line at most 998 octets, RFC 5322 §2.1.1).
``send_report`` applies the RFC 3461 rules -- no report about a report or to
the null reverse-path (§6.2), NOTIFY filtering per recipient (§4.1) -- and
hands the report to the sender: a local sender's INBOX through the mail store,
anyone else through the outbound queue with a null reverse-path and
``is_dsn=True`` so that nothing ever reports about it in turn.
``report_local_success`` is the hook of local delivery for NOTIFY=SUCCESS.

Report kinds: ``failure`` (Action: failed), ``delay`` (delayed),
``success`` (delivered, or relayed/expanded per recipient state) and
``relayed`` (relayed to a next hop that does not speak DSN, RFC 3461 §6.2.7.2).
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import re
import secrets
import time
from collections.abc import Iterable

from node.context import NodeContext
from node.mailflow.envelope import Envelope
from storage.model import DELIVERED, RELAYED, QueuedRecipient, QueueEntry

log = logging.getLogger(__name__)

FAILURE, DELAY, SUCCESS, RELAY = "failure", "delay", "success", "relayed"
KINDS = (FAILURE, DELAY, SUCCESS, RELAY)
# A report-only recipient state: a local alias expanded to several accounts
# (RFC 3461 §6.2.7.3); never stored in the queue.
EXPANDED = "expanded"

# The original is returned whole only up to this size; above it, its header
# only (RFC 3462 §3 / RFC 3461 §4.3 leave the choice to the MTA).
MAX_RETURNED_ORIGINAL = 10 * 1024 * 1024
MAX_LINE = 998  # octets without CRLF (RFC 5322 §2.1.1)

_SUBJECTS = {
    FAILURE: "Undelivered Mail Returned to Sender",
    DELAY: "Delayed Mail (still being retried)",
    SUCCESS: "Successful Mail Delivery Report",
    RELAY: "Mail Relayed Report",
}
# RFC 3461 §4.1: the NOTIFY keyword each kind of report needs.
_NEEDS = {FAILURE: "FAILURE", DELAY: "DELAY", SUCCESS: "SUCCESS", RELAY: "SUCCESS"}
_CTL = re.compile(r"[\x00-\x1f\x7f]+")


def wants(notify: Iterable[str] | None, kind: str) -> bool:
    """Whether a recipient with this NOTIFY asked for a ``kind`` report.

    RFC 3461 §4.1: NEVER means none; no NOTIFY (``()`` or None) means the
    MTA's default, which is FAILURE and DELAY here (never SUCCESS).
    """
    values = {v.upper() for v in notify or ()}
    if "NEVER" in values:
        return False
    if not values:
        return kind in (FAILURE, DELAY)
    return _NEEDS[kind] in values


def _clean(text: str) -> str:
    """One line of text for a header field: no control characters."""
    return _CTL.sub(" ", text).strip()


def _is_ascii(text: str) -> bool:
    return text.isascii()


def _date(when: float) -> str:
    """RFC 5322 §3.3 date-time in UTC ("+0000")."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.UTC))


def _split_header(original: bytes) -> tuple[bytes, bytes]:
    """(header block with its final CRLF, body) of a CRLF message."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = original.find(sep)
        if at >= 0:
            return original[: at + len(sep) // 2], original[at + len(sep) :]
    if original.startswith((b"\r\n", b"\n")):
        return b"", original
    return original, b""


def _crlf(data: bytes) -> bytes:
    """Every line ending as CRLF (bare LF and bare CR normalised)."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def _lines_fit(data: bytes) -> bool:
    return all(len(line) <= MAX_LINE for line in data.split(b"\r\n"))


def _status(kind: str, rcpt: QueuedRecipient) -> str:
    """The RFC 3463 status code for this recipient in a ``kind`` report."""
    enhanced = rcpt.enhanced or ""
    if not re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", enhanced):
        enhanced = ""
    if kind in (SUCCESS, RELAY):
        return enhanced if enhanced.startswith("2.") else "2.0.0"
    if kind == DELAY:
        if enhanced.startswith("4."):
            return enhanced
        return "4.0.0"
    # failure
    if enhanced.startswith("5."):
        return enhanced
    if rcpt.code is not None and 500 <= rcpt.code < 600:
        return "5.0.0"
    # Still temporary when we gave up: delivery time expired (RFC 3463 §3.5).
    return "5.4.7"


def _action(kind: str, rcpt: QueuedRecipient) -> str:
    if kind == FAILURE:
        return "failed"
    if kind == DELAY:
        return "delayed"
    if kind == RELAY:
        return "relayed"
    return {DELIVERED: "delivered", RELAYED: "relayed", EXPANDED: "expanded"}.get(
        rcpt.state, "delivered"
    )


def _address_field(address: str, utf8: bool) -> str:
    """'rfc822;addr', or 'utf-8;addr' for a non-ASCII one (RFC 6533 §3)."""
    address = _clean(address)
    if utf8 and not _is_ascii(address):
        return f"utf-8; {address}"
    return f"rfc822; {address}"


def _orcpt_field(orcpt: str, utf8: bool) -> str:
    addr_type, _, addr = orcpt.partition(";")
    addr_type, addr = _clean(addr_type) or "rfc822", _clean(addr)
    if not _is_ascii(addr) and not utf8:
        addr = addr.encode("ascii", "backslashreplace").decode()
    return f"{addr_type}; {addr}"


def _diagnostic(rcpt: QueuedRecipient) -> str | None:
    text = _clean(rcpt.text)
    if rcpt.code is not None:
        status = f" {rcpt.enhanced}" if rcpt.enhanced and rcpt.enhanced not in text else ""
        return f"smtp; {rcpt.code}{status} {text}".rstrip()
    if text:
        return f"X-Postroom; {text}"
    return None


def _fold(name: str, value: str) -> str:
    """'Name: value' folded at spaces so no line exceeds 998 octets."""
    line = f"{name}: {value}"
    if len(line.encode()) <= MAX_LINE:
        return line
    out, current = [], ""
    for word in line.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and len(candidate.encode()) > 78:
            out.append(current)
            current = word
        else:
            current = candidate
    out.append(current)
    # A single word longer than a line is cut: it is only text for humans.
    return "\r\n ".join(w.encode()[:MAX_LINE - 1].decode("utf-8", "ignore") for w in out)


def _human(kind: str, reporting_mta: str, rows: list[tuple[QueuedRecipient, str, str]],
           next_attempt: float | None, until: float | None) -> str:
    intro = {
        FAILURE: "Your message could not be delivered to one or more recipients.\n"
        "It has been returned with this report. The details follow.",
        DELAY: "Your message has not been delivered yet to one or more recipients.\n"
        "This is only a warning: you do not need to send it again.",
        SUCCESS: "Your message was delivered to the recipients below, as you asked.",
        RELAY: "Your message was passed on to a mail system that cannot send delivery\n"
        "reports: no further notification about it will follow.",
    }[kind]
    lines = [f"This is the mail system at host {reporting_mta}.", "", *intro.split("\n"), ""]
    if kind == DELAY:
        if next_attempt:
            lines.append(f"Next attempt: {_date(next_attempt)}")
        if until:
            lines.append(f"The mail system gives up at: {_date(until)}")
        lines.append("")
    for rcpt, action, status in rows:
        line = f"<{_clean(rcpt.address)}>: {action} ({status})"
        if rcpt.remote_mta:
            line += f", host {_clean(rcpt.remote_mta)}"
        if rcpt.code is not None or rcpt.text:
            code = f"{rcpt.code} " if rcpt.code is not None else ""
            line += f" said: {code}{_clean(rcpt.text)}".rstrip()
        lines.append(line)
    return "\r\n".join(_fold_text(line) for line in lines) + "\r\n"


def _fold_text(line: str) -> str:
    if len(line.encode()) <= MAX_LINE:
        return line
    return _fold("X", line)[3:]


def build_report(
    kind: str,
    entry: QueueEntry | None,
    recipients: list[QueuedRecipient],
    original: bytes,
    *,
    reporting_mta: str,
    arrival: float,
    now: float,
    envid: str | None = None,
    ret: str | None = None,
    sender: str = "",
    will_retry_until: float | None = None,
    smtputf8: bool = False,
) -> bytes:
    """One RFC 3464 report about ``recipients`` of ``original``.

    ``entry`` (when given) supplies ENVID, RET, the sender, the queue id, the
    next attempt and whether the message was SMTPUTF8/BINARYMIME; the keyword
    arguments stand in for it (local delivery has no queue entry).  Part 3 is
    the whole original for failures unless RET=HDRS (RFC 3461 §4.3), else
    only its header; only the header when the original is larger than
    MAX_RETURNED_ORIGINAL or is binary, nothing when even that would break
    the 998-octet line limit.  Non-ASCII addresses or an SMTPUTF8 original
    (``entry.smtputf8`` or ``smtputf8``) give the RFC 6533 ``message/global*`` types.  Raises ValueError for an
    unknown kind or no recipients.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown report kind {kind!r}")
    if not recipients:
        raise ValueError("a report needs at least one recipient")
    if entry is not None:
        envid = entry.envid if envid is None else envid
        ret = entry.ret if ret is None else ret
        sender = sender or entry.sender
    next_attempt = entry.next_attempt if entry is not None else None
    header, _ = _split_header(_crlf(original))
    # RFC 6533 types only for internationalized mail, not for a legacy
    # message that merely carries raw 8-bit header bytes.
    utf8 = smtputf8 or bool(entry and entry.smtputf8) or not all(
        _is_ascii(s) for s in [sender, envid or "", *(r.address for r in recipients),
                               *(r.orcpt or "" for r in recipients)]
    )

    # -- part 3: what of the original goes back -----------------------------
    full = kind == FAILURE and (ret or "FULL").upper() != "HDRS"
    if len(original) > MAX_RETURNED_ORIGINAL or (entry is not None and entry.body == "BINARYMIME"):
        full = False
    returned: bytes | None = header
    if full:
        whole = _crlf(original)
        if _lines_fit(whole):
            returned = whole
        else:
            full = False
    if not full and not _lines_fit(header):
        returned = None
    if full:
        ctype3 = "message/global" if utf8 else "message/rfc822"
    else:
        ctype3 = "message/global-headers" if utf8 else "text/rfc822-headers"

    # -- part 2: message/delivery-status (RFC 3464 §2.2, §2.3) --------------
    fields = [f"Reporting-MTA: dns; {_clean(reporting_mta)}"]
    if entry is not None:
        fields.append(f"X-Postroom-Queue-ID: {_clean(entry.id)}")
    if envid:
        fields.append(_fold("Original-Envelope-Id", _clean(envid)))
    fields.append(f"Arrival-Date: {_date(arrival)}")
    blocks = ["\r\n".join(fields)]
    rows = []
    for rcpt in recipients:
        action, status = _action(kind, rcpt), _status(kind, rcpt)
        rows.append((rcpt, action, status))
        per = []
        if rcpt.orcpt:
            per.append(_fold("Original-Recipient", _orcpt_field(rcpt.orcpt, utf8)))
        per.append(_fold("Final-Recipient", _address_field(rcpt.address, utf8)))
        per.append(f"Action: {action}")
        per.append(f"Status: {status}")
        if rcpt.remote_mta:
            per.append(_fold("Remote-MTA", f"dns; {_clean(rcpt.remote_mta)}"))
        diagnostic = _diagnostic(rcpt)
        if diagnostic:
            per.append(_fold("Diagnostic-Code", diagnostic))
        per.append(f"Last-Attempt-Date: {_date(rcpt.updated or now)}")
        if kind == DELAY and will_retry_until:
            per.append(f"Will-Retry-Until: {_date(will_retry_until)}")
        blocks.append("\r\n".join(per))
    status_part = ("\r\n\r\n".join(blocks) + "\r\n").encode("utf-8")
    ctype2 = "message/global-delivery-status" if utf8 else "message/delivery-status"

    # -- part 1: for humans --------------------------------------------------
    text = _human(kind, reporting_mta, rows, next_attempt, will_retry_until).encode("utf-8")

    # -- the report itself ---------------------------------------------------
    boundary = f"=_postroom_dsn_{secrets.token_hex(12)}"
    host = _clean(reporting_mta)
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        _fold("To", f"<{_clean(sender)}>"),
        f"Subject: {_SUBJECTS[kind]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{secrets.token_hex(8)}@{host}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"',
    ]
    ref = _original_message_id(header)
    if ref:
        headers.insert(5, f"References: {ref}")

    def part(ctype: str, body: bytes) -> bytes:
        cte = "7bit" if body.isascii() else "8bit"
        return (f"--{boundary}\r\nContent-Type: {ctype}\r\n"
                f"Content-Transfer-Encoding: {cte}\r\n\r\n").encode() + body

    out = [
        b"This is a MIME-encapsulated message.\r\n\r\n",
        part(f'text/plain; charset={"utf-8" if not text.isascii() else "us-ascii"}', text),
        b"\r\n",
        part(ctype2, status_part),
    ]
    if returned is not None:
        out += [b"\r\n", part(ctype3, returned if returned.endswith(b"\r\n") or not returned
                              else returned + b"\r\n")]
    out.append(f"\r\n--{boundary}--\r\n".encode())
    body = b"".join(out)
    # RFC 2045 §6.4: a multipart is 7bit unless a part is 8bit.
    headers.append(f"Content-Transfer-Encoding: {'7bit' if body.isascii() else '8bit'}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("utf-8") + body


def _original_message_id(header: bytes) -> str | None:
    m = re.search(rb"(?im)^message-id:[ \t]*(<[^<>\s]{1,900}>)", header)
    return m.group(1).decode("ascii", "replace") if m and m.group(1).isascii() else None


# -- sending -----------------------------------------------------------------


def _domain_part(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _dkim_domain(ctx: NodeContext) -> str | None:
    """The local domain that signs reports: the hostname or its nearest parent."""
    labels = ctx.hostname.lower().split(".")
    for i in range(len(labels) - 1):
        domain = ".".join(labels[i:])
        if ctx.directory.is_local_domain(domain):
            return domain
    return None


def deliver_report(ctx: NodeContext, recipient: str, report: bytes) -> None:
    """Hand one report to ``recipient`` (the original envelope sender).

    A sender in a local domain gets it in their INBOX (Return-Path: <>);
    an unknown local sender is logged and skipped.  Anyone else gets it
    through the outbound queue with a null reverse-path, marked is_dsn.
    Raises StorageUnavailable when it cannot be made durable now.
    """
    if ctx.directory.is_local_domain(_domain_part(recipient)):
        accounts = ctx.directory.resolve_recipient(recipient)
        if not accounts:
            log.warning("dsn: no local mailbox for sender <%s>; report dropped", recipient)
            return
        ctx.store.deliver(list(dict.fromkeys(accounts)), b"Return-Path: <>\r\n" + report)
        log.info("dsn: report delivered locally to <%s>", recipient)
        return
    if ctx.queue is None:
        log.warning("dsn: no outbound queue on this node; report to <%s> dropped", recipient)
        return
    signer, domain = ctx.dkim, _dkim_domain(ctx)
    if signer is not None and domain and ctx.config.dkim.sign:
        try:
            report = signer.sign(report, domain)
        except Exception as exc:  # an unsigned report beats no report
            log.warning("dsn: DKIM signing failed (%s: %s); sent unsigned",
                        type(exc).__name__, exc)
    head = report[: report.find(b"\r\n\r\n")]
    entry = ctx.queue.enqueue(
        "", [QueuedRecipient(recipient)], report,
        smtputf8=not head.isascii() or not recipient.isascii(),
        body="7BIT" if report.isascii() else "8BITMIME",
        is_dsn=True,
    )
    log.info("dsn: report to <%s> queued as %s", recipient, entry.id)


def send_report(
    ctx: NodeContext, entry: QueueEntry, kind: str, recipients: list[QueuedRecipient]
) -> None:
    """Send a ``kind`` report about ``recipients`` of a queued message.

    Nothing is sent about a report or to the null reverse-path (RFC 3461
    §6.2, RFC 5321 §6.1), nor for recipients whose NOTIFY excludes ``kind``.
    Raises StorageUnavailable (the runner retries later); other failures to
    reach an unknown local sender are logged, not raised.
    """
    if entry.sender == "" or entry.is_dsn:
        log.debug("dsn: no %s report for queue entry %s (null sender or a report)",
                  kind, entry.id)
        return
    chosen = [r for r in recipients if wants(r.notify, kind)]
    if not chosen:
        return
    original = ctx.queue.read_body(entry) if ctx.queue is not None else b""
    now = time.time()
    until = entry.created + ctx.config.outbound.max_lifetime if kind == DELAY else None
    report = build_report(
        kind, entry, chosen, original,
        reporting_mta=ctx.hostname, arrival=entry.created, now=now,
        will_retry_until=until,
    )
    deliver_report(ctx, entry.sender, report)
    log.info("dsn: %s report for %s: %d recipient(s) -> <%s>",
             kind, entry.id, len(chosen), entry.sender)


def report_local_success(ctx: NodeContext, envelope: Envelope, message: bytes) -> None:
    """Success reports for local recipients that asked NOTIFY=SUCCESS.

    Called after the message is durable.  A recipient that expanded to more
    than one account is reported ``expanded`` (RFC 3461 §6.2.7.3), otherwise
    ``delivered`` (RFC 3461 §6.2.7.1).  Raises what deliver_report raises;
    the caller must not let that change its own reply.
    """
    if envelope.sender == "":
        return
    chosen = []
    now = time.time()
    for rcpt in envelope.recipients:
        if not rcpt.accounts or not wants(rcpt.notify, SUCCESS):
            continue
        state = EXPANDED if len(rcpt.accounts) > 1 else DELIVERED
        chosen.append(QueuedRecipient(rcpt.address, tuple(rcpt.notify or ()), rcpt.orcpt,
                                      state=state, code=250, enhanced="2.0.0",
                                      text="delivered to mailbox", updated=now))
    if not chosen:
        return
    report = build_report(
        SUCCESS, None, chosen, message, reporting_mta=ctx.hostname, arrival=now, now=now,
        envid=envelope.envid, ret=envelope.ret, sender=envelope.sender,
        smtputf8=envelope.smtputf8,
    )
    deliver_report(ctx, envelope.sender, report)


__all__ = [
    "DELAY", "EXPANDED", "FAILURE", "KINDS", "MAX_RETURNED_ORIGINAL", "RELAY",
    "SUCCESS", "build_report", "deliver_report", "report_local_success", "send_report",
    "wants",
]
