"""The one way to build a DNS resolver for outbound work.

Explicit nameservers from ``outbound.resolvers`` ("IP" or "IP:PORT", IPv6 as
"[::1]:53"), or /etc/resolv.conf when empty.  Search domains are never
applied: every name we look up is absolute (a search suffix could turn a
non-existent domain into someone else's).  The per-try timeout is kept below
the lifetime so a dead server is abandoned for the next one (dnspython 2.x).
"""

from __future__ import annotations

import dns.flags
import dns.name
import dns.nameserver
import dns.resolver

from node.config import Config

DEFAULT_PORT = 53


def parse_resolver(text: str) -> tuple[str, int]:
    """'127.0.0.1', '127.0.0.1:5353', '::1', '[::1]:5353' -> (ip, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else DEFAULT_PORT
        return host, port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, DEFAULT_PORT


def make_resolver(config: Config) -> dns.resolver.Resolver:
    """A Resolver with explicit nameservers, no search list, bounded timeouts."""
    settings = config.outbound
    if settings.resolvers:
        resolver = dns.resolver.Resolver(configure=False)
        servers = [parse_resolver(r) for r in settings.resolvers]
        resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
    else:
        resolver = dns.resolver.Resolver(configure=True)
    resolver.search = []
    resolver.domain = dns.name.root
    resolver.use_search_by_default = False
    lifetime = max(float(settings.dns_timeout), 0.1)
    resolver.lifetime = lifetime
    # Per-try timeout below the lifetime: a silent server gets retried or
    # skipped within the lifetime instead of consuming all of it.
    resolver.timeout = max(lifetime / 2, 0.05)
    if settings.dnssec_trusted:
        # Ask for the AD bit (RFC 6840 §5.7); DANE trusts it only from here.
        resolver.use_edns(0, dns.flags.DO, 1232)
        resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver
