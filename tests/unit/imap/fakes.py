"""In-memory fakes of the node/context.py Protocols for IMAP session tests.

The fake store keeps several mailboxes per account with UIDs, MODSEQs,
expunge history and watchers, like storage/mailstore.py; the integration
and interop tests run the same sessions against the real store.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from node.config import Config, from_dict
from node.context import NodeContext
from storage import fts
from storage import shard as shard_ops
from storage.mime import parse_metadata
from storage.model import (
    DEFAULT_MAILBOXES,
    AppendResult,
    FlagChange,
    MailboxChanges,
    MailboxExists,
    MailboxInfo,
    MailboxNotAllowed,
    MailboxStatus,
    MessageRow,
    MetadataTooMany,
    NoSuchMailbox,
    SpecialUseInUse,
    StorageUnavailable,
    TextHits,
)


class FakeDirectory:
    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.users = users or {
            "alice@example.test": "alice-pw-1234",
            "bob@example.test": "bob-pw-1234",
        }
        self.quotas: dict[str, int] = {}  # account -> octets (RFC 9208 STORAGE)

    def quota(self, account: str) -> int | None:
        """The account's storage limit in octets, None for no limit."""
        return self.quotas.get(account.lower()) or None

    def is_local_domain(self, domain: str) -> bool:
        return domain == "example.test"

    def resolve_recipient(self, address: str) -> list[str] | None:
        return [address.lower()] if address.lower() in self.users else None

    def account_exists(self, account: str) -> bool:
        return account in self.users

    def authenticate(self, username: str, password: str) -> str | None:
        account = username.lower()
        return account if self.users.get(account) == password else None


@dataclass
class _Box:
    info: MailboxInfo
    uidnext: int = 1
    rows: dict[int, MessageRow] = field(default_factory=dict)
    expunged: list[tuple[int, int]] = field(default_factory=list)  # (modseq, uid)
    highestmodseq: int = 1  # per mailbox, like storage/shard.py (RFC 7162 §3.1.1)
    saved: dict[int, float] = field(default_factory=dict)  # RFC 8514 save dates


