"""The postroom CLI against a real etcd.

Happy paths call node.cli.main in-process (the CLI needs no greenlets); every
error case runs `python -m node` as an operator would, to check the exit
status and that stderr is exactly one line without a traceback.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.etcd import EtcdSession
from cluster.membership import Membership
from node import cli
from tests.support.etcd import REPO, EtcdServer, free_port


def _run(config: Path | None, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("POSTROOM_CONFIG", None)
    argv = [sys.executable, "-m", "node"]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(
        [*argv, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env=env,
        timeout=60,
    )


class _Main:
    """main() in-process: returns (status, stdout); stdin as given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
        self.monkeypatch = monkeypatch
        self.capsys = capsys

    def __call__(self, config: Path, *args: str, stdin: str = "") -> tuple[int, str]:
        self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        self.capsys.readouterr()
        status = cli.main(["--config", str(config), *args])
        out, err = self.capsys.readouterr()
        assert status == 0 or err.startswith("postroom: error: "), err
        return status, out


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> _Main:
    return _Main(monkeypatch, capsys)


def _assert_one_line_error(result: subprocess.CompletedProcess, status: int, text: str) -> None:
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("postroom: error: "), result.stderr
    assert text in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def config(etcd_server: EtcdServer, tmp_path: Path) -> Path:
    path = tmp_path / "postroom.toml"
    path.write_text(f'[etcd]\nendpoints = ["{etcd_server.client_url}"]\nprefix = "/cli"\n')
    return path


def test_directory_commands(config: Path, main: _Main) -> None:
    assert main(config, "domain", "add", "Example.Test") == (0, "added domain example.test\n")
    assert main(config, "user", "add", "Alice@example.test", stdin="pw\n")[0] == 0
    assert main(config, "user", "add", "bob@example.test", stdin="pw\n")[0] == 0
    assert main(config, "alias", "add", "team@example.test", "alice@example.test",
                "bob@example.test")[0] == 0  # fmt: skip
    assert main(config, "alias", "add", "@example.test", "alice@example.test")[0] == 0
    assert main(config, "domain", "list") == (0, "example.test\n")
    assert main(config, "user", "list") == (0, "alice@example.test\nbob@example.test\n")
    assert main(config, "user", "list", "example.test")[1].count("\n") == 2
    assert main(config, "alias", "list") == (
        0,
        "@example.test -> alice@example.test\n"
        "team@example.test -> alice@example.test, bob@example.test\n",
    )
    assert main(config, "user", "passwd", "bob@example.test", stdin="new\r\n")[0] == 0
    status, out = main(config, "status")
    assert status == 0
    assert "etcd: reachable" in out
    assert "domains: 1  accounts: 2  aliases: 2" in out
    _assert_one_line_error(_run(config, "domain", "remove", "example.test"), 1, "remove them first")
    for args in (
        ("alias", "remove", "team@example.test"),
        ("alias", "remove", "@example.test"),
        ("user", "remove", "alice@example.test"),
        ("user", "remove", "bob@example.test"),
        ("domain", "remove", "example.test"),
    ):
        assert main(config, *args)[0] == 0
    assert main(config, "domain", "list") == (0, "")


def test_status_lists_members(config: Path, etcd_server: EtcdServer, main: _Main) -> None:
    session = EtcdSession([etcd_server.client_url], "/cli", 10, 2.0)
    member = Membership(session, "node-a", {"listeners": {"smtp": ["127.0.0.1:2525"]}})
    member.start()
    try:
        out = main(config, "status")[1]
        assert "members: 1" in out
        assert "node-a" in out and "smtp=127.0.0.1:2525" in out
    finally:
        session.close()  # revokes the lease: the member is gone
    assert "members: 0" in main(config, "status")[1]


def test_user_errors(config: Path, main: _Main) -> None:
    main(config, "domain", "add", "example.test")
    _assert_one_line_error(
        _run(config, "user", "add", "x@nowhere.test", stdin="pw\n"), 1, "unknown domain"
    )
    assert main(config, "user", "add", "a@example.test", stdin="pw\n")[0] == 0
    _assert_one_line_error(
        _run(config, "user", "add", "a@example.test", stdin="pw\n"), 1, "already exists"
    )
    _assert_one_line_error(
        _run(config, "user", "add", "b@example.test", stdin=""), 1, "empty password"
    )
    _assert_one_line_error(
        _run(config, "user", "add", "not-an-address", stdin="pw\n"), 1, "not a valid address"
    )
    _assert_one_line_error(
        _run(config, "user", "passwd", "zed@example.test", stdin="pw\n"), 1, "unknown account"
    )
    _assert_one_line_error(_run(config, "domain", "add", "example.test"), 1, "already exists")
    _assert_one_line_error(
        _run(config, "alias", "add", "x@nowhere.test", "a@example.test"), 1, "unknown domain"
    )


def test_password_never_from_argv(config: Path) -> None:
    _assert_one_line_error(
        _run(config, "user", "add", "a@example.test", "secret", stdin="pw\n"),
        2,
        "unrecognized arguments",
    )


def test_usage_errors_exit_2(config: Path) -> None:
    _assert_one_line_error(_run(config), 2, "required")
    _assert_one_line_error(_run(config, "bogus"), 2, "invalid choice")
    _assert_one_line_error(_run(config, "user"), 2, "required")
    _assert_one_line_error(_run(config, "alias", "add", "team@example.test"), 2, "required")


def test_config_errors(tmp_path: Path) -> None:
    _assert_one_line_error(
        _run(tmp_path / "missing.toml", "domain", "list"), 1, "configuration file not found"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[etcd]\nendpont = []\n")
    _assert_one_line_error(_run(bad, "domain", "list"), 1, "etcd.endpont")
    broken = tmp_path / "broken.toml"
    broken.write_text("[etcd\n")
    _assert_one_line_error(_run(broken, "status"), 1, "not valid TOML")


def test_etcd_unreachable(tmp_path: Path) -> None:
    path = tmp_path / "down.toml"
    path.write_text(f'[etcd]\nendpoints = ["http://127.0.0.1:{free_port()}"]\ntimeout = 1.0\n')
    for args in (("domain", "list"), ("status",)):
        _assert_one_line_error(_run(path, *args), 1, "etcd unavailable")


def test_empty_endpoints_use_the_embedded_client_url(
    etcd_server: EtcdServer, tmp_path: Path, main: _Main
) -> None:
    path = tmp_path / "embedded.toml"
    path.write_text(f'[etcd]\nembedded_client_url = "{etcd_server.client_url}"\n')
    assert main(path, "domain", "add", "example.test")[0] == 0
    session = EtcdSession([etcd_server.client_url], "/postroom", 5, 2.0)
    assert session.get("/domains/example.test") is not None
