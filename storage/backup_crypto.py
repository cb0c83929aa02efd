"""The backup object format: AES-256-GCM in chunks, key files, object headers.

Theory of operation (the contract is docs/backup.md, "Objects in the target"):

    object = MAGIC | u32 header length (big-endian) | header JSON | body

The header is the object's manifest, readable without the key
(``read_header``): ``{"v": 1, "kind", "key_id", "nonce", "chunk",
"plain_size", "plain_sha256", "meta"}``.  The body is the plaintext cut into
``chunk``-octet pieces (the last one shorter; an empty plaintext is one empty
chunk), each sealed with AES-256-GCM under the nonce ``nonce (8 random bytes)
|| u32 chunk counter`` and the associated data ``header bytes || flag``, where
the flag is ``\\x01`` on the final chunk and ``\\x00`` otherwise.  So every
chunk authenticates the whole header (a tampered header fails), its position
(reordered chunks fail) and whether it ends the object (truncation at a chunk
boundary fails); the total length follows from ``plain_size``, so trailing or
missing octets fail too.  After decryption ``plain_sha256`` is checked.  Any
of these failures raises ``CorruptObject``; an object sealed under a key we do
not hold raises ``WrongKey`` before any decryption is attempted.

Large plaintexts stream: ``seal`` reads a ``Path`` twice (hash, then
encrypt) and writes to ``out``; ``SealedFile`` hashes once, then encrypts
on demand whatever range an upload asks for (``Target.put`` takes it: no
staging file, sealing overlaps the transfer); ``open_to_file`` decrypts a
sealed file into a destination file chunk by chunk.  Nothing holds a whole
snapshot twice.

Everything here is CPU-bound and blocking: in a gevent process call it through
``gevent.get_hub().threadpool.apply(...)`` (``seal``/``open_object``/
``open_to_file``), never directly on the hub.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import secrets
import stat
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"PRBK1\n"
VERSION = 1
CHUNK = 4 * 1024 * 1024  # plaintext octets per sealed chunk
TAG = 16  # GCM tag octets appended to every chunk
MAX_HEADER = 1024 * 1024  # a header longer than this is damage, not a manifest
MAX_CHUNK = 64 * 1024 * 1024
_LEN = struct.Struct(">I")
_PREFIX = len(MAGIC) + _LEN.size
_HEX = frozenset("0123456789abcdef")
_READ = 1024 * 1024  # read size while hashing a file


class BackupCryptoError(Exception):
    """Base of every error raised by this module."""


class KeyFileError(BackupCryptoError):
    """The key file is missing, unsafe (group/world accessible) or malformed."""


class CorruptObject(BackupCryptoError):
    """The object is damaged: bad header, truncation, bit flips, reordering."""


class WrongKey(BackupCryptoError):
    """The object was sealed under a key we do not hold.

    ``key_id_expected``: the id(s) of the key(s) we hold (comma-separated);
    ``key_id_found``: the ``key_id`` recorded in the object's header."""

    def __init__(self, key_id_expected: str, key_id_found: str) -> None:
        super().__init__(
            f"object sealed with key {key_id_found}, but the key file holds key {key_id_expected}"
        )
        self.key_id_expected = key_id_expected
        self.key_id_found = key_id_found


@dataclass(frozen=True)
class Key:
    """A 32-byte AES-256-GCM key; ``key_id`` names it in object headers."""

    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.material) != 32:
            raise KeyFileError("a backup key is exactly 32 octets")

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.material).hexdigest()[:16]


