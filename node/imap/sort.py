"""SORT (RFC 5256 §3, DISPLAYFROM/DISPLAYTO from RFC 5957), pure.

Theory of operation: each message SORT looks at is an `Item` built from
what the store keeps (INTERNALDATE, RFC822.SIZE, the metadata parsed at
delivery).  `sort_items` orders them by the criteria, REVERSE applying to
the key that follows it, and breaks every tie by sequence number (RFC 5256
§3: "the order in which they appear in the mailbox").  Strings compare
with `collate`, close to i;unicode-casemap (RFC 5051: case-folded, then
canonically decomposed), which RFC 5256 §3 and RFC 5957 ask for.
`base_subject` is the §2.1 algorithm, shared with THREAD (node/imap/thread.py).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from storage.mime import decode_words

SORT_KEYS = frozenset(
    {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"}
)
MAX_CRITERIA = 16  # sort keys in one SORT (bounded like everything the client sends)


@dataclass
class Item:
    """One message as SORT/THREAD see it."""

    seq: int
    uid: int
    internaldate: float
    size: int
    meta: dict = field(default_factory=dict)

    @cached_property
    def headers(self) -> dict:
        return self.meta.get("headers") or {}

    @cached_property
    def sent(self) -> float:
        """RFC 5256 §2.2: the Date: header in UTC, else INTERNALDATE."""
        value = self.headers.get("date")
        return float(value) if isinstance(value, int | float) else self.internaldate

    @cached_property
    def subject(self) -> tuple[str, bool]:
        """(base subject, is a reply or forward) per RFC 5256 §2.1."""
        return base_subject_and_reply(self.headers.get("subject") or "")


# ---------------------------------------------------------------------------
# Base subject (RFC 5256 §2.1)

_WSP_RUN = re.compile(r"[ \t\r\n]+")
_TRAILER = re.compile(r"(?:\(fwd\)| )$", re.IGNORECASE)  # subj-trailer
_BLOB = r"\[[^\[\]]*\] *"  # subj-blob (after step 1 only SP is left as WSP)
_REFWD = r"(?:re|fwd?) *(?:" + _BLOB + r")?:"  # subj-refwd
_LEADER = re.compile(r"(?:(?:" + _BLOB + r")*" + _REFWD + r"| )", re.IGNORECASE)
_BLOB_RE = re.compile(_BLOB)


def base_subject_and_reply(subject: str) -> tuple[str, bool]:
    """The base subject (RFC 5256 §2.1) and whether a reply/forward marker
    (subj-refwd in step 3, or "[fwd: ...]" in step 6) was removed."""
    # (1) decoded words (metadata keeps the subject decoded; decode again
    # harmlessly for raw input), tabs/continuations to SP, runs of SP to one.
    text = _WSP_RUN.sub(" ", decode_words(subject))
    reply = False
    while True:
        # (2) remove trailing "(fwd)" and WSP.
        while True:
            m = _TRAILER.search(text)
            if not m:
                break
            text = text[: m.start()]
        # (3)-(5) remove leaders and blobs until nothing changes.
        while True:
            before = text
            m = _LEADER.match(text)
            while m and m.end() > 0:
                if m.group(0).strip():
                    reply = True
                text = text[m.end():]
                m = _LEADER.match(text)
            m = _BLOB_RE.match(text)
            if m and text[m.end():].strip():
                text = text[m.end():]
            if text == before:
                break
        # (6) "[fwd: ... ]" wrapper.
        if text[:5].lower() == "[fwd:" and text.endswith("]"):
            text = text[5:-1]
            reply = True
            continue
        return text, reply


def base_subject(subject: str) -> str:
    return base_subject_and_reply(subject)[0]


# ---------------------------------------------------------------------------
# Sort keys


def collate(text: str) -> str:
    """Comparison key for strings (i;unicode-casemap, RFC 5051 §2)."""
    return unicodedata.normalize("NFD", text.casefold())


def _first_address(item: Item, name: str) -> list | None:
    addrs = (item.meta.get("envelope") or {}).get(name) or []
    for a in addrs:
        if isinstance(a, list) and len(a) == 4 and a[2] is not None and a[3] is not None:
            return a  # the first real address, not a group marker
    return None


def _mailbox(item: Item, name: str) -> str:
    """RFC 5256 §3: the addr-mailbox (local part) of the first address."""
    a = _first_address(item, name)
    return collate(a[2] or "") if a else ""


def _display(item: Item, name: str) -> str:
    """RFC 5957 §2: the decoded display-name of the first address, else its
    addr-spec; "" without an address."""
    a = _first_address(item, name)
    if not a:
        return ""
    if a[0]:
        shown = decode_words(a[0]).strip()
        if shown:
            return collate(shown)
    return collate(f"{a[2]}@{a[3]}")


def sort_value(item: Item, key: str) -> Any:
    if key == "ARRIVAL":
        return item.internaldate
    if key == "DATE":
        return item.sent
    if key == "SIZE":
        return item.size
    if key == "SUBJECT":
        return collate(item.subject[0])
    if key in ("FROM", "TO", "CC"):
        return _mailbox(item, key.lower())
    if key == "DISPLAYFROM":
        return _display(item, "from")
    if key == "DISPLAYTO":
        return _display(item, "to")
    raise ValueError(key)  # the parser only accepts SORT_KEYS


def sort_items(items: list[Item], criteria: tuple[tuple[bool, str], ...]) -> list[Item]:
    """Items ordered by criteria ((reverse, key), ...), ties by sequence number."""
    out = sorted(items, key=lambda i: i.seq)
    # Stable sorts from the last key to the first give the lexicographic order.
    for reverse, key in reversed(criteria):
        out.sort(key=lambda i, k=key: sort_value(i, k), reverse=reverse)
    return out
