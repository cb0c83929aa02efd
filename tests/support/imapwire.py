"""A minimal raw IMAP client for interop tests: exact bytes in and out.

imaplib hides literals, quoting and untagged responses that a differential
or transcript test must see.  ``Wire`` sends one command at a time and returns
every response line (literals inlined, as sent), and ``parse_value`` turns an
IMAP value (RFC 3501 §4, §9 ``nstring``/``astring``/lists) into Python: atoms
and NIL as ``str``/``None``, quoted strings and literals as ``bytes``, lists
as ``list``.  Quoted string and literal of the same octets parse alike.
"""

from __future__ import annotations

import re
import socket

LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r\n$")


class Wire:
    """One IMAP connection on a real socket, with a read deadline."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.tag_no = 0
        self.greeting = self.read_response_line()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response_line(self) -> bytes:
        """One response, with any literals it carries inlined."""
        out = self.read_line()
        while (m := LITERAL_AT_END.search(out)) is not None:
            out += self.read_exact(int(m.group(1)))
            out += self.read_line()
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_tag(self) -> str:
        self.tag_no += 1
        return f"t{self.tag_no}"

    def command(self, text: bytes, tag: str | None = None) -> tuple[bytes, list[bytes]]:
        """Send ``tag text``; return (tagged line, untagged/continuation lines).

        Synchronizing literals in ``text`` (``{n}\\r\\n``) wait for ``+``.
        """
        tag = tag or self.next_tag()
        chunks = re.split(rb"(\{\d+\}\r\n)", text)
        pending = tag.encode() + b" "
        untagged: list[bytes] = []
        for chunk in chunks:
            pending += chunk
            if re.fullmatch(rb"\{\d+\}\r\n", chunk):
                self.send(pending)
                pending = b""
                line = self.read_response_line()
                if not line.startswith(b"+"):
                    return line, untagged
        self.send(pending + b"\r\n")
        while True:
            line = self.read_response_line()
            if line.startswith(tag.encode() + b" "):
                return line, untagged
            untagged.append(line)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def peek(self) -> int:
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def skip_space(self) -> None:
        while self.pos < len(self.data) and self.data[self.pos] in b" \r\n":
            self.pos += 1


ATOM_END = b" ()[]{}\"\r\n"


def _value(r: _Reader):
    r.skip_space()
    c = r.peek()
    if c == ord("("):
        r.pos += 1
        items = []
        while True:
            r.skip_space()
            if r.peek() == ord(")"):
                r.pos += 1
                return items
            if r.peek() == -1:
                raise ValueError("unterminated list")
            items.append(_value(r))
    if c == ord('"'):
        r.pos += 1
        out = bytearray()
        while True:
            ch = r.data[r.pos]
            r.pos += 1
            if ch == ord("\\"):
                out.append(r.data[r.pos])
                r.pos += 1
            elif ch == ord('"'):
                return bytes(out)
            else:
                out.append(ch)
    if c == ord("{"):
        end = r.data.index(b"}", r.pos)
        n = int(r.data[r.pos + 1:end].rstrip(b"+"))
        start = end + 3  # "}\r\n"
        r.pos = start + n
        return r.data[start:start + n]
    start = r.pos
    # Atoms may carry a bracketed section: BODY[HEADER.FIELDS (A B)].
    depth = 0
    while r.pos < len(r.data):
        ch = r.data[r.pos]
        if ch == ord("["):
            depth += 1
        elif ch == ord("]"):
            depth -= 1
        elif depth == 0 and ch in ATOM_END:
            break
        r.pos += 1
    atom = r.data[start:r.pos].decode("latin-1")
    if r.pos == start:
        raise ValueError(f"unexpected octet at {r.pos}: {r.data[r.pos:r.pos + 20]!r}")
    return None if atom.upper() == "NIL" else atom


def parse_value(data: bytes):
    """Parse exactly one IMAP value from ``data``."""
    return _value(_Reader(data))


def parse_fetch(line: bytes) -> tuple[int, dict[str, object]]:
    """``* n FETCH (ITEM value ...)`` -> (n, {ITEM upper-cased: value})."""
    m = re.match(rb"\* (\d+) FETCH ", line)
    if m is None:
        raise ValueError(f"not a FETCH response: {line[:80]!r}")
    items = parse_value(line[m.end():])
    out: dict[str, object] = {}
    for name, value in zip(items[::2], items[1::2], strict=True):
        out[name.upper()] = value
    return int(m.group(1)), out
