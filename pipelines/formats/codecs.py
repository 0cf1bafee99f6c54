"""Layer blob classification and streaming decompression.

`sniff` tells what a blob is from its first bytes (gzip with parsed header and a
producer hint, zstd with the parsed frame header, plain tar, other), and
`open_decompressed` streams the tar out of it with bounded memory. Exact
recompression lives in `pipelines.encoders`.

Every legal zstd stream decodes: several frames, skippable frames (before, between and
after them), windows up to a cap (`DUPHUNTER_ZSTD_MAX_WINDOW`, 128 MiB by default: a
decoder holds one window). A frame with a larger window is legal but refused
(`UnsupportedBlobError`): it would cost that much memory to decode.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from pipelines.config import DEFAULT_ZSTD_MAX_WINDOW

SNIFF_BYTES = 64 * 1024
READ_CHUNK = 256 * 1024

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_SKIPPABLE_MAGICS = range(0x184D2A50, 0x184D2A60)  # RFC 8878 3.1.2, low 4 bits free
ZSTD_MAX_BLOCK = 128 * 1024
DEFAULT_ZSTD_MAX_FRAMES = 4096  # a layer of more frames is kept intact
TAR_BLOCK = 512

FTEXT, FHCRC, FEXTRA, FNAME, FCOMMENT = 0x01, 0x02, 0x04, 0x08, 0x10
GZIP_RESERVED_FLAGS = 0xE0
GZIP_OS_UNIX, GZIP_OS_UNKNOWN = 3, 255
# pgzip writes uint32(time.Time{}.Unix()) when ModTime is unset: bytes 00 09 6e 88.
PGZIP_ZERO_TIME_MTIME = 0x886E0900


@dataclass(frozen=True)
class ZstdFrameHeader:
    """The parsed header of the first zstd frame (RFC 8878 section 3.1.1)."""

    header_len: int
    single_segment: bool
    checksum: bool
    dict_id: int
    window_size: int | None
    content_size: int | None


@dataclass(frozen=True)
class Sniff:
    """What a blob is. Gzip fields are set only for kind "gzip", `zstd` only for "zstd"."""

    kind: str  # "gzip" | "zstd" | "tar" | "other"
    flags: int | None = None
    mtime: int | None = None
    xfl: int | None = None
    os: int | None = None
    header_len: int | None = None  # incl. FEXTRA/FNAME/FCOMMENT/FHCRC
    producer_hint: str | None = None  # "go-stdlib", "pgzip", "gnu-gzip", "zlib/python", ...
    zstd: ZstdFrameHeader | None = None
    detail: str = ""


def sniff(prefix: bytes) -> Sniff:
    """Classify a blob from its first (up to 64 KiB) bytes."""
    prefix = prefix[:SNIFF_BYTES]
    if prefix.startswith(GZIP_MAGIC):
        return _sniff_gzip(prefix)
    if prefix.startswith(ZSTD_MAGIC):
        return _sniff_zstd(prefix)
    if len(prefix) >= 8 and int.from_bytes(prefix[:4], "little") in ZSTD_SKIPPABLE_MAGICS:
        return _sniff_zstd_after_skippable(prefix)
    if looks_like_tar(prefix):
        return Sniff(kind="tar")
    return Sniff(kind="other")


def _sniff_gzip(prefix: bytes) -> Sniff:
    if len(prefix) < 10:
        return Sniff(kind="other", detail="truncated gzip header")
    method, flags, mtime, xfl, os_code = struct.unpack_from("<BBIBB", prefix, 2)
    if method != 8 or flags & GZIP_RESERVED_FLAGS:
        return Sniff(kind="other", detail=f"gzip magic but method {method}, flags {flags:#x}")
    header_len = gzip_header_length(prefix)
    if header_len is None:
        return Sniff(kind="other", detail="gzip header does not fit the prefix or is malformed")
    return Sniff(
        kind="gzip",
        flags=flags,
        mtime=mtime,
        xfl=xfl,
        os=os_code,
        header_len=header_len,
        producer_hint=_gzip_producer_hint(flags, mtime, os_code),
    )


def gzip_header_length(data: bytes) -> int | None:
    """Length of the gzip member header at the start of `data`, or None if incomplete."""
    if len(data) < 10:
        return None
    flags = data[3]
    pos = 10
    if flags & FEXTRA:
        if len(data) < pos + 2:
            return None
        (xlen,) = struct.unpack_from("<H", data, pos)
        pos += 2 + xlen
    for flag in (FNAME, FCOMMENT):
        if flags & flag:
            end = data.find(b"\x00", pos)
            if end < 0:
                return None
            pos = end + 1
    if flags & FHCRC:
        pos += 2
    return pos if pos <= len(data) else None


def _gzip_producer_hint(flags: int, mtime: int, os_code: int) -> str:
    if os_code == GZIP_OS_UNKNOWN:
        if mtime == PGZIP_ZERO_TIME_MTIME:
            return "pgzip"
        if mtime == 0 and flags == 0:
            return "go-stdlib"  # also Java >= 16 GZIPOutputStream (zlib level 6)
        return "zlib/python"  # Python's GzipFile writes OS 255 and the current time
    if os_code == GZIP_OS_UNIX:
        if mtime == 0 and flags == 0:
            return "zlib"  # zlib's own gzip wrapper (wbits=31); also gzip -n / pigz -n
        return "gnu-gzip"  # GNU gzip or pigz: file name and/or a real mtime
    if os_code == 0:
        return "zlib/java"  # Java < 16 GZIPOutputStream
    return "unknown"


def _sniff_zstd(prefix: bytes) -> Sniff:
    header = parse_zstd_frame_header(prefix)
    if header is None:
        return Sniff(kind="other", detail="zstd magic but malformed frame header")
    return Sniff(kind="zstd", zstd=header)


def _sniff_zstd_after_skippable(prefix: bytes) -> Sniff:
    """A zstd stream that starts with skippable frames (pzstd's: each data frame's size)."""
    pos = 0
    while len(prefix) >= pos + 8:
        if int.from_bytes(prefix[pos : pos + 4], "little") not in ZSTD_SKIPPABLE_MAGICS:
            break
        pos += 8 + int.from_bytes(prefix[pos + 4 : pos + 8], "little")
    if pos >= len(prefix):
        return Sniff(kind="zstd", detail="skippable frames longer than the sniffed prefix")
    header = parse_zstd_frame_header(prefix[pos:])
    if header is None:
        return Sniff(kind="other", detail="zstd skippable frame followed by no zstd frame")
    return Sniff(kind="zstd", zstd=header, detail="starts with skippable frames")


def zstd_frame_header_length(descriptor: int) -> int:
    """The length of a frame header (magic included) from its descriptor byte."""
    single_segment = bool(descriptor & 0x20)
    dict_id_size = (0, 1, 2, 4)[descriptor & 0x03]
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    return 5 + (0 if single_segment else 1) + dict_id_size + fcs_size


def parse_zstd_frame_header(data: bytes) -> ZstdFrameHeader | None:
    """Parse the frame header following the zstd magic number."""
    if len(data) < 5 or not data.startswith(ZSTD_MAGIC):
        return None
    descriptor = data[4]
    fcs_flag = descriptor >> 6
    single_segment = bool(descriptor & 0x20)
    if descriptor & 0x08:  # reserved bit
        return None
    checksum = bool(descriptor & 0x04)
    dict_id_size = (0, 1, 2, 4)[descriptor & 0x03]
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    pos = 5
    window_size: int | None = None
    if not single_segment:
        if len(data) < pos + 1:
            return None
        window_size = _zstd_window_size(data[pos])
        pos += 1
    end = pos + dict_id_size + fcs_size
    if len(data) < end:
        return None
    dict_id = int.from_bytes(data[pos : pos + dict_id_size], "little")
    pos += dict_id_size
    content_size: int | None = None
    if fcs_size:
        content_size = int.from_bytes(data[pos : pos + fcs_size], "little")
        if fcs_size == 2:
            content_size += 256
    if single_segment:
        window_size = content_size
    return ZstdFrameHeader(
        header_len=end,
        single_segment=single_segment,
        checksum=checksum,
        dict_id=dict_id,
        window_size=window_size,
        content_size=content_size,
    )


def _zstd_window_size(descriptor: int) -> int:
    exponent, mantissa = descriptor >> 3, descriptor & 0x07
    base = 1 << (10 + exponent)
    return base + (base // 8) * mantissa


def looks_like_tar(prefix: bytes) -> bool:
    """True for a ustar/GNU header, a v7 header with a valid checksum, or an all-zero tar."""
    if len(prefix) < TAR_BLOCK:
        return False
    block = prefix[:TAR_BLOCK]
    if block[257:262] == b"ustar":
        return True
    if block == bytes(TAR_BLOCK):
        return len(prefix) >= 2 * TAR_BLOCK and not any(prefix)
    return _tar_checksum_ok(block)


def _tar_checksum_ok(block: bytes) -> bool:
    field = block[148:156].replace(b"\x00", b" ").strip()
    if not field or any(c not in b"01234567" for c in field):
        return False
    stored = int(field, 8)
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 0x20
    return stored in (unsigned, signed)


def open_decompressed(
    kind: str, stream: BinaryIO, max_window: int = DEFAULT_ZSTD_MAX_WINDOW
) -> BinaryIO:
    """A readable binary stream of the tar inside a gzip (multi-member), zstd
    (multi-frame, skippable frames skipped, windows up to `max_window`) or plain blob.
    Reads `stream` incrementally; memory stays bounded. A malformed stream raises
    CorruptBlobError when the bad part is read."""
    if kind == "gzip":
        raw: io.RawIOBase = ChunkReader(_inflate_gzip_members(stream))
        return io.BufferedReader(raw, READ_CHUNK)
    if kind == "zstd":
        reader = zstandard.ZstdDecompressor(max_window_size=max_window).stream_reader(
            stream, read_size=READ_CHUNK, read_across_frames=True, closefd=False
        )
        return io.BufferedReader(_ZstdReader(reader), READ_CHUNK)
    if kind == "tar":
        return stream
    raise ValueError(f"cannot decompress blob of kind {kind!r}")


class CorruptBlobError(ValueError):
    """The compressed stream is malformed (bad member header, truncation, trailing junk)."""


class UnsupportedBlobError(ValueError):
    """The stream is legal but beyond what this registry is configured to decode (a zstd
    window above the cap, too many frames): the layer is kept intact."""


# What a decoder raises on bytes it cannot decode: the layer stays intact, with the reason.
DECODE_ERRORS = (CorruptBlobError, EOFError, zlib.error, zstandard.ZstdError)


class _ZstdReader(io.RawIOBase):
    """python-zstandard's reader, with its errors as CorruptBlobError."""

    def __init__(self, reader: zstandard.ZstdDecompressionReader) -> None:
        self._reader = reader

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        try:
            return int(self._reader.readinto(buffer))
        except zstandard.ZstdError as error:
            raise CorruptBlobError(f"zstd stream cannot be decoded: {error}") from error

    def close(self) -> None:
        self._reader.close()  # type: ignore[no-untyped-call]
        super().close()


