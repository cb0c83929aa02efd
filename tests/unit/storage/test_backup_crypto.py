"""The backup object format (storage/backup_crypto.py, docs/backup.md):
round trips, key files, and damage of every kind detected."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.backup_crypto import (
    CHUNK,
    HASH_WINDOW,
    MAGIC,
    TAG,
    BackupCryptoError,
    ChunkOpener,
    CorruptObject,
    Key,
    KeyFileError,
    SealedFile,
    WrongKey,
    _OrderedHash,
    generate_key_file,
    load_key,
    open_object,
    open_to_file,
    read_header,
    seal,
)

KEY = Key(bytes(range(32)))
OTHER = Key(bytes(range(1, 33)))
META = {"shard": 3, "first": 10, "last": 12, "prev": None}
PREFIX = len(MAGIC) + 4


def _payload(size: int) -> bytes:
    return os.urandom(size)


def _with_header(obj: bytes, edit) -> bytes:
    """The object with its header JSON replaced by edit(doc), length fixed up."""
    header = read_header(obj)
    doc = json.loads(header.raw)
    edit(doc)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + obj[header.body_offset :]


# -- round trips --------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 20 * 1024 * 1024])
def test_round_trip_bytes(size: int) -> None:
    plain = _payload(size)
    sealed = seal(KEY, "blob", plain, META)
    header, opened = open_object(KEY, sealed)
    assert opened == plain
    assert header.kind == "blob"
    assert header.key_id == KEY.key_id
    assert header.plain_size == size
    assert header.plain_sha256 == hashlib.sha256(plain).hexdigest()
    assert header.meta == META
    assert header.chunk == CHUNK
    assert header.sealed_size == len(sealed)
    assert len(sealed) == header.body_offset + size + max(1, -(-size // CHUNK)) * TAG


@pytest.mark.parametrize("size", [0, CHUNK, 20 * 1024 * 1024 + 7])
def test_round_trip_files_streamed(tmp_path: Path, size: int) -> None:
    src, sealed, dest = tmp_path / "plain", tmp_path / "sealed", tmp_path / "out"
    src.write_bytes(_payload(size))
    with open(sealed, "wb") as out:
        assert seal(KEY, "snapshot", src, {"shard": 1}, out) is None
    header = open_to_file({OTHER.key_id: OTHER, KEY.key_id: KEY}, sealed, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert header.kind == "snapshot" and header.plain_size == size
    assert read_header(sealed) == header
    # the file and bytes paths read the same object
    assert open_object(KEY, sealed)[1] == src.read_bytes()
    assert open_object(KEY, sealed.read_bytes())[1] == src.read_bytes()


def test_each_seal_uses_a_fresh_nonce() -> None:
    a, b = seal(KEY, "blob", b"same", {}), seal(KEY, "blob", b"same", {})
    assert read_header(a).nonce != read_header(b).nonce
    assert a[read_header(a).body_offset :] != b[read_header(b).body_offset :]


def test_header_is_readable_without_the_key() -> None:
    sealed = seal(KEY, "etcd", b"{}", {"revision": 7})
    header = read_header(sealed)
    assert (header.kind, header.key_id, header.meta) == ("etcd", KEY.key_id, {"revision": 7})
    doc = json.loads(header.raw)
    assert set(doc) == {
        "v",
        "kind",
        "key_id",
        "nonce",
        "chunk",
        "plain_size",
        "plain_sha256",
        "meta",
    }
    assert doc["v"] == 1 and len(doc["nonce"]) == 16


# -- damage -------------------------------------------------------------------

SMALL = seal(KEY, "segment", b'[1, 1, 1700000000.0, "append", {}]\n' * 3, META)


def _flip(obj: bytes, bit: int) -> bytes:
    data = bytearray(obj)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def test_every_single_bit_flip_in_a_small_object_is_detected() -> None:
    for bit in range(len(SMALL) * 8):
        with pytest.raises((CorruptObject, WrongKey)):
            open_object(KEY, _flip(SMALL, bit))


TWO_CHUNKS = seal(KEY, "blob", _payload(CHUNK + 100), {})


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=len(TWO_CHUNKS) * 8 - 1))
def test_bit_flips_anywhere_in_a_two_chunk_object_are_detected(bit: int) -> None:
    with pytest.raises((CorruptObject, WrongKey)):
        open_object(KEY, _flip(TWO_CHUNKS, bit))


def test_truncation_at_every_chunk_boundary(tmp_path: Path) -> None:
    plain = _payload(2 * CHUNK + 10)
    sealed = seal(KEY, "blob", plain, {})
    header = read_header(sealed)
    cuts = [0, len(MAGIC), PREFIX, header.body_offset - 1, header.body_offset]
    cuts += [header.body_offset + i * (CHUNK + TAG) for i in (1, 2)]
    cuts += [len(sealed) - 1, len(sealed) - TAG]
    for cut in cuts:
        with pytest.raises(CorruptObject):
            open_object(KEY, sealed[:cut])
        path = tmp_path / "cut"
        path.write_bytes(sealed[:cut])
        with pytest.raises(CorruptObject):
            open_to_file(KEY, path, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_an_empty_object_without_its_final_chunk_is_corrupt() -> None:
    sealed = seal(KEY, "blob", b"", {})
    with pytest.raises(CorruptObject):
        open_object(KEY, sealed[: read_header(sealed).body_offset])


def test_trailing_octets_are_corrupt() -> None:
    for extra in (b"\x00", SMALL[-TAG:], os.urandom(CHUNK + TAG)):
        with pytest.raises(CorruptObject):
            open_object(KEY, SMALL + extra)


def test_chunk_reordering_is_detected() -> None:
    sealed = seal(KEY, "blob", _payload(3 * CHUNK), {})
    start = read_header(sealed).body_offset
    size = CHUNK + TAG
    c = [sealed[start + i * size : start + (i + 1) * size] for i in range(3)]
    for order in ((1, 0, 2), (0, 2, 1), (2, 1, 0)):
        with pytest.raises(CorruptObject):
            open_object(KEY, sealed[:start] + b"".join(c[i] for i in order))


def test_a_chunk_from_another_object_is_detected() -> None:
    a = seal(KEY, "blob", b"a" * 100, {})
    b = seal(KEY, "blob", b"b" * 100, {})
    with pytest.raises(CorruptObject):
        open_object(KEY, a[: read_header(a).body_offset] + b[read_header(b).body_offset :])


def test_wrong_key_is_reported_by_id_before_decryption() -> None:
    with pytest.raises(WrongKey) as caught:
        open_object(OTHER, SMALL)
    assert caught.value.key_id_found == KEY.key_id
    assert caught.value.key_id_expected == OTHER.key_id
    assert KEY.key_id in str(caught.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["meta"].update(shard=4),
        lambda d: d.update(kind="snapshot"),
        lambda d: d.update(plain_size=d["plain_size"] - 1),
        lambda d: d.update(plain_sha256="0" * 64),
        lambda d: d.update(nonce="0" * 16),
        lambda d: d.update(chunk=1024),
        lambda d: d.update(extra=1),
    ],
)
def test_header_tampering_is_detected(edit) -> None:
    with pytest.raises(CorruptObject):
        open_object(KEY, _with_header(SMALL, edit))


def test_a_forged_key_id_naming_another_held_key_is_corrupt() -> None:
    forged = _with_header(SMALL, lambda d: d.update(key_id=OTHER.key_id))
    with pytest.raises(CorruptObject):
        open_object({KEY.key_id: KEY, OTHER.key_id: OTHER}, forged)


@pytest.mark.parametrize(
    "damage",
    [
        lambda o: b"PRBK2\n" + o[len(MAGIC) :],
        lambda o: o[: len(MAGIC)] + struct.pack(">I", 0) + o[PREFIX:],
        lambda o: o[: len(MAGIC)] + struct.pack(">I", 2**31) + o[PREFIX:],
        lambda o: o[:PREFIX] + b"[" + o[PREFIX + 1 :],
        lambda o: b"",
    ],
)
def test_malformed_headers_are_corrupt(damage) -> None:
    with pytest.raises(CorruptObject):
        read_header(damage(SMALL))
    with pytest.raises(CorruptObject):
        open_object(KEY, damage(SMALL))


def test_header_fields_are_validated() -> None:
    for edit in (
        lambda d: d.update(v=2),
        lambda d: d.update(chunk=0),
        lambda d: d.update(plain_size=-1),
        lambda d: d.update(key_id="xyz"),
        lambda d: d.update(meta=[]),
        lambda d: d.pop("plain_sha256"),
    ):
        with pytest.raises(CorruptObject):
            read_header(_with_header(SMALL, edit))


# -- key files ----------------------------------------------------------------


def test_key_id_is_the_first_16_hex_of_sha256() -> None:
    assert KEY.key_id == hashlib.sha256(bytes(range(32))).hexdigest()[:16]


@pytest.mark.parametrize(
    "encode",
    [
        lambda k: k,
        lambda k: k.hex().encode() + b"\n",
        lambda k: k.hex().upper().encode(),
        lambda k: base64.b64encode(k) + b"\n",
    ],
)
def test_load_key_formats(tmp_path: Path, encode) -> None:
    path = tmp_path / "key"
    path.write_bytes(encode(KEY.material))
    path.chmod(0o600)
    assert load_key(path) == KEY


@pytest.mark.parametrize("content", [b"", b"short", b"ab" * 31, base64.b64encode(b"x" * 31)])
def test_load_key_rejects_malformed_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=str(path)):
        load_key(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_key_refuses_group_or_world_readable_files(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "key"
    path.write_bytes(KEY.material.hex().encode())
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(path)


def test_load_key_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="nokey"):
        load_key(tmp_path / "nokey")


def test_generate_key_file(tmp_path: Path) -> None:
    path = tmp_path / "backup.key"
    key = generate_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_key(path) == key
    assert generate_key_file(tmp_path / "other.key") != key
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_key_file(path)
    assert load_key(path) == key


def test_key_repr_hides_the_material() -> None:
    assert KEY.material.hex() not in repr(KEY)


# -- sealing on demand ------------------------------------------------------------


SEALED_SIZES = [0, 1, CHUNK - 1, CHUNK + 1, 2 * CHUNK + 3]


@pytest.mark.parametrize("size", SEALED_SIZES)
def test_sealed_file_reads_a_valid_object(tmp_path: Path, size: int) -> None:
    src = tmp_path / "plain"
    src.write_bytes(_payload(size))
    with SealedFile(KEY, "snapshot", src, {"shard": 2}) as sealed:
        whole = sealed.read(0, sealed.size)
        assert len(whole) == sealed.size == sealed.header.sealed_size
        assert sealed.read(sealed.size, 10) == b""
    header, plain = open_object(KEY, whole)
    assert plain == src.read_bytes()
    assert header.meta == {"shard": 2} and header.kind == "snapshot"


BIG_PLAIN = _payload(2 * CHUNK + 1000)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3 * CHUNK), min_size=1, max_size=6))
def test_sealed_file_ranges_in_any_order_make_the_same_object(tmp_path_factory, lengths) -> None:
    src = tmp_path_factory.mktemp("sealed") / "plain"
    src.write_bytes(BIG_PLAIN)
    with SealedFile(KEY, "blob", src, {}) as sealed:
        whole = sealed.read(0, sealed.size)
        offsets, pos = [], 0
        for length in lengths:
            offsets.append((pos, length))
            pos += length
        offsets.append((pos, sealed.size))
        pieces = {off: sealed.read(off, length) for off, length in reversed(offsets)}
        assert b"".join(pieces[off] for off, _ in offsets)[: sealed.size] == whole
    assert open_object(KEY, whole)[1] == BIG_PLAIN


def test_sealed_file_notices_a_shrunk_source(tmp_path: Path) -> None:
    src = tmp_path / "plain"
    src.write_bytes(_payload(CHUNK + 10))
    with SealedFile(KEY, "blob", src, {}) as sealed:
        src.write_bytes(b"short")
        with pytest.raises(BackupCryptoError, match="changed"):
            sealed.read(0, sealed.size)


@pytest.mark.parametrize("size", SEALED_SIZES)
@pytest.mark.parametrize("part_size", [5 * 1024 * 1024, 8 * 1024 * 1024])
def test_sealed_file_parts_are_whole_chunks_covering_the_object(
    tmp_path: Path, size: int, part_size: int
) -> None:
    src = tmp_path / "plain"
    src.write_bytes(_payload(size))
    with SealedFile(KEY, "snapshot", src, {}) as sealed:
        parts = sealed.parts(part_size)
        h = sealed.header
        assert parts[0][0] == 0 and sum(length for _, length in parts) == sealed.size
        for (offset, length), (following, _) in zip(parts, parts[1:], strict=False):
            assert offset + length == following and length >= part_size  # S3's minimum holds
            assert (following - h.body_offset) % (h.chunk + TAG) == 0  # a chunk boundary
        pieces = {offset: sealed.read(offset, length) for offset, length in reversed(parts)}
        whole = b"".join(pieces[offset] for offset, _ in parts)
    assert open_object(KEY, whole)[1] == src.read_bytes()


def _open_in_order(sealed: bytes, dest: Path, order) -> ChunkOpener:
    header = read_header(sealed)
    opener = ChunkOpener(KEY, header, len(sealed), dest)
    for offset, length in order(opener.ranges(1)):
        opener.feed(offset, sealed[offset : offset + length])
    return opener


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK + 5])
def test_chunk_opener_takes_ranges_in_any_order(tmp_path: Path, size: int) -> None:
    plain = _payload(size)
    sealed = seal(KEY, "snapshot", plain, {"shard": 4})
    for order in (list, lambda r: list(reversed(r)), lambda r: r[1::2] + r[0::2]):
        header = _open_in_order(sealed, tmp_path / "out", order).finish()
        assert header.meta == {"shard": 4}
        assert (tmp_path / "out").read_bytes() == plain


def test_chunk_opener_rejects_damage_and_removes_the_output(tmp_path: Path) -> None:
    plain = _payload(2 * CHUNK + 10)
    sealed = seal(KEY, "blob", plain, {})
    header = read_header(sealed)
    dest = tmp_path / "out"
    damaged = bytearray(sealed)
    damaged[header.body_offset + CHUNK + TAG + 7] ^= 1  # inside the second chunk
    with pytest.raises(CorruptObject, match="chunk 1 of 3"):
        _open_in_order(bytes(damaged), dest, list)
    for size in (len(sealed) - 1, len(sealed) + 1):
        with pytest.raises(CorruptObject):
            ChunkOpener(KEY, header, size, dest)
    opener = _open_in_order(sealed, dest, lambda r: r[:-1])  # the last range never came
    with pytest.raises(BackupCryptoError, match="never opened"):
        opener.finish()
    assert not dest.exists()
    with pytest.raises(WrongKey):
        ChunkOpener(OTHER, header, len(sealed), dest)
    with pytest.raises(ValueError, match="boundary"):
        ChunkOpener(KEY, header, len(sealed), dest).feed(header.body_offset + 1, b"x")


def test_ordered_hash_is_the_plain_sha256_whatever_the_order() -> None:
    pieces = [os.urandom(100 + i) for i in range(3 * HASH_WINDOW)]
    rereads = []

    def reread(index: int) -> bytes:
        rereads.append(index)
        return pieces[index]

    hasher = _OrderedHash(len(pieces), reread)
    for index in reversed(range(len(pieces))):
        hasher.add(index, pieces[index])
    hasher.add(0, b"a duplicate is ignored")
    assert hasher.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert rereads and min(rereads) >= HASH_WINDOW  # far-ahead chunks were not held
