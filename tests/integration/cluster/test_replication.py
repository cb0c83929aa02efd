"""Replication with real pieces in one process: a real etcd, three MailStores,
three RpcServers/RpcClients over real mTLS on 127.0.0.1 (certificates from
cluster/ca.py) and three ClusterManagers.  The test writes /shards/0000 the
way the controller would.

Each scenario needs greenlets (watches, the lease refresher, RPC readers),
so it runs in a gevent-patched child process (tests.support.etcd.run_patched).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import gevent
import pytest

from cluster import ca, replication
from cluster.controller import Controller
from cluster.etcd import EtcdSession
from cluster.manager import ClusterManager
from cluster.membership import Membership
from cluster.placement import ShardRecord
from cluster.replication import ShardRecords, blob_refs, op_from_wire, op_to_wire, shard_key
from cluster.rpc import RpcClient, RpcServer
from node.config import ClusterSettings, Config
from storage.mailstore import MailStore, shard_of
from storage.model import StorageError, StorageUnavailable
from storage.shard import Op
from tests.support.etcd import EtcdServer, run_patched

MODULE = "tests.integration.cluster.test_replication"
PREFIX = "/repl-test"
SHARDS = 2
SHARD = 0
CONFIG = Config(cluster=ClusterSettings(
    enabled=True, ack_timeout=5.0, rpc_timeout=10.0, catchup_batch=4))


def _wait(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        gevent.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _account(number: int, tag: str = "user") -> str:
    for i in range(1000):
        account = f"{tag}{i}@example.test"
        if shard_of(account, SHARDS) == number:
            return account
    raise AssertionError("no account for that shard")


def _message(n: int) -> bytes:
    return (f"From: a@example.test\r\nTo: b@example.test\r\nSubject: message {n}\r\n\r\n"
            f"body {n}\r\n" + "x" * 3000 * (n % 3) + "\r\n").encode()


class Node:
    """One cluster node's pieces (no protocol listeners)."""

    def __init__(self, name: str, base: Path, etcd_url: str, ca_pem: tuple[bytes, bytes]) -> None:
        self.name = name
        self.dir = base / name
        self.etcd_url = etcd_url
        self.cert_dir = self.dir / "certs"
        cert, key = ca.issue_node_cert(ca_pem[0], ca_pem[1], name, ["127.0.0.1"])
        ca.write_node_files(self.cert_dir, ca_pem[0], cert, key)
        self.port = 0
        self.running = False

    def start(self) -> None:
        self.session = EtcdSession([self.etcd_url], PREFIX, lease_ttl=4, timeout=2.0)
        self.session.start()
        self.store = MailStore(self.dir / "mail", SHARDS, default_role="none")
        self.store.open()
        self.client = RpcClient(ca.client_context(self.cert_dir))
        self.start_server()
        self.manager = ClusterManager(CONFIG, self.session, self.store, self.server,
                                      self.client, {"shards": SHARDS}, self.name)
        Membership(self.session, self.name, {"rpc": self.address}).register()
        self.manager.start()
        self.running = True

    def start_server(self) -> None:
        self.server = RpcServer(f"127.0.0.1:{self.port}", ca.server_context(self.cert_dir))
        self.server.start()
        self.address = self.server.bound_address
        self.port = int(self.address.rsplit(":", 1)[1])
        if hasattr(self, "manager"):
            self.manager.service.register(self.server)

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        self.manager.stop()
        self.server.stop()
        self.client.close()
        self.store.close()
        self.session.close()
        del self.manager

    @property
    def lease(self) -> int:
        return self.session.lease_id

    def digest(self) -> tuple[tuple[int, int], str]:
        return self.store.position_digest(SHARD)


