"""Property tests of the POP3 core and session (hypothesis).

- every (state, input line) gives a Command or a BadInput, never an exception;
- framing does not depend on how the bytes were split;
- dot-stuffing round-trips and never forges the terminator (RFC 1939 §3);
- a session answers any input sequence with well-formed replies only.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.pop3 import protocol as p
from node.pop3.locks import MaildropLocks
from node.pop3.session import Pop3Session
from tests.unit.pop3.fakes import FakeStore, make_ctx

KEYWORDS = sorted(p.COMMANDS) + ["APOP", "XTND", ""]
states = st.sampled_from([p.State.AUTHORIZATION, p.State.TRANSACTION, p.State.UPDATE])
words = st.one_of(
    st.sampled_from(["1", "2", "0", "99", "-1", "x", "PLAIN", "=", "*", "alice@example.test"]),
    st.text(max_size=12),
)
lines = st.one_of(
    st.builds(
        lambda k, args, lower: (k.lower() if lower else k) + "".join(" " + a for a in args),
        st.sampled_from(KEYWORDS),
        st.lists(words, max_size=3),
        st.booleans(),
    ).map(lambda s: s.encode("utf-8", "surrogatepass").replace(b"\n", b"")),
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
)


def conn_in(state: p.State) -> p.Pop3Connection:
    conn = p.Pop3Connection(128)
    if state is not p.State.AUTHORIZATION:
        conn.transition(p.State.TRANSACTION)
    if state is p.State.UPDATE:
        conn.transition(p.State.UPDATE)
    return conn


@given(states, lines)
def test_every_state_and_line_gives_a_command_or_an_error(state: p.State, line: bytes) -> None:
    conn = conn_in(state)
    conn.receive_data(line + b"\r\n")
    ev = conn.next_event()
    if isinstance(ev, p.Command):
        assert ev.name in p.LEGAL[state]
        syntax = p.COMMANDS[ev.name]
        assert syntax.min_args <= len(ev.args) <= syntax.max_args
    else:
        assert isinstance(ev, p.BadInput) and not ev.reply.ok
    assert conn.next_event() is p.NEED_DATA


@given(st.binary(max_size=600), st.lists(st.integers(1, 600), max_size=10))
def test_framing_is_independent_of_splits(data: bytes, cuts: list[int]) -> None:
    def run(pieces: list[bytes]) -> list[object]:
        conn = p.Pop3Connection(64)
        out: list[object] = []
        for piece in pieces:
            conn.receive_data(piece)
            while (ev := conn.next_event()) is not p.NEED_DATA:
                out.append(ev)
        return out

    points = sorted({c for c in cuts if c < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert run(pieces) == run([data]) == run([data[i : i + 1] for i in range(len(data))])


bodies = st.lists(
    st.one_of(
        st.sampled_from([b".", b"..", b"\r\n", b"\n", b"\r", b".\r\n", b"\r\n.\r\n", b"x"]),
        st.binary(max_size=20),
    ),
    max_size=30,
).map(b"".join)


def poplib_style_unstuff(wire: bytes) -> bytes:
    """An independent client: split on LF, stop at ".", drop one leading dot."""
    out = []
    for line in [x + b"\n" for x in wire.split(b"\n")[:-1]]:  # like readline()
        if line in (b".\r\n", b".\n"):
            return b"".join(out)
        out.append(line[1:] if line.startswith(b"..") else line)
    raise AssertionError("no terminator")


@given(bodies, st.integers(1, 64))
def test_dot_stuffing_round_trip(body: bytes, chunk: int) -> None:
    wire = b"".join(p.multiline(p.ok(), [body], chunk_size=chunk))
    assert wire.startswith(b"+OK\r\n")
    payload = wire[len(b"+OK\r\n") :]
    expected = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    assert p.unstuff(payload) == expected
    # The terminator appears exactly once, at the end, for CRLF and LF clients.
    assert payload.endswith(b".\r\n")
    assert poplib_style_unstuff(payload) == expected
    assert (b"\r\n" + payload).find(b"\r\n.\r\n") == len(payload) - 3


@settings(max_examples=150, deadline=None)
@given(st.lists(lines, max_size=25), st.booleans())
def test_session_answers_every_sequence_with_valid_replies(seq: list[bytes], secure: bool) -> None:
    store = FakeStore()
    store.append("alice@example.test", "INBOX", b"Subject: a\r\n\r\n.x\r\n")
    store.append("alice@example.test", "INBOX", b"Subject: b\r\n\r\nbody\r\n")
    ctx = make_ctx(store=store, pop3={"auth_failure_delay": 0.0})
    session = Pop3Session(ctx, "127.0.0.1", secure=secure, locks=MaildropLocks())
    prefix = [b"USER alice@example.test", b"PASS alice-pw-1234"] if secure else []
    for line in prefix + seq:
        session.receive_data(line + b"\r\n")
        while (r := session.next_response()) is not None:
            data = b"".join(r.chunks)
            assert data.startswith((b"+OK", b"-ERR", b"+ \r\n")), data
            assert data.endswith(b"\r\n")
            if r.close:
                session.close()
                return
    session.close()
