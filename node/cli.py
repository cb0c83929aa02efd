"""The ``postroom`` command.

Every error is one line ``postroom: error: ...`` on stderr: exit status 2 for
a usage error, 1 for anything else; never a traceback.  Passwords are read
from the terminal (twice, without echo) or, when stdin is not a terminal, as
one line from stdin; never from argv, where ``ps`` would show them.

The directory commands talk to etcd at ``etcd.endpoints`` or, when that list
is empty, at ``etcd.embedded_client_url`` (the running node's embedded etcd).
A running node watches the directory, so a change applies at once.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from node.config import Config, ConfigError, load

DEFAULT_CONFIG = "/etc/postroom/postroom.toml"
MAX_PASSWORD_LINE = 4096


class CliError(Exception):
    """A one-line user error (exit 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"postroom: error: {message} (try: {self.prog} --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="postroom", description="A clustered mail server.")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"settings file (default: $POSTROOM_CONFIG, else {DEFAULT_CONFIG})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("serve", help="run this node")
    quick = sub.add_parser("quickstart", help="one node on loopback with a demo user")
    quick.add_argument("--data-dir", metavar="DIR", default=None)
    status = sub.add_parser("status", help="etcd, members, shards and directory counts")
    status.add_argument("--json", action="store_true", help="machine-readable (cluster view)")

    domain = sub.add_parser("domain", help="local domains").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    domain.add_parser("add", help="add a local domain").add_argument("domain")
    domain.add_parser("list", help="list local domains")
    domain.add_parser("remove", help="remove an empty domain").add_argument("domain")

    user = sub.add_parser("user", help="accounts").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    user.add_parser("add", help="add an account (password from stdin)").add_argument("address")
    user.add_parser("passwd", help="set a password (from stdin)").add_argument("address")
    user.add_parser("list", help="list accounts").add_argument("domain", nargs="?")
    user.add_parser("remove", help="remove an account").add_argument("address")
    quota = user.add_parser("quota", help="show or set the storage quota (0 = unlimited)")
    quota.add_argument("address")
    quota.add_argument("size", nargs="?", type=_size, help="octets, or with K/M/G/T suffix")

    alias = sub.add_parser("alias", help="aliases and catch-alls").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    alias_add = alias.add_parser("add", help="SOURCE (address or @domain) -> TARGET...")
    alias_add.add_argument("source")
    alias_add.add_argument("targets", nargs="+", metavar="target")
    alias.add_parser("list", help="list aliases")
    alias.add_parser("remove", help="remove an alias").add_argument("source")
    _add_queue_parser(sub)
    _add_storage_parser(sub)
    _add_dkim_parser(sub)
    from node import clustercli

    clustercli.add_parser(sub)  # cluster init|join|show
    from node import statuscli

    statuscli.add_parsers(sub)  # node drain|undrain, drill failover
    from node import backupcli

    backupcli.add_backup_parser(sub)  # backup keygen|status|list|verify|prune
    backupcli.add_restore_parser(sub)  # restore cluster|account|mailbox
    return parser


def _add_dkim_parser(sub: argparse._SubParsersAction) -> None:
    """``postroom dkim ...`` (docs/dkim.md)."""
    dkim = sub.add_parser("dkim", help="DKIM signing keys").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    gen = dkim.add_parser("generate", help="make keys, store them, print the DNS TXT records")
    gen.add_argument("domain")
    gen.add_argument(
        "--selector",
        metavar="S",
        help="selector (default <yyyymm>r / <yyyymm>e); with both algorithms, "
        "S is suffixed with r and e",
    )
    gen.add_argument("--algorithm", choices=("rsa", "ed25519", "both"), default="both")
    gen.add_argument(
        "--inactive", action="store_true", help="store without signing (activate once published)"
    )
    dkim.add_parser("list", help="keys and their TXT records").add_argument("domain", nargs="?")
    for name, text in (
        ("activate", "sign with a key"),
        ("deactivate", "stop signing with a key"),
        ("remove", "delete a key"),
    ):
        action = dkim.add_parser(name, help=text)
        action.add_argument("domain")
        action.add_argument("selector")


def _add_queue_parser(sub: argparse._SubParsersAction) -> None:
    """``postroom queue ...`` (docs/queue.md)."""
    queue = sub.add_parser("queue", help="the outbound queue of the running node").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    qlist = queue.add_parser("list", help="queued messages, oldest first")
    qlist.add_argument("--domain", metavar="D", help="only with a recipient in this domain")
    qlist.add_argument("--sender", metavar="S", help="only from this sender (or @domain)")
    qlist.add_argument("--older-than", metavar="AGE", type=_duration,
                       help="only queued longer than AGE (e.g. 30m, 1h, 2d)")
    queue.add_parser("show", help="one message: recipients, last replies, headers"
                     ).add_argument("id")
    qretry = queue.add_parser("retry", help="attempt delivery now")
    which = qretry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?")
    which.add_argument("--all", action="store_true", help="every message not on hold")
    queue.add_parser("hold", help="stop delivery attempts").add_argument("id")
    queue.add_parser("release", help="undo hold, attempt now").add_argument("id")
    queue.add_parser("delete", help="remove without a report").add_argument("id")
    queue.add_parser("flush", help="attempt every message not on hold now")


def _add_storage_parser(sub: argparse._SubParsersAction) -> None:
    """``postroom storage reclaim`` (docs/operations.md, "Reclaiming space")."""
    storage = sub.add_parser("storage", help="the running node's storage").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    reclaim = storage.add_parser(
        "reclaim", help="compact every shard's log and delete unreferenced blobs now")
    reclaim.add_argument("--settle", type=float, metavar="SECONDS",
                         help="wait before the second look at trashed blobs"
                              " (default: storage.blob_gc_settle)")


def cmd_storage(config: Config, args: argparse.Namespace) -> int:
    """``postroom storage reclaim`` through the admin socket (storage/reclaim.py)."""
    from node.admin import AdminClient

    settle = config.storage.blob_gc_settle if args.settle is None else args.settle
    client = AdminClient(config.data_dir / "admin.sock", timeout=settle + 600.0)
    done = client.call("storage.reclaim", settle=settle)
    ops = sum(done["compacted"].values())
    sweep = done["sweep"]
    print(f"log: {ops} operation(s) deleted from {len(done['compacted'])} shard(s)")
    print(f"blobs: {sweep['deleted']} deleted ({sweep['freed']} octets),"
          f" {sweep['kept']} put back, {sweep['referenced']} referenced")
    return 0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _size(text: str) -> int:
    """'0', '512000', '500K', '20M', '2G', '1T' -> octets (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    scale = units.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in units else t
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(digits) * scale


def _duration(text: str) -> float:
    """"90", "30m", "1h", "2d", "1w" -> seconds (argparse type)."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad age {text!r} (e.g. 30m, 1h, 2d)") from None
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError(f"bad age {text!r}")
    return value * (unit or 1)


