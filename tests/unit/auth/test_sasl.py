"""SASL server mechanisms (node/auth/sasl.py) against the RFC examples."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.auth import sasl
from node.auth.sasl import Challenge, Failure, Success

USERS = {"tim": "tanstaaflthx", "user": "pencil"}

# RFC 7677 §3 example exchange, byte for byte.
RFC7677_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC7677_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC7677_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC7677_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC7677_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC7677_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def verify(user: str, password: str) -> str | None:
    return user if USERS.get(user) == password else None


CREDS = {"user": sasl.derive_scram("user", "pencil", salt=RFC7677_SALT)}


def lookup(user: str) -> sasl.ScramCredentials | None:
    return CREDS.get(user)


def scram(nonce: str = RFC7677_SERVER_NONCE) -> sasl.ScramSha256:
    return sasl.ScramSha256(lookup, nonce=lambda: nonce)


# -- PLAIN (RFC 4616) -----------------------------------------------------------


def test_plain_rfc4616_examples():  # RFC 4616 §4
    assert sasl.Plain(verify).start(b"\0tim\0tanstaaflthx") == Success("tim")
    assert sasl.Plain(verify).start(b"tim\0tim\0tanstaaflthx") == Success("tim")
    assert isinstance(sasl.Plain(verify).start(b"Ursel\0Kurt\0xipj3plmq"), Failure)


def test_plain_without_initial_response_gets_empty_challenge():
    mech = sasl.Plain(verify)
    assert mech.start(None) == Challenge(b"")
    assert mech.step(b"\0user\0pencil") == Success("user")
    assert isinstance(mech.step(b"\0user\0pencil"), Failure)  # finished


@pytest.mark.parametrize("message", [
    b"", b"\0", b"\0\0", b"\0user\0", b"\0\0pencil", b"user\0pencil", b"\0user\0pencil\0x",
    b"\0user\0\xff", b"other\0user\0pencil",  # authzid not the user: RFC 4616 §2
])
def test_plain_refuses(message):
    assert isinstance(sasl.Plain(verify).start(message), Failure)


# -- LOGIN ----------------------------------------------------------------------


def test_login_exchange():
    mech = sasl.Login(verify)
    assert mech.start(None) == Challenge(b"Username:")
    assert mech.step(b"tim") == Challenge(b"Password:")
    assert mech.step(b"tanstaaflthx") == Success("tim")


def test_login_with_initial_user_and_wrong_password():
    mech = sasl.Login(verify)
    assert mech.start(b"tim") == Challenge(b"Password:")
    assert isinstance(mech.step(b"nope"), Failure)
    assert isinstance(mech.step(b"tanstaaflthx"), Failure)  # no second try in one exchange


# -- SCRAM-SHA-256 (RFC 5802, RFC 7677) -------------------------------------------


def test_scram_sha256_rfc7677_example_exchange():  # RFC 7677 §3
    mech = scram()
    assert mech.start(RFC7677_CLIENT_FIRST) == Challenge(RFC7677_SERVER_FIRST)
    assert mech.step(RFC7677_CLIENT_FINAL) == Success("user", RFC7677_SERVER_FINAL)


def test_scram_without_initial_response():
    mech = scram()
    assert mech.start(None) == Challenge(b"")
    assert mech.step(RFC7677_CLIENT_FIRST) == Challenge(RFC7677_SERVER_FIRST)
    assert mech.step(RFC7677_CLIENT_FINAL) == Success("user", RFC7677_SERVER_FINAL)


def test_derived_credentials_match_rfc5802_definitions():  # RFC 5802 §3
    creds = CREDS["user"]
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC7677_SALT, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert creds.stored_key == hashlib.sha256(client_key).digest()
    assert creds.server_key == hmac.new(salted, b"Server Key", "sha256").digest()
    assert creds.iterations >= 4096
    assert "pencil" not in repr(creds) and creds.stored_key.hex() not in repr(creds)
    again = sasl.scram_from_record("user", sasl.scram_to_record(creds))
    assert again == creds


def test_scram_wrong_password_fails_at_proof():
    creds = sasl.derive_scram("user", "not-pencil", salt=RFC7677_SALT)
    mech = sasl.ScramSha256(lambda u: creds, nonce=lambda: RFC7677_SERVER_NONCE)
    assert mech.start(RFC7677_CLIENT_FIRST) == Challenge(RFC7677_SERVER_FIRST)
    assert isinstance(mech.step(RFC7677_CLIENT_FINAL), Failure)


def test_scram_unknown_user_gets_stable_fake_salt():  # RFC 5802 §9: no user enumeration
    first = scram().start(b"n,,n=nobody,r=abc")
    second = scram().start(b"n,,n=nobody,r=abc")
    assert isinstance(first, Challenge) and first == second
    assert b",i=4096" in first.data
    mech = scram()
    mech.start(b"n,,n=nobody,r=abc")
    assert isinstance(mech.step(b"c=biws,r=abc" + RFC7677_SERVER_NONCE.encode() + b",p=AAAA"),
                      Failure)


@pytest.mark.parametrize("client_first", [
    b"p=tls-unique,,n=user,r=abc",  # RFC 5802 §6: we support no channel binding
    b"x,,n=user,r=abc",
    b"n,,m=ext,n=user,r=abc",  # mandatory extension we do not know (§5.1)
    b"n,,n=us=2Xer,r=abc",  # bad saslname escape (§5.1)
    b"n,,r=abc,n=user",
    b"n,,n=user",
    b"n,,n=,r=abc",
    b"n,x=y,n=user,r=abc",
    b"n,,n=user,r=a\x7fb",  # nonce must be printable (§7)
])
def test_scram_bad_client_first(client_first):
    assert isinstance(scram().start(client_first), Failure)


def test_scram_optional_extensions_after_nonce_allowed():  # RFC 5802 §7 client-first
    assert isinstance(scram().start(b"n,,n=user,r=abc,x=ext"), Challenge)


def test_scram_y_flag_accepted_and_bound_in_c():  # RFC 5802 §6: "y" when no -PLUS is offered
    mech = scram()
    assert isinstance(mech.start(b"y,,n=user,r=rOprNGfwEbeRWgbNEkqO"), Challenge)
    # c= must carry "y,," (eSws), so the RFC's final message (c=biws) fails.
    assert isinstance(mech.step(RFC7677_CLIENT_FINAL), Failure)


@pytest.mark.parametrize("final", [
    RFC7677_CLIENT_FINAL.replace(b"c=biws", b"c=eSws"),  # gs2 header mismatch
    RFC7677_CLIENT_FINAL.replace(b"hNlF$k0", b"hNlF$k1"),  # nonce mismatch
    RFC7677_CLIENT_FINAL.replace(b"p=dHzb", b"p=dHzc"),  # proof changed
    RFC7677_CLIENT_FINAL.split(b",p=")[0],  # no proof
    RFC7677_CLIENT_FINAL.replace(b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=", b"p=!!"),
    RFC7677_CLIENT_FINAL.replace(b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=", b"p=AAAA"),
])
def test_scram_bad_client_final(final):
    mech = scram()
    mech.start(RFC7677_CLIENT_FIRST)
    assert isinstance(mech.step(final), Failure)


def test_scram_authzid_must_be_the_user():  # RFC 5802 §5.1 a=
    assert client_exchange("user", "pencil") == Success("user", client_exchange.last_v)
    assert isinstance(client_exchange("user", "pencil", authzid="user"), Success)
    assert isinstance(client_exchange("user", "pencil", authzid="admin"), Failure)


def client_exchange(user: str, password: str, authzid: str = "") -> sasl.Step:
    """A minimal RFC 5802 client, run against the server mechanism."""
    gs2 = f"n,{'a=' + authzid if authzid else ''},"
    bare = f"n={user},r=clientnonce123"
    mech = scram("servernonce")
    first = mech.start((gs2 + bare).encode())
    if not isinstance(first, Challenge):
        return first
    attrs = dict(a.split("=", 1) for a in first.data.decode().split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                 int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    without_proof = f"c={base64.b64encode(gs2.encode()).decode()},r={attrs['r']}"
    auth_message = f"{bare},{first.data.decode()},{without_proof}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    client_exchange.last_v = b"v=" + base64.b64encode(  # type: ignore[attr-defined]
        hmac.new(server_key, auth_message, "sha256").digest())
    return mech.step(f"{without_proof},p={base64.b64encode(proof).decode()}".encode())


def test_scram_saslprep_of_password():  # RFC 4013 §3: U+00AD maps to nothing, U+2168 -> "IX"
    CREDS["ix"] = sasl.derive_scram("ix", "I\u00adX", salt=b"0123456789abcdef")
    try:
        assert isinstance(client_exchange("ix", "IX"), Success)
    finally:
        del CREDS["ix"]
    assert sasl.saslprep("\u2168") == "IX"
    assert sasl.saslprep("user") == "user"
    assert sasl.saslprep("\u00aa") == "a"
    with pytest.raises(sasl.SaslPrepError):
        sasl.saslprep("\u0007")  # RFC 4013 §3 example: prohibited control
    with pytest.raises(sasl.SaslPrepError):
        sasl.saslprep("\u0627\u0031")  # RFC 4013 §3: bidi check
    with pytest.raises(ValueError):
        sasl.derive_scram("x", "a\u0007b")


def test_make_mechanism():
    assert isinstance(sasl.make_mechanism("plain", verify, lookup), sasl.Plain)
    assert isinstance(sasl.make_mechanism("LOGIN", verify, lookup), sasl.Login)
    assert isinstance(sasl.make_mechanism("scram-sha-256", verify, lookup), sasl.ScramSha256)
    assert sasl.make_mechanism("CRAM-MD5", verify, lookup) is None


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_any_input_gives_a_step_never_an_exception(first, second):
    for mech in (sasl.Plain(verify), sasl.Login(verify), scram()):
        step = mech.start(first)
        assert isinstance(step, Challenge | Success | Failure)
        if isinstance(step, Challenge):
            assert isinstance(mech.step(second), Challenge | Success | Failure)
