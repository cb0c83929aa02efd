"""The client transport against a scriptable SMTP peer on loopback."""

from __future__ import annotations

import socket

import pytest

from node.config import from_dict
from node.outbound.client import ConnectFailed, Connection, ConnectionLost, open_connection
from node.outbound.client_protocol import DELIVERED, FAILED, PENDING, Envelope, Recipient
from node.outbound.dnsresolver import make_resolver
from node.outbound.policy import TlsPolicy, TransportPolicy
from tests.support.dns import DnsServer, Zones
from tests.support.smtp_peer import SmtpPeer

OPPORTUNISTIC = TlsPolicy()
REQUIRED = TlsPolicy(require_tls=True, sources=("config",))
RAW = b"From: a@src.test\r\nTo: x@dst.test\r\nSubject: hi\r\n\r\n.dot line\r\nbody\r\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with DnsServer(Zones()) as dns:
        config = from_dict({
            "node": {"data_dir": str(tmp_path_factory.mktemp("data"))},
            "outbound": {"resolvers": [dns.address], "mta_sts": False, "dns_timeout": 1.0,
                         "command_timeout": 5.0, "greeting_timeout": 5.0,
                         "data_end_timeout": 5.0, "connect_timeout": 3.0},
        })
        yield config, TransportPolicy(config, make_resolver(config))


def envelope(*rcpts: str, size: int = len(RAW), **kw) -> Envelope:
    return Envelope("a@src.test", tuple(Recipient(r) for r in rcpts or ("x@dst.test",)), size, **kw)


def connect(env, peer: SmtpPeer, policy=OPPORTUNISTIC) -> Connection:
    config, engine = env
    conn = Connection(config.outbound, "client.test", "mx.dst.test", peer.host, peer.port,
                      policy, engine)
    conn.open()
    return conn


def test_pipelined_delivery_with_per_recipient_results(env):
    with SmtpPeer(ehlo=["PIPELINING", "8BITMIME"],
                  replies={"RCPT": ["250 2.1.5 ok", "550 5.1.1 no such user", "450 4.2.1 busy"]}) as peer:
        conn = connect(env, peer)
        outcomes = conn.send(envelope("x@dst.test", "y@dst.test", "z@dst.test"), RAW)
        assert [o.state for o in outcomes] == [DELIVERED, FAILED, PENDING]
        assert (outcomes[1].code, outcomes[1].enhanced) == (550, "5.1.1")
        conn.close(quit=True)
        (tx,) = peer.wait_for_messages(1)
        assert tx.via == "DATA" and tx.data == RAW  # dot-stuffing undone by the peer
        assert tx.rcpt_to == ["RCPT TO:<x@dst.test>"]
        # RFC 2920: MAIL and all RCPTs before any reply was read; the peer saw them in order.
        cmds = peer.connections[0].commands
        assert [c.split()[0] for c in cmds] == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"]


@pytest.mark.parametrize("ehlo", [[], ["PIPELINING"]])
def test_no_recipient_accepted_sends_no_message(env, ehlo):
    # Without PIPELINING there is no DATA at all.  With it DATA ends the
    # pipelined group (RFC 2920 §3.1); a lenient server may still answer 354
    # (RFC 5321 §3.3 allows it), and a lone "." ends that empty DATA; the
    # connection stays usable.
    replies = {"RCPT": ["550 5.1.1 nope"], "DATA": ["354 go ahead"]}
    with SmtpPeer(ehlo=ehlo, replies=replies) as peer:
        conn = connect(env, peer)
        assert [o.state for o in conn.send(envelope(), RAW)] == [FAILED]
        assert [o.state for o in conn.send(envelope(), RAW)] == [DELIVERED]
        conn.close(quit=True)
        peer.wait_for_command("QUIT")
        datas = sum(c.startswith("DATA") for c in peer.connections[0].commands)
        assert datas == (2 if ehlo else 1)  # the first message sends DATA only when pipelined
        sent = [(len(tx.rcpt_to), tx.data == b"") for tx in peer.transactions]
        assert sent == ([(0, True), (1, False)] if ehlo else [(1, False)])


