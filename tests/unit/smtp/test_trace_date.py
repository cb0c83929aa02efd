"""The date of trace and submission fields: formatted once per second, always
the same text as ``email.utils.formatdate(..., localtime=True)``."""

from __future__ import annotations

import email.utils

from node.mailflow.local import rfc5322_date
from node.mailflow.submit import missing_headers


def test_same_text_as_formatdate_within_and_across_seconds():
    base = 1_800_000_000.0
    for t in (base, base + 0.25, base + 0.999, base + 1.0, base + 1.5, base - 86_400.7, base):
        assert rfc5322_date(t) == email.utils.formatdate(int(t), localtime=True), t


def test_missing_date_uses_the_given_time():
    head = missing_headers(b"Subject: x\r\n\r\nbody\r\n", "mx.example", now=1_800_000_000.5)
    date_line = head.split(b"\r\n")[0].decode()
    assert date_line == "Date: " + email.utils.formatdate(1_800_000_000, localtime=True)
    assert b"Message-ID: <" in head
    assert missing_headers(b"Date: x\r\nMessage-ID: <a@b>\r\n\r\n", "mx.example") == b""
