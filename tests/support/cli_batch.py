"""Run several ``postroom`` commands in one process (test setup helper).

    echo '[{"argv": ["--config", "C", "domain", "add", "x.test"], "stdin": ""}]' \
        | python3 tests/support/cli_batch.py

Each command goes through the same ``node.cli.main`` as ``python -m node``
(gevent patched first, by node/launch.py's ``patch()``), in order, with its
own stdin (a password line) and its own captured stdout and stderr.  The answer, on
stdout, is one JSON list of ``{"rc", "stdout", "stderr"}``.  A command that
fails does not stop the ones after it: the caller decides.  This spares the
interpreter and import start-up (about a second of CPU) per command that a
cluster's setup would otherwise pay seven times.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node.launch import patch  # noqa: E402  (imports nothing that patching would miss)

patch()

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402

from node.cli import main  # noqa: E402


def run_one(argv: list[str], stdin: str) -> dict:
    """One command: its exit code and what it wrote."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse errors
                rc = exc.code if isinstance(exc.code, int) else 2
    finally:
        sys.stdin = saved
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def run(commands: list[dict]) -> list[dict]:
    return [run_one(list(c["argv"]), c.get("stdin") or "") for c in commands]


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin)), sys.stdout)
