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
staging file, sealing overlaps the transfer; ``parts`` cuts the object at
sealed-chunk boundaries so each chunk is sealed exactly once);
``open_to_file`` decrypts a sealed file into a destination file chunk by
chunk.  Downloads need no sealed staging file either: ``ChunkOpener`` takes
chunk-aligned ranges of the object in any order, from any thread, decrypts
each as it arrives and writes it at its offset (the SHA-256 runs in chunk
order as chunks become contiguous), and ``open_remote_to_file`` drives it
with a target's parallel ranged GETs.  Nothing holds a whole snapshot twice.

Everything here is CPU-bound and blocking: in a gevent process call it through
``gevent.get_hub().threadpool.apply(...)`` (``seal``/``open_object``/
``open_to_file``), never directly on the hub.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import hashlib
import io
import json
import os
import secrets
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

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
_READ = 4 * 1024 * 1024  # read size while hashing a file
RANGE_SIZE = 8 * 1024 * 1024  # octets per ranged read while opening remotely
HEADER_GUESS = 64 * 1024  # octets fetched to read a header (more if it is longer)
HASH_WINDOW = 8  # decrypted chunks held for the in-order hash; further ones are re-read


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


def chunk_ranges(header: Header, part_size: int, with_header: bool) -> list[tuple[int, int]]:
    """(offset, length) ranges of the sealed object that hold whole chunks,
    each at least ``part_size`` octets except the last, in order.  The first
    starts at 0 (``with_header``) or at the body; the last ends the object."""
    span = header.chunk + TAG
    per = max(1, -(-part_size // span))
    ranges = []
    for first in range(0, header.chunks, per):
        last = min(header.chunks, first + per)
        start = 0 if first == 0 and with_header else header.body_offset + first * span
        end = header.sealed_size if last == header.chunks else header.body_offset + last * span
        ranges.append((start, end - start))
    return ranges


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


def _seal_into(aead: AESGCM, nonce: bytes, data: memoryview, aad: bytes, out: memoryview) -> None:
    """Ciphertext and tag of ``data`` written into ``out`` (len(data) + TAG octets)."""
    if hasattr(aead, "encrypt_into"):  # cryptography >= 45: no intermediate object
        aead.encrypt_into(nonce, data, aad, out)
    else:
        out[:] = aead.encrypt(nonce, data, aad)


def _hash_plain(plaintext: bytes | Path) -> tuple[int, str]:
    if isinstance(plaintext, Path):
        h = hashlib.sha256()
        size = 0
        buf = bytearray(_READ)
        view = memoryview(buf)
        with open(plaintext, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                size += n
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
        self._local = threading.local()  # per-thread plaintext scratch buffer

    def parts(self, part_size: int) -> list[tuple[int, int]]:
        """(offset, length) of upload parts cut at sealed-chunk boundaries:
        whole chunks each (the first part also holds the header), at least
        ``part_size`` octets except the last, so every chunk is sealed once,
        by the one part that holds it, and no part is copied from pieces."""
        return chunk_ranges(self.header, part_size, with_header=True)

    def _seal(self, index: int) -> bytes:
        h = self.header
        length = min(h.chunk, h.plain_size - index * h.chunk)
        piece = os.pread(self._fd, length, index * h.chunk)
        if len(piece) != length:
            raise BackupCryptoError(f"{self.src} changed while it was being sealed")
        return self._aead.encrypt(
            _nonce(self._nonce, index), piece, _aad(h.raw, index == h.chunks - 1)
        )

    def _sealed_chunk(self, index: int) -> bytes:
        """A chunk sealed for a range that holds part of it (cached: the
        neighbouring range needs the rest)."""
        with self._lock:
            cached = self._cache.get(index)
        if cached is not None:
            return cached
        sealed = self._seal(index)
        with self._lock:
            self._cache[index] = sealed
            while len(self._cache) > self._CACHE:
                del self._cache[next(iter(self._cache))]
        return sealed

    def _whole_chunks(self, offset: int, end: int) -> bytearray | None:
        """The range as one buffer when it holds whole chunks only (what
        ``parts`` asks for): each chunk read into a per-thread scratch buffer
        and sealed straight into its place, no piece copied twice."""
        h = self.header
        body, span = h.body_offset, h.chunk + TAG
        start = body if offset == 0 else offset
        first, skip = divmod(start - body, span)
        if skip or start < body or (offset == 0 and end < body):
            return None
        last, rest = divmod(end - body, span)
        if end == h.sealed_size:
            last = h.chunks
        elif rest:
            return None
        out = bytearray(end - offset)
        view = memoryview(out)
        view[: start - offset] = self.prefix[offset:start]
        scratch = getattr(self._local, "buf", None)
        if scratch is None:
            scratch = self._local.buf = memoryview(bytearray(h.chunk))
        pos = start - offset
        for index in range(first, last):
            length = min(h.chunk, h.plain_size - index * h.chunk)
            if os.preadv(self._fd, [scratch[:length]], index * h.chunk) != length:
                raise BackupCryptoError(f"{self.src} changed while it was being sealed")
            _seal_into(
                self._aead,
                _nonce(self._nonce, index),
                scratch[:length],
                _aad(h.raw, index == h.chunks - 1),
                view[pos : pos + length + TAG],
            )
            pos += length + TAG
        return out

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """``length`` octets of the sealed object from ``offset`` (fewer at its end)."""
        end = min(offset + length, self.size)
        if end > offset and (whole := self._whole_chunks(offset, end)) is not None:
            return whole
        out = []
        h = self.header
        body = h.body_offset
        if offset < body:
            out.append(self.prefix[offset : min(end, body)])
            offset = min(end, body)
        span = h.chunk + TAG
        while offset < end:
            index, skip = divmod(offset - body, span)
            whole = min(h.chunk, h.plain_size - index * h.chunk) + TAG
            if skip == 0 and end - offset >= whole:
                sealed = self._seal(index)  # the whole chunk is in this range: no cache
            else:
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


# -- opening from ranges ------------------------------------------------------


def _load_writeback() -> Callable[[int, int, int], None]:
    """``sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)``: start
    writing a range back without waiting, so the final fsync has little left
    to do.  A no-op where the call does not exist (durability still comes
    from that fsync)."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        call(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; a failure leaves it to fsync

    return start


_start_writeback = _load_writeback()


class _OrderedHash:
    """SHA-256 of chunks handed in any order, from any thread, hashed in chunk
    order.  At most ``HASH_WINDOW`` chunks wait in memory; a chunk further
    ahead is dropped and re-read with ``reread(index)`` when its turn comes."""

    def __init__(self, count: int, reread: Callable[[int], bytes]) -> None:
        self.count = count
        self._reread = reread
        self._sha = hashlib.sha256()
        self._next = 0
        self._ready: dict[int, bytes | None] = {}  # None: re-read it
        self._lock = threading.Lock()
        self._turn = threading.Lock()  # held by the one thread hashing

    def add(self, index: int, piece: bytes) -> None:
        with self._lock:
            if index < self._next or index in self._ready:
                return
            self._ready[index] = piece if index - self._next < HASH_WINDOW else None
        self._drain()

    def _drain(self) -> None:
        while self._turn.acquire(blocking=False):
            try:
                self._hash_ready()
            finally:
                self._turn.release()
            with self._lock:
                if self._next not in self._ready:
                    return

    def _hash_ready(self) -> None:
        while True:
            with self._lock:
                if self._next not in self._ready:
                    return
                piece = self._ready.pop(self._next)
                index = self._next
            self._sha.update(piece if piece is not None else self._reread(index))
            with self._lock:
                self._next += 1

    def hexdigest(self) -> str:
        """The digest once every chunk was added (else BackupCryptoError)."""
        with self._turn:
            self._hash_ready()
            if self._next != self.count:
                raise BackupCryptoError(f"chunk {self._next} of {self.count} was never opened")
            return self._sha.hexdigest()


class ChunkOpener:
    """Decrypts a sealed object into ``dest`` from chunk-aligned ranges of it
    (``ranges``), fed in any order and from any thread (``feed``): each chunk
    is authenticated, decrypted and written at its offset as it arrives.
    ``finish`` checks that every chunk came and the plaintext SHA-256, then
    fsyncs ``dest``; ``abort`` (or an error in ``finish``) removes ``dest``.

    ``object_size`` is the whole object's length as the target reports it:
    anything but the header's ``sealed_size`` is truncation or trailing
    octets.  CPU-bound: call ``feed`` from the threadpool."""

    def __init__(
        self, keys: Mapping[str, Key] | Key, header: Header, object_size: int, dest: Path
    ) -> None:
        key = _select_key(keys, header)
        if object_size < header.sealed_size:
            raise CorruptObject(f"object truncated: {object_size} of {header.sealed_size} octets")
        if object_size > header.sealed_size:
            raise CorruptObject("trailing octets after the final chunk")
        self.header = header
        self.dest = Path(dest)
        self._aead = AESGCM(key.material)
        self._prefix = bytes.fromhex(header.nonce)
        self._fd = os.open(self.dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self._hash = _OrderedHash(header.chunks, self._reread)
        try:
            os.ftruncate(self._fd, header.plain_size)
        except BaseException:
            self.abort()
            raise

    def ranges(self, part_size: int) -> list[tuple[int, int]]:
        """The body in chunk-aligned ranges of about ``part_size`` octets."""
        return chunk_ranges(self.header, part_size, with_header=False)

    def _plain_len(self, index: int) -> int:
        return min(self.header.chunk, self.header.plain_size - index * self.header.chunk)

    def _reread(self, index: int) -> bytes:
        return os.pread(self._fd, self._plain_len(index), index * self.header.chunk)

    def feed(self, offset: int, data: bytes) -> None:
        """Open the whole chunks in ``data``, the object's octets from ``offset``."""
        h = self.header
        span = h.chunk + TAG
        index, skip = divmod(offset - h.body_offset, span)
        if offset < h.body_offset or skip:
            raise ValueError(f"offset {offset} is not at a chunk boundary")
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if index >= h.chunks:
                raise CorruptObject("trailing octets after the final chunk")
            length = self._plain_len(index) + TAG
            sealed = view[pos : pos + length]
            if len(sealed) != length:
                raise CorruptObject(f"object truncated in chunk {index} of {h.chunks}")
            try:
                piece = self._aead.decrypt(
                    _nonce(self._prefix, index), sealed, _aad(h.raw, index == h.chunks - 1)
                )
            except Exception as exc:  # InvalidTag: damage or a forged key id
                raise CorruptObject(f"chunk {index} of {h.chunks} failed authentication") from exc
            os.pwrite(self._fd, piece, index * h.chunk)
            _start_writeback(self._fd, index * h.chunk, len(piece))
            self._hash.add(index, piece)
            pos += length
            index += 1

    def finish(self) -> Header:
        """Check completeness and the SHA-256, fsync ``dest``; the header."""
        try:
            if self._hash.hexdigest() != self.header.plain_sha256:
                raise CorruptObject("plaintext SHA-256 does not match the header")
            os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._fd = -1
        return self.header

    def abort(self) -> None:
        """Close and remove ``dest`` (a partial plaintext never remains)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.dest.unlink(missing_ok=True)


class RangeSource(Protocol):
    """What ``open_remote_to_file`` needs of a target (storage/backup_target.py)."""

    def head(self, key: str) -> Any: ...

    def get_range(self, key: str, offset: int, length: int, etag: str | None = None) -> bytes: ...

    def get_ranges(
        self,
        key: str,
        ranges: list[tuple[int, int]],
        handle: Callable[[int, bytes], None],
        etag: str | None = None,
    ) -> None: ...


def header_from(fetch: Callable[[int, int], bytes]) -> Header:
    """Parse a header through ``fetch(offset, length) -> bytes`` (one request
    of ``HEADER_GUESS`` octets, a second one only for a longer header)."""
    data = fetch(0, HEADER_GUESS)
    if len(data) >= _PREFIX and data[: len(MAGIC)] == MAGIC:
        (length,) = _LEN.unpack(data[len(MAGIC) : _PREFIX])
        if _PREFIX + length > len(data) and 0 < length <= MAX_HEADER:
            data = fetch(0, _PREFIX + length)
    return read_header(data)


def _direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def open_remote_to_file(
    keys: Mapping[str, Key] | Key,
    source: RangeSource,
    key: str,
    dest: Path,
    part_size: int | None = None,
    run: Callable[..., Any] = _direct,
) -> Header:
    """Download and decrypt object ``key`` into ``dest`` (fsynced) with no
    sealed staging copy: the header first, then the body as chunk-aligned
    ranged reads of about ``part_size`` (default: the source's ``part_size``)
    through ``source.get_ranges`` (in parallel on S3), each opened as it
    arrives.  ``WrongKey`` before any body is fetched; ``CorruptObject`` for
    damage; the source's own errors (e.g. NoSuchObject) pass through.  On
    any error ``dest`` is removed.  ``run(fn, *args)`` runs the blocking file
    work (open, the last hashing, fsync): a gevent caller passes a threadpool
    runner and calls this from a greenlet (the source offloads ``feed``)."""
    info = source.head(key)
    if info is None:
        source.get_range(key, 0, 1)  # the source's own "no such object" error
        raise CorruptObject(f"object {key} vanished while it was read")
    etag = getattr(info, "etag", None)
    header = header_from(lambda offset, length: source.get_range(key, offset, length, etag))
    opener = run(ChunkOpener, keys, header, info.size, Path(dest))
    try:
        size = part_size or getattr(source, "part_size", RANGE_SIZE)
        source.get_ranges(key, opener.ranges(size), opener.feed, etag)
    except BaseException:
        run(opener.abort)
        raise
    return run(opener.finish)
