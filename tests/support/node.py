"""A real postroom node for tests: `python -m node serve` by PID on loopback.

Each node has its own data directory, free ports for every listener and its
own embedded etcd (the default single-node setup a user gets).  Readiness is
the "postroom ready" line the node prints once every listener is bound.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support.etcd import free_port

REPO = Path(__file__).resolve().parents[2]
CLI_BATCH = Path(__file__).with_name("cli_batch.py")
DOMAIN = "example.test"
USERS = {"alice@example.test": "alice-pw-1234", "bob@example.test": "bob-pw-1234"}
START_DEADLINE = 60.0
# The embedded etcd is a one-member cluster: it elects itself after its
# election timeout (etcd's default 1000 ms; ~1-1.6 s per node start).  etcd
# reads its flags from ETCD_* variables too; the node passes its environment
# on, so every start waits ~0.2 s instead.  No peer exists to miss a beat.
EMBEDDED_ETCD_ENV = {"ETCD_HEARTBEAT_INTERVAL": "20", "ETCD_ELECTION_TIMEOUT": "200"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table, e.g. [cluster] labels
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot encode {value!r} as TOML")


def to_toml(settings: Mapping[str, Mapping[str, Any]]) -> str:
    out = []
    for section, values in settings.items():
        out.append(f"[{section}]")
        out += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        out.append("")
    return "\n".join(out)


def merge(base: dict, overrides: Mapping) -> dict:
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            base[key] = merge(dict(base.get(key, {})), value)
        else:
            base[key] = value
    return base


class NodeProcess:
    """One postroom node process and the CLI bound to its configuration.

    ``host`` is the loopback address every listener binds (cluster tests run
    nodes on 127.0.0.2, .3, ...)."""

    def __init__(
        self, base_dir: Path, overrides: Mapping | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.host = host
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.config_path = self.base_dir / "postroom.toml"
        self.ports = {
            name: free_port(host)
            for name in ("smtp", "imap", "imaps", "pop3", "pop3s", "submission", "submissions")
        }
        h = self.host
        settings: dict[str, Any] = {
            "node": {
                "hostname": "mx.example.test",
                "data_dir": str(self.data_dir),
                "log_level": "info",
                "allow_plaintext_auth_on_loopback": True,
            },
            "etcd": {
                "embedded_client_url": f"http://{h}:{free_port(h)}",
                "embedded_peer_url": f"http://{h}:{free_port(h)}",
            },
            "storage": {"shards": 4},
            "smtp": {"listen": [f"{h}:{self.ports['smtp']}"]},
            "imap": {
                "listen": [f"{h}:{self.ports['imap']}"],
                "listen_tls": [f"{h}:{self.ports['imaps']}"],
            },
            "pop3": {
                "listen": [f"{h}:{self.ports['pop3']}"],
                "listen_tls": [f"{h}:{self.ports['pop3s']}"],
                # 0.1 s instead of 1 s before each -ERR [AUTH]: the same path
                # (a gevent sleep); no node test measures the pause itself.
                "auth_failure_delay": 0.1,
            },
            "submission": {
                "listen": [f"{h}:{self.ports['submission']}"],
                "listen_tls": [f"{h}:{self.ports['submissions']}"],
                "auth_failure_delay": 0.1,  # as pop3's, before each 535 5.7.8
            },
            # Nothing leaves loopback: no test reaches a real resolver.  Nothing
            # answers at 127.0.0.1:9, so every lookup (a relayed message's
            # MTA-STS TXT, an MX) fails by timing out: 0.2 s instead of 1 s per
            # lookup, the same failure.  Tests with a real DnsServer set their own.
            "outbound": {"resolvers": ["127.0.0.1:9"], "dns_timeout": 0.2},
        }
        self.settings = merge(settings, overrides or {})
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.settings))
        self.log_path = self.base_dir / "node.log"
        self.proc: subprocess.Popen | None = None

    @property
    def cafile(self) -> str:
        return str(self.data_dir / "tls" / "cert.pem")

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(EMBEDDED_ETCD_ENV)
        return env

    def start(self) -> None:
        """Start the node and return once every listener is bound."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", "--config", str(self.config_path), "serve"],
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                cwd=str(REPO),
            )
        deadline = time.monotonic() + START_DEADLINE
        sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buf = b""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
            if sel.select(timeout=0.2):
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                buf += chunk
                if b"postroom ready" in buf:
                    sel.close()
                    return
        self.kill()
        raise TimeoutError(f"node not ready within {START_DEADLINE}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the node (and, through pdeathsig, its embedded etcd)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reap_etcd()

    def _reap_etcd(self) -> None:
        # The embedded etcd dies with its parent (pdeathsig); wait until its
        # client port is free so a restart can bind it again.
        url = self.settings["etcd"]["embedded_client_url"]
        port = int(url.rsplit(":", 1)[1])
        import socket

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((self.host, port)) != 0:
                    return
            time.sleep(0.05)

    def cli(self, *args: str, input: str | None = None, check: bool = False):
        """Run `postroom --config <this node> ARGS...`; returns CompletedProcess."""
        return subprocess.run(
            [sys.executable, "-m", "node", "--config", str(self.config_path), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=str(REPO),
            timeout=60,
            check=check,
        )

    def cli_batch(self, commands: list[tuple[list[str], str]]) -> list[dict]:
        """Several ``postroom`` commands, (argv, stdin) each, in one process
        (tests/support/cli_batch.py): their ``{"rc", "stdout", "stderr"}`` in
        order.  argv includes ``--config``; see :meth:`cli_many` for this node."""
        batch = [{"argv": argv, "stdin": stdin} for argv, stdin in commands]
        result = subprocess.run([sys.executable, str(CLI_BATCH)], input=json.dumps(batch),
                                capture_output=True, text=True, env=self.env, cwd=str(REPO),
                                timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"cli_batch failed: {result.stderr.strip()[-2000:]}")
        return json.loads(result.stdout)

    def cli_many(self, *commands: tuple[tuple[str, ...], str]) -> list[str]:
        """(args, stdin) commands with this node's configuration in one
        process, in order; their stdouts, or RuntimeError naming the first
        that failed."""
        answers = self.cli_batch(
            [(["--config", str(self.config_path), *args], stdin) for args, stdin in commands])
        for (args, _), answer in zip(commands, answers, strict=True):
            if answer["rc"] != 0:
                raise RuntimeError(f"postroom {' '.join(args)} failed: {answer['stderr'].strip()}")
        return [a["stdout"] for a in answers]

    def add_user(self, address: str, password: str) -> None:
        self.cli_many((("user", "add", address), password + "\n"))

    def provision(self, *users: tuple[str, str]) -> None:
        """The demo fixture's domain and users (plus ``users``, (address,
        password) pairs of example.test), in one CLI process."""
        self.cli_many((("domain", "add", DOMAIN), ""),
                      *((("user", "add", a), p + "\n") for a, p in [*USERS.items(), *users]))

    def __enter__(self) -> NodeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
