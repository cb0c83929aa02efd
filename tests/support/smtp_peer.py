"""Receiving SMTP servers on loopback for outbound tests.

``SmtpPeer`` is a small scriptable SMTP server in a background thread (so it
works from plain pytest): the EHLO keywords it advertises, optional STARTTLS
with a self-signed test certificate, per-command replies taken in order from
a script, and a record of every connection and transaction it saw.

    with SmtpPeer(ehlo=["PIPELINING", "SIZE 1000"], replies={"RCPT": ["450 4.2.0 later"]}) as p:
        ... deliver to 127.0.0.1:p.port ...
        p.wait_for_messages(1)

``SmtpSink`` runs Postfix's own ``/usr/sbin/smtp-sink`` by PID, dumping
every transaction into a directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from node.net.tls import ensure_self_signed

DEFAULT_EHLO = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")


@dataclass
class Transaction:
    """One mail transaction as the peer received it."""

    mail_from: str  # the whole MAIL command line
    rcpt_to: list[str]  # every RCPT command line that got a 2xx
    data: bytes  # the message, dot-unstuffed (or BDAT chunks joined)
    tls: bool
    via: str  # "DATA" | "BDAT"
    helo: str


@dataclass
class Connection:
    peer: tuple
    commands: list[str] = field(default_factory=list)
    tls: bool = False
    bdat: bytes = b""  # BDAT chunks of the transaction in progress


class SmtpPeer:
    """A scriptable SMTP receiver on ``host``:``port`` (port 0 picks a free one).

    ``replies`` maps a verb ("GREETING", "EHLO", "MAIL", "RCPT", "DATA" for the
    354 step, "DATA_END" for the final reply, "BDAT", "RSET", "STARTTLS") to a
    list of reply lines used one per command, in order; when a list runs out
    the default reply is used.  ``starttls=True`` advertises STARTTLS and
    serves a self-signed certificate for ``hostname``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ehlo: Iterable[str] = DEFAULT_EHLO,
        starttls: bool = False,
        replies: Mapping[str, Iterable[str]] | None = None,
        hostname: str = "peer.test",
    ) -> None:
        self.host = host
        self.port = port
        self.ehlo = list(ehlo)
        self.starttls = starttls
        self.hostname = hostname
        self.script = {k.upper(): list(v) for k, v in (replies or {}).items()}
        self.transactions: list[Transaction] = []
        self.connections: list[Connection] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._server: socketserver.ThreadingTCPServer | None = None
        self._tmp: str | None = None
        self.tls_context: ssl.SSLContext | None = None

    # -- control ---------------------------------------------------------------

    def start(self) -> SmtpPeer:
        if self.starttls:
            self._tmp = tempfile.mkdtemp(prefix="smtp-peer-")
            cert, key = ensure_self_signed(Path(self._tmp), self.hostname)
            self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls_context.load_cert_chain(str(cert), str(key))
            self.certfile = str(cert)
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    peer._serve(self.request, self.client_address)
                except (OSError, ssl.SSLError):
                    pass

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Server(socketserver.ThreadingTCPServer):
            address_family = family
            allow_reuse_address = True
            daemon_threads = True

        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> SmtpPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_messages(self, n: int, timeout: float = 30.0) -> list[Transaction]:
        """Block until at least n transactions completed (deadline, no sleeps)."""
        with self.changed:
            ok = self.changed.wait_for(lambda: len(self.transactions) >= n, timeout)
            if not ok:
                raise TimeoutError(f"{len(self.transactions)} of {n} messages after {timeout}s")
            return list(self.transactions)

    def wait_for_connections(self, n: int, timeout: float = 30.0) -> list[Connection]:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.connections) >= n, timeout):
                raise TimeoutError(f"{len(self.connections)} of {n} connections after {timeout}s")
            return list(self.connections)

    def wait_for_command(self, verb: str, n: int = 1, timeout: float = 30.0) -> None:
        """Until ``verb`` was seen n times over all connections."""
        def seen() -> int:
            return sum(1 for c in self.connections for cmd in c.commands
                       if cmd.upper().startswith(verb.upper()))
        with self.changed:
            if not self.changed.wait_for(lambda: seen() >= n, timeout):
                raise TimeoutError(f"{verb} seen {seen()} of {n} times after {timeout}s")

    # -- the session ------------------------------------------------------------

    def _reply(self, verb: str, default: str) -> str:
        with self.lock:
            queue = self.script.get(verb)
            if queue:
                return queue.pop(0)
        return default

    def _serve(self, sock: socket.socket, address: tuple) -> None:
        conn = Connection(address)
        with self.changed:
            self.connections.append(conn)
            self.changed.notify_all()
        sock.settimeout(30)
        reader = sock.makefile("rb")
        tls = False
        helo = ""

        def send(text: str) -> None:
            sock.sendall(text.encode() + b"\r\n")

        def note(line: str) -> None:
            with self.changed:
                conn.commands.append(line)
                self.changed.notify_all()

        greeting = self._reply("GREETING", f"220 {self.hostname} ESMTP smtp_peer")
        send(greeting)
        if not greeting.startswith("2"):
            return
        mail: str | None = None
        rcpts: list[str] = []
        while True:
            raw = reader.readline(4096)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            note(line)
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                reply = self._reply("EHLO", "")
                if reply:
                    send(reply)
                    continue
                helo = line[5:]
                keywords = [k for k in self.ehlo if tls or k.upper() != "REQUIRETLS"]
                if self.starttls and not tls:
                    keywords.append("STARTTLS")
                lines = [self.hostname] + keywords
                send("\r\n".join(
                    f"250{'-' if i < len(lines) - 1 else ' '}{text}" for i, text in enumerate(lines)
                ))
            elif verb == "HELO":
                helo = line[5:]
                send(self._reply("HELO", f"250 {self.hostname}"))
            elif verb == "STARTTLS" and self.starttls and not tls:
                reply = self._reply("STARTTLS", "220 2.0.0 go ahead")
                send(reply)
                if reply.startswith("2"):
                    assert self.tls_context is not None
                    sock = self.tls_context.wrap_socket(sock, server_side=True)
                    reader = sock.makefile("rb")
                    tls = conn.tls = True
                    mail, rcpts, helo = None, [], ""
            elif verb == "STARTTLS":
                # Not offered (or already active), or scripted to break the
                # handshake: a "220" here followed by plaintext replies.
                send(self._reply("STARTTLS", "502 5.5.1 STARTTLS not available"))
            elif verb == "MAIL":
                reply = self._reply("MAIL", "250 2.1.0 ok")
                if reply.startswith("2"):
                    mail, rcpts = line, []
                send(reply)
            elif verb == "RCPT":
                reply = self._reply("RCPT", "250 2.1.5 ok")
                if reply.startswith("2") and mail is not None:
                    rcpts.append(line)
                send(reply)
            elif verb == "DATA":
                # RFC 5321 §3.3 / RFC 2920 §3.1: no accepted recipient, no
                # data (what Postfix answers to a pipelined DATA after them).
                reply = self._reply("DATA", "354 go ahead" if rcpts else
                                    "554 5.5.1 Error: no valid recipients")
                send(reply)
                if not reply.startswith("3"):
                    continue
                body = bytearray()
                while True:
                    chunk = reader.readline(65536)
                    if not chunk:
                        return
                    if chunk == b".\r\n":
                        break
                    body += chunk[1:] if chunk.startswith(b".") else chunk
                final = self._reply("DATA_END", "250 2.0.0 queued")
                self._record(final, mail, rcpts, bytes(body), tls, "DATA", helo)
                send(final)
                mail, rcpts = None, []
            elif verb == "BDAT":
                parts = line.split()
                size = int(parts[1])
                last = len(parts) > 2 and parts[2].upper() == "LAST"
                chunk = reader.read(size)
                pending = conn.bdat = conn.bdat + chunk
                reply = self._reply("BDAT", "250 2.0.0 chunk ok" if not last else "250 2.0.0 queued")
                if last:
                    self._record(reply, mail, rcpts, pending, tls, "BDAT", helo)
                    conn.bdat = b""
                    mail, rcpts = None, []
                send(reply)
            elif verb == "RSET":
                mail, rcpts = None, []
                send(self._reply("RSET", "250 2.0.0 ok"))
            elif verb == "NOOP":
                send("250 2.0.0 ok")
            elif verb == "QUIT":
                send("221 2.0.0 bye")
                return
            else:
                send("502 5.5.1 unknown command")

    def _record(self, reply: str, mail: str | None, rcpts: list[str], body: bytes, tls: bool,
                via: str, helo: str) -> None:
        if not reply.startswith("2") or mail is None:
            return
        with self.changed:
            self.transactions.append(Transaction(mail, list(rcpts), body, tls, via, helo))
            self.changed.notify_all()