def load_config(path: str | None) -> Config:
    """--config, else $POSTROOM_CONFIG (both must exist), else the default path
    (a missing default file means every setting at its default)."""
    explicit = path or os.environ.get("POSTROOM_CONFIG") or ""
    if explicit:
        return load(explicit)
    if not os.path.exists(DEFAULT_CONFIG):
        return Config()
    return load(DEFAULT_CONFIG)


def read_password(confirm: bool = True) -> str:
    """From the terminal (asked twice) or one line of stdin."""
    if sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Repeat password: ") != first:
            raise CliError("passwords do not match")
        password = first
    else:
        if sys.stdin is None:
            raise CliError("no password given on stdin")
        line = sys.stdin.readline(MAX_PASSWORD_LINE + 2)
        password = line.rstrip("\r\n")
        if len(password) > MAX_PASSWORD_LINE:
            raise CliError(f"password too long (at most {MAX_PASSWORD_LINE} characters)")
    if not password:
        raise CliError("empty password (give it on stdin, one line)")
    return password


def _session(config: Config):
    from cluster.etcd import session_from_config

    return session_from_config(config.etcd)


def _session_factory(config: Config):
    """A function opening one etcd session on first call (commands that may need none)."""
    opened: list = []

    def get():
        if not opened:
            opened.append(_session(config))
        return opened[0]

    return get


def _directory(config: Config):
    from cluster.directory import EtcdDirectory

    return EtcdDirectory(_session(config))


def _age(seconds: float) -> str:
    """3d4h, 2h5m, 7m3s, 12s."""
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"


def cmd_status(config: Config, as_json: bool = False) -> int:
    from cluster.membership import list_members
    from node import statuscli

    session = _session(config)
    if as_json or session.get(statuscli.META) is not None:  # a cluster (docs/operations.md)
        return statuscli.cmd_status(session, as_json)
    status = session.status()
    version = status.get("version", "?")
    print(f"etcd: reachable at {session._endpoint_url()} (version {version})")
    members = list_members(session)
    print(f"members: {len(members)}")
    now = time.time()
    for node_id, record in sorted(members.items()):
        listeners = record.get("listeners") or record.get("listen") or {}
        if isinstance(listeners, dict):
            addrs = " ".join(f"{k}={','.join(v)}" for k, v in sorted(listeners.items()) if v)
        else:
            addrs = " ".join(str(a) for a in listeners)
        started = float(record.get("started", now) or now)
        host = record.get("hostname", "?")
        print(f"  {node_id} {host} up {_age(now - started)} {addrs}".rstrip())
    from cluster.directory import EtcdDirectory

    directory = EtcdDirectory(session)
    print(
        f"domains: {len(directory.list_domains())}  accounts: {len(directory.list_users())}"
        f"  aliases: {len(directory.list_aliases())}"
    )
    return 0


