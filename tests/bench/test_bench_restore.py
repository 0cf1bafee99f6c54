"""bench.restore's inputs and measures: the large-file layer keeps every byte of the real
tar; the CPU it counts holds the helpers'."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

from bench.restore import cpu_seconds, with_large_file
from pipelines.encoders.segment_helpers import SERVED, run_segment_helper
from pipelines.serve.checkpoints import KEPT_WHOLE_BYTES


def test_the_large_file_layer_holds_the_same_bytes_in_three_files() -> None:
    source = bytes(range(256)) * 120_000  # 30.7 MB
    tar = with_large_file(source, 20)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        members = archive.getmembers()
        contents = [archive.extractfile(member).read() for member in members]  # type: ignore[union-attr]
    assert [member.name for member in members] == ["lib/head", "big.bin", "lib/tail"]
    assert b"".join(contents) == source
    assert members[1].size == 20_000_000 > KEPT_WHOLE_BYTES


def test_the_cpu_counted_holds_the_served_helpers_work(helper_dir: Path) -> None:
    """Served helpers stay up (never waited for): bench-restore's CPU must still count
    them, as it counted the helpers started per segment."""
    SERVED.forget()
    argv = [str(helper_dir / "gzip-go1.26"), "-mode", "segment", "-level", "9"]
    data = os.urandom(1 << 20) * 6
    before_total, before_own = cpu_seconds(), time.process_time()
    for _ in range(4):
        run_segment_helper(argv, [data])
    helpers = cpu_seconds() - before_total - (time.process_time() - before_own)
    assert SERVED.processes()  # still up: their CPU was read live
    assert helpers >= 0.1, helpers  # 0.3-0.5 CPU-s of encoding; uncounted, about 0
    SERVED.forget()
