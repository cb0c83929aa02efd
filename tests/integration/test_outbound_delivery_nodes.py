"""Node to node: submission on one postroom node, delivery to a second one.

Both are real node processes (`python -m node serve`).  Node A's resolver is
a DNS server on loopback whose zone sends dest.test to 127.0.0.1, and A's
outbound.port is B's SMTP port, so A's queue runner delivers to B over
STARTTLS; B stores the message (IMAP shows it) or refuses an unknown user,
and then A's failure report lands in the sender's INBOX on A.
"""

from __future__ import annotations

import imaplib
import smtplib
import ssl
import time
import uuid

import pytest

from tests.support.dns import DnsServer, Zones

ALICE = ("alice@example.test", "alice-pw-1234")


def tls_context(node) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=node.cafile)
    ctx.check_hostname = False
    return ctx


def fetch_all(node, user: tuple[str, str]) -> list[bytes]:
    with imaplib.IMAP4(node.host, node.ports["imap"]) as conn:
        conn.starttls(ssl_context=tls_context(node))
        conn.login(*user)
        conn.select("INBOX")
        _, data = conn.uid("SEARCH", None, "ALL")
        out = []
        for uid in data[0].split():
            _, parts = conn.uid("FETCH", uid, "(BODY.PEEK[])")
            out.append(parts[0][1])
        return out


def wait_for(node, user, needle: bytes, deadline: float = 30.0) -> bytes:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        found = [m for m in fetch_all(node, user) if needle in m]
        if found:
            return found[0]
        time.sleep(0.1)
    raise TimeoutError(f"{needle!r} not in {user[0]}'s INBOX; node log:\n{node.log_tail(60)}")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tests.support.node import NodeProcess

    zones = Zones()
    zones.add("dest.test", "MX", "10 mx.dest.test.")
    zones.add("mx.dest.test", "A", "127.0.0.1")
    with DnsServer(zones) as dns:
        b = NodeProcess(tmp_path_factory.mktemp("node-b"))
        b.start()
        a = None
        try:
            b.provision()
            assert b.cli("domain", "add", "dest.test").returncode == 0
            b.add_user("carol@dest.test", "carol-pw-1234")
            a = NodeProcess(tmp_path_factory.mktemp("node-a"), {"outbound": {
                "resolvers": [dns.address], "dns_timeout": 2.0, "port": b.ports["smtp"],
                "mta_sts": False,
                "retry_intervals": [1]}})
            a.start()
            a.provision()
            yield a, b
        finally:
            for node in (a, b):
                if node is not None:
                    node.stop()


def submit(node, to: str, token: str) -> None:
    msg = (f"From: <{ALICE[0]}>\r\nTo: <{to}>\r\nSubject: {token}\r\n\r\n"
           f"body of {token}\r\n").encode()
    with smtplib.SMTP(node.host, node.ports["submission"], timeout=30) as s:
        s.starttls(context=tls_context(node))
        s.login(*ALICE)
        s.sendmail(ALICE[0], [to], msg)


def test_submitted_mail_reaches_second_node_over_starttls(pair):
    a, b = pair
    token = uuid.uuid4().hex
    submit(a, "carol@dest.test", token)
    got = wait_for(b, ("carol@dest.test", "carol-pw-1234"), token.encode())
    # B's Received field names A's connection and the TLS it used.
    assert b"with ESMTPS" in got and b"TLSv1." in got
    assert b"Message-ID:" in got and b"Date:" in got  # added at submission
    assert "policy=tls=opportunistic" in a.log_tail(200)


def test_unknown_user_on_second_node_bounces_to_sender(pair):
    a, _ = pair
    token = uuid.uuid4().hex
    submit(a, "nobody@dest.test", token)
    report = wait_for(a, ALICE, token.encode())
    assert b"multipart/report" in report and b"Action: failed" in report
    assert b"Status: 5.1.1" in report and b"nobody@dest.test" in report
