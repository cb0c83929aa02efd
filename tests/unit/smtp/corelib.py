"""Drive an SmtpCore with a trivial policy; feed inputs whole, bytewise, split."""

from __future__ import annotations

import random
from collections.abc import Callable

from node.smtp import replies as R
from node.smtp.protocol import (
    NEED_DATA,
    PAUSED,
    BdatEnd,
    Command,
    DataChunk,
    DataEnd,
    ProtocolViolation,
    SmtpCore,
)
from node.smtp.replies import Reply


def accept_all(event: object) -> Reply:
    """Every command succeeds; DATA gets 354; errors get their hint."""
    if isinstance(event, Command):
        if event.verb == "DATA":
            return R.START_DATA
        if event.verb == "QUIT":
            return R.BYE
        if event.verb == "STARTTLS":
            return R.READY_TLS
        return R.OK
    if isinstance(event, ProtocolViolation):
        return event.reply
    if isinstance(event, (DataEnd, BdatEnd)):
        return event.error or R.QUEUED
    raise AssertionError(event)


def run(
    core: SmtpCore,
    pieces: list[bytes],
    policy: Callable[[object], Reply] = accept_all,
) -> tuple[list[object], bytes]:
    """Feed pieces, answer every event; returns (events with chunks merged, output)."""
    events: list[object] = []
    out = bytearray()
    for piece in pieces:
        core.receive_data(piece)
        while True:
            ev = core.next_event()
            if ev is NEED_DATA:
                break
            assert ev is not PAUSED
            if isinstance(ev, DataChunk):
                if events and isinstance(events[-1], DataChunk):
                    events[-1] = DataChunk(events[-1].data + ev.data)
                else:
                    events.append(ev)
                continue
            events.append(ev)
            out += core.respond(policy(ev))
    return events, bytes(out)


def splits(data: bytes, seed: int = 0) -> list[list[bytes]]:
    """The three feedings: whole, one byte at a time, randomly split."""
    rnd = random.Random(seed)
    cut, parts = 0, []
    while cut < len(data):
        n = rnd.randint(1, 7)
        parts.append(data[cut : cut + n])
        cut += n
    return [[data], [data[i : i + 1] for i in range(len(data))], parts]


def run_all_ways(data: bytes, make: Callable[[], SmtpCore] = SmtpCore,
                 policy: Callable[[object], Reply] = accept_all) -> tuple[list[object], bytes]:
    """Run all three feedings and assert they give the same events and output."""
    results = [run(make(), pieces, policy) for pieces in splits(data)]
    for other in results[1:]:
        assert other == results[0]
    return results[0]
