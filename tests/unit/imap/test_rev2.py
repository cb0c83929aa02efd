"""IMAP4rev2 session extensions against the in-memory fakes: ENABLE, ID,
NAMESPACE, UNSELECT, MOVE, LITERAL+/LITERAL-, APPENDLIMIT (each test names
its RFC section)."""

from __future__ import annotations

import pytest

from tests.unit.imap.fakes import FakeStore
from tests.unit.imap.helpers import MESSAGE, Client

A = "alice@example.test"


@pytest.fixture(params=["whole", "bytes", "random"])
def client(request) -> Client:
    return Client(split=request.param)


def _caps(line: bytes) -> set[bytes]:
    return set(line.split(b"]")[0].split()[2:]) if line.startswith(b"* OK [") else set(
        line.split()[2:]
    )


def test_capabilities_before_and_after_login(client: Client) -> None:
    # RFC 9051 §6.1.1 / RFC 7888 §4-§5: LITERAL- bounds non-synchronizing
    # literals before login, LITERAL+ after; RFC 7889 §3 APPENDLIMIT.
    caps = _caps(client.greeting)
    for atom in (b"IMAP4rev1", b"IMAP4rev2", b"ENABLE", b"ID", b"NAMESPACE", b"UNSELECT",
                 b"MOVE", b"BINARY", b"LITERAL-", b"COMPRESS=DEFLATE"):
        assert atom in caps
    assert any(c.startswith(b"APPENDLIMIT=") for c in caps)
    assert b"LITERAL+" not in caps
    client.login()
    after = _caps(client.cmd("c CAPABILITY")[0])
    assert b"LITERAL+" in after and b"LITERAL-" not in after


def test_enable_imap4rev2(client: Client) -> None:
    # RFC 5161 §3.1 / RFC 9051 §6.3.1: ENABLED lists what was newly enabled;
    # unknown names are ignored; only valid in the authenticated state.
    assert client.cmd("e ENABLE IMAP4rev2")[-1] == b"e BAD ENABLE not allowed now"
    client.login()
    assert client.cmd("e ENABLE imap4rev2 X-UNKNOWN") == [
        b"* ENABLED IMAP4rev2", b"e OK ENABLE completed"]
    assert client.cmd("e ENABLE IMAP4rev2") == [b"* ENABLED", b"e OK ENABLE completed"]
    assert client.cmd("e ENABLE")[-1].startswith(b"e BAD")
    client.cmd("s SELECT INBOX")
    assert client.cmd("e ENABLE IMAP4rev2")[-1] == b"e BAD ENABLE not allowed now"


def test_id(client: Client) -> None:
    # RFC 2971 §3.1-§3.3: any state; NIL or field/value pairs, bounded.
    lines = client.cmd('i ID ("name" "Thunderbird" "version" "115.0" "os" NIL)')
    assert lines[0].startswith(b'* ID ("name" "postroom"')
    assert lines[-1] == b"i OK ID completed"
    assert client.cmd("i ID NIL")[-1] == b"i OK ID completed"
    many = " ".join(f'"f{i}" "v"' for i in range(31))
    assert client.cmd(f"i ID ({many})")[-1].startswith(b"i BAD")
    assert client.cmd(f'i ID ("{"x" * 31}" "v")')[-1].startswith(b"i BAD")
    assert client.cmd(f'i ID ("name" {{1025}}\r\n{"v" * 1025})')[-1].startswith(b"i BAD")


def test_namespace(client: Client) -> None:
    # RFC 2342 §5 / RFC 9051 §6.3.10: one personal namespace.
    client.login()
    assert client.cmd("n NAMESPACE") == [
        b'* NAMESPACE (("" "/")) NIL NIL', b"n OK NAMESPACE completed"]


def test_unselect_does_not_expunge(client: Client) -> None:
    # RFC 3691 §2 / RFC 9051 §6.4.2.
    client.login()
    client.deliver(flags=("\\Deleted",))
    client.cmd("s SELECT INBOX")
    assert client.cmd("u UNSELECT") == [b"u OK UNSELECT completed"]
    assert len(client.store.messages(A, "INBOX")) == 1
    assert client.cmd("f FETCH 1 FLAGS")[-1] == b"f BAD FETCH not allowed now"
    assert client.cmd("u UNSELECT")[-1] == b"u BAD UNSELECT not allowed now"


