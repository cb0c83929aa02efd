"""Bad input and abuse against a whole node, on every listener (promise 4).

"No input, however malformed, large or slow, crashes a node, blocks other
clients, or corrupts stored data."  One node of our own (small size limits,
so the limits are reached quickly) gets, on SMTP, IMAP, IMAPS, POP3 and
POP3S: random bytes (fixed seed), keyword soup, NUL bytes, a 10 MB line with
no newline, an IMAP literal announcing 10^12 octets, thousands of pipelined
commands in one write, a TLS ClientHello on a plaintext port, plaintext on a
TLS port, connections closed mid-command, TLS handshakes left half done, and
a client trickling one byte per 100 ms.  Afterwards real clients (smtplib,
imaplib, poplib) are served, the process is alive, and its log has no
traceback (the listeners log unexpected exceptions with one).  Refused input
(a message over smtp.max_message_size, a literal over imap.max_literal_size,
an upload cut off midway) leaves the mailbox's STATUS unchanged.

Every loop is bounded in count and time; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import imaplib
import poplib
import random
import re
import select
import smtplib
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.support.node import NodeProcess

DEADLINE = 15.0  # seconds for any one exchange on loopback
ALICE, ALICE_PW = "alice@example.test", "alice-pw-1234"
BOB, BOB_PW = "bob@example.test", "bob-pw-1234"
CAROL, CAROL_PW = "carol@example.test", "carol-pw-1234"  # the fuzzers' own account
MAX_MESSAGE = 10_000
MAX_LITERAL = 20_000

LISTENERS = ["smtp", "imap", "imaps", "pop3", "pop3s", "submission", "submissions"]
TLS_LISTENERS = {"imaps", "pop3s", "submissions"}
PLAIN_LISTENERS = ["smtp", "imap", "pop3", "submission"]
GREETING = {"smtp": b"220 ", "imap": b"* OK", "pop3": b"+OK"}


def proto(name: str) -> str:
    """The wire protocol of a listener: submission (RFC 6409) speaks SMTP."""
    name = name.removesuffix("s") if name in TLS_LISTENERS else name
    return "smtp" if name == "submission" else name


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    """A node of our own (as node_factory gives) with small size limits.

    Module-scoped so the whole battery and the final log check share it.
    """
    overrides = {
        "smtp": {"max_message_size": MAX_MESSAGE},
        "imap": {"max_literal_size": MAX_LITERAL},
    }
    node = NodeProcess(tmp_path_factory.mktemp("bad-input-node"), overrides)
    node.start()
    try:
        node.provision((CAROL, CAROL_PW))
        yield node
    finally:
        if node.stop() is None:
            node.kill()


def client_tls(node: NodeProcess) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=node.cafile)
    ctx.check_hostname = False  # the self-signed certificate names mx.example.test
    return ctx


class Conn:
    """A raw client connection, plaintext or TLS (through a MemoryBIO so the
    TCP side can be half-closed and read to the end while TLS stays intact).

    Everything received is kept in `received`; reads never wait past the
    deadline given.
    """

    def __init__(self, node: NodeProcess, name: str, *, tls: bool | None = None) -> None:
        self.name = name
        self.raw = socket.create_connection((node.host, node.ports[name]), timeout=DEADLINE)
        self.received = bytearray()
        self.eof = False
        self.tls = None
        self.tls_error: ssl.SSLError | None = None
        if (name in TLS_LISTENERS) if tls is None else tls:
            self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = client_tls(node).wrap_bio(
                self.incoming, self.outgoing, server_hostname="mx.example.test"
            )
            deadline = time.monotonic() + DEADLINE
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    self._recv_raw(deadline)
                    assert not self.eof, "TLS handshake: connection closed"
            self._flush()

    def _flush(self) -> None:
        if self.tls is not None:
            data = self.outgoing.read()
            if data:
                self.raw.sendall(data)

    def _recv_raw(self, deadline: float) -> None:
        self.raw.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.raw.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return
        if self.tls is None:
            self.received += data
            return
        self.incoming.write(data)
        try:
            while True:
                self.received += self.tls.read(65536)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self.eof = True
        except ssl.SSLError as exc:  # an alert from the server ends the stream too
            self.tls_error = exc
            self.eof = True

    def send(self, data: bytes, chunk: int = 65536) -> bool:
        """Send in chunks, reading what is ready in between (so neither side
        blocks on a full buffer).  False if the server closed first."""
        try:
            for i in range(0, len(data), chunk):
                if self.tls is not None:
                    self.tls.write(data[i : i + chunk])
                    self._flush()
                else:
                    self.raw.settimeout(DEADLINE)
                    self.raw.sendall(data[i : i + chunk])
                self.poll()
                if self.eof:
                    return False
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def poll(self) -> None:
        """Read whatever is ready now, without waiting."""
        while not self.eof and select.select([self.raw], [], [], 0)[0]:
            self._recv_raw(time.monotonic() + DEADLINE)

    def read_until(self, done: Callable[[bytes], bool], deadline: float | None = None) -> bytes:
        """Read until done(received) or EOF; fails at the deadline."""
        deadline = deadline or time.monotonic() + DEADLINE
        while not done(bytes(self.received)) and not self.eof:
            assert time.monotonic() < deadline, (self.name, bytes(self.received[-300:]))
            self._recv_raw(deadline)
        return bytes(self.received)

    def lines(self, count: int) -> bytes:
        return self.read_until(lambda b: b.count(b"\n") >= count)

    def finish(self) -> bytes:
        """Half-close our side and read until the server closes (it must)."""
        if self.tls is not None:
            try:
                self.tls.unwrap()  # close_notify (RFC 8446 §6.1)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                pass  # the stream already ended (e.g. an alert arrived)
            try:
                self._flush()
            except OSError:
                pass  # the server closed first
        try:
            self.raw.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = self.read_until(lambda b: False)
        self.close()
        return out

    def close(self) -> None:
        try:
            self.raw.close()
        except OSError:
            pass


def reply_lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\r\n") if line]


SMTP_LINE = re.compile(rb"^[2-5][0-9][0-9][ -]")
IMAP_LINE = re.compile(rb"^(\* |\+ |\+$|[!-~]+ (OK|NO|BAD)( |$))")
POP3_LINE = re.compile(rb"^(\+OK|-ERR|\+ |\+$)")
SHAPE = {"smtp": SMTP_LINE, "imap": IMAP_LINE, "pop3": POP3_LINE}
ERROR = {
    "smtp": re.compile(rb"^[45][0-9][0-9][ -]", re.M),
    "imap": re.compile(rb"^(\* BYE|[!-~]+ BAD|[!-~]+ NO)", re.M),
    "pop3": re.compile(rb"^-ERR", re.M),
}


def check_replies(name: str, data: bytes, *, errors: bool = True) -> None:
    """Every line is a reply of the protocol (none echoes garbage as a bare
    line, none is a Python error), and when `errors` at least one says no."""
    kind = proto(name)
    lines = reply_lines(data)
    assert lines and lines[0].startswith(GREETING[kind]), (name, data[:200])
    for line in lines:
        assert SHAPE[kind].match(line), (name, line[:200])
        assert b"Traceback" not in line and b"Error:" not in line, (name, line[:200])
    if errors:
        assert ERROR[kind].search(data), (name, data[-300:])


def greeted(node: NodeProcess, name: str) -> Conn:
    conn = Conn(node, name)
    conn.lines(1)
    return conn


def login(conn: Conn, user: str, password: str) -> None:
    """Authenticate a greeted IMAP or POP3 connection (loopback plaintext allowed)."""
    kind = proto(conn.name)
    start = len(conn.received)
    if kind == "imap":
        conn.send(f'L1 LOGIN "{user}" "{password}"\r\n'.encode())
        data = conn.read_until(lambda b: b"\r\nL1 " in b[start - 2 :])
        assert b"L1 OK" in data[start:], data[start:]
    else:
        conn.send(f"USER {user}\r\nPASS {password}\r\n".encode())
        data = conn.read_until(lambda b: b[start:].count(b"\r\n") >= 2)
        assert data[start:].count(b"+OK") == 2, data[start:]


def node_alive(node: NodeProcess) -> None:
    assert node.proc is not None and node.proc.poll() is None, node.log_tail()


# ---------------------------------------------------------------- the battery


@pytest.mark.parametrize("name", LISTENERS)
def test_random_bytes_get_protocol_errors(node, name) -> None:
    rng = random.Random(f"postroom-random-{name}")
    for _ in range(4):
        conn = greeted(node, name)
        garbage = rng.randbytes(rng.randint(1, 4096)) + b"\r\n"
        conn.send(garbage)
        check_replies(name, conn.finish())
    node_alive(node)


KEYWORDS = {
    "smtp": ["EHLO", "HELO", "MAIL FROM:", "RCPT TO:", "DATA", "BDAT", "RSET", "NOOP",
             "VRFY", "EXPN", "HELP", "STARTTLS", "AUTH", "<>", "<a@b>", "SIZE=", "BODY=",
             "LAST", "\x00", "\xff", "<postmaster>", "@", ":", "%", "\"", "\\"],
    "imap": ["CAPABILITY", "NOOP", "LOGIN", "SELECT", "EXAMINE", "CREATE", "DELETE",
             "RENAME", "SUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND", "CHECK", "CLOSE",
             "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "UID", "IDLE", "ENABLE",
             "AUTHENTICATE", "PLAIN", "INBOX", "(", ")", "[", "]", "{3}", "{0}", "{99}",
             "\"", "\\", "*", "1:*", "4294967296", "0", "BODY[", "BODY.PEEK[HEADER]",
             "FLAGS", "+FLAGS", "\\Seen", "NIL", "~{1}", "\x00", "\xe9", "%", "&", "-1"],
    "pop3": ["USER", "PASS", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT",
             "TOP", "UIDL", "CAPA", "AUTH", "PLAIN", "STLS", "APOP", "*", "=", "0", "-1",
             "99999999999999999999", "\x00", "\xff"],
}


def keyword_soup(rng: random.Random, kind: str, lines: int) -> bytes:
    out = []
    for i in range(lines):
        words = [rng.choice(KEYWORDS[kind]) for _ in range(rng.randint(1, 6))]
        if kind == "imap":
            words.insert(0, f"k{i}")
        line = " ".join(words).encode("latin-1")
        ending = rng.choice([b"\r\n", b"\r\n", b"\n", b"\r\n"])
        out.append(line + ending)
    return b"".join(out)


SOUP_CASES = [(name, False) for name in LISTENERS] + [
    (name, True) for name in LISTENERS if proto(name) != "smtp"  # the MX role has no login
]


@pytest.mark.parametrize(("name", "authenticated"), SOUP_CASES)
def test_keyword_soup_gets_replies_not_crashes(node, name, authenticated) -> None:
    """Lines made of real keywords in random order: replies only, never a crash."""
    rng = random.Random(f"postroom-soup-{name}-{authenticated}")
    for _ in range(4):
        conn = greeted(node, name)
        if authenticated:
            login(conn, CAROL, CAROL_PW)
        conn.send(keyword_soup(rng, proto(name), rng.randint(5, 60)))
        data = conn.finish()
        lines = reply_lines(data)
        assert lines and lines[0].startswith(GREETING[proto(name)])
        assert b"Traceback" not in data
    node_alive(node)


@pytest.mark.parametrize("name", LISTENERS)
def test_nul_bytes_get_protocol_errors(node, name) -> None:
    for payload in (b"\x00" * 4096 + b"\r\n", b"NOOP\x00\r\n", b"\x00\r\n" * 50):
        conn = greeted(node, name)
        conn.send(payload)
        check_replies(name, conn.finish())
    node_alive(node)


@pytest.mark.parametrize("name", LISTENERS)
def test_ten_megabyte_line_without_newline(node, name) -> None:
    """Framing caps the line before parsing (RFC 5321 §4.5.3.1.4, RFC 2449 §4,
    imap.max_line_length), never buffering 10 MB while waiting for a LF.
    SMTP and POP3 discard the rest of the line, answer it with an error when
    it ends, and go on; IMAP cannot resynchronize and says BYE."""
    kind = proto(name)
    conn = greeted(node, name)
    prefix = b"a1 " if kind == "imap" else b""
    start = len(conn.received)  # POP3 answers as soon as the cap is passed
    conn.send(prefix + b"x" * (10 * 1024 * 1024))
    if kind == "imap":
        data = conn.finish()
        assert re.search(rb"\r\n\* BYE [^\r\n]*too long", data), data[-300:]
    else:
        conn.send(b"\r\nQUIT\r\n")
        data = conn.finish()[start:]
        lines = reply_lines(data)
        assert lines[0].startswith(b"500 5.5.2" if kind == "smtp" else b"-ERR"), data
        assert b"too long" in lines[0], data
        assert lines[-1].startswith(b"221 " if kind == "smtp" else b"+OK"), data
    node_alive(node)


def test_smtp_ten_megabyte_data_line(node) -> None:
    """Inside DATA: a 10 MB line with no newline hits the size cap (RFC 1870)
    and the line cap (RFC 5321 §4.5.3.1.6); the answer comes after the end of
    data, and nothing is stored."""
    before = mailbox_state(node, BOB, BOB_PW)
    conn = greeted(node, "smtp")
    conn.send(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    conn.read_until(lambda b: b"354 " in b)
    conn.send(b"Subject: long\r\n\r\n" + b"q" * (10 * 1024 * 1024))
    start = len(conn.received)
    conn.send(b"\r\n.\r\nNOOP\r\n")
    data = conn.read_until(lambda b: b[start:].count(b"\r\n") >= 2)[start:]
    assert re.match(rb"5[0-9][0-9] ", data), data
    assert b"\r\n250 " in data, data  # the session goes on
    conn.close()
    assert mailbox_state(node, BOB, BOB_PW) == before


@pytest.mark.parametrize("name", ["imap", "imaps"])
@pytest.mark.parametrize(
    "command",
    [b"t1 APPEND INBOX {1000000000000}\r\n", b"t1 APPEND INBOX (\\Seen) {1000000000000+}\r\n",
     b"t1 LOGIN {1000000000000}\r\n", b"t1 SEARCH TEXT {999999999999999999999}\r\n"],
    ids=["append-sync", "append-nonsync", "login", "search-overflow"],
)
def test_imap_literal_of_a_terabyte_is_refused(node, name, command) -> None:
    """RFC 3501 §4.3 / RFC 7889: a literal over imap.max_literal_size is refused
    before its octets are read (BAD [TOOBIG]) or the connection is closed (BYE)."""
    conn = greeted(node, name)
    if not command.startswith(b"t1 LOGIN"):
        login(conn, CAROL, CAROL_PW)
    start = len(conn.received)
    conn.send(command)
    data = conn.read_until(lambda b: b"t1 " in b[start:] or b"* BYE" in b[start:])
    reply = data[start:]
    assert re.search(rb"^(t1 BAD|t1 NO|\* BYE)", reply, re.M), reply
    assert not reply.startswith(b"+"), reply  # never invited to send 10^12 octets
    if not conn.eof and b"* BYE" not in reply:
        conn.send(b"t2 NOOP\r\n")  # the session goes on
        assert b"t2 OK" in conn.read_until(lambda b: b"t2 " in b[start:])
    conn.close()
    node_alive(node)


@pytest.mark.parametrize("size", [b"1000000000000", b"99999999999999999999999"])
def test_smtp_bdat_of_a_terabyte_is_refused(node, size) -> None:
    """RFC 3030 §2 chunk over smtp.max_message_size: an error reply, then close."""
    conn = greeted(node, "smtp")
    conn.send(b"EHLO client.example.org\r\nMAIL FROM:<x@example.org>\r\n"
              b"RCPT TO:<" + CAROL.encode() + b">\r\nBDAT " + size + b" LAST\r\n")
    data = conn.finish()
    check_replies("smtp", data)
    assert re.search(rb"^5[0-9][0-9] ", data.split(b"\r\n", 4)[-1], re.M), data


PIPELINE = 3000


@pytest.mark.parametrize("name", LISTENERS)
def test_thousands_of_pipelined_commands_in_one_write(node, name) -> None:
    """RFC 2920 / RFC 2449 §6.6 / RFC 3501 §5.5: each is answered, in order."""
    kind = proto(name)
    conn = greeted(node, name)
    if kind == "smtp":
        burst = b"EHLO client.example.org\r\n" + b"NOOP\r\n" * PIPELINE
        done = re.compile(rb"^250[ -]", re.M)
    elif kind == "imap":
        burst = b"".join(b"p%d NOOP\r\n" % i for i in range(PIPELINE))
        done = re.compile(rb"^p[0-9]+ OK", re.M)
    else:
        login(conn, CAROL, CAROL_PW)
        burst = b"NOOP\r\n" * PIPELINE
        done = re.compile(rb"^\+OK", re.M)
    start = len(conn.received)
    expected = PIPELINE + (3 if kind == "pop3" else 0)  # greeting, USER and PASS before
    conn.send(burst, chunk=len(burst))  # one write
    if kind == "smtp":
        # EHLO's multiline reply ends in one "250 " line; NOOPs one each.
        data = conn.read_until(lambda b: len(re.findall(rb"^250 ", b[start:], re.M)) > PIPELINE)
        assert len(re.findall(rb"^250 ", data[start:], re.M)) == PIPELINE + 1
    else:
        data = conn.read_until(lambda b: len(done.findall(b)) >= expected)
        assert len(done.findall(data)) == expected
        if kind == "imap":  # in order
            tags = re.findall(rb"^p([0-9]+) OK", data, re.M)
            assert [int(t) for t in tags] == list(range(PIPELINE))
    conn.send(b"pq LOGOUT\r\n" if kind == "imap" else b"QUIT\r\n")
    conn.finish()  # POP3: the maildrop lock is released before the next test logs in
    node_alive(node)


def client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello record)."""
    out = ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    assert hello[:1] == b"\x16"  # TLS handshake record
    return hello


