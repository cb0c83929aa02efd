"""Property tests of the SMTP core (RFC 5321 / 3030 / 2920 / 3207).

For every state and any input the core only yields its own events or raises
its own error types, and always ends in a valid State.  Splitting the input
differently never changes the events.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

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
    SmtpProtocolError,
    State,
)
from tests.unit.smtp.corelib import accept_all, run

# Inputs that put the core into each state before the random part.
PREFIX = {
    State.START: b"",
    State.READY: b"EHLO a\r\n",
    State.MAIL: b"EHLO a\r\nMAIL FROM:<>\r\n",
    State.RCPT: b"EHLO a\r\nMAIL FROM:<>\r\nRCPT TO:<b@c>\r\n",
    State.CHUNKING: b"EHLO a\r\nMAIL FROM:<>\r\nRCPT TO:<b@c>\r\nBDAT 1\r\nx",
    State.DATA: b"EHLO a\r\nMAIL FROM:<>\r\nRCPT TO:<b@c>\r\nDATA\r\n",
    State.BDAT: b"EHLO a\r\nMAIL FROM:<>\r\nRCPT TO:<b@c>\r\nBDAT 100\r\n",
    State.TLS: b"EHLO a\r\nSTARTTLS\r\n",
    State.CLOSED: b"QUIT\r\n",
}

VERBS = [b"EHLO a", b"HELO a", b"MAIL FROM:<>", b"RCPT TO:<b@c>", b"DATA", b"BDAT 3",
         b"BDAT 0 LAST", b"BDAT 2 LAST", b"RSET", b"NOOP", b"QUIT", b"VRFY x", b"EXPN x",
         b"HELP", b"STARTTLS", b"AUTH PLAIN", b"BDAT", b"BDAT -1", b"XYZZY", b"."]
pieces = st.one_of(
    st.sampled_from(VERBS).map(lambda v: v + b"\r\n"),
    st.sampled_from([b"\r\n", b"\n", b"\r", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"..", b"\x00"]),
    st.binary(max_size=40),
)
inputs = st.lists(pieces, max_size=30).map(b"".join)


def small() -> SmtpCore:
    return SmtpCore(max_command_length=64, max_line_length=80, max_message_size=300)


def test_prefixes_reach_their_states():
    for state, prefix in PREFIX.items():
        core = small()
        run(core, [prefix], lambda ev: R.OK if isinstance(ev, BdatEnd) else accept_all(ev))
        assert core.state is state, state


@settings(max_examples=300, deadline=None)
@given(state=st.sampled_from(list(State)), data=inputs,
       reply_negative=st.lists(st.booleans(), max_size=60))
def test_any_input_in_any_state(state, data, reply_negative):
    core = small()
    run(core, [PREFIX[state]])
    negatives = iter(reply_negative)

    def policy(ev):
        reply = accept_all(ev)
        # Randomly refuse commands, as a session might.
        if isinstance(ev, Command) and next(negatives, False) and ev.verb != "QUIT":
            return R.BAD_SEQUENCE
        return reply

    try:
        core.receive_data(data)
        while True:
            ev = core.next_event()
            if ev is NEED_DATA:
                break
            assert ev is not PAUSED
            assert isinstance(ev, Command | ProtocolViolation | DataChunk | DataEnd | BdatEnd)
            if isinstance(ev, DataChunk):
                continue
            core.respond(policy(ev))
            assert isinstance(core.state, State)
    except SmtpProtocolError:
        pass
    assert isinstance(core.state, State)
    assert core.buffered <= len(PREFIX[state]) + len(data)


@settings(max_examples=200, deadline=None)
@given(data=inputs, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10))
def test_split_invariance(data, cuts):
    data = PREFIX[State.DATA] + data
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    parts = [data[a:b] for a, b in zip(points, points[1:], strict=False)]
    # What STARTTLS discards depends on what had arrived; everything else must not.
    def strip(result):
        events, out = result
        return [Command(e.verb, e.args) if isinstance(e, Command) else e for e in events], out

    assert strip(run(small(), [data])) == strip(run(small(), parts))


@settings(max_examples=200, deadline=None)
@given(body=st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b),
                     max_size=20))
def test_dot_stuffing_round_trip(body):  # RFC 5321 §4.5.2
    lines = [line for line in body]
    stuffed = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    core = SmtpCore()
    events, _ = run(core, [PREFIX[State.DATA] + stuffed + b".\r\n"])
    got = b"".join(e.data for e in events if isinstance(e, DataChunk))
    assert got == b"".join(ln + b"\r\n" for ln in lines)
    assert sum(isinstance(e, DataEnd) for e in events) == 1
