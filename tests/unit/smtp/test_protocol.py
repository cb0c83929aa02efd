"""SMTP sans-I/O core: RFC 5321, RFC 2920, RFC 3030 and RFC 3207 examples.

Every input is fed whole, one byte at a time and randomly split; the events
and replies must be the same (corelib.run_all_ways asserts this).
"""

from __future__ import annotations

import pytest

from node.smtp import replies as R
from node.smtp.protocol import (
    NEED_DATA,
    PAUSED,
    BdatEnd,
    Command,
    DataChunk,
    DataEnd,
    LocalProtocolError,
    ProtocolViolation,
    SmtpCore,
    State,
)
from tests.unit.smtp.corelib import run, run_all_ways

TXN = b"EHLO client.example\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@example.test>\r\n"


def test_reply_encoding_multiline():  # RFC 5321 §4.2.1
    reply = R.Reply(250, None, ("mx greets", "PIPELINING", "SIZE 10"))
    assert reply.encode() == b"250-mx greets\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    assert R.UNKNOWN_USER.encode() == b"550 5.1.1 no such user here\r\n"
    assert R.STORAGE_FAILED.temporary and not R.STORAGE_FAILED.permanent
    assert R.RELAY_DENIED.permanent and R.OK.positive and R.START_DATA.positive


def test_reply_text_cannot_break_framing():
    assert R.OK.with_text("a\r\nb").encode() == b"250 2.0.0 a  b\r\n"


def test_rfc5321_appendix_d1_transaction():  # RFC 5321 Appendix D.1
    data = TXN + b"DATA\r\nSubject: hi\r\n\r\nBlah blah blah...\r\n...etc. etc. etc.\r\n.\r\nQUIT\r\n"
    events, out = run_all_ways(data)
    assert events[:4] == [
        Command("EHLO", "client.example"),
        Command("MAIL", "FROM:<a@x.example>"),
        Command("RCPT", "TO:<b@example.test>"),
        Command("DATA", ""),
    ]
    # RFC 5321 §4.5.2: the leading dot of "...etc" is removed.
    assert events[4] == DataChunk(b"Subject: hi\r\n\r\nBlah blah blah...\r\n..etc. etc. etc.\r\n")
    assert events[5] == DataEnd(size=len(events[4].data))
    assert events[6] == Command("QUIT", "")
    assert out.endswith(b"221 2.0.0 closing connection\r\n")
    assert out.count(b"\r\n") == 6


def test_pipelining_answers_in_order():  # RFC 2920 §3.1
    core = SmtpCore()
    core.receive_data(TXN + b"NOOP\r\n")
    replies = []
    for verb in ("EHLO", "MAIL", "RCPT", "NOOP"):
        ev = core.next_event()
        assert isinstance(ev, Command) and ev.verb == verb
        assert core.next_event() is PAUSED  # no framing past an unanswered command
        replies.append(core.respond(R.OK))
    assert core.next_event() is NEED_DATA


def test_data_not_framed_until_data_is_accepted():
    # DATA refused: the following line is a command, not message text.
    core = SmtpCore()
    core.receive_data(TXN + b"DATA\r\nNOOP\r\n")
    for _ in range(3):
        core.respond(R.OK) if core.next_event() else None
    ev = core.next_event()
    assert ev == Command("DATA", "")
    core.respond(R.NO_VALID_RECIPIENTS)
    assert core.next_event() == Command("NOOP", "")


def test_command_line_too_long():  # RFC 5321 §4.5.3.1.4
    data = b"EHLO x\r\nNOOP " + b"a" * 600 + b"\r\nNOOP\r\n"
    events, out = run_all_ways(data, lambda: SmtpCore(max_command_length=512))
    assert isinstance(events[1], ProtocolViolation) and events[1].reply == R.LINE_TOO_LONG
    assert events[2] == Command("NOOP", "")
    assert b"500 5.5.2 line too long\r\n" in out


def test_command_at_exact_cap_is_accepted():
    line = b"NOOP " + b"a" * (512 - 7) + b"\r\n"
    assert len(line) == 512
    events, _ = run_all_ways(line, lambda: SmtpCore(max_command_length=512))
    assert events == [Command("NOOP", "a" * 505)]


def test_unknown_and_unimplemented_commands():
    events, out = run_all_ways(b"FOO bar\r\nAUTH PLAIN x\r\n")
    assert [e.reply for e in events] == [R.SYNTAX_ERROR, R.NOT_IMPLEMENTED]


def test_bare_lf_command_is_refused():  # RFC 5321 §2.3.8
    events, _ = run_all_ways(b"NOOP\nNOOP\r\n")
    assert events[0].reply == R.BARE_LF and events[1] == Command("NOOP", "")


@pytest.mark.parametrize(
    ("script", "hint"),
    [
        (b"MAIL FROM:<>\r\n", R.NEED_EHLO),
        (b"EHLO x\r\nRCPT TO:<a@b>\r\n", R.NEED_MAIL),
        (b"EHLO x\r\nDATA\r\n", R.NEED_MAIL),
        (b"EHLO x\r\nMAIL FROM:<>\r\nDATA\r\n", R.NEED_RCPT),
        (b"EHLO x\r\nMAIL FROM:<>\r\nMAIL FROM:<>\r\n", R.NESTED_MAIL),
    ],
)
def test_sequence_table(script, hint):  # RFC 5321 §4.1.4
    events, _ = run_all_ways(script)
    assert isinstance(events[-1], ProtocolViolation) and events[-1].reply == hint


