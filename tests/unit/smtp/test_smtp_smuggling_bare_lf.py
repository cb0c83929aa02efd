"""SMTP smuggling (CVE-2023-51764 / CVE-2023-51765 / CVE-2023-51766 class).

DATA ends only at CRLF "." CRLF (RFC 5321 §4.1.1.4).  Every other "end of
data" spelling is message text and can never start a second transaction.
"""

from __future__ import annotations

import pytest

from node.smtp.protocol import Command, DataChunk, DataEnd
from node.smtp.session import Session
from tests.unit.smtp.corelib import run_all_ways
from tests.unit.smtp.fakes import make_ctx

HEAD = (b"EHLO client.example\r\nMAIL FROM:<a@x.example>\r\n"
        b"RCPT TO:<alice@example.test>\r\nDATA\r\nSubject: one\r\n\r\nbody")
SMUGGLED = b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nevil"
FAKE_ENDS = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n", b"\n..\n"]


@pytest.mark.parametrize("fake_end", FAKE_ENDS, ids=repr)
def test_fake_end_of_data_is_text(fake_end):
    data = HEAD + fake_end + SMUGGLED + b"\r\n.\r\nQUIT\r\n"
    events, _ = run_all_ways(data)
    verbs = [e.verb for e in events if isinstance(e, Command)]
    assert verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert sum(isinstance(e, DataEnd) for e in events) == 1
    body = b"".join(e.data for e in events if isinstance(e, DataChunk))
    assert b"MAIL FROM:<admin@example.test>" in body  # kept as text of the one message


@pytest.mark.parametrize("fake_end", FAKE_ENDS, ids=repr)
def test_session_delivers_exactly_one_message(fake_end):
    ctx, _, store = make_ctx()
    session = Session(ctx, "127.0.0.1")
    out = session.feed(HEAD + fake_end + SMUGGLED + b"\r\n.\r\n")
    assert out.data.count(b"250 2.0.0 message accepted") == 1
    assert len(store.delivered) == 1
    accounts, raw = store.delivered[0]
    assert accounts == ["alice@example.test"]
    assert b"evil" in raw
    # Bare LF never survives as a line end in the stored text: normalised to CRLF.
    assert b"\n" not in raw.replace(b"\r\n", b"")


def test_bare_lf_lines_do_not_get_dot_unstuffed_into_an_end():
    events, _ = run_all_ways(HEAD + b"\r\n.\n.\r\n")
    # ".\n" is text; the following ".\r\n" is preceded by a bare LF, so it is text too.
    assert not any(isinstance(e, DataEnd) for e in events)
