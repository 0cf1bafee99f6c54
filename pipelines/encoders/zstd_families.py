"""The zstd encoder families: libzstd (python-zstandard: streaming, workers, one-shot),
klauspost/compress and zstd:chunked (Go helpers).

python-zstandard regenerates the whole frame; the params hold the frame options
(checksum, content size) that the header reveals.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from pipelines.encoders.base import (
    FEED_CHUNK,
    Encoder,
    HelperFailedError,
    describe_helper,
    helper_dir,
    rechunk,
    run_filter,
)
from pipelines.formats.codecs import parse_zstd_frame_header

ZSTD_ONESHOT_MAX = 64 * 1024 * 1024


class ZstdEncoder(Encoder):
    """libzstd through python-zstandard, single frame.

    mode "stream": streaming compressor, one worker (compressobj/stream_writer/copy_stream);
    "mt": streaming with worker threads (output independent of the thread count);
    "oneshot": ZstdCompressor.compress() of the whole input (held in memory)."""

    def __init__(self, mode: str, level: int) -> None:
        self.mode = mode
        self.level = level
        self.encoder_id = f"zstd/libzstd-{libzstd_version()}/{mode}/{level}"

    def unavailable_reason(self) -> str | None:
        return None

    def _compressor(self, options: ZstdOptions) -> zstandard.ZstdCompressor:
        return zstandard.ZstdCompressor(
            level=self.level,
            write_checksum=options.checksum,
            write_content_size=options.write_content_size,
            threads=2 if self.mode == "mt" else 0,
        )

    def body(self, tar_chunks: Iterable[bytes], params: bytes) -> Iterator[bytes]:
        options = ZstdOptions.decode(params)
        compressor = self._compressor(options)
        if self.mode == "oneshot":
            yield compressor.compress(b"".join(tar_chunks))
            return
        stream = compressor.compressobj(size=options.pledged_size)
        for chunk in rechunk(tar_chunks, FEED_CHUNK):
            if out := stream.compress(chunk):
                yield out
        yield stream.flush()

    def screen(self, tar_prefix: bytes, params: bytes) -> bytes | None:
        options = ZstdOptions.decode(params)
        if self.mode == "mt":
            return self._screen_workers(tar_prefix, options)
        if self.mode != "stream":
            return None  # one-shot emits nothing comparable for a prefix
        stream = self._compressor(options).compressobj(size=options.pledged_size)
        return b"".join(stream.compress(c) for c in rechunk([tar_prefix], FEED_CHUNK))

    def _screen_workers(self, tar_prefix: bytes, options: ZstdOptions) -> bytes | None:
        """Workers compress jobs (2^20 bytes or a larger power of two) in chunks of
        ZSTD_MT_CHUNK, each chunk seeing only itself and what came before: a prefix of
        whole chunks compresses as in the full stream, up to its last block (which ends
        the frame). Only for an unknown size (a known one sets every job's parameters)."""
        whole = len(tar_prefix) // ZSTD_MT_CHUNK * ZSTD_MT_CHUNK
        if options.pledged_size >= 0 or whole == 0:
            return None
        stream = self._compressor(options).compressobj(size=-1)
        produced = [stream.compress(c) for c in rechunk([tar_prefix[:whole]], FEED_CHUNK)]
        return zstd_blocks_but_last(b"".join(produced) + stream.flush())

    def prescreen(self, tar_prefix: bytes, params: bytes) -> bytes | None:
        # Workers and one-shot write the same first block as the streaming compressor
        # (they part at the second): the same for all three modes of a level, cached.
        options = ZstdOptions.decode(params)
        return _libzstd_first_block(self.level, options, tar_prefix[:ZSTD_PRESCREEN_FEED])


ZSTD_BLOCK = 128 * 1024
ZSTD_MT_CHUNK = 4 * ZSTD_BLOCK  # what a libzstd worker compresses at a time
ZSTD_PRESCREEN_FEED = ZSTD_BLOCK + 1  # one byte past a block makes libzstd emit it


@functools.lru_cache(maxsize=128)
def _libzstd_first_block(level: int, options: ZstdOptions, tar_prefix: bytes) -> bytes | None:
    """Frame header and first block of libzstd's streaming output, None if not out yet."""
    compressor = zstandard.ZstdCompressor(
        level=level,
        write_checksum=options.checksum,
        write_content_size=options.write_content_size,
    )
    stream = compressor.compressobj(size=options.pledged_size)
    produced = b"".join(stream.compress(c) for c in rechunk([tar_prefix], FEED_CHUNK))
    return zstd_first_block(produced)


def zstd_blocks_but_last(frame: bytes) -> bytes | None:
    """A whole zstd frame up to the start of its last block, None if malformed."""
    header = parse_zstd_frame_header(frame)
    if header is None:
        return None
    pos = last = header.header_len
    while pos + 3 <= len(frame):
        block = int.from_bytes(frame[pos : pos + 3], "little")
        last = pos
        pos += 3 + (1 if block >> 1 & 3 == 1 else block >> 3)
        if block & 1:
            return frame[:last]
    return None


def zstd_first_block(data: bytes) -> bytes | None:
    """The frame header and first block at the start of `data`, None if incomplete."""
    frame = parse_zstd_frame_header(data)
    pos = frame.header_len if frame else 0
    if frame is None or len(data) < pos + 3:
        return None
    header = int.from_bytes(data[pos : pos + 3], "little")
    block_type, size = header >> 1 & 3, header >> 3
    end = pos + 3 + (1 if block_type == 1 else size)  # an RLE block holds one byte
    return data[:end] if len(data) >= end else None


def libzstd_version() -> str:
    return ".".join(str(part) for part in zstandard.ZSTD_VERSION)


@dataclass(frozen=True)
class ZstdOptions:
    checksum: bool
    write_content_size: bool
    pledged_size: int  # -1: unknown to the compressor

    def encode(self) -> bytes:
        flags = int(self.checksum) | int(self.write_content_size) << 1
        return b"Z1" + struct.pack(">Bq", flags, self.pledged_size)

    @classmethod
    def decode(cls, params: bytes) -> ZstdOptions:
        if len(params) != 11 or not params.startswith(b"Z1"):
            raise ValueError("malformed zstd encoder params")
        flags, pledged = struct.unpack(">Bq", params[2:])
        return cls(bool(flags & 1), bool(flags & 2), pledged)


# klauspost/compress zstd (containers/image: skopeo, podman, buildah; BuildKit vendors
# its own copy). Its encoder levels and their fixed windows (encoder_options.go).
KLAUSPOST_WINDOWS = {"default": 8 << 20, "fastest": 4 << 20, "better": 16 << 20, "best": 32 << 20}
# How the producer fed the encoder before copying the rest: containers/image writes the
# 8 bytes it sniffed for a compression magic first (a block of their own); 0: no split.
KLAUSPOST_FIRST_WRITES = (8, 0)
# A klauspost screen compares whole 64/128 KiB blocks: ask for 1 MiB of them at least.
KLAUSPOST_SCREEN_BYTES = 1 << 20


@dataclass(frozen=True)
class KlauspostOptions:
    checksum: bool
    first_write: int  # bytes written (and so flushed as a block) before the rest

    def encode(self) -> bytes:
        return b"K1" + struct.pack(">BI", int(self.checksum), self.first_write)

    @classmethod
    def decode(cls, params: bytes) -> KlauspostOptions:
        if len(params) != 7 or not params.startswith(b"K1"):
            raise ValueError("malformed klauspost zstd encoder params")
        checksum, first_write = struct.unpack(">BI", params[2:])
        return cls(bool(checksum), first_write)


class KlauspostZstdEncoder(Encoder):
    """klauspost/compress zstd as built in Debian, driven as containers/image drives it:
    zstd.NewWriter with one encoder level (podman/skopeo/buildah's compression level 1-2
    is "fastest", 3-5 "default" (also no level), 6-9 "better", 10+ "best"). `library` is
    what the helper reports, e.g. "klauspost-deb-1.15.12+ds1-3". One frame, streamed."""

    def __init__(self, library: str, speed: str) -> None:
        self.library = library
        self.speed = speed
        self.encoder_id = f"zstd/{library}/{speed}"

    def unavailable_reason(self) -> str | None:
        if klauspost_zstd_library() != self.library:
            return f"no helper for {self.library} (found: {klauspost_zstd_library() or 'none'})"
        return None

    def _argv(self, options: KlauspostOptions, mode: str) -> list[str]:
        return [
            str(klauspost_zstd_helper()),
            "-speed", self.speed,
            "-crc=" + ("true" if options.checksum else "false"),
            "-first", str(options.first_write),
            "-mode", mode,
        ]  # fmt: skip

    def body(self, tar_chunks: Iterable[bytes], params: bytes) -> Iterator[bytes]:
        return run_filter(self._argv(KlauspostOptions.decode(params), "frame"), tar_chunks)

    def screen(self, tar_prefix: bytes, params: bytes) -> bytes | None:
        if len(tar_prefix) < KLAUSPOST_SCREEN_BYTES:
            return None  # a block or two prove little: wait for a larger stage
        argv = self._argv(KlauspostOptions.decode(params), "prefix")
        return b"".join(run_filter(argv, [tar_prefix])) or None

    def prescreen(self, tar_prefix: bytes, params: bytes) -> bytes | None:
        # The split block, if any, and the first whole block after it.
        options = KlauspostOptions.decode(params)
        feed = tar_prefix[: options.first_write + ZSTD_BLOCK]
        return b"".join(run_filter(self._argv(options, "prefix"), [feed])) or None


def klauspost_zstd_helper() -> Path:
    return helper_dir() / "zstd-klauspost-deb"


def klauspost_zstd_library() -> str | None:
    return describe_helper(klauspost_zstd_helper())


# zstd:chunked (containers/storage pkg/chunked): the zstd levels containers/image may
# pass, one per klauspost encoder level they map to; 10 is containers/storage's default.
ZSTD_CHUNKED_LEVELS = {"best": 10, "default": 3, "fastest": 1, "better": 7}
# Its footer: a skippable frame of 40 bytes ending in this magic.
ZSTD_CHUNKED_FOOTER_LEN = 48
ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
TAR_END = bytes(1024)


class ZstdChunkedEncoder(Encoder):
    """zstd:chunked layers as containers/image writes them (skopeo, podman, buildah
    --compression-format zstd:chunked): containers/storage's compressor as built in
    Debian. `library` is what the helper reports, e.g. "chunked-storage-deb-1.43.0+ds1-8
    +compress-deb-…+jsoniter-deb-…+tarsplit-deb-…". No params: the tar and the level fix
    every frame, the table of contents and the footer."""

    def __init__(self, library: str, speed: str) -> None:
        self.library = library
        self.speed = speed
        self.encoder_id = f"zstd/{library}/{speed}"

    def unavailable_reason(self) -> str | None:
        if zstd_chunked_library() != self.library:
            return f"no helper for {self.library} (found: {zstd_chunked_library() or 'none'})"
        return None

    def _argv(self) -> list[str]:
        return [str(zstd_chunked_helper()), "-level", str(ZSTD_CHUNKED_LEVELS[self.speed])]

    def body(self, tar_chunks: Iterable[bytes], params: bytes) -> Iterator[bytes]:
        return run_filter(self._argv(), tar_chunks)

    def screen(self, tar_prefix: bytes, params: bytes) -> bytes | None:
        # The tar's whole entries, ended as a tar ends: the layer's frames up to the last
        # one (which holds the end of the tar instead of the next entry's header).
        if len(tar_prefix) < KLAUSPOST_SCREEN_BYTES:
            return None
        cut = tar_entries_end(tar_prefix)
        try:
            produced = b"".join(run_filter(self._argv(), [tar_prefix[:cut], TAR_END]))
        except HelperFailedError:
            return None
        return zstd_frames_but_last(produced) or None


def zstd_chunked_helper() -> Path:
    return helper_dir() / "zstd-chunked-deb"


def zstd_chunked_library() -> str | None:
    return describe_helper(zstd_chunked_helper())


def is_zstd_chunked(tail: bytes) -> bool:
    """Whether a zstd blob ending in `tail` ends with the zstd:chunked footer."""
    footer = tail[-ZSTD_CHUNKED_FOOTER_LEN:]
    return (
        len(footer) == ZSTD_CHUNKED_FOOTER_LEN
        and footer.endswith(ZSTD_CHUNKED_MAGIC)
        and 0x184D2A50 <= int.from_bytes(footer[:4], "little") <= 0x184D2A5F
    )


def tar_entries_end(tar: bytes) -> int:
    """The offset after the last whole entry of a tar prefix whose header is not an
    extension (PAX, GNU long name) of the next one."""
    pos = safe = 0
    while pos + 512 <= len(tar):
        header = tar[pos : pos + 512]
        if header == bytes(512):
            break
        field = header[124:136]
        if field[0] & 0x80:  # base-256
            size = int.from_bytes(field[1:], "big")
        else:
            digits = field.split(b"\0", 1)[0].strip()
            if digits.strip(b"01234567"):
                break  # not a tar header
            size = int(digits, 8) if digits else 0
        end = pos + 512 + (size + 511) // 512 * 512
        if end > len(tar):
            break
        pos = end
        if header[156:157] not in (b"x", b"g", b"L", b"K"):
            safe = pos
    return safe


def zstd_frames_but_last(data: bytes) -> bytes:
    """The complete zstd frames of `data` before its last one (skippable frames end the
    walk): a prefix that does not depend on how the last frame ends."""
    starts: list[int] = []
    pos = 0
    while (frame := parse_zstd_frame_header(data[pos : pos + 18])) is not None:
        starts.append(pos)
        pos += frame.header_len
        last = False
        while not last and pos + 3 <= len(data):
            header = int.from_bytes(data[pos : pos + 3], "little")
            last, block_type, size = bool(header & 1), header >> 1 & 3, header >> 3
            pos += 3 + (1 if block_type == 1 else size)
        if not last or pos + 4 * frame.checksum > len(data):
            break
        pos += 4 * frame.checksum
    return data[: starts[-1]] if len(starts) > 1 else b""
