"""etcd over TLS with authentication (tests/support/etcd_cluster.py, 3 real
members) through cluster/etcd.py: KV, lease and watches with a token, expired
tokens renewed for requests and watches, a member crash losing no watch
event, and every request without the right credentials refused.

Scenarios that need greenlets (watches, the lease refresher) run in a
gevent-patched child process (tests.support.etcd.run_patched).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import gevent
import pytest

from cluster import ca
from cluster.etcd import EtcdError, WatchEvent, session_from_config
from node.config import EtcdSettings
from tests.support.etcd import run_patched
from tests.support.etcd_cluster import EtcdCluster

MODULE = "tests.integration.cluster.test_etcd_tls_auth"


def _settings(etcd: EtcdCluster, **changes) -> EtcdSettings:
    return EtcdSettings(**{**etcd.settings(), "lease_ttl": 3, "timeout": 3.0, **changes})


def scenario_session_over_tls_with_auth() -> None:
    """KV, lease and watch through TLS with a token; an expired token is
    renewed; a member crash loses no watch event."""
    with tempfile.TemporaryDirectory() as tmp, EtcdCluster(Path(tmp), token_ttl=1) as etcd:
        session = session_from_config(_settings(etcd))
        session.start()
        assert session.lease_id and session.authentications == 1
        seen: list[WatchEvent] = []
        _, revision = session.get_prefix("/q/")
        session.watch_prefix("/q/", seen.append, revision + 1)
        for i in range(5):
            session.put(f"/q/{i}", i)
        session.put("/q/leased", "x", lease=True)
        assert session.get("/q/leased").lease == session.lease_id
        _wait(lambda: len(seen) == 6, "events before the crash")

        # Sessions without a lease refresher let their tokens go idle: etcd
        # drops them after token_ttl.  The next request re-authenticates once;
        # a watch re-armed with the dead token is refused, re-authenticates
        # and resumes where it was.
        idle = session_from_config(_settings(etcd))
        idle.put("/idle", 1)
        watcher = session_from_config(_settings(etcd))
        watched: list[WatchEvent] = []
        idle_watch = watcher.watch_prefix("/q/", watched.append, revision + 1)
        _wait(lambda: len(watched) == 6, "the second watch's first events")
        assert (idle.authentications, watcher.authentications) == (1, 1)
        gevent.sleep(etcd.token_ttl + 1.5)  # let the tokens expire (etcd checks every 1 s)
        assert idle.get("/idle").value == 1
        assert idle.authentications == 2
        idle_watch.rearm()
        _wait(lambda: watcher.authentications == 2, "the watch to re-authenticate")

        member = session._index  # crash the member this session talks to
        etcd.kill(member)
        for i in range(5, 8):
            session.put(f"/q/{i}", i)  # served by the others
        etcd.start(member)
        session._index = member
        for i in range(8, 10):
            session.put(f"/q/{i}", i)
        _wait(lambda: len(seen) == 11 and len(watched) == 11, "events after the crash")
        gevent.sleep(0.3)  # nothing more may arrive (no duplicates)
        for events in (seen, watched):
            values = [e.value for e in events if e.key != "/q/leased"]
            assert values == list(range(10)), values
            revisions = [e.mod_revision for e in events]
            assert revisions == sorted(set(revisions))
        watcher.close()
        session.close()
        print("ok")


def _wait(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        gevent.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_session_over_tls_with_auth() -> None:
    assert "ok" in run_patched(MODULE, "scenario_session_over_tls_with_auth")


def test_requests_without_credentials_are_refused(etcd_cluster: EtcdCluster) -> None:
    good = session_from_config(_settings(etcd_cluster))
    good.put("/probe", 1)

    anonymous = session_from_config(_settings(etcd_cluster, username="", password_file=""))
    with pytest.raises(EtcdError, match="user name is empty"):
        anonymous.get("/probe")
    with pytest.raises(EtcdError, match="user name is empty"):
        anonymous.put("/probe", 2)

    wrong = Path(etcd_cluster.base_dir / "wrong.password")
    wrong.write_text("wrong\n")
    with pytest.raises(EtcdError, match="authentication as 'postroom' failed"):
        session_from_config(_settings(etcd_cluster, password_file=str(wrong))).get("/probe")

    with pytest.raises(EtcdError, match="permission denied"):  # outside the role's prefix
        session_from_config(_settings(etcd_cluster, prefix="/elsewhere")).put("/x", 1)

    no_cert = session_from_config(_settings(etcd_cluster, cert="", key=""))
    with pytest.raises(EtcdError, match="TLS handshake failed"):  # etcd requires a client cert
        no_cert.get("/probe")

    stranger_ca = etcd_cluster.base_dir / "stranger-ca.crt"
    stranger_ca.write_bytes(ca.create_ca("stranger")[0])
    with pytest.raises(EtcdError, match=r"TLS handshake failed: \[SSL: CERTIFICATE_VERIFY_FAILED\]"):
        session_from_config(_settings(etcd_cluster, ca_cert=str(stranger_ca))).get("/probe")

    # The raw gateway without a token: refused, nothing written.
    status, body = etcd_cluster.request(
        0, "/v3/kv/put", {"key": "L3Bvc3Ryb29tL3Byb2Jl", "value": "Mg=="})  # /postroom/probe
    assert status in (401, 403) and "error" in body
    assert good.get("/probe").value == 1