def test_size_too_large_fails_before_sending(env):
    # RFC 1870 §6: the remote SIZE is known after EHLO; nothing of the message is sent.
    with SmtpPeer(ehlo=["SIZE 20"]) as peer:
        conn = connect(env, peer)
        (outcome,) = conn.send(envelope(), RAW)
        assert (outcome.state, outcome.code, outcome.enhanced) == (FAILED, 552, "5.3.4")
        assert conn.usable
        conn.close(quit=True)
        peer.wait_for_command("QUIT")
        assert not any(c.startswith(("MAIL", "DATA")) for c in peer.connections[0].commands)


def test_starttls_opportunistic_and_reehlo(env):
    with SmtpPeer(starttls=True, ehlo=["PIPELINING"]) as peer:
        conn = connect(env, peer)
        assert conn.tls and conn.tls.startswith("TLSv1")
        assert [o.state for o in conn.send(envelope(), RAW)] == [DELIVERED]
        conn.close(quit=True)
        (tx,) = peer.wait_for_messages(1)
        assert tx.tls
        cmds = [c.split()[0] for c in peer.connections[0].commands]
        assert cmds[:3] == ["EHLO", "STARTTLS", "EHLO"]  # RFC 3207 §4.2


def test_required_tls_without_starttls_never_sends_in_clear(env):
    with SmtpPeer() as peer:
        with pytest.raises(ConnectFailed) as err:
            connect(env, peer, REQUIRED)
        assert err.value.outcome.state == PENDING and err.value.outcome.enhanced == "4.7.4"
        peer.wait_for_command("QUIT")
        assert not any(c.startswith("MAIL") for c in peer.connections[0].commands)


def test_starttls_refused_continues_in_plaintext_when_opportunistic(env):
    with SmtpPeer(ehlo=["STARTTLS"]) as peer:  # advertised, but answers 502
        conn = connect(env, peer)
        assert conn.tls is None and conn.send(envelope(), RAW)[0].state == DELIVERED
        conn.close(quit=True)


def test_broken_handshake_plaintext_retry_only_when_opportunistic(env):
    # 220 to STARTTLS, then plaintext: the handshake fails.
    config, engine = env
    with SmtpPeer(ehlo=["STARTTLS"], replies={"STARTTLS": ["220 2.0.0 go"]}) as peer:
        conn, failures = open_connection(config.outbound, "client.test", "mx.dst.test",
                                         [peer.host], peer.port, OPPORTUNISTIC, engine)
        assert conn is not None and conn.tls is None
        assert [o.enhanced for _, o in failures] == ["4.7.5"]
        assert len(peer.connections) == 2  # a new connection, without STARTTLS
        assert not any(c.startswith("STARTTLS") for c in peer.connections[1].commands)
        conn.close(quit=True)
    with SmtpPeer(ehlo=["STARTTLS"], replies={"STARTTLS": ["220 2.0.0 go"]}) as peer:
        conn, failures = open_connection(config.outbound, "client.test", "mx.dst.test",
                                         [peer.host], peer.port, REQUIRED, engine)
        assert conn is None and [o.state for _, o in failures] == [PENDING]
        assert len(peer.connections) == 1 and not any(
            c.startswith("MAIL") for c in peer.connections[0].commands)


def test_bdat_when_chunking(env):
    with SmtpPeer(ehlo=["CHUNKING", "PIPELINING"]) as peer:
        conn = connect(env, peer)
        assert [o.state for o in conn.send(envelope(), RAW)] == [DELIVERED]
        conn.close(quit=True)
        (tx,) = peer.wait_for_messages(1)
        assert tx.via == "BDAT" and tx.data == RAW