@dataclass(frozen=True)
class ZstdFrame:
    """One frame of a zstd stream: where it lies, and its header (None: skippable)."""

    offset: int
    length: int
    header: ZstdFrameHeader | None

    @property
    def skippable(self) -> bool:
        return self.header is None


def scan_zstd_frames(
    chunks: Iterable[bytes],
    max_window: int = DEFAULT_ZSTD_MAX_WINDOW,
    max_frames: int = DEFAULT_ZSTD_MAX_FRAMES,
) -> list[ZstdFrame]:
    """The frames of a zstd stream (see `iter_zstd_frames`); UnsupportedBlobError for
    more than `max_frames`."""
    frames: list[ZstdFrame] = []
    for frame in iter_zstd_frames(chunks, max_window):
        if len(frames) >= max_frames:
            raise UnsupportedBlobError(f"zstd stream of more than {max_frames} frames")
        frames.append(frame)
    return frames


def iter_zstd_frames(
    chunks: Iterable[bytes], max_window: int = DEFAULT_ZSTD_MAX_WINDOW
) -> Iterator[ZstdFrame]:
    """The frames of a zstd stream, found from their headers and block headers alone
    (nothing is decompressed). Raises CorruptBlobError for a malformed, truncated or
    empty stream, UnsupportedBlobError for a window above `max_window`."""
    cursor = _Cursor(iter(chunks))
    if cursor.at_end():
        raise CorruptBlobError("empty zstd blob")
    while not cursor.at_end():
        yield _scan_frame(cursor, max_window)


