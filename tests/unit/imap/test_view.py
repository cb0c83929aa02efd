"""The session's mailbox view (node/imap/view.py) and the session paths that
use it: incremental refresh, expunge numbering, FETCH from the view."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from node.imap.protocol import FetchItem
from node.imap.view import View, fetch_flags_line, flag_list_bytes
from storage.model import MailboxChanges, MessageRow
from tests.unit.imap.helpers import Client

SEEN = frozenset({"\\Seen"})
NONE: frozenset[str] = frozenset()


def _row(uid: int, flags: frozenset[str], modseq: int = 5) -> MessageRow:
    return MessageRow(uid, flags, modseq, 10, 1700000000.0, "0" * 64)


def test_build_keeps_order_keywords_and_first_unseen() -> None:
    view = View.build("INBOX", False, 7, 3, [(2, SEEN), (5, frozenset({"$Work"})), (9, NONE)])
    assert view.uids == [2, 5, 9]
    assert view.keywords == {"$Work"}
    assert view.first_unseen() == 2  # RFC 3501 §7.1 UNSEEN: a sequence number
    assert View.build("INBOX", False, 7, 3, [(1, SEEN)]).first_unseen() is None


def test_apply_reports_new_and_changed_once() -> None:
    view = View.build("INBOX", False, 7, 3, [(1, NONE), (2, NONE)])
    changes = MailboxChanges(6, [_row(1, SEEN), _row(2, NONE), _row(4, NONE), _row(3, SEEN)], [])
    updated, added = view.apply(changes)
    assert (updated, added) == ([1], [3, 4])
    assert view.uids == [1, 2, 3, 4] and view.modseq == 6
    # The same changes again (own STORE already folded in): nothing to report.
    assert view.apply(changes) == ([], [])


def test_expunge_waits_in_gone_until_taken() -> None:
    # RFC 3501 §7.4.1: numbers stay until EXPUNGE responses are sent.
    view = View.build("INBOX", False, 7, 3, [(u, NONE) for u in (1, 2, 3, 4, 5)])
    view.apply(MailboxChanges(8, [_row(3, SEEN)], [2, 3, 4, 99]))
    assert view.gone == {2, 3, 4} and view.seq_of(5) == 5
    assert view.live([1, 2, 3, 4, 5]) == [1, 5]
    assert view.live_uids() == [1, 5]
    assert view.take_expunged() == [4, 3, 2]
    assert view.uids == [1, 5] and set(view.flags) == {1, 5}
    assert view.live_uids() == [1, 5] and view.live_uids() is not view.uids


@given(st.sets(st.integers(1, 60), max_size=40), st.sets(st.integers(1, 60), max_size=40))
def test_take_expunged_matches_one_by_one_deletion(present: set[int], doomed: set[int]) -> None:
    view = View.build("INBOX", False, 1, 1, [(u, NONE) for u in sorted(present)])
    view.apply(MailboxChanges(2, [], sorted(doomed)))
    reference = sorted(present)
    expected = []
    for uid in sorted(present & doomed, reverse=True):
        seq = reference.index(uid) + 1
        del reference[seq - 1]
        expected.append(seq)
    assert view.take_expunged() == expected
    assert view.uids == reference


def test_fetch_flags_line_follows_item_order() -> None:
    view = View.build("INBOX", False, 7, 3, [(4, frozenset({"kw", "\\Seen", "\\Answered"}))])
    line = fetch_flags_line(view, 4, [FetchItem("UID"), FetchItem("FLAGS")])
    assert line == b"* 1 FETCH (UID 4 FLAGS (\\Answered \\Seen kw))\r\n"
    assert flag_list_bytes(NONE) == b"()"


def _fetch_both_ways(c: Client, command: str) -> tuple[list[bytes], list[bytes]]:
    fast = c.cmd(command)
    c.session._dirty = True  # forces the row-reading path (nothing changed)
    slow = c.cmd(command)
    return fast, slow


def test_flags_only_fetch_from_view_equals_row_path() -> None:
    # RFC 3501 §6.4.5 / §7.4.2: same FETCH responses whichever path answers.
    c = Client()
    c.login()
    for flags in ((), ("\\Seen",), ("\\Flagged", "$Work")):
        c.deliver(flags=flags)
    c.cmd("s SELECT INBOX")
    for command in ("f FETCH 1:* (FLAGS)", "f UID FETCH 1:* (FLAGS)", "f FETCH 2:3 (FLAGS UID)"):
        fast, slow = _fetch_both_ways(c, command)
        assert fast == slow and len(fast) > 1


def test_fetch_skips_a_message_expunged_by_another_session() -> None:
    # RFC 3501 §7.4.1: the expunge is not reported during FETCH, and the
    # expunged message is not returned either; the next NOOP reports it.
    a = Client()
    a.login()
    for _ in range(3):
        a.deliver()
    b = Client(a.store)
    b.login()
    a.cmd("s SELECT INBOX")
    b.cmd("s SELECT INBOX")
    b.cmd("t STORE 2 +FLAGS (\\Deleted)")
    b.cmd("e EXPUNGE")
    lines = a.cmd("f FETCH 1:* (FLAGS)")
    assert not any(ln.endswith(b" EXPUNGE") for ln in lines)
    assert [ln.split()[1] for ln in lines if ln.startswith(b"* ")] == [b"1", b"3"]
    assert lines[-1].startswith(b"f NO [EXPUNGEISSUED]")  # RFC 9051 §7.1
    assert a.cmd("n NOOP")[:-1] == [b"* 2 EXPUNGE"]
    assert b"* 2 FETCH" in b"".join(a.cmd("f FETCH 1:* (UID)"))
