"""The base of every encoder: the `Encoder` interface, what finding one returns
(`Match`, `NoMatch`), and the plumbing of the helper processes encoders run (`run_filter`,
the helpers' directory and versions, the CPU they cost).

A layer blob can drop its compressed bytes only if an encoder regenerates them exactly
from the tar. Every encoder has an immutable, versioned id that recipes store forever; an
id always names one exact output for a given input and params.
"""

from __future__ import annotations

import contextlib
import functools
import io
import mmap
import os
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from pipelines.formats import Buffer, Pieces, total_length

PIPE_CHUNK = 256 * 1024
# Stock zlib's stored blocks (level 0) depend on how input is fed: always feed this much.
FEED_CHUNK = 64 * 1024


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


def run_segment_helper(argv: Sequence[str], parts: Pieces) -> memoryview:
    """A Go segment helper's output for `parts` (history, data, ...), fed in order; told
    their total size (`-size`) to read them into one buffer. Input, output and errors go
    through memory files, not pipes: no feeding or draining threads per segment, and
    the output is mapped, not copied (the view is writable: its edges are masked in
    place; the helper's file is not changed)."""
    size = total_length(parts)
    with (
        _input_file(parts, size) as given,
        _memory_file("output") as output,
        _memory_file("errors") as errors,
    ):
        command = [*argv, "-size", str(size)]
        proc = subprocess.Popen(
            command, stdin=given, stdout=output, stderr=errors, env=segment_helper_env()
        )
        returncode = _reap(proc)
        if returncode != 0:
            message = _contents(errors).decode("utf-8", "replace").strip()
            raise HelperFailedError(f"{argv[0]} exited with {returncode}: {message}")
        return _mapped(output)


def _memory_file(name: str) -> BinaryIO:
    """An anonymous file in memory (memfd), open for reading and writing."""
    return open(os.memfd_create(name, os.MFD_CLOEXEC), "w+b")


class SpareFiles:
    """Memory files kept for the next segments' inputs. A segment's input written into a
    new memory file costs the kernel a fresh page per 4 KiB, zeroed, then freed: 2.8 ms
    per 4 MiB against 0.6 into a file whose pages are there. At most `count` are kept
    (idle, what a process holds), each only while it is at most SPARE_FILE_BYTES. (The
    output's file is not kept: it is mapped and read until the segment is sent, and
    kept for that long, it was seldom free for the next one; no gain was measured.)"""

    def __init__(self, name: str, count: int) -> None:
        self.name, self.count = name, count
        self._kept: list[int] = []
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            if self._kept:
                return self._kept.pop()
        return os.memfd_create(self.name, os.MFD_CLOEXEC)

    def give_back(self, descriptor: int, size: int) -> None:
        """Keep the file for another segment, or close it."""
        with self._lock:
            if size <= SPARE_FILE_BYTES and len(self._kept) < self.count:
                self._kept.append(descriptor)
                return
        os.close(descriptor)

    def sizes(self) -> list[int]:
        with self._lock:
            return [os.fstat(descriptor).st_size for descriptor in self._kept]

    def forget(self) -> None:
        with self._lock:
            for descriptor in self._kept:
                os.close(descriptor)
            self._kept.clear()


SPARE_FILE_BYTES = 12 << 20
SPARE_INPUTS = SpareFiles("input", os.cpu_count() or 2)


@contextlib.contextmanager
def _input_file(parts: Pieces, size: int) -> Iterator[BinaryIO]:
    """A memory file holding exactly `parts`, at offset 0: a kept one if there is one."""
    descriptor = SPARE_INPUTS.take()
    try:
        os.ftruncate(descriptor, size)
        with open(descriptor, "w+b", closefd=False) as given:
            given.seek(0)  # where the last helper's reads left the shared offset
            for part in parts:
                given.write(part)
            given.flush()
            given.seek(0)
            yield given
    except BaseException:
        os.close(descriptor)
        raise
    SPARE_INPUTS.give_back(descriptor, size)


def _contents(file: BinaryIO) -> bytes:
    file.seek(0)
    return file.read()


def _mapped(file: BinaryIO) -> memoryview:
    """All a file holds, mapped copy-on-write: reading it costs no copy and, pages being
    mapped many at a time, few faults."""
    size = os.fstat(file.fileno()).st_size
    if not size:
        return memoryview(bytearray())
    return memoryview(mmap.mmap(file.fileno(), size, flags=mmap.MAP_PRIVATE))


def run_filter(
    argv: Sequence[str], chunks: Iterable[Buffer], env: dict[str, str] | None = None
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
    chunks: Iterable[Buffer],
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
        self, history: Pieces, data: Pieces, lookahead: Pieces, *, offset: int, final: bool,
        align: int,
    ) -> memoryview:  # fmt: skip
        """The payload's bits from a block boundary on, encoding `data` as the stream
        does after `history`: the whole rest of the stream if `final`, else at least up
        to the block boundary after `data` (seeing `lookahead`, the input past it).
        `offset` is the boundary's offset in the tar. The output starts with `align`
        zero bits: the boundary's place in its byte (stored blocks pad to a byte
        boundary of the whole stream). The view is writable and the caller's: it masks
        the edges in place."""
        raise EncoderUnavailableError(f"{self.encoder_id} cannot resume mid-stream")


@functools.cache
def program_version(path: Path) -> str | None:
    """The first line of `program --version`, or None if it cannot run."""
    try:
        done = subprocess.run([str(path), "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (done.stdout or done.stderr).decode("utf-8", "replace").splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None