@pytest.mark.parametrize("name", PLAIN_LISTENERS)
def test_tls_client_hello_on_a_plaintext_port(node, name) -> None:
    conn = greeted(node, name)
    conn.send(client_hello())
    data = conn.finish()
    lines = reply_lines(data)
    assert lines[0].startswith(GREETING[proto(name)])
    for line in lines:
        assert SHAPE[proto(name)].match(line), line[:200]
    node_alive(node)


@pytest.mark.parametrize("name", sorted(TLS_LISTENERS))
@pytest.mark.parametrize(
    "payload",
    [b"EHLO client.example.org\r\n", b"a1 LOGIN alice pw\r\n", b"GET / HTTP/1.0\r\n\r\n",
     b"\x16\x03\x01\xff\xff" + b"\x00" * 300, b"\x80\x00"],
    ids=["smtp", "imap", "http", "bad-record", "sslv2ish"],
)
def test_plaintext_on_a_tls_port_is_closed(node, name, payload) -> None:
    """A failed handshake ends the connection; nothing is served in the clear."""
    raw = socket.create_connection((node.host, node.ports[name]), timeout=DEADLINE)
    try:
        try:
            raw.sendall(payload)
            raw.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already closed by the server: what this test wants
        got = b""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                chunk = raw.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        else:
            raise AssertionError("TLS port kept a failed handshake open")
        assert b"OK" not in got and b"ERR" not in got, got  # at most a TLS alert
        assert not got or got[:1] == b"\x15", got
    finally:
        raw.close()
    node_alive(node)


