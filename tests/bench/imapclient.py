"""A minimal IMAP client over raw sockets for the benchmarks (not a test module).

Blocking socket calls; the bench processes monkey-patch with gevent first, so
many clients run as greenlets in one process.  It reads responses with their
literals (``{n}`` then n octets) and returns the lines up to the tagged one;
it checks only what a benchmark needs: the tagged status.
"""

from __future__ import annotations

import re
import socket
import time

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")


class ImapError(Exception):
    pass


class Client:
    """One connection; ``cmd`` sends a tagged command and waits for its end."""

    def __init__(self, host: str, port: int, timeout: float = 120.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.n = 0
        self.bytes_in = 0
        self.greeting = self.readline()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ImapError("connection closed")
        self.bytes_in += len(data)
        self.buf += data

    def readline(self) -> bytes:
        """One response line, literals included (CRLF kept)."""
        out = bytearray()
        start = 0
        while True:
            i = self.buf.find(b"\r\n", start)
            if i < 0:
                start = max(0, len(self.buf) - 1)
                self._fill()
                continue
            line = bytes(self.buf[: i + 2])
            del self.buf[: i + 2]
            out += line
            m = _LITERAL.search(line)
            if m is None:
                return bytes(out)
            size = int(m.group(1))
            while len(self.buf) < size:
                self._fill()
            out += self.buf[:size]
            del self.buf[:size]
            start = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, text: str | bytes, ok: bool = True) -> list[bytes]:
        """Send ``TAG text`` and return every line through the tagged reply."""
        self.n += 1
        tag = b"t%d" % self.n
        body = text.encode() if isinstance(text, str) else text
        self.sock.sendall(tag + b" " + body + b"\r\n")
        return self.wait(tag, ok)

    def wait(self, tag: bytes, ok: bool = True) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            line = self.readline()
            lines.append(line)
            if line.startswith(tag + b" "):
                if ok and not line.startswith(tag + b" OK"):
                    raise ImapError(line.decode(errors="replace").strip())
                return lines

    def timed(self, text: str | bytes) -> tuple[float, list[bytes]]:
        t0 = time.perf_counter()
        lines = self.cmd(text)
        return time.perf_counter() - t0, lines

    def login(self, user: str, password: str) -> None:
        self.cmd(f'LOGIN "{user}" "{password}"')

    def append(self, mailbox: str, raw: bytes, flags: str = "") -> list[bytes]:
        """APPEND with a synchronizing literal (RFC 3501 §7.5)."""
        self.n += 1
        tag = b"t%d" % self.n
        head = f'{tag.decode()} APPEND "{mailbox}" {flags} {{{len(raw)}}}\r\n'.replace("  ", " ")
        self.sock.sendall(head.encode())
        line = self.readline()
        if not line.startswith(b"+"):
            raise ImapError(line.decode(errors="replace").strip())
        self.sock.sendall(raw + b"\r\n")
        return self.wait(tag)

    def idle_start(self) -> None:
        self.n += 1
        self.idle_tag = b"t%d" % self.n
        self.sock.sendall(self.idle_tag + b" IDLE\r\n")
        line = self.readline()
        if not line.startswith(b"+"):
            raise ImapError(line.decode(errors="replace").strip())

    def idle_done(self) -> list[bytes]:
        self.sock.sendall(b"DONE\r\n")
        return self.wait(self.idle_tag)


def capabilities(client: Client) -> set[str]:
    for line in client.cmd("CAPABILITY"):
        if line.startswith(b"* CAPABILITY "):
            return set(line[13:].decode().upper().split())
    return set()
