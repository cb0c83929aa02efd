"""Cluster membership: each node registers /members/<node_id> under its lease.

A member whose session lease expires disappears from /members/ by itself:
that is the only death certificate the cluster uses (design: Cluster).  After
the session layer re-grants a lost lease, the registration is written again.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from cluster.etcd import EtcdError, EtcdSession

log = logging.getLogger(__name__)

MEMBERS = "/members/"


class Membership:
    """Registers this node; ``info`` adds e.g. {"listen": [...], "version": "..."}."""

    def __init__(self, session: EtcdSession, node_id: str, info: dict[str, Any]) -> None:
        if not node_id or "/" in node_id:
            raise ValueError(f"bad node id {node_id!r}")
        self.session = session
        self.node_id = node_id
        self.record: dict[str, Any] = {
            "hostname": socket.getfqdn(),
            "started": round(time.time(), 3),
            **info,
            "node_id": node_id,
        }
        self.registrations = 0
        session.add_session_callbacks(on_restored=self._reregister)

    def start(self) -> None:
        """Start the session (if needed) and register under its lease."""
        self.session.start()
        lease = self.session.lease_id
        try:
            self.register()
        except EtcdError as exc:
            # The lease expired under the put (a loaded machine): the session
            # notices, takes a new lease and its restore registers us.
            if lease and self.session.lease_id == lease and "lease not found" not in str(exc):
                raise  # the lease is fine: etcd itself refused
            log.warning("membership: lease %x lost while registering; the new lease registers",
                        lease)

    def register(self) -> None:
        """Write our record under the session lease.

        The record names the lease it lives under: a member whose key carries
        another lease than a shard record's ``primary_lease`` has restarted
        (or lost its session) and leads nothing until the controller says so
        again (docs/cluster.md).
        """
        self.record["lease"] = self.session.lease_id
        self.session.put(MEMBERS + self.node_id, self.record, lease=True)
        self.registrations += 1

    def _reregister(self) -> None:
        try:
            self.register()
            log.info("membership: re-registered %s after session loss", self.node_id)
        except EtcdError as exc:  # the refresher retries when the lease is lost again
            log.warning("membership: re-register failed: %s", exc)

    def stop(self) -> None:
        """Leave the cluster now rather than at lease expiry (best effort)."""
        try:
            self.session.delete(MEMBERS + self.node_id)
        except EtcdError as exc:
            log.warning("membership: deregister failed (the lease expires anyway): %s", exc)

    def list_members(self) -> dict[str, dict[str, Any]]:
        return list_members(self.session)


def list_members(session: EtcdSession) -> dict[str, dict[str, Any]]:
    """node_id -> registration record, for every live member."""
    kvs, _ = session.get_prefix(MEMBERS)
    return {kv.key[len(MEMBERS) :]: kv.value for kv in kvs if isinstance(kv.value, dict)}