def cmd_dkim(directory, args: argparse.Namespace) -> int:
    """generate | list | activate | deactivate | remove (docs/dkim.md)."""
    from node.outbound import dkim

    if args.action == "generate":
        algorithms = {"rsa": [dkim.RSA], "ed25519": [dkim.ED25519]}.get(
            args.algorithm, [dkim.RSA, dkim.ED25519]
        )
        base = args.selector or time.strftime("%Y%m", time.gmtime())
        for algorithm in algorithms:
            suffix = "r" if algorithm == dkim.RSA else "e"
            selector = base if args.selector and len(algorithms) == 1 else base + suffix
            record = dkim.generate_key(algorithm, active=not args.inactive)
            domain, selector = directory.add_dkim_key(args.domain, selector, record)
            state = "inactive" if args.inactive else "active"
            print(f"; {domain} selector {selector} ({algorithm}, {state}): publish")
            print(dkim.zone_line(domain, selector, record))
    elif args.action == "list":
        for r in directory.list_dkim_keys(args.domain):
            state = "active" if r.get("active") else "inactive"
            created = time.strftime("%Y-%m-%d", time.gmtime(float(r.get("created", 0))))
            print(f"; {r['domain']} {r['selector']} {r.get('algorithm')} {state} {created}")
            print(dkim.zone_line(r["domain"], r["selector"], r))
    elif args.action in ("activate", "deactivate"):
        active = args.action == "activate"
        domain, selector = directory.set_dkim_active(args.domain, args.selector, active)
        print(f"{args.action}d DKIM key {selector} of {domain}")
    else:
        domain, selector = directory.remove_dkim_key(args.domain, args.selector)
        print(f"removed DKIM key {selector} of {domain}")
    return 0


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    command = args.command
    if command == "serve":
        from node.app import serve

        return int(serve(config) or 0)
    if command == "quickstart":
        from node.app import quickstart

        data_dir = args.data_dir or str(config.data_dir)
        return int(quickstart(data_dir) or 0)
    if command == "status":
        return cmd_status(config, args.json)
    if command == "restore" or (command == "drill" and args.action == "restore"):
        from node import backupcli

        if command == "restore":
            return backupcli.cmd_restore(config, args)
        return backupcli.cmd_drill_restore(config, args)
    if command in ("node", "drill"):
        from node import statuscli

        if command == "node":
            return statuscli.cmd_node(_session(config), args)
        return statuscli.cmd_drill(config, _session(config), args)
    if command == "queue":
        return cmd_queue(config, args)
    if command == "storage":
        return cmd_storage(config, args)
    if command == "backup":
        from node import backupcli

        return backupcli.run_backup(config, _session_factory(config), args)
    if command == "cluster":
        from node import clustercli

        return clustercli.run(config, _session(config), args)

    action = args.action
    if command == "user" and action in ("add", "passwd"):
        password = read_password()
    directory = _directory(config)
    if command == "domain":
        if action == "add":
            print(f"added domain {directory.add_domain(args.domain)}")
        elif action == "remove":
            print(f"removed domain {directory.remove_domain(args.domain)}")
        else:
            for name in directory.list_domains():
                print(name)
    elif command == "user":
        if action == "add":
            print(f"added account {directory.add_user(args.address, password)}")
        elif action == "passwd":
            print(f"password changed for {directory.set_password(args.address, password)}")
        elif action == "remove":
            print(f"removed account {directory.remove_user(args.address)}")
        elif action == "quota":
            if args.size is None:
                limit = directory.get_quota(args.address)
                print(f"{args.address}: {limit or 'unlimited'}")
            else:
                name = directory.set_quota(args.address, args.size)
                print(f"quota of {name} set to {args.size or 'unlimited'}")
        else:
            for name in directory.list_users(args.domain):
                print(name)
    elif command == "alias":
        if action == "add":
            name = directory.add_alias(args.source, args.targets)
            print(f"added alias {name}")
        elif action == "remove":
            print(f"removed alias {directory.remove_alias(args.source)}")
        else:
            for name, targets in directory.list_aliases().items():
                print(f"{name} -> {', '.join(targets)}")
    elif command == "dkim":
        return cmd_dkim(directory, args)
    return 0


def _when(ts: float, now: float) -> str:
    """A time as "in 4m3s" / "2h5m ago" / "now"."""
    if abs(ts - now) < 1:
        return "now"
    return f"in {_age(ts - now)}" if ts > now else f"{_age(now - ts)} ago"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _rcpt_line(r: dict) -> str:
    last = " ".join(str(x) for x in (r.get("code"), r.get("enhanced")) if x)
    detail = f"{last} {' '.join(str(r.get('text') or '').split())}".strip()
    if r.get("remote_mta"):
        detail += f" ({r['remote_mta']})"
    return (f"  {r['address']}  {r['state']}  attempts {r['attempts']}"
            + (f"  last: {detail}" if detail else ""))


