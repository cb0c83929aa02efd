"""BlobStore: content addressing, durability steps, no path traversal."""

from __future__ import annotations

import hashlib
import os

import gevent
import pytest

from storage.blobs import BlobStore, is_blob_name
from storage.model import NoSuchBlob


@pytest.fixture
def blobs(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    store.open()
    return store


def test_put_read_roundtrip_named_by_sha256(blobs):
    data = b"From: a@example.org\r\n\r\nhello\r\n"
    sha = blobs.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert blobs.exists(sha)
    assert blobs.read(sha) == data
    assert blobs.path(sha) == blobs.root / sha[:2] / sha[2:4] / sha


def test_put_is_idempotent_and_leaves_no_temp_files(blobs):
    a = blobs.put(b"same")
    b = blobs.put(b"same")
    assert a == b
    assert list((blobs.root / "tmp").iterdir()) == []
    files = [p for p in blobs.root.rglob("*") if p.is_file()]
    assert files == [blobs.path(a)]


def test_concurrent_puts_of_the_same_body(blobs):
    jobs = [gevent.spawn(blobs.put, b"race" * 1000) for _ in range(20)]
    gevent.joinall(jobs, raise_error=True)
    assert len({j.value for j in jobs}) == 1
    assert blobs.read(jobs[0].value) == b"race" * 1000


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "A" * 64, "a" * 63, "a" * 65, "", "g" * 64, "../" + "a" * 61, "a" * 64 + "\n"],
)
def test_bad_names_are_rejected(blobs, name):
    assert not is_blob_name(name)
    assert not blobs.exists(name)
    with pytest.raises(ValueError):
        blobs.path(name)
    with pytest.raises(NoSuchBlob):
        blobs.read(name)


def test_unknown_blob(blobs):
    with pytest.raises(NoSuchBlob):
        blobs.read("0" * 64)


def test_open_removes_partial_writes(tmp_path):
    store = BlobStore(tmp_path / "b")
    store.open()
    (store.root / "tmp" / "deadbeef.partial").write_bytes(b"half")
    BlobStore(tmp_path / "b").open()
    assert list((store.root / "tmp").iterdir()) == []


def test_unsynced_mode_stores_the_same(tmp_path):
    store = BlobStore(tmp_path / "nofsync", fsync=False)
    store.open()
    sha = store.put(b"abc")
    assert store.read(sha) == b"abc"


def test_open_makes_first_level_fanout_durable_once(tmp_path, monkeypatch):
    store = BlobStore(tmp_path / "blobs")
    store.open()
    tops = sorted(p.name for p in store.root.iterdir() if p.name not in ("tmp", "trash"))
    assert tops == [f"{i:02x}" for i in range(256)]
    synced: list[str] = []
    real_fsync = os.fsync

    def noting_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", noting_fsync)
    sha = store._put_sync(b"first blob of a young store")
    path = store.path(sha)
    # file, its new leaf directory, and the first-level one that holds the
    # leaf: never the root, which open() made durable with every top dir.
    assert synced[1:] == [str(path.parent), str(path.parent.parent)]
    assert str(store.root) not in synced
    store.open()  # reopening an existing store is fine
    assert store.read(sha) == b"first blob of a young store"
