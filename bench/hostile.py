"""Adversarial layers (most of about 1 MB that decompress to much more, one of random
bytes larger than any process may hold) and the peak memory of a stack's processes while
they go through it (for tests/ingest/test_memory_bounds.py and `make bench-memory`)."""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import zstandard

from deploy.stack import Stack
from pipelines.encoders.base import FEED_CHUNK, rechunk

MIB = 1 << 20
ZEROS = bytes(MIB)
SERVICES = ("api", "worker-")  # the processes a layer goes through (not Redis nor S3)


def tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 1_700_000_000, 0o644
    return info.tobuf(format=tarfile.GNU_FORMAT)


def gzip_bomb() -> tuple[bytes, int]:
    """A tar holding one file of 1 GiB of zeros, gzip'd by zlib (about 1 MB); the blob
    and the tar's size. Nothing of 1 GiB is ever held here."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    parts = [compressor.compress(tar_header("zeros", 1 << 30))]
    parts += [compressor.compress(ZEROS) for _ in range(1024)]
    parts += [compressor.compress(bytes(1024)), compressor.flush()]
    return b"".join(parts), 512 + (1 << 30) + 1024


def zstd_padded() -> tuple[bytes, int]:
    """A small tar followed by 512 MiB of zero blocks, zstd-compressed as libzstd
    streams it (about 32 KB)."""
    tar = tar_header("etc/hostname", 9) + b"registry\n" + bytes(503) + bytes(1024)
    compressor = zstandard.ZstdCompressor(level=3).compressobj()

    def tar_chunks() -> Iterator[bytes]:
        yield tar
        yield from (ZEROS for _ in range(512))

    parts = [compressor.compress(chunk) for chunk in rechunk(tar_chunks(), FEED_CHUNK)]
    return b"".join(parts) + compressor.flush(), len(tar) + 512 * MIB


def zstd_frames_with_skippable() -> tuple[bytes, int]:
    """A tar of one 512 MiB file of zeros cut into 8 MiB frames (as parallel compressors
    write them), a skippable frame after every fourth (about 1 MB)."""
    tar_size = 512 + 512 * MIB + 1024
    compressor = zstandard.ZstdCompressor(level=3)
    parts = []
    for number, piece in enumerate(rechunk(_zeros_tar(512 * MIB), 8 * MIB)):
        parts.append(compressor.compress(piece))
        if number % 4 == 3:
            parts.append(skippable_frame(b"parallel compressor metadata"))
    return b"".join(parts), tar_size


def zstd_1_gib_window() -> tuple[bytes, int]:
    """A tar of 512 MiB of zeros in one frame that declares a 1 GiB window (as `zstd
    --long=30` from a pipe does): above the default cap, so it is kept intact."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=30)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    parts = [compressor.compress(chunk) for chunk in _zeros_tar(512 * MIB)]
    return b"".join(parts) + compressor.flush(), 512 + 512 * MIB + 1024


def random_file(size: int) -> tuple[bytes, int]:
    """A tar holding one file of `size` random bytes, gzip'd at level 1: a layer as large
    as its content, larger than what any process may hold."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [compressor.compress(tar_header("random", size))]
    parts += [compressor.compress(os.urandom(MIB)) for _ in range(size // MIB)]
    parts += [compressor.compress(bytes(1024)), compressor.flush()]
    return b"".join(parts), 512 + size + 1024


def _zeros_tar(size: int) -> Iterator[bytes]:
    """A tar of one file of `size` zeros (a multiple of 1 MiB), in 1 MiB pieces."""
    yield tar_header("zeros", size)
    yield from (ZEROS for _ in range(size // MIB))
    yield bytes(1024)


def skippable_frame(payload: bytes) -> bytes:
    return (0x184D2A50).to_bytes(4, "little") + len(payload).to_bytes(4, "little") + payload


def tiny_files(count: int = 100_000) -> tuple[bytes, int]:
    """A tar of `count` distinct tiny files, gzip'd (a few MB)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for number in range(count):
            data = b"%d\n" % number
            info = tarfile.TarInfo(f"d{number % 100}/f{number}")
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(buffer.getvalue()) + compressor.flush(), len(buffer.getvalue())


# --------------------------------------------------------------------------- peak memory


@dataclass(frozen=True)
class Process:
    service: str
    pid: int


def stack_processes(stack: Stack) -> list[Process]:
    """The API and worker processes of the stack, their children (gunicorn and Celery
    workers do the work in them) included."""
    found: list[Process] = []
    for name, process in stack.processes:
        if name.startswith(SERVICES) and process.poll() is None:
            found += [Process(name, pid) for pid in _family(process.pid)]
    return found


def _family(pid: int) -> list[int]:
    """The Python processes among `pid` and its descendants: the encoder programs a
    worker runs for a moment (zstd, Go helpers) are not the process measured."""
    family, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            if "python" in os.readlink(f"/proc/{current}/exe"):
                family.append(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # it exited meanwhile
            continue
    return family


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"{field} of {pid}")


class PeakGrowth:
    """How far each process's peak resident memory rose above what it held when the
    measure started (the kernel's high-water mark is reset then)."""

    def __init__(self, processes: list[Process]) -> None:
        self.processes = processes
        for process in processes:
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.start = {process.pid: _status(process.pid, "VmRSS") for process in processes}

    def growth(self) -> dict[Process, int]:
        return {p: _status(p.pid, "VmHWM") - self.start[p.pid] for p in self.processes}


@dataclass(frozen=True)
class HostileLayer:
    make: Callable[[], tuple[bytes, int]]  # the blob and its tar's size
    zstd_window: int = 0  # the window its frames declare, when it is decoded
    kept_intact_because: str = ""  # a word of the reason it is not deduplicated, if not


LAYERS: dict[str, HostileLayer] = {
    "gzip bomb (1 GiB of zeros)": HostileLayer(gzip_bomb),
    # 2 MiB: libzstd level 3 on input of unknown or large size
    "zstd, 512 MiB of zero blocks after the tar": HostileLayer(zstd_padded, 2 * MIB),
    "zstd, 64 frames of 512 MiB of zeros, skippable frames between": HostileLayer(
        zstd_frames_with_skippable, 2 * MIB
    ),
    "zstd, one frame declaring a 1 GiB window": HostileLayer(
        zstd_1_gib_window, kept_intact_because="DUPHUNTER_ZSTD_MAX_WINDOW"
    ),
    "100,000 tiny files": HostileLayer(tiny_files),
    "256 MiB file of random bytes": HostileLayer(partial(random_file, 256 * MIB)),
}
