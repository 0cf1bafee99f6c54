"""Large files this process fetched and checked lately, kept a short while on local disk.

A file of 8-128 MiB is cut by checkpoints into several segments, and whoever encodes a
segment needs the whole file: the ingest's proof and a restore spread over processes
would each fetch, decompress and hash it once per segment. Kept here, it is fetched and
checked once per process. Only bytes that matched the file's size and sha256 are kept;
what a restore makes of them is verified once more against the pushed digests.

Each kept file is an unnamed temporary file (nothing is left on disk if the process
dies), read with positional reads so that several threads share it; the disk it takes
is bounded by `capacity` bytes, and a file leaves `keep_seconds` after it was fetched.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

CHUNK = 1 << 20
KEPT_BYTES = 512 << 20  # of local disk, for every kept file of one process
# Larger files are read once and not kept: checkpoints never cut them (MAX_CUT_FILE_BYTES).
KEPT_FILE_LIMIT = 128 << 20
KEEP_SECONDS = 30.0  # the segments cut inside one file are encoded within seconds


@dataclass
class _Kept:
    spool: IO[bytes]
    size: int
    readers: int = 0  # reading it now: it is closed when the last one is done
    evicted: bool = False


class VerifiedFiles:
    def __init__(self, capacity: int = KEPT_BYTES, keep_seconds: float = KEEP_SECONDS) -> None:
        self.capacity, self.keep_seconds = capacity, keep_seconds
        self._kept: OrderedDict[bytes, _Kept] = OrderedDict()  # oldest first
        self._filling: dict[bytes, threading.Lock] = {}
        self._lock = threading.Lock()

    def read(
        self, digest: bytes, size: int, fetch: Callable[[], Iterator[bytes]]
    ) -> Iterator[bytes]:
        """The file's bytes: kept ones, or those of `fetch` (which must raise before it
        ends unless every byte it gave is checked), then kept for the next reader."""
        with self._filling_lock(digest):  # one fetch of a file at a time; the others wait
            kept = self._reader(digest) or self._fill(digest, size, fetch)
        try:
            yield from spool_chunks(kept.spool, kept.size)
        finally:
            self._done(kept)

    def kept_bytes(self) -> int:
        with self._lock:
            return sum(kept.size for kept in self._kept.values())

    def _filling_lock(self, digest: bytes) -> threading.Lock:
        with self._lock:
            return self._filling.setdefault(digest, threading.Lock())

    def _reader(self, digest: bytes) -> _Kept | None:
        with self._lock:
            kept = self._kept.get(digest)
            if kept is not None:
                kept.readers += 1
            return kept

    def _fill(self, digest: bytes, size: int, fetch: Callable[[], Iterator[bytes]]) -> _Kept:
        try:
            kept = _Kept(spooled(fetch), size, readers=1)  # closed by its last reader
        finally:
            with self._lock:
                self._filling.pop(digest, None)
        with self._lock:
            if size > min(self.capacity, KEPT_FILE_LIMIT):
                kept.evicted = True  # read once, never kept
                return kept
            self._kept[digest] = kept
            while sum(other.size for other in self._kept.values()) > self.capacity:
                self._evict(next(iter(self._kept)))
        timer = threading.Timer(self.keep_seconds, self._expire, args=(digest, kept))
        timer.daemon = True
        timer.start()
        return kept

    def _expire(self, digest: bytes, kept: _Kept) -> None:
        with self._lock:
            if self._kept.get(digest) is kept:
                self._evict(digest)

    def _done(self, kept: _Kept) -> None:
        with self._lock:
            kept.readers -= 1
            if kept.evicted and not kept.readers:
                kept.spool.close()

    def _evict(self, digest: bytes) -> None:
        kept = self._kept.pop(digest)
        kept.evicted = True
        if not kept.readers:
            kept.spool.close()


def spooled(fetch: Callable[[], Iterator[bytes]]) -> IO[bytes]:
    """An unnamed temporary file holding all that `fetch` gives; none if it raises."""
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - the caller's to close
    try:
        for data in fetch():
            spool.write(data)
        spool.flush()
    except BaseException:
        spool.close()
        raise
    return spool


def spool_chunks(spool: IO[bytes], size: int) -> Iterator[bytes]:
    """The spool's bytes [0, size), by positional reads: readers share the descriptor."""
    offset = 0
    while offset < size:
        data = os.pread(spool.fileno(), min(CHUNK, size - offset), offset)
        if not data:
            raise OSError(f"a kept file ends at byte {offset} of {size}")
        offset += len(data)
        yield data
