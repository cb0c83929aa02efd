"""EncodedArgs: arguments encoded once reach the handler as the same object,
over a real RpcServer/RpcClient with real mTLS on loopback."""

from __future__ import annotations

import json

import pytest

from cluster import ca
from cluster.rpc import EncodedArgs, RpcClient, RpcServer, encode_frame, read_frame


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("certs")
    authority = ca.create_ca("test")
    for name in ("alpha", "beta"):
        cert, key = ca.issue_node_cert(*authority, name, ["127.0.0.1"])
        ca.write_node_files(base / name, authority[0], cert, key)
    seen: list[tuple[dict, list[bytes]]] = []
    server = RpcServer("127.0.0.1:0", ca.server_context(base / "alpha"))
    server.register("echo", lambda peer, args, att: (seen.append((args, att)) or
                                                      ({"args": args, "peer": peer}, att)))
    server.start()
    client = RpcClient(ca.client_context(base / "beta"))
    yield server, client, seen
    client.close()
    server.stop()


def test_encoded_args_arrive_as_the_same_object(pair):
    server, client, seen = pair
    args = {"shard": 3, "prev": [7, 2], "ops": [[8, 2, 1.5, "append", {"s": "é\"\\"}]],
            "blobs": []}
    encoded = EncodedArgs(args)
    for attachments in ([], [b"blob one", b""]):
        result, back = client.call(server.bound_address, "echo", encoded, attachments)
        assert result == {"args": args, "peer": "beta"}
        assert back == attachments
    assert [a for a, _ in seen[-2:]] == [args, args]


def test_encoded_frame_is_a_valid_frame():
    args = {"k": [1, {"x": None}]}

    class Reader:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def recv(self, n: int) -> bytes:
            out, self.data = self.data[:n], self.data[n:]
            return out

    data = b"".join(bytes(c) for c in encode_frame(
        {"id": 1, "method": "m", "args": EncodedArgs(args)}, [b"abc"]))
    header, attachments = read_frame(Reader(data))
    assert header == {"id": 1, "method": "m", "args": args} and attachments == [b"abc"]
    assert json.loads(data[4:4 + int.from_bytes(data[:4], "big")])["att"] == [3]
