"""RFC 8474 object identifiers, derived from immutable identities (no state).

* MAILBOXID: ``M`` + 24 hex digits of SHA-256(account NUL UIDVALIDITY).  A
  mailbox's UIDVALIDITY never changes while it exists and is never reused
  in its shard (docs/storage.md), and RENAME keeps it, so the id is stable
  across RENAME (RFC 8474 §4.1) and a recreated mailbox gets a new one.
  Renaming INBOX moves its messages to a new mailbox (RFC 3501 §6.3.5): the
  new name gets a new MAILBOXID and INBOX keeps its own.
* EMAILID: ``E`` + the first 24 hex digits of the message's SHA-256 (its
  blob name).  It is the same after COPY and MOVE (§5.1), and two messages
  with identical bytes share it, which RFC 8474 §5.1 allows ("the server
  MAY ... the same EMAILID" for the same content); it is not account-scoped
  because identical content is identical everywhere.
* THREADID: NIL -- postroom does not thread-link messages across the
  mailbox store yet (RFC 8474 §5.2 allows NIL when threads are unsupported).

Ids are 1*255 of ALPHA / DIGIT / "_" / "-" (RFC 8474 §3).
"""

from __future__ import annotations

import hashlib
import re

_OBJECTID = re.compile(r"[A-Za-z0-9_-]{1,255}")


def mailbox_id(account: str, uidvalidity: int) -> str:
    digest = hashlib.sha256(f"{account.lower()}\0{uidvalidity}".encode()).hexdigest()
    return "M" + digest[:24]


def email_id(blob: str) -> str:
    return "E" + blob[:24]


def valid(objectid: str) -> bool:
    """RFC 8474 §3 objectid syntax."""
    return bool(_OBJECTID.fullmatch(objectid))
