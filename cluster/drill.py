"""Failover drills: ``postroom drill failover`` (load, fault, checker, report).

Theory of operation
-------------------
A drill runs against a live cluster.  The node side is only the RPC method
``drill.fault`` (:func:`register_fault_handler`): it kills (SIGKILL) or
freezes (SIGSTOP for ``duration`` seconds, then SIGCONT) the node itself,
after the answer has been sent.  Only holders of a cluster certificate can
call it (node-to-node mTLS).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import gevent

log = logging.getLogger(__name__)

FAULT_DELAY = 0.2  # seconds between answering drill.fault and the fault itself
MAX_FREEZE = 3600.0


def fault_command(pid: int, duration: float, delay: float = FAULT_DELAY) -> list[str]:
    """The detached shell that freezes ``pid`` for ``duration`` seconds."""
    return ["sh", "-c", f"sleep {delay:.3f}; kill -STOP {pid}; sleep {duration:.3f}; "
            f"kill -CONT {pid}"]


def _fault(peer: str, args: dict, attachments: list[bytes]) -> tuple[dict, list[bytes]]:
    """drill.fault {kind: "kill" | "freeze", duration}: answer, then do it."""
    kind = args.get("kind")
    pid = os.getpid()
    if kind == "kill":
        log.warning("drill: SIGKILL of this node (pid %d) requested by %s", pid, peer)
        gevent.spawn_later(FAULT_DELAY, os.kill, pid, signal.SIGKILL)
        return {"pid": pid, "kind": kind, "delay": FAULT_DELAY}, []
    if kind == "freeze":
        duration = float(args.get("duration", 0))
        if not 0 < duration <= MAX_FREEZE:
            raise ValueError(f"freeze duration must be in (0, {MAX_FREEZE:.0f}] seconds")
        log.warning("drill: freeze of this node (pid %d) for %.1f s requested by %s",
                    pid, duration, peer)
        subprocess.Popen(fault_command(pid, duration), start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        return {"pid": pid, "kind": kind, "delay": FAULT_DELAY, "duration": duration}, []
    raise ValueError(f"unknown fault kind {kind!r} (kill or freeze)")


def register_fault_handler(rpc_server) -> None:
    """Serve ``drill.fault`` on this node's RPC server (node/app.py calls it)."""
    rpc_server.register("drill.fault", _fault)
