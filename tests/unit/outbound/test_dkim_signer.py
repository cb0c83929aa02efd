"""node/outbound/dkim.py: keys, TXT records, signing verified by dkimpy, and the
fast RSA path byte-identical to dkimpy's own signer.

The KeySource here is a dict; the real one (cluster/directory.py over etcd)
drives the same Signer in tests/integration/test_dkim_keys.py."""

from __future__ import annotations

import base64
import logging
import time

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.config import DkimSettings
from node.outbound import dkim as pdkim

DOMAIN = "example.test"
MESSAGE = (
    b"Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test,\r\n\tcarol@remote.test\r\n"
    b"Subject: Hello   there \r\n"
    b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <m1@example.test>\r\n"
    b"Comments: not signed\r\n"
    b"\r\n"
    b"Hi Bob,  \r\n\r\nsee you.\r\n\r\n\r\n"
)


@pytest.fixture(scope="module")
def rsa_record() -> dict:
    return pdkim.generate_key(pdkim.RSA)


@pytest.fixture(scope="module")
def ed_record() -> dict:
    return pdkim.generate_key(pdkim.ED25519)


class Keys:
    """A KeySource: active records per domain, with domain and selector set."""

    def __init__(self, *entries: tuple[str, dict]) -> None:
        self.records = [{**r, "domain": DOMAIN, "selector": s} for s, r in entries]

    def dkim_keys(self, domain: str) -> list[dict]:
        return list(self.records) if domain.lower() == DOMAIN else []

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        for r in self.records:
            if name == f"{r['selector']}._domainkey.{DOMAIN}.".encode():
                return pdkim.txt_value(r).encode()
        return None


def _verify_all(signed: bytes, keys: Keys) -> list[bytes]:
    """Verify every signature with dkimpy; returns their selectors, top first."""
    count = signed.count(b"DKIM-Signature:")
    selectors = []
    for idx in range(count):
        verifier = dkim.DKIM(signed)
        assert verifier.verify(idx=idx, dnsfunc=keys.dnsfunc), idx
        selectors.append(verifier.selector)
    return selectors


# -- keys and records --------------------------------------------------------


def test_generated_keys(rsa_record: dict, ed_record: dict) -> None:
    private = serialization.load_pem_private_key(rsa_record["private_key"].encode(), None)
    assert isinstance(private, rsa.RSAPrivateKey)
    assert private.key_size == 2048 and private.public_key().public_numbers().e == 65537
    assert rsa_record["private_key"].startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    # RFC 6376 §3.6.1: p= is the base64 DER SubjectPublicKeyInfo
    public = serialization.load_der_public_key(base64.b64decode(rsa_record["public_key"]))
    assert public.public_numbers() == private.public_key().public_numbers()
    ed = serialization.load_pem_private_key(ed_record["private_key"].encode(), None)
    assert isinstance(ed, ed25519.Ed25519PrivateKey)
    raw = base64.b64decode(ed_record["public_key"])  # RFC 8463 §4.2: raw 32 octets
    assert raw == ed.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert rsa_record["active"] is True and ed_record["algorithm"] == "ed25519-sha256"
    with pytest.raises(pdkim.DkimError, match="unknown DKIM algorithm"):
        pdkim.generate_key("rsa-sha1")  # RFC 8301 §3.1


def test_txt_records(rsa_record: dict, ed_record: dict) -> None:
    assert pdkim.txt_value(ed_record) == f"v=DKIM1; k=ed25519; p={ed_record['public_key']}"
    value = pdkim.txt_value(rsa_record)
    parts = pdkim.split_txt(value)
    assert len(parts) == 2 and all(len(p) <= 255 for p in parts) and "".join(parts) == value
    line = pdkim.zone_line(DOMAIN, "202611r", rsa_record)
    assert line.startswith('202611r._domainkey.example.test. IN TXT "v=DKIM1; k=rsa; p=')
    assert line.count('"') == 4


