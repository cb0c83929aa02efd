"""Cluster benchmarks (issue 5): replicated throughput vs one node, failover RTO.

    python3 tests/bench/cluster.py [--quick] [--write-docs] [--repeat N] [--only smtp]
                                   [--targets primary,follower,controller,etcd-member]
                                   [--ttls 3,DEFAULT] [--no-drills] [--profile DIR]

Theory of operation
-------------------
Everything runs on this machine, started and stopped by this script (by PID),
in a temp directory removed at the end:

1. **Single node** (tests/support/node.py ``NodeProcess``, default settings:
   16 shards, fsync on, embedded etcd) on 127.0.0.1.
2. **3-node cluster** (tests/support/cluster.py ``ClusterHarness``: nodes on
   127.0.0.2-4 over a 3-member etcd with TLS and authentication), 16 shards,
   replication factor 3 (the defaults), ``lease_ttl`` 3 s as the harness sets it.
3. **Drill clusters**: for each ``--ttls`` value a fresh cluster on which
   ``postroom drill failover --json`` runs once per ``--targets`` entry (the
   drill's defaults: 20 SMTP senders, 10 IMAP clients, 20 s of load).  The
   victim (a killed node or etcd member) is started again and the cluster
   waits for every shard to be led with a full ISR before the next drill.
   Drills at cluster 2's TTL (``--throughput-ttl``, default 3 as the harness
   sets it) reuse it; by default the other value is ``[etcd] lease_ttl``'s
   default (node/config.py).

Before every load the script waits until the nodes are nearly idle: the
full-text index of delivered mail is written in the background once a shard
is quiet, and one load's backlog must not stall the next (the CPU figures
therefore leave that deferred indexing out).

Both systems get bench.test with user0..user99 (SMTP recipients) and
mix0..mix49 (IMAP accounts, cheap password hashes: tests/bench/provision_cheap.py),
and the same loads:

- SMTP durable deliveries/s at 1, 10 and 50 sessions (tests/bench/loadgen.py,
  5 KB messages, random recipient, PIPELINING, connections reused).  On the
  cluster the sessions are spread over the 3 nodes (one loadgen process per
  node, started together; the rate is every 250 over the span from the first
  start to the last finish).  Afterwards every mailbox is counted with POP3
  STAT and compared with the 250s.
- The IMAP mix of tests/bench/imap_load.py (SELECT, FETCH headers/bodies,
  STORE, SEARCH, SORT, STATUS, LIST, APPEND + EXPUNGE) at 10 and 50 clients,
  client i logged in as mix<i> on node i mod 3 (sessions of accounts led
  elsewhere are proxied).  The mix accounts are first filled by IMAP APPEND
  to ``--mix-messages`` each, so both systems hold the same mail.  The load
  runs in a child process of this script (``_imap-fill`` / ``_imap-mix``).

``--profile DIR`` instead runs only SMTP at 50 sessions on both systems with
py-spy sampling every node (tests/bench/profile.py) and prints the top
functions by own samples, also as microseconds of node CPU per delivered
message (the cluster's summed over its 3 nodes).  ``--cprofile`` adds
cProfile in the nodes (``POSTROOM_PROFILE``, node/__main__.py; its times are
blurred by greenlet switches, and it slows the nodes).

Output: a Markdown report on stdout; ``--write-docs`` replaces the "Cluster
(issue 5)" section of docs/benchmarks.md and the RTO table (between its
markers) in docs/operations.md.  Exit status 1 when a measurement failed or a
drill reported a violation.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1].startswith("_imap"):
    from gevent import monkey  # the IMAP load child: greenlets for its clients

    monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import poplib  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node.config import ClusterSettings, EtcdSettings  # noqa: E402
from tests.bench import profile as pyspy  # noqa: E402
from tests.bench.run import Children, process_cpu  # noqa: E402
from tests.support.node import NodeProcess, merge, to_toml  # noqa: E402

HERE = Path(__file__).resolve()
PROVISION = HERE.with_name("provision_cheap.py")
BENCH_DOCS = REPO / "docs" / "benchmarks.md"
OPS_DOCS = REPO / "docs" / "operations.md"
SECTION = "## Cluster (issue 5)"
RTO_BEGIN = "<!-- rto-table: written by tests/bench/cluster.py --write-docs -->"
RTO_END = "<!-- /rto-table -->"
DOMAIN = "bench.test"
PASSWORD = "bench-pw-1234"
USERS = [f"user{i}@{DOMAIN}" for i in range(100)]
MIX = [f"mix{i}@{DOMAIN}" for i in range(50)]
SHARDS = 16  # [storage] shards default, for both systems
SMTP_LEVELS = (1, 10, 50)
IMAP_LEVELS = (10, 50)
TARGETS = ("primary", "follower", "controller", "etcd-member")
OVERRIDES = {  # every load comes from 127.0.0.1; the per-IP defaults would refuse it
    "smtp": {"max_connections_per_ip": 100},
    "imap": {"max_connections_per_ip": 1000},
}
DEFAULT_TTL = EtcdSettings().lease_ttl  # [etcd] lease_ttl's default
QUIET_SHARE = 0.15  # of a core per node: "idle" before each load
QUIET_WINDOW = 2.0  # seconds per idleness sample
QUIET_LIMIT = 180.0  # seconds to wait for idleness at most
HEALTHY_DEADLINE = 180.0  # seconds for a cluster to lead every shard with a full ISR


@dataclass
class Profile:
    smtp_count: int
    smtp_duration: float
    mix_messages: int
    mix_duration: float
    drill_duration: float


FULL = Profile(smtp_count=2000, smtp_duration=20.0, mix_messages=100, mix_duration=20.0,
               drill_duration=20.0)
QUICK = Profile(smtp_count=300, smtp_duration=5.0, mix_messages=20, mix_duration=5.0,
                drill_duration=10.0)


@dataclass
class Rate:
    """One measured load on one system."""

    ops: int = 0
    failed: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0  # node processes, seconds
    etcd_cpu: float = 0.0  # cluster etcd members, seconds
    client_cpu: float = 0.0  # load generator processes, seconds
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    notes: list[str] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def per_op_ms(self, cpu: float) -> float:
        return 1000.0 * cpu / self.ops if self.ops else 0.0


def log(msg: str) -> None:
    print(f"[cluster-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ systems


class System:
    """What the loads need from a system under test."""

    name = ""

    def smtp_addresses(self) -> list[str]:
        raise NotImplementedError

    def imap_addresses(self) -> list[str]:
        raise NotImplementedError

    def pop3_address(self) -> str:
        raise NotImplementedError

    def node_pids(self) -> list[int]:
        raise NotImplementedError

    def etcd_pids(self) -> list[int]:
        return []

    def epochs(self) -> int:
        """Sum of the shard epochs (a change during a load means a failover)."""
        return 0

    def settle(self) -> None:
        """Wait until the system serves every account (after a load)."""


class Single(System):
    """One node with default settings and its embedded etcd."""

    name = "single node"

    def __init__(self, root: Path) -> None:
        self.node = NodeProcess(root / "single", {"node": {"hostname": "mx.bench.test"},
                                                  **OVERRIDES})
        self.node.settings["storage"].pop("shards", None)  # the default a user gets
        self.node.config_path.write_text(to_toml(self.node.settings))

    def start(self) -> None:
        self.node.start()
        r = self.node.cli("domain", "add", DOMAIN)
        if r.returncode != 0:
            raise RuntimeError(f"domain add failed: {r.stderr.strip()}")
        provision(self.node, USERS + MIX)

    def stop(self) -> None:
        if self.node.stop() is None:
            self.node.kill()

    def smtp_addresses(self) -> list[str]:
        return [f"{self.node.host}:{self.node.ports['smtp']}"]

    def imap_addresses(self) -> list[str]:
        return [f"{self.node.host}:{self.node.ports['imap']}"]

    def pop3_address(self) -> str:
        return f"{self.node.host}:{self.node.ports['pop3']}"

    def node_pids(self) -> list[int]:
        assert self.node.proc is not None
        return [self.node.proc.pid]

    def etcd_pids(self) -> list[int]:
        """The embedded etcd: a child process of the node."""
        pid = self.node_pids()[0]
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"etcd" in cmdline:
                    found.append(int(child))
        return found

    def log_tails(self) -> str:
        return self.node.log_tail(30)


class Cluster(System):
    """A ClusterHarness cluster (3 nodes, 3 etcd members) with the bench accounts."""

    def __init__(self, root: Path, lease_ttl: int) -> None:
        from tests.support.cluster import ClusterHarness

        self.lease_ttl = lease_ttl
        self.name = f"3-node cluster (lease_ttl {lease_ttl})"
        self.harness = ClusterHarness(root / f"cluster-ttl{lease_ttl}", shards=SHARDS,
                                      lease_ttl=lease_ttl)

    def start(self, accounts: list[str]) -> None:
        h = self.harness
        h.setup()
        for node in h.nodes:
            merge(node.settings, OVERRIDES)
            # The default interval (the harness publishes every 0.5 s for its tests).
            merge(node.settings, {"cluster": {
                "positions_interval": ClusterSettings().positions_interval}})
            node.config_path.write_text(to_toml(node.settings))
        h.start()
        self.wait_healthy()
        h.cli("domain", "add", DOMAIN)
        if not accounts:
            return
        parts = [accounts[i::len(h.nodes)] for i in range(len(h.nodes))]
        with ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(provision, h.nodes, parts))

    def stop(self) -> None:
        self.harness.close()

    def wait_healthy(self, timeout: float = HEALTHY_DEADLINE) -> None:
        """Every node and etcd member up, every shard led, every ISR full."""
        h = self.harness
        for node in h.nodes:
            if not node.running:
                log(f"{self.name}: starting {node.name} again")
                node.start()
        for member in h.etcd.members:
            if member.pid is None:
                log(f"{self.name}: starting etcd {member.name} again")
                h.etcd.start_member(member.index)

        def healthy() -> bool:
            records = h.shard_records()
            live = set(h.members())
            full = min(len(h.nodes), 3)
            return len(live) == len(h.nodes) and len(records) == h.shards and all(
                r.get("primary") in live and len(r.get("isr") or []) == full
                and set(r.get("isr") or []) <= live for r in records.values())

        h.wait_until(healthy, timeout, "every shard led with a full ISR", interval=0.5)

    def epochs(self) -> int:
        return sum(int(r.get("epoch") or 0) for r in self.harness.shard_records().values())

    def settle(self) -> None:
        self.wait_healthy()

    def smtp_addresses(self) -> list[str]:
        return [f"{n.host}:{n.ports['smtp']}" for n in self.harness.nodes]

    def imap_addresses(self) -> list[str]:
        return [f"{n.host}:{n.ports['imap']}" for n in self.harness.nodes]

    def pop3_address(self) -> str:
        n = self.harness.nodes[0]
        return f"{n.host}:{n.ports['pop3']}"

    def node_pids(self) -> list[int]:
        return [n.pid for n in self.harness.nodes if n.pid]

    def etcd_pids(self) -> list[int]:
        return [m.pid for m in self.harness.etcd.members if m.pid]

    def log_tails(self) -> str:
        return self.harness.log_tails(30)


def provision(node: NodeProcess, accounts: list[str]) -> None:
    """``postroom user add`` for accounts, in one process, with cheap hashes."""
    r = subprocess.run([sys.executable, str(PROVISION), str(node.config_path), *accounts],
                       input=PASSWORD + "\n", capture_output=True, text=True, timeout=900,
                       env=node.env, cwd=str(REPO))
    if r.returncode != 0:
        raise RuntimeError(f"user add failed: {r.stderr.strip()[-1500:]}")


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += process_cpu(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def wait_quiet(system: System, limit: float = QUIET_LIMIT) -> float:
    """Wait until every node is nearly idle (below QUIET_SHARE of a core over
    QUIET_WINDOW s); returns the seconds waited.  Deliveries leave deferred
    work behind (the full-text index is written once a shard is quiet for a
    second, storage/mailstore.py): without this, one load's backlog would be
    indexed at the start of the next and stall it.  A cluster's followers
    index theirs only after a longer quiet delay (_FOLLOWER_INDEX_DELAY), so
    the first sample is taken once that has passed."""
    from storage.mailstore import _FOLLOWER_INDEX_DELAY

    started = time.monotonic()
    if isinstance(system, Cluster):
        time.sleep(_FOLLOWER_INDEX_DELAY + 1.0)
    while True:
        pids = system.node_pids()
        cpu0 = cpu_of(pids)
        time.sleep(QUIET_WINDOW)
        busy = (cpu_of(pids) - cpu0) / QUIET_WINDOW
        waited = time.monotonic() - started
        if busy < QUIET_SHARE * max(1, len(pids)) or waited >= limit:
            return waited


def idle_cpu(system: System, seconds: float = 5.0) -> tuple[float, float]:
    """CPU share (of one core) of the nodes and of etcd with no load."""
    pids, etcd = system.node_pids(), system.etcd_pids()
    cpu0, ecpu0 = cpu_of(pids), cpu_of(etcd)
    time.sleep(seconds)
    return (cpu_of(pids) - cpu0) / seconds, (cpu_of(etcd) - ecpu0) / seconds


# ------------------------------------------------------------------ SMTP


def spread(total: int, parts: int) -> list[int]:
    """total split into `parts` near-equal shares (larger first), zeros dropped."""
    shares = [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
    return [s for s in shares if s]


def smtp_load(system: System, children: Children, sessions: int, profile: Profile) -> Rate:
    """One SMTP level: loadgen processes, sessions spread over the nodes."""
    addrs = system.smtp_addresses()
    shares = spread(sessions, len(addrs))
    counts = [max(1, profile.smtp_count * s // sessions) for s in shares]
    firsts = [sum(shares[:i]) for i in range(len(shares))]
    pids, etcd = system.node_pids(), system.etcd_pids()
    cpu0, ecpu0 = cpu_of(pids), cpu_of(etcd)
    with ThreadPoolExecutor(len(shares)) as pool:
        results = list(pool.map(
            lambda a: children.run_loadgen("smtp", a[0], a[1], a[2], profile.smtp_duration, a[3]),
            zip(addrs, shares, counts, firsts, strict=False)))
    m = Rate(server_cpu=cpu_of(pids) - cpu0, etcd_cpu=cpu_of(etcd) - ecpu0)
    start = min(r["start"] for r in results)
    m.seconds = max(r["start"] + r["wall"] for r in results) - start
    m.ops = sum(r["ok"] for r in results)
    m.failed = sum(r["failed"] for r in results)
    m.client_cpu = sum(r["cpu"] for r in results)
    # Percentiles of the busiest generator (each reports its own).
    main = max(results, key=lambda r: r["ok"])
    m.p50_ms, m.p99_ms = main["p50_ms"], main["p99_ms"]
    for r in results:
        if r["failed"]:
            m.notes.append(f"{r['failed']} failed: {r['errors']}")
        m.notes += r["session_failures"][:3]
    return m


def stored_count(address: str, users: list[str]) -> int:
    """Messages in every user's maildrop (POP3 STAT), the delivery check."""
    host, _, port = address.rpartition(":")
    return sum(_stat(host, int(port), user) for user in users)


