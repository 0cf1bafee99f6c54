"""The pinned zstd CLI's screen: what it writes before stopping on a prefix is a prefix of
the frame of the whole input, however its output is read (pipelines.encoders.zstd_cli)."""

from __future__ import annotations

import io
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import cast

import pytest

from pipelines.encoders.zstd_cli import ZstdCliEncoder
from pipelines.encoders.zstd_families import ZstdOptions

RUNS = 5
LAGGING_READ = 16 * 1024  # bytes read at a time, with a pause after each
LAGGING_PAUSE_SECONDS = 0.002


def read_lagging(argv: list[str], data: bytes) -> bytes:
    """What `argv` writes for `data`, read as a starved reader of a loaded host does:
    a little at a time, so that the program's writes wait on a full pipe."""
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as proc:
        stdin, stdout = proc.stdin, cast(io.BufferedReader, proc.stdout)
        assert stdin is not None

        def feed() -> None:
            with stdin:
                stdin.write(data)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        written = bytearray()
        while chunk := stdout.read1(LAGGING_READ):
            written += chunk
            time.sleep(LAGGING_PAUSE_SECONDS)
        feeder.join()
    return bytes(written)


def first_difference(produced: bytes, expected: bytes) -> int:
    return next((i for i, (a, b) in enumerate(zip(produced, expected, strict=False)) if a != b), -1)


@pytest.mark.parametrize("single_thread", [False, True])
def test_zstd_cli_screen_writes_a_prefix_of_the_frame_to_a_lagging_reader(
    helper_dir: Path, single_thread: bool
) -> None:
    """The screen stops the CLI with "Src size is incorrect" after a prefix. With its
    asynchronous writer thread, exit() on that error flushed stdout while the thread was
    still writing: 4 KiB twice, or out of order, whenever the thread was held up, and the
    very encoder of a layer was rejected on a loaded host."""
    encoder = ZstdCliEncoder(3, long=False, single_thread=single_thread)
    if reason := encoder.unavailable_reason():
        pytest.skip(reason)
    data = random.Random(7).randbytes(3_000_000)  # stored blocks: much output
    params = ZstdOptions(True, True, len(data)).encode()
    frame = b"".join(encoder.body([data], params))
    prefix = data[: 2 * 1024 * 1024]  # four of the workers' 512 KiB chunks
    for _ in range(RUNS):
        written = read_lagging(encoder.screen_argv(params), prefix)
        assert frame.startswith(written), (len(written), first_difference(written, frame))


def test_zstd_cli_screen_that_wrote_no_frame_judges_nothing(helper_dir: Path) -> None:
    """A prefix shorter than the CLI's first block, of a longer pledged input: the CLI stops
    before it writes anything, and the screen says it cannot judge the candidate (None)
    rather than passing it on an empty output, which is a prefix of any payload. A longer
    prefix gives a frame's beginning, or, when the worker had not written yet, None too:
    never an empty pass."""
    encoder = ZstdCliEncoder(3, long=False)
    if reason := encoder.unavailable_reason():
        pytest.skip(reason)
    data = random.Random(8).randbytes(1_000_000)
    params = ZstdOptions(True, True, len(data)).encode()
    assert read_lagging(encoder.screen_argv(params), data[:1000]) == b""
    assert encoder.screen(data[:1000], params) is None
    frame = b"".join(encoder.body([data], params))
    for _ in range(RUNS):  # how much it writes before stopping depends on its worker's timing
        screened = encoder.screen(data[:900_000], params)
        assert screened is None or (len(screened) > 4 and frame.startswith(screened))
