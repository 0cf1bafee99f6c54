"""The durable binary recipe of one layer: how to rebuild its tar from raw bytes and files.

On-disk layout (version 3), integers are unsigned LEB128 varints:

    magic           4 bytes   b"DHRc"
    version         1 byte    3 (versions 1 and 2 are read too: version 1 has no segment
                              digests, neither has a frame table: their body is one frame)
    blob_digest     varint length + UTF-8   e.g. "sha256:<hex>" of the pushed blob
    blob_size       varint
    tar_size        varint    uncompressed tar length (= sum of entry lengths)
    tar_sha256      32 bytes
    encoder_id      varint length + UTF-8   codec identity, e.g. "gzip/go1.26/level6"
    encoder_params  varint length + bytes   opaque, owned by the codec module
    segment_count   varint    (version 2 on) segments of the pushed blob, then each:
                      varint length, 32-byte sha256   (see pipelines.formats.verify)
    entry_count     varint
    frame_entries   varint    (version 3) entries per zstd frame of the body (the last
                              frame holds the rest), then
    frame_count     varint    max(1, ceil(entry_count / frame_entries)), then each frame's
                      compressed length, varint
    body_length     varint    (the frames' lengths add up to it)
    body            zstd frames, one after the other, holding entry_count entries:
                      0x00 varint length, raw bytes      (Raw)
                      0x01 32-byte sha256, varint size   (FileRef)
    checksum        32 bytes  sha256 of every preceding byte

Decoding verifies everything (checksum, structure, counts, tar_size, each frame holding
exactly its entries) before returning, so a recipe that decodes is the one that was
encoded. The frames let a walk from a tar offset (a segment's rebuild) decompress from
the frame holding it instead of from the body's start.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import zstandard

from pipelines.formats import Buffer
from pipelines.formats.tarsplit import FileRef, Raw
from pipelines.formats.verify import SegmentDigests

__all__ = ["FileRef", "Raw", "Recipe", "RecipeBuilder", "RecipeError", "build_recipe"]

MAGIC = b"DHRc"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
DIGEST_SIZE = 32
_TAG_RAW = 0
_TAG_FILE = 1
_CHECKSUM_SIZE = 32
_ZSTD_LEVEL = 6  # ~300 MB/s of raw bytes; level 9 saves ~5% at half the speed
_BATCH_SIZE = 1 << 20
_MAX_VARINT_BYTES = 10
RESUME_EVERY = 4096  # entries between the points a walk from a tar offset starts at, and
# in a version-3 recipe the entries per frame of its body
COUNTED_FILES = 1 << 15  # distinct files whose repeats the decoding walk counts: about
# 4 MiB of counts at most, whatever the layer (files first seen beyond are not counted)


class RecipeError(Exception):
    """The bytes are not a valid recipe (wrong magic or version, truncated, corrupted)."""


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128, the integer encoding of DupHunter's binary formats."""
    if value < 0:
        raise ValueError(f"negative value {value} cannot be encoded")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_prefixed(data: bytes) -> bytes:
    return encode_varint(len(data)) + data


