"""The one etcd client wrapper: a session over etcd3gw (HTTP JSON gateway).

Theory of operation
-------------------
This is the only module that imports etcd3gw (and requests).  Every other
module sees plain Python values, :class:`KeyValue` / :class:`WatchEvent`, and
two exceptions: :class:`EtcdUnavailable` (no endpoint answered; retry later)
and :class:`EtcdError` (etcd answered, but not usefully).

* One etcd3gw client per endpoint.  A request that cannot reach the current
  endpoint rotates to the next one; reads (and puts, which are idempotent)
  are retried on each endpoint once, transactions only on connection
  refusal (the request never left), so a CAS is never applied twice blindly.
  A member that answers "no leader", "leader changed", "request timed out"
  or a gateway transport error counts as unreachable for this rule.
* One **session lease** (``lease_ttl`` seconds), refreshed every TTL/3 by a
  greenlet.  A failed refresh rotates the endpoint and re-arms every watch
  (a watch stream from a dead member can stall silently).  The lease is
  *lost* when etcd says it expired, or when no refresh succeeded for a whole
  TTL (it may have expired server-side): then ``on_session_lost`` callbacks
  fire at once (step down from leadership), a new lease is granted as soon as
  etcd answers, and ``on_session_restored`` callbacks fire (re-register).
* Watches run in greenlets over a streaming POST to ``/v3/watch``; after any
  error or end of stream they re-arm from ``last_seen_mod_revision + 1``, so
  no event is skipped or repeated.  A compacted start revision calls the
  watch's ``on_reset`` (reload state, return the revision to resume from).
* Locks and elections are a transaction ``create_revision == 0 -> put with
  the session lease`` (never etcd3gw.Lock, which leaks a lease per failed
  acquire).
* Values are JSON.  Keys are relative to the configured prefix and start
  with "/" (``"/domains/example.org"``).
* TLS and authentication (multi-node mode): ``https://`` endpoints are
  verified against ``ca_cert``; a client certificate is presented when one
  is configured.  With a ``username``, the session authenticates
  (``POST /v3/auth/authenticate``) before its first request and sends the
  token as the ``Authorization`` header on every request and watch stream.
  etcd's simple tokens expire (5 minutes idle by default) and a restarted
  member forgets them: a request refused as unauthenticated (invalid token,
  empty user name, old auth revision: never applied) re-authenticates once
  and is sent again; a watch cancelled for such a reason drops the token and
  re-arms with a fresh one.  ``session_from_config`` builds a session from
  the ``[etcd]`` settings, the same way for the node and the CLI.

Everything here cooperates with gevent once the process is monkey-patched
(requests then uses gevent sockets); nothing blocks the hub.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import etcd3gw
import gevent
import gevent.lock
import requests
from etcd3gw import exceptions as etcd_exc

if TYPE_CHECKING:
    from node.config import EtcdSettings

log = logging.getLogger(__name__)

API_PATH = "/v3/"  # etcd >= 3.4 serves the stable gateway path
MAX_WATCH_BACKOFF = 2.0  # seconds between re-arm attempts at most


class EtcdError(Exception):
    """etcd answered with an error, or with something we cannot use."""


class EtcdUnavailable(EtcdError):
    """No configured endpoint answered in time; the operation may be retried."""


@dataclass(frozen=True)
class KeyValue:
    key: str  # relative to the session prefix, starts with "/"
    value: Any  # decoded JSON
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    type: str  # "put" or "delete"
    key: str  # relative to the session prefix
    value: Any  # decoded JSON; None for "delete"
    mod_revision: int


def encode_json(value: Any) -> bytes:
    """The canonical JSON bytes stored for a value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_json(raw: bytes, key: str = "") -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise EtcdError(f"value of {key or 'key'} is not JSON") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with prefix (etcd's prefix idiom)."""
    buf = bytearray(prefix)
    while buf:
        if buf[-1] < 0xFF:
            buf[-1] += 1
            return bytes(buf)
        buf.pop()
    return b"\0"  # every key


def _one_line(exc: BaseException) -> str:
    text = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:  # the gateway answers errors as {"error": "...", "message": "..."}
        body = json.loads(text)
        if isinstance(body, dict):
            text = body.get("message") or body.get("error") or text
    except (ValueError, TypeError):
        pass
    text = " ".join(str(text).split())
    tls = _tls_reason(text)
    if tls:
        return tls
    errno_at = text.rfind("[Errno ")
    if errno_at >= 0:  # urllib3's nested wrappers: keep the OS reason only
        text = text[errno_at:].rstrip("'\")} ")
    return text[:300]


def _tls_reason(text: str) -> str:
    """urllib3's nested SSLError text -> "TLS handshake failed: <reason>" ("" if none)."""
    at = text.find("[SSL: ")
    if at >= 0:
        reason = text[at:].split(" (_ssl.c", 1)[0].rstrip("'\")} ")
        return f"TLS handshake failed: {reason}"
    if "SSLEOFError" in text or "EOF occurred in violation of protocol" in text:
        return ("TLS handshake failed: the server closed the connection"
                " (client certificate missing or refused?)")
    return ""


class _Retry(Exception):
    """Internal: this endpoint failed; try the next one."""


class _AuthExpired(Exception):
    """Internal: etcd refused the token (expired, unknown to this member)."""


# etcd answers these when a token is missing, expired or issued before the
# auth store changed; the request was not applied, so it may be sent again.
_AUTH_RETRY_MESSAGES = (
    "invalid auth token",
    "user name is empty",
    "revision of auth store is old",
    "auth token is not set",
)


# A member answered, but cannot serve the request now (leader election, or
# its gateway lost the connection to its own gRPC server).
_UNAVAILABLE_MESSAGES = (
    "no leader",
    "timed out",
    "leader changed",
    "too many requests",
    "transport:",
    "code = Unavailable",
)


def _is_auth_retry(message: str) -> bool:
    return any(text in message for text in _AUTH_RETRY_MESSAGES)


@dataclass(frozen=True)
class Compare:
    """One txn condition, built with the helpers below (etcd3 api, Compare)."""

    key: str
    target: str  # CREATE | MOD | VERSION | VALUE | LEASE
    result: str  # EQUAL | NOT_EQUAL | GREATER | LESS
    operand: Any


def key_absent(key: str) -> Compare:
    return Compare(key, "CREATE", "EQUAL", 0)


def key_exists(key: str) -> Compare:
    return Compare(key, "CREATE", "GREATER", 0)


def mod_revision_is(key: str, revision: int) -> Compare:
    return Compare(key, "MOD", "EQUAL", revision)


@dataclass(frozen=True)
class Put:
    key: str
    value: Any
    lease: bool = False


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


class Watch:
    """A running prefix watch; ``cancel()`` stops it.  See EtcdSession.watch_prefix."""

    def __init__(
        self,
        session: EtcdSession,
        key: str,
        callback: Callable[[WatchEvent], None],
        start_revision: int,
        on_reset: Callable[[], int] | None,
    ) -> None:
        self._session = session
        self._key = key
        self._callback = callback
        self._on_reset = on_reset
        self.next_revision = start_revision
        self._stopped = False
        self._response: Any = None
        self._in_callback = False
        self._http = session._new_http()
        self._token = ""  # the token this stream was opened with
        self.rearms = 0  # how many times the stream was re-established
        self._greenlet = gevent.spawn(self._run)

    def cancel(self) -> None:
        self._stopped = True
        self._break_stream()
        if not self._in_callback:
            self._greenlet.kill(block=False)
        self._http.close()

    def rearm(self) -> None:
        """Drop the current stream; the loop re-arms from next_revision."""
        self._break_stream()

    def _break_stream(self) -> None:
        resp = self._response
        if resp is None:
            return
        try:
            fd = resp.raw.fileno()
            s = socket.socket(fileno=socket.dup(fd))
            try:
                s.shutdown(socket.SHUT_RDWR)  # the reader sees EOF at once
            finally:
                s.close()
        except Exception:  # already closed: nothing to break
            pass

    def _run(self) -> None:
        backoff = 0.05
        while not self._stopped:
            try:
                self._stream_once()
                backoff = 0.05
            except Exception as exc:  # network, gateway or JSON error: re-arm
                if self._stopped:
                    return
                message = _one_line(exc)
                log.info("etcd watch %s: re-arming after: %s", self._key, message)
                if self._token and _is_auth_retry(message):
                    self._session._drop_token(self._token)  # re-authenticate, same member
                else:
                    self._session._rotate()
                gevent.sleep(backoff)
                backoff = min(backoff * 2, MAX_WATCH_BACKOFF)
            self.rearms += 1

    def _stream_once(self) -> None:
        full = self._session._full(self._key)
        request = {
            "create_request": {
                "key": _b64(full),
                "range_end": _b64(_range_end(full)),
                "start_revision": self.next_revision,
            }
        }
        self._token = self._session._auth_token()
        url = self._session._endpoint_url() + API_PATH + "watch"
        timeout = self._session.timeout
        headers = {"Authorization": self._token} if self._token else None
        resp = self._http.post(
            url, json=request, headers=headers, stream=True, timeout=(timeout, None)
        )
        self._response = resp
        try:
            if resp.status_code != 200:
                detail = _one_line(Exception(resp.text[:300]))
                raise EtcdError(f"watch refused: HTTP {resp.status_code}: {detail}")
            buf = b""
            for chunk in resp.iter_content(chunk_size=None):
                if self._stopped:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self._handle(json.loads(line))
        finally:
            self._response = None
            resp.close()

    def _handle(self, message: dict) -> None:
        if "error" in message:
            raise EtcdError(_one_line(Exception(json.dumps(message["error"]))))
        result = message.get("result", {})
        compact = int(result.get("compact_revision", 0) or 0)
        if compact:
            log.warning("etcd watch %s: revision %d compacted", self._key, self.next_revision)
            if self._on_reset is not None:
                self.next_revision = self._on_reset()
            else:
                self.next_revision = compact
            raise EtcdError("watch compacted; re-arming")
        if result.get("canceled"):
            raise EtcdError(f"watch canceled: {result.get('cancel_reason', '')}")
        events = result.get("events") or []
        last = 0
        for raw in events:
            kv = raw["kv"]
            key = self._session._relative(_unb64(kv["key"]))
            mod = int(kv.get("mod_revision", 0))
            if raw.get("type") == "DELETE":
                event = WatchEvent("delete", key, None, mod)
            else:
                value = decode_json(_unb64(kv.get("value", "")), key)
                event = WatchEvent("put", key, value, mod)
            self._in_callback = True
            try:
                self._callback(event)
            except Exception:
                log.exception("etcd watch %s: callback failed on %s", self._key, key)
            finally:
                self._in_callback = False
            last = max(last, mod)
        if last:
            # A whole response (one or more revisions) was delivered.
            self.next_revision = last + 1


class EtcdSession:
    """A session to an etcd cluster: endpoints, a prefix, one lease, watches.

    ``start()`` grants the lease and starts the refresher; ``close()`` stops
    watches and revokes the lease.  Data calls work before ``start()`` too,
    except ``lease=True`` puts and locks (used by the CLI, which needs no lease).
    ``ca_cert`` verifies https endpoints (empty: the system CAs), ``cert`` and
    ``key`` are a client certificate, ``username``/``password`` turn on etcd
    authentication.  Raises EtcdUnavailable / EtcdError only.
    """

    def __init__(
        self,
        endpoints: list[str],
        prefix: str,
        lease_ttl: int = 10,
        timeout: float = 5.0,
        on_session_lost: Callable[[], None] | None = None,
        *,
        ca_cert: str = "",
        cert: str = "",
        key: str = "",
        username: str = "",
        password: str = "",
    ) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoints configured")
        if bool(cert) != bool(key):
            raise EtcdError("etcd client certificate: set both etcd.cert and etcd.key, or neither")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.lease_ttl = max(2, int(lease_ttl))
        self.timeout = timeout
        self.ca_cert = ca_cert
        self.client_cert = (cert, key) if cert else None
        self.username = username
        self._password = password
        self._token = ""
        self._auth_lock = gevent.lock.Semaphore()
        self.authentications = 0  # tokens obtained so far (the first, then renewals)
        self._clients = [self._make_client(e) for e in self.endpoints]
        self._index = 0
        self._lease_id = 0
        self._last_refresh = 0.0
        self._refresher: gevent.Greenlet | None = None
        self._watches: list[Watch] = []
        self._lost_callbacks: list[Callable[[], None]] = []
        self._restored_callbacks: list[Callable[[], None]] = []
        if on_session_lost is not None:
            self._lost_callbacks.append(on_session_lost)
        self.sessions_lost = 0

    # -- endpoints -------------------------------------------------------

    def _make_client(self, endpoint: str) -> Any:
        parts = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
        if not parts.hostname or parts.scheme not in ("http", "https"):
            raise EtcdError(f"bad etcd endpoint {endpoint!r} (expected http://HOST:PORT)")
        return etcd3gw.client(
            host=parts.hostname,
            port=parts.port or 2379,
            protocol=parts.scheme,
            timeout=self.timeout,
            api_path=API_PATH,
            session=self._new_http(),
        )

    def _new_http(self) -> requests.Session:
        """A requests session with this session's TLS settings.

        trust_env is off: REQUESTS_CA_BUNDLE would replace our ca_cert, and
        proxies or .netrc credentials from the environment have no business
        between a node and its etcd."""
        http = requests.Session()
        http.trust_env = False
        http.verify = self.ca_cert or True
        if self.client_cert is not None:
            http.cert = self.client_cert
        return http

    def _endpoint_url(self) -> str:
        return self._clients[self._index].base_url

    def _rotate(self) -> None:
        self._index = (self._index + 1) % len(self._clients)

    def _post(self, path: str, payload: dict, *, retry_on_timeout: bool = True) -> dict:
        """POST to the gateway with our token, re-authenticating once if etcd
        refuses it; maps every error to ours."""
        token = self._auth_token()
        try:
            return self._post_once(path, payload, token, retry_on_timeout)
        except _AuthExpired:
            self._drop_token(token)
        token = self._auth_token()
        try:
            return self._post_once(path, payload, token, retry_on_timeout)
        except _AuthExpired as exc:
            raise EtcdError(f"etcd error: refused after re-authenticating: {exc}") from None

    def _post_once(
        self, path: str, payload: dict, token: str, retry_on_timeout: bool = True
    ) -> dict:
        """One POST, rotating endpoints on connection errors."""
        headers = {"Authorization": token} if token else None
        last = "no endpoint tried"
        for _ in range(len(self._clients)):
            client = self._clients[self._index]
            try:
                return client.post(client.get_url(path), json=payload, headers=headers)
            except etcd_exc.ConnectionFailedError as exc:
                last = f"{client.base_url}: {_one_line(exc)}"
                self._rotate()
            except etcd_exc.ConnectionTimeoutError as exc:
                last = f"{client.base_url}: timed out: {_one_line(exc)}"
                self._rotate()
                if not retry_on_timeout:
                    break
            except requests.exceptions.RequestException as exc:
                last = f"{client.base_url}: {_one_line(exc)}"
                self._rotate()
                if not retry_on_timeout:
                    break
            except etcd_exc.Etcd3Exception as exc:
                message = _one_line(exc)
                if token and _is_auth_retry(message):
                    raise _AuthExpired(message) from None
                if not any(text in message for text in _UNAVAILABLE_MESSAGES):
                    raise EtcdError(f"etcd error: {message}") from None
                # This member cannot serve now (no leader, election, its
                # gateway lost its backend): reads and puts try the next one.
                last = f"{client.base_url}: {message}"
                self._rotate()
                if not retry_on_timeout:
                    break
            except ValueError as exc:  # a body that is not JSON
                raise EtcdError(f"etcd error: bad response: {_one_line(exc)}") from None
        raise EtcdUnavailable(f"etcd unavailable: {last}")

    # -- authentication --------------------------------------------------

    def _auth_token(self) -> str:
        """The current token, authenticating first if we have none ("" without auth)."""
        if not self.username or self._token:
            return self._token
        with self._auth_lock:  # one authentication for every waiting greenlet
            if not self._token:
                self._token = self._authenticate()
            return self._token

    def _authenticate(self) -> str:
        body = {"name": self.username, "password": self._password}
        try:
            result = self._post_once("auth/authenticate", body, "")
        except EtcdUnavailable:
            raise
        except EtcdError as exc:
            reason = str(exc).removeprefix("etcd error: ")
            raise EtcdError(f"etcd authentication as {self.username!r} failed: {reason}") from None
        token = str(result.get("token") or "")
        if not token:
            raise EtcdError(f"etcd authentication as {self.username!r}: no token (auth disabled?)")
        self.authentications += 1
        return token

    def _drop_token(self, token: str) -> None:
        """Forget a refused token (unless another greenlet already replaced it)."""
        if token and self._token == token:
            self._token = ""

    # -- keys ------------------------------------------------------------

    def _full(self, key: str) -> bytes:
        return (self.prefix + "/" + key.lstrip("/")).encode("utf-8")

    def _relative(self, full: bytes) -> str:
        text = full.decode("utf-8", "replace")
        return text[len(self.prefix) :] if text.startswith(self.prefix) else text

    def _kv(self, item: dict) -> KeyValue:
        key = self._relative(_unb64(item["key"]))
        return KeyValue(
            key=key,
            value=decode_json(_unb64(item.get("value", "")), key),
            create_revision=int(item.get("create_revision", 0)),
            mod_revision=int(item.get("mod_revision", 0)),
            version=int(item.get("version", 0)),
            lease=int(item.get("lease", 0)),
        )

    # -- data ------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        result = self._post("kv/range", {"key": _b64(self._full(key))})
        kvs = result.get("kvs") or []
        return self._kv(kvs[0]) if kvs else None

    def get_prefix(self, key: str) -> tuple[list[KeyValue], int]:
        """Every key under key (sorted by key) and the store revision read at."""
        full = self._full(key)
        result = self._post(
            "kv/range",
            {"key": _b64(full), "range_end": _b64(_range_end(full)), "sort_order": 1},
        )
        revision = int(result.get("header", {}).get("revision", 0))
        return [self._kv(item) for item in result.get("kvs") or []], revision

    def put(self, key: str, value: Any, *, lease: bool = False) -> int:
        """Store value as JSON; returns the new store revision."""
        payload: dict[str, Any] = {"key": _b64(self._full(key)), "value": _b64(encode_json(value))}
        if lease:
            payload["lease"] = self._require_lease()
        result = self._post("kv/put", payload)
        return int(result.get("header", {}).get("revision", 0))

    def delete(self, key: str) -> bool:
        result = self._post("kv/deleterange", {"key": _b64(self._full(key))})
        return int(result.get("deleted", 0)) > 0

    def delete_prefix(self, key: str) -> int:
        full = self._full(key)
        result = self._post(
            "kv/deleterange", {"key": _b64(full), "range_end": _b64(_range_end(full))}
        )
        return int(result.get("deleted", 0))

    def txn(
        self,
        compare: list[Compare],
        success: list[Put | Delete],
        failure: list[Put | Delete] | None = None,
    ) -> bool:
        """One etcd transaction; True when every comparison held (success ran)."""
        body = {
            "compare": [self._compare(c) for c in compare],
            "success": [self._op(o) for o in success],
            "failure": [self._op(o) for o in failure or []],
        }
        result = self._post("kv/txn", body, retry_on_timeout=False)
        return bool(result.get("succeeded", False))

    def _compare(self, c: Compare) -> dict:
        out: dict[str, Any] = {
            "key": _b64(self._full(c.key)),
            "target": c.target,
            "result": c.result,
        }
        field = {
            "CREATE": "create_revision",
            "MOD": "mod_revision",
            "VERSION": "version",
            "LEASE": "lease",
        }.get(c.target)
        if field is not None:
            out[field] = str(int(c.operand))
        else:
            out["value"] = _b64(encode_json(c.operand))
        return out

    def _op(self, op: Put | Delete) -> dict:
        if isinstance(op, Put):
            put: dict[str, Any] = {
                "key": _b64(self._full(op.key)),
                "value": _b64(encode_json(op.value)),
            }
            if op.lease:
                put["lease"] = self._require_lease()
            return {"request_put": put}
        full = self._full(op.key)
        delete = {"key": _b64(full)}
        if op.prefix:
            delete["range_end"] = _b64(_range_end(full))
        return {"request_delete_range": delete}

    def create_if_absent(self, key: str, value: Any, *, lease: bool = False) -> bool:
        return self.txn([key_absent(key)], [Put(key, value, lease)])

    def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: Any, *, lease: bool = False
    ) -> bool:
        """Put only if the key's mod_revision is still expected (0: key absent)."""
        if expected_mod_revision == 0:
            return self.create_if_absent(key, value, lease=lease)
        return self.txn([mod_revision_is(key, expected_mod_revision)], [Put(key, value, lease)])

    def delete_if(self, key: str, expected_mod_revision: int) -> bool:
        return self.txn([mod_revision_is(key, expected_mod_revision)], [Delete(key)])

    # -- locks and elections ---------------------------------------------

    def acquire(self, key: str, value: Any) -> bool:
        """Take a lock / win an election: create key under our lease if absent."""
        return self.create_if_absent(key, value, lease=True)

    def release(self, key: str) -> bool:
        """Give up a lock we hold (only if it is still under our lease)."""
        if not self._lease_id:
            return False
        return self.txn([Compare(key, "LEASE", "EQUAL", self._lease_id)], [Delete(key)])

    # -- session lease ---------------------------------------------------

    @property
    def lease_id(self) -> int:
        return self._lease_id

    def _require_lease(self) -> int:
        if not self._lease_id:
            raise EtcdUnavailable("etcd session has no lease (not started, or lost)")
        return self._lease_id

    def add_session_callbacks(
        self,
        on_lost: Callable[[], None] | None = None,
        on_restored: Callable[[], None] | None = None,
    ) -> None:
        """on_lost fires when the lease is gone (step down); on_restored when a
        new lease is in place (re-register leased keys)."""
        if on_lost is not None:
            self._lost_callbacks.append(on_lost)
        if on_restored is not None:
            self._restored_callbacks.append(on_restored)

    def _grant(self) -> int:
        result = self._post("lease/grant", {"TTL": self.lease_ttl, "ID": 0})
        lease = int(result.get("ID", 0))
        if not lease:
            raise EtcdError("etcd granted no lease")
        return lease

    def start(self) -> None:
        """Grant the session lease and start refreshing it (TTL/3)."""
        if self._refresher is not None:
            return
        self._lease_id = self._grant()
        self._last_refresh = time.monotonic()
        self._refresher = gevent.spawn(self._refresh_loop)

    def _refresh_loop(self) -> None:
        interval = self.lease_ttl / 3.0
        while True:
            gevent.sleep(interval if self._lease_id else min(interval, 0.5))
            if not self._lease_id:
                self._try_regrant()
                continue
            try:
                result = self._post("lease/keepalive", {"ID": self._lease_id})
                ttl = int(result.get("result", {}).get("TTL", -1))
            except EtcdError as exc:
                log.warning("etcd lease refresh failed: %s", exc)
                self._rotate()
                self.rearm_watches()
                if time.monotonic() - self._last_refresh >= self.lease_ttl:
                    self._lose("no refresh for a whole TTL")
                continue
            if ttl <= 0:
                self._lose("lease expired")
            else:
                self._last_refresh = time.monotonic()

    def _lose(self, why: str) -> None:
        log.warning("etcd session lost (%s); lease %x", why, self._lease_id)
        self._lease_id = 0
        self.sessions_lost += 1
        self.rearm_watches()
        for callback in list(self._lost_callbacks):
            try:
                callback()
            except Exception:
                log.exception("on_session_lost callback failed")
        self._try_regrant()

    def _try_regrant(self) -> None:
        try:
            self._lease_id = self._grant()
        except EtcdError as exc:
            log.warning("etcd lease re-grant failed: %s", exc)
            return
        self._last_refresh = time.monotonic()
        log.info("etcd session restored with lease %x", self._lease_id)
        for callback in list(self._restored_callbacks):
            try:
                callback()
            except Exception:
                log.exception("on_session_restored callback failed")

    # -- watches ---------------------------------------------------------

    def watch_prefix(
        self,
        key: str,
        callback: Callable[[WatchEvent], None],
        start_revision: int,
        on_reset: Callable[[], int] | None = None,
    ) -> Watch:
        """Call callback(event) in order for every change under key from
        start_revision on, re-arming after errors; see the module docstring."""
        watch = Watch(self, key, callback, start_revision, on_reset)
        self._watches.append(watch)
        return watch

    def rearm_watches(self) -> None:
        for watch in list(self._watches):
            watch.rearm()

    def status(self) -> dict:
        """The answering member's status (version, db size, leader)."""
        return self._post("maintenance/status", {})

    def close(self) -> None:
        """Stop watches and the refresher; revoke the lease (best effort)."""
        for watch in self._watches:
            watch.cancel()
        self._watches.clear()
        if self._refresher is not None:
            self._refresher.kill(block=False)
            self._refresher = None
        if self._lease_id:
            lease, self._lease_id = self._lease_id, 0
            try:
                self._post("kv/lease/revoke", {"ID": lease}, retry_on_timeout=False)
            except EtcdError:
                pass  # it expires on its own after the TTL