class Cluster:
    def __init__(self, base: Path, etcd_url: str) -> None:
        ca_pem = ca.create_ca("test")
        self.nodes = {n: Node(n, base, etcd_url, ca_pem) for n in ("n1", "n2", "n3")}
        self.admin = EtcdSession([etcd_url], PREFIX, lease_ttl=4, timeout=2.0)
        for node in self.nodes.values():
            node.start()

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def record(self) -> ShardRecord:
        return ShardRecord.from_json(self.admin.get(shard_key(SHARD)).value)

    def write_record(self, **changes) -> ShardRecord:
        """Create or CAS /shards/0000 as the controller would."""
        kv = self.admin.get(shard_key(SHARD))
        if kv is None:
            record = ShardRecord(epoch=1, primary="n1", primary_lease=self["n1"].lease,
                                 replicas=("n1", "n2", "n3"), isr=("n1", "n2", "n3"))
            record = ShardRecord.from_json({**record.to_json(), **changes})
            assert self.admin.create_if_absent(shard_key(SHARD), record.to_json())
            return record
        record = ShardRecord.from_json({**kv.value, **changes})
        assert self.admin.compare_and_swap(shard_key(SHARD), kv.mod_revision, record.to_json())
        return record

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.admin.close()


def _start(base: str, url: str) -> Cluster:
    cluster = Cluster(Path(base), url)
    cluster.write_record()
    _wait(lambda: cluster["n1"].manager.is_local_primary(SHARD), "n1 leads shard 0")
    # On a slow machine n1's promotion sync may time out on a follower and
    # shrink the ISR; catch-up then adds it back.  Scenarios start from a full ISR.
    _wait(lambda: cluster.record().isr == ("n1", "n2", "n3"), "all three in the ISR")
    assert not cluster["n2"].manager.is_local_primary(SHARD)
    assert cluster["n2"].store.role(SHARD) == ("follower", 1)
    return cluster


def _deliver(node: Node, account: str, n: int) -> None:
    node.store.ensure_account(account)
    node.store.deliver([account], _message(n))


def _inbox(node: Node, account: str) -> list:
    return node.store.messages(account, "INBOX")


# -- scenarios (run in a patched child) -----------------------------------------


def scenario_replicates_and_isr_shrinks_and_grows(base: str, url: str) -> None:
    cluster = _start(base, url)
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    try:
        account = _account(SHARD)
        for i in range(3):
            _deliver(n1, account, i)
        # The commit waited for every ISR follower: they hold it already.
        assert n1.digest() == n2.digest() == n3.digest()
        assert n1.digest()[0][0] > 0
        assert [m.blob for m in _inbox(n3, account)] == [m.blob for m in _inbox(n1, account)]
        assert len(_inbox(n2, account)) == 3
        assert n3.store.read_message(_inbox(n3, account)[0].blob) == _message(0)
        # A batch with more blob bytes than one append may carry goes in chunks.
        replication.APPEND_BYTES = 4000
        gevent.joinall([gevent.spawn(_deliver, n1, account, i) for i in range(100, 106)],
                       raise_error=True)
        replication.APPEND_BYTES = 256 * 1024 * 1024
        assert max(n1.store.shard_by_number(SHARD)[1].batch_sizes) > 1
        assert n1.digest() == n2.digest() == n3.digest()
        assert len(_inbox(n3, account)) == 9

        n3.server.stop()
        _deliver(n1, account, 3)
        # Dropped from the ISR in etcd before the commit returned.
        assert cluster.record().isr == ("n1", "n2")
        assert n2.digest() == n1.digest()
        assert n3.store.position(SHARD)[0] < n1.store.position(SHARD)[0]
        for i in range(4, 14):  # more than one catch-up batch behind
            _deliver(n1, account, i)
        assert n3.store.position(SHARD)[0] + CONFIG.cluster.catchup_batch < \
            n1.store.position(SHARD)[0]

        n3.start_server()
        _wait(lambda: "n3" in cluster.record().isr, "n3 back in the ISR")
        assert n1.digest() == n2.digest() == n3.digest()
        _deliver(n1, account, 14)
        assert n1.digest() == n3.digest()
        assert len(_inbox(n3, account)) == 21
        answer, _ = n1.client.call(n3.address, "repl.digest", {"shard": SHARD})
        assert (tuple(answer["last"]), answer["digest"]) == n3.digest()
        assert cluster.record().epoch == 1
        # /positions/<node> is published under each member's lease.
        _wait(lambda: (cluster.admin.get("/positions/n3") or None) is not None
              and cluster.admin.get("/positions/n3").value["shards"].get(str(SHARD))
              == list(n1.store.position(SHARD)), "n3's published position")
    finally:
        cluster.close()


