"""The content store: each unique regular-file payload stored once, keyed by its sha256.

Object `files/<hex[:2]>/<hex>` holds a 2-byte header (format version, codec) and the
payload, zstd-compressed when that makes it smaller. The sha256 is the identity; nothing
weaker is trusted. Which files exist and how many layer recipes reference each is indexed
in Redis and rebuilt from S3 (files and recipes) when lost.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO

import zstandard

from pipelines.codecs import _IterReader as ChunkReader
from pipelines.index import Index
from pipelines.storage import ObjectStore

FORMAT_VERSION = 1
CODEC_RAW, CODEC_ZSTD = 0, 1
ZSTD_LEVEL = 3
IN_MEMORY_LIMIT = 8 << 20  # larger payloads are spooled to a temporary file
CHUNK = 1 << 20


class FileStoreError(Exception):
    """A stored file is malformed or does not hash to its name."""


def file_key(hex_digest: str) -> str:
    return f"files/{hex_digest[:2]}/{hex_digest}"


class SpooledPayload:
    """A payload read once from the tar, hashed on the way, kept in memory or on disk."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        hasher = hashlib.sha256()
        self.size = 0
        self._memory: list[bytes] = []
        self._file: IO[bytes] | None = None
        for chunk in chunks:
            hasher.update(chunk)
            self.size += len(chunk)
            self._keep(chunk)
        self.digest = hasher.digest()

    def _keep(self, chunk: bytes) -> None:
        if self._file is None and self.size > IN_MEMORY_LIMIT:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
            for kept in self._memory:
                self._file.write(kept)
            self._memory.clear()
        if self._file is None:
            self._memory.append(chunk)
        else:
            self._file.write(chunk)

    def chunks(self) -> Iterator[bytes]:
        if self._file is None:
            yield from self._memory
            return
        self._file.seek(0)
        while data := self._file.read(CHUNK):
            yield data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._memory.clear()


class FileStore:
    def __init__(self, store: ObjectStore, index: Index) -> None:
        self.store = store
        self.index = index

    def has(self, digest: bytes) -> bool:
        return self.index.file_size(digest.hex()) is not None

    def put(self, payload: SpooledPayload) -> int:
        """Store the payload unless it is known; the bytes this call added to storage."""
        hex_digest = payload.digest.hex()
        if self.index.file_size(hex_digest) is not None:
            return 0
        codec, body, length = _encode(payload)
        try:
            stream = ChunkReader(iter([bytes((FORMAT_VERSION, codec)), *body]))
            self.store.put_stream(file_key(hex_digest), stream, length + 2)
        finally:
            if hasattr(body, "close"):
                body.close()
        stored = length + 2
        if not self.index.add_file(hex_digest, stored):
            return 0  # a concurrent ingest stored the same file first and counted it
        self.index.add_bytes(stored=stored)
        return stored

    def open(self, digest: bytes) -> Iterator[bytes]:
        """The payload's bytes, decompressed, in chunks."""
        chunks = self.store.iter_range(file_key(digest.hex()))
        first = next(chunks, b"")
        while len(first) < 2:
            more = next(chunks, None)
            if more is None:
                raise FileStoreError(f"file {digest.hex()} is truncated")
            first += more
        version, codec = first[0], first[1]
        if version != FORMAT_VERSION or codec not in (CODEC_RAW, CODEC_ZSTD):
            raise FileStoreError(f"file {digest.hex()}: unknown format {version}/{codec}")
        rest = _prepend(first[2:], chunks)
        if codec == CODEC_RAW:
            yield from rest
            return
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        for chunk in rest:
            if out := decompressor.decompress(chunk):
                yield out


class ParallelPut:
    """Stores payloads on a few threads while the caller goes on reading the tar: one
    S3 PUT per new file would otherwise serialise ingestion on round trips."""

    def __init__(self, files: FileStore, threads: int = 8, in_flight: int = 16) -> None:
        self.files = files
        self.in_flight = in_flight
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="file-put")
        self.pending: deque[Future[int]] = deque()
        self.new_files = 0
        self.new_bytes = 0

    def add(self, payload: SpooledPayload) -> None:
        """Store `payload` (and close it) unless it is known already; the lookup, too,
        happens on a pool thread, so the caller never waits on a round trip."""
        while len(self.pending) >= self.in_flight:
            self._collect(self.pending.popleft())
        self.pending.append(self.pool.submit(self._put, payload))

    def _put(self, payload: SpooledPayload) -> int:
        try:
            return self.files.put(payload)
        finally:
            payload.close()

    def _collect(self, future: Future[int]) -> None:
        added = future.result()
        if added:
            self.new_files += 1
            self.new_bytes += added

    def __enter__(self) -> ParallelPut:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            while self.pending:
                self._collect(self.pending.popleft())
        finally:
            self.pool.shutdown(cancel_futures=True)


def _prepend(head: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
    if head:
        yield head
    yield from chunks


def _encode(payload: SpooledPayload) -> tuple[int, list[bytes] | _SpooledChunks, int]:
    """The codec, the body chunks and their length: zstd only when it is smaller."""
    if payload.size <= IN_MEMORY_LIMIT:
        raw = b"".join(payload.chunks())
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
        if len(packed) < len(raw):
            return CODEC_ZSTD, [packed], len(packed)
        return CODEC_RAW, [raw], len(raw)
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by _SpooledChunks.close
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    with compressor.stream_writer(spool, closefd=False, size=payload.size) as writer:
        for chunk in payload.chunks():
            writer.write(chunk)
    packed_size = spool.tell()
    if packed_size < payload.size:
        return CODEC_ZSTD, _SpooledChunks(spool), packed_size
    spool.close()
    return CODEC_RAW, _SpooledChunks(None, payload), payload.size


class _SpooledChunks:
    """Chunks of a spool file (or of the payload itself) that can be closed afterwards."""

    def __init__(self, spool: IO[bytes] | None, payload: SpooledPayload | None = None) -> None:
        self.spool = spool
        self.payload = payload

    def __iter__(self) -> Iterator[bytes]:
        if self.spool is None:
            assert self.payload is not None
            yield from self.payload.chunks()
            return
        self.spool.seek(0)
        while data := self.spool.read(CHUNK):
            yield data

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
