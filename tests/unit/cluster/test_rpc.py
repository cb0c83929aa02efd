"""cluster/rpc.py over real loopback sockets and real mTLS (a CA made by cluster/ca.py).

Runs in this process on gevent sockets (rpc.py uses them whether or not the
process is monkey-patched).  Covers calls with and without attachments (one of
20 MB), many concurrent calls multiplexed on one connection, handler errors,
unknown methods, timeouts that wedge nothing else, refused certificates, a
server restart, streams, frame limits, and fuzzed bytes after the handshake.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import Event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import ca
from cluster import rpc as rpc_module
from cluster.rpc import (
    MAX_ATTACHMENTS,
    MAX_HEADER,
    FrameReader,
    RpcClient,
    RpcError,
    RpcServer,
    RpcUnavailable,
    encode_frame,
    read_frame,
    write_frame,
)

WAIT = 10.0  # deadline for waiting on something that must happen (never asserted)


def _until(condition) -> None:
    """Wait (cooperatively) until condition() holds; fail after WAIT seconds."""
    with gevent.Timeout(WAIT, AssertionError("condition not reached")):
        while not condition():
            gevent.sleep(0.01)


class StaleEpoch(Exception):
    """A domain error with structured data, as replication raises it."""

    def __init__(self, known: int) -> None:
        super().__init__(f"epoch is older than {known}")
        self.rpc_data = {"known_epoch": known}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """Node cert dirs: alpha and beta from the cluster CA, mallory from another CA."""
    base = tmp_path_factory.mktemp("certs")
    cluster_ca, other_ca = ca.create_ca("test"), ca.create_ca("other")
    dirs = {}
    for name, authority in (("alpha", cluster_ca), ("beta", cluster_ca), ("mallory", other_ca)):
        cert, key = ca.issue_node_cert(*authority, name, ["127.0.0.1"])
        ca.write_node_files(base / name, authority[0], cert, key)
        dirs[name] = base / name
    return dirs


class Handlers:
    """The handlers of the test server, with what they saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.blocked = 0
        self.release = Event()
        self.in_flight = 0
        self.all_in = Event()
        self.expected = 0
        self.stream_peers: list[str] = []

    def register(self, server: RpcServer) -> None:
        server.register("echo", self.echo)
        server.register("fail", self.fail)
        server.register("block", self.block)
        server.register("gather", self.gather)
        server.register_stream("echo", self.echo_stream)

    def echo(self, peer: str, args: dict, att: list[bytes]) -> tuple[dict, list[bytes]]:
        self.calls += 1
        return {"peer": peer, "args": args}, att

    def fail(self, peer: str, args: dict, att: list[bytes]) -> tuple[dict, list[bytes]]:
        if args.get("builtin"):
            raise KeyError("missing")
        raise StaleEpoch(7)

    def block(self, peer: str, args: dict, att: list[bytes]) -> tuple[dict, list[bytes]]:
        self.blocked += 1
        self.release.wait(WAIT)
        return {"released": self.release.is_set()}, []

    def gather(self, peer: str, args: dict, att: list[bytes]) -> tuple[dict, list[bytes]]:
        """Answers only once `expected` requests are being handled at the same time."""
        self.in_flight += 1
        if self.in_flight == self.expected:
            self.all_in.set()
        self.all_in.wait(WAIT)
        return {"n": args["n"], "together": self.all_in.is_set()}, [str(args["n"]).encode()]

    def echo_stream(self, peer: str, args: dict, sock) -> None:
        self.stream_peers.append(peer)
        sock.sendall(json.dumps(args).encode() + b"\n")
        while data := sock.recv(65536):
            sock.sendall(data)


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
def server(certs, handlers) -> Iterator[RpcServer]:
    srv = RpcServer("127.0.0.1:0", ca.server_context(certs["alpha"]))
    handlers.register(srv)
    srv.start()
    yield srv
    handlers.release.set()
    srv.stop()


@pytest.fixture
def client(certs) -> Iterator[RpcClient]:
    cl = RpcClient(ca.client_context(certs["beta"]))
    yield cl
    cl.close()