def _stat(host: str, port: int, user: str, deadline: float = 60.0) -> int:
    """POP3 STAT of one maildrop, retried while the answer is temporary."""
    until = time.monotonic() + deadline
    while True:
        pop = poplib.POP3(host, port, timeout=60)
        try:
            pop.user(user)
            pop.pass_(PASSWORD)
            return pop.stat()[0]
        except poplib.error_proto as exc:
            temporary = b"SYS/TEMP" in str(exc).encode() or b"IN-USE" in str(exc).encode()
            if not temporary or time.monotonic() > until:  # IN-USE: our last try's session
                raise
        finally:
            try:
                pop.quit()
            except (OSError, poplib.error_proto):
                pop.close()
        time.sleep(0.5)


# ------------------------------------------------------------------ IMAP (child process)


def imap_child(kind: str, args: list[str], timeout: float) -> dict:
    """Run this script's _imap-fill / _imap-mix and return its JSON."""
    cmd = [sys.executable, str(HERE), kind, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed ({proc.returncode}):\n{err[-2000:]}")
    return json.loads(out)


def imap_fill(system: System, messages: int) -> float:
    """APPEND until every mix account holds `messages`; returns seconds."""
    args = ["--addrs", ",".join(system.imap_addresses()), "--messages", str(messages)]
    return imap_child("_imap-fill", args, timeout=1800)["seconds"]


def imap_load(system: System, clients: int, duration: float) -> Rate:
    pids, etcd = system.node_pids(), system.etcd_pids()
    cpu0, ecpu0 = cpu_of(pids), cpu_of(etcd)
    args = ["--addrs", ",".join(system.imap_addresses()), "--clients", str(clients),
            "--duration", str(duration)]
    r = imap_child("_imap-mix", args, timeout=duration + 600)
    m = Rate(ops=r["ops"], failed=r["errors"], seconds=r["seconds"], client_cpu=r["cpu"],
             server_cpu=cpu_of(pids) - cpu0, etcd_cpu=cpu_of(etcd) - ecpu0)
    m.notes += r["samples"]
    m.p50_ms = r["mean_ms"]  # mean ms per command (the mix has no single latency)
    return m


def _child_fill(addrs: list[tuple[str, int]], messages: int) -> dict:
    import gevent

    from tests.bench import imapfixture as fx
    from tests.bench.imapclient import Client

    def fill(i: int, account: str) -> int:
        c = Client(*addrs[i % len(addrs)], timeout=300)
        try:
            c.login(account, PASSWORD)
            have = 0
            for line in c.cmd("STATUS INBOX (MESSAGES)"):
                m = re.search(rb"MESSAGES (\d+)", line)
                if m:
                    have = int(m.group(1))
            for j in range(have, messages):
                n = i * 10_000 + j
                flags = "(" + " ".join(fx.flags_for(n)) + ")"
                c.append("INBOX", fx.body(n), flags)
            c.cmd("LOGOUT", ok=False)
            return messages - have
        finally:
            c.close()

    t0 = time.perf_counter()
    jobs = [gevent.spawn(fill, i, a) for i, a in enumerate(MIX)]
    gevent.joinall(jobs, raise_error=True)
    return {"appended": sum(j.value for j in jobs), "seconds": time.perf_counter() - t0}


def _child_mix(addrs: list[tuple[str, int]], clients: int, duration: float) -> dict:
    import gevent

    from tests.bench import imap_load as il
    from tests.bench.imapclient import Client, ImapError, capabilities

    class Worker(il.Worker):
        """imap_load's round, against any node's address."""

        def __init__(self, address: tuple[str, int], account: str, sort: bool,
                     seed: int) -> None:
            self.c = Client(*address, timeout=300)
            self.c.login(account, PASSWORD)
            self.sort = sort
            self.rng = random.Random(seed)
            self.uids: list[int] = []

    probe = Client(*addrs[0])
    probe.login(MIX[0], PASSWORD)
    sort = "SORT" in capabilities(probe)
    probe.close()
    workers: list[Worker] = []
    gevent.joinall([gevent.spawn(lambda i=i: workers.append(
        Worker(addrs[i % len(addrs)], MIX[i % len(MIX)], sort, i))) for i in range(clients)],
        raise_error=True)
    gevent.joinall([gevent.spawn(w.round, None) for w in workers], raise_error=True)  # warm-up
    res = il.Result()
    stop = [False]

    def loop(w: Worker) -> None:
        while not stop[0]:
            try:
                w.round(res)
            except (ImapError, OSError) as exc:
                res.errors += 1
                if len(res.error_samples) < 5:
                    res.error_samples.append(str(exc)[:200])
                if isinstance(exc, OSError):
                    return

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    jobs = [gevent.spawn(loop, w) for w in workers]
    gevent.sleep(duration)
    stop[0] = True
    seconds = time.perf_counter() - t0
    ops = res.ops
    gevent.joinall(jobs)
    cpu = time.process_time() - cpu0
    for w in workers:
        w.close()
    waited = sum(res.op_time.values())
    return {"ops": ops, "errors": res.errors, "seconds": seconds, "cpu": cpu, "sort": sort,
            "by_op": res.by_op, "mean_ms": 1000 * waited / max(1, res.ops),
            "samples": res.error_samples}


def child_main(argv: list[str]) -> int:
    """The IMAP load child (gevent-patched at import): JSON on stdout."""
    ap = argparse.ArgumentParser(prog="cluster.py " + argv[0])
    ap.add_argument("--addrs", required=True)
    ap.add_argument("--messages", type=int, default=0)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--duration", type=float, default=20.0)
    args = ap.parse_args(argv[1:])
    addrs = [(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in args.addrs.split(",")]
    from tests.bench import imapfixture as fx

    fx.raise_nofile()
    if argv[0] == "_imap-fill":
        out = _child_fill(addrs, args.messages)
    else:
        out = _child_mix(addrs, args.clients, args.duration)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


# ------------------------------------------------------------------ throughput


def measure(system: System, children: Children, profile: Profile, repeat: int,
            imap: bool = True, levels: tuple[int, ...] = SMTP_LEVELS) -> dict[str, Any]:
    """Every SMTP and IMAP level on a started system."""
    out: dict[str, Any] = {"smtp": {}, "imap": {}, "notes": []}

    def once(fn, *args) -> Rate:
        waited = wait_quiet(system)
        epochs = system.epochs()
        m = fn(*args)
        if waited > 2 * QUIET_WINDOW + 1:
            m.notes.append(f"waited {waited:.0f} s before the run for the nodes' deferred"
                           " work (full-text indexing of earlier deliveries) to finish")
        moved = system.epochs() - epochs
        if moved:
            m.notes.append(f"{moved} shard epoch change(s) during the run (failover or hand-off)")
        system.settle()
        return m

    def median(fn, *args) -> Rate:
        runs = [once(fn, *args) for _ in range(repeat)]
        chosen = sorted(runs, key=lambda m: m.rate)[(len(runs) - 1) // 2]
        chosen.runs = [m.rate for m in runs]
        chosen.ops_total = sum(m.ops for m in runs)  # type: ignore[attr-defined]
        return chosen

    out["idle"] = idle_cpu(system)
    for sessions in levels:
        log(f"{system.name}: SMTP {sessions} session(s)")
        m = median(smtp_load, system, children, sessions, profile)
        log(f"{system.name}: SMTP x{sessions}: {m.rate:.0f}/s ({m.ops} ok, {m.failed} failed)")
        out["smtp"][sessions] = m
    sent = sum(m.ops_total for m in out["smtp"].values())  # type: ignore[attr-defined]
    try:
        stored = stored_count(system.pop3_address(), USERS)
    except (OSError, poplib.error_proto) as exc:
        out["notes"].append(f"{system.name}: POP3 STAT check failed: {exc}")
        stored = -1
    out["sent"], out["stored"] = sent, stored
    if stored < 0:
        del out["stored"]
    elif stored < sent:
        out["notes"].append(f"{system.name}: LOST: {sent} acknowledged but only {stored}"
                            " in mailboxes")
    elif stored > sent:
        out["notes"].append(f"{system.name}: {stored - sent} message(s) in mailboxes that got"
                            " no 250 (answered 451 or cut off after their commit; a sender"
                            " retries them: at-least-once, not a loss)")
    if not imap:
        return out
    log(f"{system.name}: filling {len(MIX)} IMAP accounts to {profile.mix_messages} messages")
    out["fill_seconds"] = imap_fill(system, profile.mix_messages)
    for clients in IMAP_LEVELS:
        log(f"{system.name}: IMAP mix {clients} clients")
        m = median(imap_load, system, clients, profile.mix_duration)
        log(f"{system.name}: IMAP x{clients}: {m.rate:.0f} ops/s ({m.failed} errors)")
        out["imap"][clients] = m
    return out


# ------------------------------------------------------------------ drills


def run_drill(cluster: Cluster, target: str, duration: float) -> dict[str, Any]:
    """``postroom drill failover --target T --json`` from a live node's config."""
    h = cluster.harness
    node = next(n for n in h.nodes if n.running)
    fault = "kill"
    if ":" in target:
        target, fault = target.split(":", 1)
    cmd = [sys.executable, "-m", "node", "--config", str(node.config_path), "drill", "failover",
           "--target", target, "--fault", fault, "--duration", f"{duration:g}", "--json"]
    env = dict(node.env)
    env.pop("POSTROOM_PROFILE", None)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), env=env,
                       timeout=duration + 900)
    start = r.stdout.find("{")
    if start < 0:
        error = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()
        log(f"drill {target} printed no report (exit {r.returncode}):\n"
            f"{r.stdout[-1500:]}{r.stderr[-1500:]}\nlog tails:\n{cluster.log_tails()}")
        report = {"ok": False, "rto": None, "victim": "?", "error": error[-1][:300],
                  "problems": [error[-1][:300]]}
    else:
        report = json.loads(r.stdout[start:])
    report["exit"] = r.returncode
    report["target"] = target if fault == "kill" else f"{target} ({fault})"
    return report


def drills(cluster: Cluster, targets: list[str], duration: float,
           results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target in turn on a healthy cluster; reports appended to results."""
    for target in targets:
        cluster.wait_healthy()
        log(f"{cluster.name}: drill failover --target {target}")
        report = run_drill(cluster, target, duration)
        report["lease_ttl"] = cluster.lease_ttl
        report["duration"] = duration
        rto = report.get("rto")
        log(f"{cluster.name}: {target}: victim {report.get('victim')}, RTO "
            + ("none" if rto is None else f"{rto:.2f} s")
            + f", lost {report.get('lost')}, duplicated {report.get('duplicated')},"
            f" {'PASS' if report.get('ok') else 'FAIL'}")
        results.append(report)
    cluster.wait_healthy()
    return results


# ------------------------------------------------------------------ profiling


def sampled_costs(raw_files: list[Path], cpu_ms_per_msg: float, limit: int = 25) -> str:
    """py-spy raw stacks of the nodes -> the top functions by own samples, as
    a share and as microseconds of node CPU per delivered message."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for path in raw_files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [pyspy._frame_name(f) for f in stack.split(";") if f]
            if not frames:
                continue
            n = int(count)
            total += n
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for name in set(frames):
                inclusive[name] = inclusive.get(name, 0) + n
    if not total:
        return "(no samples)"
    out = [f"{total} samples (GIL holder), {cpu_ms_per_msg:.2f} ms node CPU per message", "",
           "| own % | ≈ µs/msg | function |", "|---:|---:|---|"]
    for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:limit]:
        out.append(f"| {100 * n / total:.1f} | {1000 * cpu_ms_per_msg * n / total:,.0f}"
                   f" | `{name}` |")
    out += ["", "| inclusive % | function |", "|---:|---|"]
    skip = ("<module>", "run (gevent", "_run (gevent", "__run_task", "run_forever", "main (")
    shown = [kv for kv in sorted(inclusive.items(), key=lambda kv: -kv[1])
             if not any(x in kv[0] for x in skip) and kv[1] < total][:limit]
    out += [f"| {100 * n / total:.1f} | `{name}` |" for name, n in shown]
    return "\n".join(out)


def run_profiles(root: Path, prof_dir: Path, children: Children, profile: Profile,
                 cprofile: bool) -> str:
    """SMTP x50 on both systems with py-spy sampling every node; the top
    costs per delivered message.  With cprofile, the nodes also run under
    cProfile (POSTROOM_PROFILE; one stats file per process id in prof_dir),
    which slows them.  The cluster runs with the default lease_ttl."""
    if not pyspy.available():
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    prof_dir.mkdir(parents=True, exist_ok=True)
    if cprofile:
        os.environ["POSTROOM_PROFILE"] = str(prof_dir / "{pid}.prof")
    out = []
    try:
        for make in (lambda: Single(root), lambda: Cluster(root, DEFAULT_TTL)):
            system = make()
            try:
                if isinstance(system, Single):
                    system.start()
                else:
                    system.start(USERS)
                tag = "single" if isinstance(system, Single) else "cluster"
                pids = system.node_pids()
                raws = [prof_dir / f"{tag}-{pid}.txt" for pid in pids]
                recorders = [pyspy.Recorder(pid, raw) for pid, raw in zip(pids, raws,
                                                                         strict=True)]
                try:
                    log(f"{system.name}: SMTP 50 sessions under py-spy")
                    m = smtp_load(system, children, 50, profile)
                finally:
                    for r in recorders:
                        r.stop()
            finally:
                system.stop()
            cpu = m.per_op_ms(m.server_cpu)
            log(f"{system.name}: {m.rate:.0f}/s, {cpu:.2f} ms node CPU per message;"
                f" stacks in {prof_dir}")
            out += [f"### {system.name}: SMTP x50 ({m.ops} messages, {m.rate:.0f}/s,"
                    f" {m.failed} failed)", "", sampled_costs(raws, cpu), ""]
            if cprofile:
                out += [f"cProfile stats of the nodes: {', '.join(f'{p}.prof' for p in pids)}",
                        ""]
    finally:
        os.environ.pop("POSTROOM_PROFILE", None)
    return "\n".join(out)


# ------------------------------------------------------------------ report


def machine() -> str:
    return (f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}"
            f", etcd {_etcd_version()}")


