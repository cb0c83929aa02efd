"""`postroom cluster init | join | show` against a real etcd (plain, and TLS + auth).

Every command runs as the operator would run it, through ``node.cli.main``
with ``--config X cluster ...`` in a subprocess (the consecutive commands of
a test share one process: tests/support/cli_batch.py), against a real etcd
started by PID.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from cluster.etcd import EtcdSession
from tests.support.etcd import EtcdServer, skip_without_etcd
from tests.support.etcd_cluster import EtcdCluster
from tests.support.node import NodeProcess


def _node(base: Path, etcd: dict, **cluster) -> NodeProcess:
    """A node configuration (not started) pointing at the given etcd."""
    return NodeProcess(base, {"etcd": etcd, "cluster": {"enabled": True, **cluster}})


def _run(*steps: tuple[NodeProcess, tuple[str, ...]]) -> list[subprocess.CompletedProcess]:
    """(node, args) commands, each with its node's configuration, in order in
    one process; one CompletedProcess each."""
    answers = steps[0][0].cli_batch(
        [(["--config", str(node.config_path), *args], "") for node, args in steps])
    return [subprocess.CompletedProcess(args, a["rc"], a["stdout"], a["stderr"])
            for (_, args), a in zip(steps, answers, strict=True)]


def _ok(result) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def _refused(result, text: str) -> None:
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("postroom: error: ") and text in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback


def test_init_creates_meta_and_ca_once(etcd_server: EtcdServer, tmp_path: Path) -> None:
    node = _node(tmp_path / "a", {"endpoints": [etcd_server.client_url], "prefix": "/c1"})
    created, again, shown = _run((node, ("cluster", "init", "--shards", "8",
                                         "--replication-factor", "2")),
                                 (node, ("cluster", "init", "--shards", "4")),
                                 (node, ("cluster", "show")))
    out = _ok(created)
    session = EtcdSession([etcd_server.client_url], "/c1")
    meta = session.get("/cluster/meta").value
    assert set(meta) == {"id", "shards", "replication_factor", "created"}
    assert (meta["shards"], meta["replication_factor"]) == (8, 2)
    assert out.startswith(f"created cluster {meta['id']}:")
    record = session.get("/cluster/ca").value
    ca = x509.load_pem_x509_certificate(record["cert"].encode())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert meta["id"] in ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert "PRIVATE KEY" in record["key"]

    # The second init (even with other numbers) changed nothing: meta and
    # record above are what the first one wrote.
    _refused(again, f"already exists in etcd (id {meta['id']})")

    shown = _ok(shown)
    assert f"id: {meta['id']}\nshards: 8\nreplication_factor: 2\n" in shown
    assert "ca: present" in shown and "PRIVATE KEY" not in shown and record["key"] not in shown


def test_init_defaults_and_bad_numbers(etcd_server: EtcdServer, tmp_path: Path) -> None:
    etcd = {"endpoints": [etcd_server.client_url], "prefix": "/c2"}
    node = NodeProcess(tmp_path / "a", {"etcd": etcd, "storage": {"shards": 6},
                                        "cluster": {"replication_factor": 3}})
    shards, factor, show, join = _run(
        (node, ("cluster", "init", "--shards", "0")),
        (node, ("cluster", "init", "--replication-factor", "0")),
        (node, ("cluster", "show")), (node, ("cluster", "join")))
    _refused(shards, "--shards must be between 1")
    _refused(factor, "at least 1")
    _refused(show, "run `postroom cluster init` first")
    _refused(join, "run `postroom cluster init` first")
    assert EtcdSession([etcd_server.client_url], "/c2").get_prefix("/")[0] == []
    _ok(node.cli("cluster", "init"))
    meta = EtcdSession([etcd_server.client_url], "/c2").get("/cluster/meta").value
    assert (meta["shards"], meta["replication_factor"]) == (6, 3)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(
        ext.get_values_for_type(x509.DNSName)
    )


def test_join_issues_node_certificates(etcd_server: EtcdServer, tmp_path: Path) -> None:
    etcd = {"endpoints": [etcd_server.client_url], "prefix": "/c3"}
    first = _node(tmp_path / "n1", etcd, name="n1", listen="127.0.0.2:7401")
    # No [cluster] name for the second: the node-id file names the member
    # (created if missing); advertise wins over listen; an explicit cert_dir
    # is used.  Joining again under another name is refused.
    second = _node(tmp_path / "n2", etcd, listen="0.0.0.0:7402", advertise="127.0.0.3:7402",
                   cert_dir=str(tmp_path / "n2certs"))
    init, joined, joined2, other, renamed = _run(
        (first, ("cluster", "init", "--shards", "4")),
        (first, ("cluster", "join", "--address", "mail1.example.test")),
        (second, ("cluster", "join", "--name", "n2")),
        (second, ("cluster", "join", "--name", "other")),
        (first, ("cluster", "join", "--name", "n9")))
    _ok(init)
    out = _ok(joined)
    cert_dir = first.data_dir / "cluster"
    assert f"as n1: certificate for n1, 127.0.0.2, mail1.example.test in {cert_dir}" in out
    ca, cert = _load(cert_dir / "ca.crt"), _load(cert_dir / "node.crt")
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n1"
    assert {"127.0.0.2", "mail1.example.test"} <= _sans(cert)
    assert stat.S_IMODE((cert_dir / "node.key").stat().st_mode) == 0o600
    stored = EtcdSession([etcd_server.client_url], "/c3").get("/cluster/ca").value["cert"]
    assert (cert_dir / "ca.crt").read_text() == stored

    _ok(joined2)
    assert (second.data_dir / "node-id").read_text().strip() == "n2"
    cert2 = _load(tmp_path / "n2certs" / "node.crt")
    cert2.verify_directly_issued_by(ca)
    assert cert2.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n2"
    assert "127.0.0.3" in _sans(cert2) and "0.0.0.0" not in _sans(cert2)
    _refused(other, "differs from this node's id n2")
    _refused(renamed, "differs from [cluster] name = n1")


def test_cluster_commands_over_tls_with_auth(tmp_path: Path) -> None:
    skip_without_etcd()
    with EtcdCluster(tmp_path / "etcd", members=1) as etcd:
        node = _node(tmp_path / "n1", etcd.settings(), name="n1", listen="127.0.0.2:7401")
        init, join, show = _run((node, ("cluster", "init", "--shards", "8")),
                                (node, ("cluster", "join")), (node, ("cluster", "show")))
        out = _ok(init)
        _ok(join)
        assert (node.data_dir / "cluster" / "node.crt").exists()
        assert out.split()[2].rstrip(":") in _ok(show)

        wrong = tmp_path / "wrong.password"
        wrong.write_text("not-the-password\n")
        bad = _node(tmp_path / "bad", {**etcd.settings(), "password_file": str(wrong)})
        anonymous = {k: v for k, v in etcd.settings().items()
                     if k not in ("username", "password_file")}
        wrong_password, no_user = _run(  # a process of their own: no session of the above
            (bad, ("cluster", "show")),
            (_node(tmp_path / "anon", anonymous), ("cluster", "show")))
        _refused(wrong_password, "etcd authentication as 'postroom' failed")
        _refused(no_user, "user name is empty")


@pytest.fixture(autouse=True)
def _etcd_installed() -> None:
    skip_without_etcd()
