"""Where mail for a domain goes: relay table, MX records, implicit MX, null MX.

Order of decisions for ``Router.route(domain)``:

1. a local domain never routes out: ``Route.local`` (the runner delivers it
   into the cluster and never connects anywhere for it);
2. ``outbound.relay_by_domain[domain]``, then ``outbound.relay_host``: the
   smart host's address records, no MX lookup (like Postfix's "[host]");
3. MX records (RFC 5321 §5.1): ascending preference, random order among
   equal preferences; a single "0 ." is a null MX (RFC 7505 §3) and fails at
   once with 556 5.1.10; no MX records at all (NODATA) means the domain
   itself is the implicit MX; NXDOMAIN fails permanently (5.1.2);
   SERVFAIL or a timeout is temporary (4.4.3).  CNAMEs are followed by the
   resolver.  Each host is resolved to its IPv6 and IPv4 addresses.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.inet
import dns.name
import dns.resolver

from node.config import Config
from node.outbound.client_protocol import Outcome, deferred, failed

log = logging.getLogger("postroom.outbound.routing")


@dataclass(frozen=True)
class Host:
    """One host to try, in order; ``addresses`` IPv6 first, then IPv4."""

    name: str
    preference: int
    addresses: tuple[str, ...]
    port: int


@dataclass(frozen=True)
class Route:
    """Hosts for a domain, or why there are none (``failure``)."""

    domain: str
    kind: str  # "mx" | "implicit" | "relay" | "local" | "error"
    hosts: tuple[Host, ...] = ()
    failure: Outcome | None = None

    @property
    def local(self) -> bool:
        return self.kind == "local"


class _Temporary(Exception):
    pass


class Router:
    """Routes destination domains; every lookup goes through ``resolver``."""

    def __init__(
        self,
        config: Config,
        resolver: dns.resolver.Resolver,
        local_domain: Callable[[str], bool],
        rng: random.Random | None = None,
    ) -> None:
        self.settings = config.outbound
        self.resolver = resolver
        self.local_domain = local_domain
        self.rng = rng or random.Random()

    def route(self, domain: str) -> Route:
        domain = domain.rstrip(".").lower()
        if self.local_domain(domain):
            return Route(domain, "local")
        if domain.startswith("["):
            # Address literal (RFC 5321 §4.1.3): deliver to that address.
            inner = domain[1:-1]
            inner = inner[5:] if inner.lower().startswith("ipv6:") else inner
            return Route(domain, "mx", (Host(inner, 0, (inner,), self.settings.port),))
        relay = self.settings.relay_by_domain.get(domain) or self.settings.relay_host
        if relay:
            return self._relay(domain, relay)
        try:
            return self._mx(domain)
        except _Temporary as exc:
            return Route(domain, "error", failure=deferred(451, "4.4.3", str(exc)))

    # -- relay ------------------------------------------------------------

    def _relay(self, domain: str, relay: str) -> Route:
        host, port = split_host_port(relay, self.settings.port)
        try:
            addresses = self._addresses(host)
        except _Temporary as exc:
            return Route(domain, "error", failure=deferred(451, "4.4.3", str(exc)))
        if not addresses:
            # A misconfigured smart host is ours to fix: keep the mail.
            return Route(domain, "error", failure=deferred(
                451, "4.4.4", f"relay host {host} has no address records"))
        return Route(domain, "relay", (Host(host, 0, addresses, port),))

    # -- MX -----------------------------------------------------------------

    def _mx(self, domain: str) -> Route:
        port = self.settings.port
        try:
            answer = self.resolver.resolve(dns.name.from_text(domain), "MX", search=False)
            records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        except dns.resolver.NXDOMAIN:
            return Route(domain, "error", failure=failed(
                550, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)"))
        except dns.resolver.NoAnswer:
            records = None
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.YXDOMAIN) as exc:
            raise _Temporary(f"MX lookup for {domain} failed: {type(exc).__name__}") from None
        if records is None:
            # RFC 5321 §5.1: no MX records: the domain is its own (implicit) MX.
            addresses = self._addresses(domain)
            if not addresses:
                return Route(domain, "error", failure=failed(
                    550, "5.1.2", f"domain {domain} has no MX and no address records"))
            return Route(domain, "implicit", (Host(domain, 0, addresses, port),))
        if any(name in ("", ".") for _, name in records):
            if len(records) == 1 and records[0][0] == 0:
                # RFC 7505 §3.2: the domain accepts no mail.
                return Route(domain, "error", failure=failed(
                    556, "5.1.10", f"domain {domain} accepts no mail (null MX)"))
            records = [(p, n) for p, n in records if n not in ("", ".")]
        hosts: list[Host] = []
        temporary: list[str] = []
        for preference, name in self.order(records):
            try:
                addresses = self._addresses(name)
            except _Temporary as exc:
                temporary.append(str(exc))
                continue
            if addresses:
                hosts.append(Host(name, preference, addresses, port))
            else:
                temporary.append(f"MX host {name} has no address records")
        if not hosts:
            return Route(domain, "error", failure=deferred(
                451, "4.4.4", "; ".join(temporary) or f"no usable MX host for {domain}"))
        return Route(domain, "mx", tuple(hosts))

    def order(self, records: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Ascending preference; equal preferences shuffled (RFC 5321 §5.1)."""
        shuffled = list(records)
        self.rng.shuffle(shuffled)
        return sorted(shuffled, key=lambda r: r[0])  # sort is stable

    def _addresses(self, name: str) -> tuple[str, ...]:
        """AAAA then A addresses of name (CNAMEs followed); () when none.

        NXDOMAIN and NODATA give (); SERVFAIL/timeouts raise _Temporary.
        """
        if dns.inet.is_address(name):
            return (name,)  # a relay given as an IP address
        out: list[str] = []
        qname = dns.name.from_text(name)
        for rdtype in ("AAAA", "A"):
            try:
                answer = self.resolver.resolve(qname, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.YXDOMAIN) as exc:
                raise _Temporary(f"{rdtype} lookup for {name} failed: {type(exc).__name__}") from None
            out.extend(r.address for r in answer)
        return tuple(dict.fromkeys(out))


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:587', '[host]:25', '[::1]:25' -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port
