"""Our DKIM signatures checked by an independent verifier: OpenDKIM's
``opendkim-testmsg`` (Debian opendkim-tools), RSA-SHA256 and Ed25519-SHA256.

opendkim-testmsg looks keys up through the C library resolver, which reads
/etc/resolv.conf and only speaks to port 53.  So the verifier runs in its own
user, network and mount namespaces (``unshare -rnm``, no privileges needed):
there, a DNS server built on tests/support/dns.py's answers listens on
127.0.0.1:53 and a private resolv.conf is bind-mounted over the real one.
Nothing outside the namespace is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from node.config import DkimSettings
from node.outbound import dkim as pdkim
from tests.support.etcd import REPO

TESTMSG = "/usr/sbin/opendkim-testmsg"
DOMAIN = "example.test"
MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: checked by OpenDKIM\r\n"
    b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <od1@example.test>\r\n"
    b"\r\n"
    b"Hello  Bob, \r\n\r\nbye\r\n"
)


def _usable() -> str | None:
    if not os.path.exists(TESTMSG):
        return "opendkim-testmsg not installed (Debian opendkim-tools)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip not available"
    probe = subprocess.run(["unshare", "-rnm", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def ns_child(message_path: str, zone_json: str) -> None:
    """Inside the namespaces: DNS on 127.0.0.1:53, private resolv.conf, then
    opendkim-testmsg; prints a JSON result line."""
    from tests.support.dns import DnsServer, Zones

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as conf:
        conf.write("nameserver 127.0.0.1\noptions attempts:2 timeout:2\n")
    subprocess.run(["mount", "--bind", conf.name, "/etc/resolv.conf"], check=True)
    zones = Zones()
    for name, text in json.loads(zone_json):
        zones.add(name, "TXT", text)
    server = DnsServer(zones)

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 53))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 53))
    tcp.listen(8)

    def serve_udp() -> None:
        while True:
            data, peer = udp.recvfrom(4096)
            out = server.answer(data, 512)
            if out is not None:
                udp.sendto(out, peer)

    def serve_tcp() -> None:
        while True:
            conn, _ = tcp.accept()
            with conn:
                head = conn.recv(2)
                if len(head) < 2:
                    continue
                size, data = int.from_bytes(head, "big"), b""
                while len(data) < size:
                    chunk = conn.recv(size - len(data))
                    if not chunk:
                        break
                    data += chunk
                out = server.answer(data, None)
                if out is not None:
                    conn.sendall(len(out).to_bytes(2, "big") + out)

    for target in (serve_udp, serve_tcp):
        threading.Thread(target=target, daemon=True).start()
    with open(message_path, "rb") as message:
        result = subprocess.run([TESTMSG], stdin=message, capture_output=True, timeout=60)
    print(
        json.dumps(
            {
                "rc": result.returncode,
                "out": result.stdout.decode(errors="replace"),
                "err": result.stderr.decode(errors="replace"),
                "queries": server.queries,
            }
        )
    )


def opendkim_verify(signed: bytes, records: list[tuple[str, dict]], tmp_path: Path) -> dict:
    """Run opendkim-testmsg on signed with the given (selector, record) keys in DNS."""
    message = tmp_path / "signed.eml"
    message.write_bytes(signed)
    zone = [
        (
            f"{selector}._domainkey.{DOMAIN}.",
            " ".join(f'"{s}"' for s in pdkim.split_txt(pdkim.txt_value(record))),
        )
        for selector, record in records
    ]
    code = (
        "import sys; from tests.integration.test_dkim_opendkim import ns_child; "
        "ns_child(sys.argv[1], sys.argv[2])"
    )
    result = subprocess.run(
        ["unshare", "-rnm", sys.executable, "-c", code, str(message), json.dumps(zone)],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


class Keys:
    def __init__(self, *entries: tuple[str, dict]) -> None:
        self.records = [{**r, "domain": DOMAIN, "selector": s} for s, r in entries]

    def dkim_keys(self, domain: str) -> list[dict]:
        return list(self.records)


@pytest.fixture(scope="module")
def keys() -> dict[str, dict]:
    reason = _usable()
    if reason:
        pytest.skip(reason)
    return {"rsa": pdkim.generate_key(pdkim.RSA), "ed": pdkim.generate_key(pdkim.ED25519)}


@pytest.mark.parametrize("fast_rsa", [True, False], ids=["fast-rsa", "dkimpy-rsa"])
def test_opendkim_verifies_rsa(keys: dict, fast_rsa: bool, tmp_path: Path) -> None:
    entries = [("od-r", keys["rsa"])]
    signed = pdkim.Signer(Keys(*entries), DkimSettings(fast_rsa=fast_rsa)).sign(MESSAGE, DOMAIN)
    result = opendkim_verify(signed, entries, tmp_path)
    assert result["rc"] == 0 and result["err"] == "", result
    assert ["od-r._domainkey.example.test.", "TXT"] in result["queries"]  # it really looked


def test_opendkim_verifies_ed25519(keys: dict, tmp_path: Path) -> None:
    entries = [("od-e", keys["ed"])]
    signed = pdkim.Signer(Keys(*entries), DkimSettings()).sign(MESSAGE, DOMAIN)
    result = opendkim_verify(signed, entries, tmp_path)
    assert result["rc"] == 0 and result["err"] == "", result
    assert ["od-e._domainkey.example.test.", "TXT"] in result["queries"]


def test_opendkim_verifies_both_signatures(keys: dict, tmp_path: Path) -> None:
    entries = [("od-r", keys["rsa"]), ("od-e", keys["ed"])]
    signed = pdkim.Signer(Keys(*entries), DkimSettings()).sign(MESSAGE, DOMAIN)
    assert signed.count(b"DKIM-Signature:") == 2
    result = opendkim_verify(signed, entries, tmp_path)
    assert result["rc"] == 0 and result["err"] == "", result


def test_opendkim_rejects_a_tampered_message(keys: dict, tmp_path: Path) -> None:
    # The check that the verifier can fail: same key, altered body.
    entries = [("od-r", keys["rsa"])]
    signed = pdkim.Signer(Keys(*entries), DkimSettings()).sign(MESSAGE, DOMAIN)
    result = opendkim_verify(signed.replace(b"bye", b"BYE"), entries, tmp_path)
    assert result["rc"] != 0 and "bad signature" in result["err"].lower(), result
