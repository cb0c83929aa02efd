"""Domains, accounts and aliases, kept in etcd and cached on every node.

Keys (relative to the etcd prefix), values JSON:

* ``/domains/<domain>``   ``{"created": ts}``
* ``/accounts/<address>`` ``{"password": "<argon2id PHC string>", "created": ts,
  "scram-sha-256": {"salt", "iterations", "stored_key", "server_key"}}`` (base64;
  absent for accounts whose password was set before SCRAM existed)
* ``/aliases/<source>``   ``{"targets": [address, ...], "created": ts}``;
  source is an address or ``@<domain>`` (catch-all).
* ``/dkim/<domain>/<selector>`` ``{"algorithm": "rsa-sha256"|"ed25519-sha256",
  "private_key": PKCS8 PEM, "public_key": base64 for the TXT p=, "created": ts,
  "active": bool}`` (docs/dkim.md).

Addresses are stored canonical: local part lower-cased, domain lower-cased
in its IDNA ASCII form (RFC 5321 §2.4 lets a server treat local parts
case-insensitively; we always do).

``start()`` loads the three prefixes and watches them, so a change made by
the CLI (or another node) applies to a running node within milliseconds.
Reads (resolve_recipient, authenticate, ...) use the cache only; admin
methods read and write etcd directly (they are what the CLI calls).

Recipient resolution (RFC 5321 §3.6 aliases, §4.5.1 postmaster)
---------------------------------------------------------------
1. an alias with exactly this address, else 2. an account, else 3. the
catch-all alias ``@domain``.  Alias targets are expanded the same way,
recursively, at most MAX_ALIAS_DEPTH deep, each address visited once (so a
cycle ends); targets outside our domains are logged and dropped for now
(outbound forwarding comes later).
``postmaster@<local domain>`` never resolves to None: if the steps above give
nobody, it goes to the account ``postmaster@<first local domain, sorted>``
if it exists, else to the oldest account of the recipient's domain, else to
the oldest account anywhere.  Only with no account at all is the answer an
empty list (nowhere to deliver: callers answer with a temporary failure).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any

from cluster.etcd import (
    EtcdSession,
    Put,
    Watch,
    WatchEvent,
    key_absent,
    key_exists,
)
from node.auth.passwords import dummy_hash, hash_password, run_off_hub, verify_password
from node.auth.sasl import ScramCredentials, derive_scram, scram_from_record, scram_to_record

log = logging.getLogger(__name__)

DOMAINS = "/domains/"
ACCOUNTS = "/accounts/"
ALIASES = "/aliases/"
DKIM = "/dkim/"
DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")  # RFC 8301, RFC 8463

MAX_ALIAS_DEPTH = 8
MAX_ALIAS_TARGETS = 100  # per alias record
MAX_EXPANSION = 1000  # accounts one address may expand to
MAX_LOCAL_PART = 64  # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # octets, RFC 5321 §4.5.3.1.2
MAX_PASSWORD = 4096  # characters; longer ones are refused without hashing them

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# RFC 5322 dot-atom local part, plus UTF-8 (RFC 6531); no quoted strings.
_LOCAL = re.compile(r"^[^\s@\"(),:;<>\[\\\]]+$")


class DirectoryError(Exception):
    """An admin request that cannot be done; the message is one line for users."""


@functools.lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str:
    """Lower-case IDNA ASCII form; raises DirectoryError when not a domain name.

    Cached: a pure function that every delivery calls several times, and
    Python's IDNA codec costs ~10 us a call (failures are not cached)."""
    text = domain.strip().rstrip(".").lower()
    try:
        ascii_form = text.encode("idna").decode("ascii") if text else ""
    except UnicodeError:
        raise DirectoryError(f"not a valid domain name: {domain!r}") from None
    labels = ascii_form.split(".")
    if (
        not ascii_form
        or len(ascii_form) > MAX_DOMAIN
        or len(labels) < 2
        or not all(_LABEL.match(label) for label in labels)
    ):
        raise DirectoryError(f"not a valid domain name: {domain!r}")
    return ascii_form