def scenario_deposed_primary_commits_nothing(base: str, url: str) -> None:
    cluster = _start(base, url)
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    try:
        account = _account(SHARD)
        _deliver(n1, account, 0)
        # n1 stops seeing etcd's shard records (as if partitioned from etcd)
        # while the controller makes n2 primary of epoch 2 without n1 (nothing
        # contacts n1 about the change).
        n1.manager._watches[1].cancel()
        cluster.write_record(epoch=2, primary="n2", primary_lease=n2.lease,
                             replicas=["n2", "n3"], isr=["n2", "n3"])
        _wait(lambda: n2.manager.is_local_primary(SHARD), "n2 leads shard 0")
        assert n1.manager.is_local_primary(SHARD)  # it does not know yet
        before = n1.digest()
        with pytest.raises(StorageUnavailable):
            _deliver(n1, account, 1)
        assert n1.digest() == before  # nothing committed
        assert len(_inbox(n1, account)) == 1
        _wait(lambda: not n1.manager.is_local_primary(SHARD), "n1 steps down")
        assert cluster.record().epoch == 2 and cluster.record().primary == "n2"
        # The new primary has everything n1 committed and goes on.
        _deliver(n2, account, 2)
        assert [m.blob for m in _inbox(n2, account)] == [m.blob for m in _inbox(n3, account)]
        assert len(_inbox(n2, account)) == 2
        assert n2.digest() == n3.digest()
    finally:
        cluster.close()


def scenario_snapshot_catch_up_of_a_diverged_follower(base: str, url: str) -> None:
    cluster = _start(base, url)
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    try:
        account = _account(SHARD)
        for i in range(3):
            _deliver(n1, account, i)
        n3.stop()
        # n3's copy diverges: its data is wiped and it logs ops of its own.
        shutil.rmtree(n3.dir / "mail")
        with MailStore(n3.dir / "mail", SHARDS) as alone:
            other = _account(SHARD, "stray")
            alone.ensure_account(other)
            alone.deliver([other], b"Subject: stray\r\n\r\nnot in the primary's log\r\n")
            stray = alone.position(SHARD)
        assert stray[1] == 0 and n1.store.op_epoch(SHARD, stray[0]) != 0
        for i in range(3, 6):
            _deliver(n1, account, i)
        assert cluster.record().isr == ("n1", "n2")
        n3.start()
        _wait(lambda: "n3" in cluster.record().isr, "n3 resynced into the ISR", 30)
        assert n1.digest() == n2.digest() == n3.digest()
        assert n3.store.missing_blobs(SHARD) == []
        assert not _has_inbox(n3, other)  # the stray op is gone with the old copy
        for message in _inbox(n1, account):
            assert n3.store.read_message(message.blob) == n1.store.read_message(message.blob)
        _deliver(n1, account, 6)
        assert n1.digest() == n3.digest()

        # A wiped replica (no log at all) catches up from the log.
        n2.stop()
        shutil.rmtree(n2.dir / "mail")
        _deliver(n1, account, 7)
        assert cluster.record().isr == ("n1", "n3")
        n2.start()
        _wait(lambda: "n2" in cluster.record().isr, "n2 caught up into the ISR", 30)
        assert n1.digest() == n2.digest() == n3.digest()
        assert len(_inbox(n2, account)) == 8
    finally:
        cluster.close()


def scenario_new_primary_takes_the_tail_of_a_follower_ahead(base: str, url: str) -> None:
    cluster = _start(base, url)
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    try:
        account = _account(SHARD)
        _deliver(n1, account, 0)
        # n1 dies in the middle of a batch: n3 has fsynced it, n2 never got
        # it, and n1 never committed it (its client got no answer).
        replicator = n1.manager.replicator(SHARD)

        def replicate_to_n3_then_die(shard: int, ops: list) -> None:
            wire_ops, names, attachments = replicator._payload(ops)
            replicator._append("n3", replicator._last, wire_ops, names, attachments, 5.0)
            raise StorageUnavailable("n1 dies before its commit")

        n1.store.set_role(SHARD, "primary", 1, replicate_to_n3_then_die)
        with pytest.raises(StorageUnavailable):
            _deliver(n1, account, 1)
        n1.stop()
        assert n3.store.position(SHARD)[0] == n2.store.position(SHARD)[0] + 1
        cluster.write_record(epoch=2, primary="n2", primary_lease=n2.lease, isr=["n2", "n3"])
        _wait(lambda: n2.manager.is_local_primary(SHARD), "n2 leads shard 0")
        # n2 appended n3's tail (keeping its epoch) before taking writes.
        assert n2.digest() == n3.digest()
        assert n2.store.op_epoch(SHARD, n2.store.position(SHARD)[0]) == 1
        assert [m.blob for m in _inbox(n2, account)] == [m.blob for m in _inbox(n3, account)]
        assert len(_inbox(n2, account)) == 2
        _deliver(n2, account, 2)
        assert n2.digest() == n3.digest()
        assert n2.store.position(SHARD)[1] == 2
    finally:
        cluster.close()


