"""MTA-STS end to end: real DNS on loopback, real HTTPS with a test CA (RFC 8461 §3, §5).

The policy host mta-sts.example.net is resolved through the test DNS server
(never the system resolver) to 127.0.0.1, and the fetch sends SNI and Host
for that name to the HTTPS server's port.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node.config import Config, NodeSettings, OutboundSettings
from node.outbound import mtasts
from node.outbound.dnsresolver import make_resolver
from node.outbound.policy import MxNotAllowed, TlsPolicy, TransportPolicy
from tests.support.dns import DnsServer, Zones
from tests.support.https_server import HttpsServer, TestCA

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.example.net\nmx: *.backup.example.net\nmax_age: 86400\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def shared_dns() -> Iterator[DnsServer]:
    with DnsServer(Zones()) as server:
        yield server


@pytest.fixture
def zones(shared_dns: DnsServer) -> Zones:
    z = shared_dns.zones
    with z.lock:
        z.records.clear()
    z.add("_mta-sts.example.net", "TXT", '"v=STSv1; id=20240101"')
    z.add("mta-sts.example.net", "A", "127.0.0.1")
    return z


@pytest.fixture
def dns_server(shared_dns: DnsServer, zones: Zones) -> DnsServer:
    shared_dns.queries.clear()
    return shared_dns


@pytest.fixture
def web(ca: TestCA) -> Iterator[HttpsServer]:
    with HttpsServer(ca, ["mta-sts.example.net"]) as server:
        server.set_policy(ENFORCE)
        yield server


def make_config(tmp_path: Path, dns_server: DnsServer, web: HttpsServer, ca: TestCA, **outbound) -> Config:
    settings = dict(resolvers=[dns_server.address], mta_sts_port=web.port, mta_sts_cafile=ca.cafile,
                    dns_timeout=2.0)
    settings.update(outbound)
    return Config(node=NodeSettings(data_dir=str(tmp_path)), outbound=OutboundSettings(**settings))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def policy(tmp_path: Path, dns_server: DnsServer, web: HttpsServer, ca: TestCA, clock: Clock) -> TransportPolicy:
    config = make_config(tmp_path, dns_server, web, ca)
    return TransportPolicy(config, make_resolver(config), clock=clock)


def test_enforce_allows_listed_mx_with_verified_tls(policy: TransportPolicy, web: HttpsServer) -> None:
    result = policy.for_mx("example.net", "mx.example.net", 25, requiretls=False)
    assert result == TlsPolicy(require_tls=True, verify_certificate=True, sources=("mta-sts",))
    assert result.describe() == "tls=verified(mta-sts)"
    # §3.3: Host and SNI name the policy host, whatever address it resolved to.
    assert web.requests == [(f"mta-sts.example.net:{web.port}", "/.well-known/mta-sts.txt")]
    assert policy.for_mx("example.net", "MX1.backup.example.net.", 25, requiretls=False).require_tls


def test_enforce_skips_unlisted_mx(policy: TransportPolicy) -> None:  # RFC 8461 §4.1, §5
    with pytest.raises(MxNotAllowed):
        policy.for_mx("example.net", "evil.example.org", 25, requiretls=False)
    with pytest.raises(MxNotAllowed):
        policy.for_mx("example.net", "a.b.backup.example.net", 25, requiretls=False)


def test_policy_cached_no_fetch_or_dns_per_message(policy: TransportPolicy, web: HttpsServer,
                                                   dns_server: DnsServer) -> None:
    policy.for_mx("example.net", "mx.example.net", 25, requiretls=False)
    queries = len(dns_server.queries)
    for _ in range(20):
        policy.for_mx("example.net", "mx.example.net", 25, requiretls=False)
    assert len(web.requests) == 1
    assert len(dns_server.queries) == queries


def test_refetch_when_txt_id_changes(policy: TransportPolicy, web: HttpsServer, zones: Zones,
                                     clock: Clock) -> None:  # RFC 8461 §3.1, §5.1
    policy.for_mx("example.net", "mx.example.net", 25, requiretls=False)
    zones.remove("_mta-sts.example.net", "TXT")
    zones.add("_mta-sts.example.net", "TXT", '"v=STSv1; id=20240202"')
    web.set_policy("version: STSv1\nmode: enforce\nmx: mx2.example.net\nmax_age: 86400\n")
    # Within the TXT recheck interval the cached policy is used as is.
    policy.for_mx("example.net", "mx.example.net", 25, requiretls=False)
    assert len(web.requests) == 1
    clock.now += mtasts.TXT_RECHECK + 1
    with pytest.raises(MxNotAllowed):
        policy.for_mx("example.net", "mx.example.net", 25, requiretls=False)
    assert policy.for_mx("example.net", "mx2.example.net", 25, requiretls=False).verify_certificate
    assert len(web.requests) == 2


def test_same_txt_id_no_refetch(policy: TransportPolicy, web: HttpsServer, clock: Clock) -> None:
    policy.for_mx("example.net", "mx.example.net", 25, requiretls=False)
    clock.now += mtasts.TXT_RECHECK + 1
    policy.for_mx("example.net", "mx.example.net", 25, requiretls=False)
    assert len(web.requests) == 1


def test_failed_refetch_keeps_cached_policy(policy: TransportPolicy, web: HttpsServer, zones: Zones,
                                            clock: Clock) -> None:  # RFC 8461 §5.1
    policy.for_mx("example.net", "mx.example.net", 25, requiretls=False)
    zones.remove("_mta-sts.example.net", "TXT")
    zones.add("_mta-sts.example.net", "TXT", '"v=STSv1; id=new"')
    web.set_policy("gone", status=404)
    clock.now += mtasts.TXT_RECHECK + 1
    with pytest.raises(MxNotAllowed):
        policy.for_mx("example.net", "evil.example.org", 25, requiretls=False)
    assert len(web.requests) == 2


def test_txt_removed_cached_policy_applies_until_expiry(policy: TransportPolicy, zones: Zones,
                                                        clock: Clock) -> None:  # RFC 8461 §5.1
    policy.for_mx("example.net", "mx.example.net", 25, requiretls=False)
    zones.remove("_mta-sts.example.net", "TXT")
    clock.now += mtasts.TXT_RECHECK + 1
    with pytest.raises(MxNotAllowed):
        policy.for_mx("example.net", "evil.example.org", 25, requiretls=False)
    clock.now += 86400  # past fetched + max_age
    assert policy.for_mx("example.net", "evil.example.org", 25, requiretls=False) == TlsPolicy()


def test_policy_persists_across_restart(tmp_path: Path, dns_server: DnsServer, web: HttpsServer,
                                        ca: TestCA, clock: Clock, zones: Zones) -> None:
    config = make_config(tmp_path, dns_server, web, ca)
    first = TransportPolicy(config, make_resolver(config), clock=clock)
    first.for_mx("example.net", "mx.example.net", 25, requiretls=False)
    assert (tmp_path / "mta-sts.json").exists()
    web.set_policy("", status=503)  # an attacker blocks the fetch after the restart
    zones.remove("_mta-sts.example.net", "TXT")
    second = TransportPolicy(config, make_resolver(config), clock=clock)
    with pytest.raises(MxNotAllowed):
        second.for_mx("example.net", "evil.example.org", 25, requiretls=False)
    assert len(web.requests) == 1


def test_no_txt_record_no_fetch(policy: TransportPolicy, web: HttpsServer) -> None:
    assert policy.for_mx("other.example", "mx.other.example", 25, requiretls=False) == TlsPolicy()
    assert web.requests == []


@pytest.mark.parametrize(
    "setup",
    [
        dict(text="", status=404),
        dict(text="", status=301, headers=(("Location", "https://mta-sts.example.net/x"),)),  # §3.3
        dict(text=ENFORCE, content_type="text/html"),
        dict(text=ENFORCE + "x" * (64 * 1024)),  # larger than 64 KB
        dict(text="version: STSv1\nmode: enforce\nmax_age: 1\n"),  # unparseable policy
    ],
)
def test_txt_present_fetch_fails_no_cache_means_no_policy(policy: TransportPolicy, web: HttpsServer,
                                                          setup: dict) -> None:  # RFC 8461 §5.1
    web.set_policy(setup.pop("text"), **setup)
    assert policy.for_mx("example.net", "evil.example.org", 25, requiretls=False) == TlsPolicy()
    assert len(web.requests) == 1
    # A failed fetch is not retried for every message.
    policy.for_mx("example.net", "evil.example.org", 25, requiretls=False)
    assert len(web.requests) == 1


def test_text_plain_with_charset_accepted(policy: TransportPolicy, web: HttpsServer) -> None:
    web.set_policy(ENFORCE, content_type="text/plain; charset=utf-8")
    assert policy.for_mx("example.net", "mx.example.net", 25, requiretls=False).verify_certificate


def test_certificate_for_wrong_name_rejected(tmp_path: Path, dns_server: DnsServer, ca: TestCA,
                                             clock: Clock) -> None:  # RFC 8461 §3.3
    with HttpsServer(ca, ["www.example.net"]) as wrong:
        wrong.set_policy(ENFORCE)
        config = make_config(tmp_path, dns_server, wrong, ca)
        policy = TransportPolicy(config, make_resolver(config), clock=clock)
        assert policy.for_mx("example.net", "evil.example.org", 25, requiretls=False) == TlsPolicy()
        assert wrong.requests == []


def test_untrusted_ca_rejected(tmp_path: Path, dns_server: DnsServer, web: HttpsServer, ca: TestCA,
                               clock: Clock) -> None:
    other_ca = TestCA("someone else's root")
    config = make_config(tmp_path, dns_server, web, ca, mta_sts_cafile=other_ca.cafile)
    policy = TransportPolicy(config, make_resolver(config), clock=clock)
    assert policy.for_mx("example.net", "evil.example.org", 25, requiretls=False) == TlsPolicy()
    assert web.requests == []


def test_testing_mode_only_reports(policy: TransportPolicy, web: HttpsServer) -> None:  # RFC 8461 §5
    web.set_policy(ENFORCE.replace("enforce", "testing"))
    result = policy.for_mx("example.net", "evil.example.org", 25, requiretls=False)
    assert result == TlsPolicy(sources=("mta-sts-testing",))


def test_testing_mode_enforced_for_requiretls(policy: TransportPolicy, web: HttpsServer) -> None:
    web.set_policy(ENFORCE.replace("enforce", "testing"))  # RFC 8689 §4.2.1
    with pytest.raises(MxNotAllowed):
        policy.for_mx("example.net", "evil.example.org", 25, requiretls=True)
    result = policy.for_mx("example.net", "mx.example.net", 25, requiretls=True)
    assert result == TlsPolicy(True, True, (), ("mta-sts", "requiretls"))


def test_mode_none_does_nothing(policy: TransportPolicy, web: HttpsServer) -> None:
    web.set_policy("version: STSv1\nmode: none\nmax_age: 86400\n")
    assert policy.for_mx("example.net", "evil.example.org", 25, requiretls=False) == TlsPolicy()


def test_mta_sts_disabled(tmp_path: Path, dns_server: DnsServer, web: HttpsServer, ca: TestCA) -> None:
    config = make_config(tmp_path, dns_server, web, ca, mta_sts=False)
    policy = TransportPolicy(config, make_resolver(config))
    assert policy.for_mx("example.net", "evil.example.org", 25, requiretls=False) == TlsPolicy()
    assert web.requests == []
