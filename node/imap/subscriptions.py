"""Subscriptions that outlive their mailbox (RFC 9051 §6.3.7, RFC 5258 §3).

The store keeps the subscribed bit on the mailbox row, so DELETE would take
the subscription with it, but RFC 9051 §6.3.7 says a server "MUST NOT
unilaterally remove an existing mailbox name from the subscription list even
if a mailbox by that name no longer exists".  Names that were subscribed
when IMAP DELETE removed them are kept in one server METADATA entry of the
account (``ENTRY``: the names, UTF-8, one per line), which lives in the
account's shard like every METADATA entry, so it is replicated and replayed
with the mail.  The entry is private to the server: GETMETADATA does not show
it and SETMETADATA cannot write it (commands/metadata.py).

Such a name is reported by LSUB (``\\Noselect``) and by LIST (SUBSCRIBED)
(``\\NonExistent \\Subscribed``, RFC 5258 §3); UNSUBSCRIBE forgets it; a
CREATE of the name subscribes the new mailbox (the subscription was kept
for it).  At most ``MAX_NAMES`` names are kept, the oldest dropped first.
"""

from __future__ import annotations

from typing import Any

ENTRY = "/private/vendor/vendor.postroom/subscriptions"
MAX_NAMES = 1000


def kept(store: Any, account: str) -> list[str]:
    """Subscribed names without a mailbox, oldest first."""
    value = store.get_metadata(account, None).get(ENTRY)
    return value.decode("utf-8").split("\n") if value else []


def _save(store: Any, account: str, names: list[str]) -> None:
    value = "\n".join(names[-MAX_NAMES:]).encode("utf-8") if names else None
    store.set_metadata(account, None, [(ENTRY, value)])


def keep(store: Any, account: str, name: str) -> None:
    """Remember ``name`` as subscribed after its mailbox was deleted."""
    names = kept(store, account)
    if name not in names:
        _save(store, account, [*names, name])


def forget(store: Any, account: str, name: str) -> bool:
    """Drop a kept name; True if it was kept."""
    names = kept(store, account)
    if name not in names:
        return False
    names.remove(name)
    _save(store, account, names)
    return True


def adopt(store: Any, account: str, name: str) -> None:
    """After CREATE: a kept subscription of the name applies to the new mailbox."""
    if forget(store, account, name):
        store.set_subscribed(account, name, True)
