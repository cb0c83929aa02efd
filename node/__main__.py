"""`python -m node`: the postroom command, gevent monkey-patched first.

``POSTROOM_PROFILE=PATH`` runs the command under cProfile and writes the
statistics to PATH when it returns (``{pid}`` in PATH becomes the process
id).  Only the hub's thread is profiled (threadpool work is not), and
greenlet switches blur cumulative times; per-function own time is reliable.
``POSTROOM_PROFILE_CLOCK=cpu`` times with the hub thread's CPU clock instead
of the wall clock, so time the process spends preempted on a loaded machine
is not charged to whatever function was running.
For benchmarks (tests/bench/cluster.py --profile), never in production.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

from node.cli import main  # noqa: E402


def profiled(path: str) -> int:
    """main() under cProfile; the stats go to path on any exit."""
    import cProfile
    import time

    clock = os.environ.get("POSTROOM_PROFILE_CLOCK")
    profiler = cProfile.Profile(time.thread_time) if clock == "cpu" else cProfile.Profile()
    try:
        return profiler.runcall(main)
    finally:
        profiler.dump_stats(path.replace("{pid}", str(os.getpid())))


_PROFILE = os.environ.get("POSTROOM_PROFILE")
sys.exit(profiled(_PROFILE) if _PROFILE else main())
