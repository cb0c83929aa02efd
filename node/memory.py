"""glibc malloc tuning for a long-running node.

Two measured problems (docs/benchmarks.md): argon2id allocates 19 MiB per
password check in a pool thread, and glibc's dynamic mmap threshold then
rises so later big allocations stay on the heap and are never returned
(RSS grew from ~60 MB to ~200 MB after logins; 75 MB with a fixed
threshold).  And imports leave freed heap behind: one malloc_trim after
start gives back a few MB.  Both are no-ops where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # allocations above this are mmapped and unmapped on free


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def fix_mmap_threshold() -> None:
    """Keep big transient allocations (argon2's 19 MiB) out of the heap."""
    libc = _libc()
    if libc is not None and not libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")


def trim() -> None:
    """Return freed heap pages to the kernel (after start-up)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