def _etcd_version() -> str:
    from tests.support.etcd import find_etcd

    binary = find_etcd()
    if not binary:
        return "?"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"etcd Version: (\S+)", out)
    return m.group(1) if m else "?"


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}" if a and b else "n/a"


def report(single: dict | None, cluster: dict | None, drill_results: list[dict],
           command: str, profile_name: str, loadavg: list[float], started: str) -> str:
    out = [
        SECTION,
        "",
        "Measured by `python3 tests/bench/cluster.py [--quick] [--repeat N] [--write-docs]`"
        " (its docstring says how; `--profile DIR` samples every node with py-spy during"
        " SMTP x50 instead).  It starts and stops every process itself.",
        "",
        f"- date: {started} to "
        f"{datetime.datetime.now(datetime.UTC).strftime('%H:%M UTC')}",
        f"- machine: {machine()}.  **Every process shares these CPUs**: the 3 nodes,"
        " the 3 etcd members and the load generators of the cluster run on the same"
        f" {os.cpu_count()} cores that one node (one process, one core) gets alone, so"
        " a node of the 3-node cluster gets far less CPU than on its own machine in a"
        " real deployment, where the cluster would be faster than here",
        f"- command: `{command}` ({profile_name})",
        "- load average (1 min) at start/end; other work on the machine skews figures: "
        + ", ".join(f"{x:.1f}" for x in loadavg),
        f"- both systems: {SHARDS} shards, fsync on, default [cluster] settings"
        " (replication factor 3, ack_timeout 2 s); the cluster's throughput runs use"
        f" lease_ttl {THROUGHPUT_TTL[0]} s, its etcd is 3 members with TLS and"
        " authentication on the same machine",
        "- SMTP: 5 KB messages to random user0..user99@bench.test, PIPELINING, connections"
        " reused; on the cluster the sessions are spread over the 3 nodes (1 session:"
        " node 1 only), so 2 of 3 deliveries are an RPC to another node's primary."
        " A 250 means committed on the primary and fsynced on every in-sync replica",
        "- before each load the script waits until the nodes are idle: the full-text"
        " index of delivered mail is written in the background once a shard is quiet for"
        " a second, and one load's backlog would otherwise stall the next (seen: ~40 s"
        " with no delivery); the CPU figures leave that deferred indexing out",
        f"- IMAP: tests/bench/imap_load.py's mix on {len(MIX)} accounts of"
        f" {MIX_MESSAGES[0]} messages (filled by APPEND); client i on"
        " node i mod 3 (sessions of accounts led elsewhere are proxied)",
        "",
        "| measure | single node | 3-node cluster, RF 3 | ratio cluster/single |",
        "|---|---:|---:|---:|",
    ]
    rows = [("smtp", s, f"SMTP durable deliveries/s, {s} session{'s' * (s > 1)}")
            for s in SMTP_LEVELS]
    rows += [("imap", c, f"IMAP mix ops/s, {c} clients") for c in IMAP_LEVELS]
    for kind, level, label in rows:
        a = _get(single, kind, level)
        b = _get(cluster, kind, level)
        out.append(f"| {label} | {_fmt(a)} | {_fmt(b)} |"
                   f" {_ratio(a.rate if a else 0, b.rate if b else 0)} |")
    out += ["", "Details (CPU is seconds of CPU per operation, in ms; the cluster's node"
            " CPU is the sum over its 3 nodes, etcd apart; SMTP latency: p50/p99 of the"
            " busiest load generator; IMAP: mean ms per command):", "",
            "| system | load | ops | failed | s | ops/s | latency ms | node CPU ms/op"
            " | etcd CPU ms/op | load generator CPU % | every run/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, res in (("single node", single), ("cluster", cluster)):
        for kind, level, _ in rows:
            m = _get(res, kind, level)
            if m is None:
                continue
            lat = (f"{m.p50_ms:.1f}/{m.p99_ms:.1f}" if kind == "smtp" else f"{m.p50_ms:.1f}")
            out.append(f"| {name} | {kind.upper()} x{level} | {m.ops} | {m.failed}"
                       f" | {m.seconds:.1f} | {m.rate:,.0f} | {lat}"
                       f" | {m.per_op_ms(m.server_cpu):.2f} | {m.per_op_ms(m.etcd_cpu):.2f}"
                       f" | {100 * m.client_cpu / m.seconds if m.seconds else 0:.0f}"
                       f" | {', '.join(f'{r:.0f}' for r in m.runs)} |")
    out += ["", *verdicts(single, cluster, drill_results), "", *cpu_reading(single, cluster)]
    if drill_results:
        out += ["", "Failover drills (`postroom drill failover --json`: SIGKILL of the target,"
                f" {drill_results[0]['duration']:g} s of load by 20 SMTP senders and 10 IMAP"
                " clients, the fault after a third of it; RTO = fault until every shard has a"
                " live primary and a probe to every shard got 250; the victim is restarted"
                " and every ISR full again before the next drill):", "",
                *rto_table(drill_results)]
    notes = []
    for name, res in (("single node", single), ("cluster", cluster)):
        if not res:
            continue
        notes += res.get("notes", [])
        if "stored" in res:
            notes.append(f"{name}: {res['sent']} SMTP messages acknowledged, {res['stored']}"
                         " found by POP3 STAT")
        for kind in ("smtp", "imap"):
            for level, m in res[kind].items():
                notes += [f"{name} {kind.upper()} x{level}: {n}" for n in m.notes[:3]]
    for d in drill_results:
        problems = d.get("problems") or []
        violations = (d.get("check") or {}).get("violations") or []
        notes += [f"drill {d['target']} (ttl {d['lease_ttl']}): {p}"
                  for p in (problems + violations)[:5]]
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


MIX_MESSAGES = [0]  # set by main (the profile's mix_messages)
THROUGHPUT_TTL = [3]  # set by main (--throughput-ttl)


def _get(res: dict | None, kind: str, level: int) -> Rate | None:
    return None if not res else res.get(kind, {}).get(level)


def _fmt(m: Rate | None) -> str:
    return "n/a" if m is None else f"{m.rate:,.0f}"


def cpu_reading(single: dict | None, cluster: dict | None) -> list[str]:
    """The CPU bound on the ratio on this machine, from the SMTP x50 figures."""
    a, b = _get(single, "smtp", 50), _get(cluster, "smtp", 50)
    if not a or not b or not a.ops or not b.ops:
        return []
    one = a.per_op_ms(a.server_cpu)
    nodes, etcd = b.per_op_ms(b.server_cpu), b.per_op_ms(b.etcd_cpu)
    client = b.per_op_ms(b.client_cpu)
    cores = os.cpu_count() or 1
    idle = cluster.get("idle") if cluster else None
    return [
        f"Reading the SMTP x50 figures: one node spends {one:.2f} ms of CPU per durable"
        f" delivery, in one process (so at most {1000 / one if one else 0:,.0f}/s on its one"
        f" core); the cluster spends {nodes:.2f} ms summed over its 3 nodes plus {etcd:.2f} ms"
        " in etcd: every replica stores and fsyncs each message, and 2 of 3 deliveries cross"
        " an RPC to the primary.  With the load generators"
        f" ({client:.2f} ms), the {cores} cores can give the cluster at most about"
        f" {cores * 1000 / (nodes + etcd + client):,.0f}/s here.  On three machines each node"
        " has its own core, and the cluster's rate is bound by the busiest node instead of"
        " by the sum."
        + (f"  Idle, the cluster's nodes use {idle[0]:.0%} of a core and its etcd members"
           f" {idle[1]:.0%} (leases, watches, position updates), which weighs on low rates."
           if idle else ""),
    ]


def verdicts(single: dict | None, cluster: dict | None, drill_results: list[dict]) -> list[str]:
    """The issue's targets against these figures, one line each."""
    out = ["Targets (issue 5):", ""]
    ratios = []
    for kind, levels in (("smtp", SMTP_LEVELS), ("imap", IMAP_LEVELS)):
        for level in levels:
            a, b = _get(single, kind, level), _get(cluster, kind, level)
            if a and b and a.rate:
                ratios.append((f"{kind.upper()} x{level}", b.rate / a.rate))
    if ratios:
        low = [f"{name} ({r:.2f})" for name, r in ratios if r < 0.5]
        out.append("- replicated throughput >= 0.5x single node: "
                   + (f"met at every level (lowest {min(r for _, r in ratios):.2f})" if not low
                      else "NOT met at " + ", ".join(low)))
    default = [d for d in drill_results if d["lease_ttl"] == DEFAULT_TTL]
    if default:
        slow = [f"{d['target']} ({_seconds(d.get('rto'))})"
                for d in default if d.get("rto") is None or d["rto"] > 10]
        out.append(f"- RTO <= 10 s with default settings (lease_ttl {DEFAULT_TTL} s): "
                   + ("met by every drill" if not slow else "NOT met by " + ", ".join(slow)))
    stored = [r for r in (single, cluster) if r and "stored" in r]
    lost = [d for d in drill_results if d.get("lost") != 0 or d.get("duplicated") != 0]
    if drill_results or stored:
        ok = not lost and all(r["stored"] >= r["sent"] for r in stored)
        out.append("- RPO 0: " + ("no acknowledged message was lost (drills: lost 0 and"
                                  " duplicated 0 by Message-ID; throughput runs: POP3 STAT"
                                  " counts at least every 250)"
                                  if ok else "VIOLATED (see the notes)"))
    if drill_results:
        out.append("- what bounds the RTO: a killed node is seen dead only when its etcd"
                   " lease expires, between 2/3 of lease_ttl and lease_ttl after the kill"
                   " (keep-alives go every lease_ttl/3), then the controller names a new primary"
                   " from the ISR and the new primary syncs its followers before it takes"
                   " writes; the probe that ends the RTO is a 250 on every shard.  Every node"
                   " leads about a third of the shards, so killing the follower (of the first"
                   " drill account's shard) or the controller also kills primaries of other"
                   " shards, and those RTOs include that failover too")
    return out


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.1f} s"


