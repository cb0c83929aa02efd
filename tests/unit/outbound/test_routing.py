"""Router against a real DNS server on loopback (tests/support/dns.py)."""

from __future__ import annotations

import random

import pytest

from node.config import from_dict
from node.outbound.client_protocol import FAILED, PENDING
from node.outbound.dnsresolver import make_resolver, parse_resolver
from node.outbound.routing import Router, split_host_port
from tests.support.dns import DnsServer, Zones


def zones() -> Zones:
    z = Zones()
    # RFC 5321 §5.1: preference order, equal preferences in random order.
    z.add("dest.test", "MX", "20 mx3.dest.test.")
    z.add("dest.test", "MX", "10 mx1.dest.test.")
    z.add("dest.test", "MX", "10 mx2.dest.test.")
    z.add("mx1.dest.test", "A", "127.0.0.2")
    z.add("mx2.dest.test", "A", "127.0.0.3")
    z.add("mx3.dest.test", "A", "127.0.0.4")
    z.add("mx3.dest.test", "AAAA", "::1")
    # No MX: the domain itself (implicit MX), with A and AAAA.
    z.add("implicit.test", "A", "127.0.0.5")
    z.add("implicit.test", "AAAA", "::1")
    z.add("implicit.test", "TXT", '"v=spf1 -all"')
    # A name that exists with no MX and no address records.
    z.add("noaddr.test", "TXT", '"nothing here"')
    # RFC 7505 null MX.
    z.add("nullmx.test", "MX", "0 .")
    # CNAMEs: the domain is an alias, and an MX host is an alias.
    z.add("alias.test", "CNAME", "dest.test.")
    z.add("cnamemx.test", "MX", "10 mail.cnamemx.test.")
    z.add("mail.cnamemx.test", "CNAME", "real.cnamemx.test.")
    z.add("real.cnamemx.test", "A", "127.0.0.6")
    # MX hosts that do not resolve (one bad, one good).
    z.add("halfbad.test", "MX", "5 gone.halfbad.test.")
    z.add("halfbad.test", "MX", "10 ok.halfbad.test.")
    z.add("ok.halfbad.test", "A", "127.0.0.7")
    z.add("allbad.test", "MX", "5 gone.allbad.test.")
    z.add("relay.example", "A", "127.0.0.9")
    return z


@pytest.fixture(scope="module")
def dns_server():
    with DnsServer(zones()) as server:
        yield server


def router(dns_server: DnsServer, local=(), rng=None, **outbound) -> Router:
    config = from_dict({"outbound": {"resolvers": [dns_server.address], "dns_timeout": 2.0,
                                     **outbound}})
    return Router(config, make_resolver(config), lambda d: d in local, rng=rng)


def test_mx_preference_order_and_addresses(dns_server):
    route = router(dns_server).route("dest.test")
    assert route.kind == "mx" and route.failure is None
    assert [h.preference for h in route.hosts] == [10, 10, 20]
    assert {h.name for h in route.hosts[:2]} == {"mx1.dest.test", "mx2.dest.test"}
    assert route.hosts[2].name == "mx3.dest.test"
    # IPv6 first, then IPv4, for every host.
    assert route.hosts[2].addresses == ("::1", "127.0.0.4")
    assert all(h.port == 25 for h in route.hosts)


def test_equal_preferences_randomized(dns_server):
    r = router(dns_server, rng=random.Random(1))
    firsts = {r.route("dest.test").hosts[0].name for _ in range(40)}
    assert firsts == {"mx1.dest.test", "mx2.dest.test"}
    # ... but never before a better preference.
    assert all(r.route("dest.test").hosts[2].name == "mx3.dest.test" for _ in range(10))


def test_implicit_mx(dns_server):
    # RFC 5321 §5.1: no MX records -> the domain's own address records.
    route = router(dns_server).route("implicit.test")
    assert route.kind == "implicit"
    assert [(h.name, h.addresses) for h in route.hosts] == [("implicit.test", ("::1", "127.0.0.5"))]


def test_no_mx_no_address_fails(dns_server):
    route = router(dns_server).route("noaddr.test")
    assert route.failure is not None and route.failure.state == FAILED
    assert route.failure.enhanced == "5.1.2"


def test_null_mx_fails_at_once(dns_server):
    # RFC 7505 §3.2: 556 5.1.10 without any connection.
    route = router(dns_server).route("nullmx.test")
    assert route.hosts == ()
    assert (route.failure.state, route.failure.code, route.failure.enhanced) == (FAILED, 556, "5.1.10")


def test_nxdomain_is_permanent(dns_server):
    route = router(dns_server).route("does-not-exist.test")
    assert route.failure.state == FAILED and route.failure.enhanced == "5.1.2"


def test_dns_failure_is_temporary():
    # Nothing answers on this port: a timeout, never a bounce.
    config = from_dict({"outbound": {"resolvers": ["127.0.0.1:9"], "dns_timeout": 0.3}})
    route = Router(config, make_resolver(config), lambda d: False).route("dest.test")
    assert route.failure.state == PENDING and route.failure.enhanced == "4.4.3"


def test_cname_domain_and_cname_mx_host(dns_server):
    r = router(dns_server)
    assert {h.name for h in r.route("alias.test").hosts} == {
        "mx1.dest.test", "mx2.dest.test", "mx3.dest.test"}
    route = r.route("cnamemx.test")
    assert [h.addresses for h in route.hosts] == [("127.0.0.6",)]


def test_unresolvable_mx_hosts(dns_server):
    r = router(dns_server)
    assert [h.name for h in r.route("halfbad.test").hosts] == ["ok.halfbad.test"]
    route = r.route("allbad.test")
    assert route.failure.state == PENDING  # MX points nowhere: keep trying, bounce at lifetime


def test_local_domain_never_routes_out(dns_server):
    route = router(dns_server, local={"dest.test"}).route("DEST.test.")
    assert route.local and route.hosts == ()


def test_relay_by_domain_then_global(dns_server):
    r = router(dns_server, relay_by_domain={"dest.test": "relay.example:2525"},
               relay_host="127.0.0.8:26")
    route = r.route("dest.test")
    assert route.kind == "relay"
    assert [(h.name, h.addresses, h.port) for h in route.hosts] == [
        ("relay.example", ("127.0.0.9",), 2525)]
    route = r.route("implicit.test")
    assert [(h.name, h.addresses, h.port) for h in route.hosts] == [("127.0.0.8", ("127.0.0.8",), 26)]
    # Local domains stay local even with a global smart host.
    r = router(dns_server, local={"implicit.test"}, relay_host="127.0.0.8:26")
    assert r.route("implicit.test").local


def test_configured_port(dns_server):
    assert {h.port for h in router(dns_server, port=2526).route("dest.test").hosts} == {2526}


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)),
    ("[::1]:5300", ("::1", 5300)),
])
def test_parse_resolver(text, expected):
    assert parse_resolver(text) == expected


def test_split_host_port():
    assert split_host_port("smtp.example:587", 25) == ("smtp.example", 587)
    assert split_host_port("[::1]:26", 25) == ("::1", 26)
    assert split_host_port("smtp.example", 25) == ("smtp.example", 25)


def test_resolver_has_no_search_domains(dns_server):
    config = from_dict({"outbound": {"resolvers": [dns_server.address]}})
    resolver = make_resolver(config)
    assert resolver.search == [] and resolver.timeout < resolver.lifetime
