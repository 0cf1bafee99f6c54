"""Layer blob classification and streaming decompression.

`sniff` tells what a blob is from its first bytes (gzip with parsed header and a
producer hint, zstd with the parsed frame header, plain tar, other), and
`open_decompressed` streams the tar out of it with bounded memory. Exact
recompression lives in `pipelines.encoders`.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

SNIFF_BYTES = 64 * 1024
READ_CHUNK = 256 * 1024

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
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


def open_decompressed(kind: str, stream: BinaryIO) -> BinaryIO:
    """A readable binary stream of the tar inside a gzip (multi-member), zstd
    (multi-frame) or plain blob. Reads `stream` incrementally; memory stays bounded."""
    if kind == "gzip":
        raw: io.RawIOBase = ChunkReader(_inflate_gzip_members(stream))
        return io.BufferedReader(raw, READ_CHUNK)
    if kind == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(
            stream, read_size=READ_CHUNK, read_across_frames=True, closefd=False
        )
        return io.BufferedReader(reader, READ_CHUNK)
    if kind == "tar":
        return stream
    raise ValueError(f"cannot decompress blob of kind {kind!r}")


class CorruptBlobError(ValueError):
    """The compressed stream is malformed (bad member header, truncation, trailing junk)."""


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


def iter_chunks(stream: BinaryIO, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    """Yield `stream` in chunks until EOF."""
    while chunk := stream.read(chunk_size):
        yield chunk