def _gevent_context(cert: Path | None, trust: Path) -> gssl.SSLContext:
    ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca.node_files(trust)[0]))
    if cert is not None:
        ctx.load_cert_chain(*map(str, ca.node_files(cert)[1:]))
    return ctx


def _raw_tls(address: str, ctx: gssl.SSLContext):
    """A handshaken TLS socket to the server, speaking no protocol yet."""
    host, port = address.rsplit(":", 1)
    sock = gsocket.create_connection((host, int(port)), timeout=WAIT)
    return ctx.wrap_socket(sock)


def _wait_closed(sock) -> bytes:
    """Read until the server closes the connection; returns what arrived."""
    got = b""
    try:
        while data := sock.recv(65536):
            got += data
    except (ConnectionError, gssl.SSLError):
        pass
    return got


# ---------------------------------------------------------------- calls


def test_call_without_attachments_names_the_caller(server, client):
    result, att = client.call(server.bound_address, "echo", {"x": [1, "two", None]})
    assert result == {"peer": "beta", "args": {"x": [1, "two", None]}}
    assert att == []


def test_attachments_round_trip_including_20_mb(server, client):
    big = os.urandom(20 * 1024 * 1024)
    parts = [b"", b"small", big, b"\x00" * 3]
    result, att = client.call(server.bound_address, "echo", {"k": "v"}, parts, timeout=WAIT)
    assert result["args"] == {"k": "v"}
    assert [len(a) for a in att] == [len(p) for p in parts]
    assert hashlib.sha256(att[2]).digest() == hashlib.sha256(big).digest()
    assert att[1] == b"small" and att[3] == b"\x00" * 3


def test_many_concurrent_calls_are_multiplexed_on_one_connection(server, client, handlers):
    n = 200
    handlers.expected = n
    calls = [
        gevent.spawn(client.call, server.bound_address, "gather", {"n": i}, timeout=WAIT)
        for i in range(n)
    ]
    gevent.joinall(calls, raise_error=True)
    for i, call in enumerate(calls):
        result, att = call.value
        assert result == {"n": i, "together": True}
        assert att == [str(i).encode()]
    assert server.connection_count == 1


def test_handler_exception_becomes_rpc_error_with_kind(server, client):
    with pytest.raises(RpcError) as info:
        client.call(server.bound_address, "fail", {})
    assert not isinstance(info.value, RpcUnavailable)
    assert info.value.kind == "StaleEpoch"
    assert info.value.message == "epoch is older than 7"
    assert info.value.data == {"known_epoch": 7}
    with pytest.raises(RpcError) as info:
        client.call(server.bound_address, "fail", {"builtin": True})
    assert info.value.kind == "KeyError"
    # The connection is still good.
    assert client.call(server.bound_address, "echo", {})[0]["peer"] == "beta"
    assert server.connection_count == 1


def test_unknown_method(server, client):
    with pytest.raises(RpcError) as info:
        client.call(server.bound_address, "no.such", {})
    assert info.value.kind == "NoSuchMethod"
    with pytest.raises(RpcError) as info:
        client.open_stream(server.bound_address, "no.such", {})
    assert info.value.kind == "NoSuchMethod"


def test_timeout_wedges_no_other_call(server, client, handlers):
    blocked = gevent.spawn(client.call, server.bound_address, "block", {}, timeout=WAIT)
    with pytest.raises(RpcUnavailable, match="timed out"):
        client.call(server.bound_address, "block", {}, timeout=0.2)
    # While two handlers are stuck, other calls on the same connection get through.
    assert client.call(server.bound_address, "echo", {"i": 1})[0]["args"] == {"i": 1}
    assert not blocked.ready()
    handlers.release.set()
    assert blocked.get(timeout=WAIT) == ({"released": True}, [])
    # The late answer to the timed-out call was dropped; the connection lives on.
    assert client.call(server.bound_address, "echo", {"i": 2})[0]["args"] == {"i": 2}
    assert server.connection_count == 1


