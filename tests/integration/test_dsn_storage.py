"""send_report over the real MailStore and OutboundQueue, from gevent greenlets
as the queue runner calls it inside a node (RFC 3461 §6.2, RFC 3464).  This
also checks the fakes of tests/unit/outbound/test_dsn.py against the real
storage."""

from __future__ import annotations

import email
import email.policy

import gevent
import pytest

from node.config import Config
from node.context import NodeContext
from node.outbound import dsn
from storage.mailstore import MailStore
from storage.model import FAILED, PENDING, QueuedRecipient, RecipientResult
from storage.queue import OutboundQueue

ORIGINAL = (b"From: <bob@example.test>\r\nTo: <carol@remote.test>\r\nSubject: lunch\r\n"
            b"Message-ID: <m1@example.test>\r\n\r\nSee you at noon.\r\n")


class Directory:
    """The three lookups send_report uses, answered as cluster/directory.py does."""

    def is_local_domain(self, domain: str) -> bool:
        return domain == "example.test"

    def resolve_recipient(self, address: str) -> list[str] | None:
        return [address] if address == "bob@example.test" else None


@pytest.fixture
def ctx(tmp_path):
    store = MailStore(tmp_path / "store", 4)
    store.open()
    try:
        store.ensure_account("bob@example.test")
        yield NodeContext(config=Config(), directory=Directory(),  # type: ignore[arg-type]
                          store=store, tls=None,  # type: ignore[arg-type]
                          hostname="mx.example.test", queue=OutboundQueue(store))
    finally:
        store.close()


def _fail_all(ctx: NodeContext, sender: str):
    """Queue ORIGINAL, fail its one recipient for good; (entry, failed recipients)."""
    entry = ctx.queue.enqueue(sender, [QueuedRecipient("carol@remote.test",
                                                       orcpt="rfc822;carol@remote.test")],
                              ORIGINAL, envid="E-7")
    result = RecipientResult("carol@remote.test", FAILED, 550, "5.1.1", "no such user",
                             "mx.remote.test")
    assert ctx.queue.record_attempt(entry.id, [result], None) is None  # entry removed
    failed = [QueuedRecipient(r.address, r.notify, r.orcpt, FAILED, 1, 550, "5.1.1",
                              "no such user", "mx.remote.test") for r in entry.recipients]
    return entry, failed


def test_failure_report_to_local_sender_lands_in_inbox(ctx) -> None:
    entry, failed = _fail_all(ctx, "bob@example.test")
    gevent.spawn(dsn.send_report, ctx, entry, "failure", failed).get(timeout=30)
    [row] = ctx.store.messages("bob@example.test", "INBOX")
    raw = ctx.store.read_message(row.blob)
    assert raw.startswith(b"Return-Path: <>\r\n")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    per_msg, per_rcpt = msg.get_payload()[1].get_payload()
    assert per_msg["Original-Envelope-Id"] == "E-7"
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"] == "5.1.1"
    assert b"See you at noon" in msg.get_payload()[2].as_bytes()
    assert ctx.queue.get(entry.id) is None  # the original left the queue


def test_report_to_remote_sender_is_queued_and_never_reported_on(ctx) -> None:
    entry, failed = _fail_all(ctx, "dave@far.test")
    gevent.spawn(dsn.send_report, ctx, entry, "failure", failed).get(timeout=30)
    [report] = ctx.queue.due(now=entry.created + 3600, limit=10)
    assert report.sender == "" and report.is_dsn
    assert [r.address for r in report.recipients] == ["dave@far.test"]
    assert b"To: <dave@far.test>" in ctx.queue.read_body(report)
    # The report itself fails: no report about it (RFC 3461 §6.2).
    dead = [QueuedRecipient("dave@far.test", state=FAILED, code=550, text="gone")]
    gevent.spawn(dsn.send_report, ctx, report, "failure", dead).get(timeout=30)
    gevent.spawn(dsn.send_report, ctx, report, "delay",
                 [QueuedRecipient("dave@far.test", state=PENDING)]).get(timeout=30)
    assert [e.id for e in ctx.queue.due(now=entry.created + 3600, limit=10)] == [report.id]
    assert ctx.store.messages("bob@example.test", "INBOX") == []


def test_many_reports_in_parallel_greenlets(ctx) -> None:
    entries = [_fail_all(ctx, "bob@example.test") for _ in range(20)]
    jobs = [gevent.spawn(dsn.send_report, ctx, e, "failure", f) for e, f in entries]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    assert len(ctx.store.messages("bob@example.test", "INBOX")) == 20
