"""DANE TLSA matching against certificate chains (RFC 7672 §3.1, RFC 6698 §2.1)."""

from __future__ import annotations

import hashlib

import pytest

from node.outbound.dane import Tlsa, authenticate, name_matches, record_matches
from tests.support.https_server import TestCA


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def _data(raw: bytes, mtype: int) -> bytes:
    return {0: raw, 1: hashlib.sha256(raw).digest(), 2: hashlib.sha512(raw).digest()}[mtype]


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_leaf(ca: TestCA, selector: int, mtype: int) -> None:  # RFC 7672 §3.1.1
    leaf = ca.issue(["mx.example.net"])
    raw = leaf.der if selector == 0 else leaf.spki_der
    record = Tlsa(3, selector, mtype, _data(raw, mtype))
    assert record_matches(record, leaf.cert)
    assert authenticate((record,), [leaf.der], "mx.example.net") is None


def test_dane_ee_ignores_name_and_issuer(ca: TestCA) -> None:  # RFC 7672 §3.1.1
    leaf = ca.issue(["unrelated.example"], self_signed=True)
    record = Tlsa(3, 1, 1, hashlib.sha256(leaf.spki_der).digest())
    assert authenticate((record,), [leaf.der], "mx.example.net") is None


def test_dane_ee_mismatch(ca: TestCA) -> None:
    leaf, other = ca.issue(["mx.example.net"]), ca.issue(["mx.example.net"])
    record = Tlsa(3, 1, 1, hashlib.sha256(other.spki_der).digest())
    reason = authenticate((record,), [leaf.der], "mx.example.net")
    assert reason is not None and "mx.example.net" in reason


def test_spki_record_survives_reissue_with_same_key(ca: TestCA) -> None:
    leaf = ca.issue(["mx.example.net"])
    by_cert = Tlsa(3, 0, 1, hashlib.sha256(leaf.der).digest())
    by_key = Tlsa(3, 1, 1, hashlib.sha256(leaf.spki_der).digest())
    other = ca.issue(["mx.example.net"])
    assert record_matches(by_cert, leaf.cert) and record_matches(by_key, leaf.cert)
    assert not record_matches(by_cert, other.cert) and not record_matches(by_key, other.cert)


@pytest.mark.parametrize("usage", [0, 1])
def test_pkix_usages_are_unusable(ca: TestCA, usage: int) -> None:  # RFC 7672 §3.1.3
    leaf = ca.issue(["mx.example.net"])
    record = Tlsa(usage, 0, 1, hashlib.sha256(leaf.der).digest())
    assert not record.usable
    assert authenticate((record,), [leaf.der], "mx.example.net") is not None


def test_unknown_matching_type_unusable(ca: TestCA) -> None:
    leaf = ca.issue(["mx.example.net"])
    assert not Tlsa(3, 0, 3, leaf.der).usable


def test_dane_ta_intermediate_anchor(ca: TestCA) -> None:  # RFC 7672 §3.1.2
    leaf = ca.issue(["mx.example.net"], via_intermediate=True)
    record = Tlsa(2, 1, 1, hashlib.sha256(ca.intermediate.public_key().public_bytes(
        *_spki_args())).digest())
    chain = [leaf.der, ca.intermediate_der]
    assert authenticate((record,), chain, "mx.example.net") is None
    # DANE-TA checks the name (RFC 7672 §3.2.2): another MX name fails.
    assert authenticate((record,), chain, "other.example.net") is not None


def test_dane_ta_root_in_chain(ca: TestCA) -> None:
    leaf = ca.issue(["mx.example.net"], via_intermediate=True)
    record = Tlsa(2, 0, 1, hashlib.sha256(ca.root_der).digest())
    assert authenticate((record,), [leaf.der, ca.intermediate_der, ca.root_der], "mx.example.net") is None


def test_dane_ta_anchor_not_sent_fails(ca: TestCA) -> None:
    leaf = ca.issue(["mx.example.net"], via_intermediate=True)
    record = Tlsa(2, 0, 1, hashlib.sha256(ca.root_der).digest())
    assert authenticate((record,), [leaf.der, ca.intermediate_der], "mx.example.net") is not None


def test_dane_ta_does_not_match_the_leaf_itself(ca: TestCA) -> None:
    leaf = ca.issue(["mx.example.net"], self_signed=True)
    record = Tlsa(2, 0, 1, hashlib.sha256(leaf.der).digest())
    assert authenticate((record,), [leaf.der], "mx.example.net") is not None


def test_no_certificate() -> None:
    assert authenticate((Tlsa(3, 0, 0, b"x"),), [], "mx.example.net") is not None


@pytest.mark.parametrize(
    ("names", "host", "ok"),
    [
        (["mx.example.net"], "mx.example.net", True),
        (["mx.example.net"], "MX.example.net.", True),
        (["*.example.net"], "mx.example.net", True),
        (["*.example.net"], "a.mx.example.net", False),
        (["*.example.net"], "example.net", False),
        (["other.example.net"], "mx.example.net", False),
    ],
)
def test_name_matches(ca: TestCA, names: list[str], host: str, ok: bool) -> None:  # RFC 6125 §6.4
    assert name_matches(ca.issue(names).der, host) is ok


def _spki_args() -> tuple:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