@dataclass(frozen=True)
class Recipe:
    """A decoded or freshly built recipe; make one with RecipeBuilder or Recipe.decode."""

    blob_digest: str
    blob_size: int
    tar_size: int
    tar_sha256: bytes
    encoder_id: str
    encoder_params: bytes
    entry_count: int
    body: bytes = field(repr=False)  # the zstd-compressed entries
    segments: SegmentDigests | None = None  # None in version-1 recipes
    frame_entries: int = 0  # entries per frame of the body; 0: the body is one frame
    frames: tuple[int, ...] = ()  # each frame's compressed length (version 3)
    # found by the first walk from an offset: (entries before, their body bytes, tar bytes)
    _resumes: list[tuple[int, int, int]] = field(
        init=False, default_factory=list, compare=False, repr=False
    )
    # found by the same walk: the files the tar holds more than once -> how many times
    _repeats: dict[bytes, int] = field(init=False, default_factory=dict, compare=False, repr=False)

    def entries(self) -> Iterator[Raw | FileRef]:
        """The entries in tar order, decompressed as they are iterated."""
        if self.frames:
            return self._entries_of_frames(0)
        return _iter_body(self.body, self.entry_count)

    @property
    def resume_every(self) -> int:
        return self.frame_entries or RESUME_EVERY

    def _entries_of_frames(self, first: int) -> Iterator[Raw | FileRef]:
        """The entries from frame `first` on, each frame decompressed on its own (and
        checked to hold exactly its entries)."""
        view = memoryview(self.body)
        start = sum(self.frames[:first])
        for number in range(first, len(self.frames)):
            count = min(self.frame_entries, self.entry_count - number * self.frame_entries)
            end = start + self.frames[number]
            yield from _iter_body(view[start:end], count)
            start = end

    def entries_from(self, tar_offset: int) -> Iterator[tuple[int, Raw | FileRef]]:
        """The entries from the one holding byte `tar_offset` of the tar on, each with the
        tar offset it starts at. The parse starts at the last resume point before it
        (every RESUME_EVERY entries, found by one walk of the recipe, then kept): the
        segments of a layer would each walk the recipe from its start, a time
        quadratic in its files for a layer of many."""
        self._walk_once()
        at = bisect.bisect_right(self._resumes, tar_offset, key=lambda point: point[2]) - 1
        done, body_bytes, offset = self._resumes[at]
        if self.frames:  # a resume point starts a frame
            entries = self._entries_of_frames(done // self.frame_entries)
        else:  # the body decompressed from its start, the bytes before the point skipped
            entries = _iter_body(self.body, self.entry_count - done, body_bytes)
        for entry in entries:
            size = len(entry.data) if isinstance(entry, Raw) else entry.size
            if offset + size > tar_offset:
                yield offset, entry
            offset += size

    def repeated_files(self) -> dict[bytes, int]:
        """Files whose content the tar holds more than once (under several names) -> how
        many times, among its first COUNTED_FILES distinct files: a rebuild fetches each
        once, and keeps it for the others."""
        self._walk_once()
        return self._repeats

    def _walk_once(self) -> None:
        """The resume points and the repeated files, unless decoding found them."""
        if not self._resumes:
            self._walk()

    def _walk(self) -> int:
        """Walk every entry, keeping the resume points and the repeated files found on the
        way; the tar's size."""
        points, total, repeats = _resume_points(self.entries(), self.resume_every)
        self._resumes[:] = points
        self._repeats.update(repeats)
        return total

    def file_refs(self) -> dict[bytes, int]:
        """Unique file digests -> size, for reference counting."""
        return {e.digest: e.size for e in self.entries() if isinstance(e, FileRef)}

    def encode(self) -> bytes:
        head = b"".join(
            [
                MAGIC,
                bytes([VERSION if self.frames else 2]),
                _length_prefixed(self.blob_digest.encode()),
                encode_varint(self.blob_size),
                encode_varint(self.tar_size),
                self.tar_sha256,
                _length_prefixed(self.encoder_id.encode()),
                _length_prefixed(self.encoder_params),
                _encode_segments(self.segments),
                encode_varint(self.entry_count),
                _encode_frames(self.frame_entries, self.frames),
                encode_varint(len(self.body)),
            ]
        )
        unsigned = head + self.body
        return unsigned + hashlib.sha256(unsigned).digest()

    @classmethod
    def decode(cls, data: bytes) -> Recipe:
        """Parse and fully verify an encoded recipe; raise RecipeError if anything is off."""
        if len(data) < len(MAGIC) + 1 + _CHECKSUM_SIZE or data[: len(MAGIC)] != MAGIC:
            raise RecipeError("not a recipe (bad magic or too short)")
        version = data[len(MAGIC)]
        if version not in READABLE_VERSIONS:
            raise RecipeError(f"unsupported recipe version {version}")
        unsigned, checksum = data[:-_CHECKSUM_SIZE], data[-_CHECKSUM_SIZE:]
        if hashlib.sha256(unsigned).digest() != checksum:
            raise RecipeError("recipe checksum mismatch (corrupted or truncated)")
        recipe = _parse_head(_Cursor(unsigned, len(MAGIC) + 1), version)
        _verify_body(recipe)
        return recipe


class RecipeBuilder:
    """Builds a recipe entry by entry while the tar is read once; memory stays small
    because entries are compressed as they arrive."""

    def __init__(self, level: int = _ZSTD_LEVEL, frame_entries: int = RESUME_EVERY) -> None:
        self._zstd = zstandard.ZstdCompressor(level=level)
        self._compressor = self._zstd.compressobj()
        self._frame_entries = frame_entries
        self._frames: list[int] = []  # compressed lengths of the frames ended
        self._frame_bytes = 0  # compressed bytes of the frame being written
        self._compressed: list[bytes] = []
        self._batch = bytearray()
        self._entry_count = 0
        self._tar_size = 0
        self._finished = False

    def add_raw(self, data: bytes) -> None:
        """Append raw tar bytes (empty data adds nothing)."""
        if data:
            self._append(bytes([_TAG_RAW]) + encode_varint(len(data)), data)
            self._tar_size += len(data)

    def add_file(self, digest: bytes, size: int) -> None:
        """Append a reference to a stored file: its sha256 and the bytes it holds."""
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"file digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
        self._append(bytes([_TAG_FILE]) + digest + encode_varint(size))
        self._tar_size += size

    def add(self, entry: Raw | FileRef) -> None:
        if isinstance(entry, Raw):
            self.add_raw(entry.data)
        else:
            self.add_file(entry.digest, entry.size)

    def finish(
        self,
        *,
        blob_digest: str,
        blob_size: int,
        tar_sha256: bytes,
        encoder_id: str,
        encoder_params: bytes,
        segments: SegmentDigests | None = None,
    ) -> Recipe:
        """The finished recipe; the builder cannot be used afterwards."""
        if self._finished:
            raise RecipeError("recipe already finished")
        if len(tar_sha256) != DIGEST_SIZE:
            raise ValueError(f"tar_sha256 must be {DIGEST_SIZE} bytes")
        if blob_size < 0:
            raise ValueError("blob_size must not be negative")
        self._finished = True
        if self._entry_count == 0 or self._entry_count % self._frame_entries:
            self._end_frame()
        return Recipe(
            blob_digest=blob_digest,
            blob_size=blob_size,
            tar_size=self._tar_size,
            tar_sha256=tar_sha256,
            encoder_id=encoder_id,
            encoder_params=encoder_params,
            entry_count=self._entry_count,
            body=b"".join(self._compressed),
            segments=segments,
            frame_entries=self._frame_entries,
            frames=tuple(self._frames),
        )

    def _append(self, *parts: bytes) -> None:
        if self._finished:
            raise RecipeError("recipe already finished")
        for part in parts:
            self._batch += part
        self._entry_count += 1
        if self._entry_count % self._frame_entries == 0:
            self._end_frame()
        elif len(self._batch) >= _BATCH_SIZE:
            self._compress_batch()

    def _compress_batch(self) -> None:
        if self._batch:
            self._keep(self._compressor.compress(bytes(self._batch)))
            self._batch.clear()

    def _end_frame(self) -> None:
        self._compress_batch()
        self._keep(self._compressor.flush())
        self._frames.append(self._frame_bytes)
        self._frame_bytes = 0
        self._compressor = self._zstd.compressobj()

    def _keep(self, compressed: bytes) -> None:
        self._compressed.append(compressed)
        self._frame_bytes += len(compressed)


def build_recipe(
    entries: Iterable[Raw | FileRef],
    *,
    blob_digest: str,
    blob_size: int,
    tar_sha256: bytes,
    encoder_id: str,
    encoder_params: bytes,
    segments: SegmentDigests | None = None,
    frame_entries: int = RESUME_EVERY,
) -> Recipe:
    """A recipe from a whole entry sequence (convenience over RecipeBuilder)."""
    builder = RecipeBuilder(frame_entries=frame_entries)
    for entry in entries:
        builder.add(entry)
    return builder.finish(
        blob_digest=blob_digest,
        blob_size=blob_size,
        tar_sha256=tar_sha256,
        encoder_id=encoder_id,
        encoder_params=encoder_params,
        segments=segments,
    )


class _Cursor:
    """Reads varints and byte strings from an in-memory buffer, raising RecipeError."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self._data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self._data):
            raise RecipeError("recipe truncated")
        out = self._data[self.pos : end]
        self.pos = end
        return out

    def varint(self) -> int:
        return decode_varint(self.take)

    def text(self) -> str:
        try:
            return self.take(self.varint()).decode()
        except UnicodeDecodeError as exc:
            raise RecipeError("recipe text field is not UTF-8") from exc

    def at_end(self) -> bool:
        return self.pos == len(self._data)


def decode_varint(take: Callable[[int], bytes], error: type[Exception] = RecipeError) -> int:
    """An unsigned LEB128 integer read with `take`; `error` if it runs over 10 bytes."""
    value = 0
    for index in range(_MAX_VARINT_BYTES):
        byte = take(1)[0]
        value |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            return value
    raise error("varint too long")


def _encode_segments(segments: SegmentDigests | None) -> bytes:
    if segments is None:
        return encode_varint(0)
    parts = [encode_varint(len(segments.ends))]
    start = 0
    for end, digest in zip(segments.ends, segments.digests, strict=True):
        parts += [encode_varint(end - start), digest]
        start = end
    return b"".join(parts)


def _parse_segments(cursor: _Cursor, blob_size: int) -> SegmentDigests | None:
    count = cursor.varint()
    if count == 0:
        return None
    ends, digests, end = [], [], 0
    for _ in range(count):
        end += cursor.varint()
        ends.append(end)
        digests.append(cursor.take(DIGEST_SIZE))
    try:
        segments = SegmentDigests(tuple(ends), tuple(digests))
    except ValueError as exc:
        raise RecipeError(f"invalid segment digests: {exc}") from exc
    if segments.size != blob_size:
        raise RecipeError(f"segments cover {segments.size} bytes, the blob has {blob_size}")
    return segments


def _encode_frames(frame_entries: int, frames: tuple[int, ...]) -> bytes:
    if not frames:
        return b""
    counts = [encode_varint(frame_entries), encode_varint(len(frames))]
    return b"".join(counts + [encode_varint(length) for length in frames])


def _parse_frames(cursor: _Cursor, entry_count: int) -> tuple[int, tuple[int, ...]]:
    frame_entries = cursor.varint()
    if frame_entries < 1:
        raise RecipeError("a frame must hold at least one entry")
    count = cursor.varint()
    if count != max(1, -(-entry_count // frame_entries)):
        raise RecipeError(f"{count} frames of {frame_entries} entries cannot hold {entry_count}")
    return frame_entries, tuple(cursor.varint() for _ in range(count))


def _parse_head(cursor: _Cursor, version: int) -> Recipe:
    blob_digest = cursor.text()
    blob_size = cursor.varint()
    tar_size = cursor.varint()
    tar_sha256 = cursor.take(DIGEST_SIZE)
    encoder_id = cursor.text()
    encoder_params = cursor.take(cursor.varint())
    segments = _parse_segments(cursor, blob_size) if version >= 2 else None
    entry_count = cursor.varint()
    frame_entries, frames = _parse_frames(cursor, entry_count) if version >= 3 else (0, ())
    body = cursor.take(cursor.varint())
    if not cursor.at_end():
        raise RecipeError("unexpected bytes after the recipe body")
    if frames and sum(frames) != len(body):
        raise RecipeError(f"frames of {sum(frames)} bytes in all, the body has {len(body)}")
    return Recipe(
        blob_digest,
        blob_size,
        tar_size,
        tar_sha256,
        encoder_id,
        encoder_params,
        entry_count,
        body,
        segments,
        frame_entries,
        frames,
    )


def _verify_body(recipe: Recipe) -> None:
    """Walk every entry (its resume points and repeated files found on the way, for
    `entries_from` and `repeated_files`)."""
    total = recipe._walk()
    if total != recipe.tar_size:
        raise RecipeError(f"entries add up to {total} bytes, recipe says {recipe.tar_size}")


_ENTRY_HEAD_MAX = 1 + DIGEST_SIZE + _MAX_VARINT_BYTES  # a tag, a digest, a varint


def _resume_points(
    entries: Iterator[Raw | FileRef], every: int
) -> tuple[list[tuple[int, int, int]], int, dict[bytes, int]]:
    """(entries before, their bytes in the decompressed body, their tar bytes) at the
    start and after every `every` entries; the tar's size; and the files it holds more
    than once, with how many times (of the first COUNTED_FILES distinct ones). An entry's
    body bytes follow from its fields, since the parser accepts only minimal varints."""
    points, body_bytes, offset = [(0, 0, 0)], 0, 0
    seen: dict[bytes, int] = {}
    for number, entry in enumerate(entries, start=1):
        if isinstance(entry, Raw):
            size = len(entry.data)
            body_bytes += 1 + _varint_length(size) + size
        else:
            size = entry.size
            body_bytes += 1 + DIGEST_SIZE + _varint_length(size)
            count = seen.get(entry.digest)
            if count is not None:
                seen[entry.digest] = count + 1
            elif len(seen) < COUNTED_FILES:
                seen[entry.digest] = 1
        offset += size
        if number % every == 0:
            points.append((number, body_bytes, offset))
    return points, offset, {digest: count for digest, count in seen.items() if count > 1}


def _varint_length(value: int) -> int:
    """The bytes `encode_varint(value)` takes (its shortest form), without encoding it."""
    return max(1, (value.bit_length() + 6) // 7)


def _iter_body(body: Buffer, entry_count: int, skip: int = 0) -> Iterator[Raw | FileRef]:
    """The entries (`entry_count` of them, after `skip` bytes of the decompressed body),
    parsed by index from big decompressed chunks: a restore walks the whole recipe, and
    a call per field costs more than the rest of it."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=False)
        read = reader.read
        while skip > 0:
            skipped = len(read(min(skip, _BATCH_SIZE)))
            if not skipped:
                raise RecipeError("recipe body truncated")
            skip -= skipped
        buf, pos, ended = b"", 0, False
        for _ in range(entry_count):
            if len(buf) - pos < _ENTRY_HEAD_MAX and not ended:
                buf, pos, ended = _refilled(read, buf, pos, _ENTRY_HEAD_MAX)
            if pos >= len(buf):
                raise RecipeError("recipe body truncated")
            tag = buf[pos]
            if tag == _TAG_FILE:
                digest = buf[pos + 1 : pos + 1 + DIGEST_SIZE]
                if len(digest) != DIGEST_SIZE:
                    raise RecipeError("recipe body truncated")
                size, pos = _varint_at(buf, pos + 1 + DIGEST_SIZE)
                yield FileRef(digest, size)
            elif tag == _TAG_RAW:
                length, pos = _varint_at(buf, pos + 1)
                if length == 0:
                    raise RecipeError("empty raw entry")
                if len(buf) - pos < length and not ended:
                    buf, pos, ended = _refilled(read, buf, pos, length)
                if len(buf) - pos < length:
                    raise RecipeError("recipe body truncated")
                yield Raw(buf[pos : pos + length])
                pos += length
            else:
                raise RecipeError(f"unknown recipe entry tag {tag}")
        if pos != len(buf) or (not ended and read(1)):
            raise RecipeError("unexpected bytes after the last recipe entry")
    except zstandard.ZstdError as exc:
        raise RecipeError(f"recipe body is not valid zstd: {exc}") from exc


def _refilled(
    read: Callable[[int], bytes], buf: bytes, pos: int, need: int
) -> tuple[bytes, int, bool]:
    """The unread rest of `buf` with at least `need` bytes more read after it (fewer only
    at the end of the body), from position 0; and whether the body ended."""
    parts = [buf[pos:]]
    have = len(parts[0])
    while have < need:
        chunk = read(max(_BATCH_SIZE, need - have))
        if not chunk:
            return b"".join(parts), 0, True
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts), 0, False


def _varint_at(buf: bytes, pos: int) -> tuple[int, int]:
    """The unsigned LEB128 integer at `pos` of `buf`, and the position after it."""
    value = shift = 0
    for _ in range(_MAX_VARINT_BYTES):
        if pos >= len(buf):
            raise RecipeError("recipe body truncated")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and shift:  # one encoding per value: entries' sizes are exact
                raise RecipeError("varint not in its shortest form")
            return value, pos
        shift += 7
    raise RecipeError("varint too long")
