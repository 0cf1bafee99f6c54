"""The memory files a Go segment helper reads its input from are kept for the next
segments (`pipelines.encoders.segment_helpers.SpareFiles`): a kept file must hand the next helper
exactly its own input, however large the file was, and none is kept beyond the bounds."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipelines.encoders import segment_helpers as base
from pipelines.encoders.table import lookup_encoder
from tests.serve.test_checkpoints import layer_tar

ENCODER = "gzip/go1.26/6"


def encoded(data: bytes, history: bytes = b"") -> bytes:
    encoder = lookup_encoder(ENCODER)
    bits = encoder.encode_segment([history], [data], [], offset=len(history), final=True, align=0)
    return bytes(bits)


def forget_spare_inputs() -> None:
    base.SPARE_INPUTS.forget()


@pytest.fixture
def tar(helper_dir: Path) -> bytes:
    if lookup_encoder(ENCODER).unavailable_reason():
        pytest.skip(f"{ENCODER} is not available")
    return layer_tar(12)


def test_a_kept_input_file_gives_the_next_helper_exactly_its_input(tar: bytes) -> None:
    """A segment after a larger one, in the file the larger one left: the same bits as
    from a new file (no byte of the larger input left over, none missing)."""
    small, large = tar[:1_000_000], tar[: 10 << 20]
    forget_spare_inputs()
    fresh = encoded(small, history=tar[2_000_000:2_032_768])
    forget_spare_inputs()
    encoded(large)
    assert base.SPARE_INPUTS.sizes() == [len(large)]  # the large input's file, kept
    assert encoded(small, history=tar[2_000_000:2_032_768]) == fresh
    forget_spare_inputs()


def test_inputs_kept_stay_within_their_bounds(tar: bytes) -> None:
    """Concurrent segments each write their own file; afterwards at most SPARE_INPUTS
    files are kept, none over SPARE_INPUT_BYTES, and each segment's bits are its own."""
    forget_spare_inputs()
    rng = random.Random(5)
    cuts = [
        (start, start + rng.randrange(200_000, 3_000_000)) for start in range(0, 8 << 20, 1 << 20)
    ]
    alone = [encoded(tar[a:b]) for a, b in cuts]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda cut: encoded(tar[cut[0] : cut[1]]), cuts * 3))
    assert together == alone * 3
    kept = base.SPARE_INPUTS.sizes()
    assert 0 < len(kept) <= base.SPARE_INPUTS.count
    assert all(size <= base.SPARE_FILE_BYTES for size in kept)
    encoded(tar[: base.SPARE_FILE_BYTES + 1])
    assert all(size <= base.SPARE_FILE_BYTES for size in base.SPARE_INPUTS.sizes())
    forget_spare_inputs()
