"""Mailbox name and flag validation (RFC 3501 §5.1, §2.3.2)."""

from __future__ import annotations

import pytest

from storage.model import InvalidFlag, MailboxNotAllowed
from storage.names import canonical_flags, mailbox_name, special_use


@pytest.mark.parametrize(
    ("given", "canonical"),
    [("INBOX", "INBOX"), ("inbox", "INBOX"), ("InBoX/sub", "INBOX/sub"), ("a/b/c", "a/b/c"),
     ("Über", "Über"), ("inboxes", "inboxes")],
)
def test_valid_names(given, canonical):
    assert mailbox_name(given) == canonical  # RFC 3501 §5.1: INBOX is case-insensitive


@pytest.mark.parametrize(
    "bad", ["", "/", "a/", "/a", "a//b", "a\x00b", "a\rb", "a\x7f", "a*", "b%", "x" * 1001,
            "é" * 501],
)
def test_invalid_names(bad):
    with pytest.raises(MailboxNotAllowed):
        mailbox_name(bad)


def test_name_length_bound_is_octets():
    assert mailbox_name("x" * 1000) == "x" * 1000


def test_flags_canonical_sorted():
    assert canonical_flags(["\\seen", "$Junk", "\\FLAGGED", "\\Seen", "$Junk"]) == [
        "$Junk", "\\Flagged", "\\Seen"]
    assert canonical_flags(["\\Recent"]) == []  # RFC 3501 §2.3.2: not storable


@pytest.mark.parametrize("bad", ["\\Bogus", "", "a b", "a(b", "a]", "x" * 256, "a\x01", 'q"'])
def test_invalid_flags(bad):
    with pytest.raises(InvalidFlag):
        canonical_flags([bad])


def test_too_many_flags():
    with pytest.raises(InvalidFlag):
        canonical_flags([f"k{i}" for i in range(200)])


def test_special_use():
    assert special_use("\\sent") == "\\Sent"
    assert special_use(None) is None
    with pytest.raises(MailboxNotAllowed):
        special_use("\\Spam")
