"""The sans-I/O SMTP client core: replies, EHLO, envelope plans, body framing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.outbound.client_protocol import (
    DELIVERED,
    FAILED,
    PENDING,
    Envelope,
    Extensions,
    Outcome,
    Recipient,
    Reply,
    ReplyError,
    ReplyParser,
    bdat_chunks,
    check_transaction,
    dot_stuff,
    envelope_plan,
    mail_command,
    rcpt_command,
    xtext,
)

# RFC 5321 Appendix D.1-style server side of a session, with an EHLO reply.
TRANSCRIPT = (
    b"220 foo.com Simple Mail Transfer Service Ready\r\n"
    b"250-foo.com greets bar.com\r\n"
    b"250-8BITMIME\r\n"
    b"250-SIZE 1000000\r\n"
    b"250-DSN\r\n"
    b"250 HELP\r\n"
    b"250 OK\r\n"
    b"250 OK\r\n"
    b"550 No such user here\r\n"
    b"354 Start mail input; end with <CRLF>.<CRLF>\r\n"
    b"250 OK\r\n"
    b"221 foo.com Service closing transmission channel\r\n"
)


def feed_whole(data: bytes) -> list[Reply]:
    return ReplyParser().feed(data)


def feed_bytewise(data: bytes) -> list[Reply]:
    parser = ReplyParser()
    out: list[Reply] = []
    for i in range(len(data)):
        out += parser.feed(data[i : i + 1])
    return out


def feed_random(data: bytes, seed: int = 7) -> list[Reply]:
    rng = random.Random(seed)
    parser = ReplyParser()
    out: list[Reply] = []
    i = 0
    while i < len(data):
        n = rng.randint(1, 17)
        out += parser.feed(data[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise, feed_random])
def test_transcript_replies_any_split(feed):
    replies = feed(TRANSCRIPT)
    assert [r.code for r in replies] == [220, 250, 250, 250, 550, 354, 250, 221]
    ehlo = replies[1]
    assert ehlo.lines == ("foo.com greets bar.com", "8BITMIME", "SIZE 1000000", "DSN", "HELP")
    ext = Extensions.from_ehlo(ehlo)
    assert ext.eightbitmime and ext.dsn and ext.size_limit == 1000000
    assert not ext.pipelining and not ext.starttls and not ext.chunking


def test_enhanced_status_and_text():
    reply = feed_whole(b"550-5.1.1 no such\r\n550 5.1.1 user here\r\n")[0]
    assert reply.enhanced == "5.1.1"
    assert reply.text == "no such user here"
    assert str(reply) == "550 5.1.1 no such user here"
    # An enhanced code of another class is not one (RFC 2034 §4).
    assert feed_whole(b"250 5.0.0 odd\r\n")[0].enhanced is None
    assert feed_whole(b"250\r\n")[0].lines == ("",)


def test_bare_lf_tolerated_and_partial_state():
    parser = ReplyParser()
    assert parser.feed(b"250-a\n250 b") == []
    assert parser.pending
    assert parser.feed(b"\r\n")[0].lines == ("a", "b")
    assert not parser.pending


@pytest.mark.parametrize("bad", [
    b"2x0 bad\r\n", b"hello\r\n", b"250-a\r\n251 b\r\n", b"250*x\r\n", b"650 x\r\n",
    b"250 " + b"x" * 5000 + b"\r\n",
])
def test_malformed_replies_raise(bad):
    with pytest.raises(ReplyError):
        feed_whole(bad)


def test_unterminated_long_line_raises():
    with pytest.raises(ReplyError):
        ReplyParser().feed(b"250 " + b"x" * 5000)


@given(st.lists(st.tuples(st.sampled_from([220, 250, 354, 421, 451, 550]),
                          st.lists(st.text(alphabet="abc 1.-", max_size=20), min_size=1, max_size=4)),
                min_size=1, max_size=6),
       st.randoms())
def test_encode_parse_any_split(replies, rnd):
    wire = b""
    for code, lines in replies:
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            wire += f"{code}{sep}{line}\r\n".encode()
    parser = ReplyParser()
    out: list[Reply] = []
    i = 0
    while i < len(wire):
        n = rnd.randint(1, 10)
        out += parser.feed(wire[i : i + n])
        i += n
    assert [(r.code, list(r.lines)) for r in out] == [(c, ls) for c, ls in replies]


def test_ehlo_keywords_case_insensitive_with_params():
    reply = Reply(250, ("mx.example", "pipelining", "Size 0", "AUTH PLAIN LOGIN", "chunking"))
    ext = Extensions.from_ehlo(reply)
    assert ext.pipelining and ext.chunking
    assert ext.size_limit is None  # RFC 1870 §4: SIZE 0 = no fixed maximum
    assert ext.keywords["AUTH"] == "PLAIN LOGIN"
    assert not Extensions.helo().esmtp


ENV = Envelope("a@src.test", (Recipient("x@dst.test", ("SUCCESS", "FAILURE"), "rfc822;x+1@dst.test"),
                              Recipient("y@dst.test")), size=1234, envid="id=1 2", ret="HDRS")


def test_mail_and_rcpt_parameters_only_when_advertised():
    plain = Extensions.from_ehlo(Reply(250, ("mx",)))
    assert mail_command(ENV, plain) == b"MAIL FROM:<a@src.test>\r\n"
    assert rcpt_command(ENV.recipients[0], plain) == b"RCPT TO:<x@dst.test>\r\n"
    full = Extensions.from_ehlo(Reply(250, ("mx", "SIZE 5000", "DSN", "SMTPUTF8", "8BITMIME")))
    assert mail_command(ENV, full) == b"MAIL FROM:<a@src.test> SIZE=1234 RET=HDRS ENVID=id+3D1+202\r\n"
    # RFC 3461 §4.2: ORCPT address in xtext.
    assert rcpt_command(ENV.recipients[0], full) == (
        b"RCPT TO:<x@dst.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+2B1@dst.test\r\n")
    assert rcpt_command(ENV.recipients[1], full) == b"RCPT TO:<y@dst.test>\r\n"


def test_body_smtputf8_requiretls_parameters():
    env = Envelope("ä@src.test", (Recipient("x@dst.test"),), 10, body="8BITMIME", smtputf8=True,
                   requiretls=True)
    ext = Extensions.from_ehlo(Reply(250, ("mx", "8BITMIME", "SMTPUTF8", "REQUIRETLS")))
    assert mail_command(env, ext) == (
        "MAIL FROM:<ä@src.test> BODY=8BITMIME SMTPUTF8 REQUIRETLS\r\n".encode())


def test_xtext():
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext("é") == "+C3+A9"


def test_pipelining_plan():
    piped = Extensions.from_ehlo(Reply(250, ("mx", "PIPELINING")))
    plan = envelope_plan(ENV, piped)
    assert len(plan) == 1 and len(plan[0]) == 3  # RFC 2920: MAIL + RCPTs in one write
    assert plan[0][0].startswith(b"MAIL") and all(c.startswith(b"RCPT") for c in plan[0][1:])
    assert [len(g) for g in envelope_plan(ENV, Extensions.helo())] == [1, 1, 1]


@pytest.mark.parametrize("ehlo,env_kw,expected", [
    (("SIZE 100",), {"size": 101}, (552, "5.3.4")),  # RFC 1870 §6
    (("SIZE 100",), {"size": 100}, None),
    ((), {"smtputf8": True}, (550, "5.6.7")),  # RFC 6531 §3.2
    (("SMTPUTF8",), {"smtputf8": True}, None),
    ((), {"body": "8BITMIME"}, (554, "5.6.3")),  # RFC 6152 §3
    (("8BITMIME",), {"body": "8BITMIME"}, None),
    (("BINARYMIME",), {"body": "BINARYMIME"}, (554, "5.6.3")),  # needs CHUNKING too
    ((), {"requiretls": True}, (550, "5.7.30")),  # RFC 8689 §4.2.1
    (("REQUIRETLS",), {"requiretls": True}, None),
])
def test_check_transaction(ehlo, env_kw, expected):
    kw = {"size": 10, **env_kw}
    env = Envelope("a@b.test", (Recipient("c@d.test"),), **kw)
    outcome = check_transaction(env, Extensions.from_ehlo(Reply(250, ("mx", *ehlo))))
    if expected is None:
        assert outcome is None
    else:
        assert outcome.state == FAILED and (outcome.code, outcome.enhanced) == expected


def test_dot_stuffing():
    # RFC 5321 §4.5.2: leading dots doubled; the end marker cannot appear early.
    raw = b".hidden\r\nline\r\n.\r\n..two\r\nlast"
    assert dot_stuff(raw) == b"..hidden\r\nline\r\n..\r\n...two\r\nlast\r\n.\r\n"
    # Bare LF and bare CR become CRLF (RFC 5321 §2.3.8, no smuggling onward).
    assert dot_stuff(b"a\n.\nb\rc\r\n") == b"a\r\n..\r\nb\r\nc\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"


@given(st.binary(max_size=300))
def test_dot_stuffing_round_trip(raw):
    stuffed = dot_stuff(raw)
    assert stuffed.endswith(b"\r\n.\r\n") or stuffed == b".\r\n"
    lines = stuffed[:-3].split(b"\r\n")
    assert all(line != b"." for line in lines)
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    from node.outbound.client_protocol import normalize_line_ends
    assert unstuffed == normalize_line_ends(raw)


def test_bdat_chunks():
    chunks = list(bdat_chunks(b"0123456789\r\n", chunk_size=5))
    assert chunks == [b"BDAT 5\r\n01234", b"BDAT 5\r\n56789", b"BDAT 2 LAST\r\n\r\n"]
    assert list(bdat_chunks(b"")) == [b"BDAT 0 LAST\r\n"]
    assert list(bdat_chunks(b"a\nb", binary=True)) == [b"BDAT 3 LAST\r\na\nb"]


def test_outcome_from_reply():
    assert Outcome.from_reply(Reply(250, ("2.0.0 ok",))).state == DELIVERED
    assert Outcome.from_reply(Reply(451, ("4.3.0 later",))).state == PENDING
    o = Outcome.from_reply(Reply(550, ("5.1.1 unknown",)))
    assert (o.state, o.code, o.enhanced, o.text) == (FAILED, 550, "5.1.1", "unknown")
