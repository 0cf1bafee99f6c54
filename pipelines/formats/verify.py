"""Segment digests, and the verified release of restored bytes.

At ingest, the pushed blob is cut into segments and the sha256 of each is recorded in
the recipe: the first of FIRST_SEGMENT_BYTES, each next one twice as long up to
SEGMENT_BYTES (the last one shorter), so the first verified bytes of a restore leave once
a little of the layer is rebuilt, not 4 MiB of it. The recipe records the ends, so any
are valid (layers ingested before had 4 MiB segments from the start). The digests are
computed from the pushed bytes in the same pass that checks the whole blob digest once
more, never from a restore. On pull, `release_verified` hands on a segment only once its
bytes hash to the recorded digest, and the last one only once the whole blob also hashes
to its digest: a Range GET near the start of a layer is served once its first segment is
rebuilt, and no byte that was not checked ever leaves.

A recipe without segment digests (written before they existed) is one segment whose
digest is the blob digest: its bytes are released when the whole blob is verified.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from pipelines.formats import Buffer

SEGMENT_BYTES = 4 << 20
FIRST_SEGMENT_BYTES = 256 << 10
SPOOL_IN_MEMORY = 2 * SEGMENT_BYTES  # a segment buffer larger than this goes to disk
READ_CHUNK = 1 << 20


class VerificationError(Exception):
    """Restored bytes differ from the pushed ones (digest, or length)."""


@dataclass(frozen=True)
class SegmentDigests:
    """The sha256 of each segment of a blob; `ends` are exclusive end offsets."""

    ends: tuple[int, ...]
    digests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.ends) != len(self.digests):
            raise ValueError("one digest per segment")
        if any(b <= a for a, b in zip((0, *self.ends), self.ends, strict=False)):
            raise ValueError("segment ends must increase")
        if any(len(digest) != 32 for digest in self.digests):
            raise ValueError("segment digests are sha256")

    @property
    def size(self) -> int:
        return self.ends[-1] if self.ends else 0


class SegmentHasher:
    """Passes on the chunks of the pushed blob (to the tar split, at ingest), computing
    the segment digests and the whole-blob sha256 on the way."""

    def __init__(
        self,
        chunks: Iterable[bytes],
        segment_bytes: int = SEGMENT_BYTES,
        first_bytes: int = FIRST_SEGMENT_BYTES,
    ) -> None:
        self.chunks = iter(chunks)
        self.segment_bytes = segment_bytes
        self.first_bytes = first_bytes
        self.whole = hashlib.sha256()
        self.current = hashlib.sha256()
        self.in_segment = 0
        self.size = 0
        self.ends: list[int] = []
        self.digests: list[bytes] = []

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        data = next(self.chunks)
        self._hash(data)
        return data

    def _hash(self, data: bytes) -> None:
        self.whole.update(data)
        view = memoryview(data)
        while view:
            wanted = self._wanted()
            take = min(len(view), wanted - self.in_segment)
            self.current.update(view[:take])
            self.in_segment += take
            self.size += take
            view = view[take:]
            if self.in_segment == wanted:
                self._close_segment()

    def _wanted(self) -> int:
        """The length of the segment being hashed: doubling from first_bytes."""
        doublings = min(len(self.ends), 32)
        return min(self.segment_bytes, self.first_bytes << doublings)

    def _close_segment(self) -> None:
        self.ends.append(self.size)
        self.digests.append(self.current.digest())
        self.current, self.in_segment = hashlib.sha256(), 0

    def finish(self, digest: str) -> SegmentDigests:
        """Hash what the consumer left unread; the digests, provided the whole blob hashes
        to `digest` (else the stored copy is not what was pushed)."""
        for _chunk in self:
            pass
        if self.in_segment:
            self._close_segment()
        actual = "sha256:" + self.whole.hexdigest()
        if actual != digest:
            raise VerificationError(f"the stored blob hashes to {actual}, not {digest}")
        return SegmentDigests(tuple(self.ends), tuple(self.digests))


def release_verified(
    chunks: Iterable[Buffer], digest: str, size: int, segments: SegmentDigests | None
) -> Iterator[Buffer]:
    """The bytes of `chunks`, each segment handed on only once it is verified, the last
    one only once the stream has ended and the whole blob hashes to `digest`. The chunks
    must not change once handed in: a segment's are held, not copied, while it is checked.

    Raises VerificationError the moment the stream runs past `size`, when a segment or
    the whole blob hashes wrong, or when the stream ends short. Without segment digests
    the whole blob is one segment, checked against `digest` alone."""
    algorithm, expected = digest.split(":", 1)
    if segments is not None and segments.size != size:
        raise VerificationError(f"segment digests cover {segments.size} bytes, not {size}")
    ends = segments.ends if segments else (size,)
    whole = hashlib.new(algorithm)
    produced = 0
    buffer = _SegmentBuffer()
    for chunk in chunks:
        produced += len(chunk)
        if produced > size:
            raise VerificationError(f"the restore ran past the blob's {size} bytes")
        whole.update(chunk)
        view = memoryview(chunk)
        while view:
            index = buffer.index
            take = min(len(view), ends[index] - buffer.start - buffer.length)
            buffer.add(view[:take])
            view = view[take:]
            if buffer.start + buffer.length < ends[index]:
                continue
            if segments is not None and buffer.digest() != segments.digests[index]:
                raise VerificationError(f"segment {index} of {digest} does not match")
            if index < len(ends) - 1:
                yield from buffer.release()
    if produced != size:
        raise VerificationError(f"the restore ended after {produced} of {size} bytes")
    if whole.hexdigest() != expected:
        raise VerificationError(f"the restored blob does not hash to {digest}")
    yield from buffer.release()


class _SegmentBuffer:
    """The bytes of one segment while it is checked: the chunks themselves (views of the
    objects they came in) while those objects take up to SPOOL_IN_MEMORY, on disk after."""

    def __init__(self) -> None:
        self.held: list[memoryview] = []
        self.held_bytes = 0  # of the objects the held views keep alive
        self.spool: IO[bytes] | None = None
        self.hasher = hashlib.sha256()
        self.index = 0  # of the segment being buffered
        self.start = 0
        self.length = 0

    def add(self, data: memoryview) -> None:
        self.hasher.update(data)
        self.length += len(data)
        if self.spool is None:
            kept = self.held and self.held[-1].obj is data.obj
            self.held_bytes += 0 if kept else memoryview(data.obj).nbytes
            self.held.append(data)
            if self.held_bytes > SPOOL_IN_MEMORY:
                self._to_disk()
        else:
            self.spool.write(data)

    def _to_disk(self) -> None:
        self.spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the buffer
        for view in self.held:
            self.spool.write(view)
        self.held, self.held_bytes = [], 0

    def digest(self) -> bytes:
        return self.hasher.digest()

    def release(self) -> Iterator[Buffer]:
        """The buffered bytes, then an empty buffer for the next segment."""
        yield from self.held
        if self.spool is not None:
            self.spool.seek(0)
            while data := self.spool.read(READ_CHUNK):
                yield data
            self.spool.close()
        self.held, self.held_bytes, self.spool = [], 0, None
        self.hasher = hashlib.sha256()
        self.index += 1
        self.start += self.length
        self.length = 0
