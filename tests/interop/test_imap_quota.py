"""QUOTA end to end (RFC 9208): `postroom user quota` in etcd, GETQUOTAROOT
over imaplib, NO [OVERQUOTA] at APPEND, 552 5.2.2 at SMTP RCPT and DATA;
and METADATA (RFC 5464) and LIST-STATUS (RFC 5819) over imaplib."""

from __future__ import annotations

import imaplib
import smtplib
import time

import pytest

pytestmark = pytest.mark.interop

CAROL = ("carol@example.test", "carol-pw-1234")
for _name in ("GETMETADATA", "SETMETADATA"):  # RFC 5464, unknown to imaplib
    imaplib.Commands.setdefault(_name, ("AUTH", "SELECTED"))


def _message(subject: str, size: int) -> bytes:
    head = (f"From: bob@example.test\r\nTo: {CAROL[0]}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.test>\r\n\r\n").encode()
    body = b"x" * (size - len(head))
    lines = [body[i : i + 70] for i in range(0, len(body), 72)]  # 70 + CRLF per line
    raw = head + b"\r\n".join(lines)
    return raw[:size]


def _quotaroot(conn: imaplib.IMAP4) -> list[bytes]:
    typ, data = conn._simple_command("GETQUOTAROOT", "INBOX")
    assert typ == "OK", data
    _, quota = conn._untagged_response(typ, data, "QUOTA")
    return [q for q in quota if q is not None]


def _until(check, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def carol(postroom_node):
    postroom_node.add_user(*CAROL)
    return postroom_node


def test_quota_cli_imap_and_smtp(carol) -> None:
    node = carol
    done, shown, lots = node.cli_batch(  # one CLI process: node.cli.main per command
        [(["--config", str(node.config_path), "user", "quota", CAROL[0], *size], "")
         for size in (["4K"], [], ["lots"])])
    assert done["rc"] == 0, done["stderr"]
    assert "4096" in done["stdout"]
    assert shown["stdout"].strip() == f"{CAROL[0]}: 4096"
    assert lots["rc"] != 0

    conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    try:
        conn.login(*CAROL)
        assert b"QUOTA" in conn.capability()[1][0].split()
        # The node's directory sees the change through its etcd watch.
        _until(lambda: _quotaroot(conn), "the quota to reach the node")
        assert _quotaroot(conn) == [b'"" (STORAGE 0 4)']  # RFC 9208 §4.1.2
        first = _message("first", 3000)
        assert conn.append("INBOX", None, None, first)[0] == "OK"
        assert _quotaroot(conn) == [b'"" (STORAGE 3 4)']
        typ, data = conn.append("INBOX", None, None, _message("second", 3000))
        assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]")  # RFC 9208 §4.3

        # SMTP: this message would exceed the quota -> 552 5.2.2 at the end of DATA.
        with smtplib.SMTP(node.host, node.ports["smtp"], timeout=30) as s:
            with pytest.raises(smtplib.SMTPDataError) as info:
                s.sendmail("bob@example.test", [CAROL[0]], _message("smtp", 2000))
            assert info.value.smtp_code == 552 and info.value.smtp_error.startswith(b"5.2.2")

        # At or over the limit: refused per recipient at RCPT.
        assert node.cli("user", "quota", CAROL[0], "2K").returncode == 0
        _until(lambda: _quotaroot(conn) == [b'"" (STORAGE 3 2)'], "the lower quota")
        with smtplib.SMTP(node.host, node.ports["smtp"], timeout=30) as s:
            refused = s.sendmail("bob@example.test", [CAROL[0], "alice@example.test"],
                                 _message("partial", 500))
        assert refused == {CAROL[0]: (552, b"5.2.2 mailbox full")}

        # 0 = no limit: no quota root any more, and delivery works again.
        assert node.cli("user", "quota", CAROL[0], "0").returncode == 0
        _until(lambda: not _quotaroot(conn), "the quota to be lifted")
        assert conn.append("INBOX", None, None, _message("third", 3000))[0] == "OK"
    finally:
        conn.logout()


def test_metadata_and_list_status_over_imaplib(carol) -> None:
    node = carol
    conn = imaplib.IMAP4(node.host, node.ports["imap"], timeout=30)
    try:
        conn.login(*CAROL)
        typ, data = conn._simple_command("SETMETADATA", "INBOX", '(/private/comment "my inbox")')
        assert typ == "OK", data  # RFC 5464 §4.3
        typ, data = conn._simple_command("GETMETADATA", "INBOX", "/private/comment")
        assert typ == "OK"
        _, meta = conn._untagged_response(typ, data, "METADATA")
        assert meta == [b'"INBOX" ("/private/comment" "my inbox")']
        # RFC 5819 LIST-STATUS and RFC 6154 special-use selection.
        typ, data = conn._simple_command(
            "LIST", "(SPECIAL-USE)", '""', "*", "RETURN", "(STATUS (MESSAGES SIZE))")
        assert typ == "OK"
        _, lists = conn._untagged_response(typ, data, "LIST")
        assert b'(\\HasNoChildren \\Sent) "/" "Sent"' in lists
        _, statuses = conn._untagged_response(typ, data, "STATUS")
        assert b'"Sent" (MESSAGES 0 SIZE 0)' in statuses
    finally:
        conn.logout()
