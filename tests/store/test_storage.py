"""The S3 adapter against the stack's S3 server: a stream stored whatever the pieces it
answers reads in (the minio SDK builds each part by appending reads)."""

from __future__ import annotations

import os

import pytest

from pipelines.store.storage import WholeReads
from tests.conftest import LiveStack

MIB = 1 << 20


class Trickle:
    """Bytes answered at most `piece` at a time, as a socket or a chunked body may."""

    def __init__(self, data: bytes, piece: int) -> None:
        self.data, self.piece, self.position = data, piece, 0

    def read(self, size: int = -1, /) -> bytes:
        size = len(self.data) if size < 0 else size
        answer = self.data[self.position : self.position + min(size, self.piece)]
        self.position += len(answer)
        return answer


def test_whole_reads_answer_in_full_until_the_end() -> None:
    data = os.urandom(1000)
    whole = WholeReads(Trickle(data, 7))
    assert [whole.read(300) for _ in range(4)] == [data[:300], data[300:600], data[600:900],
                                                   data[900:]]  # fmt: skip
    assert whole.read(10) == b""
    assert WholeReads(Trickle(data, 7)).read() == data


@pytest.mark.parametrize("length_known", [True, False])
def test_a_stream_in_small_pieces_is_stored_exactly(live: LiveStack, length_known: bool) -> None:
    """Several parts of a multipart upload, each gathered from 4 kB reads."""
    data = os.urandom(12 * MIB + 5)
    key = f"test-storage/trickle-{length_known}"
    store = live.registry.store
    store.put_stream(key, Trickle(data, 4096), len(data) if length_known else None)
    try:
        assert store.get_bytes(key) == data
    finally:
        store.delete([key])
