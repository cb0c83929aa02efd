"""Synchronous log shipping: the primary's Replicator and the follower's handlers.

Theory of operation (docs/cluster.md, "Replication", says why each step is safe)
--------------------------------------------------------------------------------
Every shard has one primary per epoch (its ``/shards/<NNNN>`` record, changed
only by compare-and-swap).  The primary's group committer calls
:meth:`Replicator.replicate` between prepare and commit with the batch's new
ops.  It sends ``repl.append {shard, epoch, prev, ops}`` plus the blobs those
ops reference to every ISR follower at once and returns when each one has
fsynced them.  A follower that does not answer in ``ack_timeout`` (or cannot
be reached, or whose log does not match) is first removed from the ISR in
etcd -- a CAS that only succeeds while the record still names us primary of
our epoch -- and only then is the batch committed without it.  A follower
that knows a newer epoch answers ``StaleEpoch``: we are deposed, the batch is
rolled back, and the manager steps us down.  ``replicate`` therefore raises
(StorageUnavailable) only when we are deposed or stopping; while etcd cannot
be reached it keeps retrying: a batch rolled back after followers stored it
fences its epoch in the MailStore (reusing its (index, epoch) for other ops
would make logs that look equal but are not), and a fenced primary must take
a new epoch before it writes again (``check_fenced``).

Before a new primary accepts writes, :meth:`Replicator.sync` (promotion
sync) brings every ISR follower to its log: a follower that is behind gets
the missing ops; one that is *ahead* with ops consistent with ours (the old
primary died between their ack and its own commit) gives us its tail first
(``repl.fetch``), which we append with their own epochs; one that has
diverged, or does not answer, is removed from the ISR.  Every follower then
gets an empty append of the new epoch (it now refuses the old primary).

A replica outside the ISR is caught up by one greenlet of the primary
(:meth:`Replicator._catch_up`): from the log if its last (index, epoch) is in
ours, else by a snapshot that the follower pulls (``repl.resync`` makes it
stream ``repl.snapshot``, install it and fetch the blobs it lacks with
``repl.blobs``), then from the log.  The last batch is shipped while the
committer is paused, and the replica joins the ISR by CAS before the pause
ends, so no batch can commit without it once etcd lists it.

Leadership hand-off (``transfer_to``): hand-off hooks run, the committer is
paused (everything committed is on every ISR member), and one CAS makes the
target primary of epoch + 1; we become its follower before the pause ends.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gevent
import gevent.lock

from cluster.etcd import EtcdError, EtcdSession
from cluster.placement import ShardRecord
from cluster.rpc import EncodedArgs, RpcClient, RpcError, RpcServer, RpcUnavailable
from storage import model
from storage.blobs import is_blob_name
from storage.mailstore import MailStore
from storage.shard import Op

log = logging.getLogger(__name__)

SHARDS = "/shards/"
CATCHUP_BYTES = 32 * 1024 * 1024  # blob bytes per catch-up append at most (one op at least)
APPEND_BYTES = 256 * 1024 * 1024  # blob bytes per live append (a bigger batch is split)
BLOB_REPLY_BYTES = 64 * 1024 * 1024  # repl.blobs answers at most this much (one blob at least)
BLOBS_PER_REQUEST = 64
# New blobs per append from which a follower writes them in parallel before
# the batch (one threadpool job each); fewer go in the batch's own job.
PARALLEL_BLOBS = 8
FETCH_LIMIT = 1000  # ops per repl.fetch answer
# Octets of op args JSON per frame at most (one op at least), under the RPC's
# 16 MiB header limit: an enqueue carries its body inline (storage/queue.py).
OPS_BYTES = 8 * 1024 * 1024
SNAPSHOT_CHUNK = 1024 * 1024
RESYNC_TIMEOUT = 1800.0  # seconds a follower may take to pull and install a snapshot
MAX_FRAME = 1024 * 1024  # snapshot stream header
RETRY_MIN, RETRY_MAX = 0.2, 5.0  # catch-up and etcd retry backoff, seconds


def shard_key(number: int) -> str:
    return f"{SHARDS}{number:04d}"


# -- wire format --------------------------------------------------------------


def op_to_wire(op: Op) -> list:
    return [op.index, op.epoch, op.timestamp, op.op, op.args]


def op_from_wire(item: Any) -> Op:
    if not isinstance(item, list) or len(item) != 5:
        raise model.StorageError("bad replicated op")
    index, epoch, timestamp, name, args = item
    if not (isinstance(index, int) and isinstance(epoch, int) and isinstance(name, str)
            and isinstance(args, dict) and isinstance(timestamp, (int, float))):
        raise model.StorageError("bad replicated op")
    return Op(index, epoch, float(timestamp), name, args)


def blob_refs(ops: Iterable[Op]) -> list[str]:
    """Names of the blobs the ops reference (append, enqueue), each once, in order."""
    seen: dict[str, None] = {}
    for op in ops:
        blob = op.args.get("blob")
        if is_blob_name(blob):
            seen.setdefault(blob, None)
    return list(seen)


def _pos(value: Any) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) for v in value)):
        raise model.StorageError("bad log position")
    return int(value[0]), int(value[1])


class WireError(Exception):
    """Raised by a handler: the caller's RpcError has kind = the class name and
    message = the JSON of ``fields``."""

    def __init__(self, **fields: Any) -> None:
        super().__init__(json.dumps(fields))
        self.fields = fields
        self.rpc_data = fields  # cluster/rpc.py sends it as the error's data


class StaleEpoch(WireError):
    """``{known_epoch}``: the follower knows a newer epoch than the sender's."""


