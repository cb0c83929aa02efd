"""IMAP on one large mailbox: SELECT, UID FETCH 1:* (FLAGS), resync, SEARCH.

    python3 tests/bench/imap_large.py [--messages 100000] [--repeat 3] [--write-docs]

1. Starts a postroom node once to create bench.test and user0, stops it.
2. Fills user0's INBOX through ``MailStore.append`` in this gevent process:
   many concurrent appends, so the group committer writes them a few hundred
   per transaction (fsync off while building; 1,000 distinct 2-4 KB bodies,
   so blob writes are not what is measured).  Every 2nd message is \\Seen,
   every 7th \\Flagged, every 50th has keyword $Label1.
3. Times the store calls the IMAP view uses, in process (uid_flags,
   changes_since after 1,000 flag changes, rows of 128 UIDs).
4. Starts the node on that data and times over loopback IMAP: LOGIN+SELECT,
   UID FETCH 1:* (FLAGS), STATUS, SEARCH, FETCH 1:200 (ENVELOPE); then
   another session changes 1,000 flags and expunges 100 messages and the
   first one's NOOP (the incremental view refresh) is timed, and where the
   node offers them the RFC 7162 resyncs (UID FETCH CHANGEDSINCE,
   SELECT (QRESYNC ...)).  Each is the median of --repeat runs.

Prints a Markdown table; --write-docs replaces the "IMAP large mailboxes
(issue 3)" section of docs/benchmarks.md.  The node is stopped by PID and the
temp directory removed however the run ends.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gevent  # noqa: E402

from storage.mailstore import MailStore  # noqa: E402
from tests.bench import imapfixture as fx  # noqa: E402
from tests.bench.imapclient import Client, capabilities  # noqa: E402
from tests.support.node import NodeProcess  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## IMAP large mailboxes (issue 3)"
USER = "user0@bench.test"
PASSWORD = "bench-pw-1234"
SHARDS = 4


def body(i: int) -> bytes:
    return fx.body(i, subject=b"large mailbox message %d" % i, to=USER.encode())


def build(mail_dir: Path, count: int) -> dict[str, float]:
    """Fill INBOX; returns in-process timings of the view's store calls."""
    store = MailStore(mail_dir, SHARDS, fsync=False, group_commit_max=512)
    store.open()
    out: dict[str, float] = {}
    try:
        # The intents MailStore.append submits, with the per-body work done
        # once per distinct body (tests/bench/imapfixture.py).
        out["build"] = fx.fill(store, [USER], count, [body(i) for i in range(1000)],
                               flags=fx.flags_for, batch=2000)
        t0 = time.perf_counter()
        pairs = store.uid_flags(USER, "INBOX")
        out["uid_flags"] = time.perf_counter() - t0
        assert len(pairs) == count, len(pairs)
        status = store.status(USER, "INBOX")
        store.store_flags(USER, "INBOX", [u for u, _ in pairs[:1000]], "add", ["\\Answered"])
        t0 = time.perf_counter()
        changes = store.changes_since(USER, "INBOX", status.highestmodseq)
        out["changes_since"] = time.perf_counter() - t0
        assert len(changes.changed) == 1000
        store.store_flags(USER, "INBOX", [u for u, _ in pairs[:1000]], "remove", ["\\Answered"])
        t0 = time.perf_counter()
        store.rows(USER, "INBOX", [u for u, _ in pairs[50000 % count : 50000 % count + 128]])
        out["rows128"] = time.perf_counter() - t0
    finally:
        store.close()
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _number(lines: list[bytes], pattern: bytes) -> int | None:
    for line in lines:
        m = re.search(pattern, line)
        if m:
            return int(m.group(1))
    return None


