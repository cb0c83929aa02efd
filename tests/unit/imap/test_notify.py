"""NOTIFY (RFC 5465) against the in-memory fakes."""

from __future__ import annotations

import pytest

from node.imap import notify as notifymod
from node.imap.protocol import Command, Limits, encode_command, frame_all
from tests.unit.imap.helpers import Client

ACCOUNT = "alice@example.test"
PERSONAL = "(personal (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange))"


def _pair() -> tuple[Client, Client]:
    a = Client()
    b = Client(a.store)
    a.login()
    b.login()
    return a, b


def _pushed(c: Client) -> list[bytes]:
    """What the server's notifier greenlet would send after a wakeup."""
    c.session.idle_flush()
    return c.take().split(b"\r\n")[:-1]


def _parse(line: bytes) -> Command:
    import node.imap.session  # noqa: F401  (registers the extension parsers)

    (cmd,) = frame_all(line, Limits())
    assert isinstance(cmd, Command), cmd
    return cmd


def test_capability_lists_notify() -> None:
    assert b" NOTIFY" in Client().greeting  # RFC 5465 §3


def test_set_status_reports_other_mailboxes() -> None:
    # RFC 5465 §5.1 (STATUS indicator): STATUS for every watched non-selected mailbox.
    a, _ = _pair()
    a.deliver(mailbox="Sent")
    a.cmd("s SELECT INBOX")
    out = a.cmd(f"n NOTIFY SET STATUS (selected (MessageNew MessageExpunge)) {PERSONAL}")
    assert b'* STATUS "Sent" (MESSAGES 1 UIDNEXT 2 UIDVALIDITY ' in out[0]
    assert not any(b'"INBOX"' in x for x in out)  # the selected one goes by the selected rule
    assert out[-1] == b"n OK NOTIFY completed"


def test_message_new_in_other_mailbox_outside_idle() -> None:
    # RFC 5465 §5.1 / §3: STATUS for a non-selected mailbox, pushed without IDLE.
    a, b = _pair()
    a.cmd(f"n NOTIFY SET {PERSONAL}")
    before = a.wakeups
    b.deliver(mailbox="Archive")
    assert a.wakeups > before
    (line,) = _pushed(a)
    assert line.startswith(b'* STATUS "Archive" (MESSAGES 1 UIDNEXT 2 UIDVALIDITY ')
    assert line.endswith(b" UNSEEN 1)")
    b.store.store_flags(ACCOUNT, "Archive", [1], "add", ["\\Seen"])
    # RFC 5465 §5.2 FlagChange: counts did not move, only UNSEEN.
    assert _pushed(a) == [b'* STATUS "Archive" (UNSEEN 0)']