class LogMismatch(WireError):
    """``{last: [index, epoch]}``: the follower's log does not end at ``prev``."""


class NotServing(WireError):
    """``{role, epoch}``: this node does not hold the shard in the needed role."""


def error_fields(exc: RpcError) -> dict:
    """The fields of a WireError that reached us as an RpcError."""
    if isinstance(getattr(exc, "data", None), dict) and exc.data:
        return exc.data
    try:
        fields = json.loads(getattr(exc, "message", "") or "{}")
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


_TIMED_OUT = object()


def _parallel(calls: Mapping[str, Callable[[], Any]], timeout: float | None) -> dict[str, Any]:
    """Run calls at once; key -> value, the exception raised, or _TIMED_OUT."""

    def run(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # handed to the caller, not printed by gevent
            return exc

    jobs = {key: gevent.spawn(run, fn) for key, fn in calls.items()}
    gevent.joinall(list(jobs.values()), timeout=timeout)
    out: dict[str, Any] = {}
    for key, job in jobs.items():
        if job.ready():
            out[key] = job.value
        else:
            job.kill(block=False)
            out[key] = _TIMED_OUT
    return out


@dataclass(frozen=True)
class _Chunk:
    """One repl.append of a batch: wire ops, blob names, blob bytes, last (index,
    epoch), and its arguments encoded once for every follower (after ``prev``)."""

    ops: list
    names: list[str]
    blobs: list[bytes]
    end: tuple[int, int]
    prev: tuple[int, int]
    encoded: EncodedArgs


class Deposed(Exception):
    """We no longer lead the shard at our epoch (or are stopping)."""


class Retry(Exception):
    """A catch-up step failed in a way worth retrying later."""


# -- the shard records as this node knows them ---------------------------------


@dataclass(frozen=True)
class Tracked:
    """A shard record and the etcd mod_revision it was seen at.  ``exact`` is
    False after our own CAS until the watch (or a get) shows its revision: then
    ``rev`` is the revision our CAS replaced, only good for ordering."""

    record: ShardRecord | None
    rev: int
    exact: bool = True


class ShardRecords:
    """The freshest /shards/ record per shard, from the watch, reads and our
    own CAS writes; never replaced by an older revision."""

    def __init__(
        self, session: EtcdSession, on_change: Callable[[int], None] | None = None
    ) -> None:
        self.session = session
        self.on_change = on_change  # called with the shard number after each replacement
        self._records: dict[int, Tracked] = {}

    def _set(self, number: int, tracked: Tracked) -> None:
        old = self._records.get(number)
        self._records[number] = tracked
        if self.on_change is not None and (old is None or old.record != tracked.record):
            self.on_change(number)

    def get(self, number: int) -> Tracked | None:
        return self._records.get(number)

    def record(self, number: int) -> ShardRecord | None:
        tracked = self._records.get(number)
        return tracked.record if tracked is not None else None

    def numbers(self) -> list[int]:
        return sorted(self._records)

    def observe(self, number: int, record: ShardRecord | None, rev: int) -> bool:
        """Take a record seen at rev; False if we already know a newer one."""
        known = self._records.get(number)
        if known is not None and rev <= known.rev:
            return False
        self._set(number, Tracked(record, rev, True))
        return True

    def fetch(self, number: int) -> Tracked:
        """Read the record from etcd (linearizable: the newest there is); raises EtcdError."""
        kv = self.session.get(shard_key(number))
        record = ShardRecord.from_json(kv.value) if kv is not None else None
        tracked = Tracked(record, kv.mod_revision if kv is not None else 0, True)
        self._set(number, tracked)
        return tracked

    def cas(self, number: int, expected: Tracked, record: ShardRecord) -> bool:
        """Compare-and-swap on expected.rev; on success we know the new record."""
        if not expected.exact:
            raise EtcdError("compare-and-swap needs an exact revision")
        if not self.session.compare_and_swap(shard_key(number), expected.rev, record.to_json()):
            return False
        known = self._records.get(number)
        if known is None or known.rev <= expected.rev:
            self._set(number, Tracked(record, expected.rev, False))
        return True


# -- what the replicator needs from the manager ---------------------------------


class Host(Protocol):
    """The node around a Replicator (cluster/manager.py ClusterManager)."""

    node_name: str
    store: MailStore
    session: EtcdSession
    rpc_client: RpcClient
    records: ShardRecords
    ack_timeout: float
    rpc_timeout: float
    catchup_batch: int

    def rpc_address(self, node: str) -> str | None: ...

    def member_lease(self, node: str) -> int | None: ...

    def run_handoff_hooks(self, shard: int) -> None: ...

    def deposed(self, shard: int, epoch: int, why: str) -> None:
        """The replicator found it no longer leads (StaleEpoch, a lost CAS)."""
        ...

    def handed_off(self, shard: int, new_epoch: int) -> None:
        """Called inside the committer pause after a hand-off CAS succeeded:
        set the shard's role to follower of new_epoch now."""
        ...


# -- primary side ------------------------------------------------------------


class Replicator:
    """Leads one shard at one epoch: replicate, promotion sync, catch-up, hand-off."""

    def __init__(self, host: Host, shard: int, epoch: int, lease: int) -> None:
        self.host = host
        self.shard = shard
        self.epoch = epoch
        self.lease = lease
        self.store = host.store
        self._stopped = False
        self._synced = False  # promotion sync done
        self._last = (0, 0)  # (index, epoch) of the last op replicated (the log's last)
        self._catchups: dict[str, gevent.Greenlet] = {}
        self._snapshot_for: set[str] = set()  # replicas the log cannot catch up
        self._handoff: gevent.Greenlet | None = None
        self.acks = 0  # batches replicated (tests, metrics)
        self.shrinks = 0
        self.grows = 0

    # -- state ---------------------------------------------------------------

    @property
    def me(self) -> str:
        return self.host.node_name

    @property
    def active(self) -> bool:
        return not self._stopped

    def stop(self) -> None:
        """Stop leading: replicate raises from now on; catch-ups end."""
        self._stopped = True
        current = gevent.getcurrent()
        for greenlet in list(self._catchups.values()):
            if greenlet is not current:
                greenlet.kill(block=False)
        self._catchups.clear()
        if self._handoff is not None and self._handoff is not current:
            self._handoff.kill(block=False)

    def _mine(self) -> Tracked:
        """The freshest record, if it still names us primary of our epoch."""
        if self._stopped:
            raise Deposed("stopped")
        tracked = self.host.records.get(self.shard)
        record = tracked.record if tracked is not None else None
        if (tracked is None or record is None or record.epoch != self.epoch
                or record.primary != self.me or record.primary_lease != self.lease
                or self.host.session.lease_id != self.lease):
            raise Deposed(f"shard {self.shard}: epoch {self.epoch} is no longer ours")
        return tracked

    def _mine_exact(self) -> Tracked:
        tracked = self._mine()
        if not tracked.exact:
            self.host.records.fetch(self.shard)
            tracked = self._mine()
        return tracked

    def _followers(self, record: ShardRecord) -> list[str]:
        return [n for n in record.isr if n != self.me]

    def _depose(self, why: str) -> Deposed:
        if not self._stopped:
            log.warning("shard %d: deposed at epoch %d: %s", self.shard, self.epoch, why)
            self.stop()
            self.host.deposed(self.shard, self.epoch, why)
        return Deposed(why)

    # -- calls to one follower -------------------------------------------------

    def _address(self, node: str) -> str:
        address = self.host.rpc_address(node)
        if not address:
            raise RpcUnavailable(f"{node} is not a member")
        return address

    def _append_args(self, prev: tuple[int, int], wire_ops: list, blobs: list[str]) -> dict:
        return {"shard": self.shard, "epoch": self.epoch, "prev": list(prev),
                "ops": wire_ops, "blobs": blobs}

    def _append(
        self, node: str, prev: tuple[int, int], wire_ops: list, blobs: list[str],
        attachments: list[bytes], timeout: float, encoded: EncodedArgs | None = None,
    ) -> tuple[int, int]:
        """One repl.append (``encoded``: its arguments, already encoded);
        returns the follower's new last (index, epoch)."""
        args = encoded or self._append_args(prev, wire_ops, blobs)
        result, _ = self.host.rpc_client.call(
            self._address(node), "repl.append", args, attachments, timeout=timeout)
        return _pos(result.get("last"))

    def _position(self, node: str) -> tuple[tuple[int, int], int]:
        result, _ = self.host.rpc_client.call(
            self._address(node), "repl.position", {"shard": self.shard},
            timeout=self.host.ack_timeout)
        return _pos(result.get("last")), int(result.get("known_epoch", 0))

    def _payload(self, ops: list[Op]) -> tuple[list, list[str], list[bytes]]:
        names = blob_refs(ops)
        return [op_to_wire(op) for op in ops], names, [self.store.blobs.read(n) for n in names]

    def _chunks(self, ops: list[Op], prev: tuple[int, int]) -> list[_Chunk]:
        """The batch after ``prev`` as appends of at most APPEND_BYTES of blobs
        and OPS_BYTES of inline bodies (one op at least)."""
        chunks: list[_Chunk] = []
        part: list[Op] = []
        size = 0

        def close() -> None:
            wire, names, data = self._payload(part)
            start = chunks[-1].end if chunks else prev
            chunks.append(_Chunk(wire, names, data, (part[-1].index, part[-1].epoch), start,
                                 EncodedArgs(self._append_args(start, wire, names))))

        inline = 0  # octets of inline bodies (base64) in ``part``'s JSON
        for op in ops:
            blob = op.args.get("blob")
            extra = len(self.store.blobs.read(blob)) if is_blob_name(blob) else 0
            body = len(op.args.get("data") or "")
            if part and (size + extra > APPEND_BYTES or inline + body > OPS_BYTES):
                close()
                part, size, inline = [], 0, 0
            part.append(op)
            size += extra
            inline += body
        close()
        return chunks

    def _append_chunks(
        self, node: str, prev: tuple[int, int], chunks: list[_Chunk], timeout: float
    ) -> tuple[int, int]:
        """Send a batch's chunks in order; a follower that already holds some
        (an earlier try got through) answers LogMismatch at a chunk's end:
        go on from there."""
        ends = [c.end for c in chunks]
        i, pos = 0, prev
        while i < len(chunks):
            chunk = chunks[i]
            try:
                pos = self._append(node, pos, chunk.ops, chunk.names, chunk.blobs, timeout,
                                   chunk.encoded if pos == chunk.prev else None)
            except RpcError as exc:
                last = error_fields(exc).get("last") if exc.kind == "LogMismatch" else None
                if not isinstance(last, list) or tuple(last) not in ends[i:]:
                    raise
                pos = tuple(last)
                i = ends.index(pos)
            i += 1
        return pos

    # -- replicate (the committer's hook) ----------------------------------------

    def replicate(self, shard: int, ops: list[Op]) -> None:
        """Return once every ISR follower fsynced ops; raise StorageUnavailable
        if that cannot be (deposed or stopping): the batch is then rolled back."""
        if not ops:
            return
        try:
            self._check_continuity(ops)
            self._replicate(ops)
        except Deposed as exc:
            raise model.StorageUnavailable(f"shard {shard} is not led here: {exc}") from None
        except BaseException:
            gevent.spawn(self.check_fenced)  # the committer fences our epoch after this
            raise
        self._last = (ops[-1].index, ops[-1].epoch)
        self.acks += 1

    def check_fenced(self) -> None:
        """If the committer fenced our epoch (a replicated batch was rolled
        back, e.g. its commit failed) while etcd still names us, take a new
        epoch: the shard takes writes again after a fresh promotion sync."""
        if self._stopped:
            return
        _, committer = self.store.shard_by_number(self.shard)
        if committer.fenced_epoch >= self.epoch:
            log.warning("shard %d: epoch %d is fenced after a failed batch; re-fencing",
                        self.shard, self.epoch)
            self.stop()
            self._refence()

    def _check_continuity(self, ops: list[Op]) -> None:
        """A batch must continue the last replicated one.  If it does not, a
        replicated batch was rolled back (its commit failed): its (index, epoch)
        pairs may be held by followers, so they must never name other ops.  We
        take a new epoch (a CAS naming ourselves again) and re-sync."""
        self._mine()
        if ops[0].index == self._last[0] + 1:
            return
        log.error("shard %d: batch starts at %d, expected %d; re-fencing with a new epoch",
                  self.shard, ops[0].index, self._last[0] + 1)
        self.stop()
        gevent.spawn(self._refence)
        raise Deposed("a replicated batch was rolled back")

    def _refence(self) -> None:
        """CAS {epoch + 1, same primary and lease}: the manager then syncs anew."""
        for _ in range(20):
            try:
                tracked = self.host.records.fetch(self.shard)
                record = tracked.record
                if (record is None or record.epoch != self.epoch or record.primary != self.me
                        or record.primary_lease != self.lease):
                    return
                new = dataclasses.replace(record, epoch=record.epoch + 1, transfer_to=None)
                if self.host.records.cas(self.shard, tracked, new):
                    return
            except EtcdError as exc:
                log.warning("shard %d: re-fence failed: %s", self.shard, exc)
            gevent.sleep(RETRY_MIN)

    def _replicate(self, ops: list[Op]) -> None:
        prev = self._last
        chunks = self._chunks(ops, prev)
        target = (ops[-1].index, ops[-1].epoch)
        acked: set[str] = set()
        backoff = RETRY_MIN
        while True:
            tracked = self._mine()
            needed = set(self._followers(tracked.record))
            todo = sorted(needed - acked)
            failed = self._send_all(todo, prev, target, chunks)
            acked.update(n for n in todo if n not in failed)
            missing = needed - acked
            if not missing:
                return
            if self._shrink(missing):
                backoff = RETRY_MIN
                continue  # re-check against the record we just wrote
            gevent.sleep(backoff)  # etcd unreachable: keep trying until deposed
            backoff = min(backoff * 2, RETRY_MAX)

    def _send_all(
        self, nodes: list[str], prev: tuple[int, int], target: tuple[int, int],
        chunks: list[_Chunk],
    ) -> dict[str, str]:
        """Append to nodes in parallel; node -> why for those that did not ack."""
        if not nodes:
            return {}
        timeout = self.host.ack_timeout
        answers = _parallel(
            {n: functools.partial(self._append_chunks, n, prev, chunks, timeout) for n in nodes},
            timeout * len(chunks) + 1.0)
        failed: dict[str, str] = {}
        stale = 0
        for node, answer in answers.items():
            if answer is _TIMED_OUT:
                failed[node] = "timed out"
            elif not isinstance(answer, Exception):
                if answer != target:
                    failed[node] = f"acked {answer}, expected {target}"
            elif isinstance(answer, RpcError) and answer.kind == "StaleEpoch":
                stale = max(stale, int(error_fields(answer).get("known_epoch", 0)))
            elif isinstance(answer, RpcError) and answer.kind == "LogMismatch":
                failed[node] = f"log mismatch: it has {error_fields(answer).get('last')}"
            else:
                failed[node] = f"{type(answer).__name__}: {answer}"
        if stale:
            raise self._depose(f"a follower knows epoch {stale}")
        for node, why in failed.items():
            log.warning("shard %d: follower %s did not ack: %s", self.shard, node, why)
        return failed

    def _shrink(self, missing: set[str]) -> bool:
        """Remove missing followers from the ISR by CAS; True when etcd no
        longer lists any of them (ours or someone else's change), False when
        etcd could not be reached.  Raises Deposed."""
        try:
            tracked = self._mine_exact()
            record = tracked.record
            if not missing & set(record.isr):
                return True
            new = dataclasses.replace(record, isr=tuple(n for n in record.isr if n not in missing))
            if self.host.records.cas(self.shard, tracked, new):
                self.shrinks += 1
                log.warning("shard %d: removed %s from the ISR (epoch %d)",
                            self.shard, sorted(missing), self.epoch)
                self._start_catchups()
                return True
            self.host.records.fetch(self.shard)  # lost the race: re-read and re-check
            self._mine()
            return True
        except EtcdError as exc:
            log.warning("shard %d: cannot shrink the ISR: %s", self.shard, exc)
            return False

    # -- promotion sync ------------------------------------------------------------

    def sync(self) -> None:
        """Bring every ISR follower to our log before we take writes (see the
        module docstring).  Returns when done; raises Deposed."""
        backoff = RETRY_MIN
        while True:
            tracked = self._mine()
            followers = self._followers(tracked.record)
            positions = self._probe(followers)
            if self._adopt_ahead(positions):
                continue
            bad = self._sync_followers(followers, positions)
            if not bad:
                self._last = self.store.position(self.shard)
                self._synced = True
                return
            if self._shrink(set(bad)):
                backoff = RETRY_MIN
            else:
                gevent.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)

    def _probe(self, nodes: list[str]) -> dict[str, tuple[int, int] | None]:
        answers = _parallel({n: functools.partial(self._position, n) for n in nodes},
                            self.host.ack_timeout + 1.0)
        out: dict[str, tuple[int, int] | None] = {}
        for node, answer in answers.items():
            if isinstance(answer, tuple):
                last, known = answer
                if known > self.epoch:
                    raise self._depose(f"{node} knows epoch {known}")
                out[node] = last
            else:
                log.info("shard %d: no position from %s: %s", self.shard, node,
                         "timed out" if answer is _TIMED_OUT else answer)
                out[node] = None
        return out

    def _in_my_log(self, pos: tuple[int, int]) -> bool:
        index, epoch = pos
        if index == 0:  # an empty log: ours must still start at op 1 (storage/reclaim.py)
            return self.store.log_start(self.shard) <= 1
        mine = self.store.position(self.shard)
        return index <= mine[0] and self.store.op_epoch(self.shard, index) == epoch

    def _adopt_ahead(self, positions: Mapping[str, tuple[int, int] | None]) -> bool:
        """Append the tail of a follower that is ahead of us and agrees with
        our log (ops the old primary never committed); True if we took any."""
        mine = self.store.position(self.shard)
        ahead = sorted(((p, n) for n, p in positions.items() if p and p[0] > mine[0]),
                       reverse=True)
        for _, node in ahead:
            try:
                if self._fetch_from(node, mine):
                    return True
            except (RpcError, model.StorageError) as exc:
                log.info("shard %d: cannot take the tail of %s: %s", self.shard, node, exc)
        return False

    def _fetch_from(self, node: str, mine: tuple[int, int]) -> bool:
        took = False
        while True:
            result, attachments = self.host.rpc_client.call(
                self._address(node), "repl.fetch",
                {"shard": self.shard, "after": list(mine), "limit": FETCH_LIMIT},
                timeout=self.host.rpc_timeout)
            ops = [op_from_wire(o) for o in result.get("ops") or []]
            if not ops:
                return took
            blobs = dict(zip(result.get("blobs") or [], attachments, strict=True))
            mine = self.store.apply_replicated(self.shard, self.epoch, mine, ops, blobs)
            log.info("shard %d: took ops up to %s from %s", self.shard, mine, node)
            took = True

    def _sync_followers(
        self, followers: list[str], positions: Mapping[str, tuple[int, int] | None]
    ) -> list[str]:
        """Ship each follower what it lacks and fence it with an empty append
        of our epoch; returns those that could not be synced."""
        answers = _parallel(
            {n: functools.partial(self._sync_one, n, positions.get(n)) for n in followers}, None)
        bad = []
        for node, exc in answers.items():
            if exc is None:
                continue
            if isinstance(exc, Deposed):
                raise exc
            if isinstance(exc, RpcError) and exc.kind == "StaleEpoch":
                raise self._depose(f"{node} knows a newer epoch")
            log.warning("shard %d: cannot sync %s: %s", self.shard, node, exc)
            bad.append(node)
        return bad

    def _sync_one(self, node: str, pos: tuple[int, int] | None) -> None:
        if pos is None:
            raise Retry("did not answer")
        if not self._in_my_log(pos):
            raise Retry(f"its log ends at {pos}, not in ours")
        mine = self.store.position(self.shard)
        while pos[0] < mine[0]:
            pos = self._ship(node, pos, self.host.rpc_timeout)
        self._append(node, mine, [], [], [], self.host.ack_timeout)  # fence: our epoch

    def _ship(self, node: str, pos: tuple[int, int], timeout: float) -> tuple[int, int]:
        """Send the committed ops after pos (one size-bounded chunk); new position."""
        ops = self.store.ops_since(self.shard, pos[0], self.host.catchup_batch, OPS_BYTES)
        if not ops:
            raise Retry(f"no ops after {pos[0]}")
        if ops[0].index != pos[0] + 1:  # compacted meanwhile (storage/reclaim.py)
            raise Retry(f"our log no longer holds op {pos[0] + 1}")
        chunk, size = [], 0
        for op in ops:
            blob = op.args.get("blob")
            if is_blob_name(blob):
                try:
                    size += self.store.blobs.path(blob).stat().st_size
                except FileNotFoundError:
                    raise model.NoSuchBlob(blob) from None
            if chunk and size > CATCHUP_BYTES:
                break
            chunk.append(op)
        wire_ops, names, attachments = self._payload(chunk)
        return self._append(node, pos, wire_ops, names, attachments, timeout)

    # -- catch-up of replicas outside the ISR -------------------------------------------

    def start(self) -> None:
        """Start catch-up greenlets (and a pending hand-off) for the current record."""
        self._start_catchups()
        self.check_handoff()

    def record_changed(self) -> None:
        """The manager saw a new record of our shard."""
        if self._stopped:
            return
        try:
            self._mine()
        except Deposed:
            return  # the manager steps us down
        self._start_catchups()
        self.check_handoff()

    def _start_catchups(self) -> None:
        if self._stopped or not self._synced:
            return
        record = self.host.records.record(self.shard)
        if record is None:
            return
        for node in record.replicas:
            if node == self.me or node in record.isr:
                continue
            job = self._catchups.get(node)
            if job is None or job.dead:
                self._catchups[node] = gevent.spawn(self._catch_up, node)

    def _wanted(self, node: str) -> bool:
        try:
            record = self._mine().record
        except Deposed:
            return False
        return node in record.replicas and node not in record.isr

    def _catch_up(self, node: str) -> None:
        backoff = RETRY_MIN
        last_why = ""
        while self._wanted(node):
            try:
                self._catch_up_once(node)
                return
            except Deposed:
                return
            except (RpcError, model.StorageError, EtcdError, Retry, OSError) as exc:
                why = str(exc)
                level = logging.INFO if why != last_why else logging.DEBUG  # no log flood
                log.log(level, "shard %d: catch-up of %s: %s (retrying)", self.shard, node, why)
                last_why = why
            gevent.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX)

    def _catch_up_once(self, node: str) -> None:
        pos, known = self._position(node)
        if known > self.epoch:
            raise Retry(f"{node} knows epoch {known}")
        snapshot = node in self._snapshot_for
        if snapshot or not self._in_my_log(pos):
            log.info("shard %d: %s is at %s, %s: snapshot", self.shard, node, pos,
                     "our log lacks blobs it needs" if snapshot else "not in our log")
            result, _ = self.host.rpc_client.call(
                self._address(node), "repl.resync", {"shard": self.shard, "epoch": self.epoch},
                timeout=RESYNC_TIMEOUT)
            pos = _pos(result.get("last"))
            self._snapshot_for.discard(node)
            if not self._in_my_log(pos):
                raise Retry(f"after the snapshot {node} is at {pos}")
        try:
            self._ship_until_close(node, pos)
        except model.NoSuchBlob:
            # An old op names a blob we do not hold (we were resynced from a
            # snapshot ourselves): only a snapshot can bring it up to date.
            self._snapshot_for.add(node)
            raise

    def _ship_until_close(self, node: str, pos: tuple[int, int]) -> None:
        batch = self.host.catchup_batch
        while self.store.position(self.shard)[0] - pos[0] > batch:
            self._mine()
            pos = self._ship(node, pos, self.host.rpc_timeout)
        with self.store.paused(self.shard):
            mine = self.store.position(self.shard)
            while pos[0] < mine[0]:  # writes wait meanwhile: a batch's timeout
                pos = self._ship(node, pos, self.host.ack_timeout)
            if pos != mine:
                raise Retry(f"{node} is at {pos}, we are at {mine}")
            self._grow(node)

    def _grow(self, node: str) -> None:
        """CAS isr += node (inside the committer pause)."""
        while True:
            tracked = self._mine_exact()
            record = tracked.record
            if node in record.isr or node not in record.replicas:
                return
            new = dataclasses.replace(record, isr=(*record.isr, node))
            if self.host.records.cas(self.shard, tracked, new):
                self.grows += 1
                log.info("shard %d: %s caught up and joined the ISR", self.shard, node)
                return
            self.host.records.fetch(self.shard)

    # -- hand-off ------------------------------------------------------------------

    def check_handoff(self) -> None:
        record = self.host.records.record(self.shard)
        if (self._stopped or not self._synced or record is None
                or not record.transfer_to or record.transfer_to == self.me):
            return
        if self._handoff is None or self._handoff.dead:
            self._handoff = gevent.spawn(self._hand_off, record.transfer_to)

    def _hand_off(self, target: str) -> None:
        backoff = RETRY_MIN
        hooks_done = False
        while not self._stopped:
            try:
                record = self._mine().record
                if record.transfer_to != target:
                    return
                if not hooks_done:
                    self.host.run_handoff_hooks(self.shard)
                    hooks_done = True
                if self._hand_off_once(target):
                    return
            except Deposed:
                return
            except EtcdError as exc:
                log.warning("shard %d: hand-off to %s: %s", self.shard, target, exc)
            gevent.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX)

    def _hand_off_once(self, target: str) -> bool:
        with self.store.paused(self.shard):
            tracked = self._mine_exact()
            record = tracked.record
            if record.transfer_to != target:
                return True
            lease = self.host.member_lease(target)
            if target not in record.isr or not lease:
                log.warning("shard %d: cannot hand off to %s (in isr: %s, lease: %s)",
                            self.shard, target, target in record.isr, lease)
                return False
            new = dataclasses.replace(record, epoch=record.epoch + 1, primary=target,
                                      primary_lease=lease, transfer_to=None)
            if not self.host.records.cas(self.shard, tracked, new):
                self.host.records.fetch(self.shard)
                return False
            log.info("shard %d: handed off to %s (epoch %d)", self.shard, target, new.epoch)
            self._stopped = True
            self.host.handed_off(self.shard, new.epoch)
            return True


