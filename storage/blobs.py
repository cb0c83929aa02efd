"""Message bodies as immutable, content-addressed files.

Theory of operation: a body is stored once per node under its SHA-256 hex
digest, fanned out as ``ab/cd/<sha>`` so no directory grows huge.  A write
goes to a temporary file in ``tmp/``, is fsynced, renamed into place, and the
destination directory (and any directory created for it) is fsynced, so once
``put`` returns the blob survives a crash.  Callers write the blob *before*
committing the operation that references it (docs/storage.md).

All file I/O runs in gevent's threadpool so a slow disk never blocks the hub.
The garbage collector (storage/reclaim.py) moves unreferenced blobs into
``trash/`` and deletes them only after a second look; meanwhile ``put``,
``read`` and ``exists`` move a trashed blob back, ``put`` of a stored blob
refreshes its mtime (the collector's grace clock), and every name asked for
during a sweep is remembered (``wanted``) so the sweep keeps it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections import OrderedDict
from pathlib import Path

import gevent
from gevent.event import AsyncResult

from storage.model import NoSuchBlob

_SHA_RE = re.compile(r"[0-9a-f]{64}")


def is_blob_name(sha: str) -> bool:
    """True for exactly 64 lower-case hex digits (no path can be smuggled in)."""
    return isinstance(sha, str) and _SHA_RE.fullmatch(sha) is not None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Content-addressed message files under ``root``.

    ``fsync=False`` skips every fsync; use it only for throwaway tests.
    """

    def __init__(
        self,
        root: Path,
        fsync: bool = True,
        cache_bytes: int = 32 * 1024 * 1024,
        cache_max_blob: int = 256 * 1024,
    ) -> None:
        self.root = Path(root)
        self._root_str = str(self.root)
        self.fsync = fsync
        self._tmp = self.root / "tmp"
        self.trash = self.root / "trash"
        # Names put, read or found during a blob sweep (None: no sweep runs);
        # the sweep never deletes them (storage/reclaim.py).  Hub only.
        self.wanted: set[str] | None = None
        # Bounded LRU of small bodies read or written recently.  Blobs are
        # immutable, so a cached copy is never stale; a hit skips the
        # threadpool round trip (the top cost of IMAP FETCH BODY[] on hot
        # mail).  At most cache_bytes in total, none larger than cache_max_blob.
        self.cache_bytes = cache_bytes
        self.cache_max_blob = cache_max_blob
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._writing: dict[str, bytes] = {}  # put_nowait bodies not yet durable

    def open(self) -> None:
        """Create the directories and remove temp files left by a crash.

        Only one process uses a store, so every file in ``tmp/`` is garbage.
        The 256 first-level fan-out directories are made here, with one fsync
        of the root, so no new blob ever has to fsync the root (a young
        store's puts did for most of their first ~1,000 blobs).
        """
        self._tmp.mkdir(parents=True, exist_ok=True)
        self.trash.mkdir(exist_ok=True)  # left to the next sweep: never emptied here
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
        for i in range(256):
            (self.root / f"{i:02x}").mkdir(exist_ok=True)
        if self.fsync:
            _fsync_dir(self.root)

    def path(self, sha: str) -> Path:
        """The file of a blob; raises ValueError unless ``sha`` is 64 lower-case hex."""
        if not is_blob_name(sha):
            raise ValueError("blob name must be 64 lower-case hex digits")
        return self.root / sha[:2] / sha[2:4] / sha

    def exists(self, sha: str) -> bool:
        """True if the blob is stored.  A cached blob was stored durably or
        read here, and the collector drops what it trashes from the cache,
        so a hit costs no stat (a follower asks several times per replicated
        message).  A trashed blob is moved back first."""
        if not is_blob_name(sha):
            return False
        if self.wanted is not None:
            self.wanted.add(sha)
        if sha in self._cache or os.path.isfile(
                os.path.join(self._root_str, sha[:2], sha[2:4], sha)):
            return True
        if not os.path.isfile(os.path.join(self._root_str, "trash", sha)):
            return False
        return gevent.get_hub().threadpool.apply(self._untrash, (sha,))

    def cached(self, sha: str) -> bool:
        """True if the blob is in the LRU: stored durably (or read) here."""
        if sha in self._cache:
            if self.wanted is not None:
                self.wanted.add(sha)
            return True
        return False

    def forget(self, shas: list[str]) -> None:
        """Drop blobs from the cache (the collector trashed them; hub only)."""
        for sha in shas:
            data = self._cache.pop(sha, None)
            if data is not None:
                self._cached -= len(data)

    def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its SHA-256 hex; idempotent."""
        data = bytes(data)
        sha = gevent.get_hub().threadpool.apply(self._put_sync, (data,))
        if self.wanted is not None:
            self.wanted.add(sha)
        self._remember(sha, data)
        return sha

    def put_nowait(self, data: bytes) -> tuple[str, AsyncResult]:
        """Start storing ``data``: its SHA-256 hex at once, and a result set
        to it once the blob is durable (or to the exception).  Meanwhile
        ``read`` answers from memory (replication ships it) while ``exists``
        stays False; whoever references the blob waits for the result."""
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        if self.wanted is not None:
            self.wanted.add(sha)
        self._writing[sha] = data
        done = gevent.get_hub().threadpool.spawn(self._put_sync, data)

        def finished(result: AsyncResult) -> None:
            if self._writing.get(sha) is data:
                del self._writing[sha]
            if result.successful():
                self._remember(sha, data)

        done.rawlink(finished)
        return sha, done

    def read(self, sha: str) -> bytes:
        """The bytes of a blob; raises NoSuchBlob for a bad or unknown name."""
        if not is_blob_name(sha):
            raise NoSuchBlob(sha)
        if self.wanted is not None:
            self.wanted.add(sha)
        data = self._writing.get(sha)
        if data is not None:
            return data
        data = self._cache.get(sha)
        if data is not None:
            self._cache.move_to_end(sha)
            return data
        data = gevent.get_hub().threadpool.apply(self._read_sync, (sha,))
        self._remember(sha, data)
        return data

    def put_in_thread(self, data: bytes) -> str:
        """``put``'s durable write, for a job already in the threadpool (a
        follower's replicated batch writes its new blobs in its own job);
        call ``stored`` on the hub once it returned."""
        return self._put_sync(data)

    def stored(self, sha: str, data: bytes) -> None:
        """On the hub, after ``put_in_thread``: known durable, as ``put`` leaves it."""
        if self.wanted is not None:
            self.wanted.add(sha)
        self._remember(sha, data)

    def _remember(self, sha: str, data: bytes) -> None:
        """Keep a small body in the LRU (hub only: no lock needed)."""
        if len(data) > self.cache_max_blob or sha in self._cache:
            return
        self._cache[sha] = data
        self._cached += len(data)
        while self._cached > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)

    # -- threadpool side -------------------------------------------------

    def _read_sync(self, sha: str) -> bytes:
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError:
            pass
        if not self._untrash(sha):
            raise NoSuchBlob(sha)
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError:
            raise NoSuchBlob(sha) from None

    def _untrash(self, sha: str) -> bool:
        """Move a trashed blob back into place (threadpool); True if it is
        in place now.  A rename: it races safely with the collector."""
        final = self.path(sha)
        try:
            os.replace(self.trash / sha, final)
        except FileNotFoundError:
            return final.is_file()
        if self.fsync:
            _fsync_dir(final.parent)
        return True

    def _put_sync(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        final = self.path(sha)
        try:
            # Immutable: same name, same bytes.  The new mtime restarts the
            # collector's grace period (a delivery commits its op after this).
            os.utime(final)
        except FileNotFoundError:
            pass
        else:
            if self.fsync:
                # Another thread may have just renamed this blob into place and
                # not yet fsynced the directories: our caller commits an op
                # that references it, so make the entries durable here too.
                self._fsync_chain(final.parent)
            return sha
        if self._untrash(sha):
            os.utime(final)
            return sha
        created = self._makedirs(final.parent)
        tmp = self._tmp / f"{sha}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)
        if self.fsync:
            _fsync_dir(final.parent)
            for directory in created:  # new fan-out dirs: make their entries durable
                _fsync_dir(directory.parent)
        return sha

    def _fsync_chain(self, directory: Path) -> None:
        """fsync the fan-out directories of a blob and the root (cheap when clean)."""
        _fsync_dir(directory)
        _fsync_dir(directory.parent)
        _fsync_dir(self.root)

    def _makedirs(self, directory: Path) -> list[Path]:
        """mkdir -p; returns the directories created, deepest first."""
        created: list[Path] = []
        current = directory
        while not current.is_dir():
            created.append(current)
            current = current.parent
        for d in reversed(created):
            d.mkdir(exist_ok=True)
        return created
