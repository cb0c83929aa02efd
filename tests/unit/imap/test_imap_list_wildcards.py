"""LIST patterns (RFC 3501 §6.3.8) match without backtracking."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from node.imap.wildcard import Pattern


def reference(pattern: str, name: str) -> bool:
    """The obvious regex translation, fine for short inputs."""
    rx = "".join(
        ".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern
    )
    return re.fullmatch(rx, name, re.DOTALL) is not None


def test_rfc3501_examples() -> None:  # RFC 3501 §6.3.8
    names = ["INBOX", "Sent", "foo", "foo/bar", "foo/bar/baz", "foobar"]
    match = lambda p: [n for n in names if Pattern.compile(p).matches(n)]  # noqa: E731
    assert match("*") == names
    assert match("%") == ["INBOX", "Sent", "foo", "foobar"]
    assert match("foo/%") == ["foo/bar"]
    assert match("foo*") == ["foo", "foo/bar", "foo/bar/baz", "foobar"]
    assert match("foo%") == ["foo", "foobar"]
    assert match("inbox") == ["INBOX"]  # INBOX is case-insensitive (§5.1)
    assert match("Inbox*") == ["INBOX"]
    assert match("sent") == []  # other names are case-sensitive


def test_inbox_children_case_insensitive_only_in_first_level() -> None:
    assert Pattern.compile("inbox/Sub").matches("INBOX/Sub")
    assert not Pattern.compile("inbox/sub").matches("INBOX/Sub")


def test_pathological_pattern_is_fast() -> None:
    # A backtracking regex needs minutes for these (the suite's timeout
    # fails it); the set simulation answers at once.
    name = "b" * 1000
    for pattern in ["*%" * 8 + "x", "%*" * 3000 + "x", "*a" * 500 + "*x", "%b" * 400 + "%x"]:
        assert not Pattern.compile(pattern).matches(name)
    assert Pattern.compile("%b" * 400 + "%").matches(name)


alphabet = st.sampled_from("ab/*%")


@given(st.text(alphabet, max_size=12), st.text(st.sampled_from("ab/"), max_size=12))
def test_agrees_with_the_regex_reference(pattern: str, name: str) -> None:
    assert Pattern.compile(pattern).matches(name, inbox_case_insensitive=False) == reference(
        pattern, name
    )
