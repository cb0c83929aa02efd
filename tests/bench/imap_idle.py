"""Many IDLE sessions: node memory at 0 / 1,000 / 10,000, and wake-up latency.

    python3 tests/bench/imap_idle.py [--sessions 10000] [--dovecot 2000] [--write-docs]

This process is the client: gevent greenlets over raw loopback sockets, each
session ``LOGIN userK``, ``SELECT INBOX``, ``IDLE`` (RFC 2177), over 100
accounts with 20 messages each.  Both this process and the node it starts
get RLIMIT_NOFILE raised to the hard limit (the node's session capacity is
that limit minus its reserve, node/net/listener.py), and the node runs with
``imap.max_connections_per_ip`` raised: every session comes from 127.0.0.1.
Accounts have cheap password hashes (tests/bench/provision_cheap.py): the
bench measures sessions, not argon2.

Memory is the node's RSS (and PSS) once it has settled.  Latency: with all
sessions idle, another session APPENDs to (or STOREs a flag in) one
account's INBOX; every idle session of that account records when its
``* n EXISTS`` (or ``* n FETCH``) arrives, measured from the moment the
APPEND/STORE completion came back (the change is committed then) and from
when the command was sent.  With Dovecot installed, a private Dovecot
(tests/bench/imapfixture.py, one imap process per session, its default)
gets the same sessions, up to --dovecot of them; its memory is the sum over
its processes (RSS double-counts shared pages, so PSS is shown too).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402

from tests.bench import imapfixture as fx  # noqa: E402
from tests.bench import peers  # noqa: E402
from tests.bench.imapclient import Client, ImapError  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## IMAP many IDLE sessions (issue 3)"
ACCOUNTS = fx.users(100)
PER_ACCOUNT = 20
OPEN_CONCURRENCY = 100


class Idler:
    """One idle session; a greenlet records when change notices arrive."""

    def __init__(self, port: int, account: str) -> None:
        self.account = account
        self.c = Client("127.0.0.1", port, timeout=600)
        self.c.login(account, fx.PASSWORD)
        self.c.cmd("SELECT INBOX")
        self.c.idle_start()
        self.arrivals: list[tuple[bytes, float]] = []
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        try:
            while True:
                line = self.c.readline()
                self.arrivals.append((line, time.perf_counter()))
        except (ImapError, OSError):
            return

    def close(self) -> None:
        self.reader.kill(block=False)
        self.c.close()


def open_idlers(port: int, have: list[Idler], target: int) -> None:
    pool = Pool(OPEN_CONCURRENCY)
    start = len(have)

    def one(i: int) -> None:
        have.append(Idler(port, ACCOUNTS[i % len(ACCOUNTS)]))

    for i in range(start, target):
        pool.spawn(one, i)
    pool.join(raise_error=True)


def settled_memory(pids_of) -> tuple[float, float]:
    """(RSS, PSS) MB once RSS stopped moving by more than 1 MB for 1 s (30 s max)."""
    deadline = time.monotonic() + 30
    last = fx.memory_mb(pids_of())
    while time.monotonic() < deadline:
        gevent.sleep(1.0)
        now = fx.memory_mb(pids_of())
        if abs(now[0] - last[0]) < 1.0:
            return now
        last = now
    return last


def proc_cpu(pid: int) -> float:
    """CPU time of one process's threads (not its children), seconds, from
    /proc/PID/task/*/schedstat (nanoseconds; utime/stime count 10 ms ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            continue  # a thread that ended meanwhile
    return total / 1e9


def latency(port: int, idlers: list[Idler], rounds: int,
            pid: int | None = None) -> dict[str, list[float]]:
    """Per round: APPEND (even) or STORE (odd) to one account; the delays of
    all its idle sessions, in ms, from the tagged OK and from the send; with
    pid, the server's CPU time per round (the command and every wake-up),
    which unlike the delays does not depend on other load on the machine."""
    out: dict[str, list[float]] = {"append_ok": [], "append_sent": [], "store_ok": [],
                                   "store_sent": [], "append_cpu": [], "store_cpu": []}
    writers: dict[str, Client] = {}
    for r in range(rounds):
        account = ACCOUNTS[r % len(ACCOUNTS)]
        mine = [i for i in idlers if i.account == account]
        if not mine:
            continue
        w = writers.get(account)
        if w is None:
            w = writers[account] = Client("127.0.0.1", port)
            w.login(account, fx.PASSWORD)
            w.cmd("SELECT INBOX")
        for i in mine:
            i.arrivals.clear()
        kind = "append" if r % 2 == 0 else "store"
        want = b" EXISTS" if kind == "append" else b" FETCH "
        cpu0 = proc_cpu(pid) if pid else 0.0
        sent = time.perf_counter()
        if kind == "append":
            w.append("INBOX", fx.body(10_000 + r))
        else:  # toggle, so the STORE always changes something
            flagged = b"\\Flagged" in b"".join(w.cmd("FETCH 1 (FLAGS)"))
            sent = time.perf_counter()
            w.cmd("STORE 1 %sFLAGS.SILENT (\\Flagged)" % ("-" if flagged else "+"))
        done = time.perf_counter()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(any(want in line for line, _ in i.arrivals) for i in mine):
                break
            gevent.sleep(0.005)
        if pid:
            out[f"{kind}_cpu"].append((proc_cpu(pid) - cpu0) * 1000)
        for i in mine:
            hit = next((t for line, t in i.arrivals if want in line), None)
            if hit is not None:
                out[f"{kind}_ok"].append((hit - done) * 1000)
                out[f"{kind}_sent"].append((hit - sent) * 1000)
    for w in writers.values():
        w.close()
    return out


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def run_postroom(tmp: Path, levels: list[int], rounds: int) -> dict:
    node = fx.make_node(tmp / "node", ACCOUNTS, {"imap": {"max_connections_per_ip": 50_000}})
    fx.preload(node.data_dir / "mail", ACCOUNTS, PER_ACCOUNT)
    node.start()
    idlers: list[Idler] = []
    result: dict = {"memory": {}, "latency": {}}
    try:
        warm = Client("127.0.0.1", node.ports["imap"])
        warm.login(ACCOUNTS[0], fx.PASSWORD)
        warm.cmd("SELECT INBOX")
        warm.cmd("LOGOUT")
        warm.close()
        pid = node.proc.pid

        result["memory"][0] = settled_memory(lambda: [pid])
        for level in levels:
            t0 = time.perf_counter()
            open_idlers(node.ports["imap"], idlers, level)
            print(f"postroom: {level} idle sessions open in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            result["memory"][level] = settled_memory(lambda: [pid])
            # The load generator's own full collections would show up as
            # wake-up delay: its 10,000 long-lived sessions are frozen out.
            gc.collect()
            gc.freeze()
            result["latency"][level] = latency(node.ports["imap"], idlers, rounds, pid)
        return result
    finally:
        for i in idlers:
            i.close()
        node.stop()


def run_dovecot(tmp: Path, levels: list[int]) -> dict:
    dc = fx.Dovecot(tmp / "dovecot", ACCOUNTS, max_sessions=max(levels) + 100)
    dc.preload(PER_ACCOUNT)
    idlers: list[Idler] = []
    result: dict = {"memory": {}}
    try:
        dc.start()
        warm = Client("127.0.0.1", dc.port)
        warm.login(ACCOUNTS[0], fx.PASSWORD)
        warm.cmd("SELECT INBOX")
        warm.cmd("LOGOUT")
        warm.close()

        def pids() -> list[int]:
            master = dc.master_pid()
            return fx.tree_pids(master) if master else []

        result["memory"][0] = settled_memory(pids)
        for level in levels:
            t0 = time.perf_counter()
            open_idlers(dc.port, idlers, level)
            print(f"dovecot: {level} idle sessions open in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            result["memory"][level] = settled_memory(pids)
        return result
    except Exception:
        print(dc.log_tail(), file=sys.stderr)
        raise
    finally:
        for i in idlers:
            i.close()
        dc.stop()


def report(pr: dict, dv: dict | None, argv: list[str], nofile: int) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"- date: {now}; machine: {os.cpu_count()} cores, {platform.platform()},"
        f" Python {platform.python_version()}; load average at the end"
        f" {os.getloadavg()[0]:.1f}",
        f"- command: `python3 tests/bench/imap_idle.py {' '.join(argv)}`",
        f"- sessions: LOGIN, SELECT INBOX ({PER_ACCOUNT} messages), IDLE, over"
        f" {len(ACCOUNTS)} accounts, all from 127.0.0.1; RLIMIT_NOFILE {nofile} for the"
        " client and the node, imap.max_connections_per_ip = 50000",
        "",
        "| IDLE sessions | postroom RSS MB | per session KB | Dovecot RSS sum MB | Dovecot PSS sum MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    base = pr["memory"][0][0]
    for level, (rss, _pss) in pr["memory"].items():
        per = "" if level == 0 else f"{(rss - base) * 1024 / level:.1f}"
        d = (dv or {}).get("memory", {}).get(level)
        dtext = f"{d[0]:.0f} | {d[1]:.0f}" if d else "– | –"
        lines.append(f"| {level:,} | {rss:.0f} | {per} | {dtext} |")
    for level, d in (dv or {}).get("memory", {}).items():
        if level not in pr["memory"]:
            lines.append(f"| {level:,} | – | | {d[0]:.0f} | {d[1]:.0f} |")
    lines += [
        "",
        "Wake-up latency of every idle session of the changed account, ms"
        " (p50 / p90 / p99 / max):",
        "",
        "| idle sessions | change | from the command's OK | from sending the command"
        " | node CPU per change, ms (median / max) |",
        "|---:|---|---|---|---|",
    ]
    for level, lat in pr["latency"].items():
        for kind, label in (("append", "APPEND by another session"),
                            ("store", "STORE by another session")):
            ok, sent = lat[f"{kind}_ok"], lat[f"{kind}_sent"]
            fmt = lambda v: "/".join(f"{pct(v, p):.1f}" for p in (0.5, 0.9, 0.99, 1.0))  # noqa: E731
            cpu = lat.get(f"{kind}_cpu") or []
            cpu_text = f"{pct(cpu, 0.5):.1f} / {pct(cpu, 1.0):.1f}" if cpu else "–"
            lines.append(f"| {level:,} | {label} ({len(ok)} wake-ups) | {fmt(ok)} | {fmt(sent)}"
                         f" | {cpu_text} |")
    lines.append("")
    return "\n".join(lines)


def write_docs(text: str) -> None:
    doc = DOCS.read_text()
    start = doc.find(SECTION)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + ("" if end < 0 else doc[end:])
    DOCS.write_text(doc if doc.endswith("\n") else doc + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--dovecot", type=int, default=2000, help="0: no Dovecot run")
    ap.add_argument("--rounds", type=int, default=20, help="latency rounds per level")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    nofile = fx.raise_nofile()
    if nofile < args.sessions + 1000:
        print(f"RLIMIT_NOFILE hard limit {nofile} is too low for {args.sessions} sessions",
              file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="postroom-imap-idle-"))
    try:
        levels = sorted({min(1000, args.sessions), args.sessions})
        pr = run_postroom(tmp, levels, args.rounds)
        dv = None
        if args.dovecot and peers.installed():
            dlevels = sorted({min(1000, args.dovecot), args.dovecot})
            dv = run_dovecot(tmp, dlevels)
        text = report(pr, dv, sys.argv[1:], nofile)
        print(text)
        if args.write_docs:
            write_docs(text)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