def test_selected_message_new_with_fetch_attributes() -> None:
    # RFC 5465 §5.1: MessageNew (fetch-att) for the selected mailbox.
    a, b = _pair()
    a.deliver()
    a.cmd("s SELECT INBOX")
    a.cmd("n NOTIFY SET (selected (MessageNew (UID FLAGS) MessageExpunge FlagChange))")
    b.deliver()
    assert _pushed(a) == [b"* 2 EXISTS", b"* 2 FETCH (UID 2 FLAGS ())"]
    b.cmd("s SELECT INBOX")
    b.cmd("t STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.cmd("e EXPUNGE")
    assert _pushed(a) == [b"* 1 EXPUNGE"]


def test_selected_delayed_keeps_expunges_for_a_command() -> None:
    # RFC 5465 §5.2 SELECTED-DELAYED: expunges wait until a command allows them.
    a, b = _pair()
    a.deliver()
    a.deliver()
    a.cmd("s SELECT INBOX")
    a.cmd("n NOTIFY SET (selected-delayed (MessageNew MessageExpunge FlagChange))")
    b.cmd("s SELECT INBOX")
    b.cmd("t STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.cmd("e EXPUNGE")
    assert _pushed(a) == []
    assert a.cmd("n NOOP") == [b"* 1 EXPUNGE", b"n OK NOOP completed"]


def test_mailbox_name_and_subscription_change() -> None:
    # RFC 5465 §5.4 (MailboxName, OLDNAME on rename) and §5.5 (SubscriptionChange).
    a, b = _pair()
    a.cmd(f"n NOTIFY SET {PERSONAL}")
    b.cmd("c CREATE Projects")
    assert _pushed(a) == [b'* LIST () "/" "Projects"']
    b.cmd("r RENAME Projects Done")
    assert _pushed(a) == [b'* LIST () "/" "Done" ("OLDNAME" ("Projects"))']
    b.cmd("u SUBSCRIBE Done")
    assert _pushed(a) == [b'* LIST (\\Subscribed) "/" "Done"']
    b.cmd("d DELETE Done")
    assert _pushed(a) == [b'* LIST (\\NonExistent) "/" "Done"']


def test_filters_pick_the_first_matching_group() -> None:
    # RFC 5465 §6: the first matching filter decides; NONE silences a mailbox.
    a, b = _pair()
    a.cmd("n NOTIFY SET (mailboxes Trash NONE) (subtree (Trash Junk) (MessageNew MessageExpunge))"
          " (inboxes (MessageNew MessageExpunge))")
    b.deliver(mailbox="Trash")
    assert _pushed(a) == []
    b.deliver(mailbox="Junk")
    assert _pushed(a)[0].startswith(b'* STATUS "Junk" (MESSAGES 1 ')
    b.deliver(mailbox="INBOX")
    assert _pushed(a)[0].startswith(b'* STATUS "INBOX" (MESSAGES 1 ')
    b.deliver(mailbox="Sent")
    assert _pushed(a) == []


def test_notify_none_stops() -> None:
    # RFC 5465 §3: NOTIFY NONE.
    a, b = _pair()
    a.cmd(f"n NOTIFY SET {PERSONAL}")
    assert a.cmd("n NOTIFY NONE") == [b"n OK NOTIFY completed"]
    b.deliver(mailbox="Sent")
    assert _pushed(a) == []


def test_overflow_sends_notificationoverflow_and_stops(monkeypatch) -> None:
    # RFC 5465 §5.8: a bounded queue; on overflow one OK [NOTIFICATIONOVERFLOW], then nothing.
    monkeypatch.setattr(notifymod, "MAX_PENDING", 2)
    a, b = _pair()
    a.cmd(f"n NOTIFY SET {PERSONAL}")
    for box in ("Sent", "Trash", "Junk"):
        b.deliver(mailbox=box)
    out = _pushed(a)
    assert len(out) == 1 and out[0].startswith(b"* OK [NOTIFICATIONOVERFLOW]")
    assert a.session.notify is None
    b.deliver(mailbox="Archive")
    assert _pushed(a) == []


def test_bad_and_unsupported() -> None:
    # RFC 5465 §5 rules are BAD; §5.9 unknown events are NO [BADEVENT].
    a, _ = _pair()
    assert a.cmd("n NOTIFY SET (personal (MessageNew))")[-1].startswith(b"n BAD")
    assert a.cmd("n NOTIFY SET (personal (MessageNew (UID) MessageExpunge))")[-1].startswith(
        b"n BAD")
    assert a.cmd("n NOTIFY SET (selected (MailboxName))")[-1].startswith(b"n BAD")
    assert a.cmd("n NOTIFY SET (bogus (MailboxName))")[-1].startswith(b"n BAD")
    out = a.cmd("n NOTIFY SET (personal (AnnotationChange MessageNew MessageExpunge))")
    assert out[-1].startswith(b"n NO [BADEVENT (")
    assert a.session.notify is None
    assert Client().cmd("n NOTIFY NONE")[-1].startswith(b"n BAD")  # not authenticated


@pytest.mark.parametrize("line", [
    b"a NOTIFY NONE",
    b"a NOTIFY SET STATUS (selected (MessageNew (UID BODY.PEEK[HEADER.FIELDS (FROM)]) "
    b"MessageExpunge)) (subtree INBOX (MessageNew MessageExpunge))",
    b"a NOTIFY SET (mailboxes (Lists/A Lists/B) (MessageNew MessageExpunge FlagChange)) "
    b"(personal NONE) (subscribed (MailboxName SubscriptionChange MailboxMetadataChange))",
])
def test_parse_encode_parse_fixed_point(line: bytes) -> None:
    # RFC 5465 §8 syntax.
    cmd = _parse(line + b"\r\n")
    assert _parse(encode_command(cmd)) == cmd
