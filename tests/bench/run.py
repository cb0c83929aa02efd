"""Single-node benchmarks: postroom side by side with Postfix + Dovecot.

    python3 tests/bench/run.py [--quick] [--no-peers] [--write-docs] [--outbound] [--imap]

Starts a postroom node (embedded etcd, temp data dir, loopback ports),
creates bench.test with user0..user99, and measures with tests/bench/loadgen.py
(a separate process, so its CPU is reported apart):

- SMTP durable deliveries/s at 1, 10 and 50 sessions (5 KB messages, random
  recipient, connections reused, a fixed count or duration per run);
- POP3 RETR/s and IMAP ``UID FETCH n BODY.PEEK[]``/s at 10 sessions;
- the node's RSS (VmRSS of the postroom process alone) idle and after load.

When Debian's postfix and dovecot-{imapd,pop3d,lmtpd} are installed, private
instances (tests/bench/peers.py) get the same loads.  Prints a Markdown table;
``--write-docs`` also replaces the "Single node (issue 2)" section of
docs/benchmarks.md.  Every process started is stopped by PID (or with
``postfix -c DIR stop`` / ``doveadm -c FILE stop``) and the temp directory
removed, on success, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import poplib
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.bench import peers  # noqa: E402
from tests.bench import profile as pyspy  # noqa: E402
from tests.support.node import NodeProcess  # noqa: E402

LOADGEN = Path(__file__).with_name("loadgen.py")
PROVISION = Path(__file__).with_name("provision.py")
OUTBOUND = Path(__file__).with_name("outbound.py")
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Single node (issue 2)"
DOMAIN = "bench.test"
USERS = [f"user{i}@{DOMAIN}" for i in range(100)]
PASSWORD = "bench-pw-1234"
SMTP_LEVELS = (1, 10, 50)
RETRIEVAL_SESSIONS = 10
LOADAVG: list[float] = []  # 1-minute load average at start and end
DELIVERY_DEADLINE = 600.0  # seconds for the peer's queue to drain into Maildir


@dataclass
class Profile:
    smtp_count: int
    smtp_duration: float
    fetch_count: int
    fetch_duration: float


FULL = Profile(smtp_count=2000, smtp_duration=20.0, fetch_count=20000, fetch_duration=20.0)
QUICK = Profile(smtp_count=300, smtp_duration=5.0, fetch_count=2000, fetch_duration=5.0)


@dataclass
class Measure:
    """One load run against one system."""

    ok: int = 0
    failed: int = 0
    wall: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0  # seconds, server processes only (estimated for peers)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    accepted_rate: float = 0.0  # SMTP: 250 replies/s
    rate: float = 0.0  # durable, in-mailbox operations/s
    notes: list[str] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)  # every repetition's rate
    total_ok: int = 0  # operations over every repetition

    @property
    def client_cpu_pct(self) -> float:
        return 100.0 * self.client_cpu / self.wall if self.wall else 0.0

    @property
    def server_ms_per_op(self) -> float:
        return 1000.0 * self.server_cpu / self.ok if self.ok else 0.0


# ------------------------------------------------------------ measurement helpers

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """utime + stime of one process (children excluded), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Children:
    """Load generator processes, killed by PID on any exit path."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def run_loadgen(
        self, kind: str, addr: str, sessions: int, count: int, duration: float, first: int = 0
    ) -> dict:
        cmd = [
            sys.executable, str(LOADGEN), kind, "--addr", addr, "--sessions", str(sessions),
            "--count", str(count), "--duration", str(duration), "--password", PASSWORD,
            "--users", str(len(USERS)), "--domain", DOMAIN, "--first", str(first),
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        try:
            out, err = proc.communicate(timeout=duration + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.procs.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen {kind} failed ({proc.returncode}):\n{err[-2000:]}")
        return json.loads(out)

    def kill_all(self) -> None:
        for proc in list(self.procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def load(children: Children, kind: str, addr: str, sessions: int, count: int,
         duration: float, server_cpu=None) -> tuple[Measure, dict]:  # fmt: skip
    """Run one loadgen; server_cpu() returns the server's CPU seconds so far."""
    cpu0 = server_cpu() if server_cpu else 0.0
    result = children.run_loadgen(kind, addr, sessions, count, duration)
    m = Measure(
        ok=result["ok"],
        failed=result["failed"],
        wall=result["wall"],
        client_cpu=result["cpu"],
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
    )
    m.server_cpu = server_cpu() - cpu0 if server_cpu else 0.0
    m.rate = m.accepted_rate = m.ok / m.wall if m.wall else 0.0
    if result["failed"]:
        m.notes.append(f"{result['failed']} failed: {result['errors']}")
    if result["session_failures"]:
        m.notes.append("; ".join(result["session_failures"][:3]))
    return m, result


