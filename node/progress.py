"""Progress bars for long CLI work (backup verify, restores, drills).

A ``Progress`` counts units done (octets or items) toward an optional
total and draws one status line on stderr: a bar, the percentage, done /
total, the rate over the last few seconds and the ETA.  On a terminal the
line is redrawn in place at most every ``interval`` seconds (carriage
return); elsewhere (logs, tests) a plain line is written at most every
``log_interval`` seconds, and always a final line on ``close()``.  A
``Progress`` is callable with the units just done, so it can be handed to
code that takes a ``Callable[[int], None]`` (storage/restore.py).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO

_BAR = 24
_RATE_WINDOW = 5.0  # seconds of history for the rate


def human(amount: float, unit: str) -> str:
    """1536 "B" -> "1.5 KiB"; items: 1234 "" -> "1234"."""
    if unit != "B":
        return f"{amount:.0f}{' ' + unit if unit else ''}"
    for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(amount) < 1024 or prefix == "TiB":
            return f"{amount:.0f} B" if prefix == "B" else f"{amount:.1f} {prefix}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def duration(seconds: float) -> str:
    """65 -> "1:05", 3725 -> "1:02:05"."""
    s = max(0, int(seconds + 0.5))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """One progress line on ``stream`` (default stderr); see the module docstring."""

    def __init__(self, label: str, total: float | None = None, unit: str = "B",
                 stream: TextIO | None = None, interval: float = 0.2,
                 log_interval: float = 5.0) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
        self.done = 0.0
        self.started = time.monotonic()
        self._drawn = float("-inf")  # the first advance draws
        self._history: deque[tuple[float, float]] = deque([(self.started, 0.0)])
        self._closed = False

    def __call__(self, amount: float = 1) -> None:
        self.advance(amount)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_total(self, total: float | None) -> None:
        self.total = total

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        now = time.monotonic()
        self._history.append((now, self.done))
        while len(self._history) > 2 and now - self._history[0][0] > _RATE_WINDOW:
            self._history.popleft()
        if now - self._drawn >= self.interval:
            self._draw(now)

    def rate(self, now: float | None = None) -> float:
        """Units per second over the last few seconds (overall at the end)."""
        now = time.monotonic() if now is None else now
        t0, d0 = self._history[0]
        if self._closed or now - t0 <= 0:
            t0, d0 = self.started, 0.0
        span = now - t0
        return (self.done - d0) / span if span > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        """The status line as drawn."""
        now = time.monotonic() if now is None else now
        rate = self.rate(now)
        speed = f"{human(rate, 'B')}/s" if self.unit == "B" else f"{rate:.1f} {self.unit}/s"
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * _BAR) + "." * (_BAR - int(frac * _BAR))
            left = (self.total - self.done) / rate if rate > 0 else None
            eta = "done" if frac >= 1 else f"ETA {duration(left) if left is not None else '?'}"
            return (f"{self.label} [{bar}] {frac * 100:5.1f}%  {human(self.done, self.unit)}"
                    f" / {human(self.total, self.unit)}  {speed}  {eta}")
        return f"{self.label}  {human(self.done, self.unit)}  {speed}  {duration(now - self.started)}"

    def _draw(self, now: float, final: bool = False) -> None:
        self._drawn = now
        text = self.line(now)
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final line (with the overall rate) once."""
        if self._closed:
            return
        self._closed = True
        self._draw(time.monotonic(), final=True)
