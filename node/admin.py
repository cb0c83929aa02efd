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
``wake()`` is called after retry, release and flush so the queue runner acts
at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


def entry_to_json(entry: QueueEntry) -> dict[str, Any]:
    """A queue entry as plain JSON data (tuples become lists)."""
    data = dataclasses.asdict(entry)
    data["pending"] = len(entry.pending)
    return data


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
        }

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

    def _list(self, args: dict) -> dict:
        older = args.get("older_than")
        if older is not None and (
            isinstance(older, bool) or not isinstance(older, (int, float))
            or not math.isfinite(older) or older < 0
        ):
            raise _BadRequest("argument 'older_than': expected seconds >= 0")
        entries = self.queue.list(
            domain=_str_arg(args, "domain", required=False),
            sender=_str_arg(args, "sender", required=False),
            older_than=older,
        )
        return {"entries": [entry_to_json(e) for e in entries]}

    def _show(self, args: dict) -> dict:
        qid = _str_arg(args, "id")
        entry = self.queue.get(qid)
        if entry is None:
            raise NoSuchQueueEntry(qid)
        try:
            headers = header_section(self.queue.read_message(entry.blob))
        except StorageError:
            headers = ""
        return {"entry": entry_to_json(entry), "headers": headers}

    def _retry(self, args: dict) -> dict:
        if args.get("all") is True:
            count = self.queue.flush()
        else:
            self.queue.retry_now(_str_arg(args, "id"))
            count = 1
        self._wake()
        return {"count": count}

    def _hold(self, args: dict) -> dict:
        self.queue.hold(_str_arg(args, "id"))
        return {}

    def _release(self, args: dict) -> dict:
        self.queue.release(_str_arg(args, "id"))
        self._wake()
        return {}

    def _delete(self, args: dict) -> dict:
        self.queue.delete(_str_arg(args, "id"))
        return {}

    def _flush(self, args: dict) -> dict:
        count = self.queue.flush()
        self._wake()
        return {"count": count}


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