def median(measures: list[Measure]) -> Measure:
    """The repetition with the median rate, carrying every repetition's rate."""
    ordered = sorted(measures, key=lambda m: m.rate)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.runs = [m.rate for m in measures]
    chosen.total_ok = sum(m.ok for m in measures)
    for m in measures:
        if m is not chosen:
            chosen.notes += m.notes
    return chosen


# ------------------------------------------------------------ the two systems


def pop3_message_count(host: str, port: int, users: list[str]) -> int:
    """Messages in every user's maildrop (RFC 1939 STAT), a delivery check."""
    total = 0
    for user in users:
        pop = poplib.POP3(host, port, timeout=30)
        try:
            pop.user(user)
            pop.pass_(PASSWORD)
            total += pop.stat()[0]
        finally:
            pop.quit()
    return total


def bench_postroom(
    root: Path,
    profile: Profile,
    children: Children,
    log,
    prof_dir: Path | None = None,
    repeat: int = 1,
) -> dict:
    overrides = {
        "node": {"hostname": "mx.bench.test"},
        # The 50-session run comes from one address; the default (20) would refuse it.
        "smtp": {"max_connections_per_ip": 100},
    }
    node = NodeProcess(root / "postroom", overrides)
    node.settings["storage"].pop("shards", None)  # the default a user gets
    node.config_path.write_text(_toml(node.settings))
    results: dict = {"smtp": {}, "notes": [], "profiles": {}}
    log("postroom: starting node")
    node.start()
    try:
        assert node.proc is not None
        pid = node.proc.pid
        results["rss_ready"] = rss_mb(pid)
        log(f"postroom: provisioning {DOMAIN} and {len(USERS)} users")
        r = node.cli("domain", "add", DOMAIN)
        if r.returncode != 0:
            raise RuntimeError(f"domain add failed: {r.stderr.strip()}")
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, str(PROVISION), str(node.config_path), *USERS],
            input=PASSWORD + "\n", capture_output=True, text=True, timeout=600,
            env=node.env, cwd=str(REPO),
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"user add failed: {r.stderr.strip()[-1000:]}")
        log(f"postroom: {len(USERS)} users in {time.monotonic() - t0:.1f} s")
        results["rss_idle"] = rss_mb(pid)

        def cpu() -> float:
            return process_cpu(pid)

        def profiled(label: str, *args: object) -> Measure:
            """Median of `repeat` loads; py-spy samples the first when asked."""
            runs = [run_one(label if i == 0 else None, *args) for i in range(repeat)]
            return median(runs)

        def run_one(label: str | None, *args: object) -> Measure:
            if prof_dir is None or label is None:
                return load(*args, cpu)[0]
            out = prof_dir / f"postroom-{label}.txt"
            recorder = pyspy.Recorder(pid, out)
            try:
                return load(*args, cpu)[0]
            finally:
                recorder.stop()
                results["profiles"][label] = pyspy.summary(out)

        smtp = f"{node.host}:{node.ports['smtp']}"
        for sessions in SMTP_LEVELS:
            log(f"postroom: SMTP {sessions} sessions")
            m = profiled(f"smtp-{sessions}", children, "smtp", smtp, sessions,
                         profile.smtp_count, profile.smtp_duration)  # fmt: skip
            results["smtp"][sessions] = m
        results["rss_after_smtp"] = rss_mb(pid)
        sent = sum(m.total_ok for m in results["smtp"].values())
        stored = pop3_message_count(node.host, node.ports["pop3"], USERS)
        results["stored"], results["sent"] = stored, sent
        if stored != sent:
            results["notes"].append(f"postroom: {sent} acknowledged but {stored} in mailboxes")
        log("postroom: POP3 RETR")
        results["pop3"] = profiled("pop3", children, "pop3",
                                      f"{node.host}:{node.ports['pop3']}", RETRIEVAL_SESSIONS,
                                      profile.fetch_count, profile.fetch_duration)  # fmt: skip
        log("postroom: IMAP UID FETCH")
        results["imap"] = profiled("imap", children, "imap",
                                      f"{node.host}:{node.ports['imap']}", RETRIEVAL_SESSIONS,
                                      profile.fetch_count, profile.fetch_duration)  # fmt: skip
        results["rss_after"] = rss_mb(pid)
    except Exception:
        log("postroom: node log tail:\n" + node.log_tail(30))
        raise
    finally:
        if node.stop() is None:
            node.kill()
    return results