def test_data_line_too_long_rejected_at_end():  # RFC 5321 §4.5.3.1.6
    data = TXN + b"DATA\r\nok\r\n" + b"x" * 1200 + b"\r\nmore\r\n.\r\nNOOP\r\n"
    events, out = run_all_ways(data)
    end = next(e for e in events if isinstance(e, DataEnd))
    assert end.error == R.LINE_TOO_LONG
    assert events[-1] == Command("NOOP", "")


def test_message_size_cap_streams_at_most_the_cap():  # RFC 1870 §6
    body = b"".join(b"%05d " % i + b"y" * 90 + b"\r\n" for i in range(100))
    data = TXN + b"DATA\r\n" + body + b".\r\nNOOP\r\n"
    events, out = run_all_ways(data, lambda: SmtpCore(max_message_size=5000))
    chunks = b"".join(e.data for e in events if isinstance(e, DataChunk))
    assert len(chunks) <= 5000
    end = next(e for e in events if isinstance(e, DataEnd))
    assert end.error == R.MESSAGE_TOO_BIG
    assert b"552 5.3.4" in out and events[-1] == Command("NOOP", "")


def test_bdat_exact_chunks_and_last():  # RFC 3030 §4.2 example
    data = TXN + b"BDAT 86\r\n" + b"a" * 86 + b"BDAT 5 LAST\r\n" + b"b\r\n.\r" + b"QUIT\r\n"
    events, out = run_all_ways(data)
    assert events[3] == DataChunk(b"a" * 86)
    assert events[4] == BdatEnd(86, False, 86)
    assert events[5] == DataChunk(b"b\r\n.\r")  # BDAT data is verbatim: no dot handling
    assert events[6] == BdatEnd(5, True, 91)
    assert events[7] == Command("QUIT", "")


def test_bdat_zero_last():  # RFC 3030 §2: BDAT 0 LAST ends the message
    data = TXN + b"BDAT 3\r\nabc" + b"BDAT 0 LAST\r\nNOOP\r\n"
    events, _ = run_all_ways(data)
    assert events[4:] == [BdatEnd(3, False, 3), BdatEnd(0, True, 3), Command("NOOP", "")]


def test_bdat_out_of_sequence_still_consumes_chunk():  # RFC 3030 §2
    data = b"EHLO x\r\nBDAT 12\r\nNOOP\r\nNOOP\r\nRSET\r\n"
    events, out = run_all_ways(data)
    assert events[1] == BdatEnd(12, False, 0, R.NEED_MAIL, in_sequence=False)
    assert events[2] == Command("RSET", "")
    assert not any(isinstance(e, DataChunk) for e in events)


def test_bdat_bad_size_closes():
    events, out = run_all_ways(b"EHLO x\r\nBDAT x\r\nNOOP\r\n")
    assert events[1].reply == R.BAD_BDAT and events[1].fatal and len(events) == 2


def test_bdat_over_cap_closes_and_data_after_bdat():
    events, _ = run_all_ways(TXN + b"BDAT 99999\r\n", lambda: SmtpCore(max_message_size=100))
    assert events[-1].reply == R.MESSAGE_TOO_BIG and events[-1].fatal
    events, _ = run_all_ways(TXN + b"BDAT 1\r\nxDATA\r\n")
    assert events[-1].reply == R.DATA_AFTER_BDAT  # RFC 3030 §2


def test_bdat_total_over_cap():
    data = TXN + b"BDAT 60\r\n" + b"a" * 60 + b"BDAT 60 LAST\r\n" + b"b" * 60 + b"NOOP\r\n"
    events, _ = run_all_ways(data, lambda: SmtpCore(max_message_size=100))
    ends = [e for e in events if isinstance(e, BdatEnd)]
    assert ends[0].error is None and ends[1].error == R.MESSAGE_TOO_BIG
    assert sum(len(e.data) for e in events if isinstance(e, DataChunk)) == 60
    assert events[-1] == Command("NOOP", "")


def test_starttls_discards_pipelined_bytes():  # RFC 3207 §4.2, CVE-2011-0411 class
    core = SmtpCore()
    core.receive_data(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\n")
    assert core.next_event() == Command("EHLO", "x")
    core.respond(R.OK)
    ev = core.next_event()
    assert ev == Command("STARTTLS", "", discarded=b"MAIL FROM:<evil@x>\r\n")
    assert core.respond(R.READY_TLS) == b"220 2.0.0 ready to start TLS\r\n"
    assert core.state is State.TLS
    core.receive_data(b"RCPT TO:<x@y>\r\n")  # plaintext after 220 is ignored
    assert core.next_event() is NEED_DATA
    core.tls_established()
    assert core.state is State.START
    core.receive_data(b"MAIL FROM:<>\r\n")
    assert core.next_event().reply == R.NEED_EHLO  # must EHLO again


def test_misuse_raises_local_error():
    core = SmtpCore()
    with pytest.raises(LocalProtocolError):
        core.respond(R.OK)
    with pytest.raises(LocalProtocolError):
        core.tls_established()


def test_quit_closes_and_ignores_rest():
    events, out = run(SmtpCore(), [b"QUIT\r\nNOOP\r\n"])
    assert events == [Command("QUIT", "")] and out == R.BYE.encode()
