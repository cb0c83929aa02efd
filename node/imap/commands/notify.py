"""The NOTIFY command (RFC 5465); the notifier itself is node/imap/notify.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from node.imap.notify import _CANON, SUPPORTED, Notifier, NotifySpec, parse_notify
from node.imap.protocol import Command, State, register_command
from node.imap.session import Reply, no, ok

_AUTHED = frozenset({State.AUTHENTICATED, State.SELECTED})


def cmd_notify(session: Any, cmd: Command) -> Reply:
    """RFC 5465 §3: NOTIFY SET replaces any earlier set; NOTIFY NONE stops."""
    spec: NotifySpec = cmd.args[0]
    if spec.groups is None:
        session.notify = None
        return ok("NOTIFY completed")
    asked = {e for g in spec.groups for e in g.events}
    if asked - SUPPORTED:
        # RFC 5465 §5.9: BADEVENT lists the events the server supports.
        names = " ".join(_CANON[e] for e in sorted(SUPPORTED))
        return no("unsupported event", f"BADEVENT ({names})")
    notifier = Notifier(spec)
    session.notify = None
    notifier.snapshot(session)
    session.notify = notifier
    return ok("NOTIFY completed")


HANDLERS: dict[str, Callable[..., Reply | None]] = {"NOTIFY": cmd_notify}

register_command("NOTIFY", parse_notify, _AUTHED)
