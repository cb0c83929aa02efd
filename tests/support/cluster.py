"""A real postroom cluster for tests: N nodes on 127.0.0.2.. over a real etcd
cluster with TLS and authentication (tests/support/etcd_cluster.py).

Theory of operation
-------------------
``ClusterHarness(base_dir)`` is everything an operator does, by the book:

1. start (or take) an :class:`EtcdCluster` (3 members, TLS, auth);
2. write one TOML per node: node i (0-based) is named ``n<i+1>``, binds every
   listener and its RPC port on ``127.0.0.<i+2>`` (free ports), has
   ``[cluster] enabled = true``, labels ``{host = "h<i+1>", zone = "z<i+1>"}``,
   ``[etcd] lease_ttl = 3`` (the ``lease_ttl`` argument), ``[cluster]
   positions_interval = 1`` (caught-up checks see positions sooner) and the
   etcd cluster's TLS/auth settings;
3. ``postroom cluster init --shards 8`` once, ``postroom cluster join`` per node;
4. ``postroom domain add`` / ``user add`` for example.test, alice and bob
   (tests/support/node.py USERS); steps 3 and 4 run in one process
   (tests/support/cli_batch.py: the same ``node.cli.main``, one start-up);
5. ``python -m node --config X serve`` per node (in parallel), each ready
   when it prints "postroom ready".

Processes are tracked by PID: ``node(i).kill()`` (SIGKILL), ``.stop()``
(SIGSTOP, a freeze), ``.cont()``, ``.terminate()`` (SIGTERM, graceful),
``.restart()``.  ``shard_record(n)`` / ``shard_records()`` / ``members()``
read etcd directly; ``wait_until`` polls a predicate up to a deadline.
``close()`` (or leaving the ``with`` block) thaws, stops and reaps every
process it started.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.etcd import free_port, skip_without_etcd
from tests.support.etcd_cluster import HOSTS, EtcdCluster
from tests.support.node import DOMAIN, USERS, NodeProcess

SHARDS = 8
LEASE_TTL = 3
POSITIONS_INTERVAL = 1.0  # [cluster] positions_interval of every node (default 2 s)


class ClusterNode(NodeProcess):
    """One cluster member process; ``stop()`` freezes it (SIGSTOP)."""

    def __init__(self, index: int, base_dir: Path, etcd: EtcdCluster, shards: int,
                 lease_ttl: int = LEASE_TTL) -> None:
        self.index = index
        self.name = f"n{index + 1}"
        host = HOSTS[index]
        self.rpc_port = free_port(host)
        overrides = {
            "node": {"hostname": f"{self.name}.example.test"},
            "etcd": {**etcd.settings(), "lease_ttl": lease_ttl},
            "storage": {"shards": shards},
            "cluster": {
                "enabled": True,
                "name": self.name,
                "listen": f"{host}:{self.rpc_port}",
                "labels": {"host": f"h{index + 1}", "zone": f"z{index + 1}"},
                # caught-up checks read /positions/: fresher than the 2 s default
                "positions_interval": POSITIONS_INTERVAL,
            },
        }
        super().__init__(base_dir, overrides, host=host)
        self.frozen = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def rpc_address(self) -> str:
        return f"{self.host}:{self.rpc_port}"

    def address(self, service: str) -> tuple[str, int]:
        """(host, port) of a listener: smtp, imap, imaps, pop3, submission, ..."""
        return self.host, self.ports[service]

    def kill(self) -> None:
        """SIGKILL now (a crash) and reap."""
        self.frozen = False
        super().kill()

    def stop(self) -> None:  # type: ignore[override]
        """SIGSTOP: the process freezes (sockets open, lease not refreshed)."""
        if self.pid is not None:
            self.proc.send_signal(signal.SIGSTOP)
            self.frozen = True

    def cont(self) -> None:
        """SIGCONT after stop()."""
        if self.pid is not None:
            self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful shutdown) and wait; SIGKILL after timeout."""
        self.cont()
        return NodeProcess.stop(self, timeout)

    def restart(self) -> None:
        """Terminate if running, then start again with the same data."""
        if self.running:
            self.terminate()
        self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate()


