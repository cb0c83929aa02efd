"""One conformance suite for every backup target (storage/backup_target.py):
a local directory, moto's S3 server and ``rclone serve s3``, all real and
on loopback (tests/support/s3.py)."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from node.config import BackupSettings
from storage.backup_crypto import (
    CorruptObject,
    Key,
    SealedFile,
    open_object,
    open_remote_to_file,
    open_to_file,
    seal,
)
from storage.backup_target import (
    LocalTarget,
    NoSuchObject,
    S3Target,
    Target,
    TargetError,
    TargetUnavailable,
    open_target,
)
from tests.support.etcd import run_patched
from tests.support.s3 import S3Server, moto_server, rclone_server

KINDS = ["local", "moto", "rclone"]
_names = itertools.count()


@pytest.fixture(scope="module")
def moto() -> Iterator[S3Server]:
    with moto_server() as server:
        yield server


@pytest.fixture(scope="module")
def rclone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with rclone_server(tmp_path_factory.mktemp("rclone")) as server:
        yield server


def _settings(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, exists: bool
) -> BackupSettings:
    """Settings for a fresh, empty bucket (or directory) of this kind."""
    name = f"bkt-{next(_names)}-{os.getpid()}"
    if kind == "local":
        root = tmp_path / name
        if exists:
            root.mkdir()
        return BackupSettings(target=f"file://{root}")
    server: S3Server = request.getfixturevalue(kind)
    settings = server.settings(name, "pfx/node")
    if exists:
        with open_target(settings) as target:
            target.create_bucket()
    return settings


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., Target]]:
    """make(exists=True, **s3_options) -> an open Target on a fresh bucket."""
    opened: list[Target] = []

    def factory(exists: bool = True, **options: object) -> Target:
        target = open_target(_settings(kind, request, tmp_path, exists), **options)
        opened.append(target)
        return target

    yield factory
    for target in opened:
        target.close()


@pytest.fixture
def target(make: Callable[..., Target]) -> Target:
    return make()


def _keys(target: Target, prefix: str = "") -> list[str]:
    return [info.key for info in target.list(prefix)]


def test_open_target_picks_the_implementation(kind: str, target: Target) -> None:
    assert isinstance(target, LocalTarget if kind == "local" else S3Target)


def test_put_get_head_list_delete(target: Target) -> None:
    assert _keys(target) == []
    target.put("one", b"first")
    target.put("two", b"")
    assert target.get("one") == b"first"
    assert target.get("two") == b""
    info = target.head("one")
    assert info is not None and info.key == "one" and info.size == 5 and info.mtime > 0
    assert [(i.key, i.size) for i in target.list()] == [("one", 5), ("two", 0)]
    target.put("one", b"replaced")
    assert target.get("one") == b"replaced"
    target.delete(["one"])
    assert target.head("one") is None
    assert _keys(target) == ["two"]


def test_keys_with_slashes_and_prefixes(target: Target) -> None:
    keys = [
        "c1/blobs/ab/ab12",
        "c1/blobs/ab/ab34",
        "c1/blobs/cd/cd56",
        "c1/blobsx",
        "c1-x",
        "c2/etcd/1",
    ]
    for key in keys:
        target.put(key, key.encode())
    assert _keys(target) == sorted(keys)
    assert _keys(target, "c1/") == [
        "c1/blobs/ab/ab12",
        "c1/blobs/ab/ab34",
        "c1/blobs/cd/cd56",
        "c1/blobsx",
    ]
    assert _keys(target, "c1/blobs/") == [
        "c1/blobs/ab/ab12",
        "c1/blobs/ab/ab34",
        "c1/blobs/cd/cd56",
    ]
    assert _keys(target, "c1/blobs/ab/ab1") == ["c1/blobs/ab/ab12"]
    assert _keys(target, "c1/blobs") == [
        "c1/blobs/ab/ab12",
        "c1/blobs/ab/ab34",
        "c1/blobs/cd/cd56",
        "c1/blobsx",
    ]
    assert _keys(target, "nothing/") == []
    assert all(target.get(k) == k.encode() for k in keys)
    target.delete(keys[:3])
    assert _keys(target, "c1/") == ["c1/blobsx"]


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "..", "a/.hidden", "a/", "a\\b"])
def test_invalid_keys_are_refused(target: Target, key: str) -> None:
    with pytest.raises(ValueError):
        target.put(key, b"x")
    with pytest.raises(ValueError):
        target.get(key)


def test_sealed_objects_round_trip(target: Target, tmp_path: Path) -> None:
    key = Key(os.urandom(32))
    plain = os.urandom(100_000)
    target.put("c/blobs/00/x", seal(key, "blob", plain, {}))
    assert open_object(key, target.get("c/blobs/00/x"))[1] == plain
    target.get_to_file("c/blobs/00/x", tmp_path / "sealed")
    assert open_object(key, tmp_path / "sealed")[1] == plain


@pytest.mark.parametrize("size", [1000, 20 * 1024 * 1024 + 1])
def test_sealed_file_uploads_without_staging(target: Target, tmp_path: Path, size: int) -> None:
    key = Key(os.urandom(32))
    src = tmp_path / "snapshot.db"
    src.write_bytes(os.urandom(size))
    with SealedFile(key, "snapshot", src, {"shard": 1}) as sealed:
        target.put("c/shards/0001/snap/000000000007", sealed)
        info = target.head("c/shards/0001/snap/000000000007")
        assert info is not None and info.size == sealed.size
    target.get_to_file("c/shards/0001/snap/000000000007", tmp_path / "sealed")
    assert open_to_file(key, tmp_path / "sealed", tmp_path / "restored").meta == {"shard": 1}
    assert (tmp_path / "restored").read_bytes() == src.read_bytes()
    # Without the staging copy: ranged reads opened as they arrive (5 MiB ranges: 2 chunks).
    direct = tmp_path / "direct"
    header = open_remote_to_file(key, target, "c/shards/0001/snap/000000000007", direct, 5 << 20)
    assert header.meta == {"shard": 1} and direct.read_bytes() == src.read_bytes()


def test_remote_open_of_missing_or_damaged_objects(target: Target, tmp_path: Path) -> None:
    key = Key(os.urandom(32))
    dest = tmp_path / "out"
    with pytest.raises(NoSuchObject):
        open_remote_to_file(key, target, "no/such", dest)
    sealed = bytearray(seal(key, "snapshot", os.urandom(9 * 1024 * 1024), {}))
    sealed[-100] ^= 1
    target.put("damaged", bytes(sealed))
    with pytest.raises(CorruptObject, match="chunk 2 of 3"):
        open_remote_to_file(key, target, "damaged", dest)
    target.put("cut", bytes(sealed[:-1]))
    with pytest.raises(CorruptObject, match="truncated"):
        open_remote_to_file(key, target, "cut", dest)
    assert not dest.exists()


def test_listing_pages_and_batched_deletes(make: Callable[..., Target]) -> None:
    """ListObjectsV2 pagination with a small page size (230 keys, pages of 50)
    and DeleteObjects in batches (100 keys per request here, 1,000 by default)."""
    target = make(page_size=50)
    if isinstance(target, S3Target):
        target.delete_batch = 100
    keys = [f"seg/{i:06d}" for i in range(230)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: target.put(k, k.encode()), keys))
    assert _keys(target) == keys
    assert _keys(target, "seg/0001") == keys[100:200]
    target.delete(iter(keys[:210]))
    assert _keys(target) == keys[210:]


def test_large_file_goes_multipart_and_streams_back(target: Target, tmp_path: Path) -> None:
    src = tmp_path / "big"
    with open(src, "wb") as f:
        for _ in range(40):
            f.write(os.urandom(1024 * 1024))
    target.put("snap/big", src)
    info = target.head("snap/big")
    assert info is not None and info.size == 40 * 1024 * 1024
    if isinstance(target, S3Target) and "moto" in target.url:
        assert info.etag and info.etag.endswith("-5")  # 5 parts of 8 MiB
    dest = tmp_path / "back"
    target.get_to_file("snap/big", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries


def test_large_bytes_go_multipart(target: Target) -> None:
    data = os.urandom(17 * 1024 * 1024)
    target.put("big-bytes", data)
    assert target.get("big-bytes") == data


def test_missing_objects(target: Target, tmp_path: Path) -> None:
    with pytest.raises(NoSuchObject):
        target.get("no/such")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(NoSuchObject):
        target.get_to_file("no/such", out / "file")
    assert list(out.iterdir()) == []  # neither the file nor its temporary

    assert target.head("no/such") is None
    target.delete(["no/such", "no/other"])


def test_missing_bucket_is_a_clear_target_error(make: Callable[..., Target]) -> None:
    target = make(exists=False)
    name = target.bucket if isinstance(target, S3Target) else str(target.root)
    calls = [
        lambda: target.put("k", b"x"),
        lambda: target.get("k"),
        lambda: target.head("k"),
        lambda: list(target.list()),
        lambda: target.delete(["k"]),
    ]
    for call in calls:
        with pytest.raises(TargetError) as caught:
            call()
        assert not isinstance(caught.value, NoSuchObject)
        assert name in str(caught.value)
        assert "does not exist" in str(caught.value)
    target.create_bucket()
    target.put("k", b"x")
    assert target.get("k") == b"x"


def _finishes(fn: Callable[[], object], deadline: float) -> BaseException | None:
    """Run fn in a thread; the exception it raised, or fail if still running at deadline."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    assert outcome, f"still waiting on a stopped server after {deadline} s"
    return outcome[0]


