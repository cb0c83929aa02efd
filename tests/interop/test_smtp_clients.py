"""SMTP (MX role) against a whole node with real clients: smtplib, swaks, curl.

Each delivery is read back over IMAP (imaplib) from the same node, so the
fakes of the unit tests are checked against the real Directory and MailStore.
"""

from __future__ import annotations

import imaplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import uuid

import pytest

pytestmark = pytest.mark.interop

ALICE = ("alice@example.test", "alice-pw-1234")
BOB = ("bob@example.test", "bob-pw-1234")


def _token() -> str:
    return "tok" + uuid.uuid4().hex[:16]


def _message(token: str, to: str = ALICE[0]) -> bytes:
    return (
        f"From: sender@remote.example\r\nTo: {to}\r\nSubject: {token}\r\n"
        f"Message-ID: <{token}@remote.example>\r\n\r\nbody of {token}\r\n"
    ).encode()


def _fetch_all(node, user: tuple[str, str], token: str, expect: int = 1,
               deadline: float = 15.0) -> list[bytes]:
    """Messages whose Subject contains token, polled until `expect` are there."""
    end = time.monotonic() + deadline
    found: list[bytes] = []
    while True:
        conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
        try:
            conn.login(*user)
            conn.select("INBOX", readonly=True)
            typ, data = conn.search(None, "SUBJECT", token)
            assert typ == "OK"
            found = []
            for num in data[0].split():
                typ, msg = conn.fetch(num, "(BODY.PEEK[])")
                assert typ == "OK"
                found.append(msg[0][1])
        finally:
            conn.logout()
        if len(found) >= expect or time.monotonic() > end:
            return found
        time.sleep(0.1)  # polling with a deadline: IMAP sees only committed state


def _smtp(node) -> smtplib.SMTP:
    return smtplib.SMTP(node.host, node.ports["smtp"], timeout=30)


def _client_tls(node) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=node.cafile)
    ctx.check_hostname = False
    return ctx


def test_smtplib_delivery_read_back_over_imap(postroom_node) -> None:
    node, token = postroom_node, _token()
    with _smtp(node) as s:
        code, ehlo = s.ehlo("client.example")
        assert code == 250
        for kw in (b"PIPELINING", b"SIZE", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES",
                   b"STARTTLS", b"CHUNKING", b"DSN"):
            assert kw in ehlo
        refused = s.sendmail("sender@remote.example", [ALICE[0]], _message(token))
        assert refused == {}
    [raw] = _fetch_all(node, ALICE, token)
    assert raw.startswith(b"Return-Path: <sender@remote.example>\r\nReceived: from client.example")
    assert f"body of {token}".encode() in raw


def test_alias_and_duplicate_recipients_one_copy_each(postroom_node) -> None:
    node, token = postroom_node, _token()
    with _smtp(node) as s:
        refused = s.sendmail("", [ALICE[0], "ALICE@Example.Test", BOB[0], "postmaster"], _message(token))
        assert refused == {}
    assert len(_fetch_all(node, ALICE, token)) == 1
    assert len(_fetch_all(node, BOB, token)) == 1


@pytest.mark.parametrize(
    "rcpt",
    [
        "victim@remote.example",
        "victim%remote.example@example.test",
        "remote.example!victim@example.test",
        '"victim@remote.example"@example.test',
        "alice@[127.0.0.1]",
        "@example.test:victim@remote.example",
    ],
)
def test_no_open_relay(postroom_node, rcpt) -> None:  # RFC 5321 §3.6, promise 5
    with _smtp(postroom_node) as s:
        s.ehlo("client.example")
        s.mail("sender@remote.example")
        code, text = s.docmd(f"RCPT TO:<{rcpt}>")
        assert code in (550, 554) and text.startswith(b"5.7.1"), (code, text)
        code, _ = s.docmd("DATA")
        assert code == 503


def test_unknown_user_and_vrfy(postroom_node) -> None:
    with _smtp(postroom_node) as s:
        s.ehlo("client.example")
        assert s.verify("alice")[0] == 252  # RFC 5321 §3.5.3: never disclose
        s.mail("")
        code, text = s.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")


def test_starttls_then_deliver(postroom_node) -> None:  # RFC 3207
    node, token = postroom_node, _token()
    with _smtp(node) as s:
        s.ehlo("client.example")
        s.starttls(context=_client_tls(node))
        code, ehlo = s.ehlo("client.example")
        assert code == 250 and b"STARTTLS" not in ehlo
        s.sendmail("sender@remote.example", [ALICE[0]], _message(token))
    [raw] = _fetch_all(node, ALICE, token)
    assert b"with ESMTPS (TLSv1." in raw


