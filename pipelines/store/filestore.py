"""The content store: each unique regular-file payload stored once, keyed by its sha256.

Files are stored in packs (`packs/<xx>/<id>`, as restic and Borg do): one S3 object holds
many files, each zstd-compressed when that makes it smaller, so ingesting or restoring a
layer of thousands of small files costs a few large requests, not thousands of small
ones. A file larger than a pack gets a pack of its own. Pack layout (version 1):

    entries      per file: 1 codec byte (0 raw, 1 zstd) + the stored bytes
    table        per file: sha256 (32 bytes) + offset (u64) + length (u32, codec byte incl.)
    trailer      count (u32) + b"DHP" + version byte

The sha256 is the identity; nothing weaker is trusted. The Redis index maps each file to
its place (`<pack> <offset> <length>`) and is rebuilt from the pack tables when lost; the
references each file has are recounted from recipes.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import IO

import zstandard

from pipelines.errors import IndexIncomplete
from pipelines.formats.codecs import ChunkReader
from pipelines.store.filecache import VerifiedFiles, spool_chunks, spooled
from pipelines.store.index import Index
from pipelines.store.storage import ObjectNotFound, ObjectStore, sizes

FORMAT_VERSION = 1
PACK_MAGIC = b"DHP" + bytes((FORMAT_VERSION,))
CODEC_RAW, CODEC_ZSTD = 0, 1
ZSTD_LEVEL = 3
IN_MEMORY_LIMIT = 8 << 20  # larger payloads are spooled to a temporary file
PACK_TARGET = 8 << 20  # a pack is sealed once it holds this much
PACKS_IN_FLIGHT = 2  # sealed packs held for upload at once: filling waits for S3 beyond
LOOKUP_BATCH = 128  # new-or-known is asked of the index this many files at a time
CLAIM_POLL_SECONDS = 0.2
CHUNK = 1 << 20
_TABLE_ENTRY = struct.Struct(">32sQI")
_TRAILER = struct.Struct(">I4s")


class FileStoreError(Exception):
    """A stored file or pack is malformed or missing. A file's error names the sha256 the
    file must hash to (`digest`) and, where known, the pack it was read from (`pack`): the
    two names the recovery from corruption starts from (docs/operations.md)."""

    def __init__(
        self, message: str, digest: bytes | None = None, pack: str = "", problem: str = ""
    ) -> None:
        super().__init__(message)
        self.digest = digest
        self.pack = pack
        self.problem = problem or message  # what is wrong, without the names


def file_error(digest: bytes, pack: str, problem: str) -> FileStoreError:
    """`file sha256:<hex> in pack <key> <problem>`: the file by the hash it must have, and
    where it was read from (left out when not known)."""
    where = f" in pack {pack}" if pack else ""
    return FileStoreError(f"file sha256:{digest.hex()}{where} {problem}", digest, pack, problem)


@dataclass(frozen=True, slots=True)  # slots: a restore makes one per file it fetches
class Location:
    """Where a file's stored form is: a byte range of a pack (codec byte first)."""

    pack: str
    offset: int
    length: int

    def encode(self) -> str:
        return f"{self.pack} {self.offset} {self.length}"

    @classmethod
    def decode(cls, text: str) -> Location:
        pack, offset, length = text.split(" ")
        return cls(pack, int(offset), int(length))


def new_pack_key() -> str:
    name = uuid.uuid4().hex
    return f"packs/{name[:2]}/{name}"


def pack_table(entries: Sequence[tuple[bytes, int, int]]) -> bytes:
    """The table and trailer that end a pack: (digest, offset, length) per file."""
    table = b"".join(_TABLE_ENTRY.pack(*entry) for entry in entries)
    return table + _TRAILER.pack(len(entries), PACK_MAGIC)


