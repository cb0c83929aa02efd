"""The node's local admin socket: ``postroom queue ...`` talks to a running node.

A Unix stream socket (mode 0600, owner only) at ``data_dir/admin.sock``.
Each request is one JSON line ``{"cmd": "queue.list", "args": {...}}`` of at
most ``MAX_REQUEST`` octets; each gets one JSON line back,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", "code": "..."}``.
A connection may carry several requests.  Bad input (too long, not JSON, an
unknown command, bad arguments) gets an error response, never a crash; an
over-long line also ends the connection (framing is lost).

Commands (docs/queue.md): ``queue.list`` {domain?, sender?, older_than? (s)},
``queue.show`` {id}, ``queue.retry`` {id | all: true}, ``queue.hold`` {id},
``queue.release`` {id}, ``queue.delete`` {id}, ``queue.flush`` {}, ``ping``.
Restores (single node; node/backupcli.py): ``restore.append`` {account,
mailbox, blob, flags, internaldate}, ``restore.mailbox`` {file},
``restore.listing`` {account}.  ``storage.reclaim`` {settle? (s)}: one log
compaction and one blob sweep now (storage/reclaim.py).
``wake()`` is called after retry, release and flush so the queue runner acts
at once.

Cluster mode.  Each member answers for the queue shards it leads;
``register_queue_handlers`` serves the ``queue.*`` RPC methods below and
gives the queue a ``ClusterQueue``, through which the admin commands cover
the whole cluster: list and flush fan out to every shard primary at once and
merge the answers (shards without a reachable primary are reported in
``missing_shards``); an operation on one id goes to the primary of its queue
shard.  The same object forwards ``enqueue`` from a node that leads no shard.

RPC methods (docs/cluster.md ``queue.*``; answered by the shard primary):
``queue.enqueue`` {args} + [raw] -> {entry}; ``queue.list`` {domain?,
sender?, older_than?} -> {entries, shards}; ``queue.show`` {id} -> {entry,
headers}; ``queue.retry`` / ``queue.hold`` / ``queue.release`` /
``queue.delete`` {id} -> {}; ``queue.flush`` {} -> {count, shards}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from storage.model import NoSuchQueueEntry, QueueEntry, StorageError, StorageUnavailable
from storage.queue import check_enqueue_args, entry_from_json, queue_shard
from storage.queue import entry_to_json as entry_to_json

log = logging.getLogger("postroom.admin")

MAX_REQUEST = 64 * 1024  # octets of one request line
MAX_HEADERS = 64 * 1024  # octets of message header shown by queue.show
IDLE_TIMEOUT = 60.0  # seconds a connection may wait between requests
_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 octets on Linux, keep a margin


class AdminError(Exception):
    """An error answered by the node (or the node is unreachable)."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class NodeNotRunning(AdminError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"node not running (no admin socket at {path})", "not_running")


class _BadRequest(Exception):
    pass


@contextlib.contextmanager
def _sockaddr(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits sun_path: long paths go through
    /proc/self/fd/N of their directory (Linux)."""
    if len(os.fsencode(str(path))) < _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def header_section(raw: bytes, limit: int = MAX_HEADERS) -> str:
    """The header section of a message (RFC 5322 §2.1), at most ``limit`` octets."""
    end = len(raw)
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = raw.find(sep)
        if at != -1:
            end = min(end, at)
    return raw[:min(end, limit)].decode("utf-8", "replace")


def _str_arg(args: dict, name: str, required: bool = True) -> str | None:
    value = args.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > 1000:
        raise _BadRequest(f"argument {name!r}: expected a non-empty string")
    return value


class LocalQueue:
    """The admin operations on this node's queue (every shard, or in
    cluster mode the shards led here); results are JSON data."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue  # storage/queue.py OutboundQueue

    def list(self, domain: str | None, sender: str | None, older_than: float | None) -> dict:
        shards = self.queue.local_shards()
        entries = self.queue.list(domain=domain, sender=sender, older_than=older_than,
                                  shards=shards)
        return {"entries": [entry_to_json(e) for e in entries], "shards": shards}

    def show(self, qid: str) -> dict:
        self._require_lead(qid)
        entry = self.queue.get(qid)
        if entry is None:
            raise NoSuchQueueEntry(qid)
        try:
            headers = header_section(self.queue.read_body(entry))
        except StorageError:
            headers = ""
        return {"entry": entry_to_json(entry), "headers": headers}

    def act(self, action: str, qid: str) -> None:
        """retry, hold, release or delete one entry."""
        method = {"retry": self.queue.retry_now, "hold": self.queue.hold,
                  "release": self.queue.release, "delete": self.queue.delete}[action]
        method(qid)

    def flush(self) -> dict:
        shards = self.queue.local_shards()
        return {"count": self.queue.flush(shards), "shards": shards}

    def _require_lead(self, qid: str) -> None:
        view = self.queue.cluster
        number = self.queue.shard_of_id(qid)
        if view is not None and number is not None and not view.is_local_primary(number):
            raise StorageUnavailable(f"queue shard {number} is not led here")