def test_stopped_server_is_unavailable_within_bounded_time(tmp_path: Path) -> None:
    """Default settings: connection refused, retried (standard mode), then
    TargetUnavailable; fewer attempts for the other operations."""
    with rclone_server(tmp_path / "data") as server:
        settings = server.settings("bkt", "p")
        with open_target(settings) as target, open_target(settings, max_attempts=1) as quick:
            target.create_bucket()
            target.put("k", b"x")
            server.stop()
            assert isinstance(_finishes(lambda: target.get("k"), 60), TargetUnavailable)
            for call in (
                lambda: quick.put("k", b"y"),
                lambda: quick.put("big", os.urandom(17 * 1024 * 1024)),
                lambda: quick.head("k"),
                lambda: list(quick.list()),
                lambda: quick.delete(["k"]),
            ):
                assert isinstance(_finishes(call, 60), TargetUnavailable)
            server.start()  # and back: the same target works again
            assert target.get("k") == b"x"


def test_moto_stopped_is_unavailable() -> None:
    with moto_server() as server:
        target = open_target(server.settings("bkt"), max_attempts=2, connect_timeout=1)
        target.create_bucket()
        server.stop_moto()  # type: ignore[attr-defined]
        assert isinstance(_finishes(lambda: target.head("k"), 60), TargetUnavailable)
        target.close()


