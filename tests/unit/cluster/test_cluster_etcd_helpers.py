"""Pure helpers of cluster/etcd.py and the CLI parser (no etcd needed)."""

from __future__ import annotations

import pytest

from cluster.etcd import EtcdError, EtcdSession, _one_line, _range_end, decode_json, encode_json
from node.cli import _age, build_parser


def test_range_end_is_the_prefix_successor() -> None:
    assert _range_end(b"/a/") == b"/a0"
    assert _range_end(b"a\xff") == b"b"
    assert _range_end(b"\xff\xff") == b"\0"


def test_json_roundtrip_and_errors() -> None:
    assert decode_json(encode_json({"b": 1, "a": [None]})) == {"a": [None], "b": 1}
    assert encode_json({"b": 1, "a": 2}) == b'{"a":2,"b":1}'
    with pytest.raises(EtcdError):
        decode_json(b"\xff")


def test_keys_are_relative_to_the_prefix() -> None:
    s = EtcdSession(["http://127.0.0.1:1"], "/postroom/", 5, 1.0)
    assert s._full("/domains/x") == b"/postroom/domains/x"
    assert s._full("domains/x") == b"/postroom/domains/x"
    assert s._relative(b"/postroom/domains/x") == "/domains/x"


def test_one_line_keeps_the_os_reason() -> None:
    text = (
        "HTTPConnectionPool(host='h'): Max retries (Caused by X('[Errno 111] Connection refused'))"
    )
    assert _one_line(Exception(text)) == "[Errno 111] Connection refused"
    assert _one_line(Exception('{"error":"e","message":"etcdserver: no leader"}')) == (
        "etcdserver: no leader"
    )


def test_age() -> None:
    assert [_age(s) for s in (5, 65, 3700, 90000)] == ["5s", "1m5s", "1h1m", "1d1h"]


def test_parser_has_no_password_argument() -> None:
    args = build_parser().parse_args(["user", "add", "a@x.test"])
    assert vars(args) == {"config": None, "command": "user", "action": "add", "address": "a@x.test"}
