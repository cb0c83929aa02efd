"""THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256 §3, §4)."""

from __future__ import annotations

from node.imap import thread
from node.imap.sort import Item
from tests.unit.imap.helpers import Client


def _item(seq: int, subject: str = "a", mid: str | None = None, refs: str | None = None,
          irt: str | None = None, sent: float | None = None) -> Item:
    headers = {"subject": subject, "message_id": mid, "references": refs,
               "in_reply_to": irt, "date": sent if sent is not None else float(seq)}
    return Item(seq, seq * 10, float(seq), 100, {"headers": headers})


def test_thread_encode_rfc5256_section_4_example():
    # RFC 5256 §4: "(2)(3 6 (4 23)(44 7 96))" -- 6 is the child of 3, 4 and
    # 44 are children of 6, 23 of 4, 7 of 44 and 96 of 7.
    items = [
        _item(2, "other", "<2@x>", sent=1),
        _item(3, "a", "<3@x>", sent=2),
        _item(6, "Re: a", "<6@x>", "<3@x>", sent=3),
        _item(4, "Re: a", "<4@x>", "<3@x> <6@x>", sent=4),
        _item(23, "Re: a", "<23@x>", "<3@x> <6@x> <4@x>", sent=5),
        _item(44, "Re: a", "<44@x>", "<3@x> <6@x>", sent=6),
        _item(7, "Re: a", "<7@x>", "<3@x> <6@x> <44@x>", sent=7),
        _item(96, "Re: a", "<96@x>", "<3@x> <6@x> <44@x> <7@x>", sent=8),
    ]
    roots = thread.references(items)
    assert thread.encode(roots, uid=False) == b"(2)(3 6 (4 23)(44 7 96))"
    assert thread.encode(roots, uid=True) == b"(20)(30 60 (40 230)(440 70 960))"


def test_thread_references_dummy_parent_keeps_siblings_rfc5256_section_4():
    # RFC 5256 §3 REFERENCES step 3: a dummy with several children stays at
    # the top ("((3)(5))"), one with a single child is replaced by it.
    items = [_item(3, "x", "<3@x>", "<gone@x>"), _item(5, "y", "<5@x>", "<gone@x>"),
             _item(7, "z", "<7@x>", "<other-gone@x>")]
    assert thread.encode(thread.references(items), uid=False) == b"((3)(5))(7)"


def test_thread_references_truncated_references_and_in_reply_to():
    # Step 1: In-Reply-To is used when there is no References; a later,
    # complete References wins over the parent a truncated one implied.
    items = [
        _item(1, "s", "<1@x>"),
        _item(2, "Re: s", "<2@x>", irt="<1@x> <junk@x>"),
        _item(3, "Re: s", "<3@x>", "<2@x>"),
        _item(4, "Re: s", "<4@x>", "<1@x> <3@x>"),
    ]
    assert thread.encode(thread.references(items), uid=False) == b"(1 2 3 4)"


def test_thread_references_loops_and_duplicate_ids_terminate():
    items = [
        _item(1, "s", "<a@x>", "<b@x>"),
        _item(2, "s", "<b@x>", "<a@x>"),
        _item(3, "s", "<a@x>"),  # duplicate Message-ID: a unique one is assigned
        _item(4, "t", None, "<a@x> <a@x> <a@x>"),
    ]
    out = thread.encode(thread.references(items), uid=False).decode()
    assert sorted(int(n) for n in out.replace("(", " ").replace(")", " ").split()) == [1, 2, 3, 4]


def test_thread_references_merges_by_subject_step_5():
    # RFC 5256 §3 step 5: threads with the same base subject are gathered;
    # a reply goes under the original, two originals under a dummy.
    items = [_item(1, "lunch", "<1@x>"), _item(2, "Re: lunch", "<2@x>"),
             _item(3, "dinner", "<3@x>"), _item(4, "dinner", "<4@x>")]
    assert thread.encode(thread.references(items), uid=False) == b"(1 2)((3)(4))"


def test_thread_orderedsubject_rfc5256_section_3():
    # ORDEREDSUBJECT: one parent per base subject, every other message its
    # child (siblings, no grandchildren); threads by date of their first.
    items = [_item(1, "b", sent=50), _item(2, "a", sent=10), _item(3, "Re: a", sent=20),
             _item(4, "Re: a", sent=30), _item(5, "c", sent=5), _item(6, "re: b", sent=60)]
    roots = thread.ordered_subject(items)
    assert thread.encode(roots, uid=False) == b"(5)(2 (3)(4))(1 6)"


def test_thread_command_and_errors():
    c = Client()
    c.login()
    for raw in (b"Subject: a\r\nMessage-ID: <1@x>\r\nDate: Mon, 7 Feb 1994 21:52:25 -0800\r\n\r\nx\r\n",
                b"Subject: Re: a\r\nMessage-ID: <2@x>\r\nReferences: <1@x>\r\n"
                b"Date: Tue, 8 Feb 1994 21:52:25 -0800\r\n\r\ny\r\n"):
        c.deliver(raw)
    c.cmd("s SELECT INBOX")
    assert c.cmd("t THREAD REFERENCES UTF-8 ALL")[0] == b"* THREAD (1 2)"
    assert c.cmd("t UID THREAD ORDEREDSUBJECT US-ASCII ALL")[0] == b"* THREAD (1 2)"
    # RFC 5256 §6 example A286: no match gives an empty THREAD response
    assert c.cmd('t THREAD REFERENCES US-ASCII TEXT "gewp"') == [
        b"* THREAD", b"t OK THREAD completed"]
    assert c.cmd("t THREAD REFERENCES BIG5 ALL")[0].startswith(b"t NO [BADCHARSET")
    assert c.cmd("t THREAD FANCY UTF-8 ALL")[0].startswith(b"t BAD")