def scenario_failed_commit_takes_a_new_epoch(base: str, url: str) -> None:
    cluster = _start(base, url)
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    try:
        account = _account(SHARD)
        _deliver(n1, account, 0)
        shard = n1.store.shard_by_number(SHARD)[0]

        def fail_once() -> None:
            shard.before_commit = None
            raise OSError("disk full")

        # The followers fsynced the batch, then n1's own commit fails: the
        # epoch is fenced (its index and epoch are taken), so n1 takes epoch 2
        # in etcd and promotes itself again.
        shard.before_commit = fail_once
        with pytest.raises(StorageUnavailable):
            n1.store.deliver([account], _message(1))
        _wait(lambda: cluster.record().epoch == 2 and n1.manager.role(SHARD) == ("primary", 2),
              "n1 leads at epoch 2")
        assert cluster.record().primary == "n1"
        _wait(lambda: cluster.record().isr == ("n1", "n2", "n3"), "all three in the ISR")
        _deliver(n1, account, 2)
        assert n1.digest() == n2.digest() == n3.digest()
        # The failed batch was kept (the followers had it): at least once.
        assert len(_inbox(n1, account)) == 3
    finally:
        cluster.close()


def scenario_hand_off_and_session_loss(base: str, url: str) -> None:
    cluster = _start(base, url)
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    try:
        account = _account(SHARD)
        hooks: list[int] = []
        n1.manager.add_handoff_hook(hooks.append)
        changes: list[int] = []
        n1.manager.on_role_change(changes.append)
        _deliver(n1, account, 0)
        cluster.write_record(transfer_to="n2")
        _wait(lambda: n2.manager.is_local_primary(SHARD), "n2 leads shard 0")
        assert hooks == [SHARD] and changes and changes[-1] == SHARD
        record = cluster.record()
        assert (record.epoch, record.primary, record.primary_lease, record.transfer_to) == \
            (2, "n2", n2.lease, None)
        assert not n1.manager.is_local_primary(SHARD)
        assert n1.store.role(SHARD) == ("follower", 2)
        with pytest.raises(StorageUnavailable):
            _deliver(n1, account, 1)
        _deliver(n2, account, 2)
        assert n1.digest() == n2.digest() == n3.digest()
        assert len(_inbox(n1, account)) == 2

        # n2 loses its etcd session (its lease is revoked, as an expiry
        # would): it stops leading at once, before anyone names a new primary.
        cluster.admin._post("kv/lease/revoke", {"ID": n2.lease})
        _wait(lambda: not n2.manager.is_local_primary(SHARD), "n2 steps down")
        assert n2.store.role(SHARD)[0] == "follower"
        with pytest.raises(StorageUnavailable):
            _deliver(n2, account, 3)
        assert cluster.record().primary == "n2"  # only the controller changes that
        assert n1.digest() == n2.digest() == n3.digest()
    finally:
        cluster.close()


