"""cluster/directory.py against a real etcd: admin rules, resolution, auth, watch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from cluster.directory import DirectoryError, EtcdDirectory
from cluster.etcd import EtcdSession
from tests.support.etcd import REPO, EtcdServer, run_patched

MODULE = "tests.integration.test_directory"


@pytest.fixture
def directory(etcd_server: EtcdServer) -> EtcdDirectory:
    d = EtcdDirectory(EtcdSession([etcd_server.client_url], "/postroom", 5, 2.0))
    d.add_domain("example.test")
    d.add_domain("other.test")
    return d


def _loaded(d: EtcdDirectory) -> EtcdDirectory:
    d.start(watch=False)
    return d


def test_domains(directory: EtcdDirectory) -> None:
    assert directory.list_domains() == ["example.test", "other.test"]
    with pytest.raises(DirectoryError, match="already exists"):
        directory.add_domain("EXAMPLE.test.")
    with pytest.raises(DirectoryError, match="not a valid domain"):
        directory.add_domain("no_dots")
    with pytest.raises(DirectoryError, match="unknown domain"):
        directory.remove_domain("nope.test")
    assert directory.add_domain("bücher.test") == "xn--bcher-kva.test"
    directory.remove_domain("bücher.test")
    assert "xn--bcher-kva.test" not in directory.list_domains()


def test_domain_removal_refused_while_in_use(directory: EtcdDirectory) -> None:
    directory.add_user("a@other.test", "pw")
    with pytest.raises(DirectoryError, match="1 account"):
        directory.remove_domain("other.test")
    directory.remove_user("a@other.test")
    directory.add_alias("@other.test", ["x@example.test"])
    with pytest.raises(DirectoryError, match="1 alias"):
        directory.remove_domain("other.test")
    directory.remove_alias("@other.test")
    directory.remove_domain("other.test")
    assert directory.list_domains() == ["example.test"]


def test_users(directory: EtcdDirectory) -> None:
    assert directory.add_user("Alice@Example.TEST", "s3cret") == "alice@example.test"
    with pytest.raises(DirectoryError, match="already exists"):
        directory.add_user("alice@example.test", "x")
    with pytest.raises(DirectoryError, match="unknown domain"):
        directory.add_user("bob@nowhere.test", "x")
    with pytest.raises(DirectoryError, match="not a valid address"):
        directory.add_user("no-at-sign", "x")
    with pytest.raises(DirectoryError, match="empty password"):
        directory.add_user("carol@example.test", "")
    directory.add_user("bob@other.test", "pw")
    assert directory.list_users() == ["alice@example.test", "bob@other.test"]
    assert directory.list_users("other.test") == ["bob@other.test"]
    kv = directory.session.get("/accounts/alice@example.test")
    assert kv.value["password"].startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert "s3cret" not in str(kv.value)
    with pytest.raises(DirectoryError, match="unknown account"):
        directory.set_password("zed@example.test", "x")
    with pytest.raises(DirectoryError, match="unknown account"):
        directory.remove_user("zed@example.test")
    directory.remove_user("bob@other.test")
    assert directory.list_users() == ["alice@example.test"]


def test_authenticate(directory: EtcdDirectory) -> None:
    directory.add_user("alice@example.test", "right")
    d = _loaded(directory)
    assert d.authenticate("ALICE@example.test", "right") == "alice@example.test"
    assert d.authenticate("alice@example.test", "wrong") is None
    assert d.authenticate("nobody@example.test", "right") is None
    assert d.authenticate("not an address", "right") is None
    assert d.authenticate("alice@example.test", "x" * 10000) is None
    directory.set_password("alice@example.test", "new")
    d.start(watch=False)  # reload (no watch in this test)
    assert d.authenticate("alice@example.test", "right") is None
    assert d.authenticate("alice@example.test", "new") == "alice@example.test"


def test_aliases_and_catch_all(directory: EtcdDirectory) -> None:
    for user in ("alice", "bob", "carol"):
        directory.add_user(f"{user}@example.test", "pw")
    directory.add_alias("team@example.test", ["alice@example.test", "Bob@example.test"])
    directory.add_alias("all@example.test", ["team@example.test", "carol@example.test"])
    directory.add_alias("ext@example.test", ["someone@elsewhere.test", "carol@example.test"])
    directory.add_alias("loop1@example.test", ["loop2@example.test", "alice@example.test"])
    directory.add_alias("loop2@example.test", ["loop1@example.test"])
    directory.add_alias("onlyext@example.test", ["someone@elsewhere.test"])
    with pytest.raises(DirectoryError, match="already exists"):
        directory.add_alias("team@example.test", ["carol@example.test"])
    with pytest.raises(DirectoryError, match="unknown domain"):
        directory.add_alias("x@nowhere.test", ["alice@example.test"])
    with pytest.raises(DirectoryError, match="not a valid address"):
        directory.add_alias("x@example.test", ["not-an-address"])
    with pytest.raises(DirectoryError, match="account with this address"):
        directory.add_alias("alice@example.test", ["bob@example.test"])
    with pytest.raises(DirectoryError, match="alias with this address"):
        directory.add_user("team@example.test", "pw")
    d = _loaded(directory)
    assert d.resolve_recipient("alice@example.test") == ["alice@example.test"]
    assert d.resolve_recipient("ALICE@EXAMPLE.TEST") == ["alice@example.test"]
    assert d.resolve_recipient("team@example.test") == ["alice@example.test", "bob@example.test"]
    assert d.resolve_recipient("all@example.test") == [
        "alice@example.test",
        "bob@example.test",
        "carol@example.test",
    ]
    assert d.resolve_recipient("ext@example.test") == ["carol@example.test"]
    assert d.resolve_recipient("loop1@example.test") == ["alice@example.test"]
    assert d.resolve_recipient("onlyext@example.test") is None
    assert d.resolve_recipient("nobody@example.test") is None
    assert d.resolve_recipient("alice@elsewhere.test") is None
    assert d.resolve_recipient("garbage") is None
    # Catch-all: exact alias first, then account, then @domain.
    directory.add_alias("@example.test", ["carol@example.test"])
    d.start(watch=False)
    assert d.resolve_recipient("nobody@example.test") == ["carol@example.test"]
    assert d.resolve_recipient("alice@example.test") == ["alice@example.test"]
    assert d.resolve_recipient("team@example.test") == ["alice@example.test", "bob@example.test"]
    assert d.is_local_domain("Example.Test") and not d.is_local_domain("elsewhere.test")
    assert d.account_exists("Bob@example.test") and not d.account_exists("team@example.test")
    assert directory.list_aliases()["@example.test"] == ["carol@example.test"]


def test_postmaster_never_unknown(directory: EtcdDirectory) -> None:
    # RFC 5321 §4.5.1: postmaster@ every local domain must be deliverable.
    d = _loaded(directory)
    assert d.resolve_recipient("postmaster@example.test") == []  # no accounts at all
    directory.add_user("zed@other.test", "pw")
    directory.add_user("amy@other.test", "pw")  # created later than zed
    d.start(watch=False)
    assert d.resolve_recipient("Postmaster@example.test") == ["zed@other.test"]  # oldest anywhere
    directory.add_user("bea@example.test", "pw")
    directory.add_user("abe@example.test", "pw")
    d.start(watch=False)
    assert d.resolve_recipient("postmaster@example.test") == ["bea@example.test"]  # oldest here
    directory.add_user("postmaster@example.test", "pw")  # first local domain, sorted
    d.start(watch=False)
    assert d.resolve_recipient("postmaster@other.test") == ["postmaster@example.test"]
    directory.add_alias("postmaster@other.test", ["amy@other.test"])
    d.start(watch=False)
    assert d.resolve_recipient("postmaster@other.test") == ["amy@other.test"]


def scenario_running_directory_sees_cli_changes(url: str, config_path: str) -> None:
    d = EtcdDirectory(EtcdSession([url], "/postroom", 5, 2.0))
    d.start()
    assert not d.account_exists("new@example.test")

    def cli(*args: str, stdin: str = "") -> None:
        result = subprocess.run(
            [sys.executable, "-m", "node", "--config", config_path, *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=str(REPO),
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

    def wait(predicate, what: str) -> None:
        deadline = time.monotonic() + 15
        while not predicate():
            assert time.monotonic() < deadline, f"running directory never saw {what}"
            gevent.sleep(0.01)

    cli("user", "add", "new@example.test", stdin="pw1\n")
    wait(lambda: d.account_exists("new@example.test"), "user add")
    assert d.authenticate("new@example.test", "pw1") == "new@example.test"
    cli("user", "passwd", "new@example.test", stdin="pw2\n")
    wait(lambda: d.authenticate("new@example.test", "pw2") is not None, "passwd")
    cli("alias", "add", "@example.test", "new@example.test")
    wait(lambda: d.resolve_recipient("x@example.test") == ["new@example.test"], "alias add")
    cli("domain", "add", "third.test")
    wait(lambda: d.is_local_domain("third.test"), "domain add")
    cli("user", "remove", "new@example.test")
    wait(lambda: not d.account_exists("new@example.test"), "user remove")
    d.stop()


def test_running_directory_sees_cli_changes(
    directory: EtcdDirectory, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    config = tmp_path / "postroom.toml"
    config.write_text(f'[etcd]\nendpoints = ["{etcd_server.client_url}"]\n')
    run_patched(
        MODULE, "scenario_running_directory_sees_cli_changes", etcd_server.client_url, str(config)
    )
