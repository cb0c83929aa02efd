"""Process-wide maildrop locks (RFC 1939 §4: one session per maildrop).

A POP3 session holds its account's lock from login until it ends, however it
ends; a second session is refused with `-ERR [IN-USE]` (RFC 2449 §8.1.1).
Sessions of an account are served by its shard primary (cluster/proxy.py), so
a lock in this process is the whole story.  Only greenlets of one hub touch
it, so a set suffices: acquire and release never yield.
"""

from __future__ import annotations


class MaildropLocks:
    """Which maildrops have a session in TRANSACTION/UPDATE state."""

    def __init__(self) -> None:
        self._held: set[str] = set()

    def acquire(self, account: str) -> bool:
        """Take the lock for `account`; False if another session holds it."""
        if account in self._held:
            return False
        self._held.add(account)
        return True

    def release(self, account: str) -> None:
        self._held.discard(account)

    def held(self, account: str) -> bool:
        return account in self._held


# The one lock map of this process, shared by POP3 and POP3S listeners.
LOCKS = MaildropLocks()
