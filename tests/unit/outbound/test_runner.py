"""Queue runner decisions: retry schedule, lifetime, DSN triggers, local safety.

The attempt bookkeeping runs over a real MailStore and OutboundQueue and the
real DSN module; no network is touched.
"""

from __future__ import annotations

import random

import pytest

from node.config import from_dict
from node.context import NodeContext
from node.outbound.client_protocol import DELIVERED, PENDING, Outcome
from node.outbound.routing import Route
from node.outbound.runner import (
    QueueRunner,
    _Attempt,
    next_attempt_time,
    retry_delay,
)
from storage.mailstore import MailStore
from storage.model import FAILED, RELAYED, QueuedRecipient, QueueEntry, RecipientResult
from storage.queue import OutboundQueue

INTERVALS = [60, 300, 900]


def test_retry_delay_schedule_with_jitter():
    rng = random.Random(3)
    for n in range(8):
        base = INTERVALS[min(n, len(INTERVALS) - 1)]
        delays = [retry_delay(n, INTERVALS, rng) for _ in range(200)]
        assert all(0.9 * base <= d <= 1.1 * base for d in delays)
        assert len(set(delays)) > 150  # jittered, not constant
        assert min(delays) < 0.95 * base and max(delays) > 1.05 * base


def test_default_schedule_documented_values():
    defaults = from_dict({}).outbound
    assert defaults.retry_intervals == [60, 300, 900, 1800, 3600, 7200, 14400]
    assert (defaults.delay_dsn_after, defaults.max_lifetime) == (4 * 3600, 5 * 86400)


def entry(created: float, attempts: int = 0) -> QueueEntry:
    return QueueEntry("0" * 16, "a@x.test", (QueuedRecipient("b@y.test"),), "b" * 64, 10,
                      created, created, attempts)


def test_next_attempt_never_past_lifetime():
    rng = random.Random(1)
    e = entry(created=1000.0, attempts=2)
    t = next_attempt_time(e, 1100.0, INTERVALS, 10_000, rng)
    assert 1100 + 810 <= t <= 1100 + 990
    # Close to the end of its life: the next attempt is at the deadline.
    assert next_attempt_time(e, 10_900.0, INTERVALS, 10_000, rng) == 11_000.0


class Directory:
    def is_local_domain(self, domain: str) -> bool:
        return domain == "example.test"

    def resolve_recipient(self, address: str) -> list[str] | None:
        return [address] if address == "alice@example.test" else None


@pytest.fixture
def make_runner(tmp_path):
    stores = []

    def make(**outbound) -> QueueRunner:
        config = from_dict({"node": {"data_dir": str(tmp_path / "data")},
                            "outbound": {"resolvers": ["127.0.0.1:9"], "mta_sts": False,
                                         **outbound}})
        store = MailStore(tmp_path / f"store{len(stores)}", 2, fsync=False)
        store.open()
        stores.append(store)
        store.ensure_account("alice@example.test")
        ctx = NodeContext(config=config, directory=Directory(), store=store,  # type: ignore[arg-type]
                          tls=None, hostname="mx.example.test",  # type: ignore[arg-type]
                          queue=OutboundQueue(store))
        return QueueRunner(ctx, rng=random.Random(5))

    yield make
    for store in stores:
        store.close()


def reports(runner: QueueRunner) -> list[bytes]:
    store = runner.ctx.store
    return [store.read_message(m.blob) for m in store.messages("alice@example.test", "INBOX")]


def test_pending_past_lifetime_fails_with_failure_dsn(make_runner):
    runner = make_runner(max_lifetime=0)
    e = runner.queue.enqueue("alice@example.test", [QueuedRecipient("b@y.test")], b"Subject: s\r\n\r\nx\r\n")
    runner._complete(_Attempt(e, 0, [RecipientResult("b@y.test", PENDING, 451, "4.4.1", "refused")]))
    assert runner.queue.get(e.id) is None  # nothing pending: removed
    (report,) = reports(runner)
    assert b"Action: failed" in report and b"delivery time expired" in report


def test_delay_dsn_once(make_runner):
    runner = make_runner(delay_dsn_after=0, retry_intervals=[600])
    e = runner.queue.enqueue("alice@example.test", [QueuedRecipient("b@y.test")], b"Subject: s\r\n\r\nx\r\n")
    runner._complete(_Attempt(e, 0, [RecipientResult("b@y.test", PENDING, 451, "4.4.1", "refused")]))
    after = runner.queue.get(e.id)
    assert after is not None and after.delay_dsn_sent and after.attempts == 1
    assert 540 <= after.next_attempt - after.created <= 660 + 5
    assert [b"Action: delayed" in r for r in reports(runner)] == [True]
    runner._complete(_Attempt(after, 0, [RecipientResult("b@y.test", PENDING, 451, "4.4.1", "x")]))
    assert len(reports(runner)) == 1  # RFC 3464: one delay report, not one per attempt


def test_delivered_and_failed_mix(make_runner):
    runner = make_runner()
    e = runner.queue.enqueue("alice@example.test",
                             [QueuedRecipient("ok@y.test"), QueuedRecipient("bad@y.test"),
                              QueuedRecipient("later@y.test")], b"Subject: s\r\n\r\nx\r\n")
    runner._complete(_Attempt(e, 0, [
        RecipientResult("ok@y.test", DELIVERED, 250, "2.0.0", "ok", "mx.y.test"),
        RecipientResult("bad@y.test", FAILED, 550, "5.1.1", "unknown", "mx.y.test"),
        RecipientResult("later@y.test", PENDING, 450, "4.2.0", "busy", "mx.y.test"),
    ]))
    after = runner.queue.get(e.id)
    assert [(r.address, r.state) for r in after.recipients] == [
        ("ok@y.test", DELIVERED), ("bad@y.test", FAILED), ("later@y.test", PENDING)]
    (report,) = reports(runner)
    assert b"bad@y.test" in report and b"ok@y.test" not in report


def test_relayed_when_next_hop_has_no_dsn():
    rcpts = (QueuedRecipient("a@y.test", notify=("SUCCESS",)), QueuedRecipient("b@y.test"))
    ok = Outcome(DELIVERED, 250, "2.0.0", "ok")
    results = QueueRunner._results(rcpts, [ok, ok], "mx", next_hop_dsn=False)
    assert [r.state for r in results] == [RELAYED, DELIVERED]  # RFC 3461 §5.2.2.3
    results = QueueRunner._results(rcpts, [ok, ok], "mx", next_hop_dsn=True)
    assert [r.state for r in results] == [DELIVERED, DELIVERED]  # the next hop reports


def test_never_connects_for_a_local_domain(make_runner):
    runner = make_runner()
    e = entry(0.0)
    with pytest.raises(AssertionError):
        runner._connect(Route("example.test", "local"), e)
    # Even a route that claims to be MX for a domain that is local.
    with pytest.raises(AssertionError):
        runner._connect(Route("example.test", "mx"), e)