class SmtpSink:
    """Postfix's ``smtp-sink`` on host:port by PID, dumping each message to a file."""

    binary = "/usr/sbin/smtp-sink"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, args: Iterable[str] = ()) -> None:
        from tests.support.etcd import free_port

        self.host = host
        self.port = port or free_port()
        self.args = list(args)
        self.dir = tempfile.mkdtemp(prefix="smtp-sink-")
        os.chmod(self.dir, 0o777)  # smtp-sink drops privileges to nobody when run as root
        self.proc: subprocess.Popen | None = None

    def start(self) -> SmtpSink:
        cmd = [self.binary, "-d", os.path.join(self.dir, "%H%M%S."), *self.args]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"{self.host}:{self.port}", "100"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtp-sink exited: {self.proc.stderr.read().decode()}")
            with socket.socket() as s:
                if s.connect_ex((self.host, self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("smtp-sink did not start")

    def messages(self) -> list[bytes]:
        """The dump files written so far (each one transaction, smtp-sink's format)."""
        out = []
        for name in sorted(os.listdir(self.dir)):
            with open(os.path.join(self.dir, name), "rb") as f:
                out.append(f.read())
        return out

    def wait_for_messages(self, n: int, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages()
            # A dump file is complete once smtp-sink has answered the final
            # "."; callers that need the whole body wait for the sender's 250.
            if len(found) >= n and all(found):
                return found
            time.sleep(0.05)
        raise TimeoutError(f"{len(self.messages())} of {n} messages in smtp-sink")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
