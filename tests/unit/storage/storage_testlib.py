"""Helpers shared by the storage unit tests (not a test module)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.mailstore import MailStore

META = {"subject": "test"}


@contextmanager
def open_store(path: Path, shards: int = 4, **kwargs) -> Iterator[MailStore]:
    store = MailStore(path, shards, **kwargs)
    store.open()
    try:
        yield store
    finally:
        store.close()


def msg(n: int, size: int = 0) -> bytes:
    body = b"x" * size
    return b"Subject: message %d\r\n\r\nbody %d\r\n" % (n, n) + body