# -- follower side (and the primary's serving handlers) --------------------------


def write_frame(sock: Any, header: dict) -> None:
    data = json.dumps(header).encode("utf-8")
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exact(sock: Any, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), SNAPSHOT_CHUNK))
        if not chunk:
            raise RpcUnavailable("stream ended early")
        buf += chunk
    return bytes(buf)


def read_frame(sock: Any) -> dict:
    (size,) = struct.unpack(">I", _recv_exact(sock, 4))
    if size > MAX_FRAME:
        raise RpcUnavailable("stream header too large")
    header = json.loads(_recv_exact(sock, size))
    if not isinstance(header, dict):
        raise RpcUnavailable("bad stream header")
    return header


class ReplicationService:
    """The repl.* RPC handlers of one node.

    Follower side: append, position, fetch, resync, digest.  Primary side:
    the snapshot stream and blobs a resyncing follower pulls.
    ``address_of(node)`` gives a member's RPC address.
    """

    def __init__(
        self, store: MailStore, rpc_client: RpcClient, address_of: Callable[[str], str | None],
        timeout: float = 10.0, await_follower: Callable[[int, int], None] | None = None,
    ) -> None:
        self.store = store
        self.rpc_client = rpc_client
        self.address_of = address_of
        self.timeout = timeout
        # await_follower(shard, epoch): a primary of epoch says we follow the
        # shard but we do not (yet): the manager re-reads the record and
        # waits briefly for the role, instead of refusing at once.
        self.await_follower = await_follower
        self.tmp_dir = Path(store.data_dir) / "replication"
        self._resyncing: dict[int, gevent.lock.Semaphore] = {}

    def register(self, server: RpcServer) -> None:
        server.register("repl.append", self.append)
        server.register("repl.position", self.position)
        server.register("repl.fetch", self.fetch)
        server.register("repl.resync", self.resync)
        server.register("repl.blobs", self.blobs)
        server.register("repl.digest", self.digest)
        server.register_stream("repl.snapshot", self.snapshot)

    def clean(self) -> None:
        """Remove snapshot files left by a crash (at start)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)

    def _shard(self, args: dict) -> int:
        number = args.get("shard")
        if not isinstance(number, int) or not 0 <= number < self.store.shards:
            raise model.StorageError("bad shard number")
        return number

    # -- follower ---------------------------------------------------------------

    def append(self, peer: str, args: dict, attachments: list[bytes]) -> tuple[dict, list]:
        number = self._shard(args)
        ops = [op_from_wire(o) for o in args.get("ops") or []]
        names = args.get("blobs") or []
        if len(names) != len(attachments):
            raise model.StorageError("blob names and attachments differ")
        self._await_follower(number, int(args["epoch"]))
        self._store_blobs(number, int(args["epoch"]), names, attachments)
        try:
            last = self.store.apply_replicated(
                number, int(args["epoch"]), _pos(args.get("prev")), ops,
                dict(zip(names, attachments, strict=True)))
        except model.StaleEpoch as exc:
            raise StaleEpoch(known_epoch=exc.known_epoch) from None
        except model.LogMismatch as exc:
            raise LogMismatch(last=[exc.last_index, exc.last_epoch]) from None
        return {"last": list(last)}, []

    def _store_blobs(self, number: int, epoch: int, names: list, attachments: list) -> None:
        """Write many new blobs at once (one fsync each, in parallel);
        apply_replicated then finds them and only checks they exist.  A few
        are left to apply_replicated: its batch's job writes them."""
        role, known = self.store.role(number)
        if role != "follower" or epoch < known:
            return  # apply_replicated gives the right refusal
        blobs = self.store.blobs
        # Not just visible: durable (a concurrent append may still be writing it).
        todo = [(n, d) for n, d in zip(names, attachments, strict=True) if not blobs.cached(n)]
        if len(todo) < PARALLEL_BLOBS:
            return
        written = _parallel({n: functools.partial(blobs.put, d) for n, d in todo}, None)
        for name, answer in written.items():
            if isinstance(answer, Exception):
                raise model.StorageUnavailable(f"cannot store blob {name}: {answer}")
            if answer != name:
                raise model.StorageError(f"blob {name}: content does not match its name")

    def _await_follower(self, number: int, epoch: int) -> None:
        if self.await_follower is not None and self.store.role(number)[0] != "follower":
            self.await_follower(number, epoch)

    def position(self, peer: str, args: dict, attachments: list[bytes]) -> tuple[dict, list]:
        number = self._shard(args)
        role, known = self.store.role(number)
        return {"last": list(self.store.position(number)), "known_epoch": known,
                "role": role}, []

    def fetch(self, peer: str, args: dict, attachments: list[bytes]) -> tuple[dict, list]:
        """A new primary takes the tail we hold beyond its log (promotion sync)."""
        number = self._shard(args)
        after = _pos(args.get("after"))
        limit = max(1, min(int(args.get("limit", FETCH_LIMIT)), FETCH_LIMIT))
        last = self.store.position(number)
        if after[0] > last[0] or (after[0] and self.store.op_epoch(number, after[0]) != after[1]):
            raise LogMismatch(last=list(last))
        ops = self.store.ops_since(number, after[0], limit, OPS_BYTES)
        names = blob_refs(ops)
        return ({"ops": [op_to_wire(o) for o in ops], "blobs": names},
                [self.store.blobs.read(n) for n in names])

    def digest(self, peer: str, args: dict, attachments: list[bytes]) -> tuple[dict, list]:
        position, value = self.store.position_digest(self._shard(args))
        return {"last": list(position), "digest": value}, []

    def resync(self, peer: str, args: dict, attachments: list[bytes]) -> tuple[dict, list]:
        """The primary (peer) asks us to replace our copy by its snapshot."""
        number = self._shard(args)
        epoch = int(args["epoch"])
        self._await_follower(number, epoch)
        role, known = self.store.role(number)
        if epoch < known:
            raise StaleEpoch(known_epoch=known)
        if role != "follower":
            raise NotServing(role=role, epoch=known)
        lock = self._resyncing.setdefault(number, gevent.lock.Semaphore())
        if lock.locked():
            raise NotServing(role=role, epoch=known, busy=True)
        with lock:
            address = self.address_of(peer)
            if not address:
                raise RpcUnavailable(f"{peer} is not a member")
            last = self._pull_snapshot(number, epoch, address)
            self._pull_blobs(number, address)
        log.info("shard %d: installed a snapshot from %s at %s", number, peer, last)
        return {"last": list(self.store.position(number))}, []

    def _pull_snapshot(self, number: int, epoch: int, address: str) -> tuple[int, int]:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        path = self.tmp_dir / f"in-{number:04d}-{secrets.token_hex(6)}.sqlite"
        sock = self.rpc_client.open_stream(
            address, "repl.snapshot", {"shard": number, "epoch": epoch}, timeout=self.timeout)
        try:
            sock.settimeout(self.timeout)
            header = read_frame(sock)
            if "error" in header:
                raise RpcError(str(header["error"]))
            size = int(header["size"])
            digest = hashlib.sha256()
            pool = gevent.get_hub().threadpool
            with open(path, "wb") as f:
                remaining = size
                while remaining:
                    chunk = _recv_exact(sock, min(remaining, SNAPSHOT_CHUNK))
                    digest.update(chunk)
                    pool.apply(f.write, (chunk,))
                    remaining -= len(chunk)
            if digest.hexdigest() != header.get("sha256"):
                raise RpcUnavailable("snapshot checksum mismatch")
            return self.store.install_snapshot(number, path, epoch)
        finally:
            sock.close()
            path.unlink(missing_ok=True)

    def _pull_blobs(self, number: int, address: str) -> None:
        missing = list(self.store.missing_blobs(number))
        while missing:
            asked = missing[:BLOBS_PER_REQUEST]
            result, data = self.rpc_client.call(
                address, "repl.blobs", {"hashes": asked}, timeout=self.timeout * 6)
            got = result.get("hashes") or []
            if not got or len(got) != len(data):
                raise RpcError("repl.blobs returned nothing")
            for name, blob in zip(got, data, strict=True):
                if self.store.blobs.put(blob) != name:
                    raise model.StorageError(f"blob {name} arrived corrupted")
            missing = [n for n in missing if n not in set(got)]

    # -- primary (served to resyncing followers) --------------------------------------

    def blobs(self, peer: str, args: dict, attachments: list[bytes]) -> tuple[dict, list]:
        names = args.get("hashes") or []
        if not isinstance(names, list) or not all(is_blob_name(n) for n in names):
            raise model.StorageError("bad blob names")
        out, data, size = [], [], 0
        for name in names[:BLOBS_PER_REQUEST]:
            blob = self.store.blobs.read(name)
            if data and size + len(blob) > BLOB_REPLY_BYTES:
                break
            out.append(name)
            data.append(blob)
            size += len(blob)
        return {"hashes": out}, data

    def snapshot(self, peer: str, args: dict, sock: Any) -> None:
        """Stream: {last, size, sha256} frame, then the database file's bytes."""
        path: Path | None = None
        try:
            number = self._shard(args)
            role, known = self.store.role(number)
            if role != "primary" or known != int(args.get("epoch", -1)):
                write_frame(sock, {"error": f"not primary of shard {number} at that epoch"})
                return
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            path = self.tmp_dir / f"out-{number:04d}-{secrets.token_hex(6)}.sqlite"
            last = self.store.export_snapshot(number, path)
            pool = gevent.get_hub().threadpool
            size, sha = pool.apply(_file_digest, (path,))
            write_frame(sock, {"last": list(last), "size": size, "sha256": sha})
            with open(path, "rb") as f:
                while True:
                    chunk = pool.apply(f.read, (SNAPSHOT_CHUNK,))
                    if not chunk:
                        break
                    sock.sendall(chunk)
            log.info("shard %d: sent a snapshot at %s (%d bytes) to %s", number, last, size, peer)
        except (OSError, model.StorageError) as exc:
            log.warning("snapshot for %s failed: %s", peer, exc)
        finally:
            if path is not None:
                path.unlink(missing_ok=True)


def _file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(SNAPSHOT_CHUNK), b""):
            digest.update(chunk)
    return os.path.getsize(path), digest.hexdigest()
