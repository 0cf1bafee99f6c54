"""Multi-frame zstd layers: which encoder made each frame (the frames encoder is
pipelines.encoders.zstd_frames).

Finding the inner encoder: the first data frame is screened and proven as a one-frame
layer would be; each next frame is tried first with the encoder found so far (one
recompression of that frame), and screened in full only if that fails; when another
encoder makes it, the earlier frames are tried with that one (small frames often come
out the same from several encoders).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from typing import BinaryIO

from pipelines.encoders.base import Match, NoMatch
from pipelines.encoders.detect import Shortlist, find_encoder, shortlist_of
from pipelines.encoders.table import lookup_encoder
from pipelines.encoders.zstd_families import ZSTD_CHUNKED_FOOTER_LEN, is_zstd_chunked
from pipelines.encoders.zstd_frames import DataFrame, ZstdFramesEncoder, encode_params
from pipelines.formats.codecs import (
    SNIFF_BYTES,
    ChunkReader,
    ZstdFrame,
    iter_chunks,
    iter_zstd_frames,
    open_decompressed,
    scan_zstd_frames,
    sniff,
)

# Skippable frames are kept verbatim in the recipe: a layer holding more is kept intact.
MAX_SKIPPABLE_BYTES = 64 * 1024
# Times the encoder found so far may give way to another (its search, then the earlier
# frames again): the CPU a layer of many frames costs stays bounded.
MAX_ENCODER_SWITCHES = 2
ReadBlob = Callable[[int, int], Iterable[bytes]]  # offset, length -> the blob's bytes


def frames_to_rebuild(
    read_blob: ReadBlob, blob_size: int, max_window: int
) -> list[ZstdFrame] | None:
    """The frames of a zstd layer to rebuild frame by frame; None for one that a single
    encoder writes whole: one data frame, or zstd:chunked (its encoder writes all its
    frames and its footer). Either way every frame's window is checked against the cap
    (UnsupportedBlobError), and a malformed stream raises CorruptBlobError."""
    footer = ZSTD_CHUNKED_FOOTER_LEN
    tail = b"".join(read_blob(max(0, blob_size - footer), min(footer, blob_size)))
    if is_zstd_chunked(tail):  # a frame per file: not kept in a list
        for _frame in iter_zstd_frames(read_blob(0, blob_size), max_window):
            pass
        return None
    frames = scan_zstd_frames(read_blob(0, blob_size), max_window)
    return None if len(frames) == 1 and not frames[0].skippable else frames


def frames_shortlist(
    frames: list[ZstdFrame], read_blob: ReadBlob, max_window: int
) -> Shortlist | NoMatch:
    """The frames encoder that reproduces every data frame (each proven against the
    frame's own bytes), with its params; `prove` settles it on the whole layer."""
    skippable = sum(frame.length for frame in frames if frame.skippable)
    if skippable > MAX_SKIPPABLE_BYTES:
        return NoMatch(f"skippable zstd frames of {skippable} bytes (a recipe keeps 64 KiB)")
    found: dict[int, DataFrame] = {}  # by frame offset
    inner: str | None = None
    switches = 0
    for frame in (frame for frame in frames if not frame.skippable):
        match = _frame_match(frame, read_blob, max_window, [inner, None] if inner else [None])
        if isinstance(match, NoMatch):
            return NoMatch(f"zstd frame at offset {frame.offset}: {match.reason}")
        if inner is not None and match[0].encoder_id != inner:
            switches += 1
            if switches > MAX_ENCODER_SWITCHES:  # each costs a search and a pass: bounded
                return NoMatch(f"zstd frames match {switches + 1} encoders in turn")
            # A small frame may match several encoders: the earlier ones again with this one.
            earlier = [f for f in frames if f.offset in found]
            redone = _frames_match(earlier, read_blob, max_window, match[0].encoder_id)
            if redone is None:
                return NoMatch(
                    f"zstd frames made by different encoders ({inner}, {match[0].encoder_id})"
                )
            found.update(redone)
        inner = match[0].encoder_id
        found[frame.offset] = DataFrame(match[1], match[0].encoder_params)
    if inner is None:
        return NoMatch("zstd stream of skippable frames only")
    entries = [
        found[frame.offset]
        if not frame.skippable
        else b"".join(read_blob(frame.offset, frame.length))
        for frame in frames
    ]
    composite = ZstdFramesEncoder(lookup_encoder(inner))
    return shortlist_of(composite, encode_params(entries))


def _frames_match(
    frames: list[ZstdFrame], read_blob: ReadBlob, max_window: int, encoder_id: str
) -> dict[int, DataFrame] | None:
    """Each frame as `encoder_id` makes it, None if it makes one of them otherwise."""
    redone: dict[int, DataFrame] = {}
    for frame in frames:
        match = _frame_match(frame, read_blob, max_window, [encoder_id])
        if isinstance(match, NoMatch):
            return None
        redone[frame.offset] = DataFrame(match[1], match[0].encoder_params)
    return redone


def _frame_match(
    frame: ZstdFrame, read_blob: ReadBlob, max_window: int, tries: list[str | None]
) -> tuple[Match, int] | NoMatch:
    """The encoder that writes this frame from its tar, and that tar's length: the
    encoders of `tries` in turn (None: every encoder)."""

    def open_frame() -> BinaryIO:
        return io.BufferedReader(ChunkReader(iter(read_blob(frame.offset, frame.length))))

    def open_tar() -> BinaryIO:
        return open_decompressed("zstd", open_frame(), max_window)

    digest = hashlib.sha256()
    with open_frame() as stream:
        for chunk in iter_chunks(stream):
            digest.update(chunk)
    with open_frame() as stream:
        kind = sniff(stream.read(SNIFF_BYTES))
    found: Match | NoMatch = NoMatch("no encoder tried")
    for only in tries:
        found = find_encoder(open_frame, open_tar, digest.hexdigest(), kind, only)
        if isinstance(found, Match):
            break
    if isinstance(found, NoMatch):
        return found
    assert frame.header is not None
    tar_length = frame.header.content_size
    if tar_length is None:
        with open_tar() as tar:
            tar_length = sum(len(chunk) for chunk in iter_chunks(tar))
    return found, tar_length
