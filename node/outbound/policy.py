"""Transport security policy per MX: MTA-STS, DANE, REQUIRETLS, config.

``TransportPolicy.for_mx(domain, mx_host, port, requiretls=...)`` returns
the ``TlsPolicy`` the SMTP client applies to one MX host, or raises
``MxNotAllowed`` when that MX must be skipped.  Precedence:

1. DANE (RFC 7672), when ``outbound.dane`` and ``outbound.dnssec_trusted``
   and the MX host's address and TLSA answers are DNSSEC-secure: TLS is
   required and authenticated with the TLSA records; MTA-STS is then not
   consulted (RFC 8461 §2).  Secure TLSA records that are all unusable
   still require TLS, unauthenticated (RFC 7672 §2.2).
2. MTA-STS (RFC 8461): mode enforce → the MX must match the policy, TLS is
   required and the certificate verified (PKIX + MX name); mode testing →
   failures are only logged.
3. REQUIRETLS (RFC 8689 §4.2.1): TLS required, authenticated by DANE or
   else by PKIX with the MX name; an MTA-STS policy in testing mode is
   enforced for such a message.
4. ``outbound.tls = "required"``: TLS required for every destination.

``client_context(policy)`` gives the SSLContext to wrap with (the caller
passes ``server_hostname=mx_host`` for SNI and name checks);
``check_peer(sock, policy, mx_host)`` runs after the handshake and returns
the reason to defer, or None.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.resolver

from node.config import Config
from node.outbound import dane, mtasts
from node.outbound.dane import TlsaLookupError

log = logging.getLogger("postroom.outbound.policy")

MTA_STS_CACHE_FILE = "mta-sts.json"  # under data_dir


@dataclass(frozen=True)
class TlsPolicy:
    """What the SMTP client must do about TLS with one MX host."""

    require_tls: bool = False  # never send in clear: no STARTTLS or failed handshake -> defer
    verify_certificate: bool = False  # PKIX chain + MX hostname must verify
    tlsa: tuple = ()  # usable DANE TLSA records (dane.Tlsa); non-empty -> authenticate with them
    sources: tuple[str, ...] = ()  # "mta-sts", "mta-sts-testing", "dane", "requiretls", "config"

    def describe(self) -> str:
        """A short text for the delivery log line, e.g. "tls=required(dane,requiretls)"."""
        if not self.require_tls:
            label = "opportunistic"
        elif self.tlsa:
            label = "dane"
        elif self.verify_certificate:
            label = "verified"
        else:
            label = "required"
        return f"tls={label}({','.join(self.sources) or 'default'})"


class MxNotAllowed(Exception):
    """This MX host must not be used (MTA-STS enforce mismatch, or a failed secure TLSA lookup)."""


class TlsaUnavailable(MxNotAllowed):
    """RFC 7672 §2.2: the TLSA lookup of a DNSSEC-secure MX host failed; try another MX or defer."""


class TransportPolicy:
    """Computes TlsPolicy per MX and checks TLS peers against it."""

    def __init__(self, config: Config, resolver: dns.resolver.Resolver, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        settings = config.outbound
        self.dane_enabled = settings.dane and settings.dnssec_trusted
        self._secure_resolver = dane.secure_resolver(resolver) if self.dane_enabled else None
        self.mta_sts: mtasts.MtaSts | None = None
        if settings.mta_sts:
            self.mta_sts = mtasts.MtaSts(
                resolver, port=settings.mta_sts_port, cafile=settings.mta_sts_cafile,
                cache_path=config.data_dir / MTA_STS_CACHE_FILE, clock=clock,
            )
        self._contexts: dict[bool, ssl.SSLContext] = {}

    def for_mx(self, domain: str, mx_host: str, port: int, *, requiretls: bool) -> TlsPolicy:
        """The TlsPolicy for delivering mail for ``domain`` to ``mx_host``:``port``.

        Raises MxNotAllowed (or its subclass TlsaUnavailable) when this MX
        must be skipped; the caller tries the next MX and defers when none
        is left.  May do DNS and HTTPS I/O (cached; cooperative under gevent).
        """
        sources: list[str] = []
        require = verify = False
        tlsa: tuple[dane.Tlsa, ...] = ()
        if self.config.outbound.tls == "required":
            require = True
            sources.append("config")

        dane_applies = False
        if self._secure_resolver is not None:
            try:
                status = dane.lookup(self._secure_resolver, mx_host, port)
            except TlsaLookupError as exc:
                log.warning("dane %s: %s; not using this MX", mx_host, exc)
                raise TlsaUnavailable(str(exc)) from exc
            if status is not None and status.records:
                dane_applies = True
                require = True
                tlsa = status.usable
                sources.append("dane")
                if not tlsa:
                    log.warning("dane %s: TLSA records present but none usable (RFC 7672 §3.1.3): "
                                "TLS required without authentication", mx_host)

        if not dane_applies and self.mta_sts is not None:
            sts = self.mta_sts.policy_for(domain)
            if sts is not None and (sts.mode == "enforce" or (sts.mode == "testing" and requiretls)):
                if not sts.matches(mx_host):
                    log.warning("mta-sts %s: MX %s is not in the policy (mode %s): skipping it",
                                domain, mx_host, sts.mode)
                    raise MxNotAllowed(f"mta-sts: {mx_host} is not an MX allowed by the "
                                       f"policy of {domain}")
                require = verify = True
                sources.append("mta-sts")
            elif sts is not None and sts.mode == "testing":
                if not sts.matches(mx_host):
                    log.warning("mta-sts %s (testing): MX %s would not be allowed; delivering "
                                "anyway", domain, mx_host)
                sources.append("mta-sts-testing")

        if requiretls:
            require = True
            if not tlsa:
                verify = True  # RFC 8689 §4.2.1: PKIX with the MX name when DANE does not apply
            sources.append("requiretls")
        return TlsPolicy(require, verify, tlsa, tuple(sources))

    def client_context(self, policy: TlsPolicy) -> ssl.SSLContext:
        """An SSLContext for STARTTLS with this MX (TLS 1.2 or later).

        verify_certificate without TLSA: CERT_REQUIRED and check_hostname
        against the system trust store (SSL_CERT_FILE is honoured).
        Otherwise CERT_NONE: opportunistic TLS, or DANE checked by check_peer.
        """
        verify = policy.verify_certificate and not policy.tlsa
        ctx = self._contexts.get(verify)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if verify:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            else:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._contexts[verify] = ctx
        return ctx

    def check_peer(self, sock: ssl.SSLSocket, policy: TlsPolicy, mx_host: str) -> str | None:
        """After the handshake: None when the peer satisfies ``policy``, else why not (one line)."""
        leaf = sock.getpeercert(binary_form=True)
        if policy.tlsa:
            chain = _peer_chain(sock) or ([leaf] if leaf else [])
            return dane.authenticate(policy.tlsa, chain, mx_host)
        if policy.verify_certificate:
            if not leaf:
                return "tls: the server sent no certificate"
            if not dane.name_matches(leaf, mx_host):
                return f"tls: the certificate does not name {mx_host}"
            return None
        if "mta-sts-testing" in policy.sources and leaf and not dane.name_matches(leaf, mx_host):
            log.warning("mta-sts (testing): the certificate of %s does not name it; "
                        "an enforced policy would defer", mx_host)
        return None


def _peer_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The chain the peer sent, leaf first, DER (empty if the ssl module cannot tell).

    Python 3.13 has SSLSocket.get_unverified_chain(); 3.11 has it on the
    internal _ssl object (returning Certificate objects).
    """
    getter = getattr(sock, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
    if getter is None:
        return []
    out = []
    for cert in getter() or []:
        if isinstance(cert, bytes):
            out.append(cert)
        else:
            out.append(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
    return out