def test_rclone_keeps_objects_across_a_restart(tmp_path: Path) -> None:
    with rclone_server(tmp_path / "data") as server:
        with open_target(server.settings("bkt", "p")) as target:
            target.create_bucket()
            target.put("a/b", b"persisted")
        server.stop()
        server.start()
        with open_target(server.settings("bkt", "p")) as target:
            assert target.get("a/b") == b"persisted"
            assert _keys(target) == ["a/b"]


def test_wrong_credentials_are_a_clear_target_error(rclone: S3Server, tmp_path: Path) -> None:
    secret = tmp_path / "wrong"
    secret.write_text("not-the-secret\n")
    settings = rclone.settings("bkt-auth", secret_access_key_file=str(secret))
    with open_target(settings) as target, pytest.raises(TargetError, match="access denied"):
        target.put("k", b"x")


def test_local_target_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = LocalTarget(tmp_path / "root")
    target.create_bucket()
    src = tmp_path / "src"
    src.write_bytes(b"file")
    target.put("x/y/z", src)
    target.put("x/y/w", b"bytes")
    (tmp_path / "root" / "x" / "y" / ".w.tmp-crashed").write_bytes(b"half")  # a crash mid-put
    assert _keys(target) == ["x/y/w", "x/y/z"]
    assert sorted(
        p.name for p in (tmp_path / "root" / "x" / "y").iterdir() if not p.name.startswith(".")
    ) == ["w", "z"]


