"""QUOTA (RFC 9208) against the fakes: GETQUOTAROOT, GETQUOTA, SETQUOTA,
STATUS DELETED/DELETED-STORAGE, and OVERQUOTA at APPEND and COPY."""

from __future__ import annotations

import pytest

from tests.unit.imap.helpers import MESSAGE, Client

SPLITS = ["whole", "bytes", "random"]
ACCOUNT = "alice@example.test"


@pytest.fixture(params=SPLITS)
def client(request) -> Client:
    c = Client(split=request.param)
    c.login()
    return c


def _limit(c: Client, octets: int | None) -> None:
    if octets is None:
        c.ctx.directory.quotas.pop(ACCOUNT, None)
    else:
        c.ctx.directory.quotas[ACCOUNT] = octets


def test_capabilities() -> None:
    c = Client()
    c.login()
    caps = c.cmd("c CAPABILITY")[0].split()
    assert b"QUOTA" in caps and b"QUOTA=RES-STORAGE" in caps  # RFC 9208 §3.1
    assert b"QUOTASET" not in caps  # users cannot set limits


def test_getquotaroot_and_getquota(client: Client) -> None:
    # RFC 9208 §4.1.1, §4.1.2: STORAGE in units of 1024 octets.
    _limit(client, 10 * 1024)
    client.deliver()
    assert client.cmd("q GETQUOTAROOT INBOX") == [
        b'* QUOTAROOT "INBOX" ""',
        b'* QUOTA "" (STORAGE 1 10)',
        b"q OK GETQUOTAROOT completed",
    ]
    assert client.cmd('q GETQUOTA ""') == [b'* QUOTA "" (STORAGE 1 10)', b"q OK GETQUOTA completed"]
    assert client.cmd("q GETQUOTA other")[-1].startswith(b"q NO [NONEXISTENT]")
    assert client.cmd("q GETQUOTAROOT Nope")[-1].startswith(b"q NO [NONEXISTENT]")


def test_message_resource_is_not_reported_without_a_limit(client: Client) -> None:
    # RFC 9208 §5.2 MESSAGE: the directory keeps no message-count limit, so
    # the resource is neither advertised (QUOTA=RES-MESSAGE, §3.1) nor listed
    # with an invented limit; the one resource is STORAGE.
    _limit(client, 10 * 1024)
    for _ in range(3):
        client.deliver()
    caps = client.cmd("c CAPABILITY")[0].split()
    assert b"QUOTA=RES-MESSAGE" not in caps
    assert client.cmd('q GETQUOTA ""') == [b'* QUOTA "" (STORAGE 1 10)', b"q OK GETQUOTA completed"]


def test_no_limit_means_no_quota_root(client: Client) -> None:
    # RFC 9208 §4.1.2: a mailbox without quota roots.
    assert client.cmd("q GETQUOTAROOT INBOX") == [
        b'* QUOTAROOT "INBOX"', b"q OK GETQUOTAROOT completed"]
    assert client.cmd('q GETQUOTA ""')[-1].startswith(b"q NO [NONEXISTENT]")


def test_setquota_is_refused_noperm(client: Client) -> None:
    # RFC 9208 §4.1.3; the limit is the administrator's.
    assert client.cmd('q SETQUOTA "" (STORAGE 512)')[-1].startswith(b"q NO [NOPERM]")
    assert client.cmd('q SETQUOTA "" (STORAGE x)')[-1].startswith(b"q BAD")


def test_append_over_quota(client: Client) -> None:
    # RFC 9208 §4.3 / §7: NO [OVERQUOTA], nothing stored.
    _limit(client, len(MESSAGE) + 10)
    lines = client.cmd(b"a APPEND INBOX {%d}\r\n" % len(MESSAGE) + MESSAGE)
    assert lines[-1].startswith(b"a OK [APPENDUID")
    lines = client.cmd(b"a APPEND INBOX {%d}\r\n" % len(MESSAGE) + MESSAGE)
    assert lines[-1] == b"a NO [OVERQUOTA] over quota"
    assert client.store.usage(ACCOUNT) == (len(MESSAGE), 1)


def test_copy_over_quota_and_move_allowed(client: Client) -> None:
    # RFC 9208 §4.4: COPY is refused; MOVE does not change usage.
    client.deliver()
    client.deliver()
    _limit(client, 3 * len(MESSAGE))
    client.cmd("s SELECT INBOX")
    assert client.cmd("c COPY 1:2 Archive")[-1] == b"c NO [OVERQUOTA] over quota"
    assert client.cmd("c COPY 1 Archive")[-1].startswith(b"c OK [COPYUID")
    assert client.cmd("m MOVE 1:2 Trash")[-1].startswith(b"m OK")


def test_status_deleted_and_deleted_storage(client: Client) -> None:
    # RFC 9208 §4.2.1 DELETED, §4.2.2 DELETED-STORAGE (1024-octet units).
    client.deliver()
    client.deliver(flags=["\\Deleted"])
    assert client.cmd("s STATUS INBOX (DELETED DELETED-STORAGE)") == [
        b'* STATUS "INBOX" (DELETED 1 DELETED-STORAGE 1)', b"s OK STATUS completed"]