class ClusterQueue:
    """The admin operations over every member (see the module docstring),
    and ``enqueue`` forwarding for a node that leads no queue shard."""

    def __init__(self, local: LocalQueue, view: Any, rpc: Any, timeout: float = 10.0) -> None:
        self.local = local
        self.view = view  # node.context.ClusterView
        self.rpc = rpc  # cluster/rpc.py RpcClient
        self.timeout = timeout

    @property
    def shards(self) -> int:
        return self.local.queue.store.shards

    def _call(self, node: str, method: str, args: dict, attachments: list[bytes] = ()) -> Any:
        from cluster.router import remote_error
        from cluster.rpc import RpcError

        address = self.view.rpc_address(node)
        if address is None:
            raise StorageUnavailable(f"{node} is not a member")
        try:
            result, _ = self.rpc.call(address, method, args, list(attachments),
                                      timeout=self.timeout)
        except RpcError as exc:
            raise remote_error(exc) from exc
        return result

    def _primary_of_id(self, qid: str) -> str | None:
        """The member leading the id's queue shard; None when it is this node."""
        number = queue_shard(qid, self.shards)
        if self.view.is_local_primary(number):
            return None
        primary = self.view.primary_of(number)
        if primary is None or primary == self.view.node_name:
            raise StorageUnavailable(f"queue shard {number} has no primary now")
        return primary

    def _fan_out(self, method: str, args: dict, local: Callable[[], dict]) -> tuple[list, list]:
        """(answers, missing shards): ``method`` on every primary at once."""
        import gevent

        nodes = {self.view.primary_of(n) for n in range(self.shards)} - {None}
        nodes.discard(self.view.node_name)
        jobs = {node: gevent.spawn(self._call, node, method, args) for node in sorted(nodes)}
        answers = [local()]
        gevent.joinall(list(jobs.values()))
        for node, job in jobs.items():
            if job.successful():
                answers.append(job.value)
            else:
                log.warning("queue %s on %s failed: %s", method, node, job.exception)
        covered = {n for a in answers for n in a.get("shards", ())}
        return answers, sorted(set(range(self.shards)) - covered)

    def list(self, domain: str | None, sender: str | None, older_than: float | None) -> dict:
        args = {"domain": domain, "sender": sender, "older_than": older_than}
        answers, missing = self._fan_out(
            "queue.list", args, lambda: self.local.list(domain, sender, older_than))
        seen: dict[str, dict] = {}
        for answer in answers:
            for entry in answer["entries"]:
                seen.setdefault(entry["id"], entry)
        entries = sorted(seen.values(), key=lambda e: (e["created"], e["id"]))
        return {"entries": entries, "missing_shards": missing}

    def show(self, qid: str) -> dict:
        node = self._primary_of_id(qid)
        return self.local.show(qid) if node is None else self._call(node, "queue.show",
                                                                     {"id": qid})

    def act(self, action: str, qid: str) -> None:
        node = self._primary_of_id(qid)
        if node is None:
            self.local.act(action, qid)
        else:
            self._call(node, f"queue.{action}", {"id": qid})

    def flush(self) -> dict:
        answers, missing = self._fan_out("queue.flush", {}, self.local.flush)
        return {"count": sum(a["count"] for a in answers), "missing_shards": missing}

    def enqueue(self, args: dict, raw: bytes) -> QueueEntry:
        """Forward a checked enqueue to the primary of a random queue shard."""
        import random

        led = [(n, p) for n in range(self.shards) if (p := self.view.primary_of(n))
               and p != self.view.node_name]
        if not led:
            raise StorageUnavailable("no queue shard has a primary on another node")
        _, node = random.choice(led)
        result = self._call(node, "queue.enqueue", {"args": args}, [raw])
        return entry_from_json(result["entry"])


