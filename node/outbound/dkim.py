"""DKIM signing of outgoing mail (RFC 6376), RSA-SHA256 and Ed25519-SHA256.

Theory of operation
-------------------
Keys live in etcd (``/dkim/<domain>/<selector>``, cluster/directory.py) and
reach every node through the directory's watched cache, so ``postroom dkim
activate|deactivate`` applies at once.  ``Signer.sign(raw, domain)`` prepends
one DKIM-Signature per *active* key of the domain: RSA first (every verifier
knows it), then Ed25519 (RFC 8463 §3: a signer SHOULD add an RSA signature
beside Ed25519, because not all verifiers have it).  Each signature covers
the message as given, so neither covers the other.

* Canonicalization relaxed/relaxed (RFC 6376 §3.4.2, §3.4.4): survives the
  header refolding and trailing-whitespace changes relays do.
* Signed header fields: those of ``[dkim] headers`` present in the message,
  each as many times as it occurs (§5.4.2), and ``From`` always, once more
  than it occurs: signing a non-existent instance ("oversigning", §8.15)
  makes a From added later break the signature.
* ``t=`` is the signing time; no ``x=``, no ``l=`` (§8.2: a body length
  invites appended content).

dkimpy does the canonicalization and header hashing in every path.  Its RSA
is pure Python (~11 ms per RSA-2048 signature, all of it holding the hub);
with ``[dkim] fast_rsa`` the RSA step alone goes to ``cryptography``
(OpenSSL), over the same hashed data, giving byte-identical output at a
fraction of the cost (docs/dkim.md has the figures).  Because that path uses
dkimpy internals, each key is checked once against dkimpy's own signer; on
any difference the Signer falls back to dkimpy for that key and says so in
the log.  Ed25519 is signed by dkimpy (PyNaCl, ~1 ms).

Keys are generated here with ``cryptography`` (``generate_key``): RSA 2048
with e=65537, stored as PKCS#8 PEM, published as the base64 DER
SubjectPublicKeyInfo (RFC 6376 §3.6.1); Ed25519 stored as PKCS#8 PEM,
published as the base64 raw 32-octet public key (RFC 8463 §4.2).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from node.config import DkimSettings

if TYPE_CHECKING:
    import dkim
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

log = logging.getLogger(__name__)

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
ALGORITHMS = (RSA, ED25519)
RSA_BITS = 2048  # RFC 8301 §3.2: at least 1024, SHOULD be 2048
RSA_EXPONENT = 65537
CANONICALIZATION = (b"relaxed", b"relaxed")
MAX_TXT_STRING = 255  # octets per character-string (RFC 1035 §3.3.14)
_HEADER_NAME = b"DKIM-Signature"
_LINESEP = b"\r\n"


def _lib(*wanted: str) -> Any:
    """dkimpy and cryptography, imported on first use: a node that signs
    nothing does not carry them (~8 MB of RSS, docs/benchmarks.md)."""
    import dkim
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    from dkim.canonicalization import CanonicalizationPolicy

    found = {
        "dkim": dkim, "hashes": hashes, "serialization": serialization, "ed25519": ed25519,
        "padding": padding, "rsa": rsa, "Prehashed": Prehashed,
        "CanonicalizationPolicy": CanonicalizationPolicy,
    }
    values = tuple(found[n] for n in wanted)
    return values if len(values) > 1 else values[0]


@functools.cache
def _never_sign() -> frozenset[str]:
    """RFC 6376 §5.4.1 recommends against signing these (dkimpy refuses them too)."""
    return frozenset(h.decode() for h in _lib("dkim").DKIM.SHOULD_NOT)


class KeySource(Protocol):
    """What the Signer needs from the directory (cluster/directory.py)."""

    def dkim_keys(self, domain: str) -> list[dict]: ...


class DkimError(Exception):
    """A key that cannot be made, loaded or used; one line for operators."""


# -- keys and DNS records ---------------------------------------------------


def generate_key(algorithm: str, active: bool = True) -> dict[str, Any]:
    """A new key record for ``/dkim/<domain>/<selector>`` (see module docstring)."""
    rsa, ed25519, serialization = _lib("rsa", "ed25519", "serialization")
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == RSA:
        private = rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_BITS)
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif algorithm == ED25519:
        private = ed25519.Ed25519PrivateKey.generate()
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    else:
        raise DkimError(f"unknown DKIM algorithm: {algorithm!r} (use {' or '.join(ALGORITHMS)})")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "algorithm": algorithm,
        "private_key": pem.decode("ascii"),
        "public_key": base64.b64encode(public).decode("ascii"),
        "created": round(time.time(), 3),
        "active": active,
    }


def txt_value(record: dict) -> str:
    """The key record's TXT data: ``v=DKIM1; k=rsa|ed25519; p=...`` (RFC 6376 §3.6.1)."""
    k = "ed25519" if record.get("algorithm") == ED25519 else "rsa"
    return f"v=DKIM1; k={k}; p={record['public_key']}"


