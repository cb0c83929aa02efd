"""DKIM keys in a real etcd: directory methods, `postroom dkim ...`, and a
running Signer following CLI changes through the watched directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dkim
import dns.rdata
import gevent
import pytest

from cluster.directory import DirectoryError, EtcdDirectory
from cluster.etcd import EtcdSession
from node import cli
from node.config import DkimSettings
from node.outbound.dkim import ED25519, RSA, Signer, generate_key
from tests.support.etcd import REPO, EtcdServer, run_patched

MODULE = "tests.integration.test_dkim_keys"
MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: keys\r\n"
    b"Message-ID: <k1@example.test>\r\n\r\nbody\r\n"
)


@pytest.fixture
def directory(etcd_server: EtcdServer) -> EtcdDirectory:
    d = EtcdDirectory(EtcdSession([etcd_server.client_url], "/postroom", 5, 2.0))
    d.add_domain("example.test")
    return d


@pytest.fixture
def config(etcd_server: EtcdServer, tmp_path: Path) -> Path:
    path = tmp_path / "postroom.toml"
    path.write_text(f'[etcd]\nendpoints = ["{etcd_server.client_url}"]\n')
    return path


def _cli(config: Path | str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("POSTROOM_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "node", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env=env,
        timeout=60,
    )


def parse_zone_lines(text: str) -> dict[bytes, bytes]:
    """{b"sel._domainkey.dom.": TXT data} from the CLI's output, parsed as zone text
    by dnspython; asserts each character-string fits in 255 octets."""
    records: dict[bytes, bytes] = {}
    for line in text.splitlines():
        if not line or line.startswith(";"):
            continue
        name, klass, rdtype, rest = line.split(" ", 3)
        assert (klass, rdtype) == ("IN", "TXT"), line
        assert name.endswith("."), line  # absolute, as a zone needs
        rdata = dns.rdata.from_text("IN", "TXT", rest)
        assert all(len(s) <= 255 for s in rdata.strings)  # RFC 1035 §3.3.14
        records[name.encode()] = b"".join(rdata.strings)
    return records


def test_directory_dkim_records(directory: EtcdDirectory) -> None:
    rsa_record = generate_key(RSA)
    ed_record = generate_key(ED25519, active=False)
    assert directory.add_dkim_key("Example.Test", "S1", rsa_record) == ("example.test", "s1")
    directory.add_dkim_key("example.test", "s2", ed_record)
    with pytest.raises(DirectoryError, match="already exists"):
        directory.add_dkim_key("example.test", "s1", generate_key(ED25519))
    with pytest.raises(DirectoryError, match="unknown domain"):
        directory.add_dkim_key("remote.test", "s1", rsa_record)
    with pytest.raises(DirectoryError, match="not a valid DKIM selector"):
        directory.add_dkim_key("example.test", "bad selector", rsa_record)
    with pytest.raises(DirectoryError, match="unknown DKIM algorithm"):
        directory.add_dkim_key("example.test", "s3", {**rsa_record, "algorithm": "rsa-sha1"})

    listed = directory.list_dkim_keys("example.test")
    assert [(r["selector"], r["algorithm"], r["active"]) for r in listed] == [
        ("s1", RSA, True),
        ("s2", ED25519, False),
    ]
    assert listed[0]["public_key"] == rsa_record["public_key"]
    assert directory.list_dkim_keys() == listed

    directory.start(watch=False)
    assert [r["selector"] for r in directory.dkim_keys("EXAMPLE.test")] == ["s1"]
    assert directory.dkim_keys("remote.test") == []
    directory.set_dkim_active("example.test", "s2", True)
    directory.set_dkim_active("example.test", "s1", False)
    directory.start(watch=False)
    assert [r["selector"] for r in directory.dkim_keys("example.test")] == ["s2"]
    with pytest.raises(DirectoryError, match="unknown DKIM selector"):
        directory.set_dkim_active("example.test", "nope", True)
    directory.remove_dkim_key("example.test", "s1")
    with pytest.raises(DirectoryError, match="unknown DKIM selector"):
        directory.remove_dkim_key("example.test", "s1")
    assert [r["selector"] for r in directory.list_dkim_keys()] == ["s2"]


def test_cli_generate_list_rotate(
    config: Path, directory: EtcdDirectory, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    assert cli.main(["--config", str(config), "dkim", "generate", "example.test"]) == 0
    out = capsys.readouterr().out
    month = time.strftime("%Y%m", time.gmtime())
    records = parse_zone_lines(out)
    assert sorted(records) == [
        f"{month}e._domainkey.example.test.".encode(),
        f"{month}r._domainkey.example.test.".encode(),
    ]
    stored = {r["selector"]: r for r in directory.list_dkim_keys("example.test")}
    rsa_txt = records[f"{month}r._domainkey.example.test.".encode()]
    assert rsa_txt == f"v=DKIM1; k=rsa; p={stored[month + 'r']['public_key']}".encode()
    assert len(rsa_txt) > 255  # so it really was split into several strings
    ed_txt = records[f"{month}e._domainkey.example.test.".encode()]
    assert ed_txt == f"v=DKIM1; k=ed25519; p={stored[month + 'e']['public_key']}".encode()
    assert stored[month + "r"]["private_key"].startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8

    # Rotation (docs/dkim.md): new selector inactive, publish, activate, retire the old.
    assert (
        cli.main(
            [
                "--config",
                str(config),
                "dkim",
                "generate",
                "example.test",
                "--selector",
                "next",
                "--algorithm",
                "rsa",
                "--inactive",
            ]
        )  # fmt: skip
        == 0
    )
    assert "(rsa-sha256, inactive)" in capsys.readouterr().out
    directory.start(watch=False)
    assert [r["selector"] for r in directory.dkim_keys("example.test")] == [
        month + "r",
        month + "e",
    ]
    for args in (
        ("activate", "example.test", "next"),
        ("deactivate", "example.test", month + "r"),
    ):
        assert cli.main(["--config", str(config), "dkim", *args]) == 0
    directory.start(watch=False)
    assert [r["selector"] for r in directory.dkim_keys("example.test")] == ["next", month + "e"]
    capsys.readouterr()
    assert cli.main(["--config", str(config), "dkim", "list", "example.test"]) == 0
    listing = capsys.readouterr().out
    assert f"; example.test {month}r rsa-sha256 inactive" in listing
    assert "; example.test next rsa-sha256 active" in listing
    assert len(parse_zone_lines(listing)) == 3
    assert "PRIVATE" not in listing
    assert cli.main(["--config", str(config), "dkim", "remove", "example.test", month + "r"]) == 0
    assert len(directory.list_dkim_keys()) == 2


@pytest.mark.parametrize(
    "args, text",
    [
        (("dkim", "generate", "remote.test"), "unknown domain: remote.test"),
        (("dkim", "generate", "example.test", "--selector", "a b"), "not a valid DKIM selector"),
        (("dkim", "remove", "example.test", "nope"), "unknown DKIM selector nope"),
        (("dkim", "deactivate", "example.test", "nope"), "unknown DKIM selector nope"),
    ],
)
def test_cli_errors(config: Path, directory: EtcdDirectory, args: tuple, text: str) -> None:
    result = _cli(config, *args)
    assert result.returncode == 1, result
    assert result.stderr.startswith("postroom: error: ") and text in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_cli_duplicate_selector(config: Path, directory: EtcdDirectory) -> None:
    assert _cli(config, "dkim", "generate", "example.test", "--selector", "s",
                "--algorithm", "ed25519").returncode == 0  # fmt: skip
    result = _cli(config, "dkim", "generate", "example.test", "--selector", "s",
                  "--algorithm", "ed25519")  # fmt: skip
    assert result.returncode == 1 and "already exists" in result.stderr, result.stderr


def scenario_signer_follows_cli(url: str, config_path: str) -> None:
    """A running Signer over the watched directory (the real KeySource that the
    unit tests' fake stands for) picks up generate/deactivate at once."""
    directory = EtcdDirectory(EtcdSession([url], "/postroom", 5, 2.0))
    directory.start()
    signer = Signer(directory, DkimSettings())
    assert signer.sign(MESSAGE, "example.test") == MESSAGE  # no keys yet

    def wait(predicate, what: str) -> None:
        deadline = time.monotonic() + 15
        while not predicate():
            assert time.monotonic() < deadline, f"running directory never saw {what}"
            gevent.sleep(0.01)

    result = _cli(config_path, "dkim", "generate", "example.test", "--selector", "run")
    assert result.returncode == 0, result.stderr
    txt = parse_zone_lines(result.stdout)
    wait(lambda: len(directory.dkim_keys("example.test")) == 2, "dkim generate")
    signed = signer.sign(MESSAGE, "example.test")
    assert signed.count(b"DKIM-Signature:") == 2

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return txt[name]

    for idx, selector in enumerate((b"runr", b"rune")):
        verifier = dkim.DKIM(signed)
        assert verifier.verify(idx=idx, dnsfunc=dnsfunc)
        assert verifier.selector == selector  # RSA first, then Ed25519
    result = _cli(config_path, "dkim", "deactivate", "example.test", "runr")
    assert result.returncode == 0, result.stderr
    wait(lambda: len(directory.dkim_keys("example.test")) == 1, "dkim deactivate")
    signed = signer.sign(MESSAGE, "example.test")
    assert signed.count(b"DKIM-Signature:") == 1 and b"a=ed25519-sha256" in signed
    directory.stop()


def test_signer_follows_cli(
    directory: EtcdDirectory, etcd_server: EtcdServer, config: Path
) -> None:
    run_patched(MODULE, "scenario_signer_follows_cli", etcd_server.client_url, str(config))
