"""Per-account storage quotas (RFC 9208 STORAGE) for every way mail arrives.

The limit is the account's ``quota_bytes`` in the directory (etcd; 0 or
absent = no limit); the usage is the shard's per-account counter
(``MailStore.usage``, kept by the op log, O(1)).  Checked before a write,
not inside it: two concurrent deliveries may each pass and together exceed
the limit by at most one message each (a soft limit, as in Dovecot).
"""

from __future__ import annotations

from node.context import Directory, MailStore


def would_exceed(directory: Directory, store: MailStore, account: str, extra: int) -> bool:
    """True if storing ``extra`` more octets would take the account past its quota.

    ``extra = 0`` asks whether the account is already at or over it (SMTP
    RCPT time, RFC 9208 §5.1: no more mail can be accepted).
    """
    limit = directory.quota(account)
    if limit is None:
        return False
    used, _messages = store.usage(account)
    return used + extra > limit if extra else used >= limit


def full_accounts(directory: Directory, store: MailStore, accounts: list[str], extra: int
                  ) -> list[str]:
    """The accounts among ``accounts`` that cannot take ``extra`` more octets."""
    return [a for a in accounts if would_exceed(directory, store, a, extra)]