def test_open_target_rejects_bad_urls(tmp_path: Path) -> None:
    for url in ("http://x/y", "s3://", "file://host/path", "file:relative"):
        with pytest.raises(TargetError):
            open_target(BackupSettings(target=url))
    with pytest.raises(TargetError, match="secret_access_key_file"):
        open_target(BackupSettings(target="s3://b/p", access_key_id="AK"))


def gevent_round_trips(endpoint: str, secret_file: str, local_root: str) -> None:
    """In a monkey-patched child: 16 greenlets each put/get/head on S3 and on
    a local directory at once, plus a 20 MiB multipart put and ranged get (LocalTarget's file work goes through the hub's
    threadpool); a greenlet ticking meanwhile shows the hub kept running."""
    import gevent

    settings = BackupSettings(
        target="s3://bkt-gevent/p",
        endpoint_url=endpoint,
        path_style=True,
        access_key_id="postroomtest",
        secret_access_key_file=secret_file,
    )
    s3 = open_target(settings)
    s3.create_bucket()
    local = LocalTarget(Path(local_root))
    local.create_bucket()
    ticks = [0]

    def ticker() -> None:
        while True:
            ticks[0] += 1
            gevent.sleep(0.001)

    def work(target: Target, i: int) -> None:
        data = os.urandom(300_000 + i)
        target.put(f"g/{i:02d}", data)
        assert target.get(f"g/{i:02d}") == data
        info = target.head(f"g/{i:02d}")
        assert info is not None and info.size == len(data)

    def large(target: Target) -> None:
        """Multipart upload and ranged download: parts in flight as greenlets."""
        src = Path(local_root).with_name(f"large-{id(target)}")
        src.write_bytes(os.urandom(20 * 1024 * 1024 + 5))
        target.put("large", src)
        back = src.with_name(src.name + ".back")
        target.get_to_file("large", back)
        assert back.read_bytes() == src.read_bytes()
        key = Key(os.urandom(32))
        with SealedFile(key, "snapshot", src, {}) as sealed:
            target.put("large", sealed)
        back.unlink()
        run = lambda fn, *args: gevent.get_hub().threadpool.apply(fn, args)  # noqa: E731
        open_remote_to_file(key, target, "large", back, run=run)
        assert back.read_bytes() == src.read_bytes()
        target.delete(["large"])

    tick = gevent.spawn(ticker)
    jobs = [gevent.spawn(work, t, i) for t in (s3, local) for i in range(16)]
    jobs += [gevent.spawn(large, t) for t in (s3, local)]
    gevent.joinall(jobs, raise_error=True)
    tick.kill()
    for target in (s3, local):
        assert _keys(target) == [f"g/{i:02d}" for i in range(16)]
    assert ticks[0] > 0
    s3.close()


def test_targets_under_gevent_monkey_patching(rclone: S3Server, tmp_path: Path) -> None:
    run_patched(
        "tests.integration.test_backup_targets",
        "gevent_round_trips",
        rclone.endpoint_url,
        str(rclone.secret_file()),
        str(tmp_path / "local"),
    )
