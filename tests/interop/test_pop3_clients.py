"""POP3 against a whole node with real clients: poplib, curl, fetchmail.

Messages go in through the node's own SMTP listener; what POP3 returns must be
the stored message byte for byte (the node prepends its trace headers, so the
submitted message is a suffix of it).
"""

from __future__ import annotations

import base64
import poplib
import shutil
import smtplib
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

ALICE, ALICE_PW = "alice@example.test", "alice-pw-1234"
BOB, BOB_PW = "bob@example.test", "bob-pw-1234"


def message(tag: str, extra: bytes = b"") -> bytes:
    return (
        f"From: carol@example.org\r\nTo: {BOB}\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@example.org>\r\n\r\n".encode()
        + b"Hello.\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n"
        + extra
    )


def deliver(node, to: str, raw: bytes) -> None:  # type: ignore[no-untyped-def]
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=30) as smtp:
        smtp.sendmail("carol@example.org", [to], raw)


def connect(node, user: str = BOB, password: str = BOB_PW) -> poplib.POP3:  # type: ignore[no-untyped-def]
    pop = poplib.POP3(node.host, node.ports["pop3"], timeout=30)
    pop.user(user)
    pop.pass_(password)
    return pop


def retrieve_all(pop: poplib.POP3) -> list[bytes]:
    count, _ = pop.stat()
    return [b"\r\n".join(pop.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]


def wait_for_count(node, user: str, password: str, count: int) -> None:  # type: ignore[no-untyped-def]
    """Poll (new sessions: the maildrop is a login snapshot) until `count` messages."""
    deadline = time.monotonic() + 30
    while True:
        pop = connect(node, user, password)
        try:
            if pop.stat()[0] >= count:
                return
        finally:
            pop.quit()
        assert time.monotonic() < deadline, f"{user} never had {count} messages"
        time.sleep(0.05)


def empty_maildrop(node, user: str, password: str) -> None:  # type: ignore[no-untyped-def]
    pop = connect(node, user, password)
    for i in range(1, pop.stat()[0] + 1):
        pop.dele(i)
    pop.quit()


@pytest.fixture
def bob(postroom_node):  # type: ignore[no-untyped-def]
    """Bob's maildrop, empty at the start of each test."""
    empty_maildrop(postroom_node, BOB, BOB_PW)
    return postroom_node


def test_poplib_user_pass_stat_list_uidl_top_retr(bob) -> None:  # type: ignore[no-untyped-def]
    raws = [message(f"m{i}-{uuid.uuid4().hex}") for i in range(2)]
    for raw in raws:
        deliver(bob, BOB, raw)
    wait_for_count(bob, BOB, BOB_PW, 2)
    pop = poplib.POP3(bob.host, bob.ports["pop3"], timeout=30)
    caps = pop.capa()  # RFC 2449 §5, in AUTHORIZATION state
    for cap in ("TOP", "UIDL", "USER", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", "STLS"):
        assert cap in caps
    assert caps["SASL"] == ["PLAIN"] and caps["IMPLEMENTATION"] == ["postroom"]
    pop.user(BOB)
    pop.pass_(BOB_PW)
    assert "USER" not in pop.capa() and "TOP" in pop.capa()  # TRANSACTION state
    count, size = pop.stat()
    assert count == 2
    listing = pop.list()[1]
    assert [int(line.split()[0]) for line in listing] == [1, 2]
    assert sum(int(line.split()[1]) for line in listing) == size
    uids = [line.split()[1] for line in pop.uidl()[1]]
    assert len(set(uids)) == 2
    got = retrieve_all(pop)
    for raw, stored in zip(raws, got, strict=True):
        assert stored.endswith(raw)  # byte-identical apart from trace headers
    listed = {int(n): int(s) for n, s in (line.split() for line in listing)}
    assert listed == {i: len(g) for i, g in enumerate(got, 1)}  # RFC 1939 §5 exact size
    top = pop.top(1, 1)[1]
    assert top[-1] == b"Hello." and b"" in top
    pop.quit()
    # UIDL is stable across sessions (RFC 1939 §7).
    pop = connect(bob)
    assert [line.split()[1] for line in pop.uidl()[1]] == uids
    pop.quit()


def test_auth_plain_raw_commands(bob) -> None:  # type: ignore[no-untyped-def]
    pop = poplib.POP3(bob.host, bob.ports["pop3"], timeout=30)
    token = base64.b64encode(f"\0{BOB}\0{BOB_PW}".encode()).decode()
    assert pop._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK")
    pop.quit()
    pop = poplib.POP3(bob.host, bob.ports["pop3"], timeout=30)
    pop._putcmd("AUTH PLAIN")
    assert pop._getline()[0] == b"+ "
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop._shortcmd(base64.b64encode(f"\0{BOB}\0wrong".encode()).decode())
    pop.quit()


def test_wrong_password_gets_auth_code(bob) -> None:  # type: ignore[no-untyped-def]
    pop = poplib.POP3(bob.host, bob.ports["pop3"], timeout=30)
    pop.user(BOB)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        pop.pass_("not-the-password")
    pop.quit()


def test_dele_quit_deletes_and_dele_drop_keeps(bob) -> None:  # type: ignore[no-untyped-def]
    for i in range(3):
        deliver(bob, BOB, message(f"d{i}-{uuid.uuid4().hex}"))
    wait_for_count(bob, BOB, BOB_PW, 3)
    # Dropped connection: nothing deleted (RFC 1939 §6 happens only at QUIT).
    pop = connect(bob)
    pop.dele(1)
    pop.dele(2)
    pop.sock.close()
    pop = None
    deadline = time.monotonic() + 10
    while True:  # the server notices the drop and releases the maildrop lock
        try:
            pop = connect(bob)
            break
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0] and time.monotonic() < deadline
            time.sleep(0.05)
    assert pop.stat()[0] == 3
    uids = [line.split()[1] for line in pop.uidl()[1]]
    pop.dele(2)
    assert pop.quit().startswith(b"+OK")
    pop = connect(bob)
    assert [line.split()[1] for line in pop.uidl()[1]] == [uids[0], uids[2]]
    pop.quit()


def test_second_session_gets_in_use(bob) -> None:  # type: ignore[no-untyped-def]
    first = connect(bob)
    second = poplib.POP3(bob.host, bob.ports["pop3"], timeout=30)
    second.user(BOB)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[IN-USE\]"):
        second.pass_(BOB_PW)
    first.quit()
    second.user(BOB)
    assert second.pass_(BOB_PW).startswith(b"+OK")
    second.quit()


def test_mail_delivered_during_session_waits_for_next_session(bob) -> None:  # type: ignore[no-untyped-def]
    pop = connect(bob)
    assert pop.stat()[0] == 0
    deliver(bob, BOB, message(f"late-{uuid.uuid4().hex}"))
    assert pop.stat()[0] == 0  # RFC 1939 §4: the maildrop is fixed at login
    pop.quit()
    wait_for_count(bob, BOB, BOB_PW, 1)


def tls_context(node) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    return ssl.create_default_context(cafile=node.cafile)


def test_pop3s_implicit_tls(bob) -> None:  # type: ignore[no-untyped-def]
    raw = message(f"tls-{uuid.uuid4().hex}")
    deliver(bob, BOB, raw)
    wait_for_count(bob, BOB, BOB_PW, 1)
    pop = poplib.POP3_SSL(bob.host, bob.ports["pop3s"], context=tls_context(bob), timeout=30)
    assert "STLS" not in pop.capa()
    pop.user(BOB)
    pop.pass_(BOB_PW)
    assert retrieve_all(pop)[0].endswith(raw)
    pop.quit()


def test_plaintext_refused_without_loopback_exemption_then_stls(node_factory) -> None:  # type: ignore[no-untyped-def]
    # RFC 2595 §2.3, RFC 3206 §5 ([AUTH]); RFC 2595 §4 STLS.
    node = node_factory(node={"allow_plaintext_auth_on_loopback": False})
    pop = poplib.POP3(node.host, node.ports["pop3"], timeout=30)
    caps = pop.capa()
    assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        pop.user(ALICE)
    pop.stls(tls_context(node))
    caps = pop.capa()
    assert "STLS" not in caps and "USER" in caps
    pop.user(ALICE)
    assert pop.pass_(ALICE_PW).startswith(b"+OK")
    pop.quit()


def test_curl_lists_and_retrieves(bob, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if not shutil.which("curl"):
        pytest.fail("curl is required (apt-get install curl)")
    raw = message(f"curl-{uuid.uuid4().hex}")
    deliver(bob, BOB, raw)
    wait_for_count(bob, BOB, BOB_PW, 1)
    url = f"pop3://{bob.host}:{bob.ports['pop3']}/"
    base = ["curl", "-sS", "--max-time", "30", "--user", f"{BOB}:{BOB_PW}"]
    listing = subprocess.run([*base, url], capture_output=True, check=True, timeout=60)
    assert listing.stdout.split(b"\r\n")[0].startswith(b"1 ")
    out = tmp_path / "msg"
    subprocess.run([*base, "-o", str(out), url + "1"], capture_output=True, check=True, timeout=60)
    assert out.read_bytes().endswith(raw)
    # Over implicit TLS too, with the node's certificate.
    tls_url = f"pop3s://{bob.host}:{bob.ports['pop3s']}/1"
    got = subprocess.run(
        [*base, "--cacert", bob.cafile, tls_url], capture_output=True, check=True, timeout=60
    )
    assert got.stdout.endswith(raw)


def test_fetchmail_downloads_byte_identical(bob, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if not shutil.which("fetchmail"):
        pytest.fail("fetchmail is required (apt-get install fetchmail)")
    raws = [
        message(f"fm{i}-{uuid.uuid4().hex}", extra=(b".x" * 35 + b"\r\n") * i * 200)
        for i in range(3)
    ]
    for raw in raws:
        deliver(bob, BOB, raw)
    wait_for_count(bob, BOB, BOB_PW, 3)
    pop = connect(bob)
    stored = retrieve_all(pop)
    pop.quit()
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll {bob.host} service {bob.ports['pop3']} protocol pop3 uidl\n"
        f'  user "{BOB}" password "{BOB_PW}" is "tester" here\n'
        f"  sslproto '' nokeep\n"
        f"  mda \"sh -c 'cat > {outdir}/msg.$$'\"\n"
    )
    rc.chmod(0o600)
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "FETCHMAILHOME": str(tmp_path)}
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "--nodetach", "--nosyslog", "-v"],
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    files = sorted(outdir.iterdir())
    assert len(files) == 3
    got = sorted(strip_fetchmail_headers(f.read_bytes()) for f in files)
    want = sorted(s.replace(b"\r\n", b"\n") for s in stored)  # the MDA gets LF lines
    assert got == want
    # nokeep: fetchmail's DELE + QUIT removed them.
    pop = connect(bob)
    assert pop.stat()[0] == 0
    pop.quit()


def strip_fetchmail_headers(data: bytes) -> bytes:
    """Drop the one Received field fetchmail adds (it keeps Return-Path first)."""
    lines = data.split(b"\n")
    for start, line in enumerate(lines):
        if not line.startswith(b"Received: "):
            continue
        end = start + 1
        while lines[end][:1] in (b" ", b"\t"):
            end += 1
        if b"fetchmail" in b"\n".join(lines[start:end]):
            return b"\n".join(lines[:start] + lines[end:])
    raise AssertionError(f"no fetchmail Received field in {data[:300]!r}")