def test_dsn_parameters_passed_to_dsn_capable_next_hop(env):
    e = Envelope("a@src.test", (Recipient("x@dst.test", ("SUCCESS",), "rfc822;x@dst.test"),),
                 len(RAW), envid="abc", ret="FULL")
    with SmtpPeer(ehlo=["DSN", "SIZE 100000"]) as peer:
        conn = connect(env, peer)
        conn.send(e, RAW)
        conn.close(quit=True)
        (tx,) = peer.wait_for_messages(1)
        assert tx.mail_from == f"MAIL FROM:<a@src.test> SIZE={len(RAW)} RET=FULL ENVID=abc"
        assert tx.rcpt_to == ["RCPT TO:<x@dst.test> NOTIFY=SUCCESS ORCPT=rfc822;x@dst.test"]


def test_connection_reuse_with_rset(env):
    with SmtpPeer(ehlo=["PIPELINING"]) as peer:
        conn = connect(env, peer)
        for _ in range(3):
            assert [o.state for o in conn.send(envelope(), RAW)] == [DELIVERED]
        conn.close(quit=True)
        peer.wait_for_messages(3)
        assert len(peer.connections) == 1
        assert sum(c.startswith("RSET") for c in peer.connections[0].commands) == 2


def test_temporary_and_permanent_data_replies(env):
    with SmtpPeer(replies={"DATA_END": ["451 4.3.0 try later", "554 5.6.0 rejected"]}) as peer:
        conn = connect(env, peer)
        assert conn.send(envelope(), RAW)[0].state == PENDING
        assert conn.send(envelope(), RAW)[0].state == FAILED
        conn.close(quit=True)


def test_421_mid_session_is_temporary_and_closes(env):
    with SmtpPeer(replies={"MAIL": ["421 4.3.2 shutting down"]}) as peer:
        conn = connect(env, peer)
        with pytest.raises(ConnectionLost) as err:
            conn.send(envelope(), RAW)
        assert err.value.outcome.state == PENDING and not conn.usable


def test_greeting_refusal_and_helo_fallback(env):
    with SmtpPeer(replies={"GREETING": ["554 5.7.1 go away"]}) as peer:
        with pytest.raises(ConnectFailed) as err:
            connect(env, peer)
        assert err.value.outcome.code == 554 and err.value.next_host
    with SmtpPeer(replies={"EHLO": ["502 5.5.1 what"]}) as peer:
        conn = connect(env, peer)
        assert not conn.ext.esmtp
        assert conn.send(envelope(), RAW)[0].state == DELIVERED
        conn.close(quit=True)


def test_refused_connection_tries_next_address(env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    config, engine = env
    # Same port on two addresses: 127.0.0.3 refuses, 127.0.0.2 answers.
    with SmtpPeer(host="127.0.0.2") as second:
        conn, failures = open_connection(config.outbound, "c.test", "mx.dst.test",
                                         ["127.0.0.3", "127.0.0.2"], second.port,
                                         OPPORTUNISTIC, engine)
        assert conn is not None and conn.address == "127.0.0.2"
        assert [a for a, _ in failures] == ["127.0.0.3"]
        assert failures[0][1].state == PENDING
        conn.close(quit=True)
        second.wait_for_command("QUIT")
    conn, failures = open_connection(config.outbound, "c.test", "mx.dst.test", ["127.0.0.1"],
                                     closed_port, OPPORTUNISTIC, engine)
    assert conn is None and failures[0][1].enhanced == "4.4.1"


def test_silent_server_times_out(env):
    config, engine = env
    quick = from_dict({"node": {"data_dir": config.node.data_dir},
                       "outbound": {"greeting_timeout": 0.3, "mta_sts": False}})
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        conn = Connection(quick.outbound, "c.test", "mx.dst.test", "127.0.0.1",
                          listener.getsockname()[1], OPPORTUNISTIC, engine)
        with pytest.raises(ConnectFailed) as err:
            conn.open()  # RFC 5321 §4.5.3.2.1: no greeting within the timeout
        assert err.value.outcome.state == PENDING and "timeout" in err.value.outcome.text
