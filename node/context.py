"""What a protocol session may call: the node's services, as typed interfaces.

Protocol servers receive one NodeContext.  Unit tests of sessions pass fakes
that satisfy these Protocols; integration tests run the real ones.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

from node.auth.sasl import ScramCredentials
from node.config import Config
from storage.model import (
    AppendResult,
    FlagChange,
    MailboxChanges,
    MailboxInfo,
    MailboxStatus,
    MessageRow,
    QueuedRecipient,
    QueueEntry,
    RecipientResult,
    TextHits,
)


class Directory(Protocol):
    """Domains, accounts and aliases (cluster/directory.py, kept in etcd)."""

    def is_local_domain(self, domain: str) -> bool: ...

    def resolve_recipient(self, address: str) -> list[str] | None:
        """Accounts an address delivers to after alias/catch-all expansion.

        None means unknown (550 5.1.1).  postmaster@ every local domain never
        gives None (RFC 5321 §4.5.1).  Addresses are compared case-insensitively
        in the domain and lower-cased in the local part.
        """
        ...

    def account_exists(self, account: str) -> bool: ...

    def quota(self, account: str) -> int | None:
        """The account's storage quota in octets (RFC 9208), None for no limit."""
        ...

    def authenticate(self, username: str, password: str) -> str | None:
        """The canonical account name, or None.  Hashing runs off the hub."""
        ...

    def scram_credentials(self, username: str) -> ScramCredentials | None:
        """Stored SCRAM-SHA-256 keys (RFC 5802 §3), None for unknown users or
        accounts whose password predates SCRAM."""
        ...

    def sender_allowed(self, account: str, address: str) -> bool:
        """May the account use this address as its envelope sender (its own
        address or an alias that delivers to it)?"""
        ...

    def dkim_keys(self, domain: str) -> list[dict]:
        """Active DKIM key records of a local domain, RSA first."""
        ...


class DkimSigner(Protocol):
    """node/outbound/dkim.py Signer."""

    def sign(self, raw: bytes, domain: str) -> bytes:
        """raw with DKIM-Signature fields prepended (unchanged without keys)."""
        ...


