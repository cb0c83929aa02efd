"""Small in-memory fakes of the node/context.py Protocols for POP3 unit tests.

They implement only what a POP3 session calls; the interop tests run the same
sessions against the real directory and store.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from node.config import Config, from_dict
from node.context import NodeContext
from storage.model import (
    AppendResult,
    MailboxStatus,
    MessageRow,
    NoSuchBlob,
    StorageUnavailable,
)


class FakeDirectory:
    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.users = users or {"alice@example.test": "alice-pw-1234"}
        self.calls = 0

    def is_local_domain(self, domain: str) -> bool:
        return domain == "example.test"

    def resolve_recipient(self, address: str) -> list[str] | None:
        return [address.lower()] if address.lower() in self.users else None

    def account_exists(self, account: str) -> bool:
        return account in self.users

    def authenticate(self, username: str, password: str) -> str | None:
        self.calls += 1
        account = username.lower()
        return account if self.users.get(account) == password else None


@dataclass
class _Box:
    uidvalidity: int
    uidnext: int = 1
    rows: dict[int, MessageRow] = field(default_factory=dict)


class FakeStore:
    """INBOX-only store; `fail_expunge` / `fail_open` / `fail_read` make calls fail."""

    def __init__(self) -> None:
        self.boxes: dict[str, _Box] = {}
        self.blobs: dict[str, bytes] = {}
        self.fail_expunge = False
        self.fail_open = False
        self.fail_read = False
        self.expunged: list[tuple[str, list[int]]] = []

    def ensure_account(self, account: str) -> None:
        if self.fail_open:
            raise StorageUnavailable("no primary")
        self.boxes.setdefault(account, _Box(uidvalidity=1000 + len(self.boxes)))

    def append(self, account: str, mailbox: str, raw: bytes, **_: Any) -> AppendResult:
        self.ensure_account(account)
        box = self.boxes[account]
        blob = hashlib.sha256(raw).hexdigest()
        self.blobs[blob] = raw
        uid = box.uidnext
        box.uidnext += 1
        box.rows[uid] = MessageRow(uid, frozenset(), uid, len(raw), 0.0, blob)
        return AppendResult(account, mailbox, box.uidvalidity, uid, uid, blob)

    def deliver(self, accounts: Iterable[str], raw: bytes, **kw: Any) -> list[AppendResult]:
        return [self.append(a, "INBOX", raw) for a in accounts]

    def status(self, account: str, name: str) -> MailboxStatus:
        box = self.boxes[account]
        size = sum(r.size for r in box.rows.values())
        return MailboxStatus(box.uidvalidity, box.uidnext, len(box.rows), 0, box.uidnext, size)

    def messages(self, account: str, name: str) -> list[MessageRow]:
        assert name == "INBOX"
        return [self.boxes[account].rows[u] for u in sorted(self.boxes[account].rows)]

    def read_message(self, blob: str) -> bytes:
        if self.fail_read:
            raise StorageUnavailable("disk error")
        if blob not in self.blobs:
            raise NoSuchBlob(blob)
        return self.blobs[blob]

    def expunge(self, account: str, name: str, uids: Iterable[int]) -> list[int]:
        uids = list(uids)
        if self.fail_expunge:
            raise StorageUnavailable("replica did not answer")
        box = self.boxes[account]
        gone = [u for u in uids if box.rows.pop(u, None) is not None]
        self.expunged.append((account, gone))
        return gone


def make_ctx(
    *,
    loopback_plaintext: bool = True,
    tls: ssl.SSLContext | None = None,
    pop3: dict[str, Any] | None = None,
    store: FakeStore | None = None,
    directory: FakeDirectory | None = None,
) -> NodeContext:
    config: Config = from_dict(
        {
            "node": {"allow_plaintext_auth_on_loopback": loopback_plaintext},
            "pop3": {"auth_failure_delay": 0.25, **(pop3 or {})},
        }
    )
    return NodeContext(
        config=config,
        directory=directory or FakeDirectory(),  # type: ignore[arg-type]
        store=store or FakeStore(),  # type: ignore[arg-type]
        tls=tls,  # type: ignore[arg-type]
        hostname="pop.example.test",
    )