def test_bdat_with_raw_commands(postroom_node) -> None:  # RFC 3030
    node, token = postroom_node, _token()
    raw = _message(token)
    first, second = raw[:40], raw[40:]
    with _smtp(node) as s:
        s.ehlo("client.example")
        assert s.docmd("MAIL FROM:<sender@remote.example> BODY=BINARYMIME")[0] == 250
        assert s.docmd("RCPT TO:<alice@example.test>")[0] == 250
        s.send(f"BDAT {len(first)}\r\n".encode() + first)
        assert s.getreply()[0] == 250
        s.send(f"BDAT {len(second)}\r\n".encode() + second + b"BDAT 0 LAST\r\n")
        assert s.getreply()[0] == 250
        code, text = s.getreply()
        assert code == 250 and b"accepted" in text
    [got] = _fetch_all(node, ALICE, token)
    assert got.endswith(raw)


def _raw_session(node, payload: bytes) -> bytes:
    """Send payload after the greeting; read until the server closes."""
    with socket.create_connection((node.host, node.ports["smtp"]), timeout=30) as sock:
        assert sock.recv(4096).startswith(b"220 ")
        sock.sendall(payload)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_smuggling_bare_lf_end_is_not_end(postroom_node) -> None:  # CVE-2023-51764 class
    node, token, evil = postroom_node, _token(), _token()
    payload = (
        b"EHLO client.example\r\nMAIL FROM:<sender@remote.example>\r\n"
        b"RCPT TO:<alice@example.test>\r\nDATA\r\n" + _message(token)
        + b"\n.\nMAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        + f"Subject: {evil}\r\n\r\nsmuggled\r\n".encode() + b"\r\n.\r\nQUIT\r\n"
    )
    out = _raw_session(node, payload)
    assert out.count(b"250 2.0.0 message accepted") == 1
    assert out.endswith(b"221 2.0.0 closing connection\r\n")
    [raw] = _fetch_all(node, ALICE, token)
    assert b"smuggled" in raw
    assert _fetch_all(node, BOB, evil, expect=0, deadline=0) == []


def test_pipelined_burst_and_line_too_long(postroom_node) -> None:  # RFC 2920, §4.5.3.1.4
    node = postroom_node
    payload = (b"EHLO c.example\r\nNOOP " + b"x" * 2000 + b"\r\nMAIL FROM:<>\r\n"
               b"RCPT TO:<nobody@example.test>\r\nRSET\r\nQUIT\r\n")
    out = _raw_session(node, payload)
    codes = [line[:3] for line in out.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"250", b"500", b"250", b"550", b"250", b"221"]


def test_message_too_big(node_factory) -> None:  # RFC 1870
    node = node_factory(smtp={"max_message_size": 2000})
    with _smtp(node) as s:
        s.ehlo("client.example")
        assert s.docmd("MAIL FROM:<> SIZE=5000")[0] == 552
        s.rset()
        # Without SIZE= the cap is enforced while streaming and answered at the end.
        assert s.docmd("MAIL FROM:<>")[0] == 250
        assert s.docmd(f"RCPT TO:<{ALICE[0]}>")[0] == 250
        code, _ = s.data(b"Subject: big\r\n\r\n" + (b"z" * 70 + b"\r\n") * 60)
        assert code == 552
        assert s.noop()[0] == 250  # the session goes on


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
@pytest.mark.parametrize("extra", [[], ["--pipeline"], ["--tls"], ["--protocol", "ESMTP"]])
def test_swaks(postroom_node, extra) -> None:
    node, token = postroom_node, _token()
    args = ["swaks", "--server", f"{node.host}:{node.ports['smtp']}", "--to", ALICE[0],
            "--from", "sender@remote.example", "--helo", "client.example",
            "--header", f"Subject: {token}", "--body", f"body of {token}", *extra]
    if "--tls" in extra:
        args += ["--tls-ca-path", node.cafile]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    [raw] = _fetch_all(node, ALICE, token)
    assert f"body of {token}".encode() in raw
    if "--tls" in extra:
        assert b"with ESMTPS" in raw


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_smtp(postroom_node, tmp_path) -> None:
    node, token = postroom_node, _token()
    mail = tmp_path / "mail.eml"
    # A line starting with "." must survive curl's dot-stuffing and our unstuffing.
    mail.write_bytes(_message(token).replace(b"body of", b".dot line\r\nbody of"))
    result = subprocess.run(
        ["curl", "-sS", f"smtp://{node.host}:{node.ports['smtp']}/client.example",
         "--mail-from", "sender@remote.example", "--mail-rcpt", BOB[0],
         "--upload-file", str(mail)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [raw] = _fetch_all(node, BOB, token)
    assert b"\r\n.dot line\r\n" in raw
