"""COMPRESS=DEFLATE (RFC 4978) around a connected socket.

After the tagged OK to ``COMPRESS DEFLATE`` both directions are raw DEFLATE
(RFC 1951, zlib wbits=-15).  Output is flushed with Z_SYNC_FLUSH after each
send so every response reaches the client at once (RFC 4978 §4).

Decompression is bounded: ``recv(n)`` returns at most n decompressed octets
and keeps the rest of the compressed input in zlib's unconsumed tail, so a
"zip bomb" costs no more memory than plain text: the framer's line and
literal caps end it, exactly as they would uncompressed.
"""

from __future__ import annotations

import zlib
from typing import Any

LEVEL = 6  # zlib's default trade-off; responses are small and frequent


class DeflateSocket:
    """A socket whose payload is DEFLATE-compressed (RFC 4978 §3)."""

    def __init__(self, sock: Any, pending: bytes = b"") -> None:
        self._sock = sock
        self._pending = pending  # compressed octets read before the switch
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self._deflate = zlib.compressobj(LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)

    def recv(self, n: int) -> bytes:
        """At most n decompressed octets; b"" at end of stream."""
        while True:
            src = self._inflate.unconsumed_tail
            if not src and self._pending:
                src, self._pending = self._pending, b""
            if not src:
                if self._inflate.eof:
                    return b""
                src = self._sock.recv(n)
                if not src:
                    return b""
            try:
                out = self._inflate.decompress(src, n)
            except zlib.error as exc:
                raise OSError("corrupt DEFLATE stream") from exc
            if out:
                return out
            if self._inflate.eof:
                return b""

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH))

    def __getattr__(self, name: str) -> Any:
        # settimeout, close, shutdown, fileno, ...: the underlying socket's.
        return getattr(self._sock, name)
