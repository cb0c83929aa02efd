"""OBJECTID (RFC 8474) and SAVEDATE (RFC 8514), over the fake and the real store."""

from __future__ import annotations

import datetime
import hashlib
import re

import pytest

from node.imap import objectid
from storage.mailstore import MailStore
from tests.unit.imap.fakes import FakeStore
from tests.unit.imap.helpers import MESSAGE, Client

ACCOUNT = "alice@example.test"


@pytest.fixture(params=["fake", "real"])
def client(request, tmp_path) -> Client:
    if request.param == "fake":
        store = FakeStore()
        c = Client(store)
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


def test_capabilities(client: Client) -> None:
    caps = client.cmd("c CAPABILITY")[0].split()
    assert b"OBJECTID" in caps and b"SAVEDATE" in caps


def test_mailboxid_on_select_status_create_and_stable_across_rename(client: Client) -> None:
    # RFC 8474 §4.1 (CREATE), §4.2 (SELECT response code, STATUS MAILBOXID),
    # and "MUST NOT change when the mailbox is renamed".
    created = client.cmd("c CREATE Projects")[-1]
    mid = re.search(rb"MAILBOXID \((M[0-9a-f]{24})\)", created).group(1)
    assert objectid.valid(mid.decode())
    assert client.cmd("s STATUS Projects (MAILBOXID)")[0] == (
        b'* STATUS "Projects" (MAILBOXID (%s))' % mid)
    client.cmd("r RENAME Projects Done")
    assert client.cmd("s STATUS Done (MAILBOXID)")[0] == b'* STATUS "Done" (MAILBOXID (%s))' % mid
    assert b"* OK [MAILBOXID (%s)] mailbox id" % mid in client.cmd("s SELECT Done")
    inbox = client.cmd("s STATUS INBOX (MAILBOXID)")[0]
    assert mid not in inbox  # distinct mailboxes, distinct ids
    # A mailbox recreated under the same name is a new mailbox (§4.1).
    client.cmd("u UNSELECT")
    client.cmd("d DELETE Done")
    again = client.cmd("c CREATE Done")[-1]
    assert mid not in again


def test_emailid_fetch_and_search(client: Client) -> None:
    # RFC 8474 §5.1 EMAILID is kept by COPY; §6 SEARCH EMAILID.
    client.deliver()
    other = MESSAGE.replace(b"Hello there", b"Other")
    client.deliver(other)
    emailid = "E" + hashlib.sha256(MESSAGE).hexdigest()[:24]
    client.cmd("s SELECT INBOX")
    lines = client.cmd("f FETCH 1 (EMAILID)")
    assert lines[0] == b"* 1 FETCH (EMAILID (%s))" % emailid.encode()
    client.cmd("c COPY 1 Archive")
    assert client.cmd(f"s SEARCH EMAILID {emailid}")[0] == b"* SEARCH 1"
    client.cmd("x EXAMINE Archive")
    assert client.cmd("f FETCH 1 EMAILID")[0] == b"* 1 FETCH (EMAILID (%s))" % emailid.encode()


def _threaded(mid: str, subject: str, references: str = "", in_reply_to: str = "") -> bytes:
    head = f"From: a@example.test\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n"
    if references:
        head += f"References: {references}\r\n"
    if in_reply_to:
        head += f"In-Reply-To: {in_reply_to}\r\n"
    return (head + "\r\nbody\r\n").encode()


def _threadids(client: Client, cmd: str) -> dict[int, bytes]:
    out = {}
    for line in client.cmd(cmd)[:-1]:
        m = re.fullmatch(rb"\* (\d+) FETCH \(THREADID \((T[0-9a-f]{24})\)\)", line)
        assert m, line
        out[int(m.group(1))] = m.group(2)
    return out


def test_threadid_follows_references_threads(client: Client) -> None:
    # RFC 8474 §5.2: one THREADID per thread, the same in every mailbox and
    # never changing; messages THREAD=REFERENCES (RFC 5256 §3) puts in one
    # tree share it, other threads get other ids.
    client.deliver(_threaded("<root@x>", "plan"))
    client.deliver(_threaded("<r1@x>", "Re: plan", "<root@x>"))
    client.deliver(_threaded("<r2@x>", "Re: plan", "<root@x> <r1@x>"))
    client.deliver(_threaded("<r3@x>", "Re: plan", in_reply_to="<r1@x>"))  # no References
    client.deliver(_threaded("<other@x>", "lunch"))
    client.deliver(b"Subject: no ids\r\n\r\nbody\r\n")
    client.cmd("s SELECT INBOX")
    ids = _threadids(client, "f FETCH 1:* (THREADID)")
    assert all(objectid.valid(v.decode()) for v in ids.values())
    assert ids[1] == ids[2] == ids[3]
    # Other threads, and a message without any Message-ID, get their own ids.
    # (A reply with only In-Reply-To is keyed by its parent, r1, not by the
    # root: a known limit, docs/imap.md.)
    assert ids[4] != ids[5] and ids[5] != ids[1] and ids[6] not in (ids[1], ids[5])
    assert client.cmd("t THREAD REFERENCES UTF-8 1:3,5")[0] == b"* THREAD (1 2 3)(5)"
    # SEARCH THREADID (RFC 8474 §6) finds the whole thread.
    assert client.cmd(f"s SEARCH THREADID {ids[1].decode()}")[0] == b"* SEARCH 1 2 3"
    assert client.cmd("s SEARCH THREADID T000000000000000000000000")[0] == b"* SEARCH"
    # Stable across COPY (another mailbox) and for later messages of the thread.
    client.cmd("c COPY 2 Archive")
    client.cmd("x EXAMINE Archive")
    assert _threadids(client, "f FETCH 1 (THREADID)") == {1: ids[1]}


def test_savedate_fetch_and_search(client: Client) -> None:
    # RFC 8514 §4.3 FETCH SAVEDATE, §4.2 SAVEDBEFORE/SAVEDON/SAVEDSINCE, SAVEDATESUPPORTED.
    client.deliver()  # internal date 2023-11-14, saved today
    client.cmd("s SELECT INBOX")
    line = client.cmd("f FETCH 1 (SAVEDATE INTERNALDATE)")[0]
    m = re.fullmatch(rb'\* 1 FETCH \(SAVEDATE "([^"]+)" INTERNALDATE "14-Nov-2023[^"]*"\)', line)
    assert m, line
    saved = datetime.datetime.strptime(m.group(1).decode(), "%d-%b-%Y %H:%M:%S %z")
    now = datetime.datetime.now(datetime.UTC)
    assert abs((now - saved).total_seconds()) < 24 * 3600
    saved_day = saved.astimezone(datetime.UTC).strftime("%d-%b-%Y")
    assert client.cmd("s SEARCH SAVEDSINCE 1-Jan-2024")[0] == b"* SEARCH 1"
    assert client.cmd("s SEARCH SAVEDBEFORE 1-Jan-2024")[0] == b"* SEARCH"
    assert client.cmd("s SEARCH SINCE 1-Jan-2024")[0] == b"* SEARCH"  # internal date differs
    assert client.cmd(f"s SEARCH SAVEDON {saved_day}")[0] == b"* SEARCH 1"
    assert client.cmd("s SEARCH SAVEDON 14-Nov-2023")[0] == b"* SEARCH"
    assert client.cmd("s SEARCH SAVEDATESUPPORTED")[0] == b"* SEARCH 1"