def session_from_config(
    cfg: EtcdSettings,
    endpoints: list[str] | None = None,
    on_session_lost: Callable[[], None] | None = None,
) -> EtcdSession:
    """An EtcdSession from the ``[etcd]`` settings.

    endpoints defaults to ``cfg.endpoints``, else the embedded etcd's client
    URL.  The password is read from ``cfg.password_file`` (first line).
    """
    password = ""
    if cfg.username:
        if not cfg.password_file:
            raise EtcdError("etcd.username is set but etcd.password_file is empty")
        password = _read_password(cfg.password_file)
    for name in ("ca_cert", "cert", "key"):
        path = getattr(cfg, name)
        if path and not os.path.isfile(path):
            raise EtcdError(f"etcd.{name}: no such file: {path}")
    return EtcdSession(
        list(endpoints or cfg.endpoints or [cfg.embedded_client_url]),
        cfg.prefix,
        cfg.lease_ttl,
        cfg.timeout,
        on_session_lost,
        ca_cert=cfg.ca_cert,
        cert=cfg.cert,
        key=cfg.key,
        username=cfg.username,
        password=password,
    )


def _read_password(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise EtcdError(f"etcd.password_file {path}: {exc.strerror or exc}") from None
    if not password:
        raise EtcdError(f"etcd.password_file {path} is empty")
    return password
