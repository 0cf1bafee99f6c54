"""The base of every encoder: the `Encoder` interface, what finding one returns
(`Match`, `NoMatch`), and the plumbing of the helper processes encoders run (`run_filter`,
the helpers' directory and versions, the CPU they cost).

A layer blob can drop its compressed bytes only if an encoder regenerates them exactly
from the tar. Every encoder has an immutable, versioned id that recipes store forever; an
id always names one exact output for a given input and params.
"""

from __future__ import annotations

import functools
import io
import os
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from pipelines.formats import Buffer, Pieces

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