STARTTLS_COMMANDS = {
    "smtp": (b"EHLO c\r\nSTARTTLS\r\n", b"220 2.0.0"),  # RFC 3207 §4
    "imap": (b"s1 STARTTLS\r\n", b"s1 OK"),  # RFC 3501 §6.2.1
    "pop3": (b"STLS\r\n", b"+OK"),  # RFC 2595 §4
}


@pytest.mark.parametrize("name", PLAIN_LISTENERS)
def test_plaintext_after_starttls_is_closed(node, name) -> None:
    """After the go-ahead for TLS, plaintext is a failed handshake: the
    connection closes and nothing more is answered in the clear."""
    command, ok = STARTTLS_COMMANDS[proto(name)]
    conn = greeted(node, name)
    start = len(conn.received)
    conn.send(command)
    conn.read_until(lambda b: ok in b[start:] and b[start:].endswith(b"\r\n"))
    after = len(conn.received)
    conn.send(b"QUIT\r\nEHLO again\r\na1 LOGIN carol x\r\nUSER carol\r\n")
    rest = conn.finish()[after:]
    assert not rest or rest[:1] == b"\x15", rest  # at most a TLS alert record
    node_alive(node)


@pytest.mark.parametrize("name", LISTENERS)
def test_connection_storm_with_resets(node, name) -> None:
    """Hundreds of connections reset (RST) at once, some before the greeting,
    some mid-handshake: every slot is released and the listener serves on."""
    linger = struct.pack("ii", 1, 0)  # close() sends RST
    hello = client_hello()
    for i in range(200):
        s = socket.create_connection((node.host, node.ports[name]), timeout=DEADLINE)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        if i % 3 == 1:
            s.sendall(hello[:40] if name in TLS_LISTENERS else b"NOOP\r\n")
        s.close()
    # Slots are released as each server notices its reset; poll until the
    # listener greets again (its per-IP limit is far below 200).
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            greeted(node, name).close()
            break
        except (AssertionError, OSError):
            assert time.monotonic() < deadline, f"{name}: not serving after the storm"
            time.sleep(0.05)
    node_alive(node)


