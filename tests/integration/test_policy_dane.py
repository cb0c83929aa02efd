"""DANE, REQUIRETLS, precedence and peer checks over real DNS and real TLS.

RFC 7672 (DANE for SMTP), RFC 8461 §2 (DANE before MTA-STS), RFC 8689
(REQUIRETLS).  The DNS server on loopback plays a validating resolver: with
``dnssec=True`` it sets the AD bit, without it answers are insecure.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from node.config import Config, NodeSettings, OutboundSettings
from node.outbound.dane import Tlsa
from node.outbound.dnsresolver import make_resolver
from node.outbound.policy import MxNotAllowed, TlsaUnavailable, TlsPolicy, TransportPolicy
from tests.support.dns import DnsServer, Zones
from tests.support.https_server import HttpsServer, Issued, TestCA, TlsServer

MX = "mx.example.net"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def mx_cert(ca: TestCA) -> Issued:
    return ca.issue([MX], via_intermediate=True)


def tlsa_text(issued: Issued, usage: int = 3, selector: int = 1, mtype: int = 1) -> str:
    raw = issued.der if selector == 0 else issued.spki_der
    data = {0: raw, 1: hashlib.sha256(raw).digest(), 2: hashlib.sha512(raw).digest()}[mtype]
    return f"{usage} {selector} {mtype} {data.hex()}"


def base_zones(mx_cert: Issued) -> Zones:
    zones = Zones()
    zones.add(MX, "A", "127.0.0.1")
    zones.add(f"_25._tcp.{MX}", "TLSA", tlsa_text(mx_cert))
    # An MTA-STS policy that does not list MX: only DANE's precedence lets it through.
    zones.add("_mta-sts.example.net", "TXT", '"v=STSv1; id=1"')
    zones.add("mta-sts.example.net", "A", "127.0.0.1")
    return zones


class ServfailDns(DnsServer):
    """Answers SERVFAIL for TLSA questions, as a validating resolver does for bogus data."""

    def answer(self, wire: bytes, max_size: int | None) -> bytes | None:
        query = dns.message.from_wire(wire)
        if query.question and query.question[0].rdtype == dns.rdatatype.TLSA:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        return super().answer(wire, max_size)


@pytest.fixture(scope="module")
def web(ca: TestCA) -> Iterator[HttpsServer]:
    with HttpsServer(ca, ["mta-sts.example.net"]) as server:
        server.set_policy("version: STSv1\nmode: enforce\nmx: other.example.net\nmax_age: 86400\n")
        yield server


def make_policy(tmp_path: Path, dns_server: DnsServer, web: HttpsServer, ca: TestCA,
                **outbound) -> TransportPolicy:
    settings = dict(resolvers=[dns_server.address], dnssec_trusted=True, dns_timeout=2.0,
                    mta_sts_port=web.port, mta_sts_cafile=ca.cafile)
    settings.update(outbound)
    config = Config(node=NodeSettings(data_dir=str(tmp_path)), outbound=OutboundSettings(**settings))
    return TransportPolicy(config, make_resolver(config))


def test_dane_applies_with_ad_and_takes_precedence(tmp_path: Path, mx_cert: Issued, ca: TestCA,
                                                   web: HttpsServer) -> None:
    requests_before = len(web.requests)
    with DnsServer(base_zones(mx_cert), dnssec=True) as server:
        result = make_policy(tmp_path, server, web, ca).for_mx("example.net", MX, 25, requiretls=False)
    assert result.require_tls and not result.verify_certificate
    assert result.tlsa == (Tlsa(3, 1, 1, hashlib.sha256(mx_cert.spki_der).digest()),)
    assert result.sources == ("dane",)
    assert result.describe() == "tls=dane(dane)"
    assert len(web.requests) == requests_before  # RFC 8461 §2: MTA-STS not consulted


def test_no_ad_bit_no_dane_then_mta_sts(tmp_path: Path, mx_cert: Issued, ca: TestCA,
                                        web: HttpsServer) -> None:
    with DnsServer(base_zones(mx_cert), dnssec=False) as server:
        policy = make_policy(tmp_path, server, web, ca)
        with pytest.raises(MxNotAllowed):  # the MTA-STS policy lists only other.example.net
            policy.for_mx("example.net", MX, 25, requiretls=False)


def test_untrusted_resolver_never_asks_for_tlsa(tmp_path: Path, mx_cert: Issued, ca: TestCA,
                                                web: HttpsServer) -> None:
    with DnsServer(base_zones(mx_cert), dnssec=True) as server:
        policy = make_policy(tmp_path, server, web, ca, dnssec_trusted=False, mta_sts=False)
        assert policy.for_mx("example.net", MX, 25, requiretls=False) == TlsPolicy()
        assert not [q for q in server.queries if q[1] == "TLSA"]


def test_dane_disabled(tmp_path: Path, mx_cert: Issued, ca: TestCA, web: HttpsServer) -> None:
    with DnsServer(base_zones(mx_cert), dnssec=True) as server:
        policy = make_policy(tmp_path, server, web, ca, dane=False, mta_sts=False)
        assert policy.for_mx("example.net", MX, 25, requiretls=False) == TlsPolicy()


def test_secure_no_tlsa_is_not_dane(tmp_path: Path, mx_cert: Issued, ca: TestCA, web: HttpsServer) -> None:
    zones = base_zones(mx_cert)
    zones.remove(f"_25._tcp.{MX}")
    with DnsServer(zones, dnssec=True) as server:
        policy = make_policy(tmp_path, server, web, ca, mta_sts=False)
        assert policy.for_mx("example.net", MX, 25, requiretls=False) == TlsPolicy()


def test_tlsa_port_in_owner_name(tmp_path: Path, mx_cert: Issued, ca: TestCA, web: HttpsServer) -> None:
    with DnsServer(base_zones(mx_cert), dnssec=True) as server:
        policy = make_policy(tmp_path, server, web, ca, mta_sts=False)
        assert policy.for_mx("example.net", MX, 2525, requiretls=False) == TlsPolicy()
        assert (f"_2525._tcp.{MX}.", "TLSA") in server.queries


def test_only_unusable_tlsa_requires_unauthenticated_tls(tmp_path: Path, mx_cert: Issued, ca: TestCA,
                                                         web: HttpsServer) -> None:
    zones = base_zones(mx_cert)
    zones.remove(f"_25._tcp.{MX}")
    zones.add(f"_25._tcp.{MX}", "TLSA", tlsa_text(mx_cert, usage=1))  # PKIX-EE: RFC 7672 §3.1.3
    with DnsServer(zones, dnssec=True) as server:
        result = make_policy(tmp_path, server, web, ca).for_mx("example.net", MX, 25, requiretls=False)
    assert result == TlsPolicy(require_tls=True, sources=("dane",))


def test_tlsa_servfail_skips_mx(tmp_path: Path, mx_cert: Issued, ca: TestCA, web: HttpsServer) -> None:
    with ServfailDns(base_zones(mx_cert), dnssec=True) as server:  # RFC 7672 §2.2
        policy = make_policy(tmp_path, server, web, ca)
        with pytest.raises(TlsaUnavailable):
            policy.for_mx("example.net", MX, 25, requiretls=False)


def test_tlsa_servfail_ignored_when_host_insecure(tmp_path: Path, mx_cert: Issued, ca: TestCA,
                                                  web: HttpsServer) -> None:
    with ServfailDns(base_zones(mx_cert), dnssec=False) as server:
        policy = make_policy(tmp_path, server, web, ca, mta_sts=False)
        assert policy.for_mx("example.net", MX, 25, requiretls=False) == TlsPolicy()


def test_requiretls_without_dane_verifies_pkix(tmp_path: Path, mx_cert: Issued, ca: TestCA,
                                               web: HttpsServer) -> None:  # RFC 8689 §4.2.1
    with DnsServer(Zones(), dnssec=False) as server:
        policy = make_policy(tmp_path, server, web, ca)
        assert policy.for_mx("example.org", MX, 25, requiretls=True) == TlsPolicy(
            require_tls=True, verify_certificate=True, sources=("requiretls",))


def test_requiretls_with_dane(tmp_path: Path, mx_cert: Issued, ca: TestCA, web: HttpsServer) -> None:
    with DnsServer(base_zones(mx_cert), dnssec=True) as server:
        result = make_policy(tmp_path, server, web, ca).for_mx("example.net", MX, 25, requiretls=True)
    assert result.require_tls and result.tlsa and not result.verify_certificate
    assert result.sources == ("dane", "requiretls")


def test_config_tls_required(tmp_path: Path, ca: TestCA, web: HttpsServer) -> None:
    with DnsServer(Zones()) as server:
        policy = make_policy(tmp_path, server, web, ca, tls="required")
        assert policy.for_mx("example.org", MX, 25, requiretls=False) == TlsPolicy(
            require_tls=True, sources=("config",))


# -- check_peer over real TLS ------------------------------------------------


def handshake(policy: TransportPolicy, tls_policy: TlsPolicy, port: int, name: str = MX) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return policy.client_context(tls_policy).wrap_socket(sock, server_hostname=name)


@pytest.fixture(scope="module")
def mx_server(mx_cert: Issued) -> Iterator[TlsServer]:
    with TlsServer(mx_cert) as server:
        yield server


@pytest.fixture
def plain_policy(tmp_path: Path, ca: TestCA, web: HttpsServer) -> Iterator[TransportPolicy]:
    with DnsServer(Zones()) as server:
        yield make_policy(tmp_path, server, web, ca)


@pytest.mark.parametrize(("usage", "selector", "mtype"), [(3, 0, 1), (3, 1, 1), (3, 1, 2), (3, 0, 0)])
def test_check_peer_dane_ee(plain_policy: TransportPolicy, mx_server: TlsServer, mx_cert: Issued,
                            usage: int, selector: int, mtype: int) -> None:
    record = Tlsa(*map(int, tlsa_text(mx_cert, usage, selector, mtype).split()[:3]),
                  bytes.fromhex(tlsa_text(mx_cert, usage, selector, mtype).split()[3]))
    tls_policy = TlsPolicy(require_tls=True, tlsa=(record,), sources=("dane",))
    with handshake(plain_policy, tls_policy, mx_server.port) as sock:
        assert plain_policy.check_peer(sock, tls_policy, MX) is None


def test_check_peer_dane_mismatch(plain_policy: TransportPolicy, mx_server: TlsServer, ca: TestCA) -> None:
    other = ca.issue([MX])
    tls_policy = TlsPolicy(True, False, (Tlsa(3, 1, 1, hashlib.sha256(other.spki_der).digest()),), ("dane",))
    with handshake(plain_policy, tls_policy, mx_server.port) as sock:
        reason = plain_policy.check_peer(sock, tls_policy, MX)
    assert reason is not None and "\n" not in reason


def test_check_peer_dane_ta_uses_the_sent_chain(plain_policy: TransportPolicy, mx_server: TlsServer,
                                                ca: TestCA) -> None:  # RFC 7672 §3.1.2
    record = Tlsa(2, 0, 1, hashlib.sha256(ca.intermediate_der).digest())
    tls_policy = TlsPolicy(True, False, (record,), ("dane",))
    with handshake(plain_policy, tls_policy, mx_server.port) as sock:
        assert plain_policy.check_peer(sock, tls_policy, MX) is None
        assert plain_policy.check_peer(sock, tls_policy, "other.example.net") is not None


def test_verify_certificate_pkix(plain_policy: TransportPolicy, mx_server: TlsServer, ca: TestCA,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", ca.cafile)  # the system trust store, here our test root
    tls_policy = TlsPolicy(require_tls=True, verify_certificate=True, sources=("mta-sts",))
    with handshake(plain_policy, tls_policy, mx_server.port) as sock:
        assert plain_policy.check_peer(sock, tls_policy, MX) is None
    with pytest.raises(ssl.SSLCertVerificationError):  # the name is checked in the handshake
        handshake(plain_policy, tls_policy, mx_server.port, name="other.example.net")


def test_verify_certificate_untrusted_fails(tmp_path: Path, mx_server: TlsServer, ca: TestCA,
                                            web: HttpsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", TestCA("unrelated root").cafile)
    with DnsServer(Zones()) as server:
        policy = make_policy(tmp_path, server, web, ca)
    tls_policy = TlsPolicy(require_tls=True, verify_certificate=True)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(policy, tls_policy, mx_server.port)


def test_opportunistic_accepts_any_certificate(plain_policy: TransportPolicy, ca: TestCA) -> None:
    with TlsServer(ca.issue(["whatever.example"], self_signed=True)) as server, \
            handshake(plain_policy, TlsPolicy(), server.port) as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert plain_policy.check_peer(sock, TlsPolicy(), MX) is None