def _toml(settings: dict) -> str:
    from tests.support.node import to_toml

    return to_toml(settings)


def bench_peers(root: Path, profile: Profile, children: Children, log, repeat: int = 1) -> dict:
    peer = peers.PostfixDovecot(root / "peers", USERS, PASSWORD)
    (root / "peers").mkdir()
    results: dict = {"smtp": {}, "notes": []}
    log("peers: starting Postfix and Dovecot")
    try:
        peer.start()
        smtp = f"127.0.0.1:{peer.ports['smtp']}"
        delivered = [0]  # messages in Maildir so far

        def smtp_run(sessions: int) -> Measure:
            cpu0 = peer.cpu()
            m, raw = load(children, "smtp", smtp, sessions, profile.smtp_count,
                          profile.smtp_duration)  # fmt: skip
            # 250 from Postfix means queued: wait until Dovecot has stored them.
            before = delivered[0]
            expected = before + m.ok
            deadline = time.monotonic() + DELIVERY_DEADLINE
            count, _ = peer.delivered()
            while count < expected and time.monotonic() < deadline:
                time.sleep(0.1)
                count, _ = peer.delivered()
            count, newest = peer.delivered(with_mtime=True)
            if count < expected:
                m.notes.append(f"only {count - before} of {m.ok} reached Maildir")
            in_mailbox = max(newest - raw["start"], m.wall)
            m.rate = (count - before) / in_mailbox if in_mailbox else 0.0
            m.server_cpu = peer.cpu() - cpu0  # queue drained into Maildir included
            delivered[0] = count
            return m

        for sessions in SMTP_LEVELS:
            log(f"peers: SMTP {sessions} sessions")
            results["smtp"][sessions] = median([smtp_run(sessions) for _ in range(repeat)])
        for kind, label in (("pop3", "POP3 RETR"), ("imap", "IMAP UID FETCH")):
            log(f"peers: {label}")
            results[kind] = median(
                [
                    load(children, kind, f"127.0.0.1:{peer.ports[kind]}", RETRIEVAL_SESSIONS,
                         profile.fetch_count, profile.fetch_duration, peer.cpu)[0]
                    for _ in range(repeat)
                ]
            )  # fmt: skip
    except Exception:
        log("peers: log tails:\n" + peer.log_tail(15))
        raise
    finally:
        peer.stop()
    return results


# ------------------------------------------------------------ report


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}"