def test_split_txt_bounds() -> None:
    assert pdkim.split_txt("a" * 255) == ["a" * 255]
    assert pdkim.split_txt("a" * 256) == ["a" * 255, "a"]
    assert pdkim.split_txt("") == [""]


# -- header selection --------------------------------------------------------


def test_header_list_oversigns_from_and_skips_absent() -> None:
    message = dkim.DKIM(MESSAGE)
    include = pdkim.sign_headers_list(message.headers, list(DkimSettings().headers))
    # Present ones, each once per occurrence; From once more (RFC 6376 §8.15).
    assert include == [b"from", b"from", b"to", b"subject", b"date", b"message-id"]
    # From is signed even when not configured; never-sign fields are dropped.
    assert pdkim.sign_headers_list(message.headers, ["received", "subject", "Subject"]) == [
        b"from",
        b"from",
        b"subject",
    ]
    twice = dkim.DKIM(b"From: a@example.test\r\nTo: x@y.test\r\nTo: z@y.test\r\n\r\nb\r\n")
    assert pdkim.sign_headers_list(twice.headers, ["to"]) == [b"from", b"from", b"to", b"to"]


# -- signing -----------------------------------------------------------------


def test_rsa_and_ed25519_both_verify(rsa_record: dict, ed_record: dict) -> None:
    keys = Keys(("s1e", ed_record), ("s1r", rsa_record))
    keys.records.reverse()  # the directory's order: RSA first
    signed = pdkim.Signer(keys, DkimSettings()).sign(MESSAGE, DOMAIN)
    assert signed.endswith(MESSAGE)
    assert _verify_all(signed, keys) == [b"s1r", b"s1e"]  # RSA on top (RFC 8463 §3)
    header = signed.split(b"DKIM-Signature:")[1]
    assert b"c=relaxed/relaxed" in header and b" t=" in header and b" l=" not in header
    assert b"h=from : from : to : subject : date : message-id;" in header.replace(b"\r\n ", b" ")


@pytest.mark.parametrize("algorithm", [pdkim.RSA, pdkim.ED25519])
@pytest.mark.parametrize("fast_rsa", [True, False])
def test_each_algorithm_alone(
    algorithm: str, fast_rsa: bool, rsa_record: dict, ed_record: dict
) -> None:
    keys = Keys(("sel", rsa_record if algorithm == pdkim.RSA else ed_record))
    signed = pdkim.Signer(keys, DkimSettings(fast_rsa=fast_rsa)).sign(MESSAGE, DOMAIN)
    assert signed.count(b"DKIM-Signature:") == 1
    assert f"a={algorithm};".encode() in signed
    assert _verify_all(signed, keys) == [b"sel"]


def test_tampering_breaks_the_signature(rsa_record: dict) -> None:
    keys = Keys(("sel", rsa_record))
    signed = pdkim.Signer(keys, DkimSettings()).sign(MESSAGE, DOMAIN)
    # relaxed/relaxed (RFC 6376 §3.4.2, §3.4.4): refolding and trailing space are fine
    refolded = signed.replace(b"Subject: Hello   there \r\n", b"Subject: Hello\r\n there\r\n")
    assert dkim.verify(refolded, dnsfunc=keys.dnsfunc)
    # an added From (oversigned), a changed Subject or body: all fail
    header_end = signed.index(b"Received:")
    added_from = signed[:header_end] + b"From: mallory@evil.test\r\n" + signed[header_end:]
    for bad in (
        added_from,
        signed.replace(b"Subject: Hello", b"Subject: Jello"),
        signed.replace(b"see you.", b"pay me."),
    ):
        assert not dkim.verify(bad, dnsfunc=keys.dnsfunc)
    # unsigned fields may change
    assert dkim.verify(signed.replace(b"Comments: not", b"Comments: yes"), dnsfunc=keys.dnsfunc)


def test_unchanged_without_keys_or_when_off(rsa_record: dict) -> None:
    keys = Keys(("sel", rsa_record))
    assert pdkim.Signer(keys, DkimSettings(sign=False)).sign(MESSAGE, DOMAIN) == MESSAGE
    assert pdkim.Signer(keys, DkimSettings()).sign(MESSAGE, "remote.test") == MESSAGE


