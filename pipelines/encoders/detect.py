"""Exact recompression of layer blobs.

A layer blob can drop its compressed bytes only if an encoder regenerates them
exactly from the tar. Every encoder has an immutable, versioned id that recipes
store forever; an id always names one exact output for a given input and params.

Gzip: the header and the 8-byte trailer are kept verbatim in `encoder_params`;
the encoder regenerates the deflate body between them. Go encoders run as small
helper binaries (pipelines/encoders/gohelpers) found in $DUPHUNTER_HELPER_DIR.
Zstd: python-zstandard regenerates the whole frame; the params hold the frame
options (checksum, content size) that the header reveals.

`find_encoder` screens candidates on a prefix of the tar, then proves the
survivor by recompressing everything and comparing the sha256 with the digest.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import struct
import subprocess
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from pipelines.encoders.libz import deflate_boundaries, zlib_segment
from pipelines.formats.codecs import (
    GZIP_MAGIC,
    GZIP_OS_UNIX,
    Sniff,
    gzip_header_length,
    iter_chunks,
    parse_zstd_frame_header,
)

IDENTITY_ID = "identity"
GZIP_TRAILER_LEN = 8
PIPE_CHUNK = 256 * 1024
# Screening: a small prefix drops most candidates, a larger one the look-alikes.
SCREEN_STAGES = (128 * 1024, 1024 * 1024, 4 * 1024 * 1024)
# Stock zlib's stored blocks (level 0) depend on how input is fed: always feed this much.
FEED_CHUNK = 64 * 1024
# pgzip closes the stream after the screened prefix: ignore that many final bytes.
PGZIP_CLOSE_MARGIN = 64
PGZIP_BLOCK_SIZES = (1 << 20, 256 << 10)  # containers/image (skopeo...), umoci
PGZIP_TAIL = 16 * 1024  # pgzip primes each block with this much of the previous one
GO_CHUNK = 65535  # Go's chunk-wise encoders (BestSpeed; Go >= 1.27 levels 1-6)
# A stage-1 agreement over this much output is proof enough to go to the full check.
SCREEN_CONCLUSIVE_BYTES = 16 * 1024
ZSTD_ONESHOT_MAX = 64 * 1024 * 1024
# Encoders that cannot be screened (zstd workers, one-shot) are tried by full
# recompression until this much tar has been fed to them in total.
UNSCREENED_BUDGET_BYTES = 64 * 1024 * 1024
STOCK_ZLIB_FAMILY = "1.2.13"


class EncoderUnavailableError(RuntimeError):
    """The encoder named by a recipe cannot run here (missing helper, other library)."""


class HelperFailedError(RuntimeError):
    """A helper exited with an error (e.g. zstd:chunked's on a stream that is no tar)."""


@dataclass(frozen=True)
class Match:
    encoder_id: str
    encoder_params: bytes


@dataclass(frozen=True)
class NoMatch:
    reason: str


OpenStream = Callable[[], BinaryIO]


# --------------------------------------------------------------------------- helpers


def helper_dir() -> Path:
    """Where the Go helper binaries live: $DUPHUNTER_HELPER_DIR or <repo>/build/helpers."""
    configured = os.environ.get("DUPHUNTER_HELPER_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "build" / "helpers"


_described: dict[Path, str] = {}


def describe_helper(path: Path) -> str | None:
    """The first word of `helper -describe`, or None if the helper cannot run."""
    if path in _described:
        return _described[path]
    try:
        done = subprocess.run([str(path), "-describe"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    words = done.stdout.decode("ascii", "replace").split()
    if not words:
        return None
    _described[path] = words[0]
    return words[0]


def segment_helper_env() -> dict[str, str]:
    """The environment of a Go helper that encodes one segment: it holds its whole input
    (a few MiB) and exits, and its collector, run again and again as the input grows,
    cost 40-70 ms of CPU per 5.5 MB segment against ~120 ms of encoding (measured with
    GODEBUG=gctrace=1). So it is off, with a ceiling should an input be huge."""
    return {**os.environ, "GOGC": "off", "GOMEMLIMIT": "1GiB"}


def run_filter(
    argv: Sequence[str], chunks: Iterable[bytes], env: dict[str, str] | None = None
) -> Iterator[bytes]:
    """Stream `chunks` through a subprocess: a thread feeds stdin, we yield stdout.
    An error while producing `chunks` is re-raised here: a helper that saw a short
    input must never pass for a finished one."""
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    assert stdin is not None and stdout is not None and stderr is not None
    feed_errors: list[BaseException] = []
    stderr_text: list[bytes] = []
    threads = [
        threading.Thread(target=_feed, args=(stdin, chunks, feed_errors, proc), daemon=True),
        threading.Thread(target=lambda: stderr_text.append(stderr.read()), daemon=True),
    ]
    for thread in threads:
        thread.start()
    finished = False
    try:
        reader = cast(io.BufferedReader, stdout)
        while chunk := reader.read1(PIPE_CHUNK):
            yield chunk
        finished = True
    finally:
        if not finished:
            proc.kill()
        stdout.close()
        returncode = _reap(proc)
        for thread in threads:
            thread.join()
    if feed_errors:
        raise feed_errors[0]
    if returncode != 0:
        message = b"".join(stderr_text).decode("utf-8", "replace").strip()
        raise HelperFailedError(f"{argv[0]} exited with {returncode}: {message}")


_delegated_cpu = threading.local()


def thread_cpu_seconds() -> float:
    """CPU seconds this thread used so far, counting what was spent on its behalf: by the
    helper processes it ran to completion, and by work it handed to other threads."""
    return time.thread_time() + float(getattr(_delegated_cpu, "seconds", 0.0))


def charge_cpu(seconds: float) -> None:
    """Count `seconds` of CPU, spent elsewhere for this thread, as this thread's."""
    _delegated_cpu.seconds = float(getattr(_delegated_cpu, "seconds", 0.0)) + seconds


def _reap(proc: subprocess.Popen[bytes]) -> int:
    """Wait for a helper and count its CPU time (user + system) for this thread."""
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    charge_cpu(usage.ru_utime + usage.ru_stime)
    return proc.returncode


def _feed(
    stdin: BinaryIO,
    chunks: Iterable[bytes],
    errors: list[BaseException],
    proc: subprocess.Popen[bytes],
) -> None:
    try:
        with stdin:
            for chunk in chunks:
                stdin.write(chunk)
    except BrokenPipeError:
        pass  # the helper died or we stopped reading: the return code tells
    except BaseException as exc:  # handed to the consuming thread
        errors.append(exc)
        proc.kill()


def rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The same bytes in pieces of exactly `size` (the last may be shorter), so that
    an encoder sees the same feeding at find time and at every restore."""
    pending = b""
    for chunk in chunks:
        data = pending + chunk if pending else chunk
        start = 0
        while len(data) - start >= size:
            yield data[start : start + size]
            start += size
        pending = data[start:]
    if pending:
        yield pending


# --------------------------------------------------------------------------- encoders


class Encoder(ABC):
    """Regenerates the compressed payload of one producer from the tar."""

    encoder_id: str

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """Why this encoder cannot run here, or None if it can."""

    @abstractmethod
    def body(self, tar_chunks: Iterable[bytes], params: bytes) -> Iterator[bytes]:
        """The regenerated payload (deflate body for gzip, whole frame for zstd)."""

    def screen(self, tar_prefix: bytes, params: bytes) -> bytes | None:
        """Bytes that must start the payload of any tar beginning with `tar_prefix`,
        or None if this encoder cannot be screened on a prefix."""
        return None

    def prescreen(self, tar_prefix: bytes, params: bytes) -> bytes | None:
        """Like `screen`, for encoders it cannot judge (or that are judged whole): the
        few first bytes of the payload (a zstd frame's header and first block). They
        can only reject; agreeing on them proves nothing. None: no opinion."""
        return None

    # Resuming at a deflate block boundary (pipelines.serve.checkpoints proves every use).
    uses_every_core = False  # its whole-stream encoding is parallel already
    history_bytes = 0  # input before a boundary that a segment needs
    lookahead_bytes = 0  # input after a segment's end that finishing it needs

    def resumable_at(self, tar_offset: int) -> bool:
        """Whether a segment may start at a block boundary at this tar offset."""
        return False

    def encode_segment(
        self, history: bytes, data: bytes, lookahead: bytes, *, offset: int, final: bool, align: int
    ) -> bytes:
        """The payload's bits from a block boundary on, encoding `data` as the stream
        does after `history`: the whole rest of the stream if `final`, else at least up
        to the block boundary after `data` (seeing `lookahead`, the input past it).
        `offset` is the boundary's offset in the tar. The output starts with `align`
        zero bits: the boundary's place in its byte (stored blocks pad to a byte
        boundary of the whole stream)."""
        raise EncoderUnavailableError(f"{self.encoder_id} cannot resume mid-stream")


class ZlibEncoder(Encoder):
    """Stock zlib raw deflate (Python gzip, Java GZIPOutputStream, Jib)."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.encoder_id = f"gzip/zlib-{STOCK_ZLIB_FAMILY}/{level}"

    def unavailable_reason(self) -> str | None:
        return stock_zlib_problem()

    def _compressor(self) -> zlib._Compress:
        return zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS, 8)

    def body(self, tar_chunks: Iterable[bytes], params: bytes) -> Iterator[bytes]:
        compressor = self._compressor()
        for chunk in rechunk(tar_chunks, FEED_CHUNK):
            if out := compressor.compress(chunk):
                yield out
        yield compressor.flush()

    def screen(self, tar_prefix: bytes, params: bytes) -> bytes:
        compressor = self._compressor()  # fed like body() and not flushed: a true prefix
        return b"".join(compressor.compress(c) for c in rechunk([tar_prefix], FEED_CHUNK))

    # deflateSetDictionary rebuilds the window and the hash chains of every position
    # (what levels 4-9 hold); the lookahead covers MIN_LOOKAHEAD (262) and a margin.
    history_bytes = 32 * 1024
    lookahead_bytes = 4096

    def resumable_at(self, tar_offset: int) -> bool:
        # Level 0's stored blocks follow the caller's buffers; it is memcpy-fast anyway.
        return self.level != 0

    def encode_segment(
        self, history: bytes, data: bytes, lookahead: bytes, *, offset: int, final: bool, align: int
    ) -> bytes:
        return zlib_segment(self.level, history, data, lookahead, final, align, FEED_CHUNK)


class GoStdlibEncoder(Encoder):
    """Go's compress/gzip (Docker, BuildKit, containerd, crane, ko, kaniko)."""

    def __init__(self, generation: str, level: int) -> None:
        self.generation = generation  # "1.26" means every Go <= 1.26, "1.27" Go >= 1.27
        self.level = level
        self.encoder_id = f"gzip/go{generation}/{level}"

    @property
    def helper(self) -> Path:
        return helper_dir() / f"gzip-go{self.generation}"

    def unavailable_reason(self) -> str | None:
        version = describe_helper(self.helper)
        if version is None:
            build = "pipelines/encoders/gohelpers/build.sh"
            return f"helper {self.helper} is missing or broken (run {build})"
        if not version.startswith(f"go{self.generation}"):
            return f"helper {self.helper} was built with {version}, not go{self.generation}"
        return None

    def _argv(self, mode: str) -> list[str]:
        return [str(self.helper), "-level", str(self.level), "-mode", mode]

    def body(self, tar_chunks: Iterable[bytes], params: bytes) -> Iterator[bytes]:
        return run_filter(self._argv("deflate"), tar_chunks)

    def screen(self, tar_prefix: bytes, params: bytes) -> bytes:
        return b"".join(run_filter(self._argv("prefix"), [tar_prefix]))

    @property
    def _chunked(self) -> int | None:
        """The input chunk of encoders that work chunk by chunk (their blocks start on
        chunk boundaries and a resume replays whole chunks), None for lazy matching."""
        if self.generation == "1.26":
            return GO_CHUNK if self.level in (-2, 0, 1) else None
        if self.level == -2:
            return 32 * 1024
        return GO_CHUNK if self.level in (-1, 0, 1, 2, 3, 4, 5, 6) else None

    @property
    def history_bytes(self) -> int:  # type: ignore[override]
        # Lazy levels: the compressor's window holds up to 64 KiB before the boundary.
        return 3 * GO_CHUNK if self._chunked else 64 * 1024

    @property
    def lookahead_bytes(self) -> int:  # type: ignore[override]
        # Go >= 1.27 may end a block only when the next chunk wants a new table.
        return 2 * GO_CHUNK + 1 if self.generation != "1.26" else 4096

    def resumable_at(self, tar_offset: int) -> bool:
        if self.generation != "1.26" and self.level in (7, 8, 9):
            # Go >= 1.27's lazy levels keep literal-cost estimates across blocks and may
            # continue a block's Huffman table over many chunks: measured, almost no
            # boundary resumes, so none is offered.
            return False
        chunk = self._chunked
        return chunk is None or tar_offset % chunk == 0

    def encode_segment(
        self, history: bytes, data: bytes, lookahead: bytes, *, offset: int, final: bool, align: int
    ) -> bytes:
        argv = [*self._argv("segment"), "-history", str(len(history)), "-align", str(align)]
        argv += ["-offset", str(offset)]
        argv += ["-final"] if final else []
        return b"".join(run_filter(argv, [history, data, lookahead], segment_helper_env()))


class PgzipEncoder(Encoder):
    """klauspost/pgzip as built in Debian (skopeo, podman, buildah: 1 MiB blocks;
    umoci: 256 KiB blocks). `library` is what the helper reports, e.g.
    "pgzip-deb-1.2.5-2+compress-deb-1.15.12+ds1-3"."""

    def __init__(self, library: str, block_size: int, level: int) -> None:
        self.library = library
        self.block_size = block_size
        self.level = level
        self.encoder_id = f"gzip/{library}/b{block_size}/{level}"

    def unavailable_reason(self) -> str | None:
        if pgzip_library() != self.library:
            return f"no helper for {self.library} (found: {pgzip_library() or 'none'})"
        return None

    def _argv(self) -> list[str]:
        return [
            str(pgzip_helper()),
            "-level", str(self.level),
            "-blocksize", str(self.block_size),
            "-mode", "deflate",
        ]  # fmt: skip

    def body(self, tar_chunks: Iterable[bytes], params: bytes) -> Iterator[bytes]:
        return run_filter(self._argv(), tar_chunks)

    def screen(self, tar_prefix: bytes, params: bytes) -> bytes | None:
        # Whole blocks compress exactly as in the full stream; only the close differs.
        whole_blocks = len(tar_prefix) // self.block_size * self.block_size
        if whole_blocks == 0:
            return None
        out = b"".join(run_filter(self._argv(), [tar_prefix[:whole_blocks]]))
        return out[:-PGZIP_CLOSE_MARGIN]

    uses_every_core = True  # one goroutine per block
    # Blocks are independent by design: each is primed with the previous one's tail.
    history_bytes = PGZIP_TAIL

    def resumable_at(self, tar_offset: int) -> bool:
        return tar_offset % self.block_size == 0

    def encode_segment(
        self, history: bytes, data: bytes, lookahead: bytes, *, offset: int, final: bool, align: int
    ) -> bytes:
        if align:
            raise ValueError("pgzip blocks start on a byte boundary")
        argv = [*self._argv()[:-2], "-mode", "segment", "-history", str(len(history))]
        argv += ["-final"] if final else []
        return b"".join(run_filter(argv, [history, data], segment_helper_env()))


def pgzip_helper() -> Path:
    return helper_dir() / "gzip-pgzip-deb"


def pgzip_library() -> str | None:
    return describe_helper(pgzip_helper())


GNU_GZIP_VERSION = "1.12"
PIGZ_VERSION = "2.6"
PIGZ_ZLIB_VERSION = "1.2.13"  # pigz's deflate is zlib's: the id names both
GZIP_PROGRAM_HEADER = 10  # -n: no name, no time
# Deflate blocks of a prefix's output that end this far before the prefix's end hold the
# same tokens as in the whole stream's (a match looks at most 262 bytes ahead).
PROGRAM_SCREEN_MARGIN = 4096


@functools.cache
def program_version(path: Path) -> str | None:
    """The first line of `program --version`, or None if it cannot run."""
    try:
        done = subprocess.run([str(path), "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (done.stdout or done.stderr).decode("utf-8", "replace").splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


class GzipProgramEncoder(Encoder):
    """A real gzip program: GNU gzip or pigz, pinned and built by
    pipelines/encoders/programs/build.sh (`gzip -n -LEVEL`, `pigz -n -LEVEL`: pigz
    compresses 128 KiB blocks in parallel, each primed with the previous 32 KiB, its
    output independent of the thread count). The program writes a whole gzip member; the
    body is what lies between its header and its trailer, which the recipe keeps verbatim
    as for every gzip encoder."""

    def __init__(self, program: str, level: int, single_thread: bool = False) -> None:
        if program not in ("gnu", "pigz") or (single_thread and program != "pigz"):
            raise ValueError(f"unknown gzip program {program!r}")
        self.program = program
        self.level = level
        self.single_thread = single_thread
        if program == "gnu":
            self.encoder_id = f"gzip/gnu-{GNU_GZIP_VERSION}/level{level}"
        else:
            family = f"gzip/pigz-{PIGZ_VERSION}-zlib-{PIGZ_ZLIB_VERSION}"
            self.encoder_id = f"{family}/{'single/' if single_thread else ''}level{level}"

    @property
    def helper(self) -> Path:
        name = f"gzip-gnu-{GNU_GZIP_VERSION}" if self.program == "gnu" else f"pigz-{PIGZ_VERSION}"
        return helper_dir() / name

    def unavailable_reason(self) -> str | None:
        expected = GNU_GZIP_VERSION if self.program == "gnu" else PIGZ_VERSION
        version = program_version(self.helper)
        if version is None:
            build = "pipelines/encoders/programs/build.sh"
            return f"program {self.helper} is missing or broken (run {build})"
        if version.split()[-1] != expected:
            return f"program {self.helper} is {version!r}, not version {expected}"
        return None

    def _argv(self) -> list[str]:
        argv = [str(self.helper), "-c", "-n", f"-{self.level}"]
        if self.program == "pigz":  # levels 1-3 differ between one thread and several
            argv += ["-p", "1" if self.single_thread else "2"]
        return argv

    def body(self, tar_chunks: Iterable[bytes], params: bytes) -> Iterator[bytes]:
        return gzip_member_body(run_filter(self._argv(), tar_chunks))

    def screen(self, tar_prefix: bytes, params: bytes) -> bytes:
        """The bits of the prefix's output up to its last deflate block boundary that lies
        PROGRAM_SCREEN_MARGIN before the prefix's end: the rest depends on the prefix's end
        (the final block, matches cut short)."""
        body = b"".join(self.body([tar_prefix], params))
        keep = 0
        for tar_offset, bit in deflate_boundaries([body]):
            if tar_offset > len(tar_prefix) - PROGRAM_SCREEN_MARGIN:
                break
            keep = bit // 8
        return body[:keep]


def gzip_member_body(member: Iterable[bytes]) -> Iterator[bytes]:
    """The deflate body of a gzip member written by a program run with -n: without its
    10-byte header and its 8-byte trailer."""
    head = b""
    held = b""
    started = False
    for chunk in member:
        if not started:
            head += chunk
            if len(head) < GZIP_PROGRAM_HEADER:
                continue
            if not head.startswith(GZIP_MAGIC) or head[3] != 0:
                raise RuntimeError("the program wrote an unexpected gzip header")
            chunk, started = head[GZIP_PROGRAM_HEADER:], True
        held += chunk
        if len(held) > GZIP_TRAILER_LEN:
            yield held[:-GZIP_TRAILER_LEN]
            held = held[-GZIP_TRAILER_LEN:]
    if not started or len(held) != GZIP_TRAILER_LEN:
        raise RuntimeError("the program wrote a truncated gzip member")


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


# --------------------------------------------------------------------------- stock zlib check

# sha256 of raw deflate (memLevel 8, default strategy) of _golden_input() per level,
# recorded with stock zlib 1.2.13. A runtime matching all of them writes the same
# bytes as the zlib family our ids name; zlib-ng in compat mode does not.
_ZLIB_GOLDEN = {
    0: "7ba4514f1bbc75cf67f21c00302894a191c4ab3525310b371a877eed4a332d54",
    1: "16daf54fc5548a4a5442e45d5f1ab6aeb495bf22c96f81f956a481ff15f6512b",
    2: "60d39a34f4460f45838f01d408cba3e5d69575c99fb143910437b1e593ee2bf7",
    3: "d80acec44b7d90008d8a3e6ffdb01db2bfff1b98b28f0d6d8dd1aef2f8a66548",
    4: "9876ccdf57cd86ecaeb32cbe56a5fa978ae640943333e2172df9c7450cddb539",
    5: "396ccc953c57db1b99fb7c9a3440165a193db9c0caa21babf829b48ef22d8517",
    6: "e96fe0bcdc41b9e3fe136ebdb5297f73f5df7014be708617882f0c89f9891624",
    7: "37acd725af2b4a1ba6e3aa48778ef4eea2eeca15b46c840c97bde72bca8dd260",
    8: "0ed207d1030c1ed5c8813b7f84861f87f5938c15ccbe2e040d7e5570e53d8633",
    9: "0ed207d1030c1ed5c8813b7f84861f87f5938c15ccbe2e040d7e5570e53d8633",
}


@functools.cache
def golden_input() -> bytes:
    """Deterministic mixed text/binary/zero input (xorshift-generated, version-proof)."""
    state = 0x9E3779B97F4A7C15
    words = [b"layer", b"tar", b"usr", b"share", b"doc", b"lib", b"\n", b"copyright", b"0644"]
    out = bytearray()
    while len(out) < 80_000:
        state ^= (state << 13) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 7
        state ^= (state << 17) & 0xFFFFFFFFFFFFFFFF
        if state % 7 == 0:
            out += state.to_bytes(8, "little")
        else:
            out += words[state % len(words)] + b" "
    return bytes(out) + bytes(20_000) + bytes(out[:30_000])


def zlib_golden_digest(level: int) -> str:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 8)
    data = compressor.compress(golden_input()) + compressor.flush()
    return hashlib.sha256(data).hexdigest()


@functools.cache
def stock_zlib_problem() -> str | None:
    runtime = zlib.ZLIB_RUNTIME_VERSION
    if "ng" in runtime.lower():
        return f"runtime zlib is zlib-ng ({runtime}); its output is not stock zlib"
    for level, expected in _ZLIB_GOLDEN.items():
        if zlib_golden_digest(level) != expected:
            family = STOCK_ZLIB_FAMILY
            return f"runtime zlib {runtime} differs from stock zlib {family} at level {level}"
    return None


# --------------------------------------------------------------------------- registry

GO_GENERATIONS = ("1.26", "1.27")
GO_LEVELS = (6, 1, 9, 2, 3, 4, 5, 7, 8, -2, 0)  # default (6) and BestSpeed first
PGZIP_LEVELS = (5, 1, 9, 6, 2, 3, 4, 7, 8, -2, 0)  # klauspost default is 5
ZLIB_LEVELS = (6, 9, 1, 2, 3, 4, 5, 7, 8, 0)
PROGRAM_LEVELS = (6, 9, 1, 2, 3, 4, 5, 7, 8)  # GNU gzip and pigz: -6 is the default
ZSTD_LEVELS = (3, *range(1, 3), *range(4, 20), -1, -3, -5, *range(20, 23))


def gzip_encoders() -> list[Encoder]:
    encoders: list[Encoder] = [ZlibEncoder(level) for level in ZLIB_LEVELS]
    for generation in GO_GENERATIONS:
        encoders += [GoStdlibEncoder(generation, level) for level in GO_LEVELS]
    library = pgzip_library()
    if library is not None:
        for block_size in PGZIP_BLOCK_SIZES:
            encoders += [PgzipEncoder(library, block_size, level) for level in PGZIP_LEVELS]
    for program in ("gnu", "pigz"):
        encoders += [GzipProgramEncoder(program, level) for level in PROGRAM_LEVELS]
    # pigz -p 1 (or on one core): only its levels 1-3 write other bytes than in parallel
    encoders += [GzipProgramEncoder("pigz", level, single_thread=True) for level in (1, 2, 3)]
    return encoders


def zstd_encoders() -> list[Encoder]:
    """Streaming encoders (screenable) first, then workers and one-shot level by level."""
    encoders: list[Encoder] = [ZstdEncoder("stream", level) for level in ZSTD_LEVELS]
    encoders += [ZstdEncoder(mode, level) for level in ZSTD_LEVELS for mode in ("mt", "oneshot")]
    from pipelines.encoders.zstd_cli import zstd_cli_encoders  # the pinned zstd program

    encoders += zstd_cli_encoders()
    library = klauspost_zstd_library()
    if library is not None:
        encoders += [KlauspostZstdEncoder(library, speed) for speed in KLAUSPOST_WINDOWS]
    chunked = zstd_chunked_library()
    if chunked is not None:
        encoders += [ZstdChunkedEncoder(chunked, speed) for speed in ZSTD_CHUNKED_LEVELS]
    return encoders


def all_encoders() -> list[Encoder]:
    """Every encoder this build knows, gzip first, whether or not it can run here."""
    return gzip_encoders() + zstd_encoders()


def prepare_encoders() -> None:
    """Make now the checks each encoder makes on first use (stock zlib's golden digests,
    the helpers' versions: ~130 ms here), so that a process that serves GETs does not
    make its first restore pay them."""
    for encoder in all_encoders():
        encoder.unavailable_reason()


def vouching_encoder_id(encoder_id: str) -> str:
    """The id whose canary vouches for an encoder: a multi-frame zstd layer's frames
    encoder is as safe as the encoder of its frames (pipelines.encoders.zstd_frames)."""
    from pipelines.encoders.zstd_frames import FRAMES_PREFIX

    return encoder_id.removeprefix(FRAMES_PREFIX)


def lookup_encoder(encoder_id: str) -> Encoder:
    """The encoder for a stored id; raises EncoderUnavailableError if it cannot run here."""
    from pipelines.encoders.zstd_frames import FRAMES_PREFIX, ZstdFramesEncoder

    if encoder_id.startswith(FRAMES_PREFIX):
        return ZstdFramesEncoder(lookup_encoder(encoder_id.removeprefix(FRAMES_PREFIX)))
    for encoder in all_encoders():
        if encoder.encoder_id == encoder_id:
            reason = encoder.unavailable_reason()
            if reason:
                raise EncoderUnavailableError(f"{encoder_id}: {reason}")
            return encoder
    if encoder_id.startswith("gzip/pgzip"):
        raise EncoderUnavailableError(
            f"{encoder_id}: no matching pgzip helper (found: {pgzip_library() or 'none'})"
        )
    if encoder_id.startswith("zstd/chunked"):
        found = zstd_chunked_library() or "none"
        raise EncoderUnavailableError(f"{encoder_id}: no matching zstd:chunked helper ({found})")
    if encoder_id.startswith("zstd/klauspost"):
        found = klauspost_zstd_library() or "none"
        raise EncoderUnavailableError(
            f"{encoder_id}: no matching klauspost zstd helper (found: {found})"
        )
    raise EncoderUnavailableError(f"{encoder_id}: unknown encoder (or other library version)")


# --------------------------------------------------------------------------- encode


def encode(encoder_id: str, encoder_params: bytes, tar_chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The exact blob bytes, streamed, for a recipe's encoder id and params."""
    if encoder_id == IDENTITY_ID:
        yield from tar_chunks
        return
    encoder = lookup_encoder(encoder_id)
    if encoder_id.startswith("gzip/"):
        header, trailer = decode_gzip_params(encoder_params)
        yield header
        yield from encoder.body(tar_chunks, encoder_params)
        yield trailer
    else:
        yield from encoder.body(tar_chunks, encoder_params)


def encode_gzip_params(header: bytes, trailer: bytes) -> bytes:
    return b"G1" + struct.pack(">I", len(header)) + header + trailer


def decode_gzip_params(params: bytes) -> tuple[bytes, bytes]:
    if not params.startswith(b"G1") or len(params) < 6 + GZIP_TRAILER_LEN:
        raise ValueError("malformed gzip encoder params")
    (header_len,) = struct.unpack(">I", params[2:6])
    header, trailer = params[6 : 6 + header_len], params[6 + header_len :]
    if len(header) != header_len or len(trailer) != GZIP_TRAILER_LEN:
        raise ValueError("malformed gzip encoder params")
    return header, trailer


# --------------------------------------------------------------------------- find_encoder


@dataclass(frozen=True)
class _Target:
    """What the candidate must reproduce: payload prefix and framing."""

    payload_prefix: bytes  # the blob minus gzip header, at most SCREEN_STAGES[-1]-ish
    prefix_is_whole: bool
    params: bytes
    frame_before: bytes  # gzip header (b"" for zstd)
    frame_after: bytes  # gzip trailer (b"" for zstd)


@dataclass(frozen=True)
class _Trial:
    """Candidates for one framing guess, after screening on the tar prefix."""

    target: _Target
    screened: list[Encoder]  # passed screening, best guess first
    unscreened: list[Encoder]  # cannot be judged on a prefix: full recompression only
    available: list[Encoder]
    skipped: list[str]  # why unavailable candidates were left out


@dataclass(frozen=True)
class Shortlist:
    """Encoders that reproduce the start of a blob; `prove` settles which, if any, makes
    all of it. An identity shortlist stands for a plain tar blob."""

    trials: tuple[_Trial, ...]
    identity: bool = False

    @property
    def screened(self) -> bool:
        """Whether some candidate matched the prefix (else all are unscreenable)."""
        return self.identity or any(trial.screened for trial in self.trials)

    def narrowed(self, encoder_id: str) -> Shortlist:
        """The same shortlist with only this encoder left, to prove it again."""
        return Shortlist(
            tuple(
                replace(
                    trial,
                    screened=[
                        e for e in trial.screened + trial.unscreened if e.encoder_id == encoder_id
                    ],
                    unscreened=[],
                )
                for trial in self.trials
            ),
            self.identity,
        )


def find_encoder(
    open_blob: OpenStream,
    open_tar: OpenStream,
    blob_digest: str,
    sniff: Sniff,
    only: str | None = None,
) -> Match | NoMatch:
    """Find an encoder that regenerates the blob exactly from its tar.

    open_blob/open_tar open fresh streams of the compressed blob and of its tar;
    blob_digest is "sha256:<hex>" or "<hex>". Screens candidates on a tar prefix,
    then proves a survivor by full recompression and sha256 comparison."""
    found = shortlist(open_blob, open_tar, sniff, only)
    return found if isinstance(found, NoMatch) else prove(found, open_tar, blob_digest)


def shortlist(
    open_blob: OpenStream, open_tar: OpenStream, sniff: Sniff, only: str | None = None
) -> Shortlist | NoMatch:
    """Screen the candidates (only the encoder of id `only`, if given) on a prefix of the
    tar: cheap, and nothing survives for a blob no encoder here could make. Reads only the
    start of the tar, except for a zstd frame that does not record its content size (then
    the tar's length is needed)."""
    if sniff.kind == "tar":
        return Shortlist((), identity=True)
    if sniff.kind == "gzip":
        trials = _gzip_trials(open_blob, sniff)
    elif sniff.kind == "zstd":
        trials = _zstd_trials(open_blob, open_tar)
    else:
        return NoMatch(f"blob kind {sniff.kind!r} has no encoder")
    if isinstance(trials, NoMatch):
        return trials
    if only is not None:
        trials = [(target, [e for e in found if e.encoder_id == only]) for target, found in trials]
    with open_tar() as tar:
        tar_prefix = tar.read(SCREEN_STAGES[-1])
    screened = tuple(_screen(candidates, target, tar_prefix) for target, candidates in trials)
    if not any(trial.screened or trial.unscreened for trial in screened):
        return NoMatch(_no_match_reason(screened))
    return Shortlist(screened)


def shortlist_of(encoder: Encoder, params: bytes) -> Shortlist:
    """A shortlist of one encoder matched already (on parts of the blob: each frame of a
    multi-frame zstd layer), for `prove` to settle on the whole blob."""
    target = _Target(b"", False, params, b"", b"")
    return Shortlist((_Trial(target, [encoder], [], [encoder], []),))


def prove(found: Shortlist, open_tar: OpenStream, blob_digest: str) -> Match | NoMatch:
    """Recompress the whole tar with the shortlisted encoders, best guess first, until one
    reproduces the blob's sha256. `open_tar` may be a rebuild of the tar from stored
    files: then a match also proves that rebuild."""
    digest = _hex_digest(blob_digest)
    if found.identity:
        if _full_digest(None, None, open_tar)[0] == digest:
            return Match(IDENTITY_ID, b"")
        return NoMatch("the tar does not hash to the blob digest")
    tried: list[Encoder] = []
    for trial in found.trials:
        for encoder in trial.screened:
            tried.append(encoder)
            if _tried_digest(encoder, trial.target, open_tar)[0] == digest:
                return Match(encoder.encoder_id, trial.target.params)
    spent = 0
    for trial in found.trials:
        for encoder in trial.unscreened:
            if spent >= UNSCREENED_BUDGET_BYTES:
                break
            tried.append(encoder)
            produced, tar_bytes = _tried_digest(encoder, trial.target, open_tar)
            if produced == digest:
                return Match(encoder.encoder_id, trial.target.params)
            spent += tar_bytes
    return NoMatch(_no_match_reason(found.trials, tried))


def _tried_digest(encoder: Encoder, target: _Target, open_tar: OpenStream) -> tuple[str, int]:
    """_full_digest, where a helper that fails on this tar simply does not reproduce it."""
    try:
        return _full_digest(encoder, target, open_tar)
    except HelperFailedError:
        return "", 0


def _hex_digest(digest: str) -> str:
    return digest.removeprefix("sha256:").lower()


def _gzip_trials(
    open_blob: OpenStream, sniff: Sniff
) -> list[tuple[_Target, list[Encoder]]] | NoMatch:
    head_len = SCREEN_STAGES[-1] + 64 * 1024
    with open_blob() as blob:
        head = blob.read(head_len)
        trailer = _read_tail(blob, head, GZIP_TRAILER_LEN)
    header_len = gzip_header_length(head)
    if header_len is None or not head.startswith(GZIP_MAGIC):
        return NoMatch("malformed gzip header")
    whole = len(head) < head_len
    payload = head[header_len : len(head) - GZIP_TRAILER_LEN] if whole else head[header_len:]
    header = head[:header_len]
    params = encode_gzip_params(header, trailer)
    return [(_Target(payload, whole, params, header, trailer), _ordered_gzip_candidates(sniff))]


def _read_tail(stream: BinaryIO, head: bytes, n: int) -> bytes:
    """The last n bytes of a stream whose first bytes `head` were already read."""
    if stream.seekable():
        stream.seek(0, os.SEEK_END)
        if stream.tell() >= n:
            stream.seek(-n, os.SEEK_END)
            return stream.read(n)
    tail = head[-n:]
    for chunk in iter_chunks(stream):
        tail = (tail + chunk)[-n:]
    return tail


def _ordered_gzip_candidates(sniff: Sniff) -> list[Encoder]:
    """The gzip encoders that could have written this header: the producer family the
    header suggests first, and within a family the level XFL suggests first."""
    family_order = {
        "go-stdlib": ("gzip/go", "gzip/zlib", "gzip/pgzip"),
        "pgzip": ("gzip/pgzip", "gzip/go", "gzip/zlib"),
        "gnu-gzip": ("gzip/gnu", "gzip/pigz", "gzip/zlib"),
    }.get(sniff.producer_hint or "", ("gzip/zlib", "gzip/go", "gzip/pgzip", "gzip/gnu"))
    preferred_level = {2: 9, 4: 1}.get(sniff.xfl or 0)

    def rank(encoder: Encoder) -> tuple[int, int]:
        family = next(
            (i for i, prefix in enumerate(family_order) if encoder.encoder_id.startswith(prefix)),
            len(family_order),
        )
        level_bonus = 0 if getattr(encoder, "level", None) == preferred_level else 1
        return family, level_bonus

    candidates = [
        e for e in gzip_encoders() if _xfl_consistent(e, sniff.xfl) and _os_consistent(e, sniff.os)
    ]
    return sorted(candidates, key=rank)


def _xfl_consistent(encoder: Encoder, xfl: int | None) -> bool:
    """Go and pgzip write their own header: XFL is 2 exactly for level 9 and 4 exactly
    for level 1. zlib users (Python, Java, zlib's wrapper) set XFL in other ways."""
    if not isinstance(encoder, GoStdlibEncoder | PgzipEncoder | GzipProgramEncoder):
        return True
    return {9: 2, 1: 4}.get(encoder.level, 0) == xfl


def _os_consistent(encoder: Encoder, os_code: int | None) -> bool:
    """GNU gzip and pigz write their own header, with OS 3 (Unix)."""
    return not isinstance(encoder, GzipProgramEncoder) or os_code == GZIP_OS_UNIX


def _zstd_trials(
    open_blob: OpenStream, open_tar: OpenStream
) -> list[tuple[_Target, list[Encoder]]] | NoMatch:
    head_len = SCREEN_STAGES[-1] + 64 * 1024
    with open_blob() as blob:
        head = blob.read(head_len)
        tail = _read_tail(blob, head, ZSTD_CHUNKED_FOOTER_LEN)
    frame = parse_zstd_frame_header(head)
    if frame is None:
        return NoMatch("malformed zstd frame header")
    if frame.dict_id:
        return NoMatch(f"zstd frame uses dictionary {frame.dict_id}")
    whole = len(head) < head_len
    if is_zstd_chunked(tail):  # many frames and a table of contents: no one-frame encoder
        chunked: list[Encoder] = [e for e in zstd_encoders() if isinstance(e, ZstdChunkedEncoder)]
        return [(_Target(head, whole, b"", b"", b""), chunked)]
    tar_size = frame.content_size if frame.content_size is not None else _stream_size(open_tar)
    encoders = zstd_encoders()
    candidates: list[Encoder] = [  # the one-frame encoders with libzstd's framing
        encoder
        for encoder in encoders
        if not isinstance(encoder, KlauspostZstdEncoder | ZstdChunkedEncoder)
        and not (_mode(encoder) == "oneshot" and tar_size > ZSTD_ONESHOT_MAX)
    ]  # fmt: skip
    # A compressor that does not know the size uses its level's own window; one-shot
    # compression always knows the size.
    trials: list[tuple[_Target, list[Encoder]]] = [
        (
            _Target(head, whole, options.encode(), b"", b""),
            [
                e
                for e in candidates
                if (options.pledged_size >= 0 or _mode(e) != "oneshot")
                and _zstd_window_fits(
                    e, frame.window_size, frame.single_segment, max(options.pledged_size, 0)
                )
            ],
        )
        for options in _zstd_option_guesses(frame.checksum, frame.content_size, tar_size)
    ]
    # klauspost streams a frame without a content size, with its level's window; small
    # inputs (one block, no split) go through EncodeAll, which writes both sizes.
    klauspost: list[Encoder] = [
        encoder
        for encoder in encoders
        if isinstance(encoder, KlauspostZstdEncoder)
        and (frame.content_size is not None
             or frame.window_size == KLAUSPOST_WINDOWS[encoder.speed])
    ]  # fmt: skip
    if klauspost:
        trials += [
            (_Target(head, whole, KlauspostOptions(frame.checksum, first).encode(), b"", b""),
             klauspost)
            for first in KLAUSPOST_FIRST_WRITES
        ]  # fmt: skip
    return trials


def _mode(encoder: Encoder) -> str | None:
    return encoder.mode if isinstance(encoder, ZstdEncoder) else None


def _zstd_option_guesses(
    checksum: bool, content_size: int | None, tar_size: int
) -> list[ZstdOptions]:
    if content_size is not None:
        return [ZstdOptions(checksum, True, content_size)]
    # No size in the header: the size was unknown, or known but not written.
    return [ZstdOptions(checksum, True, -1), ZstdOptions(checksum, False, tar_size)]


def _zstd_window_fits(
    encoder: Encoder, window: int | None, single_segment: bool, size: int
) -> bool:
    """Whether the encoder at its level writes this window for a source of `size` bytes
    (0: unknown to the compressor)."""
    from pipelines.encoders.zstd_cli import ZstdCliEncoder

    if isinstance(encoder, ZstdCliEncoder) and not (single_segment or window is None):
        return window == 1 << encoder.window_log(size or None)
    if single_segment or window is None or not isinstance(encoder, ZstdEncoder):
        return True
    params = zstandard.ZstdCompressionParameters.from_level(encoder.level, source_size=size)
    return bool(1 << params.window_log == window)


def _stream_size(open_stream: OpenStream) -> int:
    with open_stream() as stream:
        return sum(len(chunk) for chunk in iter_chunks(stream))


def _screen(candidates: list[Encoder], target: _Target, tar_prefix: bytes) -> _Trial:
    available = [e for e in candidates if e.unavailable_reason() is None]
    skipped = sorted({r for e in candidates if (r := e.unavailable_reason())})
    screened: list[Encoder] = []
    unscreened: list[Encoder] = []
    whole = len(tar_prefix) < SCREEN_STAGES[-1] and target.prefix_is_whole
    for encoder in available:
        if whole:  # a small blob: compare all of it, which no prefix screen can match
            rejected = _prescreen_rejects(encoder, tar_prefix, target)
            verdict = "reject" if rejected else _whole_verdict(encoder, tar_prefix, target)
        else:
            verdict = _screen_verdict(encoder, tar_prefix, target)
            if verdict == "unscreened" and _prescreen_rejects(encoder, tar_prefix, target):
                verdict = "reject"
        if verdict == "pass":
            screened.append(encoder)
        elif verdict == "unscreened":
            unscreened.append(encoder)
    return _Trial(target, screened, unscreened, available, skipped)


def _prescreen_rejects(encoder: Encoder, tar_prefix: bytes, target: _Target) -> bool:
    """Whether the first bytes the encoder would write already contradict the blob:
    a cheap rejection before a full trial."""
    produced = encoder.prescreen(tar_prefix, target.params)
    return produced is not None and not _is_prefix_of_payload(produced, target)


def _whole_verdict(encoder: Encoder, tar: bytes, target: _Target) -> str:
    """Small blobs: the whole tar and blob are at hand, so compare them outright."""
    try:
        produced = b"".join(encoder.body([tar], target.params))
    except HelperFailedError:
        return "reject"
    return "pass" if produced == target.payload_prefix else "reject"


def _screen_verdict(encoder: Encoder, tar_prefix: bytes, target: _Target) -> str:
    """ "reject" if a produced prefix contradicts the blob, "pass" if one agreed,
    "unscreened" if the encoder cannot be judged on a prefix."""
    verdict = "unscreened"
    for stage in SCREEN_STAGES:
        produced = encoder.screen(tar_prefix[:stage], target.params)
        if produced is None:
            continue
        if not _is_prefix_of_payload(produced, target):
            return "reject"
        verdict = "pass"
        # The first stage never concludes: pigz writes zlib's very bytes up to its first
        # 128 KiB block's end (and pigz with larger blocks pigz's).
        conclusive = len(produced) >= SCREEN_CONCLUSIVE_BYTES and stage > SCREEN_STAGES[0]
        if stage >= len(tar_prefix) or conclusive:
            break
    return verdict


def _is_prefix_of_payload(produced: bytes, target: _Target) -> bool:
    if len(produced) > len(target.payload_prefix) and target.prefix_is_whole:
        return False
    return target.payload_prefix.startswith(produced[: len(target.payload_prefix)])


def _full_digest(
    encoder: Encoder | None, target: _Target | None, open_tar: OpenStream
) -> tuple[str, int]:
    """sha256 of the blob the encoder makes from the whole tar (of the tar itself when
    there is no encoder), and the tar's size."""
    digest = hashlib.sha256(target.frame_before if target else b"")
    tar_bytes = 0

    def counted(chunks: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal tar_bytes
        for chunk in chunks:
            tar_bytes += len(chunk)
            yield chunk

    with open_tar() as tar:
        tar_chunks = counted(iter_chunks(tar))
        produced = tar_chunks if encoder is None else encoder.body(tar_chunks, _params(target))
        for chunk in produced:
            digest.update(chunk)
    digest.update(target.frame_after if target else b"")
    return digest.hexdigest(), tar_bytes


def _params(target: _Target | None) -> bytes:
    return target.params if target else b""


def _no_match_reason(trials: Sequence[_Trial], proven_wrong: Sequence[Encoder] = ()) -> str:
    available = list(dict.fromkeys(e.encoder_id for trial in trials for e in trial.available))
    skipped = sorted({reason for trial in trials for reason in trial.skipped})
    if not available and not skipped:
        return "no encoder here can write this framing (e.g. its zstd window and size)"
    reason = f"no candidate reproduces the blob: tried {_summarise_ids(available)}"
    if proven_wrong:
        passed = _summarise_ids(list(dict.fromkeys(e.encoder_id for e in proven_wrong)))
        reason += f"; recompressed in full but digest differs: {passed}"
    if skipped:
        reason += f"; unavailable: {'; '.join(skipped)}"
    return reason


def _summarise_ids(ids: list[str]) -> str:
    """'gzip/go1.26/{6,1,9}' style grouping of encoder ids by everything but the level."""
    groups: dict[str, list[str]] = {}
    for encoder_id in ids:
        family, _, level = encoder_id.rpartition("/")
        groups.setdefault(family, []).append(level)
    return ", ".join(f"{family}/{{{','.join(levels)}}}" for family, levels in groups.items())
