"""Sample a running postroom node with py-spy and summarise the hot spots.

Used by ``run.py --profile DIR``: py-spy records collapsed stacks (``-f raw``,
one ``frame;frame;... count`` line per distinct stack) while one load runs;
``summary`` ranks functions by self samples (leaf frame) and by inclusive
samples (anywhere on the stack).  Idle threads are left out (py-spy's
default) and only the thread holding the GIL is sampled (``--gil``), so the
figures are shares of the Python CPU time of the node: what to optimise in a
one-core process.  Time spent in fsync or sqlite without the GIL is not in
it; the load's latency figures show that side.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def available() -> bool:
    return shutil.which("py-spy") is not None


class Recorder:
    """One py-spy process sampling PID until stop()."""

    def __init__(self, pid: int, output: Path, rate: int = 200) -> None:
        self.output = output
        self.proc = subprocess.Popen(
            ["py-spy", "record", "-p", str(pid), "-r", str(rate), "-f", "raw",
             "--nolineno", "--gil", "-o", str(output)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> None:
        """SIGINT makes py-spy write its output and exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _frame_name(frame: str) -> str:
    m = FRAME.match(frame.strip())
    return f"{m['func']} ({m['file']})" if m else frame.strip()


def summary(path: Path, top: int = 12) -> str:
    """Markdown: the top functions by self and inclusive share of samples."""
    self_counts: collections.Counter[str] = collections.Counter()
    file_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no profile written to {path})\n"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_counts[frames[-1]] += n
        file_counts[frames[-1].rpartition(" (")[2].rstrip(")")] += n
        for name in set(frames):
            incl_counts[name] += n
    if not total:
        return "(no samples)\n"
    out = [f"{total} busy samples", "", "| self % | function |", "|---:|---|"]
    out += [f"| {100 * c / total:.1f} | `{f}` |" for f, c in self_counts.most_common(top)]
    out += ["", "| self % | file |", "|---:|---|"]
    out += [f"| {100 * c / total:.1f} | `{f}` |" for f, c in file_counts.most_common(top)]
    out += ["", "| inclusive % | function |", "|---:|---|"]
    skip = ("<module>", "run (gevent", "_run (gevent", "__run_task", "run_forever")
    shown = 0
    for f, c in incl_counts.most_common():
        if any(s in f for s in skip) or c == total:
            continue
        out.append(f"| {100 * c / total:.1f} | `{f}` |")
        shown += 1
        if shown >= top:
            break
    return "\n".join(out) + "\n"