def normalize_address(address: str) -> str:
    """local@domain, canonical; raises DirectoryError when not an address."""
    local, sep, domain = address.strip().rpartition("@")
    if not sep or not local:
        raise DirectoryError(f"not a valid address: {address!r}")
    local = local.lower()
    if (
        len(local.encode("utf-8")) > MAX_LOCAL_PART
        or not _LOCAL.match(local)
        or local.startswith(".")
        or local.endswith(".")
        or ".." in local
    ):
        raise DirectoryError(f"not a valid address: {address!r}")
    try:
        return f"{local}@{normalize_domain(domain)}"
    except DirectoryError:
        raise DirectoryError(f"not a valid address: {address!r}") from None


def normalize_alias_source(source: str) -> str:
    """An address, or @domain for a catch-all."""
    text = source.strip()
    if text.startswith("@"):
        return "@" + normalize_domain(text[1:])
    return normalize_address(text)


def normalize_selector(selector: str) -> str:
    """A DKIM selector: dot-separated DNS labels (RFC 6376 §3.1), lower-cased."""
    text = selector.strip().lower()
    labels = text.split(".")
    if not text or len(text) > 63 or not all(_LABEL.match(label) for label in labels):
        raise DirectoryError(f"not a valid DKIM selector: {selector!r}")
    return text


SCRAM_FIELD = "scram-sha-256"  # account record field: salt, iterations, keys (base64)


def _scram_record(account: str, password: str) -> dict[str, object]:
    """PBKDF2 for SCRAM runs off the hub like the argon2 hash."""
    try:
        return scram_to_record(run_off_hub(derive_scram, account, password))
    except ValueError:
        raise DirectoryError("password contains characters SASLprep prohibits") from None


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def _now() -> float:
    return round(time.time(), 3)