def _scan_frame(cursor: _Cursor, max_window: int) -> ZstdFrame:
    start = cursor.position
    magic = cursor.take(4)
    if len(magic) == 4 and int.from_bytes(magic, "little") in ZSTD_SKIPPABLE_MAGICS:
        size = cursor.take(4)
        if len(size) < 4 or not cursor.skip(int.from_bytes(size, "little")):
            raise CorruptBlobError(f"truncated skippable frame at offset {start}")
        return ZstdFrame(start, cursor.position - start, None)
    if magic != ZSTD_MAGIC:
        raise CorruptBlobError(f"no zstd frame at offset {start}")
    descriptor = cursor.take(1)
    rest = cursor.take(zstd_frame_header_length(descriptor[0]) - 5) if descriptor else b""
    header = parse_zstd_frame_header(magic + descriptor + rest)
    if header is None:
        raise CorruptBlobError(f"malformed zstd frame header at offset {start}")
    window = header.window_size or 0
    if window > max_window:
        raise UnsupportedBlobError(
            f"zstd frame at offset {start} declares a {window}-byte window, above the "
            f"{max_window}-byte cap (DUPHUNTER_ZSTD_MAX_WINDOW)"
        )
    _skip_blocks(cursor, start)
    if header.checksum and not cursor.skip(4):
        raise CorruptBlobError(f"zstd frame at offset {start} lacks its checksum")
    return ZstdFrame(start, cursor.position - start, header)