def scenario_controller_failover(base: str, url: str) -> None:
    """With the real controller on every node: the primary of shard 0 dies,
    another node takes over at a higher epoch, and nothing acknowledged is lost."""
    cluster = Cluster(Path(base), url)
    meta = {"shards": SHARDS, "replication_factor": 3}
    controllers = [Controller(node.session, node.name, meta) for node in cluster.nodes.values()]
    try:
        for controller in controllers:
            controller.start()

        def leaders(number: int) -> list[str]:
            return [n.name for n in cluster.nodes.values()
                    if n.running and n.manager.is_local_primary(number)]

        _wait(lambda: all(len(leaders(n)) == 1 for n in range(SHARDS)), "a primary per shard")
        accounts = [_account(n) for n in range(SHARDS)]
        for i in range(6):
            number = i % SHARDS
            _deliver(cluster[leaders(number)[0]], accounts[number], i)
        old = cluster.record()
        dead = cluster[old.primary]
        for controller in controllers:
            if controller.node_name == dead.name:
                controller.stop()
        dead.stop()  # its lease is revoked: dead to the cluster at once
        _wait(lambda: leaders(SHARD) and leaders(SHARD)[0] != dead.name, "a new primary", 30)
        new = cluster[leaders(SHARD)[0]]
        assert cluster.record().epoch > old.epoch and dead.name not in cluster.record().isr
        assert len(_inbox(new, accounts[SHARD])) == 3
        _deliver(new, accounts[SHARD], 6)
        survivors = [n for n in cluster.nodes.values() if n.running]
        assert survivors[0].digest() == survivors[1].digest()
        assert len(_inbox(survivors[0], accounts[SHARD])) == 4
    finally:
        for controller in controllers:
            controller.stop()
        cluster.close()


def _has_inbox(node: Node, account: str) -> bool:
    return any(box.name == "INBOX" for box in node.store.list_mailboxes(account))


# -- tests ---------------------------------------------------------------------


def test_wire_ops_round_trip_and_are_checked() -> None:
    op = Op(7, 2, 1700000000.5, "append", {"blob": "ab" * 32, "uid": 3})
    assert op_from_wire(op_to_wire(op)) == op
    assert blob_refs([op, op, Op(8, 2, 0.0, "expunge", {"blob": "not a blob name"})]) == ["ab" * 32]
    for bad in ([7, 2, 0.0, "append"], [7, "2", 0.0, "append", {}], {"index": 7}, [7, 2, 0.0, 1, {}]):
        with pytest.raises(StorageError):
            op_from_wire(bad)


def test_shard_records_never_go_back_to_an_older_revision() -> None:
    changed: list[int] = []
    records = ShardRecords(None, on_change=changed.append)  # type: ignore[arg-type]
    one = ShardRecord(1, "n1", 5, ("n1", "n2"), ("n1", "n2"))
    two = ShardRecord(1, "n1", 5, ("n1", "n2"), ("n1",))
    assert records.observe(0, one, 10) and records.record(0) == one
    assert not records.observe(0, two, 9) and not records.observe(0, two, 10)
    assert records.record(0) == one and changed == [0]
    assert records.observe(0, two, 11) and records.get(0).exact and changed == [0, 0]
    assert records.observe(0, None, 12) and records.record(0) is None


def test_replicates_and_isr_shrinks_and_grows(etcd_server: EtcdServer, tmp_path: Path) -> None:
    run_patched(MODULE, "scenario_replicates_and_isr_shrinks_and_grows",
                str(tmp_path), etcd_server.client_url)


def test_deposed_primary_commits_nothing(etcd_server: EtcdServer, tmp_path: Path) -> None:
    run_patched(MODULE, "scenario_deposed_primary_commits_nothing",
                str(tmp_path), etcd_server.client_url)


def test_snapshot_catch_up_of_a_diverged_follower(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    run_patched(MODULE, "scenario_snapshot_catch_up_of_a_diverged_follower",
                str(tmp_path), etcd_server.client_url)


def test_new_primary_takes_the_tail_of_a_follower_ahead(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    run_patched(MODULE, "scenario_new_primary_takes_the_tail_of_a_follower_ahead",
                str(tmp_path), etcd_server.client_url)


def test_hand_off_and_session_loss(etcd_server: EtcdServer, tmp_path: Path) -> None:
    run_patched(MODULE, "scenario_hand_off_and_session_loss",
                str(tmp_path), etcd_server.client_url)


def test_controller_failover(etcd_server: EtcdServer, tmp_path: Path) -> None:
    run_patched(MODULE, "scenario_controller_failover", str(tmp_path), etcd_server.client_url)


def test_failed_commit_takes_a_new_epoch(etcd_server: EtcdServer, tmp_path: Path) -> None:
    run_patched(MODULE, "scenario_failed_commit_takes_a_new_epoch",
                str(tmp_path), etcd_server.client_url)
