"""Object storage: the one seam between DupHunter and its durable bytes.

`ObjectStore` is the small interface every backend implements; `S3Store` is the driver
for S3-compatible servers (MinIO in production, SeaweedFS here) through the minio SDK.
A placement layer that spreads objects over several nodes will implement the same
interface on top of several `S3Store`s.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, BinaryIO, Protocol, TypeVar, cast

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error, ServerError

from pipelines.config import Settings
from pipelines.metrics import S3_ERRORS

CHUNK_SIZE = 1 << 20
STREAM_PART_SIZE = 8 << 20  # part size when the length is not known up front


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class WholeReads:
    """`stream`, each read answered in full (short only at the end). The minio SDK
    appends each read to its part with `bytes +=`, so a stream that answers in small
    pieces cost time quadratic in the pieces of a part: 2.2 s of CPU for a pack of
    4,000 files of 2 kB, against 0.02 s read whole."""

    def __init__(self, stream: Readable) -> None:
        self.stream = stream

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            return b"".join(iter(self.stream.read, b""))
        pieces: list[bytes] = []
        while size > 0 and (piece := self.stream.read(size)):
            pieces.append(piece)
            size -= len(piece)
        return b"".join(pieces)


class ObjectNotFound(KeyError):
    """The key names no object."""


@dataclass(frozen=True)
class Listed:
    key: str
    size: int
    modified: float  # epoch seconds of the last write


class ObjectStore(Protocol):
    def put_stream(self, key: str, stream: Readable, length: int | None) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_bytes_range(self, key: str, offset: int, length: int) -> bytes: ...
    def iter_range(
        self, key: str, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]: ...
    def size(self, key: str) -> int | None: ...
    def delete(self, keys: list[str]) -> None: ...
    def list(self, prefix: str) -> Iterator[tuple[str, int]]: ...
    def listing(self, prefix: str) -> Iterator[Listed]: ...
    def presigned_get(self, key: str, seconds: int) -> str: ...


Method = TypeVar("Method", bound=Callable[..., Any])


def counted(operation: str) -> Callable[[Method], Method]:
    """Count the S3 failures of a method in duphunter_s3_errors_total (a missing key is an
    answer, not a failure)."""

    def wrap(method: Method) -> Method:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except (S3Error, ServerError, urllib3.exceptions.HTTPError) as error:
                _count_failure(operation, error)
                raise

        return cast(Method, call)

    return wrap


def _count_failure(operation: str, error: Exception) -> None:
    code = getattr(error, "code", None) or type(error).__name__
    if code not in ("NoSuchKey", "NoSuchObject", "NotFound"):
        S3_ERRORS.labels(operation, code).inc()


class S3Store:
    """ObjectStore on one bucket of an S3-compatible server."""

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        http = urllib3.PoolManager(
            maxsize=32,
            timeout=urllib3.Timeout(connect=10, read=300),
            retries=urllib3.Retry(
                total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        self.client = Minio(
            settings.s3_endpoint_hostport,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_endpoint_is_https,
            region=settings.s3_region,
            http_client=http,
        )

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    @counted("put_stream")
    def put_stream(self, key: str, stream: Readable, length: int | None) -> None:
        whole = cast(BinaryIO, WholeReads(stream))
        if length is None:
            self.client.put_object(self.bucket, key, whole, -1, part_size=STREAM_PART_SIZE)
        else:
            self.client.put_object(self.bucket, key, whole, length)

    @counted("put_bytes")
    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data))

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_range(key))

    def get_bytes_range(self, key: str, offset: int, length: int) -> bytes:
        return b"".join(self.iter_range(key, offset, length))

    @counted("iter_range")
    def iter_range(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Stream `length` bytes (or to the end) from `offset`; raises ObjectNotFound early."""
        try:
            response = self.client.get_object(self.bucket, key, offset=offset, length=length or 0)
        except S3Error as error:
            raise _translate(error, key) from error
        return _stream_and_release(response)

    @counted("size")
    def size(self, key: str) -> int | None:
        try:
            return int(self.client.stat_object(self.bucket, key).size or 0)
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return None
            raise

    @counted("delete")
    def delete(self, keys: list[str]) -> None:
        if not keys:
            return
        errors = list(self.client.remove_objects(self.bucket, (DeleteObject(key) for key in keys)))
        real = [error for error in errors if error.code != "NoSuchKey"]
        if real:  # as an S3Error, so that a SlowDown or an InternalError is retried
            first = real[0]
            raise S3Error(
                None,  # type: ignore[arg-type]  # a key's error in a 200 answer: no response
                first.code,
                f"{first.message} ({len(real)} of {len(keys)} keys not deleted)",
                first.name,
                None,
                None,
                self.bucket,
                first.name,
            )

    def presigned_get(self, key: str, seconds: int) -> str:
        """A URL that lets its holder GET the object for `seconds`, without credentials."""
        return str(self.client.presigned_get_object(self.bucket, key, timedelta(seconds=seconds)))

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        for item in self.listing(prefix):
            yield item.key, item.size

    def listing(self, prefix: str) -> Iterator[Listed]:
        """Every object under `prefix`, with its size and the time it was written."""
        for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            if item.object_name is not None and not item.is_dir:
                modified = item.last_modified.timestamp() if item.last_modified else 0.0
                yield Listed(item.object_name, int(item.size or 0), modified)


_EXISTS_POOL = ThreadPoolExecutor(16, thread_name_prefix="s3-head")


def sizes(store: ObjectStore, keys: Iterable[str]) -> dict[str, int | None]:
    """The size of each object (None: no such object), asked for all at once."""
    wanted = list(dict.fromkeys(keys))
    return dict(zip(wanted, _EXISTS_POOL.map(store.size, wanted), strict=True))


def _stream_and_release(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    try:
        yield from response.stream(CHUNK_SIZE)
    except urllib3.exceptions.HTTPError as error:
        _count_failure("iter_range", error)
        raise
    finally:
        response.close()
        response.release_conn()


def _translate(error: S3Error, key: str) -> Exception:
    if error.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
        return ObjectNotFound(key)
    return error
