"""Account quotas in the directory (RFC 9208 STORAGE limit) against a real etcd."""

from __future__ import annotations

import pytest

from cluster.directory import DirectoryError, EtcdDirectory
from cluster.etcd import EtcdSession
from tests.support.etcd import EtcdServer


@pytest.fixture
def directory(etcd_server: EtcdServer) -> EtcdDirectory:
    d = EtcdDirectory(EtcdSession([etcd_server.client_url], "/postroom", 5, 2.0))
    d.add_domain("example.test")
    d.add_user("alice@example.test", "pw-1")
    return d


def test_quota_stored_in_the_account_record(directory: EtcdDirectory) -> None:
    assert directory.get_quota("alice@example.test") == 0
    assert directory.set_quota("Alice@Example.TEST", 5 << 20) == "alice@example.test"
    assert directory.get_quota("alice@example.test") == 5 << 20
    record = directory.session.get("/accounts/alice@example.test").value
    assert record["quota_bytes"] == 5 << 20 and record["password"].startswith("$argon2id$")
    directory.start(watch=False)
    try:
        assert directory.quota("ALICE@example.test") == 5 << 20
        assert directory.quota("nobody@example.test") is None
        assert directory.quota("not an address") is None
    finally:
        directory.stop()


def test_zero_is_unlimited_and_bad_values_refused(directory: EtcdDirectory) -> None:
    directory.set_quota("alice@example.test", 0)
    directory.start(watch=False)
    try:
        assert directory.quota("alice@example.test") is None
    finally:
        directory.stop()
    with pytest.raises(DirectoryError, match="non-negative"):
        directory.set_quota("alice@example.test", -1)
    with pytest.raises(DirectoryError, match="unknown account"):
        directory.set_quota("zed@example.test", 10)
    # Changing the password keeps the quota (the record is updated, not replaced).
    directory.set_quota("alice@example.test", 1234)
    directory.set_password("alice@example.test", "pw-2")
    assert directory.get_quota("alice@example.test") == 1234
