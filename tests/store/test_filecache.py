"""Large files kept on local disk after one checked fetch: fetched once for several readers,
never kept unless the fetch ended checked, bounded in disk and time, and never taken from
under a reader."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator

import pytest

from bench.rebuild_cpu import counting_gets
from pipelines.serve.checkpoints import MAX_CUT_FILE_BYTES
from pipelines.store.filecache import KEPT_FILE_LIMIT, VerifiedFiles
from pipelines.store.filestore import (
    IN_MEMORY_LIMIT,
    FileStore,
    FileStoreError,
    Packer,
    SpooledPayload,
)
from pipelines.store.index import FILES_KEY
from tests.conftest import LiveStack

FILE = os.urandom(3 << 20)
DIGEST = hashlib.sha256(FILE).digest()


class Fetches:
    """A file's fetch, counted; it may fail after its bytes, as a failed check does."""

    def __init__(self, data: bytes = FILE, fail: bool = False) -> None:
        self.data, self.fail, self.count = data, fail, 0

    def __call__(self) -> Iterator[bytes]:
        self.count += 1
        yield from (
            self.data[start : start + 100_000] for start in range(0, len(self.data), 100_000)
        )
        if self.fail:
            raise FileStoreError("does not hash to its digest")


def read(files: VerifiedFiles, fetch: Fetches, digest: bytes = DIGEST) -> bytes:
    return b"".join(files.read(digest, len(fetch.data), fetch))


def test_a_file_is_fetched_once_for_many_readers_at_once() -> None:
    files, fetch = VerifiedFiles(), Fetches()
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(read(files, fetch))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [FILE] * 8 and fetch.count == 1
    assert read(files, fetch) == FILE and fetch.count == 1


def test_a_fetch_that_fails_its_check_is_not_kept() -> None:
    files, failing = VerifiedFiles(), Fetches(fail=True)
    for attempt in (1, 2):
        with pytest.raises(FileStoreError):
            read(files, failing)
        assert failing.count == attempt and files.kept_bytes() == 0
    good = Fetches()
    assert read(files, good) == FILE and good.count == 1


def test_the_oldest_file_leaves_when_the_disk_allowed_is_full() -> None:
    files = VerifiedFiles(capacity=2 * len(FILE))
    fetches = [Fetches(os.urandom(len(FILE))) for _ in range(3)]
    digests = [hashlib.sha256(fetch.data).digest() for fetch in fetches]
    for fetch, digest in zip(fetches, digests, strict=True):
        read(files, fetch, digest)
    assert files.kept_bytes() == 2 * len(FILE)
    read(files, fetches[2], digests[2])
    read(files, fetches[0], digests[0])  # evicted by the third: fetched again
    assert [fetch.count for fetch in fetches] == [2, 1, 1]


def test_a_file_larger_than_the_disk_allowed_is_read_once_and_not_kept() -> None:
    files, fetch = VerifiedFiles(capacity=len(FILE) - 1), Fetches()
    assert read(files, fetch) == FILE and read(files, fetch) == FILE
    assert fetch.count == 2 and files.kept_bytes() == 0


def test_a_kept_file_leaves_after_its_time() -> None:
    files, fetch = VerifiedFiles(keep_seconds=0.2), Fetches()
    read(files, fetch)
    deadline = time.monotonic() + 10
    while files.kept_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert files.kept_bytes() == 0
    assert read(files, fetch) == FILE and fetch.count == 2


def test_a_reader_reads_to_the_end_of_a_file_evicted_under_it() -> None:
    files = VerifiedFiles(capacity=len(FILE))
    fetch = Fetches()
    reading = files.read(DIGEST, len(FILE), fetch)
    first = next(reading)
    other = Fetches(os.urandom(len(FILE)))
    read(files, other, hashlib.sha256(other.data).digest())  # evicts the file being read
    assert files.kept_bytes() == len(FILE)
    assert first + b"".join(reading) == FILE


def test_every_file_checkpoints_may_cut_can_be_kept() -> None:
    assert MAX_CUT_FILE_BYTES <= KEPT_FILE_LIMIT


def test_a_large_stored_file_is_fetched_once_by_its_readers(live: LiveStack) -> None:
    """A large file read with `keep` (by the segments cut inside it) is fetched,
    decompressed and checked once; a damaged one is never kept; without `keep` (a
    restore's single pass over the tar) every read fetches it."""
    data = os.urandom(IN_MEMORY_LIMIT + 12345)
    digest = hashlib.sha256(data).digest()
    files = FileStore(live.registry.store, live.registry.index)
    with Packer(files) as packer:
        packer.add(SpooledPayload(iter([data])))
    gets = counting_gets(files)
    assert [b"".join(files.open(digest, len(data), keep=True)) for _ in range(3)] == [data] * 3
    assert gets[0] == 1
    assert b"".join(files.open(digest, len(data))) == data and gets[0] == 2  # without `keep`
    (location,) = files.locate([digest])
    assert location is not None
    damaged = hashlib.sha256(b"a file whose stored bytes are another's").digest()
    files.index.add_file(damaged.hex(), location.encode())  # its check must fail
    try:
        for attempt in (2, 3):  # one fetch each: never kept
            with pytest.raises(FileStoreError, match="sha256"):
                b"".join(files.open(damaged, len(data), keep=True))
            assert gets[0] == attempt + 1
    finally:
        files.index.redis.hdel(FILES_KEY, damaged.hex())
