"""IMAP mixed-workload benchmark: postroom side by side with a private Dovecot.

    python3 tests/bench/imap_load.py [--clients 10,50,200] [--duration 20]
                                     [--no-peers] [--profile DIR] [--write-docs]

100 accounts (user0..user99@bench.test) are preloaded with 200 messages each
(2-4 KB, every 2nd \\Seen, every 7th \\Flagged): postroom through the
intents MailStore.append submits (tests/bench/imapfixture.py), Dovecot as
Maildir files (mail_fsync = always, its default one imap process per
session).  imaptest is not packaged for Debian 12, so this process is the
load generator (gevent greenlets, raw sockets, one command in flight per
session) and applies the same mix to both servers.

Each client logs in once as user(i mod 100) and repeats one round:

    SELECT INBOX
    UID FETCH <20 UIDs> (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)])
    UID FETCH <uid> (BODY.PEEK[])            x3, random messages
    UID STORE <uid> +FLAGS / -FLAGS (\\Seen)   x2
    UID SEARCH UNSEEN;  SEARCH SUBJECT "topic N"
    UID SORT (DATE) UTF-8 ALL                when both servers offer SORT
    STATUS Sent (MESSAGES UNSEEN UIDNEXT);  LIST "" "*"
    APPEND INBOX (3 KB);  UID STORE <it> +FLAGS (\\Deleted);  UID EXPUNGE <it>

Every command is one operation; the figure is completed operations per
second over the run (after a warm-up round per client), with the client
process's CPU share reported so a saturated client would show.  Server CPU
per operation (user + system time of the node, or of all Dovecot processes,
from /proc, over the operations completed) is the figure to compare on a
machine shared with other work: ops/s there depends on the CPU share each
server gets.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gevent  # noqa: E402

from tests.bench import imapfixture as fx  # noqa: E402
from tests.bench import peers  # noqa: E402
from tests.bench.imapclient import Client, ImapError, capabilities  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## IMAP load (issue 3)"
ACCOUNTS = fx.users(100)
PER_ACCOUNT = 200
_UID = re.compile(rb"UID (\d+)")
_SEARCH = re.compile(rb"^\* (?:SEARCH|SORT)((?: \d+)*)")


@dataclass
class Result:
    ops: int = 0
    errors: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    op_time: dict[str, float] = field(default_factory=dict)  # seconds spent waiting, per op
    seconds: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        """Server CPU (user + system, every process) per operation, in ms:
        robust to other load on the machine, unlike ops/s."""
        return self.server_cpu * self.seconds * 1000 / self.ops if self.ops else 0.0


class Worker:
    def __init__(self, port: int, account: str, sort: bool, seed: int) -> None:
        self.c = Client("127.0.0.1", port, timeout=300)
        self.c.login(account, fx.PASSWORD)
        self.sort = sort
        self.rng = random.Random(seed)
        self.uids: list[int] = []

    def op(self, res: Result | None, name: str, text: str) -> list[bytes]:
        t0 = time.perf_counter()
        lines = self.c.cmd(text)
        if res is not None:
            res.ops += 1
            res.by_op[name] = res.by_op.get(name, 0) + 1
            res.op_time[name] = res.op_time.get(name, 0.0) + time.perf_counter() - t0
        return lines

    def round(self, res: Result | None) -> None:
        rng = self.rng
        self.op(res, "SELECT", "SELECT INBOX")
        if not self.uids:
            lines = self.op(res, "SEARCH", "UID SEARCH ALL")
            for line in lines:
                m = _SEARCH.match(line)
                if m:
                    self.uids = [int(x) for x in m.group(1).split()]
        uids = self.uids or [1]
        start = rng.randrange(max(1, len(uids) - 20))
        chunk = ",".join(str(u) for u in uids[start : start + 20])
        self.op(res, "FETCH headers", f"UID FETCH {chunk} (UID FLAGS RFC822.SIZE"
                " BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)])")
        for _ in range(3):
            self.op(res, "FETCH body", f"UID FETCH {rng.choice(uids)} (BODY.PEEK[])")
        for sign in "+-":
            self.op(res, "STORE", f"UID STORE {rng.choice(uids)} {sign}FLAGS (\\Seen)")
        self.op(res, "SEARCH", "UID SEARCH UNSEEN")
        self.op(res, "SEARCH", f'SEARCH SUBJECT "topic {rng.randrange(17)}"')
        if self.sort:
            self.op(res, "SORT", "UID SORT (DATE) UTF-8 ALL")
        self.op(res, "STATUS", "STATUS Sent (MESSAGES UNSEEN UIDNEXT)")
        self.op(res, "LIST", 'LIST "" "*"')
        raw = fx.body(rng.randrange(100_000)).replace(b"\r\n\r\n", b"\r\nX-Load: 1\r\n\r\n", 1)
        t0 = time.perf_counter()
        lines = self.c.append("INBOX", raw)
        if res is not None:
            res.ops += 1
            res.by_op["APPEND"] = res.by_op.get("APPEND", 0) + 1
            res.op_time["APPEND"] = res.op_time.get("APPEND", 0.0) + time.perf_counter() - t0
        m = re.search(rb"APPENDUID \d+ (\d+)", lines[-1])
        if m:
            uid = int(m.group(1))
            self.op(res, "STORE", f"UID STORE {uid} +FLAGS.SILENT (\\Deleted)")
            self.op(res, "EXPUNGE", f"UID EXPUNGE {uid}")

    def close(self) -> None:
        try:
            self.c.cmd("LOGOUT", ok=False)
        except (ImapError, OSError):
            pass
        self.c.close()


def mean_ms(r: Result) -> str:
    return ", ".join(f"{k} {r.op_time[k] * 1000 / r.by_op[k]:.1f}" for k in r.by_op)


def tree_cpu(pids: list[int]) -> float:
    return peers.tree_cpu(pids)


def run_level(port: int, clients: int, duration: float, sort: bool,
              server_pids) -> Result:
    res = Result()
    workers: list[Worker] = []
    jobs = [gevent.spawn(lambda i=i: workers.append(
        Worker(port, ACCOUNTS[i % len(ACCOUNTS)], sort, i))) for i in range(clients)]
    gevent.joinall(jobs, raise_error=True)
    gevent.joinall([gevent.spawn(w.round, None) for w in workers], raise_error=True)  # warm-up
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
    scpu0 = tree_cpu(server_pids())
    t0 = time.perf_counter()
    jobs = [gevent.spawn(loop, w) for w in workers]
    gevent.sleep(duration)
    stop[0] = True
    res.seconds = time.perf_counter() - t0  # rounds in flight finish but are still counted
    ops_at_stop = res.ops
    gevent.joinall(jobs)
    res.ops = ops_at_stop
    res.client_cpu = (time.process_time() - cpu0) / res.seconds
    res.server_cpu = (tree_cpu(server_pids()) - scpu0) / res.seconds
    for w in workers:
        w.close()
    return res


def start_profile(pid: int, out: Path) -> subprocess.Popen:
    """py-spy the node; PY_SPY_ARGS adds options (e.g. "--native --gil")."""
    extra = os.environ.get("PY_SPY_ARGS", "").split()
    return subprocess.Popen(
        ["py-spy", "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", "100", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def bench_postroom(tmp: Path, levels: list[int], duration: float, sort_peer: bool | None,
                   profile: Path | None) -> tuple[dict[int, Result], set[str]]:
    node = fx.make_node(tmp / "node", ACCOUNTS, {"imap": {"max_connections_per_ip": 1000}})
    secs = fx.preload(node.data_dir / "mail", ACCOUNTS, PER_ACCOUNT)
    print(f"postroom: preloaded {len(ACCOUNTS) * PER_ACCOUNT:,} messages in {secs:.0f} s",
          flush=True)
    node.start()
    out: dict[int, Result] = {}
    try:
        probe = Client("127.0.0.1", node.ports["imap"])
        probe.login(ACCOUNTS[0], fx.PASSWORD)  # some atoms appear only after login
        caps = capabilities(probe)
        probe.close()
        sort = "SORT" in caps and sort_peer is not False
        for level in levels:
            spy = None
            if profile is not None and level == 50:
                profile.mkdir(parents=True, exist_ok=True)
                spy = start_profile(node.proc.pid, profile / "postroom-imap-load-50.txt")
            out[level] = run_level(node.ports["imap"], level, duration, sort,
                                   lambda: [node.proc.pid])
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            print(f"postroom x{level}: {out[level].rate:.0f} ops/s,"
                  f" {out[level].cpu_ms:.2f} CPU ms/op; mean ms per op: "
                  + mean_ms(out[level]), flush=True)
        return out, caps
    finally:
        node.stop()


def bench_dovecot(tmp: Path, levels: list[int], duration: float, sort: bool
                  ) -> tuple[dict[int, Result], set[str]]:
    dc = fx.Dovecot(tmp / "dovecot", ACCOUNTS, max_sessions=max(levels) + 50)
    dc.preload(PER_ACCOUNT)
    out: dict[int, Result] = {}
    try:
        dc.start()
        probe = Client("127.0.0.1", dc.port)
        probe.login(ACCOUNTS[0], fx.PASSWORD)  # Dovecot lists SORT only after login
        caps = capabilities(probe)
        probe.close()

        def pids() -> list[int]:
            master = dc.master_pid()
            return fx.tree_pids(master) if master else []

        for level in levels:
            out[level] = run_level(dc.port, level, duration, sort and "SORT" in caps, pids)
            print(f"dovecot x{level}: {out[level].rate:.0f} ops/s,"
                  f" {out[level].cpu_ms:.2f} CPU ms/op; mean ms per op: "
                  + mean_ms(out[level]), flush=True)
        return out, caps
    except Exception:
        print(dc.log_tail(), file=sys.stderr)
        raise
    finally:
        dc.stop()


def report(pr: dict[int, Result], dv: dict[int, Result] | None, sort: bool, duration: float,
           argv: list[str]) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"- date: {now}; machine: {os.cpu_count()} cores, {platform.platform()},"
        f" Python {platform.python_version()}; load average at the end"
        f" {os.getloadavg()[0]:.1f} (other work on the machine skews figures)",
        f"- command: `python3 tests/bench/imap_load.py {' '.join(argv)}`;"
        f" {duration:.0f} s per level",
        f"- 100 accounts x {PER_ACCOUNT} messages; mix per round: SELECT, FETCH headers of 20,"
        " 3 x FETCH BODY.PEEK[], 2 x STORE, 2 x SEARCH"
        + (", SORT" if sort else " (SORT left out: not offered by both)")
        + ", STATUS, LIST, APPEND, STORE \\Deleted, UID EXPUNGE",
        "- peer: Dovecot 2.3 (Maildir, mail_fsync = always, one imap process per session);"
        " postroom: one process, fsync on",
        "",
        "| clients | postroom ops/s | Dovecot ops/s | ratio | postroom CPU | Dovecot CPU"
        " | postroom CPU ms/op | Dovecot CPU ms/op | load generator CPU"
        " | errors (postroom/Dovecot) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, r in pr.items():
        d = (dv or {}).get(level)
        ratio = f"{r.rate / d.rate:.2f}" if d and d.rate else "–"
        lines.append(
            f"| {level} | {r.rate:,.0f} | {f'{d.rate:,.0f}' if d else '–'} | {ratio}"
            f" | {r.server_cpu:.0%} | {f'{d.server_cpu:.0%}' if d else '–'}"
            f" | {r.cpu_ms:.2f} | {f'{d.cpu_ms:.2f}' if d else '–'}"
            f" | {r.client_cpu:.0%} | {r.errors}/{d.errors if d else '–'} |"
        )
    lines.append("")
    samples = [s for r in pr.values() for s in r.error_samples]
    samples += [s for r in (dv or {}).values() for s in r.error_samples]
    if samples:
        lines += ["Error samples: " + "; ".join(f"`{s}`" for s in samples[:5]), ""]
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
    global PER_ACCOUNT
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="10,50,200")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--messages", type=int, default=200, help="per account")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy the node at 50 clients")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    PER_ACCOUNT = args.messages
    fx.raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="postroom-imap-load-"))
    try:
        dv = None
        dcaps: set[str] | None = None
        with_peer = not args.no_peers and peers.installed()
        if with_peer:
            # Dovecot's SORT decides whether the mix has SORT for both.
            dv, dcaps = bench_dovecot(tmp, levels, args.duration, sort=True)
        pr, pcaps = bench_postroom(tmp, levels, args.duration,
                                   None if dcaps is None else "SORT" in dcaps, args.profile)
        sort = "SORT" in pcaps and (dcaps is None or "SORT" in dcaps)
        if with_peer and not sort and dcaps is not None and "SORT" in dcaps:
            # Dovecot ran with SORT, postroom without: rerun the peer on the same mix.
            dv, _ = bench_dovecot(tmp / "again", levels, args.duration, sort=False)
        text = report(pr, dv, sort, args.duration, sys.argv[1:])
        print(text)
        if args.write_docs:
            write_docs(text)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