@dataclass(frozen=True)
class Header:
    """An object's manifest (the JSON header) and where its body starts."""

    kind: str
    key_id: str
    nonce: str  # 16 hex digits: the random half of every chunk nonce
    chunk: int
    plain_size: int
    plain_sha256: str
    meta: dict[str, Any]
    body_offset: int  # octets before the body: MAGIC + length + header JSON
    raw: bytes = field(repr=False, default=b"")  # the header JSON exactly as stored

    @property
    def chunks(self) -> int:
        return max(1, -(-self.plain_size // self.chunk))

    @property
    def sealed_size(self) -> int:
        """Total octets of the object this header describes."""
        return self.body_offset + self.plain_size + self.chunks * TAG


# -- keys -------------------------------------------------------------------


def parse_key(data: bytes) -> Key:
    """A key from 32 raw octets, 64 hex digits, or base64 of 32 octets."""
    if len(data) == 32:
        return Key(data)
    text = data.strip()
    if len(text) == 64:
        try:
            return Key(bytes.fromhex(text.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            pass
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:
        return Key(raw)
    raise KeyFileError("expected 32 raw octets, 64 hex digits, or base64 of 32 octets")


def load_key(path: str | os.PathLike[str]) -> Key:
    """Read a key file; refuse one that group or others may access."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise KeyFileError(f"backup key file {path}: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise KeyFileError(
                f"backup key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(4096)
    finally:
        os.close(fd)
    try:
        return parse_key(data)
    except KeyFileError as exc:
        raise KeyFileError(f"backup key file {path}: {exc}") from None


def generate_key_file(path: str | os.PathLike[str]) -> Key:
    """Write a fresh random key (64 hex digits) to a new 0600 file; never overwrite."""
    path = Path(path)
    key = Key(secrets.token_bytes(32))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"backup key file {path} exists; refusing to overwrite it") from None
    except OSError as exc:
        raise KeyFileError(f"backup key file {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits away, never added: be exact
        os.write(fd, key.material.hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


# -- sealing ----------------------------------------------------------------


def _nonce(prefix: bytes, counter: int) -> bytes:
    return prefix + struct.pack(">I", counter)


def _aad(header_raw: bytes, final: bool) -> bytes:
    return header_raw + (b"\x01" if final else b"\x00")


def _hash_plain(plaintext: bytes | Path) -> tuple[int, str]:
    if isinstance(plaintext, Path):
        h = hashlib.sha256()
        size = 0
        with open(plaintext, "rb") as f:
            while block := f.read(_READ):
                h.update(block)
                size += len(block)
        return size, h.hexdigest()
    return len(plaintext), hashlib.sha256(plaintext).hexdigest()


def _plain_chunks(plaintext: bytes | Path, size: int, chunk: int) -> Iterator[bytes | memoryview]:
    """The plaintext in chunk-sized pieces; exactly ``max(1, ceil(size/chunk))`` of them."""
    count = max(1, -(-size // chunk))
    if isinstance(plaintext, Path):
        with open(plaintext, "rb") as f:
            for i in range(count):
                piece = f.read(min(chunk, size - i * chunk))
                if len(piece) != min(chunk, size - i * chunk):
                    raise BackupCryptoError(f"{plaintext} changed while it was being sealed")
                yield piece
            if f.read(1):
                raise BackupCryptoError(f"{plaintext} changed while it was being sealed")
        return
    view = memoryview(plaintext)
    for i in range(count):
        yield view[i * chunk : (i + 1) * chunk]


def encode_header(
    key: Key, kind: str, size: int, sha256: str, meta: Mapping[str, Any], chunk: int = CHUNK
) -> tuple[bytes, bytes]:
    """(the prefix ``MAGIC | length | header JSON``, the 8-octet nonce prefix)."""
    nonce = secrets.token_bytes(8)
    doc = {
        "v": VERSION,
        "kind": kind,
        "key_id": key.key_id,
        "nonce": nonce.hex(),
        "chunk": chunk,
        "plain_size": size,
        "plain_sha256": sha256,
        "meta": dict(meta),
    }
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return MAGIC + _LEN.pack(len(raw)) + raw, nonce


def seal(
    key: Key,
    kind: str,
    plaintext: bytes | Path,
    meta: Mapping[str, Any],
    out: BinaryIO | None = None,
) -> bytes | None:
    """Seal ``plaintext`` (bytes, or a file read twice: hash then encrypt).

    Returns the sealed object, or writes it to ``out`` and returns None."""
    if not kind:
        raise ValueError("kind must not be empty")
    size, digest = _hash_plain(plaintext)
    prefix, nonce = encode_header(key, kind, size, digest, meta)
    header_raw = prefix[_PREFIX:]
    sink: BinaryIO = out if out is not None else io.BytesIO()
    sink.write(prefix)
    aead = AESGCM(key.material)
    count = max(1, -(-size // CHUNK))
    for i, piece in enumerate(_plain_chunks(plaintext, size, CHUNK)):
        sink.write(aead.encrypt(_nonce(nonce, i), piece, _aad(header_raw, i == count - 1)))
    if out is None:
        return sink.getvalue()  # type: ignore[attr-defined]
    return None


def seal_file(key: Key, kind: str, src: Path, dest: Path, meta: Mapping[str, Any]) -> None:
    """Seal the file ``src`` into the file ``dest`` (streamed).

    ``dest`` is an upload staging file: it is not fsynced (a crash loses
    nothing that the next upload would not redo)."""
    with open(dest, "wb") as out:
        seal(key, kind, src, meta, out)


class SealedFile:
    """A sealed object computed on demand from a plaintext file, for uploads
    without a staging file: one hashing pass gives the header and ``size``;
    ``read(offset, length)`` then encrypts just the chunks covering the range
    (from any thread, in any order: chunks are independent under GCM).

    The plaintext file must not change until the upload has finished (a
    changed length raises; changed content would fail the restore's
    ``plain_sha256`` check).  CPU-bound: call ``read`` from the threadpool
    (``Target.put`` does)."""

    _CACHE = 4  # sealed chunks kept: the parts of a multipart upload share boundary chunks

    def __init__(self, key: Key, kind: str, src: Path, meta: Mapping[str, Any]) -> None:
        self.src = Path(src)
        plain_size, digest = _hash_plain(self.src)
        self.prefix, self._nonce = encode_header(key, kind, plain_size, digest, meta)
        self.header = _parse_header(self.prefix[_PREFIX:])
        self.size = self.header.sealed_size
        self._aead = AESGCM(key.material)
        self._fd = os.open(self.src, os.O_RDONLY)
        self._cache: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def _sealed_chunk(self, index: int) -> bytes:
        with self._lock:
            cached = self._cache.get(index)
        if cached is not None:
            return cached
        h = self.header
        length = min(h.chunk, h.plain_size - index * h.chunk)
        piece = os.pread(self._fd, length, index * h.chunk)
        if len(piece) != length:
            raise BackupCryptoError(f"{self.src} changed while it was being sealed")
        sealed = self._aead.encrypt(
            _nonce(self._nonce, index), piece, _aad(h.raw, index == h.chunks - 1)
        )
        with self._lock:
            self._cache[index] = sealed
            while len(self._cache) > self._CACHE:
                del self._cache[next(iter(self._cache))]
        return sealed

    def read(self, offset: int, length: int) -> bytes:
        """``length`` octets of the sealed object from ``offset`` (fewer at its end)."""
        end = min(offset + length, self.size)
        out = []
        body = self.header.body_offset
        if offset < body:
            out.append(self.prefix[offset : min(end, body)])
            offset = min(end, body)
        span = self.header.chunk + TAG
        while offset < end:
            index, skip = divmod(offset - body, span)
            sealed = self._sealed_chunk(index)
            take = sealed[skip : skip + (end - offset)]
            out.append(take)
            offset += len(take)
        return b"".join(out)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SealedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading ----------------------------------------------------------------


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX


def _parse_header(raw: bytes) -> Header:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptObject(f"object header is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise CorruptObject("object header: unknown version")
    chunk, size = doc.get("chunk"), doc.get("plain_size")
    if not (
        isinstance(doc.get("kind"), str)
        and doc["kind"]
        and _is_hex(doc.get("key_id"), 16)
        and _is_hex(doc.get("nonce"), 16)
        and type(chunk) is int
        and 0 < chunk <= MAX_CHUNK
        and type(size) is int
        and size >= 0
        and _is_hex(doc.get("plain_sha256"), 64)
        and isinstance(doc.get("meta"), dict)
    ):
        raise CorruptObject("object header: missing or malformed fields")
    if -(-size // chunk) >= 2**32:
        raise CorruptObject("object header: too many chunks")
    return Header(
        kind=doc["kind"],
        key_id=doc["key_id"],
        nonce=doc["nonce"],
        chunk=chunk,
        plain_size=size,
        plain_sha256=doc["plain_sha256"],
        meta=doc["meta"],
        body_offset=_PREFIX + len(raw),
        raw=raw,
    )


def _header_from_prefix(read: Any) -> Header:
    """Parse the header from a ``read(n) -> bytes`` source positioned at 0."""
    start = read(_PREFIX)
    if len(start) < _PREFIX or start[: len(MAGIC)] != MAGIC:
        raise CorruptObject("not a postroom backup object (bad magic or truncated)")
    (length,) = _LEN.unpack(start[len(MAGIC) :])
    if not 0 < length <= MAX_HEADER:
        raise CorruptObject(f"object header length {length} is out of range")
    raw = read(length)
    if len(raw) != length:
        raise CorruptObject("object truncated inside its header")
    return _parse_header(raw)


def read_header(data: bytes | Path | BinaryIO) -> Header:
    """The header of a sealed object, without the key (NOT authenticated:
    fine for listings and wrong-key reports; ``open_object`` authenticates)."""
    if isinstance(data, Path):
        with open(data, "rb") as f:
            return _header_from_prefix(f.read)
    if isinstance(data, bytes | bytearray | memoryview):
        return _header_from_prefix(io.BytesIO(bytes(data)).read)
    return _header_from_prefix(data.read)


def _select_key(keys: Mapping[str, Key] | Key, header: Header) -> Key:
    if isinstance(keys, Key):
        keys = {keys.key_id: keys}
    key = keys.get(header.key_id)
    if key is None:
        raise WrongKey(",".join(sorted(keys)) or "(none)", header.key_id)
    return key


def _open_chunks(key: Key, header: Header, read: Any) -> Iterator[bytes]:
    """Decrypt the body read from ``read`` chunk by chunk; verify length and hash."""
    aead = AESGCM(key.material)
    prefix = bytes.fromhex(header.nonce)
    digest = hashlib.sha256()
    remaining = header.plain_size
    count = header.chunks
    for i in range(count):
        plain_len = min(header.chunk, remaining)
        sealed = read(plain_len + TAG)
        if len(sealed) != plain_len + TAG:
            raise CorruptObject(f"object truncated in chunk {i} of {count}")
        try:
            piece = aead.decrypt(_nonce(prefix, i), sealed, _aad(header.raw, i == count - 1))
        except Exception as exc:  # cryptography's InvalidTag: damage or a forged key id
            raise CorruptObject(f"chunk {i} of {count} failed authentication") from exc
        remaining -= plain_len
        digest.update(piece)
        yield piece
    if read(1):
        raise CorruptObject("trailing octets after the final chunk")
    if digest.hexdigest() != header.plain_sha256:
        raise CorruptObject("plaintext SHA-256 does not match the header")


def open_object(keys: Mapping[str, Key] | Key, data: bytes | Path) -> tuple[Header, bytes]:
    """Authenticate and decrypt a whole object: (header, plaintext).

    ``keys`` maps key ids to keys (old keys stay readable) or is one key.
    Raises ``WrongKey`` (by id, before decrypting) or ``CorruptObject``."""
    if isinstance(data, Path):
        with open(data, "rb") as f:
            header = _header_from_prefix(f.read)
            key = _select_key(keys, header)
            return header, b"".join(_open_chunks(key, header, f.read))
    src = io.BytesIO(data)
    header = _header_from_prefix(src.read)
    key = _select_key(keys, header)
    return header, b"".join(_open_chunks(key, header, src.read))


def open_to_file(keys: Mapping[str, Key] | Key, src: Path, dest: Path) -> Header:
    """Decrypt the sealed file ``src`` into ``dest`` chunk by chunk (fsynced).

    On any error ``dest`` is removed, so a partial plaintext never remains."""
    with open(src, "rb") as f:
        header = _header_from_prefix(f.read)
        key = _select_key(keys, header)
        try:
            with open(dest, "wb") as out:
                for piece in _open_chunks(key, header, f.read):
                    out.write(piece)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
    return header
