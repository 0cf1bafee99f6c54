"""Split an uncompressed tar stream into raw bytes and regular-file payloads, and join it back.

tar-split style: headers are never re-serialised. Every byte read from the input is
emitted exactly once, in order, either inside a `Raw` segment or as part of a `Payload`,
so concatenating the segments always reproduces the input byte for byte.

What becomes a `Payload`: the `size` data bytes (without the padding to 512) of a
regular or contiguous file member ('0', NUL, '7') with size > 0 that is not sparse.
Everything else is `Raw`: headers, PAX 'x'/'g' and GNU 'L'/'K' records, padding,
end-of-archive and extra zero blocks, whole sparse members (old GNU 'S' and PAX
GNU.sparse 0.0/0.1/1.0, header and data), data of unknown member types, and
anything after the archive. Empty regular files yield no Payload: their header is Raw.

Malformed input never raises: a 512-byte block that is not a valid header (bad
checksum, bad numbers) is kept raw and the next block is tried as a header, so
split+join is byte-exact for ANY input bytes. A wrong guess only costs
deduplication, never correctness. A truncated archive keeps its tail raw, except a
payload larger than `CHUNK_SIZE` that is already being streamed: it then yields fewer
than `size` bytes (see `Payload.bytes_read`) and the split ends after it.

Memory is bounded by a few `CHUNK_SIZE` buffers whatever the layer or file size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

BLOCK_SIZE = 512
CHUNK_SIZE = 1 << 20
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_MAX_PAX_RECORDS = CHUNK_SIZE  # larger PAX headers are kept raw without being parsed
_ASCII_BYTES = bytes(range(128))

_REGULAR_TYPES = frozenset({b"0", b"\0", b"7"})
_DATALESS_TYPES = frozenset({b"1", b"2", b"3", b"4", b"5", b"6"})
_PAX_LOCAL_TYPES = frozenset({b"x", b"X"})
_GNU_LONG_TYPES = frozenset({b"L", b"K"})
_PAX_GLOBAL_TYPE = b"g"
_OLD_GNU_SPARSE_TYPE = b"S"


class TarSplitError(Exception):
    """Misuse of the split/join API or a content store returning wrong data."""


class BinaryReader(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Raw:
    """Bytes kept verbatim in the recipe (at most CHUNK_SIZE from `split_tar`)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class FileRef:
    """A payload stored in the content store: its sha256 (32 bytes) and length."""

    digest: bytes
    size: int


class _Source:
    """Buffered reader over a non-seekable stream; big reads amortise per-call overhead."""

    __slots__ = ("_buf", "_pos", "_read")

    def __init__(self, stream: BinaryReader) -> None:
        self._read = stream.read
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        """The next n bytes, or fewer only at end of input."""
        pos = self._pos
        end = pos + n
        if end <= len(self._buf):
            self._pos = end
            return self._buf[pos:end]
        parts = [self._buf[pos:]]
        have = len(parts[0])
        self._buf, self._pos = b"", 0
        while have < n:
            data = self._read(max(CHUNK_SIZE, n - have))
            if not data:
                break
            need = n - have
            if len(data) > need:
                self._buf, self._pos = data, need
                data = data[:need]
            parts.append(data)
            have += len(data)
        return b"".join(parts)

    def take_some(self, n: int) -> bytes:
        """Between 1 and n bytes without copying big reads; b"" only at end of input."""
        if self._pos < len(self._buf):
            pos = self._pos
            self._pos = min(pos + n, len(self._buf))
            return self._buf[pos : self._pos]
        return self._read(n)


