"""Password hashes: argon2id (RFC 9106), t=2, m=19 MiB, p=1 (OWASP minimum).

Hashing takes ~30 ms of CPU and releases the GIL, so it runs in a small
bounded thread pool (gevent's hub threadpool when the process is
monkey-patched, else a plain one); calling argon2 directly on the hub would
stall every connection for the whole hash.  Never log or repr a password.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from argon2 import PasswordHasher
from argon2 import exceptions as argon2_exc

T = TypeVar("T")

TIME_COST = 2
MEMORY_COST_KIB = 19 * 1024
PARALLELISM = 1
POOL_SIZE = 4  # concurrent hashes at most; each holds 19 MiB while it runs

_hasher = PasswordHasher(time_cost=TIME_COST, memory_cost=MEMORY_COST_KIB, parallelism=PARALLELISM)
_pool_lock = threading.Lock()
_pool = None


def _threadpool():  # -> gevent.threadpool.ThreadPool
    global _pool
    with _pool_lock:
        if _pool is None:
            from gevent.threadpool import ThreadPool

            _pool = ThreadPool(POOL_SIZE)
        return _pool


def run_off_hub(fn: Callable[..., T], *args: object) -> T:
    """Run fn(*args) in the bounded hash pool and wait cooperatively."""
    return _threadpool().apply(fn, args)


def _hash(password: str) -> str:
    return _hasher.hash(password)


def _verify(encoded: str, password: str) -> bool:
    try:
        return _hasher.verify(encoded, password)
    except (argon2_exc.VerificationError, argon2_exc.InvalidHashError):
        return False


def hash_password(password: str) -> str:
    """The PHC string ($argon2id$v=19$m=19456,t=2,p=1$...) of password."""
    if not password:
        raise ValueError("empty password")
    return run_off_hub(_hash, password)


def verify_password(encoded: str, password: str) -> bool:
    """True when password matches; False on mismatch or a malformed hash."""
    return run_off_hub(_verify, encoded, password)


def needs_rehash(encoded: str) -> bool:
    """True when the hash was made with other parameters than ours."""
    try:
        return _hasher.check_needs_rehash(encoded)
    except (argon2_exc.InvalidHashError, ValueError):
        return True


# Verified against for unknown users, so a miss costs as much as a hit.
_DUMMY_HASH: str | None = None


def dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password("postroom-dummy-password-never-valid")
    return _DUMMY_HASH
