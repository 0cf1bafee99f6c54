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

Params (integers unsigned LEB128 varints, as in pipelines.formats.recipe):

    magic     2 bytes  b"ZF"
    version   1 byte   1
    count     varint   frames, then each:
      kind    1 byte   0: data frame, then varint tar length, varint params length, params
                       1: skippable frame, then varint length, its bytes
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pipelines.encoders.base import Encoder
from pipelines.formats.recipe import decode_varint, encode_varint

FRAMES_PREFIX = "zstd/frames-1/"
PARAMS_MAGIC = b"ZF"
PARAMS_VERSION = 1
DATA, SKIPPABLE = 0, 1


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
