"""The host's cores, shared by the segment encoders of every process on it.

A restore re-encodes segments on one core each. The API runs several processes (and a
restore worker may run beside them), each with as many segment threads as there are
cores: left to themselves, two processes restoring at once would run twice as many
encoders as the host has cores. `HostCores` hands out one core per encoder across
every process that names the same directory: a core is an exclusive `flock` on one file
of that directory, so the kernel takes it back from a process that dies holding it
(kill -9 included); nothing has to notice the death.

Waiting is in two stages. A process's own threads queue on a semaphore of `count`
first, so at most `count` of them look for a core at a time. Those then queue on the
directory's `queue` file (a blocking flock): only the first waiter of the whole host
polls the core files, every POLL_SECONDS, and takes the first one freed; the others
sleep in the kernel. A core freed while waiters queue goes to one of them within
POLL_SECONDS (a segment's encoding takes 10-200 ms).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.config import HOST_CORES

POLL_SECONDS = 0.002


class HostCores:
    """At most `count` holders at a time: among this process's threads, and, given a
    `directory`, among every process of the host that uses it."""

    def __init__(self, directory: Path | None = None, count: int = HOST_CORES) -> None:
        self.directory = directory
        self.count = count
        self._local = threading.BoundedSemaphore(count)
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """One core, held for the block."""
        with self._local:
            if self.directory is None:
                yield
                return
            descriptor = self._take(self.directory)
            try:
                yield
            finally:
                os.close(descriptor)  # and with it the flock

    def _take(self, directory: Path) -> int:
        with _locked(directory / "queue"):
            while True:
                for number in range(self.count):
                    descriptor = _try_lock(directory / f"core-{number}")
                    if descriptor is not None:
                        return descriptor
                time.sleep(POLL_SECONDS)


def _try_lock(path: Path) -> int | None:
    """A descriptor of `path` holding its exclusive flock, or None if another holds it.
    Each attempt opens the file anew: a flock belongs to an open file, and two threads of
    one process must not share a core through one descriptor."""
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
