"""Subscriptions outlive DELETE (RFC 9051 §6.3.7; LSUB §6.3.9, RFC 3501
§6.3.9; LIST (SUBSCRIBED) with \\NonExistent, RFC 5258 §3), fake and real store."""

from __future__ import annotations

import pytest

from node.imap import subscriptions
from storage.mailstore import MailStore
from tests.unit.imap.fakes import FakeStore
from tests.unit.imap.helpers import Client


@pytest.fixture(params=["fake", "real"])
def client(request, tmp_path) -> Client:
    if request.param == "fake":
        c = Client(FakeStore())
        c.login()
        yield c
        return
    real = MailStore(tmp_path / "store", 2, fsync=False)
    real.open()
    try:
        c = Client(real)  # type: ignore[arg-type]
        c.login()
        yield c
    finally:
        real.close()


def _subscribed_deleted(client: Client) -> None:
    client.cmd("c CREATE Projects")
    client.cmd("c CREATE Old")
    client.cmd("s SUBSCRIBE Projects")
    client.cmd("s SUBSCRIBE Old")
    assert client.cmd("d DELETE Projects")[-1] == b"d OK DELETE completed"


def test_delete_keeps_the_subscription(client: Client) -> None:
    # RFC 9051 §6.3.7: the server MUST NOT remove a name from the
    # subscription list because its mailbox no longer exists.
    _subscribed_deleted(client)
    lsub = client.cmd('l LSUB "" "*"')
    assert b'* LSUB (\\Noselect) "/" "Projects"' in lsub
    assert b'* LSUB () "/" "Old"' in lsub
    # RFC 5258 §3: LIST (SUBSCRIBED) returns it as \NonExistent \Subscribed.
    ext = client.cmd('l LIST (SUBSCRIBED) "" "*"')
    assert b'* LIST (\\NonExistent \\HasNoChildren \\Subscribed) "/" "Projects"' in ext
    assert b'* LIST (\\HasNoChildren \\Subscribed) "/" "Old"' in ext
    # The plain LIST shows only mailboxes that exist.
    assert not any(b'"Projects"' in line for line in client.cmd('l LIST "" "*"'))
    # It is the server's entry, not the client's METADATA.
    lines = client.cmd('g GETMETADATA (DEPTH infinity) "" /private/vendor')
    assert lines == [b"g OK GETMETADATA completed"]
    assert client.cmd(f'm SETMETADATA "" ({subscriptions.ENTRY} "x")')[-1].startswith(
        b"m NO [NOPERM]")


def test_recreate_and_unsubscribe(client: Client) -> None:
    _subscribed_deleted(client)
    # CREATE of the name: the kept subscription applies to the new mailbox.
    client.cmd("c CREATE Projects")
    assert b'* LSUB () "/" "Projects"' in client.cmd('l LSUB "" "*"')
    client.cmd("d DELETE Projects")
    # UNSUBSCRIBE of the deleted name forgets it (RFC 9051 §6.3.8).
    assert client.cmd("u UNSUBSCRIBE Projects") == [b"u OK UNSUBSCRIBE completed"]
    assert not any(b'"Projects"' in x for x in client.cmd('l LSUB "" "*"'))
    assert not any(b'"Projects"' in x for x in client.cmd('l LIST (SUBSCRIBED) "" "*"'))
    client.cmd("c CREATE Projects")
    assert not any(b'"Projects"' in x for x in client.cmd('l LSUB "" "*"'))


def test_delete_of_an_unsubscribed_mailbox_keeps_nothing(client: Client) -> None:
    client.cmd("c CREATE Scratch")
    client.cmd("d DELETE Scratch")
    assert not any(b"Scratch" in x for x in client.cmd('l LSUB "" "*"'))
    assert not any(b"Scratch" in x for x in client.cmd('l LIST (SUBSCRIBED) "" "*"'))
