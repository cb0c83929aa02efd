"""Backup targets: one object interface for S3 (boto3) and a local directory.

Theory of operation.  A ``Target`` stores opaque objects (already sealed by
storage/backup_crypto.py) under keys relative to the target's root:
``s3://BUCKET/PREFIX`` (the keys live under ``PREFIX/``) or ``file:///PATH``.
Both implement the same operations with the same errors, and one conformance
suite (tests/integration/test_backup_targets.py) runs on both:

- ``put(key, data)``: bytes, a file, or a ``PartSource`` such as
  backup_crypto.SealedFile (sealed on demand, part by part, in the
  threadpool: no staging file, and sealing overlaps the transfer).  S3: one PutObject up to
  ``multipart_threshold`` (16 MiB), else a multipart upload in 8 MiB parts,
  4 in flight (aborted on failure); large downloads are ranged GETs of 8 MiB,
  4 in flight.  Local: a temporary file in the key's directory,
  fsync, rename, directory fsync -- an object is either whole or absent.
  A source with a ``parts(part_size)`` method (SealedFile) chooses its own
  part boundaries (whole sealed chunks, so each is sealed once).
- ``get`` / ``get_to_file`` (streamed into a temp file, renamed when whole;
  not fsynced: a download is staging, the caller fsyncs what it keeps --
  backup_crypto.open_to_file does) / ``get_range`` / ``get_ranges`` (ranges
  fetched ``concurrency`` at a time on S3, each handed to a callback as it
  arrives: backup_crypto.open_remote_to_file decrypts them straight into
  the destination file, with no sealed staging copy) / ``head``
  / ``list(prefix)`` (sorted keys; S3: ListObjectsV2 pages) / ``delete``
  (S3: DeleteObjects in batches of 1,000; missing keys are not errors).
- Errors: ``TargetUnavailable`` (network, timeouts, 5xx, throttling -- after
  botocore's standard-mode retries; the caller retries later),
  ``TargetError`` (permanent: a missing bucket or directory, access denied,
  bad credentials; the message names the bucket and endpoint) and
  ``NoSuchObject`` (a subclass of ``TargetError``).

No target creates its bucket or root directory implicitly (a typo must not
back up into a fresh empty place): ``create_bucket()`` does, for tests and
``postroom backup init``-style tooling.

This is the only module that imports boto3.

gevent.  Call targets from greenlets, not from the threadpool: in a
monkey-patched process boto3's socket I/O cooperates with the hub.
``LocalTarget`` runs its file I/O and fsyncs in ``gevent.get_hub().threadpool``
itself.  Sealing/opening objects (AES-GCM, SHA-256) is CPU-bound: callers
run backup_crypto in the threadpool and hand the result (bytes or a sealed
temp file) to ``put``.  Over a plain-http endpoint botocore hashes each
request payload for SigV4 on the calling thread (~2 ms per MiB); over https
it sends UNSIGNED-PAYLOAD and hashes nothing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar
from urllib.parse import unquote, urlparse

import boto3
import botocore.exceptions
import gevent
from botocore.config import Config as BotoConfig
from gevent import get_hub, monkey
from gevent._hub_local import get_hub_if_exists
from gevent.pool import Pool as GeventPool

from node.config import BackupSettings

MULTIPART_THRESHOLD = 16 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
CONCURRENCY = 4  # parts/ranges in flight per large transfer
DELETE_BATCH = 1000
STREAM_BLOCK = 1024 * 1024
MAX_KEY = 1024  # octets of UTF-8, as in S3

T = TypeVar("T")


class TargetError(Exception):
    """A permanent target problem: missing bucket/directory, access denied."""


class NoSuchObject(TargetError):
    """The key does not exist in the target."""


class TargetUnavailable(Exception):
    """The target cannot be reached right now (network, 5xx, throttling)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the target's root
    size: int
    mtime: float  # seconds since the epoch (S3: LastModified)
    etag: str | None = None  # S3's ETag without quotes; None for local files


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ValueError.

    Keys are relative, "/"-separated, without empty, ".", ".." or dot-leading
    components (dot names are the local target's temporary files)."""
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    if len(key.encode("utf-8")) > MAX_KEY or "\x00" in key or "\\" in key:
        raise ValueError(f"invalid object key {key!r}")
    if any(not part or part.startswith(".") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: "" or the start of a key (the last part may be partial)."""
    if prefix:
        head, _, _last = prefix.rpartition("/")
        if head:
            check_key(head)
        if prefix.startswith("/") or "\x00" in prefix or "\\" in prefix:
            raise ValueError(f"invalid object prefix {prefix!r}")
    return prefix


def _offload(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking file work in gevent's threadpool when a hub runs here."""
    if get_hub_if_exists() is None:
        return fn(*args)

    def call() -> tuple[bool, Any]:
        # The exception travels back as a value: one raised inside a pool
        # worker is also printed by gevent (a missing file is not an error).
        try:
            return True, fn(*args)
        except Exception as exc:
            return False, exc

    ok, value = get_hub().threadpool.apply(call)
    if not ok:
        raise value
    return value


def _parallel(fn: Callable[[Any], T], items: list[Any], limit: int) -> list[T]:
    """fn over items, ``limit`` at a time (greenlets when gevent patched the
    sockets, threads otherwise); results in order; the first error is raised."""
    if len(items) <= 1 or limit <= 1:
        return [fn(item) for item in items]
    if monkey.is_module_patched("socket"):
        group = GeventPool(limit)
        jobs = [group.spawn(fn, item) for item in items]
        try:
            gevent.joinall(jobs, raise_error=True)
        finally:
            group.kill()
        return [job.value for job in jobs]
    with ThreadPoolExecutor(min(limit, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()


class PartSource(Protocol):
    """Object data produced on demand (e.g. backup_crypto.SealedFile):
    ``size`` octets, any range readable from any thread."""

    size: int

    def read(self, offset: int, length: int) -> bytes | bytearray: ...


Data = bytes | Path | PartSource


def _size(data: Data) -> int:
    if isinstance(data, bytes | bytearray | memoryview):
        return len(data)
    if isinstance(data, Path):
        return os.path.getsize(data)
    return data.size


class _Source:
    """Positional reads of a part from bytes, a file or a PartSource (safe
    from many workers; file reads and PartSource work go to the threadpool)."""

    def __init__(self, data: Data) -> None:
        self.data = data
        self.fd: int | None = None

    def __enter__(self) -> _Source:
        if isinstance(self.data, Path):
            self.fd = os.open(self.data, os.O_RDONLY)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def read(self, offset: int, length: int) -> bytes | bytearray:
        if isinstance(self.data, bytes | bytearray | memoryview):
            return bytes(memoryview(self.data)[offset : offset + length])
        if self.fd is None:
            block = _offload(self.data.read, offset, length)  # type: ignore[union-attr]
        else:
            block = _offload(os.pread, self.fd, length, offset)
        if len(block) != length:
            raise TargetError(f"source {self.data} changed during the upload")
        return block


class Target(ABC):
    """Where backup objects live.  Keys are relative to the target's root."""

    url: str = ""

    @abstractmethod
    def put(self, key: str, data: Data) -> None:
        """Store bytes, a file's contents or a PartSource under ``key`` (replacing it)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; ``NoSuchObject`` if absent."""

    @abstractmethod
    def get_to_file(self, key: str, path: Path) -> None:
        """Stream the object into ``path`` (temp file renamed when whole; not fsynced)."""

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int, etag: str | None = None) -> bytes:
        """Up to ``length`` octets of the object from ``offset`` (fewer at its
        end); ``NoSuchObject`` if absent.  S3: pinned to ``etag`` if given."""

    @abstractmethod
    def get_ranges(
        self,
        key: str,
        ranges: list[tuple[int, int]],
        handle: Callable[[int, bytes], None],
        etag: str | None = None,
    ) -> None:
        """Fetch each (offset, length) range whole and call ``handle(offset,
        data)`` as each arrives (in the threadpool under gevent; any order;
        S3: ``concurrency`` ranges in flight).  The first error is raised."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag/mtime of the object, or None if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Remove the objects; keys that do not exist are ignored."""

    @abstractmethod
    def create_bucket(self) -> None:
        """Create the bucket (S3) or root directory (local) if missing."""

    def close(self) -> None:  # noqa: B027 (optional: not every target holds connections)
        """Release connections."""

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- local directory --------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")


def _write_atomic(path: Path, data: Data) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename + dir fsync."""
    tmp = _tmp_name(path)
    try:
        if isinstance(data, Path):
            shutil.copyfile(data, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with open(tmp, "wb") as f:
                if isinstance(data, bytes | bytearray | memoryview):
                    f.write(data)
                else:
                    for offset in range(0, data.size, PART_SIZE):
                        f.write(data.read(offset, min(PART_SIZE, data.size - offset)))
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class LocalTarget(Target):
    """Objects as files under a directory (e.g. a mounted disk)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"

    # Errors: a missing root is permanent (unmounted disk, typo); other OS
    # errors (disk full, I/O) are treated as transient.
    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise TargetError(
                f"backup directory {self.root} does not exist "
                "(not mounted? create it with create_bucket / postroom backup init)"
            )

    def _translate(self, exc: OSError, key: str) -> Exception:
        if isinstance(exc, FileNotFoundError | NotADirectoryError):
            self._check_root()
            return NoSuchObject(f"{self.url}: no object {key}")
        if isinstance(exc, PermissionError):
            return TargetError(f"{self.url}: permission denied for {key}: {exc}")
        return TargetUnavailable(f"{self.url}: {key}: {exc}")

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _make_dirs(self, directory: Path) -> None:
        """Create missing directories below the root, fsyncing each parent."""
        missing = []
        while directory != self.root and not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            _fsync_dir(d.parent)

    def _put_sync(self, key: str, data: Data) -> None:
        self._check_root()
        path = self._path(key)
        self._make_dirs(path.parent)
        _write_atomic(path, data)

    def put(self, key: str, data: Data) -> None:
        try:
            _offload(self._put_sync, key, data)
        except OSError as exc:
            if isinstance(data, Path) and isinstance(exc, FileNotFoundError):
                raise  # the caller's source file is missing: not a target problem
            raise self._translate(exc, key) from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return _offload(path.read_bytes)
        except OSError as exc:
            raise self._translate(exc, key) from exc

    def _get_to_file_sync(self, key: str, dest: Path) -> None:
        src = self._path(key)
        try:
            with open(src, "rb") as f:  # opened first: a missing key is NoSuchObject
                tmp = _tmp_name(dest)
                try:
                    with open(tmp, "wb") as out:
                        shutil.copyfileobj(f, out, STREAM_BLOCK)
                    os.replace(tmp, dest)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
        except OSError as exc:
            if exc.filename is not None and Path(exc.filename) == src:
                raise self._translate(exc, key) from exc
            raise  # the destination's problem, not the target's

    def get_to_file(self, key: str, path: Path) -> None:
        _offload(self._get_to_file_sync, key, Path(path))

    def _open_object(self, key: str) -> int:
        try:
            return os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._translate(exc, key) from exc

    def _read_range(self, fd: int, offset: int, length: int, key: str) -> bytes:
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise self._translate(exc, key) from exc

    def get_range(self, key: str, offset: int, length: int, etag: str | None = None) -> bytes:
        fd = _offload(self._open_object, key)
        try:
            return _offload(self._read_range, fd, offset, length, key)
        finally:
            os.close(fd)

    def get_ranges(
        self,
        key: str,
        ranges: list[tuple[int, int]],
        handle: Callable[[int, bytes], None],
        etag: str | None = None,
    ) -> None:
        fd = _offload(self._open_object, key)  # one open file: a replaced object is not mixed in
        try:
            for offset, length in ranges:
                block = _offload(self._read_range, fd, offset, length, key)
                if len(block) != length:
                    raise TargetError(f"{self.url}: {key} is shorter than {offset + length}")
                _offload(handle, offset, block)
        finally:
            os.close(fd)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = _offload(os.stat, path)
        except OSError as exc:
            err = self._translate(exc, key)
            if isinstance(err, NoSuchObject):
                return None
            raise err from exc
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def _list_sync(self, prefix: str) -> list[ObjectInfo]:
        self._check_root()
        head = prefix.rpartition("/")[0]
        start = self.root / head if head else self.root
        found = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            for name in filenames:
                key = base + name
                if name.startswith(".") or not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue  # deleted while we walked
                found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        found.sort(key=lambda info: info.key)
        return found

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        try:
            infos = _offload(self._list_sync, prefix)
        except OSError as exc:
            raise self._translate(exc, prefix) from exc
        yield from infos

    def _delete_sync(self, keys: list[str]) -> None:
        self._check_root()
        dirs = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            dirs.add(path.parent)
        for d in dirs:
            _fsync_dir(d)

    def delete(self, keys: Iterable[str]) -> None:
        keys = [check_key(k) for k in keys]
        try:
            _offload(self._delete_sync, keys)
        except OSError as exc:
            raise self._translate(exc, ",".join(keys[:3])) from exc

    def create_bucket(self) -> None:
        _offload(self.root.mkdir, 0o700, True, True)


# -- S3 ---------------------------------------------------------------------

_UNAVAILABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "InternalError",
        "RequestLimitExceeded",
        "TooManyRequests",
    }
)
_ACCESS_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
)


