"""Multi-frame zstd layers, rebuilt frame by frame.

A zstd layer may hold several frames and skippable frames: pzstd compresses each chunk
of four windows of input as a frame of its own (what `zstd --single-thread` writes for
that chunk, from a pipe) and writes a skippable frame holding each frame's size before
it; frames concatenated (`cat a.zst b.zst`, `zstd -c a b`) are each one producer's
frame. Such a layer (but zstd:chunked, which has an encoder of its own) is deduplicated
when one encoder reproduces every one of its data frames from the tar bytes it holds:
its recipe names `zstd/frames-1/<that encoder's id>` and its params list the frames in
order, a skippable frame verbatim, a data frame as the length of tar it holds and the
inner encoder's params for it. The inner encoder's canary vouches for the layer.

Finding the inner encoder: the first data frame is screened and proven as a one-frame
layer would be; each next frame is tried first with the encoder found so far (one
recompression of that frame), and screened in full only if that fails; when another
encoder makes it, the earlier frames are tried with that one (small frames often come
out the same from several encoders).

Params (integers unsigned LEB128 varints, as in pipelines.formats.recipe):

    magic     2 bytes  b"ZF"
    version   1 byte   1
    count     varint   frames, then each:
      kind    1 byte   0: data frame, then varint tar length, varint params length, params
                       1: skippable frame, then varint length, its bytes
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pipelines.encoders import detect as encoders
from pipelines.encoders.detect import Encoder, Match, NoMatch, Shortlist
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
from pipelines.formats.recipe import decode_varint, encode_varint

FRAMES_PREFIX = "zstd/frames-1/"
PARAMS_MAGIC = b"ZF"
PARAMS_VERSION = 1
DATA, SKIPPABLE = 0, 1
# Skippable frames are kept verbatim in the recipe: a layer holding more is kept intact.
MAX_SKIPPABLE_BYTES = 64 * 1024
# Times the encoder found so far may give way to another (its search, then the earlier
# frames again): the CPU a layer of many frames costs stays bounded.
MAX_ENCODER_SWITCHES = 2

ReadBlob = Callable[[int, int], Iterable[bytes]]  # offset, length -> the blob's bytes


@dataclass(frozen=True)
class DataFrame:
    tar_length: int
    params: bytes  # the inner encoder's


FrameEntry = DataFrame | bytes  # bytes: a skippable frame, verbatim


def encode_params(entries: list[FrameEntry]) -> bytes:
    out = bytearray(PARAMS_MAGIC + bytes([PARAMS_VERSION]))
    out += encode_varint(len(entries))
    for entry in entries:
        if isinstance(entry, DataFrame):
            out += bytes([DATA]) + encode_varint(entry.tar_length)
            out += encode_varint(len(entry.params)) + entry.params
        else:
            out += bytes([SKIPPABLE]) + encode_varint(len(entry)) + entry
    return bytes(out)


def decode_params(params: bytes) -> list[FrameEntry]:
    if params[:2] != PARAMS_MAGIC or params[2:3] != bytes([PARAMS_VERSION]):
        raise ValueError("not zstd frames params of version 1")
    reader = io.BytesIO(params[3:])

    def take(n: int) -> bytes:
        data = reader.read(n)
        if len(data) < n:
            raise ValueError("truncated zstd frames params")
        return data

    entries: list[FrameEntry] = []
    for _ in range(decode_varint(take, ValueError)):
        kind = take(1)[0]
        if kind == DATA:
            tar_length = decode_varint(take, ValueError)
            entries.append(DataFrame(tar_length, take(decode_varint(take, ValueError))))
        elif kind == SKIPPABLE:
            entries.append(take(decode_varint(take, ValueError)))
        else:
            raise ValueError(f"unknown zstd frame kind {kind}")
    if reader.read(1):
        raise ValueError("zstd frames params have trailing bytes")
    return entries


class ZstdFramesEncoder(Encoder):
    """Rebuilds a multi-frame layer: each data frame with `inner` from its share of the
    tar, skippable frames from the params."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.encoder_id = FRAMES_PREFIX + inner.encoder_id

    def unavailable_reason(self) -> str | None:
        return self.inner.unavailable_reason()

    def body(self, tar_chunks: Iterable[bytes], params: bytes) -> Iterator[bytes]:
        tar = _Slicer(iter(tar_chunks))
        for entry in decode_params(params):
            if isinstance(entry, bytes):
                yield entry
            else:
                yield from self.inner.body(tar.take(entry.tar_length), entry.params)
        if not tar.at_end():
            raise ValueError("the tar is longer than the zstd frames hold")


class _Slicer:
    """Hands out consecutive slices of a chunk stream, each exactly as long as asked."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def take(self, length: int) -> Iterator[bytes]:
        while length > 0:
            if not self._pending:
                self._pending = next(self._chunks, b"")
                if not self._pending:
                    raise ValueError("the tar ended inside a zstd frame")
            piece, self._pending = self._pending[:length], self._pending[length:]
            length -= len(piece)
            yield piece

    def at_end(self) -> bool:
        while not self._pending:
            nxt = next(self._chunks, None)
            if nxt is None:
                return True
            self._pending = nxt
        return False


def frames_to_rebuild(
    read_blob: ReadBlob, blob_size: int, max_window: int
) -> list[ZstdFrame] | None:
    """The frames of a zstd layer to rebuild frame by frame; None for one that a single
    encoder writes whole: one data frame, or zstd:chunked (its encoder writes all its
    frames and its footer). Either way every frame's window is checked against the cap
    (UnsupportedBlobError), and a malformed stream raises CorruptBlobError."""
    footer = encoders.ZSTD_CHUNKED_FOOTER_LEN
    tail = b"".join(read_blob(max(0, blob_size - footer), min(footer, blob_size)))
    if encoders.is_zstd_chunked(tail):  # a frame per file: not kept in a list
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
    composite = ZstdFramesEncoder(encoders.lookup_encoder(inner))
    return encoders.shortlist_of(composite, encode_params(entries))


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
        found = encoders.find_encoder(open_frame, open_tar, digest.hexdigest(), kind, only)
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
