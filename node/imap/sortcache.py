"""SORT values kept per mailbox, so a repeated SORT reads no metadata.

Theory of operation: a SORT key's value (RFC 5256 §3: the sent date, the
base subject, the first address ...) depends only on the message, and a
message never changes under its (mailbox UIDVALIDITY, UID) name: UIDs are
never reused within a UIDVALIDITY (RFC 9051 §2.3.1.1).  So the values
computed for one SORT stay right for every later SORT of that mailbox, by
any session.  ``values`` answers from the cache and loads the metadata of
the missing messages only (after a delivery: the new ones), like the sort
keys in Dovecot's index cache.

There is one cache per store object (the process's MailStore), keyed by
(account, UIDVALIDITY), least recently used mailboxes dropped first once
more than ``MAX_VALUES`` values are held (about 100 bytes each).  Values of expunged messages stay until their
mailbox is dropped; they are never asked for, since callers pass live UIDs.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from node.imap.sort import Item, sort_value

MAX_VALUES = 200_000



class _Cache:
    """(account, uidvalidity) -> sort key -> uid -> value, in LRU order."""

    def __init__(self) -> None:
        self.boxes: OrderedDict[tuple[str, int], dict[str, dict[int, Any]]] = OrderedDict()
        self.size = 0

    def evict(self) -> None:
        while self.size > MAX_VALUES and len(self.boxes) > 1:
            _, box = self.boxes.popitem(last=False)
            self.size -= sum(len(v) for v in box.values())


_caches: weakref.WeakKeyDictionary[Any, _Cache] = weakref.WeakKeyDictionary()


def values(
    store: Any,
    account: str,
    uidvalidity: int,
    uids: list[int],
    keys: Iterable[str],
    load: Callable[[list[int]], list[Item]],
) -> tuple[list[int], dict[str, dict[int, Any]]]:
    """(those of ``uids`` that exist, in order; per key, uid -> value);
    ``load(uids)`` gives the Items (with metadata) of messages not cached yet."""
    cache = _caches.get(store)
    if cache is None:
        cache = _caches[store] = _Cache()
    box = cache.boxes.pop((account, uidvalidity), None) or {}
    cache.boxes[(account, uidvalidity)] = box  # most recently used last
    maps = {key: box.setdefault(key, {}) for key in keys}
    if len(maps) == 1:
        (only,) = maps.values()
        missing = [u for u in uids if u not in only]
    else:
        missing = [u for u in uids if any(u not in m for m in maps.values())]
    if not missing:
        return uids, maps
    for item in load(missing):
        for key, m in maps.items():
            if item.uid not in m:
                m[item.uid] = sort_value(item, key)
                cache.size += 1
    cache.evict()
    present = [u for u in uids if all(u in m for m in maps.values())]
    return present, maps