def _list_args(args: dict) -> tuple[str | None, str | None, float | None]:
    older = args.get("older_than")
    if older is not None and (
        isinstance(older, bool) or not isinstance(older, (int, float))
        or not math.isfinite(older) or older < 0
    ):
        raise _BadRequest("argument 'older_than': expected seconds >= 0")
    return (_str_arg(args, "domain", required=False), _str_arg(args, "sender", required=False),
            older)


def register_queue_handlers(rpc_server: Any, ctx: Any, rpc_client: Any = None,
                            timeout: float = 10.0) -> ClusterQueue | None:
    """Serve the ``queue.*`` RPC methods for ``ctx.queue`` on this node's RPC
    server (node/app.py, cluster mode), and put the queue in cluster mode
    (``OutboundQueue.use_cluster``: writes to led shards only).  With
    ``rpc_client`` it also forwards enqueues and the admin commands cover the
    whole cluster; returns that ClusterQueue."""
    local = LocalQueue(ctx.queue)

    def handler(fn: Callable[[dict, list[bytes]], dict]) -> Callable:
        def handle(peer: str, args: dict, attachments: list[bytes]) -> tuple[dict, list[bytes]]:
            try:
                return fn(args, attachments), []
            except _BadRequest as exc:
                raise StorageError(str(exc)) from None
        return handle

    def enqueue(args: dict, attachments: list[bytes]) -> dict:
        if len(attachments) != 1:
            raise StorageError("queue.enqueue needs the message as one attachment")
        entry = ctx.queue.enqueue_checked(check_enqueue_args(args.get("args")), attachments[0])
        return {"entry": entry_to_json(entry)}

    def act(action: str) -> Callable[[dict, list[bytes]], dict]:
        def run(args: dict, _: list[bytes]) -> dict:
            qid = _str_arg(args, "id")
            local._require_lead(qid)
            local.act(action, qid)
            return {}
        return run

    methods: dict[str, Callable[[dict, list[bytes]], dict]] = {
        "queue.enqueue": enqueue,
        "queue.list": lambda args, _: local.list(*_list_args(args)),
        "queue.show": lambda args, _: local.show(_str_arg(args, "id")),
        "queue.flush": lambda args, _: local.flush(),
        **{f"queue.{a}": act(a) for a in ("retry", "hold", "release", "delete")},
    }
    for name, fn in methods.items():
        rpc_server.register(name, handler(fn))
    if ctx.cluster is None:
        return None
    remote = None if rpc_client is None else ClusterQueue(local, ctx.cluster, rpc_client, timeout)
    ctx.queue.use_cluster(ctx.cluster, remote)
    return remote


