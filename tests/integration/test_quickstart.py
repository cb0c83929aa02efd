"""The README's first command: `postroom quickstart` gives a working node.

It must start an embedded etcd, create the demo domain and account, make a
self-signed certificate, print the ports, the account and its password, and
then accept mail over SMTP that POP3 and IMAP (over TLS) can read.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import selectors
import signal
import smtplib
import ssl
import subprocess
import sys
import time

from tests.support.node import REPO


def test_quickstart_serves_the_demo_account(tmp_path) -> None:
    data_dir = tmp_path / "qs"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "quickstart", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=str(REPO),
    )
    try:
        out = b""
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while b"Manage:" not in out and time.monotonic() < deadline:
            assert proc.poll() is None, out.decode(errors="replace")
            if sel.select(timeout=0.2):
                out += os.read(proc.stderr.fileno(), 65536)
        text = out.decode()
        assert "demo@example.test" in text, text
        password = re.search(r"password:\s+(\S+)", text).group(1)
        for port in ("2525", "1143", "1993", "1110", "1995"):
            assert port in text
        assert (data_dir / "tls" / "cert.pem").exists()
        assert (data_dir / "etcd").exists()

        raw = b"From: a@remote.test\r\nSubject: hello\r\n\r\nquickstart works\r\n"
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as smtp:
            smtp.sendmail("a@remote.test", ["demo@example.test"], raw)

        pop = poplib.POP3("127.0.0.1", 1110, timeout=10)
        pop.user("demo@example.test")
        pop.pass_(password)
        _, lines, _ = pop.retr(1)
        assert b"\r\n".join(lines).endswith(raw.rstrip(b"\r\n"))
        pop.quit()

        tls = ssl.create_default_context(cafile=str(data_dir / "tls" / "cert.pem"))
        imap = imaplib.IMAP4_SSL("127.0.0.1", 1993, ssl_context=tls)
        imap.login("demo@example.test", password)
        typ, data = imap.select("INBOX")
        assert typ == "OK" and int(data[0]) == 1
        imap.logout()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