class Payload:
    """The data of one regular file member, readable once via `chunks()`.

    Must be read before the `split_tar` iterator is advanced; unread bytes are skipped.
    `bytes_read` counts what `chunks()` yielded: it is below `size` only if the input
    ended inside this payload, so record `bytes_read` (not `size`) in the recipe.
    """

    __slots__ = ("_data", "_done", "_remaining", "_source", "bytes_read", "size")

    def __init__(self, size: int, source: _Source | None, data: bytes | None) -> None:
        self.size = size
        self.bytes_read = 0
        self._source = source
        self._data = data
        self._remaining = size
        self._done = False

    def chunks(self) -> Iterator[bytes]:
        """The payload bytes in chunks of at most CHUNK_SIZE."""
        if self._done:
            raise TarSplitError("payload already read or no longer readable")
        self._done = True
        if self._data is not None:
            data, self._data = self._data, None
            self._remaining = 0
            self.bytes_read = len(data)
            yield data
            return
        yield from self._stream()

    def read_all(self) -> bytes:
        """The whole payload in memory (convenience for small payloads and tests)."""
        return b"".join(self.chunks())

    def _stream(self) -> Iterator[bytes]:
        assert self._source is not None
        while self._remaining > 0:
            data = self._source.take_some(min(self._remaining, CHUNK_SIZE))
            if not data:
                self._remaining = 0
                return
            self._remaining -= len(data)
            self.bytes_read += len(data)
            yield data

    def _close(self) -> None:
        """Skip whatever the consumer did not read, so the split stays in sync."""
        self._done = True
        self._data = None
        while self._remaining > 0 and self._source is not None:
            data = self._source.take_some(min(self._remaining, CHUNK_SIZE))
            if not data:
                return
            self._remaining -= len(data)


class _RawBuffer:
    """Coalesces adjacent raw bytes into `Raw` segments of at most CHUNK_SIZE."""

    __slots__ = ("_length", "_parts")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._length = 0

    def add(self, data: bytes) -> Raw | None:
        """Buffer data; return a full segment to emit first if data would overflow it."""
        full = None
        if self._length + len(data) > CHUNK_SIZE:
            full = self.flush()
        self._parts.append(data)
        self._length += len(data)
        return full

    def flush(self) -> Raw | None:
        if not self._length:
            self._parts.clear()
            return None
        raw = Raw(b"".join(self._parts))
        self._parts.clear()
        self._length = 0
        return raw


@dataclass(slots=True)
class _Header:
    typeflag: bytes
    size: int
    old_gnu_extended: bool


@dataclass(slots=True)
class _PendingPax:
    """PAX overrides waiting for the member they apply to."""

    size: int | None = None
    sparse: bool = False


def _parse_number(field: bytes) -> int | None:
    """A tar numeric field: octal text or GNU base-256; None if neither."""
    if field and field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field and field[0] == 0xFF:
        return None  # negative base-256: never a valid size
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        value = int(text, 8)
    except ValueError:
        return None
    return value if value >= 0 else None


def _checksum_matches(block: bytes) -> bool:
    stored = _parse_number(block[148:156])
    if stored is None:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
    if stored == unsigned:
        return True
    # Some historic tars summed signed chars.
    high_in_block = len(block.translate(None, _ASCII_BYTES))
    high_in_field = len(block[148:156].translate(None, _ASCII_BYTES))
    return stored == unsigned - 256 * (high_in_block - high_in_field)


def _parse_header(block: bytes) -> _Header | None:
    """The fields needed to find the next header, or None if block is not a header."""
    if block == _ZERO_BLOCK or not _checksum_matches(block):
        return None
    size = _parse_number(block[124:136])
    if size is None:
        return None
    typeflag = block[156:157]
    return _Header(typeflag, size, typeflag == _OLD_GNU_SPARSE_TYPE and block[482] != 0)


