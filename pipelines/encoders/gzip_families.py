"""The gzip encoder families: stock zlib (and the check that the runtime's zlib is
stock), Go's standard library, pgzip, GNU gzip and pigz.

The gzip header and the 8-byte trailer are kept verbatim in `encoder_params`; the encoder
regenerates the deflate body between them. Go encoders run as small helper binaries
(pipelines/encoders/gohelpers) found in $DUPHUNTER_HELPER_DIR; GNU gzip and pigz are the
pinned programs of pipelines/encoders/programs.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipelines.encoders.base import (
    FEED_CHUNK,
    Encoder,
    describe_helper,
    helper_dir,
    program_version,
    rechunk,
    run_filter,
)
from pipelines.encoders.libz import deflate_boundaries, zlib_segment
from pipelines.encoders.segment_helpers import run_segment_helper
from pipelines.formats import Pieces, total_length
from pipelines.formats.codecs import GZIP_MAGIC

GZIP_TRAILER_LEN = 8
# pgzip closes the stream after the screened prefix: ignore that many final bytes.
PGZIP_CLOSE_MARGIN = 64
PGZIP_BLOCK_SIZES = (1 << 20, 256 << 10)  # containers/image (skopeo...), umoci
PGZIP_TAIL = 16 * 1024  # pgzip primes each block with this much of the previous one
GO_CHUNK = 65535  # Go's chunk-wise encoders (BestSpeed; Go >= 1.27 levels 1-6)
STOCK_ZLIB_FAMILY = "1.2.13"


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
        self, history: Pieces, data: Pieces, lookahead: Pieces, *, offset: int, final: bool,
        align: int,
    ) -> memoryview:  # fmt: skip
        return zlib_segment(self.level, history, data, lookahead, final, align)


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
        self, history: Pieces, data: Pieces, lookahead: Pieces, *, offset: int, final: bool,
        align: int,
    ) -> memoryview:  # fmt: skip
        argv = [*self._argv("segment"), "-history", str(total_length(history))]
        argv += ["-align", str(align), "-offset", str(offset)]
        argv += ["-final"] if final else []
        return run_segment_helper(argv, [*history, *data, *lookahead])


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

    # Blocks are independent by design: each is primed with the previous one's tail.
    history_bytes = PGZIP_TAIL

    def resumable_at(self, tar_offset: int) -> bool:
        return tar_offset % self.block_size == 0

    def encode_segment(
        self, history: Pieces, data: Pieces, lookahead: Pieces, *, offset: int, final: bool,
        align: int,
    ) -> memoryview:  # fmt: skip
        if align:
            raise ValueError("pgzip blocks start on a byte boundary")
        argv = [*self._argv()[:-2], "-mode", "segment", "-history", str(total_length(history))]
        argv += ["-final"] if final else []
        return run_segment_helper(argv, [*history, *data])


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
