"""Sans-I/O SASL server mechanisms: PLAIN, LOGIN, SCRAM-SHA-256.

Theory of operation
-------------------
A mechanism is a small state machine.  ``start(initial_response)`` and
``step(client_response)`` take the *decoded* client data (the protocol layer
does base64, RFC 4954 §4 / RFC 3501 §6.2.2) and return one of:

* ``Challenge(data)`` — send it, feed the client's answer to ``step``;
* ``Success(account, data)`` — authenticated; ``data`` is the server's
  "additional data with success" (SCRAM's server-final message), which SMTP
  sends as one more 334 challenge answered by an empty line (RFC 4954 §4);
* ``Failure(reason)`` — refused; ``reason`` is for the log only, never for
  the peer.

Checking a password is a callback (``verify(username, password) -> account
or None``), so the directory can hash off the gevent hub.  SCRAM needs the
stored credentials instead (``lookup(username) -> ScramCredentials or None``);
the server never sees the password.  Unknown users and accounts without SCRAM
credentials get a made-up salt derived from a per-process secret, so the
exchange looks the same and fails only at the proof (RFC 5802 §9).

This module does no I/O and imports nothing from gevent, socket, storage or
cluster; it is reused by IMAP AUTHENTICATE and POP3 AUTH.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

MECHANISMS = ("PLAIN", "LOGIN", "SCRAM-SHA-256")
SCRAM_ITERATIONS = 4096  # RFC 7677 §4 minimum; what clients and Dovecot expect
SCRAM_SALT_BYTES = 16
MAX_RESPONSE = 12288  # octets of one decoded client response (RFC 4954 §4 line limit)
_MAX_ITERATIONS = 1_000_000


@dataclass(frozen=True)
class Challenge:
    data: bytes


@dataclass(frozen=True)
class Success:
    account: str
    data: bytes | None = None  # additional data with success (SCRAM server-final)


@dataclass(frozen=True)
class Failure:
    reason: str  # for the log only


Step = Challenge | Success | Failure


@dataclass(frozen=True)
class ScramCredentials:
    """What the server stores for SCRAM-SHA-256 (RFC 5802 §3): never the password."""

    account: str
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def __repr__(self) -> str:  # keys are password equivalents for this mechanism
        return f"ScramCredentials({self.account!r}, iterations={self.iterations}, <redacted>)"


Verify = Callable[[str, str], "str | None"]
Lookup = Callable[[str], "ScramCredentials | None"]


# -- SASLprep (RFC 4013, a profile of stringprep RFC 3454) --------------------

_PROHIBITED = (
    stringprep.in_table_c12,  # non-ASCII space
    stringprep.in_table_c21_c22,  # control characters
    stringprep.in_table_c3,  # private use
    stringprep.in_table_c4,  # non-character code points
    stringprep.in_table_c5,  # surrogates
    stringprep.in_table_c6,  # inappropriate for plain text
    stringprep.in_table_c7,  # inappropriate for canonical representation
    stringprep.in_table_c8,  # change display properties / deprecated
    stringprep.in_table_c9,  # tagging characters
)


class SaslPrepError(ValueError):
    """The string contains characters SASLprep prohibits."""


def saslprep(text: str, *, allow_unassigned: bool = True) -> str:
    """RFC 4013 §2: map, NFKC-normalise, prohibit, check bidi.

    Queries (what a client sends) may contain unassigned code points; stored
    strings may not (RFC 3454 §7), hence ``allow_unassigned=False`` when the
    password is set.
    """
    # §2.1 mapping: non-ASCII space -> SPACE; "commonly mapped to nothing" -> removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    normal = unicodedata.normalize("NFKC", mapped)  # §2.2
    if not normal:
        return normal
    for c in normal:
        if any(table(c) for table in _PROHIBITED):  # §2.3
            raise SaslPrepError("prohibited character")
        if not allow_unassigned and stringprep.in_table_a1(c):
            raise SaslPrepError("unassigned code point")
    # §2.4 / RFC 3454 §6: bidirectional text.
    if any(stringprep.in_table_d1(c) for c in normal):
        if any(stringprep.in_table_d2(c) for c in normal):
            raise SaslPrepError("mixed bidirectional text")
        if not (stringprep.in_table_d1(normal[0]) and stringprep.in_table_d1(normal[-1])):
            raise SaslPrepError("RandALCat text must start and end with RandALCat")
    return normal


# -- SCRAM primitives (RFC 5802 §3) -------------------------------------------


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """Hi(Normalize(password), salt, i) = PBKDF2-HMAC-SHA-256."""
    return hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)


def derive_scram(
    account: str, password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> ScramCredentials:
    """StoredKey and ServerKey for ``password`` (CPU: one PBKDF2 of ``iterations``)."""
    saslprep(password, allow_unassigned=False)  # refuse what a client could never send
    salt = salt if salt is not None else secrets.token_bytes(SCRAM_SALT_BYTES)
    salted = salted_password(password, salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return ScramCredentials(
        account=account,
        salt=salt,
        iterations=iterations,
        stored_key=hashlib.sha256(client_key).digest(),
        server_key=_hmac(salted, b"Server Key"),
    )


def scram_to_record(creds: ScramCredentials) -> dict[str, object]:
    """The JSON form kept in the account record (base64 fields)."""
    b64 = base64.b64encode
    return {
        "salt": b64(creds.salt).decode(),
        "iterations": creds.iterations,
        "stored_key": b64(creds.stored_key).decode(),
        "server_key": b64(creds.server_key).decode(),
    }


def scram_from_record(account: str, record: object) -> ScramCredentials | None:
    """Inverse of ``scram_to_record``; None when absent or malformed."""
    if not isinstance(record, dict):
        return None
    try:
        iterations = int(record["iterations"])
        creds = ScramCredentials(
            account=account,
            salt=base64.b64decode(record["salt"], validate=True),
            iterations=iterations,
            stored_key=base64.b64decode(record["stored_key"], validate=True),
            server_key=base64.b64decode(record["server_key"], validate=True),
        )
    except (KeyError, TypeError, ValueError):
        return None
    if not (1 <= iterations <= _MAX_ITERATIONS) or len(creds.stored_key) != 32:
        return None
    return creds


# -- mechanisms -----------------------------------------------------------------


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Plain:
    """PLAIN (RFC 4616): ``[authzid] NUL authcid NUL passwd`` in one message."""

    name = "PLAIN"

    def __init__(self, verify: Verify) -> None:
        self._verify = verify
        self._done = False

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")  # RFC 4616 §2: empty challenge, client sends the message
        return self.step(initial)

    def step(self, response: bytes) -> Step:
        if self._done:
            return Failure("exchange already finished")
        self._done = True
        text = _utf8(response)
        if text is None or len(response) > MAX_RESPONSE:
            return Failure("PLAIN message not UTF-8 or too long")
        parts = text.split("\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return Failure("malformed PLAIN message")  # RFC 4616 §2 grammar
        authzid, authcid, passwd = parts
        account = self._verify(authcid, passwd)
        if account is None:
            return Failure(f"bad credentials for {authcid!r}")
        if authzid and authzid.lower() != account.lower() and authzid.lower() != authcid.lower():
            return Failure(f"{authcid!r} may not act as {authzid!r}")  # RFC 4616 §2 authorization
        return Success(account)


class Login:
    """LOGIN (draft-murchison-sasl-login-00): "Username:" then "Password:"."""

    name = "LOGIN"

    def __init__(self, verify: Verify) -> None:
        self._verify = verify
        self._user: str | None = None
        self._done = False

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.step(initial)  # some clients send the user name as initial response

    def step(self, response: bytes) -> Step:
        if self._done:
            return Failure("exchange already finished")
        text = _utf8(response)
        if text is None or "\0" in text or len(response) > MAX_RESPONSE:
            self._done = True
            return Failure("LOGIN response not UTF-8, has NUL or too long")
        if self._user is None:
            if not text:
                self._done = True
                return Failure("empty user name")
            self._user = text
            return Challenge(b"Password:")
        self._done = True
        account = self._verify(self._user, text)
        if account is None:
            return Failure(f"bad credentials for {self._user!r}")
        return Success(account)


def _decode_saslname(name: str) -> str | None:
    """RFC 5802 §5.1: "=2C" is ",", "=3D" is "=", any other "=" is an error."""
    out, i = [], 0
    while i < len(name):
        c = name[i]
        if c == "=":
            code = name[i + 1 : i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                return None
            i += 3
            continue
        if c == ",":
            return None
        out.append(c)
        i += 1
    return "".join(out)


_PRINTABLE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {","}  # RFC 5802 §7 printable


class ScramSha256:
    """SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding.

    The gs2 header must be "n" or "y" (the client supports channel binding
    but we advertise no -PLUS variant, so "y" is fine, RFC 5802 §6); "p="
    fails.  An authzid, if any, must name the authenticated user.
    """

    name = "SCRAM-SHA-256"

    def __init__(
        self, lookup: Lookup, *, nonce: Callable[[], str] | None = None, secret: bytes = b""
    ) -> None:
        self._lookup = lookup
        self._nonce = nonce or (lambda: base64.b64encode(secrets.token_bytes(18)).decode())
        self._secret = secret or _PROCESS_SECRET
        self._state = "start"
        self._gs2 = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._combined_nonce = ""
        self._creds: ScramCredentials | None = None
        self._username = ""

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            self._state = "wait-first"
            return Challenge(b"")  # RFC 4954 §4: client sends client-first next
        return self._client_first(initial)

    def step(self, response: bytes) -> Step:
        if self._state == "wait-first":
            return self._client_first(response)
        if self._state == "wait-final":
            return self._client_final(response)
        self._state = "done"
        return Failure("exchange already finished")

    def _fail(self, reason: str) -> Failure:
        self._state = "done"
        return Failure(reason)

    def _client_first(self, data: bytes) -> Step:
        text = _utf8(data)
        if text is None or len(data) > MAX_RESPONSE:
            return self._fail("client-first not UTF-8 or too long")
        # gs2-header = gs2-cbind-flag "," [ authzid ] ","   (RFC 5802 §7)
        parts = text.split(",", 2)
        if len(parts) != 3:
            return self._fail("malformed client-first")
        cbind, authz, bare = parts
        if cbind.startswith("p="):
            return self._fail("channel binding requested but not supported")
        if cbind not in ("n", "y"):
            return self._fail("bad gs2-cbind-flag")
        authzid = None
        if authz:
            if not authz.startswith("a="):
                return self._fail("bad authzid")
            authzid = _decode_saslname(authz[2:])
            if authzid is None:
                return self._fail("bad authzid saslname")
        attrs = bare.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            return self._fail("client-first needs n= and r=")
        if bare.startswith("m=") or any(a.startswith("m=") for a in attrs[2:]):
            return self._fail("mandatory extension not supported")  # RFC 5802 §5.1 m=
        username = _decode_saslname(attrs[0][2:])
        client_nonce = attrs[1][2:]
        if not username or not client_nonce or not set(client_nonce) <= _PRINTABLE:
            return self._fail("bad username or nonce")
        try:
            username = saslprep(username)
        except SaslPrepError:
            return self._fail("username fails SASLprep")
        self._gs2 = f"{cbind},{authz},"
        self._client_first_bare = bare
        self._username = username
        creds = self._lookup(username)
        if creds is not None and authzid and authzid.lower() not in (
            creds.account.lower(), username.lower()
        ):
            creds = None  # may not act as someone else: fail at the proof
        self._creds = creds
        salt, iterations = (
            (creds.salt, creds.iterations) if creds is not None else self._fake_salt(username)
        )
        self._combined_nonce = client_nonce + self._nonce()
        self._server_first = (
            f"r={self._combined_nonce},s={base64.b64encode(salt).decode()},i={iterations}"
        )
        self._state = "wait-final"
        return Challenge(self._server_first.encode())

    def _fake_salt(self, username: str) -> tuple[bytes, int]:
        """The same made-up salt for the same unknown name (RFC 5802 §9)."""
        return _hmac(self._secret, username.lower().encode())[:SCRAM_SALT_BYTES], SCRAM_ITERATIONS

    def _client_final(self, data: bytes) -> Step:
        text = _utf8(data)
        if text is None or len(data) > MAX_RESPONSE:
            return self._fail("client-final not UTF-8 or too long")
        without_proof, sep, proof_attr = text.rpartition(",p=")
        if not sep:
            return self._fail("client-final without proof")
        attrs = without_proof.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("c=") or not attrs[1].startswith("r="):
            return self._fail("client-final needs c= and r=")
        if attrs[0][2:] != base64.b64encode(self._gs2.encode()).decode():
            return self._fail("channel binding data does not match the gs2 header")
        if attrs[1][2:] != self._combined_nonce:
            return self._fail("nonce mismatch")
        try:
            proof = base64.b64decode(proof_attr, validate=True)
        except ValueError:
            return self._fail("proof not base64")
        creds = self._creds
        if creds is None:
            return self._fail(f"no SCRAM credentials for {self._username!r}")
        auth_message = ",".join(
            (self._client_first_bare, self._server_first, without_proof)
        ).encode()
        client_signature = _hmac(creds.stored_key, auth_message)
        if len(proof) != len(client_signature):
            return self._fail("proof has the wrong length")
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), creds.stored_key):
            return self._fail(f"bad proof for {self._username!r}")
        server_signature = _hmac(creds.server_key, auth_message)
        self._state = "done"
        return Success(creds.account, b"v=" + base64.b64encode(server_signature))


_PROCESS_SECRET = secrets.token_bytes(32)

Mechanism = Plain | Login | ScramSha256


def make_mechanism(name: str, verify: Verify, lookup: Lookup) -> Mechanism | None:
    """A fresh server mechanism for ``name`` (case-insensitive), or None if unknown."""
    upper = name.upper()
    if upper == "PLAIN":
        return Plain(verify)
    if upper == "LOGIN":
        return Login(verify)
    if upper == "SCRAM-SHA-256":
        return ScramSha256(lookup)
    return None
