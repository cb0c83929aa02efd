"""ESEARCH (RFC 4731) and SEARCHRES (RFC 5182) through the session."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.imap import esearch
from node.imap.protocol import Limits, frame_all
from tests.unit.imap.helpers import Client


@pytest.fixture
def client() -> Client:
    # RFC 4731 §5: messages 2, 10 and 11 are FLAGGED, since 1-Feb-1994 and
    # not from Smith; 5 is flagged but from Smith; 1 is flagged but older.
    c = Client()
    c.login()
    for n in range(1, 12):
        sender = "Smith <smith@x.test>" if n == 5 else f"u{n} <u{n}@x.test>"
        raw = f"From: {sender}\r\nSubject: m{n}\r\n\r\nbody {n}\r\n".encode()
        flags = ["\\Flagged"] if n in (1, 2, 5, 10, 11) else []
        flags += ["$Work"] if n % 4 == 0 else []
        when = 700000000.0 if n == 1 else 762000000.0 + n  # 1992 vs. Feb 1994
        c.store.append("alice@example.test", "INBOX", raw, flags=flags, internaldate=when)
    assert c.cmd("s SELECT INBOX")[-1].startswith(b"s OK")
    return c


def test_esearch_rfc4731_section_5_examples(client):
    # RFC 4731 §5 (examples A282, A283) and §3.1 (RETURN () means ALL).
    keys = 'FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"'
    assert client.cmd(f"A282 SEARCH RETURN (MIN COUNT) {keys}") == [
        b'* ESEARCH (TAG "A282") MIN 2 COUNT 3', b"A282 OK SEARCH completed"]
    assert client.cmd(f"A283 SEARCH RETURN () {keys}")[0] == b'* ESEARCH (TAG "A283") ALL 2,10:11'
    assert client.cmd(f"A284 SEARCH RETURN (MAX MIN ALL COUNT) {keys}")[0] == (
        b'* ESEARCH (TAG "A284") MIN 2 MAX 11 ALL 2,10:11 COUNT 3')


def test_esearch_uid_and_empty_results(client):
    # RFC 4731 §3.1: UID marks UID results; no match gives no MIN/MAX/ALL.
    assert client.cmd("t UID SEARCH RETURN (MIN MAX) 10:*")[0] == (
        b'* ESEARCH (TAG "t") UID MIN 10 MAX 11')
    assert client.cmd("t SEARCH RETURN (MIN MAX ALL COUNT) BODY nowhere")[0] == (
        b'* ESEARCH (TAG "t") COUNT 0')
    assert client.cmd("t SEARCH RETURN (MIN) BODY nowhere")[0] == b'* ESEARCH (TAG "t")'


def test_esearch_unknown_return_option_is_bad(client):
    # RFC 4731 §3.1: an unknown return option is a BAD.
    assert client.cmd("t SEARCH RETURN (PARTIAL) ALL")[0].startswith(b"t BAD")


def test_searchres_save_and_dollar_rfc5182_section_2(client):
    # RFC 5182 §2 example: SAVE alone sends no ESEARCH; "$" in FETCH.
    keys = 'FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"'
    assert client.cmd(f"A282 SEARCH RETURN (SAVE) {keys}") == [b"A282 OK SEARCH completed"]
    lines = client.cmd("A283 FETCH $ (UID)")
    assert lines == [b"* 2 FETCH (UID 2)", b"* 10 FETCH (UID 10)", b"* 11 FETCH (UID 11)",
                     b"A283 OK FETCH completed"]
    # "$" as a search key (UIDs in SEARCH and UID SEARCH alike) and in UID commands
    assert client.cmd("t SEARCH $ NOT 2")[0] == b"* SEARCH 10 11"
    assert client.cmd("t UID SEARCH UID $")[0] == b"* SEARCH 2 10 11"
    assert client.cmd("t UID STORE $ +FLAGS.SILENT (\\Seen)")[-1].startswith(b"t OK")
    assert client.cmd("t SEARCH SEEN")[0] == b"* SEARCH 2 10 11"


def test_searchres_min_max_save_only_those_rfc5182_section_2_4(client):
    # RFC 5182 §2.4: SAVE with MIN/MAX (no ALL/COUNT) saves only them.
    assert client.cmd("t SEARCH RETURN (SAVE MIN MAX) FLAGGED")[0] == (
        b'* ESEARCH (TAG "t") MIN 1 MAX 11')
    assert client.cmd("t SEARCH $")[0] == b"* SEARCH 1 11"


def test_searchres_reset_by_select_rfc5182_section_2_1(client):
    # RFC 5182 §2.1: SELECT/EXAMINE empty the saved result.
    client.cmd("t SEARCH RETURN (SAVE) FLAGGED")
    assert client.cmd("t SEARCH $")[0] == b"* SEARCH 1 2 5 10 11"
    client.cmd("s SELECT INBOX")
    assert client.cmd("t SEARCH $")[0] == b"* SEARCH"
    assert client.cmd("t FETCH $ UID") == [b"t OK FETCH completed"]


def test_searchres_expunged_messages_leave_the_result(client):
    # RFC 5182 §2.1: an expunged message is removed from the saved result.
    client.cmd("t SEARCH RETURN (SAVE) FLAGGED")
    client.cmd("t STORE 2 +FLAGS.SILENT (\\Deleted)")
    client.cmd("t EXPUNGE")
    assert client.cmd("t UID FETCH $ UID")[:-1] == [
        b"* 1 FETCH (UID 1)", b"* 4 FETCH (UID 5)", b"* 9 FETCH (UID 10)", b"* 10 FETCH (UID 11)"]


def test_esearch_is_the_answer_after_enable_imap4rev2(client):
    # RFC 9051 §6.4.4: an IMAP4rev2 client gets ESEARCH for a plain SEARCH.
    client.cmd("u UNSELECT")
    assert client.cmd("e ENABLE IMAP4rev2")[-1].startswith(b"e OK")
    client.cmd("s SELECT INBOX")
    assert client.cmd("t SEARCH FLAGGED")[0] == b'* ESEARCH (TAG "t") ALL 1:2,5,10:11'


def test_esearch_capabilities_advertised():
    c = Client()
    caps = c.cmd("c CAPABILITY")[0].split()
    for cap in (b"ESEARCH", b"SEARCHRES", b"SORT", b"SORT=DISPLAY", b"THREAD=REFERENCES",
                b"THREAD=ORDEREDSUBJECT"):
        assert cap in caps


# -- the set evaluator agrees with message-by-message evaluation -------------

_leaf = st.sampled_from([
    "ALL", "SEEN", "UNSEEN", "FLAGGED", "UNFLAGGED", "DELETED", "NEW", "OLD", "RECENT",
    "KEYWORD $Work", "UNKEYWORD $work", "1:3", "2,5:*", "*", "UID 2:4", "UID 9:*",
    "BODY body", "BODY 1", "FROM smith", "SUBJECT m1", "TEXT u", "LARGER 40",
])
_keys = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(lambda k: f"NOT {k}", inner),
        st.builds(lambda a, b: f"OR {a} {b}", inner, inner),
        st.builds(lambda a, b: f"({a} {b})", inner, inner),
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_keys)
def test_esearch_set_evaluation_equals_per_message_evaluation(client, text):
    # RFC 3501 §6.4.4 semantics do not depend on which path answers.
    cmds = [c for c in frame_all(f"t SEARCH {text}\r\n".encode(), Limits()) if hasattr(c, "args")]
    assert cmds, text
    key = cmds[0].args[1]
    s = client.session
    store, view = s.ctx.store, s.view
    fast = esearch.find(store, s.account, view, key, fresh=True)
    original = esearch._Sets.eval
    try:
        esearch._Sets.eval = lambda self, k: None  # force the per-message path
        slow = esearch.find(store, s.account, view, key)
    finally:
        esearch._Sets.eval = original
    assert fast == slow, text