def split_txt(value: str) -> list[str]:
    """Character-strings of at most 255 octets; a verifier concatenates them
    (RFC 6376 §3.6.2.2)."""
    data = value.encode("ascii")
    return [
        data[i : i + MAX_TXT_STRING].decode("ascii") for i in range(0, len(data), MAX_TXT_STRING)
    ] or [""]


def zone_line(domain: str, selector: str, record: dict) -> str:
    """``S._domainkey.DOMAIN. IN TXT "..." "..."``, ready for a zone file."""
    strings = " ".join(f'"{s}"' for s in split_txt(txt_value(record)))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


# -- signing ------------------------------------------------------------------


def sign_headers_list(headers: list[tuple[bytes, bytes]], wanted: list[str]) -> list[bytes]:
    """The h= list: configured fields present in the message, each once per
    occurrence (RFC 6376 §5.4.2), From always and once more (oversigned)."""
    counts: dict[str, int] = {}
    for name, _ in headers:
        key = name.decode("ascii", "replace").strip().lower()
        counts[key] = counts.get(key, 0) + 1
    order = ["from"] + [h.strip().lower() for h in wanted]
    out: list[bytes] = []
    seen: set[str] = set()
    for name in order:
        if not name or name in seen or name in _never_sign():
            continue
        seen.add(name)
        times = counts.get(name, 0) + (1 if name == "from" else 0)
        out.extend([name.encode("ascii")] * times)
    return out


@dataclass(frozen=True)
class _LoadedKey:
    domain: bytes
    selector: bytes
    algorithm: str
    # Secrets stay out of repr (and so out of logs and tracebacks).
    pem: bytes = field(repr=False)  # PKCS#8; what dkimpy's RSA signer parses
    crypto: Any = field(repr=False)  # cryptography private key
    ed_seed: bytes = field(repr=False)  # base64 raw Ed25519 seed (PyNaCl form); b"" for RSA


def load_key(domain: str, selector: str, record: dict) -> _LoadedKey:
    """Parse a stored record; raises DkimError when it is unusable."""
    serialization, rsa, ed25519 = _lib("serialization", "rsa", "ed25519")
    algorithm = record.get("algorithm")
    pem = str(record.get("private_key", "")).encode("ascii", "replace")
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise DkimError(f"DKIM key {selector} of {domain}: unreadable private key") from exc
    if algorithm == RSA and isinstance(private, rsa.RSAPrivateKey):
        seed = b""
    elif algorithm == ED25519 and isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        seed = base64.b64encode(raw)
    else:
        raise DkimError(f"DKIM key {selector} of {domain}: algorithm does not match the key")
    return _LoadedKey(
        domain.encode("ascii"), selector.encode("ascii"), algorithm, pem, private, seed
    )


def dkimpy_signature(message: dkim.DKIM, key: _LoadedKey, include: list[bytes]) -> bytes:
    """One ``DKIM-Signature: ...\\r\\n`` line made entirely by dkimpy."""
    if key.algorithm == ED25519:
        privkey, algorithm = key.ed_seed, b"ed25519-sha256"
    else:
        privkey, algorithm = key.pem, b"rsa-sha256"
    return message.sign(
        key.selector,
        key.domain,
        privkey,
        signature_algorithm=algorithm,
        canonicalize=CANONICALIZATION,
        include_headers=include,
    )


