"""Recipient resolution and name rules of cluster/directory.py, on the cache alone.

The cache is filled through the same watch-event path a running node uses;
the integration tests (tests/integration/test_directory.py) check the same
rules against a real etcd.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.directory import (
    DirectoryError,
    EtcdDirectory,
    normalize_address,
    normalize_alias_source,
    normalize_domain,
)
from cluster.etcd import WatchEvent


def _directory(domains, accounts, aliases) -> EtcdDirectory:
    d = EtcdDirectory(session=None)  # type: ignore[arg-type]  # cache only
    rev = 0
    for name in domains:
        rev += 1
        d._on_event(WatchEvent("put", f"/domains/{name}", {"created": rev}, rev))
    for name in accounts:
        rev += 1
        d._on_event(WatchEvent("put", f"/accounts/{name}", {"password": "x", "created": rev}, rev))
    for name, targets in aliases.items():
        rev += 1
        d._on_event(WatchEvent("put", f"/aliases/{name}", {"targets": targets}, rev))
    return d


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("Alice@Example.TEST", "alice@example.test"),
        ("a.b+tag@x.test.", "a.b+tag@x.test"),
        ("ü@bücher.test", "ü@xn--bcher-kva.test"),
    ],
)
def test_normalize_address(raw: str, canonical: str) -> None:
    assert normalize_address(raw) == canonical


@pytest.mark.parametrize(
    "bad",
    ["", "@x.test", "a@", "a@b", "a b@x.test", "a..b@x.test", ".a@x.test", "a@-x.test",
     "a@x_y.test", "x" * 65 + "@x.test", '"q"@x.test', "a@" + "a." * 130 + "test"],
)  # fmt: skip
def test_invalid_addresses_are_refused(bad: str) -> None:
    with pytest.raises(DirectoryError):
        normalize_address(bad)


def test_alias_sources() -> None:
    assert normalize_alias_source("@Example.Test") == "@example.test"
    with pytest.raises(DirectoryError):
        normalize_alias_source("@")
    with pytest.raises(DirectoryError):
        normalize_domain("localhost")


def test_delete_events_update_the_cache() -> None:
    d = _directory(["x.test"], ["a@x.test"], {})
    assert d.resolve_recipient("a@x.test") == ["a@x.test"]
    d._on_event(WatchEvent("delete", "/accounts/a@x.test", None, 99))
    assert d.resolve_recipient("a@x.test") is None
    assert not d.account_exists("a@x.test")


def test_alias_depth_is_bounded() -> None:
    chain = {f"a{i}@x.test": [f"a{i + 1}@x.test"] for i in range(20)}
    d = _directory(["x.test"], ["a20@x.test", "a3@x.test"], chain)
    assert d.resolve_recipient("a0@x.test") is None  # a20 is beyond MAX_ALIAS_DEPTH
    assert d.resolve_recipient("a15@x.test") == ["a20@x.test"]


def test_postmaster_rule() -> None:
    d = _directory(["b.test", "a.test"], ["zz@b.test", "yy@a.test"], {})
    assert d.resolve_recipient("postmaster@b.test") == ["zz@b.test"]  # oldest of b.test
    d = _directory(["b.test", "a.test", "c.test"], ["zz@b.test", "yy@a.test"], {})
    assert d.resolve_recipient("postmaster@c.test") == ["zz@b.test"]  # oldest anywhere
    d = _directory(["b.test", "a.test"], ["zz@b.test", "postmaster@a.test"], {})
    assert d.resolve_recipient("POSTMASTER@b.test") == ["postmaster@a.test"]


names = st.sampled_from(["a", "b", "c", "d", "postmaster"])
domains = st.sampled_from(["x.test", "y.test", "far.test"])
addresses = st.builds(lambda n, dom: f"{n}@{dom}", names, domains)


@settings(max_examples=300, deadline=None)
@given(
    accounts=st.lists(addresses, max_size=6),
    aliases=st.dictionaries(
        st.one_of(addresses, st.sampled_from(["@x.test", "@y.test"])),
        st.lists(addresses, min_size=1, max_size=4),
        max_size=8,
    ),
    query=addresses,
)
def test_resolution_invariants(accounts, aliases, query) -> None:
    local = ["x.test", "y.test"]
    d = _directory(local, [a for a in accounts if a.split("@")[1] in local], aliases)
    result = d.resolve_recipient(query)
    domain = query.split("@")[1]
    if domain not in local:
        assert result is None
        return
    if query.startswith("postmaster@"):
        assert result is not None  # RFC 5321 §4.5.1
        assert result or not d._accounts
    if result is not None:
        assert len(result) == len(set(result))
        assert all(d.account_exists(a) for a in result)
