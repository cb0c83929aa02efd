"""ansible/ for real: a 3-node cluster deployed by ansible-playbook on this machine.

Theory of operation
-------------------
Three inventory hosts n1, n2, n3 (``ansible_connection: local``) stand for
three machines: each has its own loopback address (127.0.0.12-14, used by no
other test), its own directories under the test's tmp dir and free ports.
Each is an etcd member and a postroom node.  systemd does not run here, so
the roles pick the fallback supervisor (ansible/roles/supervise).  Test
shortcuts, all plain role variables: no system users (everything runs as
root), no apt, venvs made with ``--system-site-packages --without-pip`` and
``pip install --no-index --no-deps`` (the packages of this Python, no download);
ansible's modules run under /usr/bin/python3 when there is one (as on a
Debian host; postroom itself runs in the venv of this Python).

Two wheels of the current tree are built here (a wheel is a zip: the
packages plus a dist-info; building them by hand takes a fraction of a
second and needs no network), ``0.1.0+a`` and ``0.1.0+b``; the second also
reports ``0.1.0+b`` as its version in ``/members/`` (node/app.py VERSION),
so the test can see which build each running node is.

The tests run in order on one deployment: mail through n1 read through n3;
a second ``site.yml`` reports ``changed=0``; ``upgrade.yml`` to the second
wheel while a background sender keeps sending (every message acknowledged
with 250 must be readable afterwards); ``ansible-lint`` passes (started in
the background before the first playbook, its result checked last).  At the
end every service is stopped with the supervisor's ``stop`` (SIGTERM, then
SIGKILL; all services at once), and any process left in a pid file is
killed by PID.  The runs share a fact cache (jsonfile under the tmp dir):
only the first one gathers facts.
"""

from __future__ import annotations

import base64
import hashlib
import imaplib
import json
import os
import re
import resource
import shutil
import signal
import smtplib
import subprocess
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.support.etcd import free_port, skip_without_etcd

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
HOSTS = {"n1": "127.0.0.12", "n2": "127.0.0.13", "n3": "127.0.0.14"}
LISTENERS = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s")
USERS = {"alice@example.test": "alice-pw-1234", "bob@example.test": "bob-pw-1234"}
PLAYBOOK_TIMEOUT = 1200

pytestmark = pytest.mark.slow


