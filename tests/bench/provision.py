"""Create the benchmark's accounts through the postroom CLI, in one process.

    printf 'PASSWORD\n' | python3 tests/bench/provision.py CONFIG ADDRESS...

Equivalent to running ``python3 -m node --config CONFIG user add ADDRESS``
once per address (the same ``node.cli.main``, password on stdin), without
paying the interpreter and import start-up a hundred times.
"""

from gevent import monkey

monkey.patch_all()

import io  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node.cli import main  # noqa: E402


def run(config: str, addresses: list[str]) -> int:
    password = sys.stdin.readline().rstrip("\r\n")
    for address in addresses:
        sys.stdin = io.StringIO(password + "\n")
        rc = main(["--config", config, "user", "add", address])
        if rc:
            print(f"user add {address} failed with {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
