"""Create benchmark accounts whose password hashes are cheap to verify.

    printf 'PASSWORD\n' | python3 tests/bench/provision_cheap.py CONFIG ADDRESS...

Like tests/bench/provision.py (``postroom user add`` in one process), but the
argon2id parameters are lowered (t=1, m=8 KiB) for these accounts only: a
verify reads its parameters from the stored hash, so each LOGIN then costs
well under a millisecond instead of ~30 ms (more on a loaded machine).  The
IMAP benchmarks open thousands of sessions; they measure sessions, not
password hashing.  Never use this for real accounts.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from argon2 import PasswordHasher  # noqa: E402

from node.auth import passwords  # noqa: E402
from tests.bench.provision import run  # noqa: E402

passwords._hasher = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)

if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
