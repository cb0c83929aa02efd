"""MTA-STS (RFC 8461): discovery, strict policy parsing, HTTPS fetch, cache.

Theory of operation.  ``MtaSts.policy_for(domain)`` answers from memory in
the common case.  It looks up the TXT record ``_mta-sts.<domain>`` at most
once per ``TXT_RECHECK`` seconds; when the record's id differs from the
cached policy's, or the cached policy is past half its max_age, it fetches
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (RFC 8461 §3.3).  The
host name is resolved through *our* resolver (the configured DNS, never the
system's) and the TLS handshake sends SNI and checks the certificate for
``mta-sts.<domain>``.  A fetch that fails keeps the cached unexpired policy
(§5.1); with nothing cached the domain is treated as having no policy.
Policies are persisted to a JSON file so a restart keeps enforcing them
(an attacker who blocks the fetch right after a restart gains nothing).

Under gevent (the node is monkey-patched) socket, ssl and http.client are
cooperative, so a fetch never blocks other greenlets.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.resolver

log = logging.getLogger("postroom.outbound.mtasts")

MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: max_age at most one year
POLICY_SIZE_LIMIT = 64 * 1024  # RFC 8461 §3.3: "maximum body size (64 KB)"
FETCH_TIMEOUT = 30.0  # seconds for the whole fetch (§3.3 suggests about a minute)
TXT_RECHECK = 300.0  # seconds between TXT lookups of one domain
FETCH_RETRY = 300.0  # seconds before fetching again after a failed fetch
POLICY_PATH = "/.well-known/mta-sts.txt"
MODES = ("enforce", "testing", "none")

_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")  # RFC 8461 §3.1 sts-id
_EXT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE_RE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_POLICY_LINE_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31})[ \t]*:[ \t]*([\x21-\x7e]+)[ \t]*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MX_RE = re.compile(rf"(\*\.)?{_LABEL}(?:\.{_LABEL})+")  # RFC 8461 §3.2, RFC 5321 Domain


class StsError(Exception):
    """A TXT record or policy that does not parse, or a fetch that failed."""


@dataclass(frozen=True)
class StsPolicy:
    """One domain's policy as fetched (RFC 8461 §3.2)."""

    policy_id: str  # the TXT record's id when it was fetched
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]  # lowercased patterns, "*.example.net" allowed
    max_age: int
    fetched_at: float

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.max_age

    def matches(self, mx_host: str) -> bool:
        """Whether ``mx_host`` is a valid MX for this policy (RFC 8461 §4.1)."""
        return any(mx_matches(pattern, mx_host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact match, or "*." matching exactly one leftmost label."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower()
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


def parse_txt(records: list[str]) -> str:
    """The policy id from the ``_mta-sts`` TXT records (RFC 8461 §3.1).

    Records not starting with ``v=STSv1`` are discarded; exactly one must
    remain and parse, otherwise StsError (the domain then has no policy).
    """
    candidates = [r for r in records if r.split(";", 1)[0].strip() == "v=STSv1"]
    if len(candidates) != 1:
        raise StsError(f"{len(candidates)} v=STSv1 TXT records")
    fields = [f.strip(" \t") for f in candidates[0].split(";")][1:]
    if fields and fields[-1] == "":
        fields.pop()  # an optional trailing ";"
    policy_id = None
    for field in fields:
        name, eq, value = field.partition("=")
        if not eq:
            raise StsError(f"TXT field without '=': {field!r}")
        if name == "id":
            if policy_id is not None:
                raise StsError("TXT record has two ids")
            if not _ID_RE.fullmatch(value):
                raise StsError(f"bad id {value!r}")
            policy_id = value
        elif not (_EXT_NAME_RE.fullmatch(name) and _EXT_VALUE_RE.fullmatch(value)):
            raise StsError(f"bad TXT field {field!r}")
    if policy_id is None:
        raise StsError("TXT record without id")
    return policy_id


def parse_policy(text: str) -> tuple[str, tuple[str, ...], int]:
    """(mode, mx patterns, max_age) from a policy body (RFC 8461 §3.2).

    Lines end in LF or CRLF.  version, mode and max_age must each appear
    exactly once; mx may repeat and is required unless mode is "none".
    Unknown fields are ignored (§3.2); anything malformed raises StsError.
    """
    seen: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line:
            continue
        match = _POLICY_LINE_RE.fullmatch(line)
        if not match:
            raise StsError(f"bad policy line {line[:80]!r}")
        key, value = match.group(1).lower(), match.group(2)
        if key == "mx":
            if not _MX_RE.fullmatch(value):
                raise StsError(f"bad mx pattern {value!r}")
            mx.append(value.lower())
        elif key in ("version", "mode", "max_age"):
            if key in seen:
                raise StsError(f"duplicate {key}")
            seen[key] = value
        # other keys: extensions, ignored
    if seen.get("version", "").lower() != "stsv1":
        raise StsError("version is not STSv1")
    mode = seen.get("mode", "").lower()
    if mode not in MODES:
        raise StsError(f"bad mode {seen.get('mode')!r}")
    max_age_text = seen.get("max_age", "")
    if not re.fullmatch(r"[0-9]{1,10}", max_age_text) or int(max_age_text) > MAX_AGE_LIMIT:
        raise StsError(f"bad max_age {max_age_text!r}")
    if mode != "none" and not mx:
        raise StsError(f"mode {mode} without mx")
    return mode, tuple(mx), int(max_age_text)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a name whose address we resolved ourselves (SNI and Host keep the name)."""

    def __init__(self, host: str, port: int, address: str, context: ssl.SSLContext,
                 timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._ssl_context = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = self._ssl_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class MtaSts:
    """Discovers, fetches, caches and persists MTA-STS policies."""

    def __init__(self, resolver: dns.resolver.Resolver, *, port: int = 443, cafile: str = "",
                 cache_path: Path | None = None, clock: Callable[[], float] = time.time,
                 timeout: float = FETCH_TIMEOUT) -> None:
        self.resolver = resolver
        self.port = port
        self.cafile = cafile
        self.cache_path = cache_path
        self.clock = clock
        self.timeout = timeout
        self._policies: dict[str, StsPolicy] = {}
        self._txt: dict[str, tuple[str | None, float]] = {}  # domain -> (id, next check)
        self._retry_after: dict[str, float] = {}  # domain -> no fetch before
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._load()

    # -- the cache -------------------------------------------------------

    def _load(self) -> None:
        if self.cache_path is None or not self.cache_path.exists():
            return
        try:
            data = json.loads(self.cache_path.read_text())
            for domain, item in data.get("policies", {}).items():
                self._policies[domain] = StsPolicy(
                    str(item["id"]), str(item["mode"]), tuple(item["mx"]),
                    int(item["max_age"]), float(item["fetched_at"]),
                )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self._policies.clear()
            log.warning("mta-sts: ignoring unreadable cache %s: %s", self.cache_path, exc)

    def _save(self) -> None:
        if self.cache_path is None:
            return
        data = {"version": 1, "policies": {
            d: {"id": p.policy_id, "mode": p.mode, "mx": list(p.mx), "max_age": p.max_age,
                "fetched_at": p.fetched_at}
            for d, p in self._policies.items()
        }}
        tmp = self.cache_path.with_name(self.cache_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.cache_path)
        except OSError as exc:  # a cache: keep working from memory
            log.warning("mta-sts: cannot write cache %s: %s", self.cache_path, exc)

    def cached(self, domain: str) -> StsPolicy | None:
        """The cached policy, if any and unexpired (no network)."""
        policy = self._policies.get(_norm(domain))
        if policy is not None and policy.expires_at > self.clock():
            return policy
        return None

    # -- lookups ----------------------------------------------------------

    def policy_for(self, domain: str) -> StsPolicy | None:
        """The policy that applies to mail for ``domain`` now (RFC 8461 §5.1), or None."""
        domain = _norm(domain)
        with self._lock(domain):
            now = self.clock()
            cached = self._policies.get(domain)
            if cached is not None and cached.expires_at <= now:
                del self._policies[domain]
                self._save()
                cached = None
            txt = self._txt.get(domain)
            if txt is None or txt[1] <= now:
                txt = (self._lookup_txt(domain), now + TXT_RECHECK)
                self._txt[domain] = txt
            policy_id = txt[0]
            if policy_id is None:
                return cached  # no live record: an unexpired cached policy still applies (§5.1)
            if cached is not None and cached.policy_id == policy_id and \
                    now < cached.fetched_at + cached.max_age / 2:
                return cached
            if now < self._retry_after.get(domain, 0.0):
                return cached
            try:
                mode, mx, max_age = parse_policy(self.fetch(domain))
            except StsError as exc:
                self._retry_after[domain] = now + FETCH_RETRY
                if cached is not None:
                    log.warning("mta-sts %s: policy fetch failed (%s); keeping the cached policy "
                                "(mode %s) until it expires", domain, exc, cached.mode)
                else:
                    log.warning("mta-sts %s: TXT record present but policy fetch failed (%s); "
                                "treating as no policy", domain, exc)
                return cached
            policy = StsPolicy(policy_id, mode, mx, max_age, now)
            self._policies[domain] = policy
            self._retry_after.pop(domain, None)
            self._save()
            log.info("mta-sts %s: policy id %s mode %s mx %s max_age %d", domain, policy_id,
                     mode, ",".join(mx), max_age)
            return policy

    def _lock(self, domain: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(domain, threading.Lock())

    def _lookup_txt(self, domain: str) -> str | None:
        """The id of ``_mta-sts.<domain>``, or None (no usable record, or DNS failure)."""
        try:
            answer = self.resolver.resolve(f"_mta-sts.{domain}.", "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as exc:
            log.info("mta-sts %s: TXT lookup failed: %s", domain, exc)
            return None
        records = [b"".join(r.strings).decode("ascii", "replace") for r in answer]
        try:
            return parse_txt(records)
        except StsError as exc:
            log.info("mta-sts %s: unusable TXT record: %s", domain, exc)
            return None

    def _addresses(self, host: str) -> list[str]:
        addresses: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                addresses += [r.address for r in self.resolver.resolve(host + ".", rdtype)]
            except dns.exception.DNSException:
                continue
        return addresses

    def _ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            ctx = ssl.create_default_context(cafile=self.cafile or None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._context = ctx
        return self._context

    def fetch(self, domain: str) -> str:
        """GET the policy over HTTPS (RFC 8461 §3.3); StsError on any failure.

        200 only (no redirects, no caching), media type text/plain, body at
        most POLICY_SIZE_LIMIT octets, the whole exchange within ``timeout``.
        """
        host = f"mta-sts.{_norm(domain)}"
        addresses = self._addresses(host)
        if not addresses:
            raise StsError(f"{host} has no address")
        deadline = time.monotonic() + self.timeout
        errors = []
        for address in addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            conn = _PinnedHTTPSConnection(host, self.port, address, self._ssl_context(), remaining)
            try:
                return self._get(conn, deadline)
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{address}: {exc}")
            finally:
                conn.close()
        raise StsError("; ".join(errors) or "timed out")

    def _get(self, conn: _PinnedHTTPSConnection, deadline: float) -> str:
        conn.request("GET", POLICY_PATH, headers={"Accept": "text/plain", "Connection": "close"})
        response = conn.getresponse()
        if response.status != 200:
            raise StsError(f"HTTP status {response.status}")  # 3xx too: no redirects (§3.3)
        media = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if media != "text/plain":
            raise StsError(f"media type {media or 'missing'!r}, not text/plain")
        body = b""
        while len(body) <= POLICY_SIZE_LIMIT:
            if time.monotonic() > deadline:
                raise StsError("fetch timed out")
            chunk = response.read1(8192)
            if not chunk:
                break
            body += chunk
        if len(body) > POLICY_SIZE_LIMIT:
            raise StsError(f"policy larger than {POLICY_SIZE_LIMIT} octets")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StsError("policy is not UTF-8") from exc


def _norm(domain: str) -> str:
    return domain.lower().rstrip(".")
