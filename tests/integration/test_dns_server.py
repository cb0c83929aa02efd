"""The loopback DNS server the outbound tests use answers like a real one."""

from __future__ import annotations

import dns.flags
import dns.rdatatype
import dns.resolver
import pytest

from tests.support.dns import DnsServer, Zones


@pytest.fixture
def dns_server():
    zones = Zones()
    zones.add("example.net", "MX", "10 mx1.example.net.")
    zones.add("example.net", "MX", "20 mx2.example.net.")
    zones.add("mx1.example.net", "A", "127.0.0.2")
    zones.add("mx1.example.net", "AAAA", "::1")
    zones.add("alias.example.net", "CNAME", "mx1.example.net.")
    zones.add("null.example.net", "MX", "0 .")
    for i in range(40):  # larger than 512 octets over UDP
        zones.add("big.example.net", "TXT", f'"{"x" * 20} {i}"')
    with DnsServer(zones, dnssec=True) as server:
        yield server


def resolver(server: DnsServer) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [server.host]
    r.port = server.port
    r.timeout = 1
    r.lifetime = 3
    return r


def test_mx_a_aaaa_cname_nxdomain_and_nodata(dns_server) -> None:
    r = resolver(dns_server)
    mx = sorted((rr.preference, rr.exchange.to_text()) for rr in r.resolve("example.net", "MX"))
    assert mx == [(10, "mx1.example.net."), (20, "mx2.example.net.")]
    assert [rr.address for rr in r.resolve("mx1.example.net", "AAAA")] == ["::1"]
    answer = r.resolve("alias.example.net", "A")
    assert [rr.address for rr in answer] == ["127.0.0.2"]
    assert answer.canonical_name.to_text() == "mx1.example.net."
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("nowhere.example.net", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        r.resolve("mx1.example.net", "MX")
    null = list(r.resolve("null.example.net", "MX"))
    assert null[0].preference == 0 and null[0].exchange.to_text() == "."


def test_large_answers_fall_back_to_tcp_and_ad_bit(dns_server) -> None:
    answer = resolver(dns_server).resolve("big.example.net", "TXT")
    assert len(answer) == 40
    assert answer.response.flags & dns.flags.AD
    assert ("big.example.net.", dns.rdatatype.to_text(dns.rdatatype.TXT)) in dns_server.queries