def report(pr: dict | None, peer: dict | None, command: str, profile_name: str) -> str:
    def get(res: dict | None, key: str, sub: int | None = None) -> Measure | None:
        if not res or key not in res:
            return None
        return res[key][sub] if sub is not None else res[key]

    rows: list[tuple[str, float | None, float | None]] = []
    for s in SMTP_LEVELS:
        a, b = get(pr, "smtp", s), get(peer, "smtp", s)
        rows.append((f"SMTP durable deliveries/s, {s} session{'s' * (s > 1)}",
                     a.rate if a else None, b.rate if b else None))  # fmt: skip
    for key, label in (("pop3", "POP3 RETR/s"), ("imap", "IMAP UID FETCH BODY.PEEK[]/s")):
        a, b = get(pr, key), get(peer, key)
        rows.append((f"{label}, {RETRIEVAL_SESSIONS} sessions",
                     a.rate if a else None, b.rate if b else None))  # fmt: skip
    out = [
        SECTION,
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}",
        f"- command: `{command}` ({profile_name})",
        "- load average before/after (other work on the machine skews figures): "
        + ", ".join(f"{a:.1f}" for a in LOADAVG),
        "- workload: 5 KB messages, random recipient among user0..user99@bench.test, "
        "connections reused; POP3/IMAP sessions log in as user0..user9",
        "- peer: Postfix " + _version(["postconf", "-h", "mail_version"])
        + " → LMTP → Dovecot " + _version(["dovecot", "--version"]).split()[0]
        + " (Maildir, mail_fsync = always)" if peer else "- peer: not installed",
        "",
        "| measure | postroom | Postfix + Dovecot | ratio postroom/peer |",
        "|---|---:|---:|---:|",
    ]  # fmt: skip
    for label, a, b in rows:
        out.append(f"| {label} | {_fmt(a)} | {_fmt(b)} | {_ratio(a, b)} |")
    if pr:
        out.append(f"| postroom RSS idle (MB) | {_fmt(pr.get('rss_idle'), 1)} | | |")
        out.append(f"| postroom RSS after SMTP (MB) | {_fmt(pr.get('rss_after_smtp'), 1)} | | |")
        out.append(f"| postroom RSS after all loads (MB) | {_fmt(pr.get('rss_after'), 1)} | | |")
    out += [
        "",
        "Details. Server CPU for postroom is its process alone (etcd aside); for the "
        "peer it is every process under the Postfix and Dovecot masters (reaped "
        "children included), and for SMTP it runs until the queue drained into "
        "Maildir. SMTP 250/s is "
        "the rate of acknowledgements; for Postfix a 250 means queued, so the "
        "durable rate counts messages in Maildir over the time until the last one "
        "arrived:",
        "",
        "| system | load | ops | failed | wall s | rate/s | SMTP 250/s | p50 ms | p99 ms "
        "| server CPU ms/op | client CPU % | every run/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, res in (("postroom", pr), ("Postfix+Dovecot", peer)):
        if not res:
            continue
        loads = [(f"SMTP x{s}", res["smtp"].get(s)) for s in SMTP_LEVELS]
        loads += [("POP3 x10", res.get("pop3")), ("IMAP x10", res.get("imap"))]
        for label, m in loads:
            if m is None:
                continue
            out.append(
                f"| {name} | {label} | {m.ok} | {m.failed} | {m.wall:.1f} | {m.rate:,.0f} "
                f"| {m.accepted_rate:,.0f} | {m.p50_ms:.1f} | {m.p99_ms:.1f} "
                f"| {m.server_ms_per_op:.2f} | {m.client_cpu_pct:.0f} "
                f"| {', '.join(f'{r:.0f}' for r in m.runs)} |"
            )
    notes = []
    for name, res in (("postroom", pr), ("Postfix+Dovecot", peer)):
        if not res:
            continue
        notes += res.get("notes", [])
        for key in ("pop3", "imap"):
            if res.get(key):
                notes += [f"{name} {key}: {n}" for n in res[key].notes]
        for s, m in res["smtp"].items():
            notes += [f"{name} SMTP x{s}: {n}" for n in m.notes]
    if pr and "stored" in pr:
        notes.append(f"postroom: {pr['sent']} acknowledged, {pr['stored']} found by POP3 STAT")
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "?"


def write_docs(section: str) -> None:
    """Replace (or append) the Single node section of docs/benchmarks.md."""
    header = """# Benchmarks

Measured by hand, never by pytest (tests/bench/conftest.py keeps pytest out):

    python3 tests/bench/run.py              # full: 2,000 messages or 20 s per SMTP run
    python3 tests/bench/run.py --quick      # 300 messages or 5 s, for a smoke check
    python3 tests/bench/run.py --no-peers   # postroom alone
    python3 tests/bench/run.py --profile /tmp/prof   # also py-spy the node per load
    python3 tests/bench/run.py --repeat 3   # each load 3 times, the median reported
    python3 tests/bench/run.py --nice -5    # ahead of other work on a shared machine
    python3 tests/bench/run.py --write-docs # replace the "Single node" section below

How it measures (tests/bench/run.py, loadgen.py, peers.py):

- postroom runs as `python -m node serve` (tests/support/node.py) with its
  embedded etcd, a temp data directory, default storage settings (16 shards,
  fsync on) and loopback listeners; bench.test and user0..user99 are created
  with the CLI (`user add`, in one process: tests/bench/provision.py).
- The load generator is a separate gevent process with raw sockets (SMTP with
  PIPELINING, connections reused for many transactions); its CPU share is
  reported so a saturated client would show.
- "Durable deliveries/s": for postroom a `250` to DATA means stored and
  fsynced in the mailbox (promise 1), so it is the rate of 250s.  For Postfix
  a 250 means queued (fsynced); the message is durable in the mailbox only
  once Dovecot's LMTP has written it to Maildir (`mail_fsync = always`), so
  the peer's figure is messages in Maildir / time until the last one arrived.
  Both are listed.
- After the SMTP runs, every postroom mailbox is counted with POP3 STAT and
  compared with the number of 250s.
- POP3 `RETR` and IMAP `UID FETCH n BODY.PEEK[]` run 10 sessions (user0..9),
  one command in flight per session, cycling over each maildrop.
- RSS is VmRSS of the postroom process (etcd aside), after provisioning with
  no traffic ("idle") and after all the loads.
- Postfix 3.7 and Dovecot 2.3 (Debian packages) run as private instances
  with their own main.cf/master.cf and dovecot.conf under the same temp
  directory, on free loopback ports (no chroot, plain-text passwd-file).

The machine is shared: the load average before and after each run is
recorded, and figures taken while other work ran are noisy.

"""
    text = DOCS.read_text() if DOCS.exists() else header
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    DOCS.write_text(text)


# ------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, 5 s runs")
    parser.add_argument("--no-peers", action="store_true", help="postroom alone")
    parser.add_argument("--no-postroom", action="store_true", help="the peers alone")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="sample the node with py-spy during each postroom load; raw stacks go to DIR",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run each load N times, report the median",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        metavar="N",
        help="run everything at this niceness (e.g. -5 on a shared machine; < 0 needs root)",
    )
    parser.add_argument(
        "--imap",
        action="store_true",
        help="then run the IMAP benchmarks (tests/bench/imap_load.py, imap_idle.py, "
        "imap_large.py) with the same --quick/--no-peers/--write-docs",
    )
    parser.add_argument(
        "--outbound",
        action="store_true",
        help="then run tests/bench/outbound.py (relay throughput vs Postfix) with the same "
        "--quick/--repeat/--write-docs",
    )
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # inherited by the node, etcd, the peers and the load generator
    profile = QUICK if args.quick else FULL
    command = "python3 tests/bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # SIGTERM takes the same cleanup path as Ctrl-C.
    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    LOADAVG.append(os.getloadavg()[0])
    root = Path(tempfile.mkdtemp(prefix="postroom-bench-"))
    os.chmod(root, 0o755)  # Postfix and Dovecot drop privileges and must traverse it
    children = Children()
    pr = peer = None
    failures: list[str] = []
    try:
        if not args.no_postroom:
            try:
                if args.profile:
                    if not pyspy.available():
                        parser.error("--profile needs py-spy (pip install py-spy)")
                    args.profile.mkdir(parents=True, exist_ok=True)
                pr = bench_postroom(root, profile, children, log, args.profile, args.repeat)
            except Exception as exc:  # report it, and still measure the peers
                log(f"postroom: FAILED: {exc}")
                failures.append(f"postroom run failed: {str(exc).splitlines()[0]}")
        if args.no_peers:
            log("peers: skipped (--no-peers)")
        elif not peers.installed():
            log("peers: Postfix/Dovecot not installed; postroom alone")
        else:
            try:
                peer = bench_peers(root, profile, children, log, args.repeat)
            except Exception as exc:  # report it with whatever postroom measured
                log(f"peers: FAILED: {exc}")
                failures.append(f"peer run failed: {str(exc).splitlines()[0]}")
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        children.kill_all()
        peers.remove_tree(root)
    LOADAVG.append(os.getloadavg()[0])
    section = report(
        pr,
        peer,
        command.strip(),
        ("quick" if args.quick else "full")
        + (f" profile, median of {args.repeat} runs" if args.repeat > 1 else " profile"),
    )
    if failures:
        section += "\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    print(section)
    if pr and pr.get("profiles"):
        for label, text in pr["profiles"].items():
            print(f"### py-spy profile of postroom, {label}\n\n{text}")
    if args.write_docs:
        write_docs(section)
        log(f"wrote {DOCS.relative_to(REPO)}")
    if args.imap:
        rc = run_imap_benches(args.quick, args.no_peers, args.write_docs)
        if rc:
            return rc
    if args.outbound:
        flags = ["--quick"] * args.quick + ["--write-docs"] * args.write_docs
        flags += ["--repeat", str(args.repeat)] + ["--no-postfix"] * args.no_peers
        log("outbound: tests/bench/outbound.py " + shlex.join(flags))
        return subprocess.run([sys.executable, str(OUTBOUND), *flags]).returncode
    return 0


def run_imap_benches(quick: bool, no_peers: bool, write_docs: bool) -> int:
    """Issue 3's IMAP benchmarks, each its own process (they raise RLIMIT_NOFILE)."""
    here = Path(__file__).parent
    docs = ["--write-docs"] * write_docs
    runs = [
        ("imap_load.py", ["--duration", "5", "--clients", "10,50"] if quick else [],
         ["--no-peers"] * no_peers),
        ("imap_idle.py", ["--sessions", "1000", "--rounds", "6"] if quick else [],
         ["--dovecot", "0"] if no_peers else ["--dovecot", "200"] if quick else []),
        ("imap_large.py", ["--messages", "10000", "--repeat", "1"] if quick else [], []),
    ]
    for script, size, peer in runs:
        flags = size + peer + docs
        print(f"imap: tests/bench/{script} " + shlex.join(flags), file=sys.stderr, flush=True)
        rc = subprocess.run([sys.executable, str(here / script), *flags]).returncode
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