MID_COMMAND = {
    "smtp": [b"EH", b"EHLO x\r\nMAIL FROM:<a@exam", b"EHLO x\r\nBDAT 100 LAST\r\nabc",
             b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<carol@example.test>\r\nDATA\r\nSubject: cut"],
    "imap": [b"a1 LOG", b"a1 LOGIN {5}\r\nca", b"a1 LOGIN carol {20}\r\ncarol-pw",
             b'a1 LOGIN "carol@example.test" "carol-pw-1234"\r\na2 APPEND INBOX {100}\r\nFrom:'],
    "pop3": [b"US", b"USER carol@example.test\r\nPA", b"AUTH PLAIN\r\n",
             b"USER carol@example.test\r\nPASS carol-pw-1234\r\nRETR 1\r\nDELE 1\r\nLI"],
}


@pytest.mark.parametrize("name", LISTENERS)
def test_connection_closed_mid_command(node, name) -> None:
    for cut in MID_COMMAND[proto(name)]:
        conn = greeted(node, name)
        conn.send(cut)
        conn.poll()
        conn.close()  # abrupt: no QUIT, no FIN from a finished command
    # The next client on the same listener is served at once.
    conn = greeted(node, name)
    conn.close()
    node_alive(node)


def test_imap_list_wildcards_do_not_block_the_hub(node_factory) -> None:
    """RFC 3501 §6.3.8 wildcards from a client must not stall other clients:
    while one LIST with many wildcards runs, SMTP still greets and answers."""
    victim = node_factory()  # its own node: a blocked hub would sink the others
    try:
        conn = greeted(victim, "imap")
        login(conn, ALICE, ALICE_PW)
        start = len(conn.received)
        conn.send(b'w0 CREATE "' + b"b" * 60 + b'"\r\n')
        assert b"w0 OK" in conn.read_until(lambda b: b"w0 " in b[start:])[start:]
        conn.send(b'w1 LIST "" "' + b"*%" * 8 + b'x"\r\n')
        started = time.monotonic()
        other = Conn(victim, "smtp")
        # Generous (a stuck hub stays stuck for minutes; a loaded machine is slow).
        other.read_until(lambda b: b.endswith(b"\r\n"), started + DEADLINE)
        other.send(b"NOOP\r\n")
        other.read_until(lambda b: b.count(b"\r\n") >= 2, started + DEADLINE)
        assert re.search(rb"\r\n250 ", bytes(other.received)), bytes(other.received)
        other.close()
        reply = conn.read_until(lambda b: b"w1 " in b[start:], started + 2 * DEADLINE)[start:]
        assert b"w1 OK" in reply, reply
    finally:
        victim.kill()  # SIGKILL: a hub stuck in a regex ignores SIGTERM


# ------------------------------------------------------- bad input changes nothing


def mailbox_state(node: NodeProcess, user: str, password: str) -> tuple[int, int]:
    """(MESSAGES, UIDNEXT) of INBOX by a fresh IMAP STATUS (RFC 3501 §6.3.10)."""
    with imaplib.IMAP4(node.host, node.ports["imap"], timeout=DEADLINE) as imap:
        imap.login(user, password)
        typ, data = imap.status("INBOX", "(MESSAGES UIDNEXT)")
        assert typ == "OK", data
    m = re.search(rb"MESSAGES (\d+) UIDNEXT (\d+)", data[0])
    assert m, data
    return int(m.group(1)), int(m.group(2))


def test_oversized_data_is_refused_and_changes_nothing(node) -> None:
    """RFC 1870 §6: over the SIZE limit gives 552, and no message is stored."""
    before = mailbox_state(node, BOB, BOB_PW)
    big = (b"Subject: too big\r\n\r\n" + b"y" * 78 + b"\r\n") * (MAX_MESSAGE // 60)
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=DEADLINE) as smtp:
        smtp.ehlo("client.example.org")
        code, _ = smtp.mail("x@example.org")
        assert code == 250
        assert smtp.rcpt(BOB)[0] == 250
        code, reply = smtp.data(big)
        assert code == 552 and reply.startswith(b"5.3.4"), (code, reply)
        # Declared too big up front (RFC 1870 §6.1): refused at MAIL.
        smtp.rset()
        code, _ = smtp.mail("x@example.org", [f"SIZE={MAX_MESSAGE * 2}"])
        assert code == 552, code
        # The session is still usable after the refusals.
        assert smtp.noop()[0] == 250
    # BDAT chunk over the cap (RFC 3030 §2).
    conn = greeted(node, "smtp")
    conn.send(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<bob@example.test>\r\n"
              b"BDAT %d LAST\r\n" % (MAX_MESSAGE * 3) + b"z" * (MAX_MESSAGE * 3))
    check_replies("smtp", conn.finish())
    assert mailbox_state(node, BOB, BOB_PW) == before


def test_oversized_append_is_refused_and_changes_nothing(node) -> None:
    """A literal over imap.max_literal_size: NO or BAD [TOOBIG] (RFC 7889 §4),
    no continuation, nothing appended, the session goes on."""
    before = mailbox_state(node, BOB, BOB_PW)
    conn = greeted(node, "imap")
    login(conn, BOB, BOB_PW)
    start = len(conn.received)
    conn.send(b"A1 APPEND INBOX {%d}\r\n" % (MAX_LITERAL + 1))
    reply = conn.read_until(lambda b: b"A1 " in b[start:])[start:]
    assert re.match(rb"A1 (NO|BAD) \[TOOBIG\]", reply), reply
    # A client that sends the octets anyway: they are read as (bad) commands,
    # never appended.
    conn.send(b"From: x\r\n\r\n" + b"w" * 100 + b"\r\nA2 NOOP\r\n")
    reply = conn.read_until(lambda b: b"A2 " in b[start:])[start:]
    assert b"A2 OK" in reply, reply
    conn.close()
    with imaplib.IMAP4(node.host, node.ports["imap"], timeout=DEADLINE) as imap:
        imap.login(BOB, BOB_PW)
        try:
            typ, data = imap.append("INBOX", None, None, b"x" * (MAX_LITERAL + 10))
        except imaplib.IMAP4.error as exc:  # imaplib raises on BAD
            typ, data = "BAD", [str(exc).encode()]
        assert typ in ("NO", "BAD") and b"TOOBIG" in data[0], (typ, data)
        assert imap.noop()[0] == "OK"
    assert mailbox_state(node, BOB, BOB_PW) == before


def test_uploads_cut_off_midway_change_nothing(node) -> None:
    """A DATA or APPEND literal whose connection drops stores nothing
    (promise 1's other side: only a completed, acknowledged write counts)."""
    before = mailbox_state(node, BOB, BOB_PW)
    conn = greeted(node, "smtp")
    conn.send(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
              b"Subject: cut\r\n\r\nhalf a message\r\n")
    conn.read_until(lambda b: b"354 " in b)
    conn.close()
    conn = greeted(node, "smtp")
    conn.send(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<bob@example.test>\r\n"
              b"BDAT 500 LAST\r\nSubject: cut\r\n\r\nhalf")
    conn.poll()
    conn.close()
    conn = greeted(node, "imap")
    login(conn, BOB, BOB_PW)
    conn.send(b"A1 APPEND INBOX {500}\r\n")
    conn.read_until(lambda b: b"\r\n+" in b)
    conn.send(b"Subject: cut\r\n\r\nhalf")
    conn.close()
    # Each server notices the close (poll with new sessions until STATUS is
    # stable is not needed: a cut upload never stores anything, so the state
    # must equal `before` at any time).
    assert mailbox_state(node, BOB, BOB_PW) == before
    greeted(node, "smtp").finish()  # the SMTP listener still serves
    assert mailbox_state(node, BOB, BOB_PW) == before


# -------------------------------------------- slow and hanging clients, then health


def half_done_handshakes(node: NodeProcess) -> list[socket.socket]:
    """TLS handshakes left hanging: a partial ClientHello, a whole one never
    continued, and STARTTLS/STLS answered but never followed by a handshake."""
    hello = client_hello()
    socks = []
    for name in sorted(TLS_LISTENERS):
        for payload in (hello[:10], hello):
            s = socket.create_connection((node.host, node.ports[name]), timeout=DEADLINE)
            s.sendall(payload)
            socks.append(s)
    for name, (command, ok) in STARTTLS_COMMANDS.items():
        conn = greeted(node, name)
        start = len(conn.received)
        conn.send(command)
        assert ok in conn.read_until(lambda b, ok=ok, start=start: ok in b[start:])[start:]
        conn.raw.sendall(hello[:20])
        socks.append(conn.raw)
    return socks


class Trickler(threading.Thread):
    """Sends one command one byte per 100 ms until stopped (bounded), then its
    end of line, and keeps the reply."""

    def __init__(self, node: NodeProcess, name: str, head: bytes, done: bytes) -> None:
        super().__init__(daemon=True)
        self.conn = greeted(node, name)
        self.head, self.done = head, done
        self.stop = threading.Event()
        self.sent = 0
        self.reply = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            start = len(self.conn.received)
            for i in range(150):  # at most 15 s
                if self.stop.is_set() and i >= len(self.head):
                    break
                byte = self.head[i : i + 1] or b"x"
                self.conn.raw.sendall(byte)
                self.sent += 1
                time.sleep(0.1)  # the pace of the attack, not a wait for anything
            self.conn.raw.sendall(b"\r\n")
            self.reply = self.conn.read_until(lambda b: self.done in b[start:])[start:]
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.conn.close()


def well_behaved_round(node: NodeProcess) -> None:
    """smtplib delivers, imaplib reads it back, poplib reads it; TLS logins too."""
    tag = uuid.uuid4().hex
    with smtplib.SMTP(node.host, node.ports["smtp"], timeout=DEADLINE) as smtp:
        smtp.sendmail("x@example.org", [ALICE],
                      f"Subject: ok {tag}\r\nTo: {ALICE}\r\n\r\nstill fine\r\n")
    with imaplib.IMAP4(node.host, node.ports["imap"], timeout=DEADLINE) as imap:
        imap.login(ALICE, ALICE_PW)
        imap.select("INBOX", readonly=True)
        typ, data = imap.search(None, "SUBJECT", f'"{tag}"')
        assert typ == "OK" and len(data[0].split()) == 1, data
        typ, body = imap.fetch(data[0].split()[0], "(BODY.PEEK[TEXT])")
        assert typ == "OK" and b"still fine" in body[0][1]
    pop = poplib.POP3(node.host, node.ports["pop3"], timeout=DEADLINE)
    try:
        pop.user(ALICE)
        pop.pass_(ALICE_PW)
        count, _ = pop.stat()
        assert any(tag.encode() in line for line in pop.retr(count)[1])
    finally:
        pop.quit()
    with imaplib.IMAP4_SSL(node.host, node.ports["imaps"], ssl_context=client_tls(node),
                           timeout=DEADLINE) as imaps:
        imaps.login(ALICE, ALICE_PW)
    pops = poplib.POP3_SSL(node.host, node.ports["pop3s"], context=client_tls(node),
                           timeout=DEADLINE)
    try:
        pops.user(ALICE)
        pops.pass_(ALICE_PW)
        assert pops.stat()[0] >= 1
    finally:
        pops.quit()


class NoopProber(threading.Thread):
    """Another SMTP client: NOOP after NOOP (bounded), noting when each is answered."""

    def __init__(self, node: NodeProcess) -> None:
        super().__init__(daemon=True)
        self.conn = greeted(node, "smtp")
        self.stop = threading.Event()
        self.answered: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in range(100_000):
                if self.stop.is_set():
                    break
                start = len(self.conn.received)
                self.conn.raw.sendall(b"NOOP\r\n")
                self.conn.read_until(lambda b, start=start: b[start:].endswith(b"\r\n"))
                self.answered.append(time.monotonic())
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.conn.close()


def test_smtp_fast_data_stream_does_not_starve_others(node) -> None:
    """A client streaming 24 MB of DATA as fast as loopback allows must not
    keep the hub to itself: gevent's recv returns at once while bytes are
    buffered, so a read loop that never has to wait never yields.  Another
    client's NOOPs must be answered while the stream is still being read
    (an ordering check, not a benchmark).  Over the size cap, nothing is
    stored (RFC 1870 §6)."""
    before = mailbox_state(node, BOB, BOB_PW)
    prober = NoopProber(node)
    conn = greeted(node, "smtp")
    conn.send(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    conn.read_until(lambda b: b"354 " in b)
    prober.start()
    deadline = time.monotonic() + DEADLINE
    while len(prober.answered) < 3:  # the prober is running
        assert prober.is_alive() and time.monotonic() < deadline, prober.error
        time.sleep(0.01)
    start = len(conn.received)
    began = time.monotonic()
    conn.send(b"Subject: flood\r\n\r\n" + (b"f" * 76 + b"\r\n") * (24 * 1024 * 1024 // 78))
    conn.send(b".\r\n")
    reply = conn.read_until(lambda b: b[start:].endswith(b"\r\n"), time.monotonic() + 60)[start:]
    ended = time.monotonic()
    prober.stop.set()
    prober.join(DEADLINE)
    conn.close()
    assert prober.error is None, prober.error
    assert reply.startswith(b"552 5.3.4"), reply
    during = [t for t in prober.answered if began < t < ended]
    assert len(during) >= 10, (
        f"{len(during)} NOOPs answered during {ended - began:.2f} s of streaming"
    )
    assert mailbox_state(node, BOB, BOB_PW) == before


def flood_while_probing(node: NodeProcess, name: str, flood: bytes, last: bytes) -> bytes:
    """Send `flood` on a logged-in session and read until `last` arrives, while
    a NoopProber keeps asking; fails unless the prober was answered at least
    10 times during the flood (an ordering check, not a benchmark)."""
    prober = NoopProber(node)
    conn = greeted(node, name)
    login(conn, CAROL, CAROL_PW)
    prober.start()
    deadline = time.monotonic() + DEADLINE
    while len(prober.answered) < 3:  # the prober is running
        assert prober.is_alive() and time.monotonic() < deadline, prober.error
        time.sleep(0.01)
    start = len(conn.received)
    began = time.monotonic()
    conn.send(flood)
    data = conn.read_until(lambda b: last in b[start:], time.monotonic() + 60)[start:]
    ended = time.monotonic()
    prober.stop.set()
    prober.join(DEADLINE)
    conn.close()
    assert prober.error is None, prober.error
    during = [t for t in prober.answered if began < t < ended]
    assert len(during) >= 10, (
        f"{len(during)} NOOPs answered during {ended - began:.2f} s of the flood"
    )
    return data


def test_pop3_pipelined_flood_does_not_starve_others(node) -> None:
    """A logged-in POP3 client pipelining 100,000 NOOPs (RFC 2449 §6.6) and
    reading the answers as fast as they come: every one is answered, and
    another client is served meanwhile."""
    count = 100_000
    data = flood_while_probing(node, "pop3", b"NOOP\r\n" * count + b"QUIT\r\n", b"signing off")
    assert data.count(b"+OK\r\n") == count


def test_imap_pipelined_flood_does_not_starve_others(node) -> None:
    """The same for IMAP (RFC 3501 §5.5): 60,000 pipelined NOOPs, all answered,
    and another client served meanwhile."""
    count = 60_000
    flood = b"".join(b"f%d NOOP\r\n" % i for i in range(count))
    data = flood_while_probing(node, "imap", flood, b"f%d " % (count - 1))
    assert len(re.findall(rb"^f[0-9]+ OK", data, re.M)) == count


def test_trickling_and_hanging_clients_do_not_block_others(node) -> None:
    """While clients trickle commands byte by byte and TLS handshakes hang,
    other clients are served: a whole SMTP → IMAP → POP3 round finishes well
    within 5 s (liveness, not a benchmark: one round takes ~0.1 s here)."""
    hanging = half_done_handshakes(node)
    tricklers = [
        Trickler(node, "smtp", b"NOOP ", b"250 "),
        Trickler(node, "imap", b'tr LOGIN "', b"tr "),
        Trickler(node, "pop3", b"NOOP", b"-ERR"),  # NOOP x... in AUTHORIZATION: -ERR
    ]
    try:
        for t in tricklers:
            t.start()
        deadline = time.monotonic() + DEADLINE
        while min(t.sent for t in tricklers) < 5:  # every trickler is mid-command
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        well_behaved_round(node)
        elapsed = time.monotonic() - started
        assert elapsed < 5.0, f"a well-behaved round took {elapsed:.1f} s"
        assert all(t.is_alive() for t in tricklers)  # still trickling meanwhile
    finally:
        for t in tricklers:
            t.stop.set()
        for t in tricklers:
            t.join(DEADLINE + 20)
        for s in hanging:
            s.close()
    for t in tricklers:
        assert t.error is None, t.error
        assert t.done in t.reply, t.reply  # the trickled command got its answer
    node_alive(node)


def test_well_behaved_clients_still_served_after_the_battery(node) -> None:
    deadline = time.monotonic() + DEADLINE
    well_behaved_round(node)
    assert time.monotonic() < deadline
    node_alive(node)


def test_no_traceback_in_the_node_log(node) -> None:
    """Runs last: nothing above raised an unexpected exception in the node
    (the listeners and servers log those with log.exception)."""
    node_alive(node)
    log = node.log_path.read_text(errors="replace")
    where = log.find("Traceback")
    assert where < 0, log[max(0, where - 1000) : where + 3000]
    assert "postroom.listener: smtp listening" in log  # the log is the node's
