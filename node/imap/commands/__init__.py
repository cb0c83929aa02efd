"""IMAP command families beyond the RFC 3501 core, one module each.

Each family module exposes ``HANDLERS: dict[str, handler]`` (handler(session,
cmd) -> Reply | None, like Session._cmd_* methods) and registers its parsers
and state-table rows with ``protocol.register_command`` when imported.
session.py calls ``register_all`` once, after Session is defined.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# Family modules under node/imap/commands/, imported in this order.
FAMILIES: tuple[str, ...] = ("rev2", "condstore", "listext", "notify", "searchext",
                            "quota", "metadata")


def register_all(handlers: dict[str, Callable[..., Any]]) -> None:
    """Import every family and add its handlers to ``handlers``."""
    for name in FAMILIES:
        module = importlib.import_module(f"node.imap.commands.{name}")
        handlers.update(module.HANDLERS)