class ClusterHarness:
    """``nodes`` postroom nodes in cluster mode over a TLS+auth etcd cluster."""

    def __init__(self, base_dir: Path, nodes: int = 3, etcd: EtcdCluster | None = None,
                 shards: int = SHARDS, lease_ttl: int = LEASE_TTL) -> None:
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._own_etcd = etcd is None
        self.etcd = etcd if etcd is not None else EtcdCluster(self.base_dir / "etcd")
        self.shards = shards
        self.lease_ttl = lease_ttl  # [etcd] lease_ttl of every node (the default is 5)
        self.count = nodes
        self.nodes: list[ClusterNode] = []
        self._session: Any = None
        self.cluster_id = ""

    # -- setup -----------------------------------------------------------

    def setup(self) -> None:
        """etcd up, configs written, cluster init, every node joined, users provisioned."""
        if not any(m.pid for m in self.etcd.members):
            self.etcd.start()
        self.nodes = [self._make_node(i) for i in range(self.count)]
        # One process runs every command (node.cli.main each time, in order):
        # seven interpreters would cost about a second of CPU each.
        commands = [(0, ("cluster", "init", "--shards", str(self.shards)), ""),
                    (0, ("domain", "add", DOMAIN), "")]
        commands += [(n.index, ("cluster", "join"), "") for n in self.nodes]
        commands += [(0, ("user", "add", a), p + "\n") for a, p in USERS.items()]
        results = self.cli_batch(commands)
        self.cluster_id = results[0].split()[2].rstrip(":")

    def _make_node(self, i: int) -> ClusterNode:
        return ClusterNode(i, self.base_dir / f"n{i + 1}", self.etcd, self.shards, self.lease_ttl)

    def _join(self, node: ClusterNode) -> None:
        result = node.cli("cluster", "join")
        if result.returncode != 0:
            raise RuntimeError(f"cluster join {node.name} failed: {result.stderr.strip()}")

    @staticmethod
    def _parallel(fn: Callable[..., Any], items: list, star: bool = False) -> list:
        """fn(item) (or fn(*item)) for every item in threads; results in order."""
        with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
            futures = [pool.submit(fn, *item) if star else pool.submit(fn, item)
                       for item in items]
            return [f.result() for f in futures]

    def start(self) -> None:
        """setup() (first time) and start every node that is not running."""
        if not self.nodes:
            self.setup()
        self._parallel(lambda n: n.start(), [n for n in self.nodes if not n.running])

    def add_node(self, start: bool = True) -> ClusterNode:
        """Another node (n4 on 127.0.0.5, ...): configured, joined, started."""
        node = self._make_node(len(self.nodes))
        self.nodes.append(node)
        self._join(node)
        if start:
            node.start()
        return node

    def cli_batch(self, commands: list[tuple[int, tuple[str, ...], str]]) -> list[str]:
        """(node, args, stdin) commands in one process (tests/support/cli_batch.py),
        in order; their stdouts, or RuntimeError naming the first that failed."""
        answers = self.nodes[0].cli_batch(
            [(["--config", str(self.nodes[i].config_path), *args], stdin)
             for i, args, stdin in commands])
        for (_, args, _), answer in zip(commands, answers, strict=True):
            if answer["rc"] != 0:
                raise RuntimeError(f"postroom {' '.join(args)} failed: {answer['stderr'].strip()}")
        return [a["stdout"] for a in answers]

    def cli(self, *args: str, input: str | None = None, node: int = 0) -> str:
        """`postroom ARGS` with node's configuration; stdout, or RuntimeError."""
        result = self.nodes[node].cli(*args, input=input)
        if result.returncode != 0:
            raise RuntimeError(f"postroom {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    # -- access ----------------------------------------------------------

    def node(self, i: int) -> ClusterNode:
        return self.nodes[i]

    def by_name(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def session(self) -> Any:
        """An EtcdSession (TLS + auth) for reading cluster state from the test."""
        if self._session is None:
            from cluster.etcd import EtcdSession

            s = self.etcd.settings()
            self._session = EtcdSession(
                s["endpoints"], s["prefix"], LEASE_TTL, 3.0, ca_cert=s["ca_cert"],
                cert=s["cert"], key=s["key"], username=s.get("username", ""),
                password=self.etcd.password if self.etcd.auth else "",
            )
        return self._session

    def shard_record(self, n: int) -> dict | None:
        kv = self.session.get(f"/shards/{n:04d}")
        return None if kv is None else kv.value

    def shard_records(self) -> dict[int, dict]:
        kvs, _ = self.session.get_prefix("/shards/")
        return {int(kv.key.rsplit("/", 1)[1]): kv.value for kv in kvs}

    def members(self) -> dict[str, dict]:
        kvs, _ = self.session.get_prefix("/members/")
        return {kv.key.rsplit("/", 1)[1]: kv.value for kv in kvs}

    def primaries(self) -> dict[int, str | None]:
        return {n: r.get("primary") for n, r in self.shard_records().items()}

    @staticmethod
    def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
                   interval: float = 0.1) -> Any:
        """Poll predicate until it returns something truthy (returned) or raise
        TimeoutError after timeout seconds.  Exceptions count as "not yet"."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except Exception as exc:  # etcd briefly unavailable, node restarting
                last = exc
            time.sleep(interval)  # poll interval only; the predicate decides
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                           + (f" (last error: {last})" if last else ""))

    def all_shards_led(self) -> bool:
        """Every shard record exists and names a running member as primary."""
        records = self.shard_records()
        live = set(self.members())
        return len(records) == self.shards and all(
            r.get("primary") in live for r in records.values())

    def fully_replicated(self, caught_up: bool = True) -> bool:
        """Every node a member, none draining; every shard has a live primary
        and every node in its replicas and ISR (caught_up: all at the
        primary's position, which needs the load to have stopped)."""
        from cluster import drill
        from node.statuscli import read_snapshot

        snap = read_snapshot(self.session)
        names = {n.name for n in self.nodes}
        if set(snap.members) != names or snap.drain or snap.leaderless():
            return False
        if caught_up and drill.lagging(snap):
            return False
        return len(snap.shards) == snap.shard_count and all(
            set(r.get("isr") or []) == names == set(r.get("replicas") or [])
            for r in snap.shards.values())

    def restore(self) -> None:
        """Undo a test's faults so the next test of a shared cluster finds it
        whole: thaw frozen nodes, start dead ones and dead etcd members, drop
        every drain request.  Wait with ``fully_replicated`` afterwards."""
        for i, member in enumerate(self.etcd.members):
            if member.pid is None:
                self.etcd.start_member(i)
        for node in self.nodes:
            if node.frozen:
                node.cont()
        self._parallel(lambda n: n.start(), [n for n in self.nodes if not n.running])
        self.session.delete_prefix("/drain/")

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"--- {n.name} ---\n{n.log_tail(lines)}" for n in self.nodes)

    # -- teardown --------------------------------------------------------

    def close(self) -> None:
        """Stop every node (thawing frozen ones), then the etcd we started."""
        def finish(node: ClusterNode) -> None:
            try:
                node.terminate(timeout=10.0)
            except (OSError, subprocess.SubprocessError):
                node.kill()

        self._parallel(finish, self.nodes)
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._own_etcd:
            self.etcd.stop_all()

    def __enter__(self) -> ClusterHarness:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- fixtures shared by the test modules that ask for them ------------------
#
# Starting a cluster costs about 10 s (etcd, init/join, three node starts),
# an etcd cluster about 3 s.  Modules that leave them whole or repairable
# share one per fixture name: the first module that asks starts it; every
# module gets it back whole; the last module of the session that uses the
# fixture (per the collected items) stops it.  Tests keep their own accounts.

_SHARED: dict[str, tuple[Any, Callable[[], None]]] = {}  # name -> (object, stop)


def _used_later(request: pytest.FixtureRequest, name: str) -> bool:
    """Whether an item after this module's last one uses fixture ``name``."""
    items = request.session.items
    mine = [i for i, item in enumerate(items) if getattr(item, "module", None) is request.module]
    return any(name in getattr(item, "fixturenames", ())
               for item in items[max(mine, default=len(items)) + 1:])


def _stop_shared(name: str) -> None:
    entry = _SHARED.pop(name, None)
    if entry is not None:
        entry[1]()


def _shared(request: pytest.FixtureRequest, name: str,
            start: Callable[[Path], tuple[Any, Callable[[], None]]]) -> tuple[Any, bool]:
    """(the shared object of fixture ``name``, whether it was just started)."""
    skip_without_etcd()
    if name in _SHARED:
        return _SHARED[name][0], False
    factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
    _SHARED[name] = start(factory.mktemp(name))
    request.config.add_cleanup(lambda: _stop_shared(name))  # after an abort
    return _SHARED[name][0], True


def _release(request: pytest.FixtureRequest, name: str) -> None:
    """At a module's end: stop the shared object unless a later module uses it."""
    if not _used_later(request, name):
        _stop_shared(name)


def _start_etcd(base: Path) -> tuple[EtcdCluster, Callable[[], None]]:
    etcd = EtcdCluster(base).__enter__()
    return etcd, etcd.stop_all


def _start_cluster(base: Path) -> tuple[ClusterHarness, Callable[[], None]]:
    harness = ClusterHarness(base).__enter__()
    return harness, harness.close


@pytest.fixture(scope="module")
def etcd_cluster(request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster with TLS and authentication (about 3 s to
    start), shared by the modules that use this fixture, every member running."""
    etcd, new = _shared(request, "etcd_cluster", _start_etcd)
    try:
        if not new:
            for i, member in enumerate(etcd.members):
                if member.pid is None:
                    etcd.start_member(i)
        yield etcd
    finally:
        _release(request, "etcd_cluster")


def shared_cluster(request: pytest.FixtureRequest, name: str) -> Iterator[ClusterHarness]:
    """The body of a module fixture ``name``: the shared cluster, whole
    (every node running and a member, every replica in its shard's ISR)."""
    harness, new = _shared(request, name, _start_cluster)
    try:
        if not new:
            harness.restore()
        harness.wait_until(lambda: harness.fully_replicated(caught_up=False), 120,
                           "a whole cluster (every node a member, every replica in the ISR)")
        yield harness
    finally:
        _release(request, name)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterHarness]:
    """A running 3-node cluster (example.test, alice, bob) over its own etcd
    cluster, shared by the modules that use this fixture."""
    yield from shared_cluster(request, "cluster")


@pytest.fixture(scope="module")
def chaos_cluster(request: pytest.FixtureRequest) -> Iterator[ClusterHarness]:
    """The same, shared by the chaos failover modules (tests/chaos/test_cluster_failover.py)."""
    yield from shared_cluster(request, "chaos_cluster")


@pytest.fixture(scope="module")
def membership_cluster(request: pytest.FixtureRequest) -> Iterator[ClusterHarness]:
    """A cluster of its own for tests/chaos/test_cluster_membership.py: on the
    failover tests' cluster its rebalance moved their mail too, which cost
    more (72 s against 57 s on CI-like runs) than a start saves."""
    yield from shared_cluster(request, "membership_cluster")
