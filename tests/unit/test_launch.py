"""The `postroom` command patches gevent before anything else runs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_console_script_is_the_patching_entry_point() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["postroom"] == "node.launch:main"


def test_launch_patches_sockets_and_threads_before_the_cli_runs() -> None:
    code = (
        "import sys\n"
        "sys.argv = ['postroom', '--help']\n"
        "from node import launch\n"
        "try:\n"
        "    launch.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "from gevent import monkey\n"
        "print(monkey.is_module_patched('socket'), monkey.is_module_patched('threading'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip().splitlines()[-1] == "True True"
