"""node/outbound/dsn.py: RFC 3464 report structure, RFC 3461 NOTIFY/RET/ENVID/ORCPT
rules, never a report about a report.  Reports are parsed back with Python's
email package.  The fakes below are checked against the real node by
tests/integration/test_dsn_local.py."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterable
from typing import Any

import pytest

from node.config import Config
from node.context import NodeContext
from node.mailflow import local
from node.mailflow.envelope import Envelope, Recipient
from node.outbound import dsn
from storage.model import (
    DELIVERED,
    FAILED,
    PENDING,
    RELAYED,
    AppendResult,
    QueuedRecipient,
    QueueEntry,
    StorageUnavailable,
)

NOW = 1_800_000_000.0
ORIGINAL = (
    b"From: Bob <bob@example.test>\r\nTo: carol@remote.test\r\nSubject: lunch\r\n"
    b"Message-ID: <m1@example.test>\r\n\r\nSee you at noon.\r\n"
)


def rcpt(address: str = "carol@remote.test", **kw: Any) -> QueuedRecipient:
    base: dict[str, Any] = {"state": FAILED, "code": 550, "enhanced": "5.1.1",
                            "text": "5.1.1 <carol@remote.test>: no such user",
                            "remote_mta": "mx.remote.test", "updated": NOW - 10}
    base.update(kw)
    return QueuedRecipient(address, **base)


def entry(*recipients: QueuedRecipient, **kw: Any) -> QueueEntry:
    base: dict[str, Any] = {"id": "Q123", "sender": "bob@example.test",
                            "recipients": recipients or (rcpt(),), "blob": "b" * 64,
                            "size": len(ORIGINAL), "created": NOW - 3600,
                            "next_attempt": NOW + 900}
    base.update(kw)
    return QueueEntry(**base)


def build(kind: str, e: QueueEntry, original: bytes = ORIGINAL, **kw: Any) -> email.message.Message:
    raw = dsn.build_report(kind, e, list(e.recipients), original,
                           reporting_mta="mx.example.test", arrival=e.created, now=NOW, **kw)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))  # RFC 5322 §2.1.1
    return email.message_from_bytes(raw, policy=email.policy.default)


def status_blocks(msg: email.message.Message) -> list[email.message.Message]:
    part = msg.get_payload()[1]
    assert part.get_content_type() in ("message/delivery-status",
                                       "message/global-delivery-status")
    return part.get_payload()


# -- build_report ------------------------------------------------------------


def test_failure_report_structure_and_fields() -> None:  # RFC 3464 §2, §2.2, §2.3
    e = entry(rcpt(orcpt="rfc822;Carol@Remote.test"), envid="ENV-42")
    msg = build("failure", e)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    assert msg["To"].addresses[0].addr_spec == "bob@example.test"
    assert msg["Auto-Submitted"] == "auto-replied"  # RFC 3834 §5
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Message-ID"].endswith("@mx.example.test>")
    assert msg["Date"] and msg["References"] == "<m1@example.test>"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    assert "<carol@remote.test>: failed" in parts[0].get_content()
    assert "550 5.1.1" in parts[0].get_content()
    per_msg, per_rcpt = status_blocks(msg)
    assert per_msg["Reporting-MTA"] == "dns; mx.example.test"
    assert per_msg["Original-Envelope-Id"] == "ENV-42"  # RFC 3464 §2.2.1
    assert per_msg["Arrival-Date"]
    assert per_rcpt["Original-Recipient"] == "rfc822; Carol@Remote.test"  # RFC 3461 §4.2
    assert per_rcpt["Final-Recipient"] == "rfc822; carol@remote.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.remote.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <carol@remote.test>: no such user"
    assert per_rcpt["Last-Attempt-Date"]
    assert "Will-Retry-Until" not in per_rcpt
    returned = parts[2].get_payload()[0]
    assert returned["Subject"] == "lunch"
    assert returned.get_content().strip() == "See you at noon."  # RET default: FULL


def test_failure_ret_hdrs_returns_only_headers() -> None:  # RFC 3461 §4.3
    msg = build("failure", entry(ret="HDRS"))
    third = msg.get_payload()[2]
    assert third.get_content_type() == "text/rfc822-headers"
    text = third.get_payload(decode=True)
    assert b"Subject: lunch" in text and b"See you at noon" not in text


def test_failure_ret_full_returns_whole_message() -> None:
    msg = build("failure", entry(ret="FULL"))
    third = msg.get_payload()[2]
    assert third.get_content_type() == "message/rfc822"
    assert b"See you at noon" in third.as_bytes()


def test_failure_after_lifetime_with_temporary_last_reply() -> None:  # RFC 3463 X.4.7
    r = rcpt(code=451, enhanced="4.3.0", text="try later")
    per = status_blocks(build("failure", entry(r)))[1]
    assert per["Action"] == "failed" and per["Status"] == "5.4.7"
    assert per["Diagnostic-Code"] == "smtp; 451 4.3.0 try later"


def test_failure_without_smtp_reply_has_no_smtp_diagnostic() -> None:
    r = rcpt(code=None, enhanced="5.1.10", text="null MX: domain accepts no mail",
             remote_mta="")
    per = status_blocks(build("failure", entry(r)))[1]
    assert per["Status"] == "5.1.10"
    assert per["Diagnostic-Code"] == "X-Postroom; null MX: domain accepts no mail"
    assert "Remote-MTA" not in per


def test_delay_report_has_retry_times_and_only_headers() -> None:  # RFC 3464 §2.3.3, §2.3.9
    r = rcpt(state=PENDING, code=421, enhanced="4.7.0", text="greylisted")
    e = entry(r, ret="FULL")
    until = e.created + 5 * 86400
    msg = build("delay", e, will_retry_until=until)
    assert msg["Subject"].startswith("Delayed Mail")
    text = msg.get_payload()[0].get_content()
    assert "Next attempt" in text and "gives up" in text
    per = status_blocks(msg)[1]
    assert per["Action"] == "delayed" and per["Status"] == "4.7.0"
    assert email.utils.parsedate_to_datetime(per["Will-Retry-Until"]).timestamp() == until
    third = msg.get_payload()[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert b"See you at noon" not in third.get_payload(decode=True)


def test_success_and_relayed_actions_per_recipient() -> None:  # RFC 3464 §2.3.3
    rs = (rcpt("a@remote.test", state=DELIVERED, code=250, enhanced="2.0.0", text="ok"),
          rcpt("b@remote.test", state=RELAYED, code=250, enhanced="2.0.0", text="ok"))
    msg = build("success", entry(*rs))
    blocks = status_blocks(msg)
    assert [b["Action"] for b in blocks[1:]] == ["delivered", "relayed"]
    assert [b["Status"] for b in blocks[1:]] == ["2.0.0", "2.0.0"]
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_relayed_report() -> None:  # RFC 3461 §6.2.7.2
    r = rcpt(state=RELAYED, code=250, enhanced=None, text="queued as X")
    msg = build("relayed", entry(r))
    per = status_blocks(msg)[1]
    assert per["Action"] == "relayed" and per["Status"] == "2.0.0"
    assert "cannot send delivery" in msg.get_payload()[0].get_content()


def test_large_original_returns_only_headers() -> None:
    big = ORIGINAL + (b"x" * 76 + b"\r\n") * (dsn.MAX_RETURNED_ORIGINAL // 78 + 10)
    msg = build("failure", entry(size=len(big)), big)
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_overlong_lines_never_returned() -> None:
    original = ORIGINAL + b"y" * 5000 + b"\r\n"
    msg = build("failure", entry(), original)  # build() checks every line <= 998
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_multiple_recipients_each_get_a_block() -> None:
    rs = tuple(rcpt(f"u{i}@remote.test") for i in range(3))
    blocks = status_blocks(build("failure", entry(*rs)))
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        f"rfc822; u{i}@remote.test" for i in range(3)]


def test_utf8_original_uses_rfc6533_types() -> None:  # RFC 6533 §3, §6
    original = "From: José <jose@example.test>\r\nSubject: café\r\n\r\nhé\r\n".encode()
    r = rcpt("zoë@remote.test", orcpt="utf-8;zoë@remote.test")
    msg = build("failure", entry(r, sender="josé@example.test", smtputf8=True), original)
    parts = msg.get_payload()
    assert parts[1].get_content_type() == "message/global-delivery-status"
    assert parts[2].get_content_type() == "message/global"
    raw = msg.as_bytes()
    assert "Final-Recipient: utf-8; zoë@remote.test".encode() in raw
    assert msg["Content-Transfer-Encoding"] == "8bit"


def test_legacy_8bit_header_keeps_rfc3464_types() -> None:  # RFC 6533 only for SMTPUTF8
    original = b"From: bob@example.test\r\nSubject: caf\xe9\r\n\r\nx\r\n"
    msg = build("failure", entry(), original)
    parts = msg.get_payload()
    assert parts[1].get_content_type() == "message/delivery-status"
    assert parts[2].get_content_type() == "message/rfc822"
    assert parts[2]["Content-Transfer-Encoding"] == "8bit"


def test_local_success_for_smtputf8_message_uses_global_headers(ctx) -> None:
    original = "From: José <bob@example.test>\r\nSubject: café\r\n\r\nhé\r\n".encode()
    env = envelope(Recipient("alice@example.test", ("alice@example.test",), ("SUCCESS",)),
                   smtputf8=True)
    local.deliver(ctx, env, original)
    msg = email.message_from_bytes(ctx.store.delivered[1][1], policy=email.policy.default)
    parts = msg.get_payload()
    assert parts[1].get_content_type() == "message/global-delivery-status"
    assert parts[2].get_content_type() == "message/global-headers"


def test_header_injection_in_remote_text_is_neutralised() -> None:
    r = rcpt(text="bad\r\nAction: delivered\r\n")
    per = status_blocks(build("failure", entry(r)))[1]
    assert per["Action"] == "failed"
    assert per.get_all("Action") == ["failed"]


def test_unknown_kind_and_empty_recipients_rejected() -> None:
    with pytest.raises(ValueError):
        dsn.build_report("bogus", entry(), [rcpt()], ORIGINAL, reporting_mta="h",
                         arrival=NOW, now=NOW)
    with pytest.raises(ValueError):
        dsn.build_report("failure", entry(), [], ORIGINAL, reporting_mta="h",
                         arrival=NOW, now=NOW)


# -- NOTIFY ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "kind", "expected"),
    [
        ((), "failure", True), ((), "delay", True), ((), "success", False),
        (None, "failure", True), (("NEVER",), "failure", False), (("NEVER",), "delay", False),
        (("SUCCESS",), "failure", False), (("SUCCESS",), "success", True),
        (("SUCCESS",), "relayed", True), (("FAILURE",), "delay", False),
        (("DELAY",), "delay", True), (("FAILURE", "DELAY"), "success", False),
        (("success", "failure"), "failure", True),
    ],
)
def test_wants(notify, kind, expected) -> None:  # RFC 3461 §4.1
    assert dsn.wants(notify, kind) is expected


# -- send_report with fakes --------------------------------------------------


class FakeDirectory:
    domains = {"example.test"}
    accounts = {"bob@example.test", "alice@example.test"}
    aliases = {"team@example.test": ["alice@example.test", "bob@example.test"]}

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def resolve_recipient(self, address: str) -> list[str] | None:
        address = address.lower()
        if address in self.aliases:
            return list(self.aliases[address])
        return [address] if address in self.accounts else None


class FakeStore:
    def __init__(self) -> None:
        self.delivered: list[tuple[list[str], bytes]] = []
        self.fail: Exception | None = None

    def deliver(self, accounts: Iterable[str], raw: bytes, **kw: Any) -> list[AppendResult]:
        if self.fail is not None:
            raise self.fail
        self.delivered.append((list(accounts), raw))
        return [AppendResult(a, "INBOX", 1, 1, 1, "0" * 64) for a in accounts]


class FakeQueue:
    def __init__(self) -> None:
        self.enqueued: list[tuple[str, list[QueuedRecipient], bytes, dict]] = []

    def read_message(self, blob: str) -> bytes:
        assert blob == "b" * 64
        return ORIGINAL

    def read_body(self, entry: QueueEntry) -> bytes:
        return self.read_message(entry.blob)

    def enqueue(self, sender: str, recipients: Iterable[QueuedRecipient], raw: bytes,
                **kw: Any) -> QueueEntry:
        self.enqueued.append((sender, list(recipients), raw, kw))
        return entry(id=f"D{len(self.enqueued)}", sender=sender, is_dsn=True)


@pytest.fixture
def ctx() -> NodeContext:
    return NodeContext(config=Config(), directory=FakeDirectory(),  # type: ignore[arg-type]
                       store=FakeStore(), tls=None,  # type: ignore[arg-type]
                       hostname="mx.example.test", queue=FakeQueue())  # type: ignore[arg-type]


def test_report_to_local_sender_goes_to_inbox_with_null_return_path(ctx) -> None:
    dsn.send_report(ctx, entry(), "failure", [rcpt()])
    [(accounts, raw)] = ctx.store.delivered
    assert accounts == ["bob@example.test"]
    assert raw.startswith(b"Return-Path: <>\r\n")
    assert ctx.queue.enqueued == []


def test_report_to_remote_sender_is_queued_with_null_sender(ctx) -> None:  # RFC 3461 §6.2
    dsn.send_report(ctx, entry(sender="dave@far.test"), "failure", [rcpt()])
    [(sender, recipients, raw, kw)] = ctx.queue.enqueued
    assert sender == "" and kw["is_dsn"] is True
    assert [r.address for r in recipients] == ["dave@far.test"]
    assert b"\r\nTo: <dave@far.test>\r\n" in raw and ctx.store.delivered == []


def test_never_a_report_about_a_report_or_to_null_sender(ctx) -> None:  # RFC 3461 §6.2
    dsn.send_report(ctx, entry(sender=""), "failure", [rcpt()])
    dsn.send_report(ctx, entry(is_dsn=True), "failure", [rcpt()])
    dsn.send_report(ctx, entry(is_dsn=True), "delay", [rcpt(state=PENDING)])
    assert ctx.store.delivered == [] and ctx.queue.enqueued == []


def test_notify_filters_recipients(ctx) -> None:  # RFC 3461 §4.1
    rs = [rcpt("never@remote.test", notify=("NEVER",)),
          rcpt("succ@remote.test", notify=("SUCCESS",)),
          rcpt("dflt@remote.test"),
          rcpt("fail@remote.test", notify=("FAILURE", "SUCCESS"))]
    dsn.send_report(ctx, entry(*rs), "failure", rs)
    [(_, raw)] = ctx.store.delivered
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    finals = [b["Final-Recipient"] for b in status_blocks(msg)[1:]]
    assert finals == ["rfc822; dflt@remote.test", "rfc822; fail@remote.test"]


def test_nothing_sent_when_no_recipient_asked(ctx) -> None:
    rs = [rcpt(notify=("FAILURE",), state=PENDING)]
    dsn.send_report(ctx, entry(*rs), "delay", rs)
    dsn.send_report(ctx, entry(*rs), "success", rs)
    assert ctx.store.delivered == [] and ctx.queue.enqueued == []


def test_delay_report_carries_will_retry_until_from_config(ctx) -> None:
    rs = [rcpt(state=PENDING, code=451, enhanced="4.4.1", text="later")]
    e = entry(*rs)
    dsn.send_report(ctx, e, "delay", rs)
    [(_, raw)] = ctx.store.delivered
    per = status_blocks(email.message_from_bytes(raw, policy=email.policy.default))[1]
    until = email.utils.parsedate_to_datetime(per["Will-Retry-Until"]).timestamp()
    assert until == e.created + ctx.config.outbound.max_lifetime


def test_unknown_local_sender_is_logged_not_raised(ctx, caplog) -> None:
    dsn.send_report(ctx, entry(sender="ghost@example.test"), "failure", [rcpt()])
    assert ctx.store.delivered == [] and ctx.queue.enqueued == []
    assert "ghost@example.test" in caplog.text


def test_storage_unavailable_propagates(ctx) -> None:
    ctx.store.fail = StorageUnavailable("disk")
    with pytest.raises(StorageUnavailable):
        dsn.send_report(ctx, entry(), "failure", [rcpt()])


# -- local delivery success DSN ---------------------------------------------


def envelope(*recipients: Recipient, sender: str = "bob@example.test", **kw: Any) -> Envelope:
    return Envelope(sender=sender, helo="client.test", peer_ip="127.0.0.1",
                    recipients=list(recipients), **kw)


def test_local_success_dsn_delivered_and_expanded(ctx) -> None:  # RFC 3461 §6.2.7
    env = envelope(
        Recipient("alice@example.test", ("alice@example.test",), ("SUCCESS",),
                  "rfc822;Alice@example.test"),
        Recipient("team@example.test", ("alice@example.test", "bob@example.test"),
                  ("SUCCESS", "FAILURE")),
        Recipient("bob@example.test", ("bob@example.test",), None),
        envid="E1",
    )
    local.deliver(ctx, env, ORIGINAL)
    (_, first), (accounts, report) = ctx.store.delivered
    assert accounts == ["bob@example.test"] and report.startswith(b"Return-Path: <>\r\n")
    msg = email.message_from_bytes(report, policy=email.policy.default)
    per_msg, *blocks = status_blocks(msg)
    assert per_msg["Original-Envelope-Id"] == "E1"
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks] == [
        ("rfc822; alice@example.test", "delivered", "2.0.0"),
        ("rfc822; team@example.test", "expanded", "2.0.0"),
    ]
    assert blocks[0]["Original-Recipient"] == "rfc822; Alice@example.test"
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_local_delivery_without_notify_success_sends_nothing(ctx) -> None:
    local.deliver(ctx, envelope(Recipient("alice@example.test", ("alice@example.test",),
                                          ("FAILURE",))), ORIGINAL)
    assert len(ctx.store.delivered) == 1


def test_local_delivery_from_null_sender_sends_nothing(ctx) -> None:
    env = envelope(Recipient("alice@example.test", ("alice@example.test",), ("SUCCESS",)),
                   sender="")
    local.deliver(ctx, env, ORIGINAL)
    assert len(ctx.store.delivered) == 1


def test_failed_success_dsn_never_fails_the_delivery(ctx) -> None:
    store = ctx.store
    calls = []

    def deliver(accounts, raw, **kw):
        calls.append(raw)
        if len(calls) > 1:
            raise StorageUnavailable("disk full")
        return FakeStore.deliver(store, accounts, raw)

    store.deliver = deliver  # type: ignore[method-assign]
    env = envelope(Recipient("alice@example.test", ("alice@example.test",), ("SUCCESS",)))
    results = local.deliver(ctx, env, ORIGINAL)
    assert [r.account for r in results] == ["alice@example.test"]
    assert len(calls) == 2  # the report was attempted


def test_report_of_remote_sender_from_local_delivery_is_queued(ctx) -> None:
    env = envelope(Recipient("alice@example.test", ("alice@example.test",), ("SUCCESS",)),
                   sender="dave@far.test")
    local.deliver(ctx, env, ORIGINAL)
    [(sender, recipients, raw, kw)] = ctx.queue.enqueued
    assert sender == "" and kw["is_dsn"] and recipients[0].address == "dave@far.test"

