"""The queue runner: due entries out to the world, results back into the queue.

Theory of operation.  One loop greenlet sleeps until the next scheduled
scan or a wakeup.  A new entry is handed over by the queue's watch
(``queue.watch(..., entries=True)``) and dispatched at once, without a
query; a *scan* (``queue.due`` excluding the ids in flight) runs only when
the timer is due (the earliest future ``next_attempt`` or cooldown), after
retry/release/flush, after a role change, or when a full batch left work
behind -- so a submitted message costs O(1), not O(entries in flight).
Each entry's pending
recipients are grouped by destination domain into *jobs*; each destination
keeps a FIFO of jobs and at most ``max_connections_per_domain`` worker
greenlets, and every worker holds one of ``max_connections`` slots while it
works.  A worker routes its domain once, opens a connection (MX order,
every address of each host, RFC 5321 §5.1) and sends job after job over it,
up to ``messages_per_connection`` messages (RSET between them).

When every job of an entry is done, the entry's results are recorded in one
``record_attempt``: delivered/relayed/failed are final, pending recipients
get the next attempt time from ``retry_intervals`` (the n-th retry waits
``retry_intervals[min(n, len-1)]`` +-10%), capped at the entry's
``max_lifetime``; past it they fail.  DSNs are handed to node/outbound/dsn.py
*before* the attempt is recorded, so a crash in between repeats a report
rather than losing it; if a report cannot be stored, its recipients stay
pending and are tried (and reported) again.

Mail for a local domain never leaves the cluster: the worker delivers it to
the mail store, and ``_connect`` refuses to connect for a local route.

Cluster mode (``ctx.cluster``): only entries of queue shards this node leads
are attempted.  On ``on_role_change`` the runner rescans (a shard gained:
its due entries start at once) and forgets the not-yet-started attempts of a
shard it lost.  Before a planned leadership transfer the manager calls the
hand-off hook (``handoff(shard)``): no new attempt starts for that shard,
attempts not yet started are dropped, and the hook returns once every
started attempt of the shard has recorded its result (bounded), so the new
primary never repeats a delivery that succeeded here.  After a failure the
new primary attempts whatever was not recorded (at-least-once).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.lock

from node.context import NodeContext
from node.mailflow import local as localflow
from node.outbound.client import Connection, ConnectionLost, open_connection
from node.outbound.client_protocol import DELIVERED, FAILED, PENDING, Envelope, Outcome, Recipient
from node.outbound.dnsresolver import make_resolver
from node.outbound.routing import Route, Router
from storage.mailstore import shard_of
from storage.model import RELAYED, QueuedRecipient, QueueEntry, RecipientResult, StorageError

log = logging.getLogger("postroom.outbound")

# Seconds an idle connection waits for another message to its destination.
CONNECTION_LINGER = 2.0

BATCH = 200  # entries taken per pass at most
MAX_IN_FLIGHT = 1000  # entries being delivered at once at most
IDLE_WAIT = 60.0  # seconds between passes when nothing is due (wakeups come sooner)
BUSY_WAIT = 1.0  # seconds between passes while entries are in flight
COOLDOWN = 30.0  # seconds before an entry whose result could not be stored is retried
HANDOFF_WAIT = 9.0  # seconds the hand-off hook waits at most (the manager allows 10)
HANDOFF_HOLD = 60.0  # seconds a shard being handed off stays paused if we keep leading it


def retry_delay(attempts_done: int, intervals: Sequence[int], rng: random.Random) -> float:
    """Seconds until the next attempt after ``attempts_done + 1`` attempts.

    The n-th retry (n = 0 after the first attempt) waits
    ``intervals[min(n, len - 1)]`` with +-10% jitter, so messages that
    failed together do not all come back in the same second.
    """
    base = float(intervals[min(max(attempts_done, 0), len(intervals) - 1)])
    return base * rng.uniform(0.9, 1.1)


def next_attempt_time(
    entry: QueueEntry, now: float, intervals: Sequence[int], max_lifetime: float, rng: random.Random
) -> float:
    """When to try again: the retry delay, but never past the entry's lifetime."""
    return min(now + retry_delay(entry.attempts, intervals, rng), entry.created + max_lifetime)


