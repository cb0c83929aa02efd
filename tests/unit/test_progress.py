"""node/progress.py: the progress line (bar, percentage, amounts, rate, ETA)."""

from __future__ import annotations

import io

from node.progress import Progress, duration, human


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_units_and_durations() -> None:
    assert human(512, "B") == "512 B"
    assert human(1536, "B") == "1.5 KiB"
    assert human(3 << 30, "B") == "3.0 GiB"
    assert human(42, "objects") == "42 objects"
    assert duration(65) == "1:05"
    assert duration(3725) == "1:02:05"


def test_line_with_a_total_shows_rate_and_eta() -> None:
    p = Progress("verify", total=100 << 20, stream=io.StringIO())
    p.started = 0.0
    p._history.clear()
    p._history.append((0.0, 0.0))
    p.done = 25 << 20
    p._history.append((10.0, p.done))
    line = p.line(now=10.0)  # 25 MiB in 10 s: 2.5 MiB/s, 75 MiB left: 30 s
    assert line.startswith("verify [######..................]  25.0%")
    assert "25.0 MiB / 100.0 MiB" in line and "2.5 MiB/s" in line and "ETA 0:30" in line


def test_without_total_and_final_line() -> None:
    out = io.StringIO()
    with Progress("blobs", unit="objects", stream=out, log_interval=3600) as p:
        p(3)
        p(4)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first advance, then the final line on close
    assert lines[-1].startswith("blobs  7 objects  ")


def test_terminal_redraws_in_place() -> None:
    out = Tty()
    with Progress("restore", total=10, unit="objects", stream=out, interval=0) as p:
        for _ in range(10):
            p()
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 11 and text.endswith("done\n")
    assert "100.0%" in text