def rto_table(results: list[dict]) -> list[str]:
    out = ["| target | lease_ttl s | victim | RTO s | acknowledged | lost | duplicated"
           " | UIDs/MODSEQ monotonic | replicas identical | result |",
           "|---|---:|---|---:|---:|---:|---:|---|---|---|"]
    for d in results:
        c = d.get("check") or {}
        rto = d.get("rto")
        mono = "yes" if c.get("uid_monotonic") and c.get("modseq_monotonic") else "NO"
        out.append(f"| {d['target']} | {d['lease_ttl']} | {d.get('victim', '?')}"
                   f" | {'none' if rto is None else f'{rto:.2f}'} | {c.get('acked', '?')}"
                   f" | {d.get('lost')} | {d.get('duplicated')} | {mono}"
                   f" | {'yes' if d.get('replicas_identical') else 'NO'}"
                   f" | {'PASS' if d.get('ok') else 'FAIL'} |")
    return out


def write_benchmarks(section: str) -> None:
    text = BENCH_DOCS.read_text()
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    BENCH_DOCS.write_text(text if text.endswith("\n") else text + "\n")


def write_operations(results: list[dict], started: str, command: str) -> None:
    """Replace the RTO table between its markers in docs/operations.md (or add
    it after the drill section's paragraph on maintenance windows)."""
    block = "\n".join([
        RTO_BEGIN,
        f"Measured RTO on one {os.cpu_count()}-CPU machine running 3 nodes and a 3-member"
        f" etcd ({started}, `{command}`; docs/benchmarks.md, Cluster):",
        "",
        *rto_table(results),
        RTO_END,
    ])
    text = OPS_DOCS.read_text()
    start, end = text.find(RTO_BEGIN), text.find(RTO_END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(RTO_END):]
    else:
        anchor = text.find("maintenance window: the load is real mail traffic.")
        if anchor < 0:
            raise RuntimeError("docs/operations.md: the drill section's anchor is gone;"
                               " add the RTO markers by hand")
        cut = text.index("\n", anchor) + 1
        text = text[:cut] + "\n" + block + "\n" + text[cut:]
    OPS_DOCS.write_text(text)