def envelope_of(entry: QueueEntry, recipients: Sequence[QueuedRecipient]) -> Envelope:
    return Envelope(
        sender=entry.sender,
        recipients=tuple(Recipient(r.address, r.notify, r.orcpt) for r in recipients),
        size=entry.size,
        body=entry.body,
        smtputf8=entry.smtputf8,
        requiretls=entry.requiretls,
        envid=entry.envid,
        ret=entry.ret,
    )


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass
class _Attempt:
    """One delivery attempt of one entry, possibly to several domains."""

    entry: QueueEntry
    remaining: int
    results: list[RecipientResult] = field(default_factory=list)
    local: set[str] = field(default_factory=set)  # delivered into the cluster
    shard: int = 0  # the entry's queue shard
    started: bool = False  # a worker took one of its jobs
    abandoned: bool = False  # dropped before it started (the shard was lost)


@dataclass
class _Job:
    attempt: _Attempt
    domain: str
    recipients: tuple[QueuedRecipient, ...]


@dataclass
class _Destination:
    domain: str
    jobs: collections.deque = field(default_factory=collections.deque)
    workers: int = 0
    idle: list[gevent.event.Event] = field(default_factory=list)  # lingering, newest last


class QueueRunner:
    """Delivers the outbound queue of this node; ``start``/``stop``/``wake``.

    ``engine`` is the TransportPolicy (node/outbound/policy.py); it is built
    from the configuration when not given.
    """

    def __init__(self, ctx: NodeContext, *, engine: Any = None, router: Router | None = None,
                 rng: random.Random | None = None) -> None:
        assert ctx.queue is not None, "the queue runner needs ctx.queue"
        self.ctx = ctx
        self.queue: Any = ctx.queue  # storage/queue.py OutboundQueue
        self.cluster = ctx.cluster
        self.settings = ctx.config.outbound
        resolver = make_resolver(ctx.config)
        self.router = router or Router(ctx.config, resolver, ctx.directory.is_local_domain)
        if engine is None:
            from node.outbound.policy import TransportPolicy

            engine = TransportPolicy(ctx.config, resolver)
        self.engine = engine
        self.rng = rng or random.Random()
        self._wakeup = gevent.event.Event()
        self._slots = gevent.lock.BoundedSemaphore(max(1, self.settings.max_connections))
        self._destinations: dict[str, _Destination] = {}
        self._in_flight: dict[str, _Attempt] = {}
        self._cooldown: dict[str, float] = {}
        self._new: collections.deque[QueueEntry] = collections.deque()  # from the watch
        self._rescan = True
        self._backlog = False  # due entries were left behind for lack of room
        self._next_scan = 0.0
        self._handoff: dict[int, float] = {}  # shard -> paused until (hand-off running)
        self._done = gevent.event.Event()  # set (and replaced) when an attempt ends
        self._workers: set[gevent.Greenlet] = set()
        self._loop: gevent.Greenlet | None = None
        self._cancel: list[Any] = []
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Watch the queue (and, in cluster mode, shard roles and hand-offs); run."""
        self._stopping = False
        self._rescan = True
        self._cancel = [self.queue.watch(self._on_queue_change, entries=True)]
        if self.cluster is not None:
            self._cancel.append(self.cluster.on_role_change(self._on_role_change))
            add_hook = getattr(self.cluster, "add_handoff_hook", None)
            if add_hook is not None:
                self._cancel.append(add_hook(self.handoff))
        self._loop = gevent.spawn(self._run)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking entries; give running deliveries ``timeout`` seconds.

        A delivery cut short is simply attempted again later (at-least-once).
        """
        self._stopping = True
        for dest in list(self._destinations.values()):
            for wakeup in dest.idle:
                wakeup.set()  # lingering workers close their connections now
        for cancel in self._cancel:
            if callable(cancel):
                cancel()
        self._cancel = []
        self.wake()
        if self._loop is not None:
            self._loop.join(timeout)
            self._loop.kill()
        gevent.joinall(list(self._workers), timeout=timeout)
        gevent.killall(list(self._workers))

    def wake(self) -> None:
        """Scan the queue now (after retry/release/flush or any outside change)."""
        self._rescan = True
        self._wakeup.set()

    # -- ownership (cluster mode) ------------------------------------------------------

    def _shard_of(self, entry: QueueEntry) -> int:
        return shard_of(entry.id, self.queue.store.shards) if self.cluster is not None else 0

    def _owns(self, shard: int) -> bool:
        if self.cluster is None:
            return True
        return shard not in self._handoff and self.cluster.is_local_primary(shard)

    def _owned_shards(self) -> list[int] | None:
        """Shards whose entries may be attempted; None: all (single node)."""
        if self.cluster is None:
            return None
        return [n for n in self.cluster.local_primary_shards() if n not in self._handoff]

    def _on_role_change(self, shard: int) -> None:
        if not self.cluster.is_local_primary(shard):
            self._handoff.pop(shard, None)
            self._abandon(shard)
        self.wake()

    def _abandon(self, shard: int) -> None:
        """Drop the attempts of ``shard`` that no worker has started."""
        for qid, attempt in list(self._in_flight.items()):
            if attempt.shard == shard and not attempt.started:
                attempt.abandoned = True
                del self._in_flight[qid]
        self._signal_done()

    def handoff(self, shard: int, timeout: float = HANDOFF_WAIT) -> bool:
        """The manager's hand-off hook: pause ``shard`` and wait until its
        started attempts have recorded their results.  True when none is
        left; False if ``timeout`` passed first.  The pause ends when the
        shard is lost, or after HANDOFF_HOLD seconds if it is still led."""
        self._handoff[shard] = time.time() + HANDOFF_HOLD
        self._next_scan = min(self._next_scan, self._handoff[shard])
        self._abandon(shard)
        deadline = time.monotonic() + timeout
        while any(a.shard == shard for a in self._in_flight.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("hand-off of queue shard %d: attempts still running after %gs",
                            shard, timeout)
                return False
            self._done.wait(left)
        return True

    def _signal_done(self) -> None:
        done, self._done = self._done, gevent.event.Event()
        done.set()

    # -- the loop --------------------------------------------------------------------

    def _on_queue_change(self, entry: QueueEntry | None) -> None:
        if entry is None:  # retry, release, flush
            self.wake()
        else:
            self._new.append(entry)
            self._wakeup.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                self._take_new()
                now = time.time()
                if self._rescan or now >= self._next_scan:
                    self._rescan = False
                    self._scan(now)
            except Exception:
                log.exception("queue runner pass failed")
                self._next_scan = time.time() + BUSY_WAIT
            if self._rescan:
                gevent.sleep(0)  # more due work: let the workers run first
                continue
            self._wakeup.wait(max(0.0, self._next_scan - time.time()))

    def _room(self) -> int:
        return MAX_IN_FLIGHT - len(self._in_flight)

    def _take_new(self) -> None:
        """Dispatch the entries the queue handed over since the last turn."""
        while self._new:
            entry = self._new.popleft()
            if entry.id in self._in_flight or entry.id in self._cooldown or entry.held:
                continue
            if not self._owns(self._shard_of(entry)):
                continue
            if self._room() <= 0:
                self._backlog = True  # a scan takes it once there is room
                continue
            self._dispatch(entry)

    def _scan(self, now: float) -> None:
        """Dispatch due entries not in flight; schedule the next scan."""
        for qid in [q for q, until in self._cooldown.items() if until <= now]:
            del self._cooldown[qid]
        for shard in [n for n, until in self._handoff.items() if until <= now]:
            del self._handoff[shard]  # still led after the hold: the hand-off failed
        owned = self._owned_shards()
        room = min(BATCH, self._room())
        if room > 0:
            exclude = self._in_flight.keys() | self._cooldown.keys()
            entries = self.queue.due(now, room, shards=owned, exclude=exclude)
            for entry in entries:
                self._dispatch(entry)
            self._backlog = len(entries) >= room
            self._rescan = self._backlog and self._room() > 0
        else:
            self._backlog = True
        nxt = self.queue.next_due(after=now, shards=owned)
        times = [now + IDLE_WAIT, *self._cooldown.values(), *self._handoff.values()]
        if nxt is not None:
            times.append(nxt)
        self._next_scan = min(times)

    def _schedule(self, when: float) -> None:
        """Make sure a scan runs at ``when`` at the latest."""
        if when < self._next_scan:
            self._next_scan = when
            self._wakeup.set()

    # -- dispatch --------------------------------------------------------------------

    def _dispatch(self, entry: QueueEntry) -> None:
        groups: dict[str, list[QueuedRecipient]] = {}
        for rcpt in entry.pending:
            groups.setdefault(domain_of(rcpt.address), []).append(rcpt)
        if not groups:
            return
        attempt = _Attempt(entry, len(groups), shard=self._shard_of(entry))
        self._in_flight[entry.id] = attempt
        for domain, rcpts in groups.items():
            dest = self._destinations.get(domain)
            if dest is None:
                dest = self._destinations[domain] = _Destination(domain)
            dest.jobs.append(_Job(attempt, domain, tuple(rcpts)))
            self._kick(dest)

    def _kick(self, dest: _Destination) -> None:
        # A lingering worker per queued job, the one idle for the shortest
        # time first (so the connections idle longest can expire); then one
        # more connection while the backlog is longer than the number of
        # workers, up to the per-destination limit.  Each worker drains the FIFO.
        for _ in range(min(len(dest.idle), len(dest.jobs))):
            dest.idle.pop().set()
        limit = max(1, self.settings.max_connections_per_domain)
        while dest.jobs and dest.workers < limit and dest.workers < len(dest.jobs):
            dest.workers += 1
            worker = gevent.spawn(self._worker, dest)
            self._workers.add(worker)
            worker.link(self._workers.discard)

    def _worker(self, dest: _Destination) -> None:
        conn: Connection | None = None
        try:
            with self._slots:
                if not dest.jobs:
                    return
                route = self.router.route(dest.domain)
                while True:
                    while dest.jobs:
                        job = dest.jobs.popleft()
                        if job.attempt.abandoned:
                            continue
                        job.attempt.started = True
                        try:
                            conn = self._deliver_job(route, job, conn)
                        except Exception:
                            log.exception("delivery of %s to %s failed",
                                          job.attempt.entry.id, dest.domain)
                            self._finish(job, [RecipientResult(
                                r.address, PENDING, 451, "4.3.0", "internal error during delivery")
                                for r in job.recipients])
                    if conn is None or not conn.usable or not self._linger(dest):
                        break
        finally:
            if conn is not None:
                conn.close(quit=True)
            dest.workers -= 1
            if not dest.jobs and not dest.workers:
                self._destinations.pop(dest.domain, None)
            elif dest.jobs:
                self._kick(dest)

    def _linger(self, dest: _Destination) -> bool:
        """Keep an open connection up to CONNECTION_LINGER seconds for the next
        message to this destination (Postfix's connection cache does the
        same: a new TCP and TLS setup per message halved the relay rate).
        True once a job is queued.  Woken alone (``_kick``), and a worker
        whose job another one took waits on until its deadline."""
        deadline = time.monotonic() + CONNECTION_LINGER
        while not dest.jobs:
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping:
                return False
            wakeup = gevent.event.Event()
            dest.idle.append(wakeup)
            try:
                wakeup.wait(left)
            finally:
                if wakeup in dest.idle:
                    dest.idle.remove(wakeup)
        return True

    # -- one job ---------------------------------------------------------------------

    def _deliver_job(self, route: Route, job: _Job, conn: Connection | None) -> Connection | None:
        entry = job.attempt.entry
        if route.local:
            self._deliver_local(job)
            return conn
        if route.failure is not None:
            self._log(entry, job.recipients, "-", "-", route.failure, None, "none")
            self._finish(job, self._results(job.recipients, [route.failure] * len(job.recipients), ""))
            return conn
        raw = self.queue.read_body(entry)
        env = envelope_of(entry, job.recipients)
        if conn is not None and (not conn.usable
                                 or conn.messages >= self.settings.messages_per_connection
                                 or conn.requiretls != entry.requiretls):
            conn.close(quit=True)
            conn = None
        n = len(job.recipients)
        for fresh in (conn is None, True):
            if conn is None:
                conn, failure = self._connect(route, entry, job.recipients)
                if conn is None:
                    assert failure is not None
                    self._finish(job, self._results(job.recipients, [failure] * n, ""))
                    return None
            try:
                outcomes = conn.send(env, raw)
            except ConnectionLost as exc:
                self._log(entry, job.recipients, conn.mx_host, conn.address, exc.outcome,
                          conn.tls, conn.policy_label)
                conn = None
                if exc.before_transaction and not fresh:
                    continue  # an idle reused connection died: open a new one
                self._finish(job, self._results(job.recipients, [exc.outcome] * n, ""))
                return None
            for rcpt, outcome in zip(job.recipients, outcomes, strict=True):
                self._log(entry, (rcpt,), conn.mx_host, conn.address, outcome, conn.tls,
                          conn.policy_label)
            self._finish(job, self._results(job.recipients, outcomes, conn.mx_host,
                                            next_hop_dsn=conn.ext.dsn))
            return conn
        raise AssertionError("unreachable: the second round always returns")

    def _connect(self, route: Route, entry: QueueEntry, rcpts: Sequence[QueuedRecipient] = ()
                 ) -> tuple[Connection | None, Outcome | None]:
        """A session with the first host of the route that answers (RFC 5321 §5.1)."""
        if route.local or self.router.local_domain(route.domain):
            raise AssertionError(f"refusing to connect out for local domain {route.domain}")
        from node.outbound.policy import MxNotAllowed

        last: Outcome | None = None
        for host in route.hosts:
            try:
                policy = self.engine.for_mx(route.domain, host.name, host.port,
                                            requiretls=entry.requiretls)
            except MxNotAllowed as exc:
                last = Outcome(PENDING, 451, "4.7.5", f"MX {host.name} not allowed by policy: {exc}")
                self._log(entry, rcpts, host.name, "-", last, None, "mta-sts")
                continue
            label = policy.describe()  # e.g. "tls=required(dane,requiretls)"
            conn, failures = open_connection(self.settings, self.ctx.hostname, host.name,
                                             host.addresses, host.port, policy, self.engine)
            for address, outcome in failures:
                self._log(entry, rcpts, host.name, address, outcome, None, label)
                last = outcome
            if conn is not None:
                conn.policy_label = label
                conn.requiretls = entry.requiretls
                return conn, None
        if last is not None and last.state == FAILED and len(route.hosts) > 1:
            last = dataclasses.replace(last, state=PENDING)  # only the last host's refusal
        return None, last or Outcome(PENDING, 451, "4.4.1", "no host to connect to")

    def _deliver_local(self, job: _Job) -> None:
        """Local domain: into the mail store, never over the network."""
        entry = job.attempt.entry
        raw = self.queue.read_body(entry)
        results = []
        for rcpt in job.recipients:
            accounts = localflow.resolve(self.ctx.directory, rcpt.address)
            if accounts is None:
                outcome = Outcome(FAILED, 550, "5.1.1", "no such user here")
            elif not accounts:
                outcome = Outcome(PENDING, 451, "4.3.0", "no mailbox to deliver to yet")
            else:
                try:
                    header = f"Return-Path: <{entry.sender}>\r\n".encode()
                    self.ctx.store.deliver(accounts, header + raw)
                    outcome = Outcome(DELIVERED, 250, "2.0.0", "delivered locally")
                except StorageError as exc:
                    outcome = Outcome(PENDING, 451, "4.3.0", f"local delivery failed: {exc}")
            self._log(entry, (rcpt,), self.ctx.hostname, "local", outcome, None, "local")
            results.extend(self._results((rcpt,), [outcome], self.ctx.hostname))
        self._finish(job, results, local=True)

    @staticmethod
    def _results(rcpts: Sequence[QueuedRecipient], outcomes: Sequence[Outcome], remote_mta: str,
                 *, next_hop_dsn: bool = True) -> list[RecipientResult]:
        out = []
        for rcpt, outcome in zip(rcpts, outcomes, strict=True):
            state = outcome.state
            if state == DELIVERED and not next_hop_dsn and "SUCCESS" in rcpt.notify:
                state = RELAYED  # RFC 3461 §5.2.2.3: the next hop cannot report success
            out.append(RecipientResult(rcpt.address, state, outcome.code, outcome.enhanced,
                                       outcome.text, remote_mta))
        return out

    # -- completion ------------------------------------------------------------------

    def _finish(self, job: _Job, results: list[RecipientResult], *, local: bool = False) -> None:
        attempt = job.attempt
        attempt.results.extend(results)
        if local:
            attempt.local.update(r.address for r in results)
        attempt.remaining -= 1
        if attempt.remaining == 0:
            try:
                self._complete(attempt)
            finally:
                if self._in_flight.get(attempt.entry.id) is attempt:
                    del self._in_flight[attempt.entry.id]
                self._signal_done()
                if self._backlog:
                    self.wake()

    def _complete(self, attempt: _Attempt) -> None:
        """DSNs first, then one record_attempt for the whole entry."""
        from node.outbound import dsn

        entry, now, s = attempt.entry, time.time(), self.settings
        expired = now - entry.created >= s.max_lifetime
        results = []
        for r in attempt.results:
            if r.state == PENDING and expired:
                days = s.max_lifetime / 86400
                r = dataclasses.replace(r, state=FAILED, enhanced=r.enhanced or "4.4.7",
                                        text=f"delivery time expired after {days:g} days; "
                                             f"last error: {r.text}")
            results.append(r)
        by_address = {q.address.lower(): q for q in entry.pending}

        def queued(rs: list[RecipientResult]) -> list[QueuedRecipient]:
            out = []
            for r in rs:
                q = by_address.get(r.address.lower())
                if q is not None:
                    out.append(dataclasses.replace(
                        q, state=r.state, code=r.code, enhanced=r.enhanced, text=r.text,
                        remote_mta=r.remote_mta, attempts=q.attempts + 1, updated=now))
            return out

        local = attempt.local
        failed = [r for r in results if r.state == FAILED]
        relayed = [r for r in results if r.state == RELAYED]
        succeeded = [r for r in results if r.state == DELIVERED and r.address in local]
        pending = [r for r in results if r.state == PENDING]
        delay_sent: bool | None = None
        reports = [("failure", failed), ("relayed", relayed), ("success", succeeded)]
        if pending and not entry.delay_dsn_sent and now - entry.created >= s.delay_dsn_after:
            reports.append(("delay", pending))
            delay_sent = True
        unreported: set[str] = set()
        for kind, rs in reports:
            if not rs:
                continue
            try:
                dsn.send_report(self.ctx, entry, kind, queued(rs))
            except StorageError as exc:
                log.warning("queue %s: %s report not stored (%s); tried again later",
                            entry.id, kind, exc)
                if kind == "failure":
                    unreported.update(r.address for r in rs)
                if kind == "delay":
                    delay_sent = None
        if unreported:
            # Keep them pending so the failure is seen, and reported, again.
            results = [dataclasses.replace(r, state=PENDING) if r.address in unreported else r
                       for r in results]
            pending = [r for r in results if r.state == PENDING]
        next_attempt = None
        if pending:
            next_attempt = next_attempt_time(entry, now, s.retry_intervals, s.max_lifetime, self.rng)
            if unreported:
                next_attempt = min(next_attempt, now + COOLDOWN)
        try:
            self.queue.record_attempt(entry.id, results, next_attempt, delay_dsn_sent=delay_sent)
        except StorageError as exc:
            log.warning("queue %s: attempt result not stored (%s); retried in %gs",
                        entry.id, exc, COOLDOWN)
            self._cooldown[entry.id] = now + COOLDOWN
            self._schedule(now + COOLDOWN)
            return
        if next_attempt is not None:
            self._schedule(next_attempt)

    # -- logging ---------------------------------------------------------------------

    def _log(self, entry: QueueEntry, rcpts: Sequence[QueuedRecipient], mx: str, ip: str,
             outcome: Outcome, tls: str | None, policy: str) -> None:
        """One line per delivery attempt, with the TLS in use and the policy enforced."""
        log.info(
            "delivery queue=%s to=%s mx=%s ip=%s result=%s status=\"%s\" tls=%s policy=%s",
            entry.id, ",".join(r.address for r in rcpts), mx, ip, outcome.state,
            str(outcome)[:300], (tls or "none").replace(" ", "/"), policy,
        )