def test_unreachable_peer_is_unavailable(certs, client):
    probe = gsocket.socket()
    probe.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # nothing listens there now
    with pytest.raises(RpcUnavailable, match="cannot connect"):
        client.call(address, "echo", {})
    with pytest.raises(RpcUnavailable, match="cannot connect"):
        client.open_stream(address, "echo", {})
    with pytest.raises(RpcUnavailable, match="bad node address"):
        client.call("no-port-here", "echo", {})


def test_pending_calls_fail_at_once_when_the_connection_breaks(server, client, handlers):
    calls = [
        gevent.spawn(client.call, server.bound_address, "block", {}, timeout=60) for _ in range(3)
    ]
    _until(lambda: handlers.blocked == 3)
    server.stop(timeout=0)
    gevent.joinall(calls, timeout=WAIT)
    for call in calls:
        assert isinstance(call.exception, RpcUnavailable)
        assert "timed out" not in str(call.exception)  # failed by the broken connection


def test_server_restart_client_reconnects(certs, handlers, client):
    first = RpcServer("127.0.0.1:0", ca.server_context(certs["alpha"]))
    handlers.register(first)
    first.start()
    address = first.bound_address
    assert client.call(address, "echo", {"n": 1})[0]["args"] == {"n": 1}
    first.stop()
    with pytest.raises(RpcUnavailable):
        client.call(address, "echo", {"n": 2})
    second = RpcServer(address, ca.server_context(certs["alpha"]))
    handlers.register(second)
    second.start()
    try:
        assert second.bound_address == address
        assert client.call(address, "echo", {"n": 3})[0]["args"] == {"n": 3}
    finally:
        second.stop()


def test_ipv6_listener(certs, handlers, client):
    if not gsocket.has_ipv6:
        pytest.skip("no IPv6")
    srv = RpcServer("[::1]:0", ca.server_context(certs["alpha"]))
    handlers.register(srv)
    try:
        srv.start()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        assert srv.bound_address.startswith("[::1]:")
        assert client.call(srv.bound_address, "echo", {})[0]["peer"] == "beta"
    finally:
        srv.stop()


def test_close_fails_pending_calls_and_later_ones(server, certs, handlers):
    cl = RpcClient(ca.client_context(certs["beta"]))
    pending = gevent.spawn(cl.call, server.bound_address, "block", {}, timeout=60)
    _until(lambda: handlers.blocked == 1)
    cl.close()
    pending.join(timeout=WAIT)
    assert isinstance(pending.exception, RpcUnavailable)
    with pytest.raises(RpcUnavailable, match="closed"):
        cl.call(server.bound_address, "echo", {})


# ---------------------------------------------------------------- certificates


def _refused(certs, handlers, server, ctx_dir_cert: Path | None, caplog) -> None:
    context = _gevent_context(ctx_dir_cert, trust=certs["alpha"])
    cl = RpcClient(context)
    try:
        with caplog.at_level(logging.WARNING, logger="postroom.rpc"):
            with pytest.raises(RpcUnavailable):
                cl.call(server.bound_address, "echo", {}, timeout=WAIT)
            with pytest.raises(RpcUnavailable):
                cl.open_stream(server.bound_address, "echo", {}, timeout=WAIT)
            _until(lambda: any("refused" in r.getMessage() for r in caplog.records))
    finally:
        cl.close()
    assert handlers.calls == 0 and handlers.stream_peers == []
    assert server.connection_count == 0


def test_client_without_certificate_is_refused(certs, handlers, server, caplog):
    _refused(certs, handlers, server, None, caplog)


def test_client_with_certificate_from_another_ca_is_refused(certs, handlers, server, caplog):
    _refused(certs, handlers, server, certs["mallory"], caplog)


def test_client_refuses_a_server_from_another_ca(certs, handlers, client):
    rogue = RpcServer("127.0.0.1:0", ca.server_context(certs["mallory"]))
    handlers.register(rogue)
    rogue.start()
    try:
        with pytest.raises(RpcUnavailable, match="certificate"):
            client.call(rogue.bound_address, "echo", {})
    finally:
        rogue.stop()
    assert handlers.calls == 0


