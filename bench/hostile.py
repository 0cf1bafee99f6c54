"""Adversarial layers of about 1 MB that decompress to much more, and the peak memory
of a stack's processes while they go through it (for tests/test_memory_bounds.py and
`make bench-memory`)."""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from deploy.stack import Stack
from pipelines.encoders import FEED_CHUNK, rechunk

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


# name -> the blob and its tar's size
LAYERS: dict[str, Callable[[], tuple[bytes, int]]] = {
    "gzip bomb (1 GiB of zeros)": gzip_bomb,
    "zstd, 512 MiB of zero blocks after the tar": zstd_padded,
    "100,000 tiny files": tiny_files,
}
# The windows these layers' frames declare (2 MiB: libzstd level 3, size unknown).
ZSTD_WINDOW = {"zstd, 512 MiB of zero blocks after the tar": 2 * MIB}
