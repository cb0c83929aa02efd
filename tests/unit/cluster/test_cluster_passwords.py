"""node/auth/passwords.py: argon2id parameters and verification (RFC 9106)."""

from __future__ import annotations

import pytest

from node.auth.passwords import dummy_hash, hash_password, needs_rehash, verify_password


def test_hash_and_verify() -> None:
    encoded = hash_password("correct horse")
    assert encoded.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_password(encoded, "correct horse")
    assert not verify_password(encoded, "correct horsE")
    assert hash_password("correct horse") != encoded  # salted
    assert not needs_rehash(encoded)


def test_malformed_and_foreign_hashes() -> None:
    assert not verify_password("not a hash", "x")
    weaker = "$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHQ$kE1Wn2mSM0aIHIn4ULr6bA"
    assert needs_rehash(weaker)
    assert needs_rehash("garbage")
    assert not verify_password(dummy_hash(), "")


def test_empty_password_refused() -> None:
    with pytest.raises(ValueError):
        hash_password("")
