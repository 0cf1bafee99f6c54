"""The zstd command line program as an encoder: `zstd` 1.5.4, pinned and built from
Debian's libzstd source by pipelines/encoders/programs/build.sh.

The CLI compresses with one worker thread by default (`-T1`), and a job-based frame
from workers does not depend on their number: `-T0` writes the same bytes. A file's
size is pledged (and written in the frame header); `--stream-size=N` makes a pipe behave
as a file of N bytes. Ids: `zstd/cli-1.5.4/level{3,19}[-long|-single]` (the default,
`-19`, `--long`, that is `--long=27`; `--single-thread`, which compresses in the calling
thread with libzstd's plain streaming and writes other bytes than `-T1`: what pzstd
writes for each of its frames, see pipelines.encoders.zstd_frames).

Screening: the frame made of a prefix agrees with the whole one except in its last
block, so the output is compared up to the start of its last block.
With a pledged size longer than the prefix the CLI stops with "Src size is incorrect"
after writing the blocks before the prefix's end: exactly what the screen compares. How many
of them it wrote depends on timing (the workers' progress), never which bytes: the screen
turns off its asynchronous writer thread (`--no-asyncio`), as exit() on that error flushed
stdout concurrently with the thread's fwrite and wrote 4 KiB twice when the thread was
slow (a loaded host, a reader that lags).
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipelines.encoders.base import Encoder, helper_dir, program_version, run_filter
from pipelines.encoders.zstd_families import ZstdOptions
from pipelines.formats.codecs import parse_zstd_frame_header

ZSTD_CLI_VERSION = "1.5.4"
ZSTD_CLI_LEVELS = (3, 19)  # the CLI's default and -19
LONG_WINDOW_LOG = 27  # --long without a number


class ZstdCliEncoder(Encoder):
    """`zstd -LEVEL [--long]`, with the frame options the header shows. A whole layer is
    encoded with a worker per CPU (`-T<n>`: the same bytes as the CLI's default `-T1`,
    sooner; `-T0` would count physical cores only); a screened prefix with `-T1`, which
    writes every block before a short input's error."""

    def __init__(self, level: int, long: bool, single_thread: bool = False) -> None:
        if long and single_thread:
            raise ValueError("no --long --single-thread encoder is registered")
        self.level = level
        self.long = long
        self.single_thread = single_thread
        suffix = "-long" if long else "-single" if single_thread else ""
        self.encoder_id = f"zstd/cli-{ZSTD_CLI_VERSION}/level{level}{suffix}"

    @property
    def helper(self) -> Path:
        return helper_dir() / f"zstd-cli-{ZSTD_CLI_VERSION}"

    def unavailable_reason(self) -> str | None:
        version = program_version(self.helper)
        if version is None:
            build = "pipelines/encoders/programs/build.sh"
            return f"program {self.helper} is missing or broken (run {build})"
        if f" v{ZSTD_CLI_VERSION}," not in version:
            return f"program {self.helper} is {version!r}, not zstd {ZSTD_CLI_VERSION}"
        return None

    def _argv(self, options: ZstdOptions, threads: int = 0) -> list[str]:
        workers = threads or os.cpu_count() or 1
        threading = "--single-thread" if self.single_thread else f"-T{workers}"
        argv = [str(self.helper), "-q", "-c", f"-{self.level}", threading]
        argv += ["--long"] if self.long else []
        argv += [] if options.checksum else ["--no-check"]
        argv += [] if options.write_content_size else ["--no-content-size"]
        if options.pledged_size >= 0:
            argv.append(f"--stream-size={options.pledged_size}")
        return argv

    def body(self, tar_chunks: Iterable[bytes], params: bytes) -> Iterator[bytes]:
        return run_filter(self._argv(ZstdOptions.decode(params)), tar_chunks)

    def screen_argv(self, params: bytes) -> list[str]:
        """What `screen` runs on a prefix: one worker, and writes from the main thread
        (`--no-asyncio`: what it wrote before the error is then a prefix of the frame)."""
        return [*self._argv(ZstdOptions.decode(params), threads=1), "--no-asyncio"]

    def screen(self, tar_prefix: bytes, params: bytes) -> bytes | None:
        options = ZstdOptions.decode(params)
        out = bytearray()
        try:
            for chunk in run_filter(self.screen_argv(params), [tar_prefix]):
                out += chunk
        except RuntimeError:
            if options.pledged_size <= len(tar_prefix):
                raise  # a whole input must compress without an error
        frame = bytes(out)
        if parse_zstd_frame_header(frame) is None:
            return None  # it stopped before writing its frame's header: nothing to judge
        return frame[: _last_block_start(frame)]

    def window_log(self, source_size: int | None) -> int:
        """The window log the CLI writes in the frame header for this input size (None:
        unknown to it). A single-segment frame writes none."""
        if self.long:
            if source_size is None:
                return LONG_WINDOW_LOG
            return min(LONG_WINDOW_LOG, max((source_size - 1).bit_length(), 10))
        return _level_window_log(self.level, source_size or 0)


def _last_block_start(frame: bytes) -> int:
    """Where the last complete block of a (possibly unfinished) frame starts: the part
    before it does not depend on where the input ended (RFC 8878 3.1.1.2)."""
    header = parse_zstd_frame_header(frame)
    if header is None:
        return 0
    position = last = header.header_len
    while position + 3 <= len(frame):
        (word,) = struct.unpack("<I", frame[position : position + 3] + b"\0")
        kind, size = (word >> 1) & 3, word >> 3
        end = position + 3 + (1 if kind == 1 else size)
        if end > len(frame):
            break
        last, position = position, end
        if word & 1:
            break
    return last


@functools.cache
def _level_window_log(level: int, source_size: int) -> int:
    import zstandard  # the level tables of libzstd 1.5 (unchanged since 1.5.0)

    return int(
        zstandard.ZstdCompressionParameters.from_level(level, source_size=source_size).window_log
    )


def zstd_cli_encoders() -> list[Encoder]:
    encoders: list[Encoder] = [
        ZstdCliEncoder(level, long) for level in ZSTD_CLI_LEVELS for long in (False, True)
    ]
    return encoders + [ZstdCliEncoder(level, False, True) for level in ZSTD_CLI_LEVELS]