def _parse_pax_records(data: bytes, pending: _PendingPax) -> None:
    """Apply the 'size' and GNU.sparse.* records of a PAX header; stop at malformed ones."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 24)
        if space < 0:
            return
        try:
            length = int(data[pos:space])
        except ValueError:
            return
        end = pos + length
        if length <= space - pos or end > len(data):
            return
        key, _, value = data[space + 1 : end].removesuffix(b"\n").partition(b"=")
        if key == b"size":
            pending.size = _parse_pax_size(value)
        elif key.startswith(b"GNU.sparse."):
            pending.sparse = True
        pos = end


def _parse_pax_size(value: bytes) -> int | None:
    try:
        size = int(value)
    except ValueError:
        return None
    return size if size >= 0 else None


def _padding(size: int) -> int:
    return -size % BLOCK_SIZE


def split_tar(stream: BinaryReader) -> Iterator[Raw | Payload]:
    """Split a tar stream into `Raw` segments and regular-file `Payload`s, in order.

    Never raises on malformed input (see the module docstring). Each yielded Payload
    must be consumed (or abandoned) before advancing the iterator.
    """
    source = _Source(stream)
    raw = _RawBuffer()
    pending = _PendingPax()
    while True:
        block = source.take(BLOCK_SIZE)
        if full := raw.add(block):
            yield full
        if len(block) < BLOCK_SIZE:
            break
        header = _parse_header(block)
        if header is None:
            continue  # zero block, junk or lost sync: kept raw, try the next block
        if header.old_gnu_extended:
            yield from _copy_old_gnu_sparse_extensions(source, raw)
        typeflag = header.typeflag
        if typeflag in _PAX_LOCAL_TYPES:
            yield from _read_pax_header(source, raw, header.size, pending)
            continue
        if typeflag in _GNU_LONG_TYPES or typeflag == _PAX_GLOBAL_TYPE:
            yield from _copy_raw(source, raw, header.size + _padding(header.size))
            continue
        size = header.size if pending.size is None else pending.size
        is_sparse = pending.sparse or typeflag == _OLD_GNU_SPARSE_TYPE
        pending.size, pending.sparse = None, False
        if typeflag in _DATALESS_TYPES:
            continue
        if typeflag not in _REGULAR_TYPES or is_sparse or size == 0:
            yield from _copy_raw(source, raw, size + _padding(size))
            continue
        if full := raw.flush():
            yield full
        if size > CHUNK_SIZE:
            payload = Payload(size, source, None)
        else:
            data = source.take(size)
            if len(data) < size:  # truncated archive: keep the partial data raw
                raw.add(data)
                break
            payload = Payload(size, None, data)
        yield payload
        payload._close()
        if padding := _padding(size):
            raw.add(source.take(padding))  # raw was just flushed: this cannot overflow it
    if last := raw.flush():
        yield last


def _copy_raw(source: _Source, raw: _RawBuffer, length: int) -> Iterator[Raw]:
    while length > 0:
        data = source.take_some(min(length, CHUNK_SIZE))
        if not data:
            return
        length -= len(data)
        if full := raw.add(data):
            yield full


def _copy_old_gnu_sparse_extensions(source: _Source, raw: _RawBuffer) -> Iterator[Raw]:
    while True:
        block = source.take(BLOCK_SIZE)
        if full := raw.add(block):
            yield full
        if len(block) < BLOCK_SIZE or block[504] == 0:
            return


def _read_pax_header(
    source: _Source, raw: _RawBuffer, size: int, pending: _PendingPax
) -> Iterator[Raw]:
    if size > _MAX_PAX_RECORDS:
        yield from _copy_raw(source, raw, size + _padding(size))
        return
    records = source.take(size + _padding(size))
    if full := raw.add(records):
        yield full
    _parse_pax_records(records[:size], pending)


def join_tar(
    entries: Iterable[Raw | FileRef], open_file: Callable[[FileRef], Iterable[bytes]]
) -> Iterator[bytes]:
    """The original tar bytes: raw entries verbatim, file refs streamed from `open_file`.

    Raises TarSplitError if a stored file does not have the length its ref records.
    """
    for entry in entries:
        if isinstance(entry, Raw):
            yield entry.data
            continue
        length = 0
        for chunk in open_file(entry):
            length += len(chunk)
            yield chunk
        if length != entry.size:
            raise TarSplitError(
                f"file {entry.digest.hex()} has {length} bytes, recipe says {entry.size}"
            )


class HashingReader:
    """Wraps a stream and computes the sha256 and length of everything read through it."""

    def __init__(self, stream: BinaryReader) -> None:
        self._stream = stream
        self._sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._stream.read(size)
        self._sha256.update(data)
        self.size += len(data)
        return data

    def sha256(self) -> bytes:
        return self._sha256.digest()