_SESSION_LOCK = threading.Lock()
_session: boto3.session.Session | None = None


class S3Target(Target):
    """Objects in an S3 bucket under a key prefix, through boto3."""

    delete_batch = DELETE_BATCH  # keys per DeleteObjects request (S3's maximum)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        path_style: bool = False,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        ca_bundle: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 4,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        page_size: int = 1000,
        concurrency: int = CONCURRENCY,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint_url or f"AWS S3 ({region})"
        self.url = f"s3://{bucket}/{prefix}"
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.page_size = page_size
        self.concurrency = concurrency  # parts in flight per large put/get (x part_size memory)
        self._bucket_checked = False
        config = BotoConfig(
            region_name=region,
            s3={"addressing_style": "path" if path_style else "auto"},
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=32,
        )
        with _SESSION_LOCK:  # one session: its service models are parsed once (~0.5 s)
            global _session
            if _session is None:
                _session = boto3.session.Session()
            self.client = _session.client(
                "s3",
                endpoint_url=endpoint_url or None,
                config=config,
                verify=ca_bundle or None,
                aws_access_key_id=access_key_id or None,
                aws_secret_access_key=secret_access_key or None,
            )

    # -- errors ---------------------------------------------------------

    def _where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint}"

    def _translate(self, exc: Exception, key: str) -> Exception:
        """Map a botocore exception to TargetError / TargetUnavailable / NoSuchObject."""
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "NoSuchBucket":
                return TargetError(f"{self._where()}: the bucket does not exist")
            if code in ("NoSuchKey", "404", "NotFound"):
                return NoSuchObject(f"{self._where()}: no object {key}")
            if code in _ACCESS_CODES or status == 403:
                return TargetError(
                    f"{self._where()}: access denied ({code}: {err.get('Message', '')}); "
                    "check the credentials and the bucket policy"
                )
            if code in _UNAVAILABLE_CODES or status >= 500 or status == 429:
                return TargetUnavailable(f"{self._where()}: {code or status} (after retries)")
            return TargetError(f"{self._where()}: {key}: {code}: {err.get('Message', '')}")
        if isinstance(exc, botocore.exceptions.SSLError) and "CERTIFICATE_VERIFY" in str(exc):
            return TargetError(f"{self._where()}: TLS certificate not trusted ({exc}); ca_bundle?")
        if isinstance(
            exc,
            botocore.exceptions.HTTPClientError
            | botocore.exceptions.ConnectionError  # endpoint down: refused, connect timeout
            | botocore.exceptions.ResponseStreamingError
            | botocore.exceptions.IncompleteReadError,
        ):
            return TargetUnavailable(f"{self._where()}: {exc}")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return TargetError(f"{self._where()}: no S3 credentials configured")
        return TargetError(f"{self._where()}: {exc}")

    def _call(self, op: Callable[..., T], key: str, **kwargs: Any) -> T:
        try:
            return op(**kwargs)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._not_found_or(exc, key) from exc

    def _not_found_or(self, exc: Exception, key: str) -> Exception:
        """HEAD answers a bare 404 for a missing bucket too: tell them apart once."""
        err = self._translate(exc, key)
        if isinstance(err, NoSuchObject) and not self._bucket_checked:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as bexc:
                berr = self._translate(bexc, "")
                if isinstance(berr, NoSuchObject):
                    return TargetError(f"{self._where()}: the bucket does not exist")
                return berr
            self._bucket_checked = True
        return err

    # -- operations -----------------------------------------------------

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, data: Data) -> None:
        size = _size(data)
        if size <= self.multipart_threshold:
            with _Source(data) as source:
                body = source.read(0, size) if size else b""
            self._call(
                self.client.put_object, key, Bucket=self.bucket, Key=self._key(key), Body=body
            )
            return
        self._put_multipart(key, data)

    def _put_multipart(self, key: str, data: Data) -> None:
        """Parts of ``part_size`` uploaded ``concurrency`` at a time; abort on failure."""
        full = self._key(key)
        size = _size(data)
        upload = self._call(self.client.create_multipart_upload, key, Bucket=self.bucket, Key=full)
        upload_id = upload["UploadId"]
        try:
            with _Source(data) as source:

                def send(item: tuple[int, tuple[int, int]]) -> dict[str, Any]:
                    number, (offset, length) = item
                    block = source.read(offset, length)
                    resp = self._call(
                        self.client.upload_part,
                        key,
                        Bucket=self.bucket,
                        Key=full,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=block,
                    )
                    return {"ETag": resp["ETag"], "PartNumber": number}

                parts = _parallel(send, list(enumerate(self._layout(data, size), 1)),
                                  self.concurrency)
            self._call(
                self.client.complete_multipart_upload,
                key,
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except Exception:
                pass  # the bucket's lifecycle rule cleans up what we cannot
            raise

    def _layout(self, data: Data, size: int) -> list[tuple[int, int]]:
        """(offset, length) of each part: the source's own cut when it has one
        (SealedFile: at sealed-chunk boundaries), else ``part_size`` pieces."""
        parts = getattr(data, "parts", None)
        if callable(parts):
            return parts(self.part_size)
        return [(o, min(self.part_size, size - o)) for o in range(0, size, self.part_size)]

    def get(self, key: str) -> bytes:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._not_found_or(exc, key) from exc

    def get_to_file(self, key: str, path: Path) -> None:
        """Small objects: one streamed GET; large ones: ranged GETs of
        ``part_size``, ``concurrency`` at a time, each pinned to the ETag."""
        path = Path(path)
        tmp = _tmp_name(path)
        try:
            with open(tmp, "wb") as out:
                info = self.head(key)
                if info is None:
                    raise NoSuchObject(f"{self._where()}: no object {key}")
                if info.size <= self.multipart_threshold:
                    self._get_stream(key, out)
                else:
                    self._get_ranges(key, info, out)
            os.replace(tmp, path)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            tmp.unlink(missing_ok=True)
            raise self._not_found_or(exc, key) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _get_stream(self, key: str, out: BinaryIO) -> None:
        resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        for block in resp["Body"].iter_chunks(STREAM_BLOCK):
            out.write(block)

    def _get_ranges(self, key: str, info: ObjectInfo, out: BinaryIO) -> None:
        out.truncate(info.size)
        fd = out.fileno()
        ranges = [(o, min(self.part_size, info.size - o)) for o in range(0, info.size, self.part_size)]
        self.get_ranges(key, ranges, lambda offset, block: os.pwrite(fd, block, offset), info.etag)

    def get_range(self, key: str, offset: int, length: int, etag: str | None = None) -> bytes:
        extra = {"IfMatch": f'"{etag}"'} if etag else {}
        try:
            resp = self.client.get_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Range=f"bytes={offset}-{offset + max(length, 1) - 1}",
                **extra,
            )
            return resp["Body"].read()[:length]
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # ``offset`` is at or past the end
            raise self._not_found_or(exc, key) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._not_found_or(exc, key) from exc

    def get_ranges(
        self,
        key: str,
        ranges: list[tuple[int, int]],
        handle: Callable[[int, bytes], None],
        etag: str | None = None,
    ) -> None:
        def fetch(item: tuple[int, int]) -> None:
            offset, length = item
            block = self.get_range(key, offset, length, etag)
            if len(block) != length:
                raise TargetUnavailable(f"{self._where()}: short range read of {key}")
            _offload(handle, offset, block)

        _parallel(fetch, ranges, self.concurrency)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = self._call(self.client.head_object, key, Bucket=self.bucket, Key=self._key(key))
        except NoSuchObject:
            return None
        return ObjectInfo(
            key, resp["ContentLength"], resp["LastModified"].timestamp(), resp["ETag"].strip('"')
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=self.prefix + prefix,
            PaginationConfig={"PageSize": self.page_size},
        )
        cut = len(self.prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(
                        obj["Key"][cut:],
                        obj["Size"],
                        obj["LastModified"].timestamp(),
                        obj.get("ETag", "").strip('"') or None,
                    )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._translate(exc, prefix) from exc

    def delete(self, keys: Iterable[str]) -> None:
        batch: list[dict[str, str]] = []
        for key in keys:
            batch.append({"Key": self._key(key)})
            if len(batch) == self.delete_batch:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, batch: list[dict[str, str]]) -> None:
        resp = self._call(
            self.client.delete_objects,
            batch[0]["Key"],
            Bucket=self.bucket,
            Delete={"Objects": batch, "Quiet": True},
        )
        errors = [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            raise TargetError(
                f"{self._where()}: {len(errors)} objects not deleted, e.g. "
                f"{first.get('Key')}: {first.get('Code')}: {first.get('Message')}"
            )

    def create_bucket(self) -> None:
        region = self.client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._translate(exc, "") from exc
        self._bucket_checked = True

    def close(self) -> None:
        self.client.close()


# -- from configuration -----------------------------------------------------


def open_target(settings: BackupSettings, **s3_options: Any) -> Target:
    """The target named by ``settings.target``: ``s3://BUCKET/PREFIX`` or ``file:///PATH``.

    ``s3_options`` override S3Target's tuning (timeouts, attempts, part size)."""
    url = urlparse(settings.target)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost") or not url.path.startswith("/"):
            raise TargetError(f"backup.target {settings.target!r}: expected file:///ABSOLUTE/PATH")
        return LocalTarget(Path(unquote(url.path)))
    if url.scheme != "s3" or not url.netloc:
        raise TargetError(
            f'backup.target {settings.target!r}: expected "s3://BUCKET/PREFIX" or "file:///PATH"'
        )
    secret = None
    if settings.access_key_id:
        if not settings.secret_access_key_file:
            raise TargetError("backup.access_key_id needs backup.secret_access_key_file")
        try:
            secret = Path(settings.secret_access_key_file).read_text().strip()
        except OSError as exc:
            raise TargetError(
                f"backup.secret_access_key_file {settings.secret_access_key_file}: {exc.strerror}"
            ) from exc
    return S3Target(
        url.netloc,
        url.path.lstrip("/"),
        endpoint_url=settings.endpoint_url or None,
        region=settings.region,
        path_style=settings.path_style,
        access_key_id=settings.access_key_id or None,
        secret_access_key=secret,
        ca_bundle=settings.ca_bundle or None,
        **s3_options,
    )
