"""The persisted MTA-STS cache file (RFC 8461 §5.1: cached policies outlive fetch failures)."""

from __future__ import annotations

import json
from pathlib import Path

import dns.resolver

from node.outbound.mtasts import MtaSts


def _resolver() -> dns.resolver.Resolver:
    return dns.resolver.Resolver(configure=False)  # cached() does no DNS


def _write(path: Path, fetched_at: float) -> None:
    path.write_text(json.dumps({"version": 1, "policies": {"example.net": {
        "id": "abc", "mode": "enforce", "mx": ["mx.example.net"], "max_age": 100,
        "fetched_at": fetched_at}}}))


def test_cache_file_loaded_and_expires(tmp_path: Path) -> None:
    path = tmp_path / "mta-sts.json"
    _write(path, 1000.0)
    now = [1050.0]
    sts = MtaSts(_resolver(), cache_path=path, clock=lambda: now[0])
    policy = sts.cached("EXAMPLE.net.")
    assert policy is not None and policy.mode == "enforce" and policy.matches("mx.example.net")
    now[0] = 1100.0  # fetched_at + max_age
    assert sts.cached("example.net") is None


def test_corrupt_cache_file_ignored(tmp_path: Path) -> None:
    path = tmp_path / "mta-sts.json"
    for junk in ("{not json", '{"policies": {"example.net": {"mode": "enforce"}}}', "[]"):
        path.write_text(junk)
        assert MtaSts(_resolver(), cache_path=path, clock=lambda: 0.0).cached("example.net") is None


def test_unwritable_cache_keeps_working(tmp_path: Path) -> None:
    sts = MtaSts(_resolver(), cache_path=tmp_path / "missing-dir" / "mta-sts.json")
    sts._save()  # logs, never raises: the cache is an optimisation over a fetch
