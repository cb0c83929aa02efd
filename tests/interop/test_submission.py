"""Submission (587 STARTTLS, 465 implicit TLS) against a whole node with real clients.

smtplib (PLAIN, LOGIN), swaks, and SCRAM-SHA-256 written by hand below
(smtplib has none).  Local deliveries are read back over IMAP; remote ones
must sit in the outbound queue (the test resolver 127.0.0.1:9 answers
nothing, so they stay there).  This checks the fakes of
tests/unit/smtp/test_submission.py against the real directory and store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import imaplib
import re
import secrets
import shutil
import smtplib
import ssl
import subprocess
import time
import uuid

import pytest

pytestmark = pytest.mark.interop

ALICE = ("alice@example.test", "alice-pw-1234")
BOB = ("bob@example.test", "bob-pw-1234")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from tests.support.node import NodeProcess

    n = NodeProcess(tmp_path_factory.mktemp("subnode"),
                    {"submission": {"auth_failure_delay": 0.2, "max_auth_failures": 3}})
    n.start()
    try:
        n.provision()
        result = n.cli("alias", "add", "sales@example.test", "alice@example.test")
        assert result.returncode == 0, result.stderr
        yield n
    finally:
        n.kill() if n.stop() is None else None
        print(n.log_tail(30))


def tls_context(node) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=node.cafile)
    ctx.check_hostname = False  # the self-signed certificate names mx.example.test
    return ctx


def token() -> str:
    return "tok" + uuid.uuid4().hex[:16]


def message(tok: str, sender: str = ALICE[0], to: str = BOB[0], extra: str = "") -> bytes:
    return f"From: {sender}\r\nTo: {to}\r\nSubject: {tok}\r\n{extra}\r\nbody {tok}\r\n".encode()


def submission(node) -> smtplib.SMTP:
    s = smtplib.SMTP(node.host, node.ports["submission"], timeout=30)
    s.ehlo("client.example")
    s.starttls(context=tls_context(node))
    s.ehlo("client.example")
    return s


def fetch(node, user: tuple[str, str], tok: str, deadline: float = 15.0) -> bytes:
    """The message whose Subject has tok, polled until committed."""
    end = time.monotonic() + deadline
    while True:
        conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
        try:
            conn.login(*user)
            conn.select("INBOX", readonly=True)
            typ, data = conn.search(None, "SUBJECT", tok)
            if data[0].split():
                typ, msg = conn.fetch(data[0].split()[0], "(BODY.PEEK[])")
                return msg[0][1]
        finally:
            conn.logout()
        if time.monotonic() > end:
            raise AssertionError(f"{tok} never arrived")
        time.sleep(0.1)  # polling with a deadline


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_starttls_login_local_delivery(node, mechanism):  # RFC 6409, RFC 4954
    tok = token()
    with submission(node) as s:
        assert "SCRAM-SHA-256" in s.esmtp_features["auth"]
        s.user, s.password = ALICE
        code, _ = s.auth(mechanism, getattr(s, f"auth_{mechanism.lower()}"))
        assert code == 235
        assert s.sendmail(ALICE[0], [BOB[0]], message(tok)) == {}
    raw = fetch(node, BOB, tok)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"Return-Path: <alice@example.test>\r\nReceived: from client.example")
    assert b"(authenticated)" in head and b"with ESMTPSA" in head
    assert ALICE[1].encode() not in raw
    assert re.search(rb"\r\nDate: ", head) and re.search(rb"\r\nMessage-ID: <[0-9a-f]+@", head)


def test_implicit_tls_465(node):  # RFC 8314 §3.3
    tok = token()
    with smtplib.SMTP_SSL(node.host, node.ports["submissions"], timeout=30,
                          context=tls_context(node)) as s:
        s.login(*BOB)
        s.sendmail(BOB[0], [ALICE[0]], message(tok, BOB[0], ALICE[0],
                                               extra="Message-ID: <keep@client.example>\r\n"))
    raw = fetch(node, ALICE, tok)
    assert raw.count(b"Message-ID:") == 1 and b"<keep@client.example>" in raw


def test_auth_before_starttls_refused(node):  # RFC 3207 §4 / RFC 8314
    with smtplib.SMTP(node.host, node.ports["submission"], timeout=30) as s:
        s.ehlo("client.example")
        assert not s.has_extn("auth") and s.has_extn("starttls")
        code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice@example.test\0"
                                                                  b"alice-pw-1234").decode())
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        code, text = s.docmd("MAIL", "FROM:<alice@example.test>")
        assert (code, text) == (530, b"5.7.0 Authentication required")


def test_wrong_password_then_too_many(node):  # RFC 4954 §6
    with submission(node) as s:
        for _ in range(2):
            with pytest.raises(smtplib.SMTPAuthenticationError) as err:
                s.user, s.password = ALICE[0], "wrong"
                s.auth("PLAIN", s.auth_plain)
            assert err.value.smtp_code == 535 and err.value.smtp_error.startswith(b"5.7.8")
        s.user, s.password = ALICE[0], "wrong"
        code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice@example.test\0x")
                             .decode())
        assert code == 421 and text.startswith(b"4.7.0")


def test_sender_rules(node):  # RFC 6409 §6.1
    with submission(node) as s:
        s.login(*ALICE)
        code, text = s.mail("bob@example.test")
        assert code == 553
        assert text == b"5.7.1 Sender address rejected: not owned by user alice@example.test"
        assert s.mail("")[0] == 553
        assert s.mail("sales@example.test")[0] == 250  # an alias of alice
        s.rset()
        assert s.mail("ALICE@example.test")[0] == 250
        assert s.rcpt("nobody@example.test")[0] == 550  # unknown local user


def test_remote_recipient_is_queued(node):  # issue 4 §1-2
    tok = token()
    with submission(node) as s:
        s.login(*ALICE)
        s.mail(ALICE[0])
        assert s.rcpt("carol@remote.example")[0] == 250
        code, text = s.data(message(tok, to="carol@remote.example"))
    assert code == 250
    match = re.search(rb"queued as (\S+)", text)
    assert match is not None, text
    queue_id = match.group(1).decode()
    assert f"queued as {queue_id}" in node.log_path.read_text(errors="replace")
    listed, shown = node.cli_many((("queue", "list"), ""), (("queue", "show", queue_id), ""))
    assert queue_id in listed and "carol@remote.example" in listed
    assert "alice@example.test" in shown


def scram_login(s: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """RFC 5802 / RFC 7677 client, by hand; checks the server signature too."""
    nonce = secrets.token_urlsafe(18)
    bare = f"n={user},r={nonce}"
    code, text = s.docmd("AUTH", "SCRAM-SHA-256 " + base64.b64encode(f"n,,{bare}".encode())
                         .decode())
    assert code == 334, (code, text)
    server_first = base64.b64decode(text).decode()
    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    assert attrs["r"].startswith(nonce) and int(attrs["i"]) >= 4096
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                 int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    without = f"c=biws,r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = f"{without},p={base64.b64encode(proof).decode()}"
    code, text = s.docmd(base64.b64encode(final.encode()).decode())
    if code != 334:
        return code, text
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    expected = hmac.new(server_key, auth_message, "sha256").digest()
    assert base64.b64decode(text) == b"v=" + base64.b64encode(expected)
    return s.docmd("")


def test_scram_sha256_by_hand(node):  # RFC 7677
    tok = token()
    with submission(node) as s:
        assert scram_login(s, ALICE[0], "wrong")[0] == 535
        assert scram_login(s, "nobody@example.test", "x")[0] == 535
        assert scram_login(s, *ALICE) == (235, b"2.7.0 Authentication successful")
        s.sendmail(ALICE[0], [BOB[0]], message(tok))
    fetch(node, BOB, tok)


def test_scram_after_passwd_uses_new_password(node):
    result = node.cli("user", "passwd", BOB[0], input="bob-new-pw-5678\n")
    assert result.returncode == 0, result.stderr
    try:
        deadline = time.monotonic() + 10
        while True:  # the node's directory cache follows etcd by watch
            with submission(node) as s:
                if scram_login(s, BOB[0], "bob-new-pw-5678")[0] == 235:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with submission(node) as s:
            assert scram_login(s, *BOB)[0] == 535
    finally:
        node.cli("user", "passwd", BOB[0], input=BOB[1] + "\n")


SWAKS = shutil.which("swaks")


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_tls_auth(node, mechanism):
    tok = token()
    result = subprocess.run(
        [SWAKS, "--server", node.host, "--port", str(node.ports["submission"]), "--tls",
         "--auth", mechanism, "--auth-user", ALICE[0], "--auth-password", ALICE[1],
         "--from", ALICE[0], "--to", BOB[0], "--header", f"Subject: {tok}",
         "--helo", "swaks.example"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    fetch(node, BOB, tok)


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
def test_swaks_auth_without_tls_refused(node):
    result = subprocess.run(
        [SWAKS, "--server", node.host, "--port", str(node.ports["submission"]),
         "--auth", "PLAIN", "--auth-user", ALICE[0], "--auth-password", ALICE[1],
         "--from", ALICE[0], "--to", BOB[0], "--helo", "swaks.example"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    # No AUTH keyword before STARTTLS (RFC 4954 §4), so swaks gives up before MAIL.
    assert "did not advertise authentication" in result.stderr
    assert "235" not in result.stdout and "MAIL FROM" not in result.stdout


def test_queued_copy_is_dkim_signed(node):  # issue 4 §6: signed once, at submission
    generated = node.cli("dkim", "generate", "example.test", "--selector", "sub1")
    assert generated.returncode == 0, generated.stderr
    deadline = time.monotonic() + 15
    while True:  # the node's key cache follows etcd by watch
        with submission(node) as s:
            s.login(*ALICE)
            s.mail(ALICE[0])
            s.rcpt("dave@remote.example")
            code, text = s.data(message(token(), to="dave@remote.example"))
        assert code == 250
        queue_id = text.decode().rsplit(" ", 1)[1]
        shown = node.cli("queue", "show", queue_id)
        assert shown.returncode == 0, shown.stderr
        if "DKIM-Signature" in shown.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    headers = shown.stdout
    assert headers.count("DKIM-Signature:") == 2, headers  # RSA and Ed25519
    assert "a=rsa-sha256" in headers and "a=ed25519-sha256" in headers
    assert "d=example.test" in headers and "s=sub1" in headers
    assert "Return-Path" not in headers and "(authenticated)" in headers
