#!/usr/bin/env python3
"""A small process supervisor for hosts without a running systemd (containers, CI).

Theory of operation
-------------------
A service is one JSON *spec* file (written by the Ansible roles)::

    {"name": "postroom", "argv": [...], "env": {...}, "cwd": "/", "user": "",
     "log": "/var/log/postroom/postroom.log", "run_dir": "/run/postroom",
     "ready_line": "postroom ready", "start_timeout": 60, "stop_timeout": 30,
     "restart": "always"}

``supervise.py start SPEC`` starts a detached *monitor* (``supervise.py run
SPEC`` in a session of its own, stdio on the log file), which starts the
service process and restarts it whenever it exits (``restart``: ``always``,
``on-failure`` or ``no``; backoff 1 s doubling to 30 s, reset after a minute
of uptime), the way systemd's ``Restart=`` would.  The service's stdout and
stderr are appended to ``log``; when a stdout line contains ``ready_line``
the monitor writes ``NAME.ready`` (the process id), and ``start`` returns
once that file names the current process (without a ready line: once the
process has stayed up for a second).  Pid files live in ``run_dir``:
``NAME.monitor`` and ``NAME.pid`` ("PID SID"); the monitor's pid is trusted
only while that process leads its own session, the service's only while it
is in the monitor's session (both survive an exec; a recycled pid fails).

``stop`` sends SIGTERM to the monitor, which forwards it to the service,
waits ``stop_timeout`` seconds, then SIGKILLs it.  ``restart`` is stop then
start.  ``status`` exits 0 when running, 3 when not (as LSB init scripts
do).  ``start`` and ``stop`` print ``started``/``running`` and
``stopped``/``not running``, which the roles use for ``changed_when``.
Standard library only; runs with any Python 3.8+.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

RUNNING, NOT_RUNNING, FAILED = 0, 3, 1
MIN_UPTIME = 1.0  # seconds a service without a ready line must stay up to count as started
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    spec["spec_path"] = os.path.abspath(path)
    spec.setdefault("run_dir", os.path.dirname(spec["spec_path"]))
    spec.setdefault("cwd", "/")
    spec.setdefault("env", {})
    spec.setdefault("user", "")
    spec.setdefault("ready_line", "")
    spec.setdefault("start_timeout", 60)
    spec.setdefault("stop_timeout", 30)
    spec.setdefault("restart", "always")
    return spec


def _file(spec: dict, suffix: str) -> str:
    return os.path.join(spec["run_dir"], f"{spec['name']}.{suffix}")


def _read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
    os.replace(tmp, path)


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid) if _alive(pid) else None
    except OSError:
        return None


def monitor_pid(spec: dict) -> int | None:
    """The live monitor of this spec, if any: it leads a session of its own."""
    pid = _read_pid(_file(spec, "monitor"))
    return pid if pid and _session(pid) == pid else None


def service_pid(spec: dict) -> int | None:
    """The live service process of this spec, if any (orphaned or not).

    NAME.pid holds "PID SID": the service runs in the session its monitor
    leads, and keeps that session id after an exec or the monitor's death."""
    try:
        with open(_file(spec, "pid"), encoding="ascii") as f:
            pid, sid = (int(x) for x in f.read().split())
        return pid if _session(pid) == sid else None
    except (OSError, ValueError):
        return None


def _log(spec: dict, message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(spec["log"], "a", encoding="utf-8") as f:
        f.write(f"{stamp} supervise[{os.getpid()}]: {spec['name']}: {message}\n")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)  # poll interval; /proc decides
    return not _alive(pid)


# -- the monitor ---------------------------------------------------------------