def fast_rsa_signature(
    headers: list[tuple[bytes, bytes]], body: bytes, key: _LoadedKey, include: list[bytes]
) -> bytes:
    """The same bytes as ``dkimpy_signature`` for an RSA key, with the RSA step
    done by cryptography: this mirrors dkimpy's ``DKIM.sign``/``gen_header``
    (same tag order, same folding, its canonicalization and header hashing)."""
    CanonicalizationPolicy, dkim, Prehashed, padding, hashes = _lib("CanonicalizationPolicy", "dkim", "Prehashed", "padding", "hashes")
    policy = CanonicalizationPolicy.from_c_value(b"/".join(CANONICALIZATION))
    bodyhash = base64.b64encode(hashlib.sha256(policy.canonicalize_body(body)).digest())
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", policy.to_c_value()),
        (b"d", key.domain),
        (b"i", b"@" + key.domain),
        (b"q", b"dns/txt"),
        (b"s", key.selector),
        (b"t", str(int(time.time())).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", bodyhash),
        (b"b", b"0" * 60),  # placeholder so b= folds onto its own line, as dkimpy does
    ]
    value = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_HEADER_NAME))
    value = dkim.RE_BTAG.sub(b"\\1", value)
    hasher = hashlib.sha256()
    dkim.hash_headers(
        hasher,
        policy,
        policy.canonicalize_headers(headers),
        tuple(include),
        (_HEADER_NAME, b" " + value),
        dict(fields),
    )
    signature = key.crypto.sign(hasher.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    fields[-1] = (b"b", base64.b64encode(signature))
    value = b"; ".join(b"=".join(f) for f in fields) + _LINESEP
    return _HEADER_NAME + b": " + dkim.fold(value, namelen=len(_HEADER_NAME), linesep=_LINESEP)


class Signer:
    """``sign(raw, domain) -> bytes`` with the domain's active keys; see the
    module docstring.  Safe to call from the hub: fast RSA ~2 ms and Ed25519
    ~1 ms per signature (pure-Python RSA, with fast_rsa off, ~11 ms)."""

    def __init__(self, directory: KeySource, settings: DkimSettings) -> None:
        self.directory = directory
        self.settings = settings
        self._keys: dict[tuple[str, str, str], _LoadedKey | None] = {}
        self._fast_ok: dict[tuple[str, str, str], bool] = {}

    def sign(self, raw: bytes, domain: str) -> bytes:
        """raw with one DKIM-Signature per active key prepended; raw unchanged
        when signing is off or the domain has no usable active key.  A key that
        fails is logged and skipped: mail is never held back for a signature."""
        if not self.settings.sign:
            return raw
        records = self.directory.dkim_keys(domain)
        if not records:
            return raw
        dkim = _lib("dkim")  # imports: only when there is something to sign
        message = dkim.DKIM(raw, linesep=_LINESEP)
        include = sign_headers_list(message.headers, list(self.settings.headers))
        lines: list[bytes] = []
        for record in records:
            key = self._key(record)
            if key is None:
                continue
            try:
                lines.append(self._signature(message, key, include))
            except (dkim.DKIMException, ValueError, TypeError) as exc:
                log.error(
                    "dkim: signing with %s/%s failed: %s",
                    record.get("domain"),
                    record.get("selector"),
                    type(exc).__name__,
                )
        if lines:
            log.debug(
                "dkim: signed for %s with %s",
                domain,
                ", ".join(f"{r['selector']}({r.get('algorithm')})" for r in records),
            )
        return b"".join(lines) + raw

    def _key(self, record: dict) -> _LoadedKey | None:
        cache_key = (
            str(record.get("domain")),
            str(record.get("selector")),
            _fingerprint(str(record.get("private_key"))),
        )
        if cache_key not in self._keys:
            try:
                self._keys[cache_key] = load_key(cache_key[0], cache_key[1], record)
            except (DkimError, UnicodeError) as exc:
                log.error("dkim: %s", exc)
                self._keys[cache_key] = None
        return self._keys[cache_key]

    def _signature(self, message: dkim.DKIM, key: _LoadedKey, include: list[bytes]) -> bytes:
        if key.algorithm == RSA and self.settings.fast_rsa and self._fast_agrees(key):
            return fast_rsa_signature(message.headers, message.body, key, include)
        return dkimpy_signature(message, key, include)

    def _fast_agrees(self, key: _LoadedKey) -> bool:
        """Once per key: does the fast path give dkimpy's exact bytes?  (It relies
        on dkimpy internals; a dkimpy upgrade could change them.)"""
        dkim = _lib("dkim")
        cache_key = (key.domain.decode(), key.selector.decode(), _fingerprint(key.pem.decode()))
        if cache_key not in self._fast_ok:
            probe = dkim.DKIM(_PROBE, linesep=_LINESEP)
            include = sign_headers_list(probe.headers, list(self.settings.headers))
            for _ in range(3):  # a second boundary between the two makes t= differ
                slow = dkimpy_signature(probe, key, include)
                fast = fast_rsa_signature(probe.headers, probe.body, key, include)
                if _t_tag(slow) == _t_tag(fast):
                    break
            agrees = slow == fast
            if not agrees:
                log.error(
                    "dkim: fast RSA output differs from dkimpy's for %s/%s; using dkimpy",
                    cache_key[0],
                    cache_key[1],
                )
            self._fast_ok[cache_key] = agrees
        return self._fast_ok[cache_key]


def _fingerprint(private_key: str) -> str:
    return hashlib.sha256(private_key.encode("utf-8", "replace")).hexdigest()


def _t_tag(signature: bytes) -> bytes:
    start = signature.find(b" t=")
    return signature[start : signature.find(b";", start)] if start >= 0 else b""


_PROBE = (
    b"From: Probe <probe@example.invalid>\r\n"
    b"To: someone@example.invalid\r\n"
    b"Subject:  folded\r\n  subject line \r\n"
    b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    b"\r\n"
    b"Body line with trailing space \r\n\r\n\r\n"
)