def _show_entry(shown: dict, now: float) -> None:
    e = shown["entry"]
    yes = {True: "yes", False: "no"}
    print(f"id: {e['id']}")
    print(f"sender: <{e['sender']}>")
    print(f"queued: {_iso(e['created'])} ({_age(now - e['created'])} ago)")
    print(f"size: {e['size']}  attempts: {e['attempts']}  next attempt:"
          f" {_iso(e['next_attempt'])} ({_when(e['next_attempt'], now)})"
          f"  held: {yes[bool(e['held'])]}")
    print(f"envid: {e['envid'] or '-'}  ret: {e['ret'] or '-'}  body: {e['body']}"
          f"  smtputf8: {yes[bool(e['smtputf8'])]}  requiretls: {yes[bool(e['requiretls'])]}"
          f"  dsn: {yes[bool(e['is_dsn'])]}  delay dsn sent: {yes[bool(e['delay_dsn_sent'])]}")
    print("recipients:")
    for r in e["recipients"]:
        print(_rcpt_line(r))
    print("headers:")
    for line in shown["headers"].splitlines():
        print(f"  {line}")


def _warn_missing(result: dict) -> None:
    """Cluster mode: say which queue shards gave no answer (no primary, unreachable)."""
    if result.get("missing_shards"):
        shards = ", ".join(str(n) for n in result["missing_shards"])
        print(f"warning: queue shards without an answer (no primary or unreachable): {shards}",
              file=sys.stderr)


def cmd_queue(config: Config, args: argparse.Namespace) -> int:
    """``postroom queue ...`` through the running node's admin socket (node/admin.py)."""
    from node.admin import AdminClient

    client = AdminClient(config.data_dir / "admin.sock")
    action, now = args.action, time.time()
    if action == "list":
        query = {k: v for k, v in (("domain", args.domain), ("sender", args.sender),
                                   ("older_than", args.older_than)) if v is not None}
        listed = client.call("queue.list", **query)
        _warn_missing(listed)
        entries = listed["entries"]
        if not entries:
            print("no matching messages" if query else "queue is empty")
            return 0
        print(f"{'ID':<16}  {'AGE':>7}  {'SIZE':>8}  {'NEXT':>11}  HELD  SENDER -> RECIPIENTS")
        for e in entries:
            rcpts = ", ".join(f"{r['address']} ({r['state']})" for r in e["recipients"])
            print(f"{e['id']:<16}  {_age(now - e['created']):>7}  {e['size']:>8}"
                  f"  {_when(e['next_attempt'], now):>11}  {'yes' if e['held'] else '-':<4}"
                  f"  <{e['sender']}> -> {rcpts}")
        total = sum(len(e["recipients"]) for e in entries)
        print(f"{len(entries)} message(s), {total} recipient(s)")
    elif action == "show":
        _show_entry(client.call("queue.show", id=args.id), now)
    elif action == "flush" or (action == "retry" and args.all):
        flushed = client.call("queue.flush")
        _warn_missing(flushed)
        print(f"{flushed['count']} message(s) scheduled for delivery now")
    else:
        done = {"retry": "scheduled for delivery now", "hold": "on hold",
                "release": "released", "delete": "deleted"}[action]
        client.call(f"queue.{action}", id=args.id)
        print(f"{args.id}: {done}")
    return 0


# Errors whose text is written for the operator; their modules are imported
# lazily by the commands, so look them up only if loaded (fast usage errors).
_USER_ERRORS = (
    ("cluster.directory", "DirectoryError"),
    ("cluster.etcd", "EtcdError"),
    ("cluster.embedded", "EmbeddedEtcdError"),
    ("node.admin", "AdminError"),
    ("node.backupcli", "BackupCliError"),
    ("node.backupcli", "RestoreCliError"),
    ("storage.backup_target", "TargetError"),
    ("storage.backup_target", "TargetUnavailable"),
    ("node.clustercli", "ClusterCliError"),
    ("node.outbound.dkim", "DkimError"),
)


def _error_message(exc: Exception) -> str:
    user_errors: list[type] = [CliError, ConfigError]
    for module, name in _USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None:
            user_errors.append(getattr(loaded, name))
    if isinstance(exc, tuple(user_errors)):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError):
        return f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}"
    return f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``postroom`` console script and ``python -m node``."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        return run(args)
    except KeyboardInterrupt:
        message = "interrupted"
    except Exception as exc:  # never a traceback for the operator
        message = _error_message(exc)
    sys.stderr.write(f"postroom: error: {message}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
