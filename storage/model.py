"""Plain data types and errors shared by the storage layer and its callers."""

from __future__ import annotations

from dataclasses import dataclass, field

# Default folders of every account, with their RFC 6154 special-use attribute.
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)


class StorageError(Exception):
    """Base of every storage error."""


class StorageUnavailable(StorageError):
    """The change could not be made durable now; nothing of it is visible.

    Callers answer with a temporary failure (451 4.3.0, NO [UNAVAILABLE]).
    """


class NotLeader(StorageUnavailable):
    """The shard has no primary this node can reach right now, or the node
    asked does not lead it (yet): nothing was run, so the caller may retry
    once placement settles (cluster/router.py waits briefly)."""


class StaleEpoch(StorageError):
    """A replicated write or snapshot of an epoch older than this replica knows
    (docs/cluster.md): its sender has been deposed."""

    def __init__(self, known_epoch: int) -> None:
        super().__init__(known_epoch)
        self.known_epoch = known_epoch

    def __str__(self) -> str:
        return f"stale epoch: this replica knows epoch {self.known_epoch}"


class LogMismatch(StorageError):
    """A replicated append whose ``prev`` (index, epoch) is not this replica's
    last log entry; carries the replica's own last entry."""

    def __init__(self, last_index: int, last_epoch: int) -> None:
        super().__init__(last_index, last_epoch)
        self.last_index = last_index
        self.last_epoch = last_epoch

    def __str__(self) -> str:
        return f"log mismatch: this replica's last entry is ({self.last_index}, {self.last_epoch})"


class NoSuchMailbox(StorageError):
    pass


class MailboxExists(StorageError):
    pass


class MailboxNotAllowed(StorageError):
    """E.g. deleting INBOX, or a name that is not valid."""


class SpecialUseInUse(MailboxNotAllowed):
    """Another mailbox of the account already has that special use (RFC 6154 §3)."""


class MetadataTooMany(StorageError):
    """SETMETADATA would exceed the entries allowed per account (RFC 5464 §4.3)."""


@dataclass(frozen=True)
class MailboxInfo:
    name: str  # full hierarchical name, "/" as delimiter, UTF-8
    uidvalidity: int
    special_use: str | None = None  # "\\Sent", ...
    subscribed: bool = False


@dataclass(frozen=True)
class MailboxStatus:
    uidvalidity: int
    uidnext: int
    messages: int
    unseen: int
    highestmodseq: int
    size: int  # sum of message sizes, octets


@dataclass(frozen=True)
class MessageRow:
    uid: int
    flags: frozenset[str]  # system flags with backslash ("\\Seen"), keywords as given
    modseq: int
    size: int  # octets of the stored message
    internaldate: float  # seconds since the epoch, UTC
    blob: str  # SHA-256 hex of the stored message bytes


@dataclass(frozen=True)
class AppendResult:
    account: str
    mailbox: str
    uidvalidity: int
    uid: int
    modseq: int
    blob: str


@dataclass(frozen=True)
class FlagChange:
    uid: int
    flags: frozenset[str]
    modseq: int


@dataclass(frozen=True)
class MailboxChanges:
    """What changed in one mailbox after a given MODSEQ (for session sync)."""

    highestmodseq: int
    changed: list[MessageRow] = field(default_factory=list)  # new or flag-changed, uid order
    expunged: list[int] = field(default_factory=list)  # uids expunged after that modseq


@dataclass(frozen=True)
class TextHits:
    """A full-text SEARCH answer (storage/fts.py): the indexed messages whose
    text contains the needle (exact), and the messages the index could not
    answer for, which the caller checks itself."""

    uids: frozenset[int]
    unindexed: frozenset[int]


class InvalidFlag(StorageError):
    """A flag that is neither a known system flag nor a valid keyword atom."""


class NoSuchBlob(StorageError):
    """No stored message body has that name."""


# -- Outbound queue (storage/queue.py) ---------------------------------------

# Recipient states in the queue.  "pending" is retried; the others are final.
PENDING, DELIVERED, FAILED, RELAYED = "pending", "delivered", "failed", "relayed"


class NoSuchQueueEntry(StorageError):
    pass


@dataclass(frozen=True)
class QueuedRecipient:
    """One recipient of a queued message and its delivery state."""

    address: str
    notify: tuple[str, ...] = ()  # RFC 3461 NOTIFY values upper-case; () = default
    orcpt: str | None = None  # RFC 3461 ORCPT "type;xtext-decoded address"
    state: str = PENDING
    attempts: int = 0
    code: int | None = None  # last SMTP reply code seen for it
    enhanced: str | None = None  # last enhanced status code "x.y.z"
    text: str = ""  # last reply text (or our own reason, e.g. DNS failure)
    remote_mta: str = ""  # host that gave the last reply
    updated: float = 0.0


@dataclass(frozen=True)
class RecipientResult:
    """The outcome of one delivery attempt for one recipient."""

    address: str
    state: str  # DELIVERED | FAILED | RELAYED | PENDING (deferred)
    code: int | None = None
    enhanced: str | None = None
    text: str = ""
    remote_mta: str = ""


@dataclass(frozen=True)
class QueueEntry:
    """A message in the outbound queue with its per-recipient state."""

    id: str
    sender: str  # "" is the null reverse-path (DSNs)
    recipients: tuple[QueuedRecipient, ...]
    blob: str
    size: int
    created: float
    next_attempt: float
    attempts: int = 0
    held: bool = False
    envid: str | None = None  # RFC 3461 ENVID
    ret: str | None = None  # "FULL" | "HDRS" | None (RFC 3461 RET)
    requiretls: bool = False  # RFC 8689
    smtputf8: bool = False  # RFC 6531
    body: str = "7BIT"  # "7BIT" | "8BITMIME" | "BINARYMIME"
    is_dsn: bool = False  # a report: never report about it
    delay_dsn_sent: bool = False
    # The body, when this copy of the entry carries it (an inline body read
    # with the entry, or the one just enqueued); ``blob`` is "" for an inline
    # body (storage/queue.py).  Not part of equality or repr.
    data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def pending(self) -> tuple[QueuedRecipient, ...]:
        return tuple(r for r in self.recipients if r.state == PENDING)
