"""DANE for SMTP (RFC 7672): TLSA lookup with DNSSEC status, certificate matching.

Only the AD bit of a trusted validating resolver tells us an answer is
DNSSEC-secure (RFC 7672 §1.3, RFC 6840 §5.7); the caller decides whether the
resolver is trusted (``outbound.dnssec_trusted``).  Simplification (see
docs/transport-security.md): the MX lookup itself is not re-checked; we
require AD on the MX host's address answer and on the TLSA answer.

Usable records (§3.1): DANE-EE(3) and DANE-TA(2), selectors Cert(0) and
SPKI(1), matching types Full(0), SHA2-256(1), SHA2-512(2).  PKIX-TA(0) and
PKIX-EE(1) are unusable (§3.1.3).  DANE-EE ignores names and dates
(§3.1.1); DANE-TA validates the chain the server sent up to a matching
trust anchor, and the MX host name (§3.1.2, §3.2.2).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.flags
import dns.message
import dns.resolver

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("postroom.outbound.dane")


def _crypto(*names: str) -> Any:
    """cryptography's x509 pieces, imported on first use: an idle node that
    never meets a TLSA record does not carry them (~8 MB, docs/benchmarks.md)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509 import verification

    found = {"x509": x509, "serialization": serialization, "verification": verification}
    values = tuple(found[n] for n in names)
    return values if len(values) > 1 else values[0]

DANE_TA, DANE_EE = 2, 3
USABLE_USAGES = (DANE_TA, DANE_EE)
SELECTORS = (0, 1)
MATCHING_TYPES = (0, 1, 2)


class TlsaLookupError(Exception):
    """The TLSA lookup of a secure MX host failed (SERVFAIL, timeout): do not use that MX."""


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return (self.usage in USABLE_USAGES and self.selector in SELECTORS
                and self.mtype in MATCHING_TYPES)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}"


@dataclass(frozen=True)
class DaneStatus:
    """What DNS said about one MX host, when its answers were DNSSEC-secure."""

    records: tuple[Tlsa, ...]  # all TLSA records (empty: secure denial, DANE not in use)

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return tuple(r for r in self.records if r.usable)


def secure_resolver(resolver: dns.resolver.Resolver) -> dns.resolver.Resolver:
    """A copy of ``resolver`` that asks for the AD bit (RFC 6840 §5.7) with EDNS DO."""
    clone = copy.copy(resolver)
    clone.use_edns(0, dns.flags.DO, 1232)
    clone.flags = dns.flags.RD | dns.flags.AD
    return clone


def _is_secure(response: dns.message.Message | None) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


def _nx_secure(exc: dns.resolver.NXDOMAIN) -> bool:
    responses = exc.kwargs.get("responses") or {}
    return bool(responses) and all(_is_secure(r) for r in responses.values())


def lookup(resolver: dns.resolver.Resolver, mx_host: str, port: int) -> DaneStatus | None:
    """TLSA records for ``mx_host``:``port`` when DNSSEC-secure, else None.

    None: the host's addresses or its TLSA answer are not secure, or the
    addresses cannot be found; DANE does not apply.  DaneStatus with no
    records: a secure denial of TLSA.  Raises TlsaLookupError when the
    host is secure but the TLSA lookup fails (RFC 7672 §2.2: such an MX
    must not be used; the message is deferred if no other MX is left).
    """
    host = mx_host.rstrip(".") + "."
    if not _address_secure(resolver, host):
        return None
    qname = f"_{port}._tcp.{host}"
    try:
        answer = resolver.resolve(qname, "TLSA", raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN as exc:
        return DaneStatus(()) if _nx_secure(exc) else None
    except dns.exception.DNSException as exc:
        raise TlsaLookupError(f"TLSA lookup {qname} failed: {exc}") from exc
    if not _is_secure(answer.response):
        log.info("dane %s: TLSA answer is not DNSSEC-validated (no AD): DANE not used", mx_host)
        return None
    if answer.rrset is None:
        return DaneStatus(())
    records = tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer.rrset)
    return DaneStatus(records)


def _address_secure(resolver: dns.resolver.Resolver, host: str) -> bool:
    """Whether the A (else AAAA) answer for ``host`` carries the AD bit."""
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(host, rdtype, raise_on_no_answer=False)
        except dns.exception.DNSException as exc:
            log.info("dane %s: address lookup failed: %s", host, exc)
            return False
        if answer.rrset is not None:
            return _is_secure(answer.response)
    return False


# -- matching ---------------------------------------------------------------


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    serialization = _crypto("serialization")
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def record_matches(record: Tlsa, cert: x509.Certificate) -> bool:
    """Whether ``cert`` has the association data of ``record`` (RFC 6698 §2.1)."""
    if not record.usable:
        return False
    return _digest(_selected(cert, record.selector), record.mtype) == record.data


def authenticate(records: tuple[Tlsa, ...], chain_der: list[bytes], mx_host: str) -> str | None:
    """Check the peer chain (leaf first) against TLSA records: None if ok, else why not."""
    x509 = _crypto("x509")
    if not chain_der:
        return "dane: the server sent no certificate"
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError:
        return "dane: the server certificate does not parse"
    leaf = chain[0]
    for record in records:
        if record.usage == DANE_EE and record_matches(record, leaf):
            return None  # RFC 7672 §3.1.1: no name or expiry checks for DANE-EE
    for record in records:
        if record.usage != DANE_TA:
            continue
        for anchor in chain[1:]:
            if record_matches(record, anchor) and _chain_ok(leaf, chain[1:], anchor, mx_host):
                return None
    return f"dane: no TLSA record of {mx_host} matches its certificate chain"


def _chain_ok(leaf: x509.Certificate, intermediates: list[x509.Certificate],
              anchor: x509.Certificate, mx_host: str) -> bool:
    """DANE-TA (RFC 7672 §3.1.2): the leaf chains to ``anchor`` and names ``mx_host``."""
    verification = _crypto("verification")
    try:
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store([anchor]))
            .time(datetime.datetime.now(datetime.UTC))
            .build_server_verifier(verification.DNSName(mx_host.rstrip(".").lower()))
        )
        verifier.verify(leaf, intermediates)
        return True
    except (verification.VerificationError, ValueError) as exc:
        log.info("dane %s: DANE-TA chain check failed: %s", mx_host, exc)
        return False


def name_matches(cert_der: bytes, host: str) -> bool:
    """Whether the certificate names ``host`` (RFC 6125 §6.4: SAN dNSName, "*." one label)."""
    x509 = _crypto("x509")
    host = host.rstrip(".").lower()
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    except ValueError:
        return False
    for name in dns_names:
        name = str(name).rstrip(".").lower()
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False