def measure(node: NodeProcess, repeat: int, count: int) -> dict[str, object]:
    port = node.ports["imap"]
    res: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        res.setdefault(name, []).append(seconds)

    caps: set[str] = set()
    for _ in range(repeat):
        c = Client("127.0.0.1", port)
        caps = capabilities(c)
        t0 = time.perf_counter()
        c.login(USER, PASSWORD)
        add("LOGIN", time.perf_counter() - t0)
        secs, lines = c.timed("SELECT INBOX")
        add("SELECT INBOX", secs)
        exists = _number(lines, rb"\* (\d+) EXISTS")
        assert exists == count, (exists, count)
        before = c.bytes_in
        secs, lines = c.timed("UID FETCH 1:* (FLAGS)")
        add("UID FETCH 1:* (FLAGS)", secs)
        assert len(lines) == count + 1, len(lines)
        fetch_bytes = c.bytes_in - before
        add("STATUS INBOX (MESSAGES UNSEEN UIDNEXT)",
            c.timed("STATUS INBOX (MESSAGES UNSEEN UIDNEXT)")[0])
        add("SEARCH UNSEEN FLAGGED", c.timed("SEARCH UNSEEN FLAGGED")[0])
        add("UID SEARCH KEYWORD $Label1", c.timed("UID SEARCH KEYWORD $Label1")[0])
        add("SEARCH SUBJECT \"message 99999\"", c.timed('SEARCH SUBJECT "message 99999"')[0])
        add("FETCH 1:200 (ENVELOPE)", c.timed("FETCH 1:200 (ENVELOPE)")[0])
        add("FETCH 1:200 (BODY.PEEK[])", c.timed("FETCH 1:200 (BODY.PEEK[])")[0])
        c.cmd("LOGOUT")
        c.close()

    # Resync after another session's 1,000 flag changes and 100 expunges.
    a = Client("127.0.0.1", port)
    a.login(USER, PASSWORD)
    lines = a.cmd("SELECT INBOX")
    uidvalidity = _number(lines, rb"UIDVALIDITY (\d+)")
    st = a.cmd("STATUS INBOX (HIGHESTMODSEQ)", ok=False) if "CONDSTORE" in caps else []
    modseq = _number(st, rb"HIGHESTMODSEQ (\d+)")
    b = Client("127.0.0.1", port)
    b.login(USER, PASSWORD)
    b.cmd("SELECT INBOX")
    uids_changed = 0
    for r in range(repeat):
        lo = 1 + r * 2000
        b.cmd(f"STORE {lo}:{lo + 999} +FLAGS.SILENT (\\Answered)")
        b.cmd(f"STORE {lo + 1000}:{lo + 1099} +FLAGS.SILENT (\\Deleted)")
        b.cmd("EXPUNGE")
        secs, lines = a.timed("NOOP")
        add("NOOP seeing 1,000 flag changes + 100 expunges (view refresh)", secs)
        uids_changed = sum(1 for ln in lines if b" FETCH " in ln or b"EXPUNGE" in ln)
        if modseq is not None:
            secs, _ = a.timed(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq})")
            add("UID FETCH 1:* (FLAGS) (CHANGEDSINCE m) (RFC 7162)", secs)
        if "QRESYNC" in caps and modseq is not None:
            q = Client("127.0.0.1", port)
            q.login(USER, PASSWORD)
            q.cmd("ENABLE QRESYNC")
            secs, _ = q.timed(f"SELECT INBOX (QRESYNC ({uidvalidity} {modseq}))")
            add("SELECT INBOX (QRESYNC (uv m)) (RFC 7162 §3.2.5)", secs)
            q.close()
    a.close()
    b.close()
    return {
        "medians": {k: statistics.median(v) for k, v in res.items()},
        "caps": caps,
        "fetch_bytes": fetch_bytes,
        "noop_lines": uids_changed,
        "rss": rss_mb(node.proc.pid) if node.proc else 0.0,
    }


def report(count: int, inproc: dict[str, float], net: dict, repeat: int, argv: list[str]) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    lines = [
        SECTION,
        "",
        f"- date: {now}; machine: {os.cpu_count()} cores, {platform.platform()},"
        f" Python {platform.python_version()}; load average at the end {load:.1f}",
        f"- command: `python3 tests/bench/imap_large.py {' '.join(argv)}`"
        f" (median of {repeat})",
        f"- mailbox: {count:,} messages (2-4 KB) in one INBOX, built in"
        f" {inproc['build']:.0f} s through MailStore.append (fsync off while building)",
        f"- node RSS after the runs: {net['rss']:.0f} MB;"
        f" UID FETCH 1:* (FLAGS) answer: {net['fetch_bytes'] / 1e6:.1f} MB",
        "",
        "| operation (over loopback IMAP) | seconds |",
        "|---|---:|",
    ]
    for name, secs in net["medians"].items():
        lines.append(f"| {name} | {secs:.3f} |")
    lines += [
        "",
        "| store call (in process, what the session view uses) | seconds |",
        "|---|---:|",
        f"| uid_flags (SELECT's view: UIDs and flags of every message) | {inproc['uid_flags']:.3f} |",
        f"| changes_since after 1,000 flag changes | {inproc['changes_since']:.4f} |",
        f"| rows of 128 UIDs (one FETCH batch) | {inproc['rows128']:.4f} |",
        "",
    ]
    missing = [c for c in ("CONDSTORE", "QRESYNC") if c not in net["caps"]]
    if missing:
        lines.append(
            f"Not offered by the node at this run: {', '.join(missing)} (the RFC 7162 rows"
            " appear once it is)."
        )
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
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="postroom-imap-large-"))
    node = NodeProcess(tmp / "node", {"storage": {"shards": SHARDS}})
    try:
        node.start()
        node.cli("domain", "add", "bench.test", check=True)
        node.add_user(USER, PASSWORD)
        node.stop()
        print(f"building {args.messages:,} messages ...", flush=True)
        inproc = build(node.data_dir / "mail", args.messages)
        print(f"built in {inproc['build']:.1f} s", flush=True)
        node.start()
        net = measure(node, args.repeat, args.messages)
        text = report(args.messages, inproc, net, args.repeat, sys.argv[1:])
        print(text)
        if args.write_docs:
            write_docs(text)
        return 0
    finally:
        node.stop()
        gevent.sleep(0)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