class AdminServer:
    """Serve admin requests for one node on a Unix socket."""

    def __init__(self, path: Path, queue: Any, wake: Callable[[], None]) -> None:
        self.path = Path(path)
        self.queue = queue  # node.context.OutboundQueue with storage/queue.py's admin methods
        self.wake = wake
        self._server: Any = None
        self._commands: dict[str, Callable[[dict], Any]] = {
            "ping": lambda args: {"pong": True},
            "queue.list": self._list,
            "queue.show": self._show,
            "queue.retry": self._retry,
            "queue.hold": self._hold,
            "queue.release": self._release,
            "queue.delete": self._delete,
            "queue.flush": self._flush,
            "restore.append": self._restore_append,
            "restore.mailbox": self._restore_mailbox,
            "restore.listing": self._restore_listing,
        }

    def register(self, name: str, command: Callable[[dict], Any]) -> None:
        """Add a command (node/app.py: ``storage.reclaim``, storage/reclaim.py)."""
        self._commands[name] = command

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Bind (replacing a stale socket file) and serve in the background.

        Raises AdminError if another process answers on the socket.
        """
        from gevent import socket as gsocket
        from gevent.server import StreamServer

        self._remove_stale()
        # gevent's socket even without monkey-patching (tests): accept never blocks the hub.
        sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # never world- or group-accessible, not even briefly
        try:
            with _sockaddr(self.path) as addr:
                sock.bind(addr)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self._server = StreamServer(sock, self._handle)
        self._server.start()
        log.info("admin socket listening at %s", self.path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=2)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise AdminError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)  # local connect: answered at once or refused
        try:
            with _sockaddr(self.path) as addr:
                probe.connect(addr)
        except OSError:
            self.path.unlink(missing_ok=True)  # left by a process that died
            return
        finally:
            probe.close()
        raise AdminError(f"another node is serving {self.path}")

    # -- connections ---------------------------------------------------------

    def _handle(self, sock: socket.socket, _addr: Any) -> None:
        sock.settimeout(IDLE_TIMEOUT)
        reader = sock.makefile("rb")
        try:
            while True:
                line = reader.readline(MAX_REQUEST + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST or not line.endswith(b"\n"):
                    self._send(sock, {"ok": False, "code": "bad_request",
                                      "error": f"request longer than {MAX_REQUEST} octets"})
                    return
                self._send(sock, self.handle_request(line))
        except OSError:
            return  # the client went away or timed out
        finally:
            reader.close()
            sock.close()

    @staticmethod
    def _send(sock: socket.socket, response: dict) -> None:
        sock.sendall(json.dumps(response, separators=(",", ":")).encode() + b"\n")

    def handle_request(self, line: bytes) -> dict[str, Any]:
        """One request line -> one response object; never raises."""
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise _BadRequest('expected {"cmd": "...", "args": {...}}')
            args = request.get("args", {})
            if not isinstance(args, dict):
                raise _BadRequest("args must be an object")
            command = self._commands.get(request["cmd"])
            if command is None:
                raise _BadRequest(f"unknown command {request['cmd'][:64]!r}")
            return {"ok": True, "result": command(args)}
        except (ValueError, _BadRequest) as exc:  # JSON errors are ValueErrors
            message = str(exc) if isinstance(exc, _BadRequest) else "request is not JSON"
            return {"ok": False, "code": "bad_request", "error": message}
        except NoSuchQueueEntry as exc:
            return {"ok": False, "code": "no_such_entry", "error": f"no queue entry {exc}"}
        except StorageUnavailable:
            return {"ok": False, "code": "unavailable", "error": "storage unavailable, try again"}
        except StorageError:
            log.exception("admin request failed")
            return {"ok": False, "code": "storage", "error": "storage error (see the node log)"}
        except Exception:
            log.exception("admin request failed")
            return {"ok": False, "code": "internal", "error": "internal error (see the node log)"}

    def _wake(self) -> None:
        try:
            self.wake()
        except Exception:
            log.exception("queue runner wake-up failed")

    # -- commands ------------------------------------------------------------

    def _target(self) -> LocalQueue | ClusterQueue:
        """This node's queue, or the whole cluster's once the queue is in cluster mode."""
        remote = getattr(self.queue, "remote", None)
        return remote if isinstance(remote, ClusterQueue) else LocalQueue(self.queue)

    @staticmethod
    def _answer(result: dict, *keys: str) -> dict:
        """``keys`` of a result, plus ``missing_shards`` when some went unanswered."""
        out = {k: result[k] for k in keys}
        if result.get("missing_shards"):
            out["missing_shards"] = result["missing_shards"]
        return out

    def _list(self, args: dict) -> dict:
        return self._answer(self._target().list(*_list_args(args)), "entries")

    def _show(self, args: dict) -> dict:
        return self._target().show(_str_arg(args, "id"))

    def _retry(self, args: dict) -> dict:
        if args.get("all") is True:
            return self._flush(args)  # {"count": n}
        self._target().act("retry", _str_arg(args, "id"))
        self._wake()
        return {"count": 1}

    def _hold(self, args: dict) -> dict:
        self._target().act("hold", _str_arg(args, "id"))
        return {}

    def _release(self, args: dict) -> dict:
        self._target().act("release", _str_arg(args, "id"))
        self._wake()
        return {}

    def _delete(self, args: dict) -> dict:
        self._target().act("delete", _str_arg(args, "id"))
        return {}

    def _flush(self, args: dict) -> dict:
        result = self._target().flush()
        self._wake()
        return self._answer(result, "count")


    # -- restores (storage/restore.py, node/backupcli.py; single node) ----------
    # The CLI stores the blobs in this node's BlobStore first (same machine,
    # same data directory); large arguments come as a JSON file it wrote in
    # data_dir/restore/ (a request line is at most MAX_REQUEST octets).

    @property
    def _store(self) -> Any:
        return self.queue.store  # the local MailStore (single node)

    def _restore_file(self, args: dict) -> dict:
        root = (self.path.parent / "restore").resolve()
        path = Path(_str_arg(args, "file")).resolve()
        if path.parent != root:
            raise _BadRequest(f"restore files must be in {root}")
        def load() -> Any:  # threadpool: the file may hold thousands of messages
            with open(path, encoding="utf-8") as f:
                return json.load(f)

        import gevent

        data = gevent.get_hub().threadpool.apply(load)
        if not isinstance(data, dict):
            raise _BadRequest("restore file: expected a JSON object")
        return data

    def _restore_append(self, args: dict) -> dict:
        """{account, mailbox, blob, flags, internaldate}: an ordinary append of a
        restored message into a (created if missing) folder."""
        from storage.model import MailboxExists

        account, mailbox = _str_arg(args, "account"), _str_arg(args, "mailbox")
        raw = self._store.read_message(_str_arg(args, "blob"))
        try:
            self._store.create_mailbox(account, mailbox)
        except MailboxExists:
            pass
        result = self._store.append(account, mailbox, raw, flags=list(args.get("flags") or ()),
                                    internaldate=args.get("internaldate"))
        return {"uid": result.uid, "uidvalidity": result.uidvalidity}

    def _restore_mailbox(self, args: dict) -> dict:
        """{file}: {account, mailbox, backup} -> MailStore.restore_mailbox (in place)."""
        data = self._restore_file(args)
        return self._store.restore_mailbox(str(data["account"]), str(data["mailbox"]),
                                           data["backup"])

    def _restore_listing(self, args: dict) -> dict:
        """{account}: every mailbox with [uid, blob, flags] of each message (drills)."""
        account = _str_arg(args, "account")
        out = []
        for box in self._store.list_mailboxes(account):
            rows = self._store.messages(account, box.name)
            out.append({"name": box.name, "uidvalidity": box.uidvalidity,
                        "messages": [[r.uid, r.blob, sorted(r.flags)] for r in rows]})
        return {"mailboxes": out}


class AdminClient:
    """Blocking client for the admin socket (used by the CLI)."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def call(self, cmd: str, **args: Any) -> Any:
        """Send one request; returns its result or raises AdminError
        (NodeNotRunning when nothing listens at the path)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                with _sockaddr(self.path) as addr:
                    sock.connect(addr)
            except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
                raise NodeNotRunning(self.path) from None
            line = json.dumps({"cmd": cmd, "args": args}, separators=(",", ":")).encode()
            sock.sendall(line + b"\n")
            with sock.makefile("rb") as reader:
                reply = reader.readline()
        except OSError as exc:
            raise AdminError(f"admin socket {self.path}: {exc.strerror or exc}") from None
        finally:
            sock.close()
        if not reply:
            raise AdminError("the node closed the admin connection without answering")
        try:
            response = json.loads(reply)
        except ValueError:
            raise AdminError("the node sent a response that is not JSON") from None
        if not response.get("ok"):
            raise AdminError(str(response.get("error", "request failed")),
                             str(response.get("code", "error")))
        return response.get("result")
