"""bench.restore's inputs: the large-file layer keeps every byte of the real tar."""

from __future__ import annotations

import io
import tarfile

from bench.restore import with_large_file
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