def read_pack_table(store: ObjectStore, key: str, size: int) -> list[tuple[bytes, Location]]:
    """The files a pack holds, read from its table (this is how the index is rebuilt)."""
    if size < _TRAILER.size:
        raise FileStoreError(f"pack {key} is too short")
    trailer = store.get_bytes_range(key, size - _TRAILER.size, _TRAILER.size)
    count, magic = _TRAILER.unpack(trailer)
    table_size = count * _TABLE_ENTRY.size
    if magic != PACK_MAGIC or table_size + _TRAILER.size > size:
        raise FileStoreError(f"pack {key} has no valid table")
    table = store.get_bytes_range(key, size - _TRAILER.size - table_size, table_size)
    return [
        (digest, Location(key, offset, length))
        for digest, offset, length in _TABLE_ENTRY.iter_unpack(table)
    ]


_SHA256 = hashlib.sha256()
_per_thread = threading.local()


def new_sha256() -> hashlib._Hash:
    """A fresh sha256 hasher, copied: making one by name looks the algorithm up in
    OpenSSL 3 each time, which costs more than hashing a small file."""
    return _SHA256.copy()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor, for one-shot decompression (a new one allocates
    its context and probes the CPU, which costs more than a small file's bytes)."""
    decompressor: zstandard.ZstdDecompressor | None = getattr(_per_thread, "zstd", None)
    if decompressor is None:
        decompressor = _per_thread.zstd = zstandard.ZstdDecompressor()
    return decompressor


def decode_stored(stored: bytes | memoryview, digest: bytes, size: int, pack: str = "") -> bytes:
    """A file's bytes from its stored form (codec byte, then raw or zstd bytes), checked
    against its size and sha256: a damaged pack never passes on a wrong file. `pack`,
    where the stored form was read, is named in the error."""
    body = memoryview(stored)[1:]
    if stored[:1] == bytes((CODEC_RAW,)):
        content = bytes(body)
    elif stored[:1] == bytes((CODEC_ZSTD,)):
        try:
            content = _decompressor().decompress(body, max_output_size=size)
        except zstandard.ZstdError as error:
            raise file_error(digest, pack, f"does not decompress: {error}") from error
    else:
        raise file_error(digest, pack, "has an unknown stored form")
    hasher = new_sha256()
    hasher.update(content)
    _check_file(digest, pack, size, len(content), hasher.digest())
    return content


def check_stored(stored: bytes, digest: bytes, pack: str = "") -> None:
    """Check a file's stored form against its sha256, whatever its size."""
    hasher = new_sha256()
    size = 0
    for chunk in _decoded(iter([stored]), digest, pack):
        hasher.update(chunk)
        size += len(chunk)
    if hasher.digest() != digest:
        actual = f"sha256:{hasher.hexdigest()}"
        problem = f"read back as {size} bytes hashing to {actual} (expected sha256:{digest.hex()})"
        raise file_error(digest, pack, problem)


def _check_file(digest: bytes, pack: str, size: int, actual_size: int, actual: bytes) -> None:
    if actual_size != size or actual != digest:
        expected = f"expected {size} bytes hashing to sha256:{digest.hex()}"
        problem = f"read back as {actual_size} bytes hashing to sha256:{actual.hex()} ({expected})"
        raise file_error(digest, pack, problem)


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


@dataclass(frozen=True)
class PackAudit:
    """What the packs hold against what the index points to: copies no index entry
    points to (left by a crash, or a lost race) are dead bytes, for GC to free."""

    packs: int
    pack_bytes: int
    live_bytes: int
    dead_bytes: int
    dead_copies: int

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class FileStore:
    def __init__(self, store: ObjectStore, index: Index, claim_lease_ms: int = 60_000) -> None:
        self.store = store
        self.index = index
        self.claim_lease_ms = claim_lease_ms
        self.verified = VerifiedFiles()  # large files read with `keep`: one fetch, many reads

    def audit(self) -> PackAudit:
        """Read every pack's table and compare it with the index."""
        packs = pack_bytes = live = dead = dead_copies = 0
        for key, size in self.store.list("packs/"):
            table = read_pack_table(self.store, key, size)
            where = self.index.file_locations([digest.hex() for digest, _location in table])
            packs, pack_bytes = packs + 1, pack_bytes + size
            for (_digest, location), indexed in zip(table, where, strict=True):
                if indexed == location.encode():
                    live += location.length
                else:
                    dead, dead_copies = dead + location.length, dead_copies + 1
        return PackAudit(packs, pack_bytes, live, dead, dead_copies)

    def locate(self, digests: Sequence[bytes]) -> list[Location | None]:
        found = self.index.file_locations([digest.hex() for digest in digests])
        return [None if text is None else Location.decode(text) for text in found]

    def unlocated(self, digest: bytes) -> Exception:
        """What a read of a file the index does not name raises: while the index is
        incomplete the file may be in a pack all the same (come back: a 503), once it is
        complete the file is not stored."""
        if not self.index.is_ready():
            return IndexIncomplete({"file": f"sha256:{digest.hex()}"})
        return file_error(digest, "", "is not stored (not in the index)")

    def read_range(self, pack: str, offset: int, length: int) -> bytes:
        return self.store.get_bytes_range(pack, offset, length)

    def open(self, digest: bytes, size: int, keep: bool = False) -> Iterator[bytes]:
        """One file's bytes in chunks, for files too large to fetch with their neighbours.
        They are decompressed as they stream in, spooled, and passed on only once the whole
        file has the right size and sha256; a file that grows past `size` stops at once.
        With `keep`, a file spooled to disk is kept there a while for the next reader (a
        file that segments are cut inside: each segment's encoder reads all of it)."""
        if size <= IN_MEMORY_LIMIT:  # its size is known: held as it came, or on disk at once
            held = list(self._fetch_checked(digest, size))
            yield from held
            return
        fetch = partial(self._fetch_checked, digest, size)
        if keep:
            yield from self.verified.read(digest, size, fetch)
            return
        with spooled(fetch) as spool:
            yield from spool_chunks(spool, size)

    def _fetch_checked(self, digest: bytes, size: int) -> Iterator[bytes]:
        pack, chunks = self._stored(digest)
        return _checked(_decoded(chunks, digest, pack), digest, size, pack)

    def _stored(self, digest: bytes) -> tuple[str, Iterator[bytes]]:
        """A file's pack and its stored form as it streams in. A pack deleted since the file
        was located (compacted by GC) is looked up once more: the index points at the copy."""
        seen = None
        while True:
            (location,) = self.locate([digest])
            if location is None:
                raise self.unlocated(digest)
            try:
                pack = location.pack
                return pack, self.store.iter_range(pack, location.offset, location.length)
            except ObjectNotFound:
                if location == seen:
                    raise
                seen = location

    def missing(self, digests: Sequence[bytes]) -> list[bytes]:
        """Of these files, those not stored now: not indexed, or indexed in a pack that is
        gone. Such stale entries are dropped, so that the next ingest stores the file."""
        located = dict(zip(digests, self.locate(digests), strict=True))
        packs = sizes(self.store, (location.pack for location in located.values() if location))
        gone = {pack for pack, size in packs.items() if size is None}
        stale = {digest: location for digest, location in located.items()
                 if location is not None and location.pack in gone}  # fmt: skip
        self.index.forget_files({d.hex(): loc.encode() for d, loc in stale.items()})
        return [digest for digest, location in located.items() if location is None] + list(stale)

    def put_pack(
        self,
        key: str,
        parts: list[bytes] | _SpooledChunks,
        length: int,
        entries: list[tuple[bytes, int, int]],
    ) -> int:
        """Upload a sealed pack, then index its files; how many were new to the index.
        A file indexed meanwhile from another pack makes its copy here garbage: counted."""
        try:
            self.store.put_stream(key, ChunkReader(iter(parts)), length)
        finally:
            if isinstance(parts, _SpooledChunks):
                parts.close()
        self.index.add_bytes(stored=length)
        added = self.index.add_files(
            {digest.hex(): Location(key, offset, size).encode() for digest, offset, size in entries}
        )
        garbage = sum(size for (_d, _o, size), new in zip(entries, added, strict=True) if not new)
        if garbage:
            self.index.count("pack_garbage_bytes", garbage)
        return sum(added)


def _checked(chunks: Iterator[bytes], digest: bytes, size: int, pack: str) -> Iterator[bytes]:
    """The chunks of a file, hashed on the way; the iteration ends with the check of its
    size and sha256, so a caller holds every chunk back until it ends. A file that grows
    past `size` stops at once."""
    hasher, length = new_sha256(), 0
    for data in chunks:
        length += len(data)
        if length > size:
            raise file_error(digest, pack, f"is longer than {size} bytes")
        hasher.update(data)
        yield data
    _check_file(digest, pack, size, length, hasher.digest())


def _decoded(chunks: Iterator[bytes], digest: bytes, pack: str) -> Iterator[bytes]:
    """The bytes of a stored file (codec byte first) as they arrive, decompressed."""
    head = b""
    while not head:
        head = next(chunks, None) or _missing(digest, pack)
    codec, rest = head[0], head[1:]
    if codec == CODEC_RAW:
        yield rest
        yield from chunks
        return
    if codec != CODEC_ZSTD:
        raise file_error(digest, pack, "has an unknown stored form")
    # A reader, not decompressobj: that returns all a chunk holds at once (a GiB of zeros
    # is stored in a few KB); a reader hands out at most CHUNK at a time.
    stored = io.BufferedReader(ChunkReader(itertools.chain((rest,), chunks)), CHUNK)
    reader = zstandard.ZstdDecompressor().stream_reader(stored, read_size=CHUNK, closefd=False)
    try:
        while out := reader.read(CHUNK):
            yield out
    except zstandard.ZstdError as error:
        raise file_error(digest, pack, f"does not decompress: {error}") from error


def _missing(digest: bytes, pack: str) -> bytes:
    raise file_error(digest, pack, "is truncated")


class Packer:
    """Packs the new files of one layer as the tar is read, uploading each sealed pack on
    a pool thread; files the index knows already are skipped. Use as a context manager:
    leaving it waits until every pack is stored and indexed.

    Several ingest workers may meet the same new file at once: a worker stores a file only
    after claiming it in Redis (a lease, renewed while the worker lives); a file another
    worker claimed is only awaited. Leaving the Packer waits until those are indexed too;
    the ones whose claimant died (lease expired, file not indexed) are left in `orphaned`,
    for the caller to store itself."""

    def __init__(self, files: FileStore, threads: int = 4) -> None:
        self.files = files
        self.lease_ms = files.claim_lease_ms
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pack-put")
        self.uploads: list[Future[int]] = []
        self.waiting: list[SpooledPayload] = []
        self.waiting_bytes = 0
        self.packed: set[bytes] = set()
        self.awaited: set[bytes] = set()  # claimed by another worker
        self.orphaned: set[bytes] = set()  # awaited, but their claimant died
        self.token = uuid.uuid4().hex
        self.parts: list[bytes] = []
        self.entries: list[tuple[bytes, int, int]] = []
        self.offset = 0
        self.new_files = 0
        self.new_bytes = 0
        self.stop_renewing = threading.Event()
        self.renewer = threading.Thread(target=self._renew_claims, daemon=True)
        self.renewer.start()

    def add(self, payload: SpooledPayload) -> None:
        self.waiting.append(payload)
        self.waiting_bytes += min(payload.size, IN_MEMORY_LIMIT)
        if len(self.waiting) >= LOOKUP_BATCH or self.waiting_bytes >= PACK_TARGET:
            self._pack_waiting()

    def _pack_waiting(self) -> None:
        known = self.files.locate([payload.digest for payload in self.waiting])
        new = [
            payload
            for payload, location in zip(self.waiting, known, strict=True)
            if location is None
            and payload.digest not in self.packed
            and payload.digest not in self.awaited
        ]
        new = list({payload.digest: payload for payload in new}.values())
        granted = self.files.index.claim_files(
            [payload.digest.hex() for payload in new], self.token, self.lease_ms
        )
        for payload, mine in zip(new, granted, strict=True):
            if mine:
                self.packed.add(payload.digest)
                self._pack(payload)
            else:
                self.awaited.add(payload.digest)
        for payload in self.waiting:
            payload.close()
        self.waiting, self.waiting_bytes = [], 0

    def _pack(self, payload: SpooledPayload) -> None:
        codec, body, length = _encode(payload)
        if isinstance(body, _SpooledChunks):  # a large file: a pack of its own, streamed
            entries = [(payload.digest, 0, length + 1)]
            body.head, body.tail = bytes((codec,)), pack_table(entries)
            self._upload(new_pack_key(), body, length + 1 + len(body.tail), entries)
            return
        self.entries.append((payload.digest, self.offset, length + 1))
        self.parts += [bytes((codec,)), *body]
        self.offset += length + 1
        if self.offset >= PACK_TARGET:
            self._seal()

    def _seal(self) -> None:
        if not self.entries:
            return
        table = pack_table(self.entries)
        self._upload(new_pack_key(), [*self.parts, table], self.offset + len(table), self.entries)
        self.parts, self.entries, self.offset = [], [], 0

    def _upload(
        self,
        key: str,
        parts: list[bytes] | _SpooledChunks,
        length: int,
        entries: list[tuple[bytes, int, int]],
    ) -> None:
        self.new_bytes += length
        while sum(not upload.done() for upload in self.uploads) >= PACKS_IN_FLIGHT:
            next(upload for upload in self.uploads if not upload.done()).exception()
        self.uploads.append(self.pool.submit(self.files.put_pack, key, parts, length, entries))

    def __enter__(self) -> Packer:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        try:
            if kind is None:
                self._pack_waiting()
                self._seal()
            for upload in self.uploads:
                self.new_files += upload.result()
            if kind is None:
                self._await_others()
        finally:
            self.stop_renewing.set()
            self.files.index.release_claims([d.hex() for d in self.packed], self.token)
            for payload in self.waiting:
                payload.close()
            self.pool.shutdown(cancel_futures=True)

    def _await_others(self) -> None:
        """Wait until the files other workers claimed are indexed, or their claims lapse."""
        pending = sorted(self.awaited)
        while pending:
            found = self.files.locate(pending)
            pending = [d for d, location in zip(pending, found, strict=True) if location is None]
            held = self.files.index.claimed([d.hex() for d in pending])
            self.orphaned |= {d for d, alive in zip(pending, held, strict=True) if not alive}
            pending = [d for d, alive in zip(pending, held, strict=True) if alive]
            if pending:
                time.sleep(CLAIM_POLL_SECONDS)
        # a claim may lapse just as its file is indexed: look once more
        found = self.files.locate(sorted(self.orphaned))
        self.orphaned = {d for d, loc in zip(sorted(self.orphaned), found, strict=True) if not loc}

    def _renew_claims(self) -> None:
        while not self.stop_renewing.wait(self.lease_ms / 3000):
            self.files.index.renew_claims([d.hex() for d in self.packed], self.token, self.lease_ms)


def _encode(payload: SpooledPayload) -> tuple[int, list[bytes] | _SpooledChunks, int]:
    """The codec, the stored chunks and their length: zstd only when it is smaller."""
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
    spool.seek(0)
    spool.truncate()
    for chunk in payload.chunks():
        spool.write(chunk)
    return CODEC_RAW, _SpooledChunks(spool), payload.size


class _SpooledChunks:
    """The chunks of a spool file, optionally framed by head and tail bytes; closed once
    uploaded (it outlives the payload it was made from)."""

    def __init__(self, spool: IO[bytes], head: bytes = b"", tail: bytes = b"") -> None:
        self.spool = spool
        self.head = head
        self.tail = tail

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        self.spool.seek(0)
        while data := self.spool.read(CHUNK):
            yield data
        yield self.tail

    def close(self) -> None:
        self.spool.close()