def test_silent_peer_is_dropped_after_the_handshake_timeout(certs, handlers, client):
    srv = RpcServer("127.0.0.1:0", ca.server_context(certs["alpha"]), handshake_timeout=0.3)
    handlers.register(srv)
    srv.start()
    host, port = srv.bound_address.rsplit(":", 1)
    silent = gsocket.create_connection((host, int(port)), timeout=WAIT)
    try:
        # It wedges nobody while it hangs there ...
        assert client.call(srv.bound_address, "echo", {})[0]["peer"] == "beta"
        # ... and is closed once the handshake timeout has passed.
        assert silent.recv(1) == b""
    finally:
        silent.close()
        srv.stop()


# ---------------------------------------------------------------- streams


def test_stream_echo(server, client, handlers):
    sock = client.open_stream(server.bound_address, "echo", {"account": "a@example.test"})
    try:
        reader = sock.makefile("rb")
        assert json.loads(reader.readline()) == {"account": "a@example.test"}
        payload = os.urandom(1024 * 1024)
        sender = gevent.spawn(sock.sendall, payload)
        echoed = reader.read(len(payload))
        sender.get(timeout=WAIT)
        assert echoed == payload
    finally:
        sock.close()
    assert handlers.stream_peers == ["beta"]


# ---------------------------------------------------------------- frame limits


def test_oversize_header_disconnects(server, certs, client):
    sock = _raw_tls(server.bound_address, _gevent_context(certs["beta"], certs["alpha"]))
    try:
        write_frame(sock, {"mode": "rpc"})
        sock.sendall(struct.pack(">I", MAX_HEADER + 1) + b"{")
        assert _wait_closed(sock) == b""
    finally:
        sock.close()
    assert client.call(server.bound_address, "echo", {})[0]["peer"] == "beta"


def test_oversize_attachments_disconnect(server, certs, client):
    sock = _raw_tls(server.bound_address, _gevent_context(certs["beta"], certs["alpha"]))
    try:
        write_frame(sock, {"mode": "rpc"})
        header = json.dumps({"id": 1, "method": "echo", "args": {}, "att": [MAX_ATTACHMENTS, 1]})
        sock.sendall(struct.pack(">I", len(header)) + header.encode())
        assert _wait_closed(sock) == b""
    finally:
        sock.close()
    assert client.call(server.bound_address, "echo", {})[0]["peer"] == "beta"


def test_raw_frames_on_the_wire(server, certs):
    """The documented wire format, spoken by hand: pipelined requests, answers by id."""
    sock = _raw_tls(server.bound_address, _gevent_context(certs["beta"], certs["alpha"]))
    try:
        write_frame(sock, {"mode": "rpc"})
        write_frame(sock, {"id": 5, "method": "echo", "args": {"a": 1}}, [b"xyz"])
        write_frame(sock, {"id": "s", "method": "nope", "args": {}})
        answers = {}
        for _ in range(2):
            header, att = read_frame(sock)
            answers[header["id"]] = (header, att)
        assert answers[5] == (
            {"id": 5, "ok": True, "result": {"peer": "beta", "args": {"a": 1}}},
            [b"xyz"],
        )
        assert answers["s"][0]["ok"] is False and answers["s"][0]["kind"] == "NoSuchMethod"
        write_frame(sock, {"id": [1], "method": "echo", "args": {}})  # bad id: dropped
        assert _wait_closed(sock) == b""
    finally:
        sock.close()


def test_request_past_its_deadline_is_never_run(server, certs, handlers):
    """A request that sat in buffers after its caller gave up is answered Expired."""
    sock = _raw_tls(server.bound_address, _gevent_context(certs["beta"], certs["alpha"]))
    try:
        write_frame(sock, {"mode": "rpc"})
        now = time.time()
        write_frame(sock, {"id": 1, "method": "echo", "args": {}, "deadline": now - 60})
        assert read_frame(sock)[0]["kind"] == "Expired"
        assert handlers.calls == 0
        write_frame(sock, {"id": 2, "method": "echo", "args": {}, "deadline": now + 60})
        assert read_frame(sock)[0]["ok"] is True
        assert handlers.calls == 1
    finally:
        sock.close()


class _Chunks:
    """A byte stream delivered in given pieces (what TLS reads may return)."""

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        self.pieces = [data[a:b] for a, b in zip(points, points[1:], strict=False)]

    def recv(self, n: int) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
        return piece[:n]


