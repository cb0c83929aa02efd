"""Session._resolve: a sequence set of one range (the common case, answered
as a slice of the view) names exactly the messages the general path picks,
for UIDs and sequence numbers, with "*", reversed ranges and out-of-range
numbers (RFC 9051 §9: BAD for a sequence number beyond the mailbox)."""

from __future__ import annotations

import itertools

import pytest

from node.imap.protocol import STAR, SeqSet
from tests.unit.imap.helpers import Client


def _expected(uids: list[int], lo: int, hi: int, uid: bool) -> list[int] | None:
    largest = (uids[-1] if uids else 0) if uid else len(uids)
    a, b = (largest if lo == STAR else lo), (largest if hi == STAR else hi)
    a, b = min(a, b), max(a, b)
    if uid:
        return [u for u in uids if a <= u <= b]
    if a < 1 or b > len(uids):
        return [] if not uids and STAR in (lo, hi) else None
    return uids[a - 1 : b]


@pytest.mark.parametrize("messages", [0, 1, 7])
def test_one_range_names_what_the_general_path_names(messages) -> None:
    c = Client()
    c.login()
    for i in range(messages):
        c.deliver(b"Subject: m%d\r\n\r\nbody\r\n" % i)
    if messages > 3:
        c.store.expunge("alice@example.test", "INBOX", [2, 5])  # gaps in the UIDs
    assert c.cmd("s SELECT INBOX")[-1].startswith(b"s OK")
    session = c.session
    uids = list(session.view.uids)
    numbers = [STAR, *range(1, (uids[-1] if uids else 0) + 3)]
    for lo, hi, uid in itertools.product(numbers, numbers, (True, False)):
        one = session._resolve(SeqSet(((lo, hi),)), uid)
        assert one == _expected(uids, lo, hi, uid), (lo, hi, uid)
        # The same range given twice takes the general path: same answer.
        assert session._resolve(SeqSet(((lo, hi), (lo, hi))), uid) == one, (lo, hi, uid)
