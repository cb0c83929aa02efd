"""The admin socket (node/admin.py) over a real OutboundQueue and MailStore.

The blocking AdminClient runs in gevent's threadpool so the server's
greenlets keep running on the hub.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time

import gevent
import pytest

from node.admin import MAX_REQUEST, AdminClient, AdminError, AdminServer, NodeNotRunning
from storage.model import PENDING, QueuedRecipient, RecipientResult
from storage.queue import OutboundQueue
from tests.unit.storage.storage_testlib import open_store


def in_thread(fn, *args, **kwargs):
    return gevent.get_hub().threadpool.apply(fn, args, kwargs)


@pytest.fixture
def admin(tmp_path):
    with open_store(tmp_path / "store", shards=2) as store:
        queue = OutboundQueue(store)
        wakes: list[int] = []
        server = AdminServer(tmp_path / "admin.sock", queue, lambda: wakes.append(1))
        server.start()
        try:
            yield server, queue, AdminClient(tmp_path / "admin.sock", timeout=10), wakes
        finally:
            server.stop()


def raw_exchange(path, payload: bytes) -> list[bytes]:
    """Send bytes on a fresh connection, half-close, read every response line."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data.splitlines()


MESSAGE = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: queued\r\n\r\nbody text\r\n"


def test_socket_is_owner_only_and_removed_on_stop(tmp_path, admin):
    server, *_ = admin
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    server.stop()
    assert not server.path.exists()
    with pytest.raises(NodeNotRunning, match="node not running"):
        in_thread(AdminClient(server.path).call, "ping")


def test_queue_commands_round_trip(admin):
    server, queue, client, wakes = admin
    e = queue.enqueue("a@x.test", [QueuedRecipient("b@y.test"), QueuedRecipient("c@z.test")],
                      MESSAGE)
    queue.record_attempt(e.id, [RecipientResult("b@y.test", PENDING, 451, "4.7.1", "greylisted",
                                                "mx.y.test")], time.time() + 3600)
    listed = in_thread(client.call, "queue.list")["entries"]
    assert [x["id"] for x in listed] == [e.id] and listed[0]["pending"] == 2
    assert in_thread(client.call, "queue.list", domain="z.test")["entries"][0]["id"] == e.id
    assert in_thread(client.call, "queue.list", sender="other@x.test")["entries"] == []
    assert in_thread(client.call, "queue.list", older_than=3600)["entries"] == []
    shown = in_thread(client.call, "queue.show", id=e.id)
    assert shown["headers"] == "From: a@x.test\r\nTo: b@y.test\r\nSubject: queued"
    b = shown["entry"]["recipients"][0]
    assert (b["code"], b["enhanced"], b["text"], b["remote_mta"]) == (
        451, "4.7.1", "greylisted", "mx.y.test")

    in_thread(client.call, "queue.hold", id=e.id)
    assert queue.get(e.id).held and wakes == []
    in_thread(client.call, "queue.release", id=e.id)
    assert not queue.get(e.id).held and wakes == [1]
    queue.record_attempt(e.id, [], time.time() + 3600)
    in_thread(client.call, "queue.retry", id=e.id)
    assert queue.get(e.id).next_attempt <= time.time() and wakes == [1, 1]
    queue.record_attempt(e.id, [], time.time() + 3600)
    assert in_thread(client.call, "queue.retry", all=True) == {"count": 1}
    assert in_thread(client.call, "queue.flush") == {"count": 1} and len(wakes) == 4
    in_thread(client.call, "queue.delete", id=e.id)
    assert queue.get(e.id) is None
    with pytest.raises(AdminError) as info:
        in_thread(client.call, "queue.show", id=e.id)
    assert info.value.code == "no_such_entry" and e.id in str(info.value)


@pytest.mark.parametrize("line, code", [
    (b"not json\n", "bad_request"),
    (b"[1, 2]\n", "bad_request"),
    (b'{"cmd": "queue.nuke"}\n', "bad_request"),
    (b'{"cmd": "queue.hold", "args": []}\n', "bad_request"),
    (b'{"cmd": "queue.hold", "args": {}}\n', "bad_request"),
    (b'{"cmd": "queue.hold", "args": {"id": 5}}\n', "bad_request"),
    (b'{"cmd": "queue.list", "args": {"older_than": "1h"}}\n', "bad_request"),
    (b'{"cmd": "queue.list", "args": {"older_than": -1}}\n', "bad_request"),
    (b'{"cmd": "queue.hold", "args": {"id": "../../etc/passwd"}}\n', "no_such_entry"),
    (b'\xff\xfe\n', "bad_request"),
])
def test_bad_requests_get_errors_and_the_server_lives_on(admin, line, code):
    server, _, client, _ = admin
    [reply] = in_thread(raw_exchange, server.path, line)
    response = json.loads(reply)
    assert response["ok"] is False and response["code"] == code and response["error"]
    assert in_thread(client.call, "ping") == {"pong": True}


def test_several_requests_on_one_connection(admin):
    server, *_ = admin
    replies = in_thread(raw_exchange, server.path,
                        b'{"cmd": "ping"}\n{"cmd": "queue.list"}\n{"cmd": "ping"}\n')
    assert [json.loads(r)["ok"] for r in replies] == [True, True, True]


def test_oversized_request_is_refused_and_closes(admin):
    server, _, client, _ = admin
    replies = in_thread(raw_exchange, server.path,
                        b'{"cmd": "ping", "pad": "' + b"x" * MAX_REQUEST + b'"}\n{"cmd":"ping"}\n')
    assert len(replies) == 1
    assert json.loads(replies[0])["code"] == "bad_request"
    assert in_thread(client.call, "ping") == {"pong": True}


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path, admin):
    server, queue, *_ = admin
    with pytest.raises(AdminError, match="another node"):
        AdminServer(server.path, queue, lambda: None).start()
    # A socket file left by a killed process is replaced.
    stale_path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(stale_path))
    stale.close()
    second = AdminServer(stale_path, queue, lambda: None)
    second.start()
    try:
        assert in_thread(AdminClient(stale_path).call, "ping") == {"pong": True}
    finally:
        second.stop()
    (tmp_path / "plain").write_text("x")
    with pytest.raises(AdminError, match="not a socket"):
        AdminServer(tmp_path / "plain", queue, lambda: None).start()


def test_long_socket_path_works(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with open_store(tmp_path / "store", shards=1) as store:
        server = AdminServer(deep / "admin.sock", OutboundQueue(store), lambda: None)
        server.start()
        try:
            assert len(str(server.path)) > 108
            assert in_thread(AdminClient(server.path).call, "queue.list") == {"entries": []}
        finally:
            server.stop()
