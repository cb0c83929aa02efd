"""Validation and canonical forms of mailbox names and flags.

Mailbox names use "/" as the hierarchy delimiter (RFC 3501 §5.1).  INBOX is
case-insensitive (RFC 3501 §5.1) and is stored as "INBOX", also as the first
component of its children.  Flags are stored as a canonical sorted list:
system flags (RFC 3501 §2.3.2) in their canonical spelling, keywords as given.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from storage.model import InvalidFlag, MailboxNotAllowed

DELIMITER = "/"
MAX_NAME_OCTETS = 1000  # UTF-8 octets of a whole mailbox name
MAX_FLAGS = 128  # flags per message
MAX_KEYWORD_OCTETS = 255

SYSTEM_FLAGS = {f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")}
# RFC 3501 §2.3.2: \Recent is session state, never stored; RFC 9051 drops it.
_IGNORED_FLAGS = {"\\recent"}
# RFC 3501 §9 atom-specials (plus "]" which resp-specials forbids in flags).
_ATOM_SPECIALS = set('(){ %*"\\]')

SPECIAL_USE = {"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"}


def mailbox_name(name: str) -> str:
    """The canonical form of a mailbox name; raises MailboxNotAllowed.

    Rejects empty components (leading, trailing or doubled "/"), control
    characters, the LIST wildcards "*" and "%", and names over 1000 octets.
    """
    if not isinstance(name, str) or not name:
        raise MailboxNotAllowed("empty mailbox name")
    return _checked_mailbox_name(name)


@functools.lru_cache(maxsize=4096)  # every store read checks its mailbox name: once per name
def _checked_mailbox_name(name: str) -> str:
    try:
        octets = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise MailboxNotAllowed("mailbox name is not valid Unicode") from None
    if octets > MAX_NAME_OCTETS:
        raise MailboxNotAllowed("mailbox name too long")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        raise MailboxNotAllowed("control character in mailbox name")
    if "*" in name or "%" in name:
        raise MailboxNotAllowed("wildcard in mailbox name")
    parts = name.split(DELIMITER)
    if any(not p for p in parts):
        raise MailboxNotAllowed("empty hierarchy component in mailbox name")
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return DELIMITER.join(parts)


def special_use(value: str | None) -> str | None:
    """Validate an RFC 6154 special-use attribute (None allowed)."""
    if value is None:
        return None
    for known in SPECIAL_USE:
        if known.lower() == str(value).lower():
            return known
    raise MailboxNotAllowed(f"unknown special-use attribute {value!r}")


def canonical_flags(flags: Iterable[str]) -> list[str]:
    """Sorted, de-duplicated flags; raises InvalidFlag for anything else."""
    out: set[str] = set()
    for flag in flags:
        if not isinstance(flag, str) or not flag:
            raise InvalidFlag("empty flag")
        if flag.startswith("\\"):
            low = flag.lower()
            if low in _IGNORED_FLAGS:
                continue
            if low not in SYSTEM_FLAGS:
                raise InvalidFlag(f"unknown system flag {flag!r}")
            out.add(SYSTEM_FLAGS[low])
            continue
        if len(flag.encode("utf-8", "surrogatepass")) > MAX_KEYWORD_OCTETS:
            raise InvalidFlag("keyword too long")
        if any(ord(c) <= 0x20 or ord(c) >= 0x7F or c in _ATOM_SPECIALS for c in flag):
            raise InvalidFlag(f"keyword is not an atom: {flag!r}")
        out.add(flag)
    if len(out) > MAX_FLAGS:
        raise InvalidFlag("too many flags")
    return sorted(out)
