"""METADATA (RFC 5464) against the fakes: GETMETADATA/SETMETADATA on the
server and on mailboxes, DEPTH, MAXSIZE/LONGENTRIES, limits."""

from __future__ import annotations

import pytest

from storage import shard as shard_ops
from tests.unit.imap.helpers import Client

SPLITS = ["whole", "bytes", "random"]


@pytest.fixture(params=SPLITS)
def client(request) -> Client:
    c = Client(split=request.param)
    c.login()
    return c


def test_capability() -> None:
    c = Client()
    c.login()
    assert b"METADATA" in c.cmd("c CAPABILITY")[0].split()  # RFC 5464 §1


def test_server_entries(client: Client) -> None:
    # RFC 5464 §4.3 / §4.2 with mailbox "" (the server), §3.2.1.1 /shared/comment.
    assert client.cmd('s SETMETADATA "" (/shared/comment "Hello")') == [
        b"s OK SETMETADATA completed"]
    assert client.cmd('g GETMETADATA "" /shared/comment') == [
        b'* METADATA "" ("/shared/comment" "Hello")', b"g OK GETMETADATA completed"]
    # Names are case-insensitive; an entry that does not exist is left out.
    assert client.cmd('g GETMETADATA "" (/Shared/Comment /private/nothing)') == [
        b'* METADATA "" ("/shared/comment" "Hello")', b"g OK GETMETADATA completed"]
    assert client.cmd('g GETMETADATA "" /private/nothing') == [b"g OK GETMETADATA completed"]


def test_mailbox_entries_nil_removes_and_literal_values(client: Client) -> None:
    # RFC 5464 §4.3: NIL removes; values may be literals.
    lines = client.cmd(b's SETMETADATA INBOX (/private/comment {5}\r\nMy\r\n! /shared/comment "x")')
    assert lines[-1] == b"s OK SETMETADATA completed"
    lines = client.cmd("g GETMETADATA INBOX (/private/comment /shared/comment)")
    assert lines[0] == b'* METADATA "INBOX" ("/private/comment" {5}'
    assert lines[1] == b'My'
    assert lines[2] == b'! "/shared/comment" "x")'
    client.cmd("s SETMETADATA INBOX (/private/comment NIL)")
    assert client.cmd("g GETMETADATA INBOX /private/comment") == [b"g OK GETMETADATA completed"]
    assert client.cmd('s SETMETADATA Nope (/private/x "1")')[-1].startswith(b"s NO [NONEXISTENT]")


def test_depth_and_maxsize(client: Client) -> None:
    # RFC 5464 §4.2.2 DEPTH, §4.2.1 MAXSIZE with [METADATA LONGENTRIES n].
    client.cmd('s SETMETADATA "" (/private/a "1" /private/a/b "22" /private/a/b/c "333")')
    assert client.cmd('g GETMETADATA (DEPTH 1) "" /private/a')[0] == (
        b'* METADATA "" ("/private/a" "1" "/private/a/b" "22")')
    assert client.cmd('g GETMETADATA (DEPTH infinity) "" /private/a')[0] == (
        b'* METADATA "" ("/private/a" "1" "/private/a/b" "22" "/private/a/b/c" "333")')
    lines = client.cmd('g GETMETADATA (MAXSIZE 2 DEPTH infinity) "" /private/a')
    assert lines == [b'* METADATA "" ("/private/a" "1" "/private/a/b" "22")',
                     b"g OK [METADATA LONGENTRIES 3] GETMETADATA completed"]


def test_value_too_large_is_maxsize(client: Client) -> None:
    # RFC 5464 §4.3: NO [METADATA MAXSIZE n], and nothing is set.
    from node.imap.commands import metadata

    big = b"v" * (metadata.MAX_VALUE + 1)
    lines = client.cmd(b'g SETMETADATA "" (/private/a "1" /private/big {%d}\r\n' % len(big)
                       + big + b")")
    assert lines[-1] == b"g NO [METADATA MAXSIZE %d] value too large" % metadata.MAX_VALUE
    assert client.cmd('g GETMETADATA "" /private/a') == [b"g OK GETMETADATA completed"]


def test_too_many_entries(client: Client, monkeypatch) -> None:
    # RFC 5464 §4.3: NO [METADATA TOOMANY].
    monkeypatch.setattr(shard_ops, "METADATA_MAX_ENTRIES", 2)
    client.cmd('s SETMETADATA "" (/private/a "1" /private/b "2")')
    assert client.cmd('s SETMETADATA INBOX (/private/c "3")')[-1] == (
        b"s NO [METADATA TOOMANY] too many metadata entries")


@pytest.mark.parametrize("line", [
    'g GETMETADATA "" /other/x',  # RFC 5464 §3.2: /private or /shared
    'g GETMETADATA "" /private/*',  # no wildcards
    'g GETMETADATA "" /private/a/',  # no trailing "/"
    'g GETMETADATA (DEPTH 2) "" /private/a',
    'g GETMETADATA (BOGUS 1) "" /private/a',
    's SETMETADATA "" ()',
])
def test_bad_syntax(client: Client, line: str) -> None:
    assert client.cmd(line)[-1].startswith(line.split()[0].encode() + b" BAD")


def test_entries_go_with_a_deleted_mailbox(client: Client) -> None:
    # RFC 5464 §3.2: deleting a mailbox deletes its annotations.
    client.cmd("c CREATE Tmp")
    client.cmd('s SETMETADATA Tmp (/private/x "1")')
    client.cmd("d DELETE Tmp")
    client.cmd("c CREATE Tmp")
    assert client.cmd("g GETMETADATA Tmp /private/x") == [b"g OK GETMETADATA completed"]
