"""cluster/etcd.py against a real etcd: KV, CAS, locks, watches, the lease.

Scenarios that need greenlets (watches, the lease refresher) run in a
gevent-patched child process through tests.support.etcd.run_patched; their
functions are named scenario_* so pytest does not collect them directly.
"""

from __future__ import annotations

import time

import gevent
import pytest

from cluster.etcd import EtcdError, EtcdSession, EtcdUnavailable, WatchEvent
from tests.support.etcd import EtcdServer, free_port, run_patched

MODULE = "tests.integration.test_etcd_session"


def _wait(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        gevent.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- plain request/response: no greenlets needed --------------------------


def test_kv_roundtrip_and_prefix_isolation(etcd_server: EtcdServer) -> None:
    s = EtcdSession([etcd_server.client_url], "/t1", 5, 2.0)
    other = EtcdSession([etcd_server.client_url], "/t1x", 5, 2.0)
    rev = s.put("/a/one", {"n": 1, "ü": "ü"})
    assert rev > 0
    s.put("/a/two", [1, 2])
    s.put("/b", "x")
    other.put("/a/three", 3)  # "/t1x/a/three" must not show under "/t1/a"
    kv = s.get("/a/one")
    assert kv is not None and kv.key == "/a/one" and kv.value == {"n": 1, "ü": "ü"}
    assert s.get("/missing") is None
    kvs, revision = s.get_prefix("/a/")
    assert [k.key for k in kvs] == ["/a/one", "/a/two"]
    assert revision >= rev
    assert s.delete("/a/one") is True
    assert s.delete("/a/one") is False
    assert s.delete_prefix("/a/") == 1
    assert s.get_prefix("/a/")[0] == []
    assert other.get("/a/three").value == 3


def test_create_if_absent_and_compare_and_swap(etcd_server: EtcdServer) -> None:
    s = EtcdSession([etcd_server.client_url], "/t2", 5, 2.0)
    assert s.create_if_absent("/k", 1) is True
    assert s.create_if_absent("/k", 2) is False
    kv = s.get("/k")
    assert kv.value == 1
    assert s.compare_and_swap("/k", kv.mod_revision, 3) is True
    assert s.compare_and_swap("/k", kv.mod_revision, 4) is False  # stale revision
    assert s.get("/k").value == 3
    assert s.compare_and_swap("/new", 0, "x") is True  # 0: must be absent
    assert s.compare_and_swap("/new", 0, "y") is False
    assert s.delete_if("/k", kv.mod_revision) is False
    assert s.delete_if("/k", s.get("/k").mod_revision) is True


def test_locks_use_the_session_lease(etcd_server: EtcdServer) -> None:
    a = EtcdSession([etcd_server.client_url], "/t3", 5, 2.0)
    b = EtcdSession([etcd_server.client_url], "/t3", 5, 2.0)
    with pytest.raises(EtcdUnavailable):
        a.acquire("/lock", "a")  # no lease before start()
    a.start()
    b.start()
    try:
        assert a.acquire("/lock", "a") is True
        assert b.acquire("/lock", "b") is False
        assert b.release("/lock") is False  # not b's to release
        assert a.get("/lock").lease == a.lease_id
        a.close()  # revokes the lease: the lock goes with it
        assert b.acquire("/lock", "b") is True
    finally:
        a.close()
        b.close()


def test_unreachable_endpoint_is_one_line_unavailable() -> None:
    s = EtcdSession([f"http://127.0.0.1:{free_port()}"], "/t", 5, 1.0)
    with pytest.raises(EtcdUnavailable) as info:
        s.get("/x")
    assert "\n" not in str(info.value)
    assert "Connection refused" in str(info.value)


def test_rotates_to_a_live_endpoint(etcd_server: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    s = EtcdSession([dead, etcd_server.client_url], "/t4", 5, 1.0)
    s.put("/k", 1)
    assert s.get("/k").value == 1


def test_non_json_value_is_etcd_error(etcd_server: EtcdServer) -> None:
    s = EtcdSession([etcd_server.client_url], "/t5", 5, 2.0)
    s.put("/k", 1)
    # Write raw bytes through the gateway (not through our JSON helpers).
    import base64

    s._post(
        "kv/put",
        {"key": base64.b64encode(b"/t5/k").decode(), "value": base64.b64encode(b"\xff").decode()},
    )
    with pytest.raises(EtcdError):
        s.get("/k")


def test_bad_endpoint_is_refused() -> None:
    with pytest.raises(EtcdError):
        EtcdSession(["ftp://x"], "/t", 5, 1.0)
    with pytest.raises(EtcdError):
        EtcdSession([], "/t", 5, 1.0)


# -- greenlet scenarios (run patched) --------------------------------------


def scenario_watch_survives_etcd_restart() -> None:
    with EtcdServer() as srv:
        writer = EtcdSession([srv.client_url], "/w", 3, 2.0)
        watcher = EtcdSession([srv.client_url], "/w", 3, 2.0)
        watcher.start()
        seen: list[WatchEvent] = []
        _, revision = watcher.get_prefix("/q/")
        watch = watcher.watch_prefix("/q/", seen.append, revision + 1)
        for i in range(5):
            writer.put(f"/q/{i}", i)
        writer.delete("/q/0")
        _wait(lambda: len(seen) == 6, what="first events")
        srv.kill()  # crash, then restart with the same data and ports
        srv.start()
        for i in range(5, 10):
            writer.put(f"/q/{i}", i)
        _wait(lambda: len(seen) == 11, what="events after restart")
        gevent.sleep(0.2)  # nothing more may arrive (no duplicates)
        assert len(seen) == 11
        assert [e.type for e in seen].count("delete") == 1
        assert [e.value for e in seen if e.type == "put"] == list(range(10))
        revisions = [e.mod_revision for e in seen]
        assert revisions == sorted(set(revisions))
        assert watch.rearms >= 1
        watcher.close()


def test_watch_survives_etcd_restart() -> None:
    run_patched(MODULE, "scenario_watch_survives_etcd_restart")


def scenario_session_loss_fires_callbacks(url: str) -> None:
    lost: list[int] = []
    restored: list[int] = []
    s = EtcdSession([url], "/l", 3, 2.0, on_session_lost=lambda: lost.append(1))
    s.add_session_callbacks(on_restored=lambda: restored.append(s.lease_id))
    s.start()
    first = s.lease_id
    s.put("/mine", "x", lease=True)
    # Someone revokes our lease (as an expiry would): the next refresh sees it.
    other = EtcdSession([url], "/l", 3, 2.0)
    other._post("kv/lease/revoke", {"ID": first})
    assert other.get("/mine") is None
    _wait(lambda: restored, what="session restored")
    assert lost == [1]
    assert restored[0] != first and s.lease_id == restored[0]
    s.put("/mine", "y", lease=True)
    assert other.get("/mine").lease == s.lease_id
    s.close()


def test_session_loss_fires_callbacks(etcd_server: EtcdServer) -> None:
    run_patched(MODULE, "scenario_session_loss_fires_callbacks", etcd_server.client_url)


def scenario_hub_keeps_ticking(url: str) -> None:
    """Latency of etcd3gw ops under gevent, and that other greenlets still run."""
    s = EtcdSession([url], "/m", 10, 2.0)
    ticks = [0]

    def ticker() -> None:
        while True:
            ticks[0] += 1
            gevent.sleep(0.001)

    t = gevent.spawn(ticker)
    n = 300
    timings = {}
    for name, op in (
        ("put", lambda i: s.put(f"/k{i}", {"i": i})),
        ("get", lambda i: s.get(f"/k{i}")),
        ("cas", lambda i: s.create_if_absent(f"/c{i}", i)),
    ):
        gevent.sleep(0)
        start = time.perf_counter()
        before = ticks[0]
        for i in range(n):
            op(i)
        elapsed = time.perf_counter() - start
        timings[name] = (elapsed / n * 1000, ticks[0] - before)
    # 50 concurrent greenlets doing puts: the gateway is not serialised.
    start = time.perf_counter()
    gevent.joinall([gevent.spawn(s.put, f"/p{i}", i) for i in range(200)], raise_error=True)
    parallel = time.perf_counter() - start
    t.kill()
    for name, (ms, tk) in timings.items():
        print(f"{name}: {ms:.2f} ms/op, hub ticks during {n} ops: {tk}")
        assert tk > 0, f"hub did not tick during {name}"
    print(f"200 concurrent puts: {parallel * 1000:.0f} ms")


def test_hub_keeps_ticking_during_etcd_ops(etcd_server: EtcdServer) -> None:
    out = run_patched(MODULE, "scenario_hub_keeps_ticking", etcd_server.client_url)
    print(out)


def scenario_membership_reregisters_after_session_loss(url: str) -> None:
    from cluster.membership import Membership, list_members

    s = EtcdSession([url], "/mem", 3, 2.0)
    m = Membership(s, "n1", {"listeners": {"smtp": ["127.0.0.1:25"]}, "version": "t"})
    m.start()
    other = EtcdSession([url], "/mem", 3, 2.0)
    record = list_members(other)["n1"]
    assert record["listeners"] == {"smtp": ["127.0.0.1:25"]} and record["node_id"] == "n1"
    first = s.lease_id
    other._post("kv/lease/revoke", {"ID": first})  # as if the lease expired
    assert list_members(other) == {}
    _wait(lambda: "n1" in list_members(other), what="re-registration")
    assert other.get("/members/n1").lease == s.lease_id != first
    m.stop()
    assert list_members(other) == {}
    s.close()


def test_membership_reregisters_after_session_loss(etcd_server: EtcdServer) -> None:
    run_patched(
        MODULE, "scenario_membership_reregisters_after_session_loss", etcd_server.client_url
    )


def scenario_outage_longer_than_ttl_loses_the_session() -> None:
    with EtcdServer() as srv:
        lost: list[int] = []
        restored: list[int] = []
        s = EtcdSession([srv.client_url], "/o", 2, 1.0, on_session_lost=lambda: lost.append(1))
        s.add_session_callbacks(on_restored=lambda: restored.append(s.lease_id))
        s.start()
        srv.kill()
        _wait(lambda: lost, what="session loss during the outage")
        assert s.lease_id == 0 and not restored
        srv.start()
        _wait(lambda: restored, what="a new lease after the outage")
        s.put("/k", 1, lease=True)
        s.close()


def test_outage_longer_than_ttl_loses_the_session() -> None:
    run_patched(MODULE, "scenario_outage_longer_than_ttl_loses_the_session")
