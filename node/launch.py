"""The `postroom` command's entry point: gevent's monkey-patching first.

Both the console script (pyproject.toml) and ``python -m node`` start here,
so sockets, ``time.sleep``, threads and the etcd client's HTTP calls are
cooperative before any other module is imported.

``POSTROOM_PROFILE=PATH`` runs the command under cProfile and writes the
statistics to PATH when it returns (``{pid}`` in PATH becomes the process
id).  Only the hub's thread is profiled (threadpool work is not), and
greenlet switches blur cumulative times; per-function own time is reliable.
``POSTROOM_PROFILE_CLOCK=cpu`` times with the hub thread's CPU clock instead
of the wall clock, so time the process spends preempted on a loaded machine
is not charged to whatever function was running.
For benchmarks (tests/bench/cluster.py --profile), never in production.
"""

from __future__ import annotations

import os


def patch() -> None:
    """``gevent.monkey.patch_all()``, with the installed packages scanned once.

    patch_all announces ~25 events, and for each gevent asks
    ``importlib.metadata.entry_points(group=...)`` for plugins, which rereads
    every installed distribution's metadata: ~10 ms each, about 0.3 s of CPU
    per process start with ~140 distributions (a third of a CLI command's
    start-up).  Here one scan answers them all (the same entry points, in the
    same order, loaded and called as before); the original function is back
    once patch_all returns."""
    from importlib import metadata

    from gevent import monkey

    scanned = metadata.entry_points()
    original = metadata.entry_points

    def entry_points(**params):  # type: ignore[no-untyped-def]
        return scanned.select(**params) if params else scanned

    metadata.entry_points = entry_points  # type: ignore[assignment]
    try:
        monkey.patch_all()
    finally:
        metadata.entry_points = original  # type: ignore[assignment]


def main() -> int:
    """Patch, then run the CLI (under cProfile when POSTROOM_PROFILE is set)."""
    patch()
    from node.cli import main as cli_main

    path = os.environ.get("POSTROOM_PROFILE")
    if not path:
        return cli_main()
    import cProfile
    import time

    clock = os.environ.get("POSTROOM_PROFILE_CLOCK")
    profiler = cProfile.Profile(time.thread_time) if clock == "cpu" else cProfile.Profile()
    try:
        return profiler.runcall(cli_main)
    finally:
        profiler.dump_stats(path.replace("{pid}", str(os.getpid())))