class FakeStore:
    """Set `unavailable = True` to make every write raise StorageUnavailable."""

    def __init__(self) -> None:
        self.accounts: dict[str, dict[str, _Box]] = {}
        self.blobs: dict[str, bytes] = {}
        self.meta: dict[str, dict] = {}
        self.modseq = 1
        self.uidvalidity = 1000
        self.unavailable = False
        self.watchers: dict[str, list[Callable[[str], None]]] = {}
        self.entries: dict[tuple[str, int], dict[str, bytes]] = {}  # METADATA

    # -- helpers
    def _write(self) -> None:
        if self.unavailable:
            raise StorageUnavailable("no primary")

    def _box(self, account: str, name: str) -> _Box:
        try:
            return self.accounts[account][name]
        except KeyError:
            raise NoSuchMailbox(name) from None

    def _next_modseq(self, box: _Box) -> int:
        # Per mailbox, as the shard decides them (HIGHESTMODSEQ + 1).
        self.modseq += 1
        box.highestmodseq += 1
        return box.highestmodseq

    def _notify(self, account: str, name: str) -> None:
        for cb in list(self.watchers.get(account, [])):
            cb(name)

    # -- Protocol
    def ensure_account(self, account: str) -> None:
        self._write()
        boxes = self.accounts.setdefault(account, {})
        for name, use in DEFAULT_MAILBOXES:
            if name not in boxes:
                self.uidvalidity += 1
                boxes[name] = _Box(MailboxInfo(name, self.uidvalidity, use, True))

    def delete_account(self, account: str) -> None:
        self.accounts.pop(account, None)

    def deliver(self, accounts: Iterable[str], raw: bytes, *, mailbox: str = "INBOX",
                flags: Iterable[str] = (), internaldate: float | None = None
                ) -> list[AppendResult]:
        return [self.append(a, mailbox, raw, flags=flags, internaldate=internaldate)
                for a in accounts]

    def append(self, account: str, mailbox: str, raw: bytes, *, flags: Iterable[str] = (),
               internaldate: float | None = None) -> AppendResult:
        self._write()
        box = self._box(account, mailbox)
        blob = hashlib.sha256(raw).hexdigest()
        self.blobs[blob] = raw
        self.meta[blob] = parse_metadata(raw)
        uid = box.uidnext
        box.uidnext += 1
        modseq = self._next_modseq(box)
        box.rows[uid] = MessageRow(uid, frozenset(flags), modseq, len(raw),
                                   time.time() if internaldate is None else internaldate, blob)
        box.saved[uid] = time.time()
        self._notify(account, mailbox)
        return AppendResult(account, mailbox, box.info.uidvalidity, uid, modseq, blob)

    def list_mailboxes(self, account: str) -> list[MailboxInfo]:
        return [b.info for b in self.accounts.get(account, {}).values()]

    def create_mailbox(self, account: str, name: str, special_use: str | None = None
                       ) -> MailboxInfo:
        self._write()
        boxes = self.accounts[account]
        if name in boxes:
            raise MailboxExists(name)
        if special_use is not None and any(b.info.special_use == special_use
                                           for b in boxes.values()):
            raise SpecialUseInUse(special_use)
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in boxes:
                self.uidvalidity += 1
                boxes[sub] = _Box(MailboxInfo(sub, self.uidvalidity, special_use if sub == name
                                              else None))
                self._notify(account, sub)  # the shard reports every created name
        return boxes[name].info

    def delete_mailbox(self, account: str, name: str) -> None:
        self._write()
        if name == "INBOX":
            raise MailboxNotAllowed(name)
        self._box(account, name)
        del self.accounts[account][name]
        self._notify(account, name)

    def rename_mailbox(self, account: str, old: str, new: str) -> None:
        self._write()
        boxes = self.accounts[account]
        box = self._box(account, old)
        if new in boxes:
            raise MailboxExists(new)
        del boxes[old]
        self.uidvalidity += 1
        box.info = MailboxInfo(new, box.info.uidvalidity, box.info.special_use,
                               box.info.subscribed)
        boxes[new] = box
        self._notify(account, old)  # like the shard: both names
        self._notify(account, new)

    def set_subscribed(self, account: str, name: str, subscribed: bool) -> None:
        self._write()
        box = self._box(account, name)
        i = box.info
        box.info = MailboxInfo(i.name, i.uidvalidity, i.special_use, subscribed)
        self._notify(account, name)

    def status(self, account: str, name: str) -> MailboxStatus:
        box = self._box(account, name)
        rows = box.rows.values()
        return MailboxStatus(
            box.info.uidvalidity, box.uidnext, len(box.rows),
            sum(1 for r in rows if "\\Seen" not in r.flags), box.highestmodseq,
            sum(r.size for r in rows),
        )

    def mailbox_state(self, account: str, name: str) -> tuple[int, int, int]:
        box = self._box(account, name)
        return box.info.uidvalidity, box.uidnext, box.highestmodseq

    def messages(self, account: str, name: str) -> list[MessageRow]:
        box = self._box(account, name)
        return [box.rows[u] for u in sorted(box.rows)]

    def rows(self, account: str, name: str, uids: Iterable[int]) -> dict[int, MessageRow]:
        box = self._box(account, name)
        return {u: box.rows[u] for u in sorted(set(uids)) if u in box.rows}

    def uid_flags(self, account: str, name: str) -> list[tuple[int, frozenset[str]]]:
        box = self._box(account, name)
        return [(u, box.rows[u].flags) for u in sorted(box.rows)]

    def metadata(self, account: str, name: str, uids: Iterable[int]) -> dict[int, dict]:
        box = self._box(account, name)
        return {u: self.meta[box.rows[u].blob] for u in uids if u in box.rows}

    def read_message(self, blob: str) -> bytes:
        return self.blobs[blob]

    def store_flags(self, account: str, name: str, uids: Iterable[int], mode: str,
                    flags: Iterable[str], unchanged_since: int | None = None
                    ) -> list[FlagChange]:
        self._write()
        box = self._box(account, name)
        flags = frozenset(flags)
        out = []
        for u in uids:
            row = box.rows.get(u)
            if row is None:
                continue
            # RFC 7162 §3.1.3: UNCHANGEDSINCE fails for messages modified after it.
            if unchanged_since is not None and row.modseq > unchanged_since:
                continue
            new = {"set": flags, "add": row.flags | flags, "remove": row.flags - flags}[mode]
            if new != row.flags:
                m = self._next_modseq(box)
                box.rows[u] = MessageRow(u, frozenset(new), m, row.size, row.internaldate,
                                         row.blob)
                out.append(FlagChange(u, frozenset(new), m))
        if out:
            self._notify(account, name)
        return out

    def expunge(self, account: str, name: str, uids: Iterable[int]) -> list[int]:
        self._write()
        box = self._box(account, name)
        gone = sorted(u for u in set(uids) if u in box.rows)
        modseq = self._next_modseq(box) if gone else 0  # one MODSEQ per expunge, as the shard
        for u in gone:
            del box.rows[u]
            box.expunged.append((modseq, u))
        if gone:
            self._notify(account, name)
        return gone

    def copy(self, account: str, src: str, uids: Iterable[int], dst: str
             ) -> tuple[int, list[tuple[int, int]]]:
        self._write()
        sbox, dbox = self._box(account, src), self._box(account, dst)
        pairs = []
        for u in sorted(uids):
            row = sbox.rows.get(u)
            if row is None:
                continue
            new = dbox.uidnext
            dbox.uidnext += 1
            dbox.rows[new] = MessageRow(new, row.flags, self._next_modseq(dbox), row.size,
                                        row.internaldate, row.blob)
            dbox.saved[new] = time.time()
            pairs.append((u, new))
        if pairs:
            self._notify(account, dst)
        return dbox.info.uidvalidity, pairs

    def move(self, account: str, src: str, uids: Iterable[int], dst: str
             ) -> tuple[int, list[tuple[int, int]]]:
        self._write()
        sbox, dbox = self._box(account, src), self._box(account, dst)
        pairs = []
        for u in sorted(set(uids)):
            row = sbox.rows.get(u)
            if row is None:
                continue
            new = dbox.uidnext
            dbox.uidnext += 1
            dbox.rows[new] = MessageRow(new, row.flags, self._next_modseq(dbox), row.size,
                                        row.internaldate, row.blob)
            dbox.saved[new] = time.time()
            pairs.append((u, new))
        if pairs:
            gone = self._next_modseq(sbox)
            for u, _ in pairs:
                del sbox.rows[u]
                sbox.expunged.append((gone, u))
            self._notify(account, src)
            if dst != src:
                self._notify(account, dst)
        return dbox.info.uidvalidity, pairs

    def search_text(self, account: str, name: str, field: str, needle: str
                    ) -> TextHits | None:
        """Like MailStore.search_text: every message is indexed at once."""
        if field not in ("text", *fts.FIELDS) or not fts.usable(needle):
            return None
        box = self._box(account, name)
        found, unindexed = set(), set()
        for u, row in box.rows.items():
            doc = fts.extract(self.blobs[row.blob], self.meta[row.blob])
            if doc is None:
                unindexed.add(u)
            elif fts.doc_matches(doc, field, needle):
                found.add(u)
        return TextHits(frozenset(found), frozenset(unindexed))

    def changes_since(self, account: str, name: str, modseq: int) -> MailboxChanges:
        box = self._box(account, name)
        changed = [box.rows[u] for u in sorted(box.rows) if box.rows[u].modseq > modseq]
        expunged = [u for m, u in box.expunged if m > modseq]
        return MailboxChanges(box.highestmodseq, changed, expunged)

    # -- QUOTA usage, SAVEDATE, METADATA (RFC 9208, 8514, 5464), like MailStore
    def usage(self, account: str) -> tuple[int, int]:
        rows = [r for b in self.accounts.get(account, {}).values() for r in b.rows.values()]
        return sum(r.size for r in rows), len(rows)

    def savedates(self, account: str, name: str, uids: Iterable[int]
                  ) -> dict[int, float | None]:
        box = self._box(account, name)
        return {u: box.saved.get(u) for u in uids if u in box.rows}

    def _meta_key(self, account: str, mailbox: str | None) -> tuple[str, int]:
        return account, 0 if mailbox is None else self._box(account, mailbox).info.uidvalidity

    def get_metadata(self, account: str, mailbox: str | None) -> dict[str, bytes]:
        return dict(self.entries.get(self._meta_key(account, mailbox), {}))

    def set_metadata(self, account: str, mailbox: str | None,
                     entries: Iterable[tuple[str, bytes | None]]) -> None:
        self._write()
        key = self._meta_key(account, mailbox)
        new = dict(self.entries.get(key, {}))
        for e, v in entries:
            if v is None:
                new.pop(e.lower(), None)
            else:
                new[e.lower()] = bytes(v)
        others = sum(len(d) for k, d in self.entries.items() if k[0] == account and k != key)
        if others + len(new) > shard_ops.METADATA_MAX_ENTRIES:
            raise MetadataTooMany(account)
        self.entries[key] = new

    def watch(self, account: str, callback: Callable[[str], None]) -> Callable[[], None]:
        self.watchers.setdefault(account, []).append(callback)
        return lambda: self.watchers[account].remove(callback)


def make_context(store: FakeStore | None = None, **sections: Any) -> NodeContext:
    raw: dict[str, Any] = {"node": {"allow_plaintext_auth_on_loopback": True}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    config: Config = from_dict(raw)
    return NodeContext(
        config=config,
        directory=FakeDirectory(),
        store=store or FakeStore(),
        tls=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
        hostname="mx.example.test",
    )