class EtcdDirectory:
    """The Directory (node/context.py) backed by etcd; see the module docstring."""

    def __init__(self, session: EtcdSession) -> None:
        self.session = session
        self._domains: dict[str, dict] = {}
        self._accounts: dict[str, dict] = {}
        self._aliases: dict[str, dict] = {}
        self._dkim: dict[str, dict] = {}  # "<domain>/<selector>" -> record
        self._watches: list[Watch] = []

    # -- cache -------------------------------------------------------------

    def _table(self, prefix: str) -> dict[str, dict]:
        return {
            DOMAINS: self._domains,
            ACCOUNTS: self._accounts,
            ALIASES: self._aliases,
            DKIM: self._dkim,
        }[prefix]

    def _load(self, prefix: str) -> int:
        """Replace the cached table from etcd; returns the revision to watch from."""
        kvs, revision = self.session.get_prefix(prefix)
        table = {kv.key[len(prefix) :]: kv.value for kv in kvs if isinstance(kv.value, dict)}
        self._table(prefix).clear()
        self._table(prefix).update(table)
        return revision + 1

    def start(self, watch: bool = True) -> None:
        """Load domains, accounts, aliases and DKIM keys; with watch, follow every change."""
        dummy_hash()  # computed now, so the first unknown-user login is not faster
        for prefix in (DOMAINS, ACCOUNTS, ALIASES, DKIM):
            start_revision = self._load(prefix)
            if watch:
                self._watches.append(
                    self.session.watch_prefix(
                        prefix,
                        self._on_event,
                        start_revision,
                        on_reset=lambda p=prefix: self._load(p),
                    )
                )

    def stop(self) -> None:
        for w in self._watches:
            w.cancel()
        self._watches.clear()

    def _on_event(self, event: WatchEvent) -> None:
        for prefix in (DOMAINS, ACCOUNTS, ALIASES, DKIM):
            if event.key.startswith(prefix):
                name = event.key[len(prefix) :]
                table = self._table(prefix)
                if event.type == "delete":
                    table.pop(name, None)
                elif isinstance(event.value, dict):
                    table[name] = event.value
                log.debug("directory: %s %s%s", event.type, prefix, name)
                return

    # -- Directory protocol (cache reads) ------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        try:
            return normalize_domain(domain) in self._domains
        except DirectoryError:
            return False

    def account_exists(self, account: str) -> bool:
        try:
            return normalize_address(account) in self._accounts
        except DirectoryError:
            return False

    def quota(self, account: str) -> int | None:
        """The account's storage quota in octets (RFC 9208 STORAGE), None for
        no limit: the record's ``quota_bytes``, 0 or absent meaning unlimited."""
        try:
            record = self._accounts.get(normalize_address(account))
        except DirectoryError:
            return None
        limit = record.get("quota_bytes", 0) if isinstance(record, dict) else 0
        return int(limit) if isinstance(limit, int) and limit > 0 else None

    def resolve_recipient(self, address: str) -> list[str] | None:
        """Accounts address delivers to; None when unknown (550 5.1.1)."""
        try:
            canonical = normalize_address(address)
        except DirectoryError:
            return None
        domain = _domain_of(canonical)
        if domain not in self._domains:
            return None
        found: list[str] = []
        self._expand(canonical, 0, set(), found)
        if found:
            return found
        if canonical.partition("@")[0] == "postmaster":  # RFC 5321 §4.5.1
            return self._postmaster_fallback(domain)
        return None

    def _expand(self, address: str, depth: int, seen: set[str], out: list[str]) -> None:
        if address in seen or len(out) >= MAX_EXPANSION:
            return
        seen.add(address)
        domain = _domain_of(address)
        if domain not in self._domains:
            log.info("directory: alias target %s is not local; dropped for now", address)
            return
        alias = self._aliases.get(address)
        if alias is None and address not in self._accounts:
            alias = self._aliases.get("@" + domain)
        if alias is not None:
            if depth >= MAX_ALIAS_DEPTH:
                log.warning("directory: alias expansion of %s too deep; stopped", address)
                return
            for target in alias.get("targets", []):
                if isinstance(target, str):
                    self._expand(target, depth + 1, seen, out)
            return
        if address in self._accounts and address not in out:
            out.append(address)

    def _postmaster_fallback(self, domain: str) -> list[str]:
        if self._domains:
            first = f"postmaster@{sorted(self._domains)[0]}"
            if first in self._accounts:
                return [first]
        for candidates in (
            [a for a in self._accounts if _domain_of(a) == domain],
            list(self._accounts),
        ):
            if candidates:
                oldest = min(
                    candidates, key=lambda a: (float(self._accounts[a].get("created", 0)), a)
                )
                return [oldest]
        log.error("directory: postmaster@%s has nowhere to go: no accounts exist", domain)
        return []

    def authenticate(self, username: str, password: str) -> str | None:
        """The canonical account, or None.  Unknown users cost one argon2 verify
        against a dummy hash, so timing does not reveal who exists."""
        try:
            account: str | None = normalize_address(username)
        except DirectoryError:
            account = None
        record = self._accounts.get(account) if account else None
        encoded = record.get("password") if record else None
        if not isinstance(encoded, str) or len(password) > MAX_PASSWORD:
            verify_password(dummy_hash(), password[:MAX_PASSWORD])
            return None
        return account if verify_password(encoded, password) else None

    def scram_credentials(self, username: str) -> ScramCredentials | None:
        """SCRAM-SHA-256 keys of the account (RFC 5802 §3); None when unknown or
        when the account predates SCRAM (its password was set before)."""
        try:
            account = normalize_address(username)
        except DirectoryError:
            return None
        record = self._accounts.get(account)
        return scram_from_record(account, record.get(SCRAM_FIELD)) if record else None

    def sender_allowed(self, account: str, address: str) -> bool:
        """May ``account`` use ``address`` as its sender (RFC 6409 §6.1)?

        Yes for the account itself and for an alias whose expansion includes
        it; a catch-all (``@domain``) does not count, or every user of a
        catch-all would own every address of the domain.
        """
        try:
            account = normalize_address(account)
            address = normalize_address(address)
        except DirectoryError:
            return False
        if address == account:
            return account in self._accounts
        if address not in self._aliases:
            return False
        found: list[str] = []
        self._expand(address, 0, set(), found)
        return account in found

    # -- admin (etcd reads and writes; used by the CLI) -----------------------

    def _get_table(self, prefix: str) -> dict[str, Any]:
        kvs, _ = self.session.get_prefix(prefix)
        return {kv.key[len(prefix) :]: kv.value for kv in kvs}

    def list_domains(self) -> list[str]:
        return sorted(self._get_table(DOMAINS))

    def add_domain(self, domain: str) -> str:
        name = normalize_domain(domain)
        if not self.session.create_if_absent(DOMAINS + name, {"created": _now()}):
            raise DirectoryError(f"domain already exists: {name}")
        return name

    def remove_domain(self, domain: str) -> str:
        """Refused while any account or alias of the domain exists."""
        name = normalize_domain(domain)
        kv = self.session.get(DOMAINS + name)
        if kv is None:
            raise DirectoryError(f"unknown domain: {name}")
        users = self.list_users(name)
        aliases = [s for s in self.list_aliases() if _domain_of(s) == name]
        if users or aliases:
            raise DirectoryError(
                f"domain {name} still has {len(users)} account(s) and "
                f"{len(aliases)} alias(es); remove them first"
            )
        if not self.session.delete_if(DOMAINS + name, kv.mod_revision):
            raise DirectoryError(f"domain {name} changed concurrently; try again")
        return name

    def add_user(self, address: str, password: str) -> str:
        account = normalize_address(address)
        self._check_password(password)
        domain = _domain_of(account)
        record = {"password": hash_password(password), "created": _now()}
        record[SCRAM_FIELD] = _scram_record(account, password)
        ok = self.session.txn(
            [
                key_exists(DOMAINS + domain),
                key_absent(ACCOUNTS + account),
                key_absent(ALIASES + account),
            ],
            [Put(ACCOUNTS + account, record)],
        )
        if not ok:
            if self.session.get(DOMAINS + domain) is None:
                raise DirectoryError(f"unknown domain: {domain} (add it with: domain add)")
            if self.session.get(ALIASES + account) is not None:
                raise DirectoryError(f"an alias with this address exists: {account}")
            raise DirectoryError(f"account already exists: {account}")
        return account

    def set_password(self, address: str, password: str) -> str:
        account = normalize_address(address)
        self._check_password(password)
        kv = self.session.get(ACCOUNTS + account)
        if kv is None:
            raise DirectoryError(f"unknown account: {account}")
        record = dict(kv.value) if isinstance(kv.value, dict) else {}
        record["password"] = hash_password(password)
        record[SCRAM_FIELD] = _scram_record(account, password)
        if not self.session.compare_and_swap(ACCOUNTS + account, kv.mod_revision, record):
            raise DirectoryError(f"account {account} changed concurrently; try again")
        return account

    def set_quota(self, address: str, quota_bytes: int) -> str:
        """Set the account's ``quota_bytes`` (0 = unlimited), compare-and-swap."""
        account = normalize_address(address)
        if not isinstance(quota_bytes, int) or quota_bytes < 0:
            raise DirectoryError("quota must be a non-negative number of octets")
        kv = self.session.get(ACCOUNTS + account)
        if kv is None:
            raise DirectoryError(f"unknown account: {account}")
        record = dict(kv.value) if isinstance(kv.value, dict) else {}
        record["quota_bytes"] = quota_bytes
        if not self.session.compare_and_swap(ACCOUNTS + account, kv.mod_revision, record):
            raise DirectoryError(f"account {account} changed concurrently; try again")
        return account

    def get_quota(self, address: str) -> int:
        """The stored ``quota_bytes`` read from etcd (0 = unlimited)."""
        account = normalize_address(address)
        kv = self.session.get(ACCOUNTS + account)
        if kv is None:
            raise DirectoryError(f"unknown account: {account}")
        value = kv.value.get("quota_bytes", 0) if isinstance(kv.value, dict) else 0
        return value if isinstance(value, int) else 0

    def remove_user(self, address: str) -> str:
        account = normalize_address(address)
        if not self.session.delete(ACCOUNTS + account):
            raise DirectoryError(f"unknown account: {account}")
        return account

    def list_users(self, domain: str | None = None) -> list[str]:
        names = sorted(self._get_table(ACCOUNTS))
        if domain is None:
            return names
        wanted = normalize_domain(domain)
        return [a for a in names if _domain_of(a) == wanted]

    def add_alias(self, source: str, targets: list[str]) -> str:
        name = normalize_alias_source(source)
        if not targets:
            raise DirectoryError("an alias needs at least one target")
        if len(targets) > MAX_ALIAS_TARGETS:
            raise DirectoryError(f"too many targets (at most {MAX_ALIAS_TARGETS})")
        canonical: list[str] = []
        for t in targets:
            address = normalize_address(t)
            if address not in canonical:
                canonical.append(address)
        if name in canonical:
            raise DirectoryError(f"alias {name} cannot target itself")
        domain = _domain_of(name)
        ok = self.session.txn(
            [key_exists(DOMAINS + domain), key_absent(ALIASES + name), key_absent(ACCOUNTS + name)],
            [Put(ALIASES + name, {"targets": canonical, "created": _now()})],
        )
        if not ok:
            if self.session.get(DOMAINS + domain) is None:
                raise DirectoryError(f"unknown domain: {domain} (aliases need a local domain)")
            if self.session.get(ACCOUNTS + name) is not None:
                raise DirectoryError(f"an account with this address exists: {name}")
            raise DirectoryError(f"alias already exists: {name} (remove it first)")
        return name

    def remove_alias(self, source: str) -> str:
        name = normalize_alias_source(source)
        if not self.session.delete(ALIASES + name):
            raise DirectoryError(f"unknown alias: {name}")
        return name

    def list_aliases(self) -> dict[str, list[str]]:
        return {
            name: list(value.get("targets", [])) if isinstance(value, dict) else []
            for name, value in sorted(self._get_table(ALIASES).items())
        }

    # -- DKIM keys (RFC 6376 §3.6; docs/dkim.md) --------------------------------

    def dkim_keys(self, domain: str) -> list[dict]:
        """Active keys of a local domain from the cache, each record with its
        ``domain`` and ``selector`` added; RSA first, then by selector."""
        try:
            name = normalize_domain(domain)
        except DirectoryError:
            return []
        if name not in self._domains:
            return []
        keys = [
            {**record, "domain": name, "selector": key.partition("/")[2]}
            for key, record in self._dkim.items()
            if key.partition("/")[0] == name and record.get("active") is True
        ]
        return sorted(keys, key=lambda r: (r.get("algorithm") != "rsa-sha256", r["selector"]))

    def add_dkim_key(self, domain: str, selector: str, record: dict) -> tuple[str, str]:
        """Store a new key; the domain must be local and the selector unused."""
        name = normalize_domain(domain)
        sel = normalize_selector(selector)
        if record.get("algorithm") not in DKIM_ALGORITHMS:
            raise DirectoryError(f"unknown DKIM algorithm: {record.get('algorithm')!r}")
        if not isinstance(record.get("private_key"), str) or not isinstance(
            record.get("public_key"), str
        ):
            raise DirectoryError("a DKIM key record needs private_key and public_key")
        value = {
            "algorithm": record["algorithm"],
            "private_key": record["private_key"],
            "public_key": record["public_key"],
            "created": record.get("created", _now()),
            "active": bool(record.get("active", True)),
        }
        key = f"{DKIM}{name}/{sel}"
        if not self.session.txn([key_exists(DOMAINS + name), key_absent(key)], [Put(key, value)]):
            if self.session.get(DOMAINS + name) is None:
                raise DirectoryError(f"unknown domain: {name} (DKIM keys need a local domain)")
            raise DirectoryError(f"DKIM selector {sel} already exists for {name}")
        return name, sel

    def list_dkim_keys(self, domain: str | None = None) -> list[dict]:
        """Every key (active or not) from etcd, with domain and selector, sorted."""
        wanted = normalize_domain(domain) if domain is not None else None
        out = []
        for key, record in sorted(self._get_table(DKIM).items()):
            name, _, sel = key.partition("/")
            if isinstance(record, dict) and (wanted is None or name == wanted):
                out.append({**record, "domain": name, "selector": sel})
        return out

    def set_dkim_active(self, domain: str, selector: str, active: bool) -> tuple[str, str]:
        name, sel = normalize_domain(domain), normalize_selector(selector)
        key = f"{DKIM}{name}/{sel}"
        kv = self.session.get(key)
        if kv is None or not isinstance(kv.value, dict):
            raise DirectoryError(f"unknown DKIM selector {sel} for {name}")
        record = {**kv.value, "active": bool(active)}
        if not self.session.compare_and_swap(key, kv.mod_revision, record):
            raise DirectoryError(f"DKIM key {sel} of {name} changed concurrently; try again")
        return name, sel

    def remove_dkim_key(self, domain: str, selector: str) -> tuple[str, str]:
        name, sel = normalize_domain(domain), normalize_selector(selector)
        if not self.session.delete(f"{DKIM}{name}/{sel}"):
            raise DirectoryError(f"unknown DKIM selector {sel} for {name}")
        return name, sel

    @staticmethod
    def _check_password(password: str) -> None:
        if not password:
            raise DirectoryError("empty password")
        if len(password) > MAX_PASSWORD:
            raise DirectoryError(f"password too long (at most {MAX_PASSWORD} characters)")
        if any(c in password for c in "\r\n\0"):
            raise DirectoryError("password contains a line break or NUL")
