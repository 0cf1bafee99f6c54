"""Verified release of restored bytes, without a stack: segment digests from the pushed
bytes, segments released only once they match, and spool readers that only ever see
verified bytes, at any offset, whatever the producer does."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.formats import Buffer, verify
from pipelines.formats.verify import (
    SegmentDigests,
    SegmentHasher,
    VerificationError,
    release_verified,
)
from pipelines.serve.rebuild import RestoreError
from pipelines.serve.restore import MODE_FAILED, RestoreHub

SEGMENT = 4096  # small segments, so that a few KiB of data span many of them
BLOB = os.urandom(10 * SEGMENT + 123)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def segments_of(data: bytes, digest: str = DIGEST) -> SegmentDigests:
    hasher = SegmentHasher(pieces(data, 1000), SEGMENT)
    next(hasher)  # the consumer reads a little; finish() hashes the rest
    return hasher.finish(digest)


def released(chunks: Iterator[Buffer], segments: SegmentDigests | None) -> tuple[bytes, str]:
    """What release_verified hands on before it stops, and why it stopped ("" if done)."""
    out = bytearray()
    try:
        for chunk in release_verified(chunks, DIGEST, len(BLOB), segments):
            out += chunk
    except VerificationError as error:
        return bytes(out), str(error)
    return bytes(out), ""


def test_the_first_segments_are_short_and_double_up_to_the_steady_size() -> None:
    """A restore releases the first segment once it alone is verified: it is short, and
    the next ones double up to the steady size, so a large blob still has few."""
    blob = os.urandom(100_000)
    hasher = SegmentHasher(pieces(blob, 777), segment_bytes=16_000, first_bytes=2_000)
    segments = hasher.finish("sha256:" + hashlib.sha256(blob).hexdigest())
    sizes = [b - a for a, b in zip((0, *segments.ends), segments.ends, strict=False)]
    assert sizes == [2_000, 4_000, 8_000, 16_000, 16_000, 16_000, 16_000, 16_000, 6_000]
    starts = (0, *segments.ends[:-1])
    for start, end, digest in zip(starts, segments.ends, segments.digests, strict=True):
        assert hashlib.sha256(blob[start:end]).digest() == digest
    default = SegmentHasher(pieces(BLOB, 1000))
    assert default.first_bytes == 256 << 10 and default.segment_bytes == 4 << 20


def test_segment_digests_are_those_of_the_pushed_bytes() -> None:
    segments = segments_of(BLOB)
    assert segments.ends == (*range(SEGMENT, 11 * SEGMENT, SEGMENT), len(BLOB))
    starts = (0, *segments.ends[:-1])
    for start, end, digest in zip(starts, segments.ends, segments.digests, strict=True):
        assert hashlib.sha256(BLOB[start:end]).digest() == digest


def test_segment_digests_need_the_whole_digest_to_match() -> None:
    damaged = BLOB[:-1] + bytes([BLOB[-1] ^ 1])
    with pytest.raises(VerificationError, match="hashes to"):
        segments_of(damaged)


@settings(max_examples=200, deadline=None)
@given(chunk=st.integers(1, 3 * SEGMENT), position=st.integers(0, len(BLOB) - 1))
def test_a_wrong_byte_anywhere_stops_the_release_before_its_segment(
    chunk: int, position: int
) -> None:
    segments = segments_of(BLOB)
    damaged = bytearray(BLOB)
    damaged[position] ^= 0x40
    out, error = released(pieces(bytes(damaged), chunk), segments)
    assert error
    first_bad = position // SEGMENT * SEGMENT
    assert out == BLOB[:first_bad]  # every segment before the damaged one, nothing after


@settings(max_examples=100, deadline=None)
@given(
    first=st.sampled_from([1, 100, 512, 1000, SEGMENT]),
    chunk=st.integers(1, 3 * SEGMENT),
    position=st.integers(0, len(BLOB) - 1),
)
def test_with_short_first_segments_a_wrong_byte_stops_the_release_before_its_segment(
    first: int, chunk: int, position: int
) -> None:
    """Segments that double from `first`: good bytes all leave, whatever the chunking;
    a wrong byte stops the release at the start of its segment, however short."""
    hasher = SegmentHasher(pieces(BLOB, 1000), segment_bytes=SEGMENT, first_bytes=first)
    segments = hasher.finish(DIGEST)
    assert segments.ends[0] == first and segments.ends[-1] == len(BLOB)
    assert released(pieces(BLOB, chunk), segments) == (BLOB, "")
    damaged = bytearray(BLOB)
    damaged[position] ^= 0x01
    out, error = released(pieces(bytes(damaged), chunk), segments)
    segment_start = max(end for end in (0, *segments.ends) if end <= position)
    assert error and out == BLOB[:segment_start]


@settings(max_examples=50, deadline=None)
@given(chunk=st.integers(1, 3 * SEGMENT))
def test_good_bytes_are_all_released_however_they_are_chunked(chunk: int) -> None:
    assert released(pieces(BLOB, chunk), segments_of(BLOB)) == (BLOB, "")


@pytest.mark.parametrize("segments", [True, False], ids=["segments", "whole-layer"])
def test_a_restore_that_runs_long_stops_at_once(segments: bool) -> None:
    produced = 0

    def too_long() -> Iterator[bytes]:
        nonlocal produced
        for piece in (BLOB, b"extra", os.urandom(1 << 20)):
            produced += len(piece)
            yield piece

    out, error = released(too_long(), segments_of(BLOB) if segments else None)
    assert "ran past" in error
    assert produced == len(BLOB) + 5  # stopped at the first byte too many
    assert BLOB.startswith(out) and len(out) < len(BLOB)  # the last segment is held


@pytest.mark.parametrize("cut", [1, SEGMENT, len(BLOB) - 1])
def test_a_short_restore_never_releases_its_last_segment(cut: int) -> None:
    out, error = released(pieces(BLOB[:cut], 999), segments_of(BLOB))
    assert "ended after" in error and len(out) <= cut - cut % SEGMENT


def test_without_segment_digests_nothing_leaves_before_the_whole_blob_matches() -> None:
    damaged = BLOB[:-1] + bytes([BLOB[-1] ^ 1])
    out, error = released(pieces(damaged, 777), None)
    assert out == b"" and "does not hash" in error
    assert released(pieces(BLOB, 777), None) == (BLOB, "")


@pytest.mark.parametrize("in_memory", [1 << 20, 3000], ids=["held", "spilled-to-disk"])
@pytest.mark.parametrize("segments", [True, False], ids=["segments", "whole-layer"])
def test_a_segment_held_or_spilled_is_released_whole_and_only_if_it_matches(
    monkeypatch: pytest.MonkeyPatch, in_memory: int, segments: bool
) -> None:
    """A segment being checked is held as views of the chunks it came in until those
    chunks' objects pass SPOOL_IN_MEMORY, then on disk: either way, the same bytes leave
    only once they match (chunks here are views of one object, as a restore's are)."""
    monkeypatch.setattr(verify, "SPOOL_IN_MEMORY", in_memory)
    digests = segments_of(BLOB) if segments else None
    views = [memoryview(BLOB)[start : start + 777] for start in range(0, len(BLOB), 777)]
    assert released(iter(views), digests) == (BLOB, "")
    damaged = bytearray(BLOB)
    damaged[-5] ^= 1
    views = [memoryview(damaged)[start : start + 777] for start in range(0, len(BLOB), 777)]
    out, error = released(iter(views), digests)
    assert error and out == BLOB[: len(BLOB) // SEGMENT * SEGMENT if segments else 0]


def test_segments_that_do_not_cover_the_blob_are_refused() -> None:
    segments = SegmentDigests((SEGMENT,), (bytes(32),))
    assert "cover" in released(pieces(BLOB, 999), segments)[1]


# The spool: readers of a RestoreHub at any offset see verified bytes or an error.


def hub_read(hub: RestoreHub, produce: Iterator[Buffer], offset: int, length: int) -> bytes:
    return b"".join(hub.read(DIGEST, len(BLOB), lambda: produce, offset, length))


def join_producers() -> None:
    """Wait for every restore's producer thread to settle its spool file. A reader's bytes
    can all arrive before their producer unlocks the file and marks it."""
    for thread in threading.enumerate():
        if thread.name.startswith("restore-"):
            thread.join(10)


@pytest.mark.parametrize("damage_at", [0, SEGMENT - 1, 5 * SEGMENT + 7, len(BLOB) - 1])
def test_spool_readers_at_every_offset_get_exact_bytes_or_an_error(
    tmp_path: Path, damage_at: int
) -> None:
    damaged = bytearray(BLOB)
    damaged[damage_at] ^= 1
    segments = segments_of(BLOB)
    first_bad = damage_at // SEGMENT * SEGMENT
    for offset in range(0, len(BLOB), 997):
        hub = RestoreHub(tmp_path / f"spool-{offset}", keep_seconds=0)
        verified = release_verified(pieces(bytes(damaged), 3000), DIGEST, len(BLOB), segments)
        length = min(2 * SEGMENT, len(BLOB) - offset)
        if offset + length <= first_bad:
            assert hub_read(hub, verified, offset, length) == BLOB[offset : offset + length]
        else:
            with pytest.raises(RestoreError):
                hub_read(hub, verified, offset, length)


def test_a_failed_restore_left_in_the_spool_is_restored_again(tmp_path: Path) -> None:
    """A GET arriving after a restore failed, while (or because) its spool file is
    still there, restores again instead of taking the old failure for its own."""
    hub = RestoreHub(tmp_path, keep_seconds=0)
    failed = tmp_path / (DIGEST.replace(":", "-") + ".data")
    failed.write_bytes(BLOB[:SEGMENT])
    failed.chmod(MODE_FAILED)
    assert hub_read(hub, iter([BLOB]), SEGMENT, 10) == BLOB[SEGMENT : SEGMENT + 10]


def test_a_reader_never_spins_when_the_producer_fails_midway(tmp_path: Path) -> None:
    def failing() -> Iterator[bytes]:
        yield BLOB[:SEGMENT]
        raise OSError("disk full")

    hub = RestoreHub(tmp_path, keep_seconds=0)
    result: list[BaseException | bytes] = []

    def read() -> None:
        try:
            result.append(hub_read(hub, failing(), 0, len(BLOB)))
        except RestoreError as error:
            result.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "the reader is still waiting"
    assert isinstance(result[0], RestoreError)
    assert hub_read(hub, iter([BLOB]), SEGMENT, 10) == BLOB[SEGMENT : SEGMENT + 10]  # retried


def test_a_kept_files_timer_leaves_the_next_restore_of_its_name_alone(tmp_path: Path) -> None:
    """A verified spool file is removed by name a keep time after its restore. If a sweep
    of another process removed it first and a new restore claimed the name, the timer
    must leave that file alone: removed, the next GET would start a third restore."""
    keeping = RestoreHub(tmp_path, keep_seconds=0.3)
    assert hub_read(keeping, iter([BLOB]), 0, 10) == BLOB[:10]
    join_producers()  # settled: a producer still holding its file keeps it from the sweep
    other = RestoreHub(tmp_path, keep_seconds=0)  # its start sweeps the verified file
    assert other.state(DIGEST) is None
    started, go_on = threading.Event(), threading.Event()

    def slow() -> Iterator[bytes]:
        yield BLOB[:SEGMENT]
        started.set()
        go_on.wait(10)
        yield BLOB[SEGMENT:]

    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(hub_read(other, slow(), 0, len(BLOB))))
    reader.start()
    assert started.wait(10)
    time.sleep(0.6)  # the first file's timer has run
    assert other.state(DIGEST) == "restoring"
    go_on.set()
    reader.join(10)
    assert result == [BLOB]


class Interrupted(BaseException):
    """Not an Exception: what a restore is stopped by from outside (KeyboardInterrupt,
    GeneratorExit), which `except Exception` lets through."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # Interrupted
def test_a_restore_ended_by_a_base_exception_is_settled_as_failed(tmp_path: Path) -> None:
    """Its spool file is marked failed and unlocked, not left restoring by a live process:
    its readers would wait for ever. The next GET restores again."""

    def interrupted() -> Iterator[bytes]:
        yield BLOB[:SEGMENT]
        raise Interrupted

    hub = RestoreHub(tmp_path, keep_seconds=0)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(hub_read(hub, interrupted(), 0, len(BLOB)))
        except RestoreError as error:
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)  # may wait for ever: the failure
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "the reader waits for a restore nobody runs"
    assert isinstance(outcome[0], RestoreError)
    join_producers()  # it ends with Interrupted here, in this test (its warning filtered),
    # not in whichever test runs when it gets there
    assert hub_read(hub, iter([BLOB]), SEGMENT, 10) == BLOB[SEGMENT : SEGMENT + 10]