def _skip_blocks(cursor: _Cursor, frame_start: int) -> None:
    while True:
        block = cursor.take(3)
        if len(block) < 3:
            raise CorruptBlobError(f"truncated zstd frame at offset {frame_start}")
        word = int.from_bytes(block, "little")
        kind, size = (word >> 1) & 3, word >> 3
        if kind == 3 or size > ZSTD_MAX_BLOCK:
            raise CorruptBlobError(f"malformed zstd block at offset {cursor.position - 3}")
        if not cursor.skip(1 if kind == 1 else size):
            raise CorruptBlobError(f"truncated zstd block at offset {cursor.position}")
        if word & 1:
            return


class _Cursor:
    """Reads a chunk iterator at an advancing position; skipped bytes are not kept."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._at = 0
        self.position = 0

    def _fill(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self._buffer, self._at = self._buffer[self._at :] + chunk, 0
        return True

    def at_end(self) -> bool:
        while self._at >= len(self._buffer):
            if not self._fill():
                return True
        return False

    def take(self, n: int) -> bytes:
        """The next n bytes, fewer only at the end."""
        while len(self._buffer) - self._at < n and self._fill():
            pass
        data = self._buffer[self._at : self._at + n]
        self._at += len(data)
        self.position += len(data)
        return data

    def skip(self, n: int) -> bool:
        """Skip n bytes; False if the stream ended first."""
        while n > 0:
            if self._at >= len(self._buffer) and not self._fill():
                return False
            step = min(n, len(self._buffer) - self._at)
            self._at += step
            self.position += step
            n -= step
        return True


def _inflate_gzip_members(stream: BinaryIO) -> Iterator[bytes]:
    """Inflate every gzip member in turn, like Go's multistream gzip.Reader."""
    pending = b""
    members = 0
    while True:
        if not pending:
            pending = stream.read(READ_CHUNK)
        if not pending:
            if members == 0:
                raise CorruptBlobError("empty gzip blob")
            return
        if not pending.startswith(GZIP_MAGIC[: len(pending)]):
            raise CorruptBlobError(f"data after gzip member {members} is not a gzip member")
        pending = yield from _inflate_one_member(stream, pending)
        members += 1


def _inflate_one_member(stream: BinaryIO, pending: bytes) -> Generator[bytes, None, bytes]:
    """Inflate one member starting at `pending`; return the bytes read past its end."""
    inflater = zlib.decompressobj(wbits=31)
    data = pending
    while True:
        try:
            out = inflater.decompress(data, READ_CHUNK)
        except zlib.error as exc:
            raise CorruptBlobError(f"gzip member is corrupt: {exc}") from exc
        if out:
            yield out
        if inflater.eof:
            return inflater.unused_data
        data = inflater.unconsumed_tail
        if not data and len(out) < READ_CHUNK:  # a full `out` may leave output pending
            data = stream.read(READ_CHUNK)
            if not data:
                raise CorruptBlobError("gzip stream is truncated")


class ChunkReader(io.RawIOBase):
    """A raw readable stream over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._current = b""
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        while self._offset >= len(self._current):
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._current, self._offset = nxt, 0
        n = min(len(buffer), len(self._current) - self._offset)
        buffer[:n] = self._current[self._offset : self._offset + n]
        self._offset += n
        return n

    def read(self, size: int = -1, /) -> bytes:
        """`size` bytes (fewer only at the end; all that is left if negative), gathered
        across chunks: a raw read would answer with one chunk's rest, in a new buffer
        of `size` bytes each time."""
        pieces: list[bytes] = []
        wanted = size if size >= 0 else sys.maxsize
        while wanted > 0:
            if self._offset >= len(self._current):
                nxt = next(self._chunks, None)
                if nxt is None:
                    break
                self._current, self._offset = nxt, 0
                continue
            piece = self._current[self._offset : self._offset + wanted]
            self._offset += len(piece)
            wanted -= len(piece)
            pieces.append(piece)
        return b"".join(pieces)


def iter_chunks(stream: BinaryIO, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    """Yield `stream` in chunks until EOF."""
    while chunk := stream.read(chunk_size):
        yield chunk
