"""Per-IP connection limits and IPv6 listeners on a whole node (promise 4).

node/net/listener.py counts concurrent connections per client address for
each listener.  Over `max_connections_per_ip` a plaintext listener sends the
protocol's refusal line (SMTP `421 4.7.0`, RFC 5321 §4.2.5 / RFC 3463;
IMAP `* BYE`, RFC 3501 §7.1.5; POP3 `-ERR [SYS/TEMP]`, RFC 3206 §4) and
closes; an implicit-TLS listener closes without starting a session.  A slot
freed by a closing client is served again.

The node here listens on 127.0.0.1 and, when the kernel has an IPv6
loopback, on ::1 too: the IPv6 checks use real clients (smtplib, imaplib,
poplib) over ::1, and ::1 has its own per-IP count.
"""

from __future__ import annotations

import imaplib
import poplib
import resource
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.support.node import NodeProcess, to_toml

LIMIT = 3
DEADLINE = 15.0  # seconds for anything to happen on loopback
ALICE, ALICE_PW = "alice@example.test", "alice-pw-1234"

REFUSALS = {
    "smtp": b"421 4.7.0 ",
    "imap": b"* BYE ",
    "pop3": b"-ERR [SYS/TEMP] ",
    "submission": b"421 4.7.0 ",
}
GREETINGS = {
    "smtp": b"220 ",
    "imap": b"* OK",
    "imaps": b"* OK",
    "pop3": b"+OK",
    "pop3s": b"+OK",
    "submission": b"220 ",
    "submissions": b"220 ",
}