# ------------------------------------------------------------------ main


def phase(system: Single | Cluster, live: list, failures: list[str], work,
          accounts: list[str] | None = None) -> Any:
    """Start system, run work(system), stop it; a failure is logged with the
    nodes' log tails, recorded in failures, and None returned."""
    live.append(system)
    log(f"{system.name}: starting, provisioning")
    try:
        if isinstance(system, Cluster):
            system.start(accounts or [])
        else:
            system.start()
        return work(system)
    except Exception as exc:
        log(f"{system.name}: FAILED: {exc}\nlog tails:\n{system.log_tails()}")
        failures.append(f"{system.name}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
        return None
    finally:
        live.remove(system)
        system.stop()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs, for a smoke check")
    ap.add_argument("--write-docs", action="store_true",
                    help="update docs/benchmarks.md (Cluster) and the RTO table of"
                         " docs/operations.md")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="each throughput load N times, the median reported")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help="drill targets, in order (TARGET or TARGET:freeze)")
    ap.add_argument("--ttls", default=f"3,{DEFAULT_TTL}",
                    help="lease_ttl values to drill with (--throughput-ttl's reuses the"
                         " throughput cluster)")
    ap.add_argument("--no-drills", action="store_true", help="throughput only")
    ap.add_argument("--throughput-ttl", type=int, default=3, metavar="S",
                    help="lease_ttl of the throughput cluster (3 as tests/support/cluster.py"
                         " sets it; a loaded machine may need the default)")
    ap.add_argument("--no-single", action="store_true", help="skip the single node")
    ap.add_argument("--only", choices=("smtp",),
                    help="smtp: only the SMTP throughput loads (no IMAP, no drills)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="only SMTP x50, every node sampled by py-spy; stacks and report"
                         " to DIR")
    ap.add_argument("--cprofile", action="store_true",
                    help="with --profile: also run the nodes under cProfile (slower)")
    args = ap.parse_args(argv)
    profile = QUICK if args.quick else FULL
    MIX_MESSAGES[0] = profile.mix_messages
    THROUGHPUT_TTL[0] = args.throughput_ttl
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t.split(":")[0] not in TARGETS:
            ap.error(f"unknown target {t!r}")
    drilling = not args.no_drills and args.only is None
    ttls = [int(x) for x in args.ttls.split(",") if x] if drilling else []
    imap = args.only is None
    command = "python3 tests/bench/cluster.py " + shlex.join(argv)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from tests.bench import imapfixture as fx

    fx.raise_nofile()
    loadavg = [os.getloadavg()[0]]
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    root = Path(tempfile.mkdtemp(prefix="postroom-cluster-bench-"))
    children = Children()
    single = cluster = None
    drill_results: list[dict] = []
    failures: list[str] = []  # phases that could not finish
    live: list[Any] = []  # systems to stop on any exit path
    try:
        if args.profile:
            text = run_profiles(root, args.profile, children, profile, args.cprofile)
            (args.profile / "cluster-profile.md").write_text(text)
            print(text)
            return 0
        if not args.no_single:
            single = phase(Single(root), live, failures,
                           lambda sys_: measure(sys_, children, profile, args.repeat, imap))
        measured: dict[str, Any] = {}

        def throughput_and_drills(c: Cluster) -> None:
            measured["cluster"] = measure(c, children, profile, args.repeat, imap)
            if args.throughput_ttl in ttls:
                drills(c, targets, profile.drill_duration, drill_results)

        phase(Cluster(root, args.throughput_ttl), live, failures, throughput_and_drills,
              USERS + MIX)
        cluster = measured.get("cluster")
        for ttl in ttls:
            if ttl != args.throughput_ttl:
                phase(Cluster(root, ttl), live, failures,
                      lambda c: drills(c, targets, profile.drill_duration, drill_results), [])
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        children.kill_all()
        for system in live:
            try:
                system.stop()
            except Exception as exc:  # keep cleaning up
                log(f"stopping {system.name}: {exc}")
        shutil.rmtree(root, ignore_errors=True)
    loadavg.append(os.getloadavg()[0])
    name = ("quick" if args.quick else "full") + " profile" + (
        f", median of {args.repeat} runs" if args.repeat > 1 else "")
    section = report(single, cluster, drill_results, command.strip(), name, loadavg, started)
    if failures:
        section += "\n" + "\n".join(f"- FAILED: {f}" for f in failures) + "\n"
    print(section)
    broken = failures + [f"drill {d['target']}: {d['error']}" for d in drill_results
                         if d.get("error")]
    if args.write_docs and broken:
        log("docs NOT written: a measurement did not finish")
    elif args.write_docs:
        write_benchmarks(section)
        if drill_results:
            write_operations(drill_results, started, command.strip())
        log("wrote docs/benchmarks.md" + (" and docs/operations.md" if drill_results else ""))
    failed = [f"{d['target']} (ttl {d['lease_ttl']})" for d in drill_results if not d.get("ok")]
    if failed:
        log(f"FAILED drills: {', '.join(failed)}")
    for f in broken:
        log(f"FAILED: {f}")
    return 1 if failed or broken else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_imap"):
        sys.exit(child_main(sys.argv[1:]))
    sys.exit(main(sys.argv[1:]))
