"""Logging: one line per event on stderr, level from config node.log_level.

Protocol code never logs passwords or message bodies; secrets are wrapped in
`Secret`, whose repr and str are redacted.
"""

from __future__ import annotations

import logging
import sys


class Secret(str):
    """A string that never shows itself in logs, reprs or tracebacks."""

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def reveal(self) -> str:
        return str.__str__(self)


def setup(level: str = "info") -> None:
    # The format uses none of these record fields: skip collecting them
    # (the logging HOWTO's "Optimization"; the caller lookup walks the stack
    # on every record).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]  # no funcName/lineno lookup
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