def test_move_sends_copyuid_then_expunge(client: Client) -> None:
    # RFC 6851 §3.3 and §4.3: untagged OK [COPYUID] before the EXPUNGEs.
    client.login()
    for _ in range(3):
        client.deliver(flags=("\\Flagged",))
    client.cmd("s SELECT INBOX")
    lines = client.cmd("m MOVE 1,3 Archive")
    uv = client.store.status(A, "Archive").uidvalidity
    assert lines == [
        f"* OK [COPYUID {uv} 1,3 1:2] moved".encode(),
        b"* 3 EXPUNGE",
        b"* 1 EXPUNGE",
        b"m OK MOVE completed",
    ]
    assert [r.uid for r in client.store.messages(A, "INBOX")] == [2]
    assert all(r.flags == {"\\Flagged"} for r in client.store.messages(A, "Archive"))
    lines = client.cmd("m UID MOVE 2 Archive")
    assert lines == [f"* OK [COPYUID {uv} 2 3] moved".encode(), b"* 1 EXPUNGE",
                     b"m OK UID MOVE completed"]
    assert client.cmd("m UID MOVE 2 Archive") == [b"m OK UID MOVE completed"]


def test_move_errors(client: Client) -> None:
    # RFC 6851 §3.3: TRYCREATE for a missing target, nothing moved; a
    # read-only mailbox cannot lose messages; bad numbers are BAD.
    client.login()
    client.deliver()
    client.cmd("s SELECT INBOX")
    assert client.cmd("m MOVE 1 Nope")[-1] == b"m NO [TRYCREATE] no such mailbox"
    assert client.cmd("m MOVE 5 Archive")[-1].startswith(b"m BAD")
    client.cmd("e EXAMINE INBOX")
    assert client.cmd("m MOVE 1 Archive")[-1].startswith(b"m NO [READ-ONLY]")
    assert len(client.store.messages(A, "INBOX")) == 1


def test_move_seen_by_another_session() -> None:
    # RFC 6851 §4.4 / RFC 9051 §7.5.1: the other session gets EXPUNGE at its
    # next sync point, the target mailbox's session gets EXISTS.
    store = FakeStore()
    a, b, c = Client(store), Client(store), Client(store)
    for x in (a, b, c):
        x.login()
    a.deliver()
    a.cmd("s SELECT INBOX")
    b.cmd("s SELECT INBOX")
    c.cmd("s SELECT Archive")
    a.cmd("m MOVE 1 Archive")
    assert b.cmd("n NOOP") == [b"* 1 EXPUNGE", b"n OK NOOP completed"]
    assert c.cmd("n NOOP") == [b"* 1 EXISTS", b"n OK NOOP completed"]


def test_move_within_the_selected_mailbox(client: Client) -> None:
    # RFC 6851 §3.3: the new copy is reported (EXISTS) and the old one expunged.
    client.login()
    client.deliver()
    client.cmd("s SELECT INBOX")
    lines = client.cmd("m MOVE 1 INBOX")
    assert lines[0].endswith(b" 1 2] moved") and lines[-1] == b"m OK MOVE completed"
    assert b"* 2 EXISTS" in lines and b"* 1 EXPUNGE" in lines
    assert lines.index(b"* 2 EXISTS") < lines.index(b"* 1 EXPUNGE")


def test_literal_plus_after_login(client: Client) -> None:
    # RFC 7888 §4: no continuation request for {n+}.
    client.login()
    out = client.feed(b"a APPEND INBOX {%d+}\r\n" % len(MESSAGE) + MESSAGE + b"\r\n")
    assert b"+ " not in out and b"a OK [APPENDUID " in out


def test_literal_minus_before_login() -> None:
    # RFC 7888 §5: before login only LITERAL-: a non-synchronizing literal
    # of at most 4096 octets is fine, a larger one ends the session.
    c = Client()
    out = c.feed(b'l LOGIN {18+}\r\nalice@example.test "alice-pw-1234"\r\n')
    assert out.startswith(b"l OK ")
    c = Client()
    out = c.feed(b"l LOGIN {5000+}\r\n")
    assert out.startswith(b"* BYE ") and c.session.closed


def test_appendlimit_too_big_is_no() -> None:
    # RFC 7889 §4: an APPEND over the limit is NO [TOOBIG], before the data.
    c = Client(imap={"max_literal_size": 1000})
    c.login()
    assert b"APPENDLIMIT=1000" in c.cmd("c CAPABILITY")[0]
    out = c.feed(b"a APPEND INBOX {2000}\r\n")
    assert out == b"a NO [TOOBIG] message too large\r\n"
    # Other commands with an over-size literal stay BAD (RFC 3501 §7.1.3).
    assert c.feed(b"b CREATE {2000}\r\n") == b"b BAD [TOOBIG] literal too large\r\n"
    assert c.cmd("n NOOP") == [b"n OK NOOP completed"]