class Monitor:
    """Runs the service, copies its output to the log, restarts it when it exits."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.stopping = False
        self.proc: subprocess.Popen | None = None

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def _spawn(self, log) -> subprocess.Popen:
        spec = self.spec
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        env.update({k: str(v) for k, v in spec["env"].items()})
        kwargs: dict = {}
        user = spec["user"]
        if user and os.geteuid() == 0 and user != "root":
            import pwd

            entry = pwd.getpwnam(user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            env.setdefault("HOME", entry.pw_dir)
        return subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=log, **kwargs)

    def _run_once(self) -> int:
        spec = self.spec
        with open(spec["log"], "ab") as log:
            self.proc = self._spawn(log)
            _write(_file(spec, "pid"), f"{self.proc.pid} {os.getsid(0)}\n")
            _log(spec, f"started pid {self.proc.pid}")
            ready = spec["ready_line"].encode()
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if ready and ready in line:
                    _write(_file(spec, "ready"), f"{self.proc.pid}\n")
            try:
                code = self.proc.wait(spec["stop_timeout"] if self.stopping else None)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        _remove(_file(spec, "ready"))
        _log(spec, f"pid {self.proc.pid} exited with status {code}")
        return code

    def run(self) -> int:
        spec = self.spec
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        _write(_file(spec, "monitor"), f"{os.getpid()}\n")
        backoff = 1.0
        try:
            while not self.stopping:
                began = time.monotonic()
                code = self._run_once()
                if self.stopping or spec["restart"] == "no" or (
                        spec["restart"] == "on-failure" and code == 0):
                    break
                backoff = 1.0 if time.monotonic() - began > STABLE_AFTER else backoff
                _log(spec, f"restarting in {backoff:g} s")
                deadline = time.monotonic() + backoff
                while not self.stopping and time.monotonic() < deadline:
                    time.sleep(0.1)
                backoff = min(BACKOFF_MAX, backoff * 2)
        finally:
            _remove(_file(spec, "pid"), _file(spec, "monitor"))
        return 0


# -- commands ------------------------------------------------------------------


def _tail(spec: dict, lines: int = 20) -> str:
    try:
        with open(spec["log"], encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _wait_started(spec: dict, monitor: subprocess.Popen) -> int | None:
    """The service pid once it is ready (or up MIN_UPTIME), None if the monitor died."""
    deadline = time.monotonic() + float(spec["start_timeout"])
    up_since: tuple[int, float] | None = None
    while time.monotonic() < deadline:
        if monitor.poll() is not None:
            return None
        pid = service_pid(spec)
        if pid is not None:
            if spec["ready_line"]:
                if _read_pid(_file(spec, "ready")) == pid:
                    return pid
            elif up_since is None or up_since[0] != pid:
                up_since = (pid, time.monotonic())
            elif time.monotonic() - up_since[1] >= MIN_UPTIME:
                return pid
        time.sleep(0.1)  # poll interval; the pid and ready files decide
    return None


def cmd_start(spec: dict) -> int:
    monitor = monitor_pid(spec)
    if monitor is not None:
        print(f"running: monitor {monitor}, pid {service_pid(spec)}")
        return 0
    _stop_orphan(spec)
    os.makedirs(spec["run_dir"], exist_ok=True)
    os.makedirs(os.path.dirname(spec["log"]) or ".", exist_ok=True)
    _remove(_file(spec, "ready"))
    with open(spec["log"], "ab") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "run",
                                 spec["spec_path"]], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True, close_fds=True, cwd="/")
    pid = _wait_started(spec, proc)
    if pid is None:
        print(f"{spec['name']} did not start; last lines of {spec['log']}:\n{_tail(spec)}",
              file=sys.stderr)
        cmd_stop(spec)
        return FAILED
    print(f"started: monitor {proc.pid}, pid {pid}")
    return 0


def _stop_orphan(spec: dict) -> bool:
    """SIGTERM (then SIGKILL) a service process whose monitor is gone."""
    pid = service_pid(spec)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, float(spec["stop_timeout"])):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10.0)
    _remove(_file(spec, "pid"), _file(spec, "ready"))
    return True


def cmd_stop(spec: dict) -> int:
    monitor = monitor_pid(spec)
    stopped = False
    if monitor is not None:
        pid = service_pid(spec)
        os.kill(monitor, signal.SIGCONT)
        if pid is not None:
            os.kill(pid, signal.SIGCONT)  # a frozen (SIGSTOPped) service cannot exit
        os.kill(monitor, signal.SIGTERM)
        if not _wait_gone(monitor, float(spec["stop_timeout"]) + 5.0):
            os.kill(monitor, signal.SIGKILL)
            _wait_gone(monitor, 10.0)
        stopped = True
    stopped = _stop_orphan(spec) or stopped
    _remove(_file(spec, "monitor"), _file(spec, "ready"))
    print("stopped" if stopped else "not running")
    return 0


def cmd_status(spec: dict) -> int:
    monitor = monitor_pid(spec)
    if monitor is None:
        print("not running")
        return NOT_RUNNING
    print(f"running: monitor {monitor}, pid {service_pid(spec)}")
    return RUNNING


def main(argv: list[str]) -> int:
    commands = ("start", "stop", "restart", "status", "run")
    if len(argv) != 2 or argv[0] not in commands:
        print(f"usage: supervise.py {{{'|'.join(commands)}}} SPEC.json", file=sys.stderr)
        return 2
    spec = load(argv[1])
    if argv[0] == "run":
        return Monitor(spec).run()
    if argv[0] == "restart":
        with open(os.devnull, "w") as quiet:
            saved, sys.stdout = sys.stdout, quiet
            try:
                cmd_stop(spec)
            finally:
                sys.stdout = saved
        code = cmd_start(spec)
        if code == 0:
            print("restarted")
        return code
    return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status}[argv[0]](spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