def test_a_broken_key_is_skipped_and_logged(
    ed_record: dict, caplog: pytest.LogCaptureFixture
) -> None:
    broken = {**ed_record, "private_key": "-----BEGIN PRIVATE KEY-----\nnope\n"}
    mismatched = {**ed_record, "algorithm": pdkim.RSA}
    keys = Keys(("bad", broken), ("odd", mismatched), ("good", ed_record))
    with caplog.at_level(logging.ERROR, logger="node.outbound.dkim"):
        signed = pdkim.Signer(keys, DkimSettings()).sign(MESSAGE, DOMAIN)
    assert _verify_all(signed, keys) == [b"good"]
    assert "unreadable private key" in caplog.text and "does not match" in caplog.text
    assert "nope" not in caplog.text  # no key material in logs


def test_loaded_key_repr_hides_secrets(rsa_record: dict) -> None:
    key = pdkim.load_key(DOMAIN, "sel", rsa_record)
    assert "PRIVATE" not in repr(key) and "MII" not in repr(key)


# -- the fast RSA path is dkimpy's output, byte for byte ---------------------


def _both(record: dict, raw: bytes, include: list[str] | None = None) -> tuple[bytes, bytes]:
    key = pdkim.load_key(DOMAIN, "sel", record)
    message = dkim.DKIM(raw)
    names = pdkim.sign_headers_list(message.headers, include or list(DkimSettings().headers))
    slow = pdkim.dkimpy_signature(message, key, names)
    fast = pdkim.fast_rsa_signature(message.headers, message.body, key, names)
    return slow, fast


@pytest.fixture
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_790_000_000.25)


CASES = [
    MESSAGE,
    b"From: a@example.test\r\n\r\n",  # empty body
    b"From: a@example.test\r\nSubject: x\r\n\r\n" + b"long line " * 2000 + b"\r\n",
    b"From: a@example.test\nTo: b@remote.test\nSubject: bare LF\n\nbody\n",
    b"From: =?utf-8?q?J=C3=B6rg?= <j@example.test>\r\nSubject: \xc3\xa4\r\n\r\n\xc3\xa4\r\n",
    b"From: a@example.test\r\nTo: " + b", ".join([b"x@remote.test"] * 60) + b"\r\n\r\nb\r\n",
]


@pytest.mark.parametrize("raw", CASES, ids=range(len(CASES)))
def test_fast_rsa_is_byte_identical(frozen_time: None, rsa_record: dict, raw: bytes) -> None:
    slow, fast = _both(rsa_record, raw)
    assert fast == slow
    assert b"t=1790000000;" in fast


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    subject=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300),
    body=st.binary(max_size=600).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n")),
    selector=st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True),
)
def test_fast_rsa_is_byte_identical_property(
    frozen_time: None, rsa_record: dict, subject: str, body: bytes, selector: str
) -> None:
    raw = f"From: a@example.test\r\nSubject: {subject}\r\n\r\n".encode() + body
    key = pdkim.load_key(DOMAIN, selector, rsa_record)
    message = dkim.DKIM(raw)
    names = pdkim.sign_headers_list(message.headers, ["subject"])
    slow = pdkim.dkimpy_signature(message, key, names)
    assert pdkim.fast_rsa_signature(message.headers, message.body, key, names) == slow


def test_signer_falls_back_when_fast_path_differs(
    rsa_record: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = pdkim.fast_rsa_signature
    monkeypatch.setattr(pdkim, "fast_rsa_signature", lambda *a: real(*a).replace(b"v=1", b"v=1 "))
    keys = Keys(("sel", rsa_record))
    with caplog.at_level(logging.ERROR, logger="node.outbound.dkim"):
        signed = pdkim.Signer(keys, DkimSettings(fast_rsa=True)).sign(MESSAGE, DOMAIN)
    assert "differs from dkimpy" in caplog.text
    assert b"v=1 ;" not in signed and _verify_all(signed, keys) == [b"sel"]