# -- wheels ------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def build_wheel(version: str, dest: Path, report_version: bool) -> Path:
    """A wheel of node/, cluster/ and storage/ at ``version`` (py3-none-any)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    files: dict[str, bytes] = {}
    for package in ("node", "cluster", "storage"):
        for path in sorted((REPO / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files[path.relative_to(REPO).as_posix()] = path.read_bytes()
    if report_version:
        app = files["node/app.py"].decode()
        files["node/app.py"] = re.sub(r'(?m)^VERSION = ".*"$', f'VERSION = "{version}"',
                                      app).encode()
    info = f"postroom-{version}.dist-info"
    metadata = ["Metadata-Version: 2.1", "Name: postroom", f"Version: {version}",
                f"Requires-Python: {project['requires-python']}"]
    metadata += [f"Requires-Dist: {dep}" for dep in project["dependencies"]]
    files[f"{info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: postroom-tests\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    files[f"{info}/entry_points.txt"] = b"[console_scripts]\npostroom = node.cli:main\n"
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    wheel = dest / f"postroom-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


# -- the deployment ------------------------------------------------------------


def module_python() -> str:
    """The hosts' Python for ansible's modules: the distribution's, as on a real
    Debian host, when there is one.  It starts in a tenth of the time of a
    Python with many site packages (every task on every host starts one)."""
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else os.path.realpath(shutil.which("python3") or "")



def _children_cpu() -> float:
    """User + system CPU seconds of this process's reaped children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Deployment:
    """The inventory, its directories and ports, and ansible-playbook runs."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.wheels = {v: build_wheel(v, base, report_version=v.endswith("b"))
                       for v in ("0.1.0+a", "0.1.0+b")}
        self.ports: dict[str, dict[str, int]] = {}
        hosts = {}
        for name, address in HOSTS.items():
            d = base / name
            ports = {k: free_port(address) for k in (*LISTENERS, "rpc", "etcd_client",
                                                      "etcd_peer")}
            self.ports[name] = ports
            hosts[name] = {
                "ansible_host": address,
                "etcd_client_port": ports["etcd_client"],
                "etcd_peer_port": ports["etcd_peer"],
                "etcd_conf_dir": str(d / "etcd-conf"),
                "etcd_data_dir": str(d / "etcd-data"),
                "etcd_log_dir": str(d / "log"),
                "etcd_run_dir": str(d / "run"),
                "postroom_conf_dir": str(d / "conf"),
                "postroom_data_dir": str(d / "data"),
                "postroom_log_dir": str(d / "log"),
                "postroom_run_dir": str(d / "run"),
                "postroom_install_dir": str(d / "opt"),
                "postroom_hostname": f"{name}.example.test",
                "postroom_listen_addresses": [address],
                "postroom_rpc_port": ports["rpc"],
                "postroom_ports": {k: ports[k] for k in LISTENERS},
                "postroom_labels": {"host": f"h{name[1]}", "zone": f"z{name[1]}"},
            }
        group = {name: {} for name in HOSTS}
        # JSON is YAML: ansible's yaml inventory plugin reads it.
        self.inventory = base / "inventory.yml"
        self.inventory.write_text(json.dumps({"all": {
            "vars": {"ansible_connection": "local"},
            "hosts": hosts,
            "children": {"etcd": {"hosts": group}, "postroom": {"hosts": group}},
        }}, indent=1))
        self.vars_file = base / "vars.json"
        self.vars_file.write_text(json.dumps({
            "ansible_python_interpreter": module_python(),
            "supervise_dir": str(base / "supervise"),
            "etcd_install_package": False,
            "etcd_manage_user": False,
            "etcd_pki_dir": str(base / "pki"),
            "postroom_manage_user": False,
            "postroom_user": "root",
            "postroom_install_packages": False,
            "postroom_python": os.path.realpath(shutil.which("python3") or ""),
            "postroom_venv_args": ["--system-site-packages", "--without-pip"],
            # The wheel's dependencies are this Python's packages (the venv
            # sees them): pip need not resolve them again for every install.
            "postroom_pip_args": ["--no-index", "--no-deps"],
            "postroom_shards": 4,
            "postroom_etcd_lease_ttl": 3,
            "postroom_allow_plaintext_auth_on_loopback": True,
            "postroom_domains": ["example.test"],
            "postroom_users": [{"address": a, "password": p} for a, p in USERS.items()],
            "postroom_extra_config": {"outbound": {"resolvers": ["127.0.0.1:9"],
                                                   "dns_timeout": 1.0}},
        }, indent=1))

    def playbook(self, name: str, *extra: str) -> str:
        """ansible-playbook NAME; its output (AssertionError with it on failure)."""
        env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_LOCAL_TEMP=str(self.base / "ansible-tmp"),
                   ANSIBLE_HOME=str(self.base / "ansible-home"),
                   # Facts gathered by the first run serve the later ones
                   # (gathering = smart): the hosts do not change in between.
                   ANSIBLE_CACHE_PLUGIN="jsonfile",
                   ANSIBLE_CACHE_PLUGIN_CONNECTION=str(self.base / "facts"),
                   ANSIBLE_CACHE_PLUGIN_TIMEOUT="86400")
        argv = [shutil.which("ansible-playbook") or "ansible-playbook", "-i", str(self.inventory),
                "-e", f"@{self.vars_file}", "-e", f"postroom_package={self.wheels['0.1.0+a']}",
                *extra, str(ANSIBLE / name)]
        began, cpu = time.monotonic(), _children_cpu()
        result = subprocess.run(argv, cwd=ANSIBLE, env=env, capture_output=True, text=True,
                                timeout=PLAYBOOK_TIMEOUT, check=False)
        spent = (f"# {name}: {time.monotonic() - began:.1f} s, CPU of ansible-playbook and "
                 f"what it waited for {_children_cpu() - cpu:.1f} s\n")
        (self.base / f"{name}.{time.time():.0f}.log").write_text(spent + result.stdout
                                                                 + result.stderr)
        assert result.returncode == 0, f"{name} failed:\n{result.stdout[-6000:]}\n{result.stderr}"
        return result.stdout

    def cli(self, node: str, *args: str) -> subprocess.CompletedProcess:
        """`postroom ARGS` with the deployed node's venv and configuration."""
        d = self.base / node
        return subprocess.run([str(d / "opt/current/bin/python"), "-m", "node", "--config",
                               str(d / "conf/postroom.toml"), *args], capture_output=True,
                              text=True, timeout=120, check=False)

    def status(self) -> dict:
        return json.loads(self.cli("n1", "status", "--json").stdout)

    def address(self, node: str, service: str) -> tuple[str, int]:
        return HOSTS[node], self.ports[node][service]

    def stop_all(self) -> None:
        """The supervisor's stop for every service, all at once; then SIGKILL
        whatever a pid file still names."""
        supervise = self.base / "supervise" / "supervise.py"
        runs = [self.base / name / "run" for name in HOSTS]
        runs = [run for run in runs if run.exists()]
        specs = [spec for run in runs for spec in sorted(run.glob("*.json"))]
        stops = [subprocess.Popen(["python3", str(supervise), "stop", str(spec)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for spec in specs if supervise.exists()]
        for stop in stops:
            try:
                stop.wait(90)
            except subprocess.TimeoutExpired:
                stop.kill()
        for run in runs:
            for pidfile in [*run.glob("*.monitor"), *run.glob("*.pid")]:
                try:
                    pid = int(pidfile.read_text().split()[0])
                    if os.getsid(pid) in (pid, int(pidfile.read_text().split()[-1])):
                        os.kill(pid, signal.SIGKILL)
                except (OSError, ValueError, IndexError):
                    pass


@pytest.fixture(scope="module")
def lint() -> Iterator[subprocess.Popen | None]:
    """``ansible-lint`` started first, in the background: it reads only the
    files under ansible/, and runs while the deployment's playbooks wait on
    services.  None when it is not installed."""
    if shutil.which("ansible-lint") is None:
        yield None
        return
    proc = subprocess.Popen(["ansible-lint", "--offline", "--nocolor"], cwd=ANSIBLE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg")))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, lint) -> Iterator[Deployment]:
    skip_without_etcd()
    if shutil.which("ansible-playbook") is None:
        pytest.skip("ansible-core is not installed (pip install -e '.[test]')")
    deploy = Deployment(tmp_path_factory.mktemp("ansible"))
    try:
        deploy.playbook("site.yml")
        yield deploy
    finally:
        deploy.stop_all()


# -- mail helpers ----------------------------------------------------------------


def send(deploy: Deployment, node: str, message_id: str, timeout: float = 20.0) -> None:
    """One message alice -> bob through node's SMTP listener (raises unless 250)."""
    msg = EmailMessage()
    msg["From"], msg["To"] = "alice@example.test", "bob@example.test"
    msg["Subject"], msg["Message-ID"] = "ansible test", message_id
    msg.set_content(f"sent through {node}\n")
    host, port = deploy.address(node, "smtp")
    with smtplib.SMTP(host, port, timeout=timeout) as smtp:
        smtp.send_message(msg)


def inbox_message_ids(deploy: Deployment, node: str) -> list[str]:
    """Message-IDs in bob's INBOX, read over IMAP through node."""
    host, port = deploy.address(node, "imap")
    with imaplib.IMAP4(host, port, timeout=30) as imap:
        imap.login("bob@example.test", USERS["bob@example.test"])
        status, data = imap.select("INBOX", readonly=True)
        assert status == "OK", data
        if int(data[0]) == 0:
            return []
        status, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert status == "OK", data
    headers = b"".join(part[1] for part in data if isinstance(part, tuple))
    return re.findall(r"<[^>]+>", headers.decode("ascii", "replace"))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, imaplib.IMAP4.error, AssertionError) as exc:
            last = exc
        time.sleep(0.5)  # poll interval; the predicate decides
    raise TimeoutError(f"{what} not reached in {timeout:g} s (last error: {last})")


class Sender(threading.Thread):
    """Sends one message after the other, round robin over the nodes."""

    def __init__(self, deploy: Deployment) -> None:
        super().__init__(daemon=True)
        self.deploy = deploy
        self.stopping = threading.Event()
        self.acked: list[str] = []
        self.failed = 0

    def run(self) -> None:
        nodes = list(HOSTS)
        i = 0
        while not self.stopping.is_set():
            message_id = f"<{uuid.uuid4().hex}@upgrade.example.test>"
            try:
                send(self.deploy, nodes[i % len(nodes)], message_id, timeout=15.0)
                self.acked.append(message_id)
            except (OSError, smtplib.SMTPException):
                self.failed += 1  # a node restarting, a shard moving: not acknowledged
            i += 1
            self.stopping.wait(0.2)


# -- tests -----------------------------------------------------------------------


@pytest.mark.timeout(1500)
def test_site_deploys_a_cluster_that_carries_mail(deployment: Deployment) -> None:
    status = deployment.status()
    assert sorted(m["name"] for m in status["members"]) == ["n1", "n2", "n3"]
    assert {m["labels"]["zone"] for m in status["members"]} == {"z1", "z2", "z3"}
    assert status["without_primary"] == []
    message_id = f"<{uuid.uuid4().hex}@site.example.test>"
    send(deployment, "n1", message_id)
    assert message_id in wait_for(lambda: inbox_message_ids(deployment, "n3"), 60,
                                  "the message readable through n3")


def _recap(output: str) -> dict[str, dict[str, int]]:
    recap = {}
    for host, counts in re.findall(r"(?m)^(n\d)\s+:\s+(.*)$", output):
        recap[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    return recap


@pytest.mark.timeout(1500)
def test_second_site_run_changes_nothing(deployment: Deployment) -> None:
    recap = _recap(deployment.playbook("site.yml"))
    assert sorted(recap) == ["n1", "n2", "n3"]
    assert {h: c["changed"] for h, c in recap.items()} == {"n1": 0, "n2": 0, "n3": 0}
    assert all(c["failed"] == 0 for c in recap.values())


@pytest.mark.timeout(2400)
def test_rolling_upgrade_keeps_mail_flowing(deployment: Deployment) -> None:
    before = {m["name"]: m["pid"] for m in deployment.status()["members"]}
    sender = Sender(deployment)
    sender.start()
    try:
        deployment.playbook("upgrade.yml", "-e", f"postroom_package={deployment.wheels['0.1.0+b']}",
                            "-e", "postroom_check_version=true")
    finally:
        sender.stopping.set()
        sender.join(60)
    status = deployment.status()
    assert {m["name"]: m["version"] for m in status["members"]} == {
        "n1": "0.1.0+b", "n2": "0.1.0+b", "n3": "0.1.0+b"}
    assert all(m["pid"] != before[m["name"]] for m in status["members"])
    assert status["draining"] == [] and status["without_primary"] == []
    for node in HOSTS:
        assert os.readlink(deployment.base / node / "opt/current").endswith("0.1.0+b")
    assert len(sender.acked) > 0, f"nothing acknowledged during the upgrade ({sender.failed} failed)"
    present = set(inbox_message_ids(deployment, "n2"))
    lost = [m for m in sender.acked if m not in present]
    assert lost == [], f"{len(lost)} of {len(sender.acked)} acknowledged messages lost"


@pytest.mark.timeout(900)
def test_ansible_lint_passes(lint: subprocess.Popen | None) -> None:
    if lint is None:
        pytest.skip("ansible-lint is not installed (pip install -e '.[test]')")
    stdout, stderr = lint.communicate(timeout=800)
    assert lint.returncode == 0, stdout[-6000:] + stderr[-3000:]