@settings(max_examples=50, deadline=None)
@given(
    frames=st.lists(
        st.tuples(
            st.dictionaries(st.text(max_size=5).filter(lambda k: k != "att"),  # att is framing
                            st.integers(), max_size=3),
            st.lists(st.sampled_from([0, 1, 7, 65535, 65536, 65537, 131_073]), max_size=3),
        ),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_frame_reader_reassembles_frames_split_anywhere(frames, cuts):
    sent = [(header, [os.urandom(n) for n in sizes]) for header, sizes in frames]
    wire = b"".join(b"".join(bytes(c) for c in encode_frame(h, a)) for h, a in sent)
    reader = FrameReader(_Chunks(wire, cuts))
    assert [reader.read_frame() for _ in sent] == sent
    with pytest.raises(Exception, match="closed"):
        reader.read_frame()


# ---------------------------------------------------------------- fuzz

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
_headers = st.fixed_dictionaries(
    {},
    optional={
        "mode": st.sampled_from(["rpc", "stream"]) | _json,
        "id": st.integers() | st.text(max_size=4) | _json,
        "method": st.sampled_from(["echo", "fail", "nope"]) | _json,
        "args": st.dictionaries(st.text(max_size=4), _json, max_size=3) | _json,
        "att": st.lists(st.integers(-3, 40), max_size=3) | _json,
    },
)


def _frame(header: dict, tail: bytes) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack(">I", len(body)) + body + tail


_payloads = st.one_of(
    st.binary(max_size=400),
    st.lists(st.builds(_frame, _headers, st.binary(max_size=40)), min_size=1, max_size=4).map(
        b"".join
    ),
    st.builds(
        lambda body, tail: struct.pack(">I", len(body)) + body + tail,
        st.binary(max_size=200),
        st.binary(max_size=40),
    ),
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=_payloads)
def test_fuzzed_bytes_never_hurt_the_server(server, certs, client, capsys, caplog, payload):
    caplog.clear()  # hypothesis reuses the fixtures: judge this example alone
    capsys.readouterr()
    assert client.call(server.bound_address, "echo", {})[0]["peer"] == "beta"  # connected
    context = _gevent_context(certs["beta"], certs["alpha"])
    sock = _raw_tls(server.bound_address, context)
    _until(lambda: server.connection_count == 2)
    try:
        sock.sendall(payload)
    except (ConnectionError, gssl.SSLError):
        pass  # the server already dropped us
    finally:
        sock.close()
    _until(lambda: server.connection_count == 1)  # the server is done with the garbage
    assert client.call(server.bound_address, "echo", {"ok": 1})[0]["args"] == {"ok": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in capsys.readouterr().err


def test_a_connection_runs_at_most_max_inflight_requests(certs, handlers, monkeypatch):
    """Beyond MAX_INFLIGHT running requests the server reads no more; each
    finished request frees its place (every call ends)."""
    monkeypatch.setattr(rpc_module, "MAX_INFLIGHT", 2)
    srv = RpcServer("127.0.0.1:0", ca.server_context(certs["alpha"]))
    handlers.register(srv)
    srv.start()
    cl = RpcClient(ca.client_context(certs["beta"]))
    try:
        calls = [gevent.spawn(cl.call, srv.bound_address, "block", {}, timeout=WAIT)
                 for _ in range(5)]
        _until(lambda: handlers.blocked == 2)
        gevent.sleep(0.2)  # the 3 others are queued unread (the count stays 2)
        assert handlers.blocked == 2
        handlers.release.set()
        gevent.joinall(calls, timeout=WAIT)
        assert [c.value for c in calls] == [({"released": True}, [])] * 5
        assert handlers.blocked == 5
        more = [gevent.spawn(cl.call, srv.bound_address, "echo", {"n": n}, timeout=WAIT)
                for n in range(4)]
        gevent.joinall(more, timeout=WAIT)
        assert [c.value[0]["args"] for c in more] == [{"n": n} for n in range(4)]
    finally:
        handlers.release.set()
        cl.close()
        srv.stop()
