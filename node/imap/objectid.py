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
* THREADID: ``T`` + 24 hex digits of SHA-256 of the thread's root
  Message-ID: the first Message-ID of References, else of In-Reply-To, else
  the message's own (RFC 5256 §3 REFERENCES step 1 makes that first
  reference the ancestor of every later one, so in a well-formed thread all
  messages share it).  It depends only on the message's own headers, so it
  never changes and is the same in every mailbox (RFC 8474 §5.2); a
  message with none of those fields gets its own thread (from its blob).
  Two threads that REFERENCES merges only through broken References chains
  or step 5's subject grouping keep distinct ids.

Ids are 1*255 of ALPHA / DIGIT / "_" / "-" (RFC 8474 §3).
"""

from __future__ import annotations

import hashlib
import re

_OBJECTID = re.compile(r"[A-Za-z0-9_-]{1,255}")
MSG_ID = re.compile(r"<([^<>\s@]+@[^<>\s]+)>")  # a Message-ID as RFC 5256 threads read it


def mailbox_id(account: str, uidvalidity: int) -> str:
    digest = hashlib.sha256(f"{account.lower()}\0{uidvalidity}".encode()).hexdigest()
    return "M" + digest[:24]


def email_id(blob: str) -> str:
    return "E" + blob[:24]


def thread_id(headers: dict, blob: str) -> str:
    """RFC 8474 §5.2 THREADID from the parsed headers (storage/mime.py)."""
    for name in ("references", "in_reply_to", "message_id"):
        found = MSG_ID.search(headers.get(name) or "")
        if found:
            return "T" + hashlib.sha256(found.group(1).encode()).hexdigest()[:24]
    return "T" + blob[:24]


def valid(objectid: str) -> bool:
    """RFC 8474 §3 objectid syntax."""
    return bool(_OBJECTID.fullmatch(objectid))