def ipv6_loopback_works() -> bool:
    """True if this kernel has a usable ::1 (has_ipv6 and ::1 binds)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port_v6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


HAS_IPV6 = ipv6_loopback_works()


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    """One node with small per-IP limits (and ::1 listeners when possible).

    Module-scoped (like node_factory, a node of its own: the limits here would
    disturb other modules' fixtures) so the checks below share one start.
    """
    limits = {"max_connections_per_ip": LIMIT}
    overrides: dict = {
        name: dict(limits) for name in ("smtp", "imap", "pop3", "submission")
    }
    node = NodeProcess(tmp_path_factory.mktemp("limits-node"), overrides)
    v6 = {}
    if HAS_IPV6:
        v6 = {name: free_port_v6() for name in ("smtp", "imap", "imaps", "pop3", "pop3s")}
        h, p = node.host, node.ports
        node.settings["smtp"]["listen"] = [f"{h}:{p['smtp']}", f"[::1]:{v6['smtp']}"]
        node.settings["imap"]["listen"] = [f"{h}:{p['imap']}", f"[::1]:{v6['imap']}"]
        node.settings["imap"]["listen_tls"] = [f"{h}:{p['imaps']}", f"[::1]:{v6['imaps']}"]
        node.settings["pop3"]["listen"] = [f"{h}:{p['pop3']}", f"[::1]:{v6['pop3']}"]
        node.settings["pop3"]["listen_tls"] = [f"{h}:{p['pop3s']}", f"[::1]:{v6['pop3s']}"]
        node.config_path.write_text(to_toml(node.settings))
    node.v6_ports = v6  # type: ignore[attr-defined]
    node.start()
    try:
        node.provision()
        yield node
    finally:
        if node.stop() is None:
            node.kill()


def client_tls(node: NodeProcess) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=node.cafile)
    ctx.check_hostname = False  # the self-signed certificate names mx.example.test
    return ctx


def read_line(sock: socket.socket, deadline: float) -> bytes:
    """One reply line (up to LF), or what arrived before EOF."""
    buf = b""
    while b"\n" not in buf:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def wait_closed(sock: socket.socket, deadline: float) -> bytes:
    """Read until the peer closes; returns everything read.  Fails at deadline."""
    buf = b""
    while True:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return buf
        if not chunk:
            return buf
        buf += chunk
        assert time.monotonic() < deadline and len(buf) < 65536, buf


def open_session(node: NodeProcess, name: str, host: str = "", port: int = 0) -> socket.socket:
    """A connection that got its greeting (so the listener counts it)."""
    host = host or node.host
    port = port or node.ports[name]
    sock = socket.create_connection((host, port), timeout=DEADLINE)
    if name in ("imaps", "pop3s", "submissions"):
        sock = client_tls(node).wrap_socket(sock, server_hostname="mx.example.test")
    line = read_line(sock, time.monotonic() + DEADLINE)
    assert line.startswith(GREETINGS[name]), (name, line)
    return sock


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def served_again(node: NodeProcess, name: str) -> socket.socket:
    """Poll with new connections until one gets a greeting (a slot was freed)."""
    deadline = time.monotonic() + DEADLINE
    last: object = None
    while time.monotonic() < deadline:
        try:
            return open_session(node, name)
        except (AssertionError, OSError) as exc:  # refused: the closed one not yet counted down
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{name}: no greeting after a slot was freed: {last!r}")


@pytest.mark.parametrize("name", ["smtp", "imap", "pop3", "submission"])
def test_plaintext_listener_refuses_over_limit_then_serves_again(node, name) -> None:
    socks = [open_session(node, name) for _ in range(LIMIT)]
    try:
        extra = socket.create_connection((node.host, node.ports[name]), timeout=DEADLINE)
        socks.append(extra)
        got = wait_closed(extra, time.monotonic() + DEADLINE)
        assert got.startswith(REFUSALS[name]) and got.endswith(b"\r\n"), got
        assert got.count(b"\n") == 1, got  # the refusal line and nothing else: no session
        socks[0].close()
        socks.append(served_again(node, name))
    finally:
        close_all(socks)


@pytest.mark.parametrize("name", ["imaps", "pop3s", "submissions"])
def test_implicit_tls_listener_closes_over_limit_without_session(node, name) -> None:
    socks = [open_session(node, name) for _ in range(LIMIT)]
    try:
        extra = socket.create_connection((node.host, node.ports[name]), timeout=DEADLINE)
        socks.append(extra)
        # Nothing is sent (no refusal line in the clear, no TLS server hello):
        # the client's handshake fails on a closed connection.
        with pytest.raises((ssl.SSLError, OSError)):
            tls = client_tls(node).wrap_socket(extra, server_hostname="mx.example.test")
            socks.append(tls)
            read_line(tls, time.monotonic() + DEADLINE)
            raise AssertionError("session started over the limit")
        socks[0].close()
        socks.append(served_again(node, name))
    finally:
        close_all(socks)


def test_quit_frees_the_slot_at_once(node) -> None:
    """A client that ends its session properly frees its slot (SMTP QUIT)."""
    socks = [open_session(node, "smtp") for _ in range(LIMIT)]
    try:
        socks[1].sendall(b"QUIT\r\n")
        assert read_line(socks[1], time.monotonic() + DEADLINE).startswith(b"221 ")
        assert wait_closed(socks[1], time.monotonic() + DEADLINE) == b""
        socks.append(served_again(node, "smtp"))
    finally:
        close_all(socks)


needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback (::1) on this kernel")


@needs_ipv6
def test_ipv6_smtp_imap_pop3_over_loopback(node) -> None:
    """Real clients over [::1]: deliver by SMTP, read by IMAP, IMAPS, POP3, POP3S."""
    v6 = node.v6_ports
    tag = uuid.uuid4().hex
    raw = f"From: carol@example.org\r\nTo: {ALICE}\r\nSubject: v6 {tag}\r\n\r\nover ::1\r\n"
    with smtplib.SMTP("::1", v6["smtp"], timeout=DEADLINE) as smtp:
        smtp.ehlo("client.example.org")
        smtp.sendmail("carol@example.org", [ALICE], raw)

    with imaplib.IMAP4("::1", v6["imap"], timeout=DEADLINE) as imap:
        imap.login(ALICE, ALICE_PW)
        imap.select("INBOX")
        typ, data = imap.search(None, "SUBJECT", f'"{tag}"')
        assert typ == "OK" and data[0].split(), data
        typ, fetched = imap.fetch(data[0].split()[-1], "(BODY.PEEK[TEXT])")
        assert typ == "OK" and b"over ::1" in fetched[0][1]

    tls = client_tls(node)
    with imaplib.IMAP4_SSL("::1", v6["imaps"], ssl_context=tls, timeout=DEADLINE) as imaps:
        imaps.login(ALICE, ALICE_PW)
        typ, data = imaps.status("INBOX", "(MESSAGES)")
        assert typ == "OK", data

    for pop in (
        poplib.POP3("::1", v6["pop3"], timeout=DEADLINE),
        poplib.POP3_SSL("::1", v6["pop3s"], context=client_tls(node), timeout=DEADLINE),
    ):
        try:
            pop.user(ALICE)
            pop.pass_(ALICE_PW)
            count, _ = pop.stat()
            assert count >= 1
            lines = pop.retr(count)[1]
            assert any(tag.encode() in line for line in lines)
        finally:
            pop.quit()


@needs_ipv6
def test_ipv6_limit_is_counted_per_address(node) -> None:
    """::1 has its own count: 127.0.0.1 at its limit does not refuse ::1, and
    ::1 over its own limit gets the refusal line."""
    v4 = [open_session(node, "smtp") for _ in range(LIMIT)]
    v6: list[socket.socket] = []
    try:
        v6 = [open_session(node, "smtp", "::1", node.v6_ports["smtp"]) for _ in range(LIMIT)]
        extra = socket.create_connection(("::1", node.v6_ports["smtp"]), timeout=DEADLINE)
        v6.append(extra)
        assert wait_closed(extra, time.monotonic() + DEADLINE).startswith(REFUSALS["smtp"])
    finally:
        close_all(v4 + v6)


def test_descriptor_exhaustion_keeps_node_serving(node_factory) -> None:
    """Connections from many addresses (each under its per-IP limit) must not
    use up the node's file descriptors: past its capacity (RLIMIT_NOFILE minus
    a reserve) the node stops accepting, an open session still delivers (a
    blob file and the shard database need descriptors), nothing is logged as
    a traceback, and once clients leave, new ones are served."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # inherited by the node
    try:
        victim = node_factory()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    first = open_session(victim, "smtp")
    flood: list[socket.socket] = []
    try:
        first.sendall(b"EHLO client.example.org\r\n")
        read_line(first, time.monotonic() + DEADLINE)
        for src in range(2, 32):  # 30 addresses x 20 = 600 connections > 512 descriptors
            for _ in range(20):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                flood.append(s)
                s.settimeout(DEADLINE)
                s.bind((f"127.0.0.{src}", 0))
                s.connect((victim.host, victim.ports["smtp"]))
        deadline = time.monotonic() + DEADLINE
        while "new connections wait" not in victim.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, victim.log_tail()
            time.sleep(0.05)
        # At capacity, the open session still delivers (RFC 5321 §4.1.1.4).
        first.sendall(b"MAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                      b"DATA\r\n")
        buf = b""
        deadline = time.monotonic() + DEADLINE
        while buf.count(b"\r\n") < 3:
            first.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = first.recv(4096)
            assert chunk, buf
            buf += chunk
        assert buf.split(b"\r\n")[2].startswith(b"354"), buf
        first.sendall(b"Subject: at capacity\r\n\r\nstill stored\r\n.\r\n")
        assert read_line(first, time.monotonic() + DEADLINE).startswith(b"250 "), buf
    finally:
        close_all(flood + [first])
    served_again(victim, "smtp").close()
    assert victim.proc is not None and victim.proc.poll() is None
    log = victim.log_path.read_text(errors="replace")
    where = log.find("Traceback")
    assert where < 0, log[max(0, where - 300) : where + 1500]