class MailStore(Protocol):
    """Every account's mailboxes (storage/mailstore.py).

    Writes go through the shard's operation log, group-committed off the hub,
    and return only once durable; on failure they raise StorageUnavailable
    and leave nothing visible.  Names use "/" as hierarchy delimiter.
    """

    def ensure_account(self, account: str) -> None: ...

    def delete_account(self, account: str) -> None: ...

    def deliver(
        self,
        accounts: Iterable[str],
        raw: bytes,
        *,
        mailbox: str = "INBOX",
        flags: Iterable[str] = (),
        internaldate: float | None = None,
    ) -> list[AppendResult]:
        """Store one message for several accounts: blob written once, then one
        append per account, all committed before returning."""
        ...

    def append(
        self,
        account: str,
        mailbox: str,
        raw: bytes,
        *,
        flags: Iterable[str] = (),
        internaldate: float | None = None,
    ) -> AppendResult: ...

    def list_mailboxes(self, account: str) -> list[MailboxInfo]: ...

    def create_mailbox(
        self, account: str, name: str, special_use: str | None = None
    ) -> MailboxInfo: ...

    def delete_mailbox(self, account: str, name: str) -> None: ...

    def rename_mailbox(self, account: str, old: str, new: str) -> None: ...

    def set_subscribed(self, account: str, name: str, subscribed: bool) -> None: ...

    def status(self, account: str, name: str) -> MailboxStatus: ...

    def mailbox_state(self, account: str, name: str) -> tuple[int, int, int]:
        """(uidvalidity, uidnext, highestmodseq): status() without its aggregates."""
        ...

    def messages(self, account: str, name: str) -> list[MessageRow]:
        """Every message in the mailbox, ascending UID."""
        ...

    def metadata(self, account: str, name: str, uids: Iterable[int]) -> dict[int, dict]:
        """Parsed metadata stored at delivery (storage/mime.py), per uid."""
        ...

    def rows(self, account: str, name: str, uids: Iterable[int]) -> dict[int, MessageRow]:
        """The rows of those UIDs that exist, by UID (at most 1,000,000 UIDs)."""
        ...

    def uid_flags(self, account: str, name: str) -> list[tuple[int, frozenset[str]]]:
        """(uid, flags) of every message, ascending UID; equal flag sets may
        be one shared object."""
        ...

    def read_message(self, blob: str) -> bytes: ...

    def store_flags(
        self,
        account: str,
        name: str,
        uids: Iterable[int],
        mode: str,  # "set" | "add" | "remove"
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> list[FlagChange]:
        """Changed messages only; each change gets a new MODSEQ."""
        ...

    def expunge(self, account: str, name: str, uids: Iterable[int]) -> list[int]: ...

    def copy(
        self, account: str, src: str, uids: Iterable[int], dst: str
    ) -> tuple[int, list[tuple[int, int]]]:
        """(destination uidvalidity, [(source uid, new uid)])."""
        ...

    def move(
        self, account: str, src: str, uids: Iterable[int], dst: str
    ) -> tuple[int, list[tuple[int, int]]]:
        """RFC 6851: copy and expunge atomically (one op);
        (destination uidvalidity, [(source uid, new uid)])."""
        ...

    def changes_since(self, account: str, name: str, modseq: int) -> MailboxChanges: ...

    def search_text(self, account: str, name: str, field: str, needle: str) -> TextHits | None:
        """The full-text index's answer for one SEARCH string key (storage/fts.py):
        field "text", "body", "hdr" (any header line; candidates only), "subject",
        "from", "to", "cc" or "bcc"; case-insensitive substring (RFC 3501 §6.4.4).
        Exact for ``uids``; ``unindexed`` messages must be checked by the caller.
        None if the index cannot answer that needle."""
        ...

    def usage(self, account: str) -> tuple[int, int]:
        """(octets, messages) the account stores (RFC 9208 STORAGE, MESSAGE)."""
        ...

    def savedates(self, account: str, name: str, uids: Iterable[int]) -> dict[int, float | None]:
        """RFC 8514 save dates per uid (None: not known, FETCH SAVEDATE NIL)."""
        ...

    def get_metadata(self, account: str, mailbox: str | None) -> dict[str, bytes]:
        """RFC 5464 entries (lower-case names) of a mailbox; None is the server."""
        ...

    def set_metadata(
        self, account: str, mailbox: str | None, entries: Iterable[tuple[str, bytes | None]]
    ) -> None:
        """Set or (None) remove entries, all or none; raises MetadataTooMany."""
        ...

    def watch(self, account: str, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call callback(mailbox_name) on the hub after each committed change
        to the account; returns a function that stops watching."""
        ...


class OutboundQueue(Protocol):
    """The outbound queue (storage/queue.py), kept in the shard logs.

    Every method that changes the queue returns only once the change is
    committed (group commit, like the mailboxes) and raises
    StorageUnavailable otherwise.
    """

    def enqueue(
        self,
        sender: str,
        recipients: Iterable[QueuedRecipient],
        raw: bytes,
        *,
        envid: str | None = None,
        ret: str | None = None,
        requiretls: bool = False,
        smtputf8: bool = False,
        body: str = "7BIT",
        is_dsn: bool = False,
    ) -> QueueEntry: ...

    def get(self, queue_id: str) -> QueueEntry | None: ...

    def due(self, now: float, limit: int, *, shards: Iterable[int] | None = None,
            exclude: Collection[str] = ()) -> list[QueueEntry]:
        """Entries not held, with pending recipients, next_attempt <= now, of
        ``shards`` (default: every local / led shard), ids in ``exclude`` left out."""
        ...

    def next_due(self, *, after: float | None = None,
                 shards: Iterable[int] | None = None) -> float | None: ...

    def record_attempt(
        self,
        queue_id: str,
        results: Iterable[RecipientResult],
        next_attempt: float | None,
        *,
        delay_dsn_sent: bool | None = None,
    ) -> QueueEntry | None:
        """Apply results; an entry with no pending recipient left is removed
        (None is returned)."""
        ...

    def read_message(self, blob: str) -> bytes: ...

    def read_body(self, entry: QueueEntry) -> bytes:
        """An entry's message: inline in its row, or its blob file."""
        ...

    def watch(self, callback: Callable[..., None], *, entries: bool = False
              ) -> Callable[[], None]:
        """callback() on the hub after each committed enqueue/retry/release;
        with ``entries=True`` callback(new entry) or callback(None)."""
        ...


class ClusterView(Protocol):
    """Where each shard is led, as this node sees etcd (cluster/manager.py).

    None in NodeContext means single-node mode: every shard is led here.
    """

    node_name: str

    def shard_of(self, account: str) -> int: ...

    def primary_of(self, number: int) -> str | None:
        """Member name of shard ``number``'s primary, None while it has none."""
        ...

    def rpc_address(self, node: str) -> str | None:
        """The HOST:PORT a member's RPC server listens on, None if not a member."""
        ...

    def is_local_primary(self, number: int) -> bool:
        """True while this node leads the shard and may commit to it."""
        ...

    def local_primary_shards(self) -> list[int]: ...

    def on_role_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """callback(shard) on the hub after this node gains or loses the lead
        of a shard, or the shard's primary changes; returns a cancel function."""
        ...


@dataclass
class NodeContext:
    """The services one node process offers its protocol servers."""

    config: Config
    directory: Directory
    store: MailStore
    tls: ssl.SSLContext  # server context, TLS 1.2 minimum
    hostname: str
    queue: OutboundQueue | None = None  # outbound queue (submission, DSNs)
    dkim: DkimSigner | None = None  # signs remote-bound mail of local domains
    cluster: ClusterView | None = None  # None: single node (cluster/manager.py)
