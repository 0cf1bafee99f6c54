"""Checkpoints: places in a compressed layer where its encoder can be resumed exactly, so
that a restore re-encodes segments in parallel and joins them.

A deflate stream is a sequence of blocks. At a block boundary (a bit offset in the
deflate body, a byte offset in the tar) the encoder's state is, for most encoders, a
function of the input just before it (the 32 KiB window, or a few 64 KiB chunks for
table-based encoders). The gzip families (`pipelines.encoders.gzip_families`) know how
each encoder resumes (`Encoder.encode_segment`); this module finds candidate boundaries in
the pushed blob, proves them, stores the proven ones and joins segments bit by bit.

Found and proven at ingest: the boundaries of the pushed deflate body are found with
zlib's own `inflate(Z_BLOCK)` (as zlib's example zran.c does), about every
`checkpoint_spacing(tar_size)` bytes of tar a candidate is kept, and every segment between two
candidates is re-encoded from its start alone and compared, bit for bit, with the pushed
body up to the next candidate. A candidate whose segment differs is dropped: its segment
is re-encoded together with the one before. Segment 0 starts at the stream's start, so
the proof ends, at worst, with one segment: a full serial re-encode. When every segment
matches, the joined stream is the pushed body; the proof also hashes header + joined
body + trailer against the blob digest, so it stands in for the full-recompression proof.

The object (`checkpoints/<alg>/<hex>`), integers unsigned LEB128 varints:

    magic         4 bytes   b"DHCk"
    version       1 byte    1
    blob_digest   varint length + UTF-8
    encoder_id    varint length + UTF-8   the recipe's encoder, which the points are for
    tar_size      varint
    payload_bits  varint    length of the compressed payload (deflate body) in bits
    candidates    varint    how many candidates the proof tried
    count         varint    proven checkpoints, then each as deltas from the previous:
                    varint tar bytes, varint payload bits
    checksum      32 bytes  sha256 of every preceding byte

Checkpoints are optional: a missing, unreadable or mismatched object means a serial
restore, never a wrong one (and every restore is verified by `pipelines.formats.verify`).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

from pipelines.config import HOST_CORES
from pipelines.encoders.base import Encoder, Match, NoMatch
from pipelines.encoders.detect import Shortlist
from pipelines.encoders.gzip_families import decode_gzip_params
from pipelines.encoders.libz import deflate_boundaries
from pipelines.formats import Buffer, Pieces, total_length
from pipelines.formats.digests import digest_key
from pipelines.formats.recipe import decode_varint, encode_varint

MAGIC = b"DHCk"
VERSION = 1
CHECKSUM_SIZE = 32
CHECKPOINT_SPACING = 4 << 20  # tar bytes between candidates in a large layer
MIN_CHECKPOINT_SPACING = 1 << 20  # and at least this many in a small one
# The first segment is short: a restore can verify and send the blob's first bytes
# (pipelines.formats.verify.FIRST_SEGMENT_BYTES of it, which this much tar compresses to
# unless it compresses more than 4:1) once it alone is encoded, not 4 MiB of tar.
FIRST_SEGMENT_TAR_BYTES = MIN_CHECKPOINT_SPACING
SEGMENTS_WANTED = 8  # per layer, where the spacings allow it
MAX_PROOF_ROUNDS = 3  # rounds of merging before the proof gives up on checkpoints
AVOID_MARGIN = 256 * 1024  # more than any encoder's history or lookahead
# A segment's tar is held in memory while it is re-encoded: a longer one (merged by the
# proof) is not proven, and a plan holding one restores serially.
MAX_SEGMENT_TAR_BYTES = 32 << 20
# A large file up to this size is left whole to one segment (a segment touching a file
# fetches all of it). A larger one is cut by checkpoints inside it, into at most
# CUTS_PER_FILE + 1 segments of at least the layer's spacing: kept whole, its segment
# would be many times longer than the others (the restore's critical path: measured, a
# 25 MB segment of two adjacent 12-13 MB files took half of a 100 MB restore's wall time)
# or too long to hold, and the layer would restore serially. A segment in a cut file
# fetches, decompresses and checks all of it: free where one host restores the layer (its
# segments are cut from one streamed rebuild), at most CUTS_PER_FILE + 1 times the file
# for the proof at ingest and for restore workers elsewhere; hence no cut in a file
# larger than MAX_CUT_FILE_BYTES (its layer restores serially, as a gzip bomb's does).
KEPT_WHOLE_BYTES = 8 << 20
CUTS_PER_FILE = 8
MAX_CUT_FILE_BYTES = 128 << 20
PROOF_THREADS = HOST_CORES

logger = logging.getLogger(__name__)


class CheckpointError(Exception):
    """The bytes are not a valid checkpoint object."""


class SegmentError(Exception):
    """A segment could not be re-encoded into the bits it must have."""


@dataclass(frozen=True)
class Checkpoint:
    tar_offset: int
    bit_offset: int  # in the compressed payload (the deflate body of a gzip blob)


@dataclass(frozen=True)
class Segment:
    """Tar bytes [tar_start, tar_end) make payload bits [bit_start, bit_end)."""

    index: int
    tar_start: int
    tar_end: int
    bit_start: int
    bit_end: int
    final: bool

    @property
    def bits(self) -> int:
        return self.bit_end - self.bit_start

    @property
    def align(self) -> int:
        """Where in its byte the segment starts in the pushed stream."""
        return self.bit_start % 8


@dataclass(frozen=True)
class Checkpoints:
    """The proven checkpoints of one layer (the stream's start is implied)."""

    blob_digest: str
    encoder_id: str
    tar_size: int
    payload_bits: int
    points: tuple[Checkpoint, ...]
    candidates: int = 0

    def __post_init__(self) -> None:
        offsets = [(0, 0), *((p.tar_offset, p.bit_offset) for p in self.points)]
        offsets.append((self.tar_size, self.payload_bits))
        for (tar_a, bit_a), (tar_b, bit_b) in itertools.pairwise(offsets):
            if tar_b <= tar_a or bit_b <= bit_a:
                raise CheckpointError("checkpoints must increase inside the stream")

    def segments(self) -> list[Segment]:
        starts = [Checkpoint(0, 0), *self.points]
        ends = [*self.points, Checkpoint(self.tar_size, self.payload_bits)]
        return [
            Segment(i, a.tar_offset, b.tar_offset, a.bit_offset, b.bit_offset, i == len(ends) - 1)
            for i, (a, b) in enumerate(zip(starts, ends, strict=True))
        ]

    def encode(self) -> bytes:
        parts = [
            MAGIC,
            bytes([VERSION]),
            _text(self.blob_digest),
            _text(self.encoder_id),
            encode_varint(self.tar_size),
            encode_varint(self.payload_bits),
            encode_varint(self.candidates),
            encode_varint(len(self.points)),
        ]
        previous = Checkpoint(0, 0)
        for point in self.points:
            parts += [
                encode_varint(point.tar_offset - previous.tar_offset),
                encode_varint(point.bit_offset - previous.bit_offset),
            ]
            previous = point
        unsigned = b"".join(parts)
        return unsigned + hashlib.sha256(unsigned).digest()

    @classmethod
    def decode(cls, data: bytes) -> Checkpoints:
        if len(data) < len(MAGIC) + 1 + CHECKSUM_SIZE or not data.startswith(MAGIC):
            raise CheckpointError("not a checkpoint object (bad magic or too short)")
        if data[len(MAGIC)] != VERSION:
            raise CheckpointError(f"unsupported checkpoint version {data[len(MAGIC)]}")
        unsigned, checksum = data[:-CHECKSUM_SIZE], data[-CHECKSUM_SIZE:]
        if hashlib.sha256(unsigned).digest() != checksum:
            raise CheckpointError("checkpoint checksum mismatch")
        reader = _Reader(unsigned, len(MAGIC) + 1)
        blob_digest, encoder_id = reader.text(), reader.text()
        tar_size, payload_bits, candidates = reader.varint(), reader.varint(), reader.varint()
        points, tar, bit = [], 0, 0
        for _ in range(reader.varint()):
            tar += reader.varint()
            bit += reader.varint()
            points.append(Checkpoint(tar, bit))
        if not reader.at_end():
            raise CheckpointError("unexpected bytes after the checkpoints")
        return cls(blob_digest, encoder_id, tar_size, payload_bits, tuple(points), candidates)


def checkpoints_key(blob_digest: str) -> str:
    return digest_key("checkpoints", blob_digest)


def _text(value: str) -> bytes:
    data = value.encode()
    return encode_varint(len(data)) + data


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CheckpointError("checkpoint object truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self) -> int:
        return decode_varint(self.take, CheckpointError)

    def text(self) -> str:
        try:
            return self.take(self.varint()).decode()
        except UnicodeDecodeError as exc:
            raise CheckpointError("text field is not UTF-8") from exc

    def at_end(self) -> bool:
        return self.pos == len(self.data)


# --------------------------------------------------------------------------- bits
#
# A segment's bits are kept as the bytes of the stream they touch: a segment starting at
# bit b of the stream starts `b % 8` bits into its first byte (its encoder is primed with
# that many zero bits: zlib's deflatePrime, the Go helpers' -align). Its first byte's low
# bits belong to the segment before, its last byte's high bits to the one after; both are
# kept zero. Joining ORs the byte two segments share: the shift is done by the encoders.


def edge_masked(data: bytearray | memoryview, segment: Segment) -> memoryview | None:
    """The bytes of `segment` in `data` (which starts at the byte holding its first bit),
    bits outside the segment zeroed in place; None if `data` is too short, or, for the
    stream's last segment, goes on past its end."""
    end_bit = segment.align + segment.bits
    size = (end_bit + 7) // 8
    view = memoryview(data)
    if len(view) < size or (segment.final and any(view[size:])):
        return None
    data[0] &= (0xFF << segment.align) & 0xFF
    data[size - 1] &= (1 << (end_bit % 8 or 8)) - 1
    return view[:size]


def join_segments(parts: Iterable[tuple[Buffer, Segment]]) -> Iterator[Buffer]:
    """The stream from consecutive segments' edge-masked bytes: a segment's first byte is
    ORed with the last, partial byte of the one before (the rest passed on uncopied)."""
    carry, pending, position = 0, False, 0
    for data, segment in parts:
        end_bit = segment.align + segment.bits
        if segment.bit_start != position:
            raise SegmentError(f"segment {segment.index} does not start where the last ended")
        position = segment.bit_end
        head = data[0] | carry
        whole = end_bit // 8
        if whole:
            yield bytes([head])
            yield memoryview(data)[1:whole]
            carry, pending = (data[whole] if end_bit % 8 else 0), bool(end_bit % 8)
        else:
            carry, pending = head, True
    if pending:
        yield bytes([carry])


# --------------------------------------------------------------------------- finding


def boundaries(body: Iterable[bytes]) -> Iterator[Checkpoint]:
    """The block boundaries of a raw deflate body (see pipelines.encoders.libz)."""
    for tar_offset, bit_offset in deflate_boundaries(body):
        yield Checkpoint(tar_offset, bit_offset)


def checkpoint_spacing(tar_size: int) -> int:
    """Tar bytes between candidates: about SEGMENTS_WANTED segments per layer, so that the
    restore of a layer of a few MB (most layers) also runs on every core; the cost of a
    segment (its encoder primed with 32 KiB of history, its edges joined) stays small
    against the MIN_CHECKPOINT_SPACING bytes it encodes."""
    return min(CHECKPOINT_SPACING, max(MIN_CHECKPOINT_SPACING, tar_size // SEGMENTS_WANTED))


def choose_candidates(
    boundaries: Iterable[Checkpoint],
    tar_size: int,
    resumable_at: Callable[[int], bool],
    spacing: int = CHECKPOINT_SPACING,
) -> list[Checkpoint]:
    """About one boundary every `spacing` tar bytes where the encoder can resume; of
    several boundaries at one tar offset (an empty sync block) the last one."""
    return choose_candidates_avoiding(boundaries, tar_size, resumable_at, [], spacing)


def choose_candidates_avoiding(
    boundaries: Iterable[Checkpoint],
    tar_size: int,
    resumable_at: Callable[[int], bool],
    avoid: Sequence[tuple[int, int]],
    spacing: int = CHECKPOINT_SPACING,
) -> list[Checkpoint]:
    """choose_candidates, with no checkpoint in or near (AVOID_MARGIN) the tar spans
    `avoid` (large files) that are kept whole, and at most CUTS_PER_FILE in each of the
    others (`_cut`)."""
    kept = [(start, end) for start, end in avoid if not _cut(end - start)]
    cut = sorted((start, end) for start, end in avoid if _cut(end - start))
    blocked = sorted((start - AVOID_MARGIN, end + AVOID_MARGIN) for start, end in kept)

    def allowed(offset: int) -> bool:
        index = bisect.bisect_right(blocked, (offset, tar_size)) - 1
        return resumable_at(offset) and not (index >= 0 and blocked[index][1] > offset)

    def step_at(offset: int) -> int:
        """The tar bytes wanted since the last checkpoint, for one at `offset`."""
        index = bisect.bisect_right(cut, (offset, tar_size)) - 1
        if index < 0 or cut[index][1] <= offset:
            return spacing if chosen else min(spacing, FIRST_SEGMENT_TAR_BYTES)
        start, end = cut[index]
        return max(spacing, (end - start) // CUTS_PER_FILE)

    last_at: dict[int, Checkpoint] = {}
    for point in boundaries:
        if 0 < point.tar_offset < tar_size:
            last_at[point.tar_offset] = point
    chosen: list[Checkpoint] = []
    last = 0
    for offset in sorted(last_at):
        if (
            offset - last >= step_at(offset)
            and allowed(offset)
            and tar_size - offset >= spacing // 4
        ):
            chosen.append(last_at[offset])
            last = offset
    return chosen


def _cut(file_bytes: int) -> bool:
    """Whether a large file gets checkpoints inside it (else it is kept whole)."""
    return KEPT_WHOLE_BYTES < file_bytes <= MAX_CUT_FILE_BYTES


# --------------------------------------------------------------------------- proving

EncodeSegment = Callable[[Segment], Buffer | None]  # its bits, from its start alone
ReadBits = Callable[[Segment], Buffer | None]  # the pushed payload's bits of a segment


@dataclass(frozen=True)
class Proof:
    """What the proof found: the checkpoints that stand (None if segment 0 itself does
    not reproduce the pushed payload: the encoder is wrong), and the segments' bits."""

    checkpoints: Checkpoints | None
    rounds: int


def prove(
    plan: Checkpoints,
    encode_segment: EncodeSegment,
    read_bits: ReadBits,
    pool: Executor,
) -> Proof:
    """Re-encode every segment of `plan` from its start (in `pool`), compare each with the
    pushed bits; drop the start of every segment that differs and try the merged segments
    again. The result's checkpoints reproduce the pushed payload segment by segment."""
    known: dict[tuple[int, int], bool] = {}  # (tar_start, tar_end) -> matched
    current = plan
    rounds = 0
    while True:
        rounds += 1
        segments = current.segments()
        todo = [s for s in segments if (s.tar_start, s.tar_end) not in known]
        outcomes = pool.map(lambda s: encode_segment(s) == read_bits(s), todo)
        for segment, matched in zip(todo, outcomes, strict=True):
            known[(segment.tar_start, segment.tar_end)] = matched
        failed = {s.index for s in segments if not known[(s.tar_start, s.tar_end)]}
        if not failed:
            return Proof(current, rounds)
        if 0 in failed:  # segment 0 is the encoder from the stream's start: not this one
            return Proof(None, rounds)
        if rounds >= MAX_PROOF_ROUNDS:
            kept: tuple[Checkpoint, ...] = ()  # settle it with one serial segment
        else:
            kept = tuple(p for i, p in enumerate(current.points, start=1) if i not in failed)
        current = replace(current, points=kept)


# --------------------------------------------------------------------------- segments

ReadTar = Callable[[int, int], Pieces]  # tar bytes [start, end)


def cut(pieces: Iterable[Buffer], start: int, end: int) -> list[memoryview]:
    """Bytes [start, end) of the pieces laid end to end, as views of them."""
    views, offset = [], 0
    for piece in pieces:
        if offset >= end:
            break
        if offset + len(piece) > start:
            views.append(memoryview(piece)[max(0, start - offset) : end - offset])
        offset += len(piece)
    return views


def window_reader(window_start: int, window: Pieces) -> ReadTar:
    """A ReadTar of tar bytes already read: `window`, from `window_start` on."""

    def read_tar(start: int, end: int) -> list[memoryview]:
        return cut(window, start - window_start, end - window_start)

    return read_tar


def segment_input(encoder: Encoder, segment: Segment, tar_size: int) -> tuple[int, int]:
    """The tar bytes [start, end) that re-encoding `segment` reads: its encoder's history
    before it and lookahead after it."""
    start = max(0, segment.tar_start - encoder.history_bytes)
    end = tar_size if segment.final else min(tar_size, segment.tar_end + encoder.lookahead_bytes)
    return start, end


def encode_segment(
    encoder: Encoder, segment: Segment, read_tar: ReadTar, tar_size: int
) -> memoryview:
    """The bits of `segment` (edge-masked bytes), re-encoded from its start alone from the
    tar bytes around it; raises SegmentError if the encoder's output cannot hold them."""
    if segment.tar_start and not encoder.resumable_at(segment.tar_start):
        raise SegmentError(f"{encoder.encoder_id} cannot resume at {segment.tar_start}")
    history_start, end = segment_input(encoder, segment, tar_size)
    tar = read_tar(history_start, end)
    given = total_length(tar)
    if given != end - history_start:
        raise SegmentError(f"the tar gave {given} bytes, not {end - history_start}")
    split, stop = segment.tar_start - history_start, segment.tar_end - history_start
    encoded = encoder.encode_segment(
        cut(tar, 0, split),
        cut(tar, split, stop),
        cut(tar, stop, given),
        offset=segment.tar_start,
        final=segment.final,
        align=segment.align,
    )
    bits = edge_masked(encoded, segment)
    if bits is None:
        raise SegmentError(f"segment {segment.index} does not end where it should")
    return bits


# --------------------------------------------------------------------------- at ingest


@dataclass(frozen=True)
class PushedPayload:
    """The compressed payload of the pushed blob (a gzip blob's deflate body)."""

    chunks: Callable[[], Iterable[bytes]]  # all of it, from its first byte
    read: Callable[[int, int], bytes]  # bytes [start, end) of it
    size: int


def find_candidates(
    encoder: Encoder,
    blob_digest: str,
    tar_size: int,
    payload: PushedPayload,
    spacing: int = CHECKPOINT_SPACING,
    avoid: Sequence[tuple[int, int]] = (),
) -> Checkpoints:
    """Candidate checkpoints at the block boundaries of the pushed payload, away from the
    tar spans `avoid` (large files)."""
    found = boundaries(payload.chunks())
    candidates = choose_candidates_avoiding(found, tar_size, encoder.resumable_at, avoid, spacing)
    return Checkpoints(
        blob_digest, encoder.encoder_id, tar_size, payload.size * 8, tuple(candidates),
        len(candidates),
    )  # fmt: skip


def find_and_prove(
    encoder: Encoder,
    blob_digest: str,
    tar_size: int,
    payload: PushedPayload,
    read_tar: ReadTar,
    pool: Executor,
    spacing: int = CHECKPOINT_SPACING,
) -> Proof:
    """Find candidate checkpoints in the pushed payload and prove them on `read_tar` (the
    tar rebuilt from stored files): a proof whose checkpoints are None means this
    encoder does not reproduce the payload at all."""
    plan = find_candidates(encoder, blob_digest, tar_size, payload, spacing)
    return prove_plan(encoder, plan, payload, read_tar, pool)


def fits_in_memory(segment: Segment) -> bool:
    return segment.tar_end - segment.tar_start <= MAX_SEGMENT_TAR_BYTES


# The core a segment's encoding holds (pipelines.serve.cores): taken once its tar is read
CoreFor = Callable[[Segment], AbstractContextManager[object]]


def any_core(_segment: Segment) -> AbstractContextManager[object]:
    """No core to take: the encoding runs as soon as its tar is read."""
    return contextlib.nullcontext()


def prove_plan(
    encoder: Encoder, plan: Checkpoints, payload: PushedPayload, read_tar: ReadTar, pool: Executor,
    core: CoreFor = any_core,
) -> Proof:  # fmt: skip
    def encoded(segment: Segment) -> memoryview | None:
        if not fits_in_memory(segment):
            return None
        start, end = segment_input(encoder, segment, plan.tar_size)
        window = read_tar(start, end)  # the rebuild waits on S3: not on a core
        try:
            with core(segment):
                return encode_segment(encoder, segment, window_reader(start, window), plan.tar_size)
        except SegmentError:
            return None

    def pushed(segment: Segment) -> memoryview | None:
        data = payload.read(segment.bit_start // 8, (segment.bit_end + 7) // 8)
        return edge_masked(bytearray(data), segment)

    return prove(plan, encoded, pushed, pool)


def gzip_payload(read_blob: Callable[[int, int], Iterable[bytes]], blob_size: int,
                 params: bytes) -> PushedPayload:  # fmt: skip
    """The deflate body of a gzip blob, given a ranged reader of the blob."""
    header, trailer = decode_gzip_params(params)
    start, size = len(header), blob_size - len(header) - len(trailer)

    def read(first: int, end: int) -> bytes:
        return b"".join(read_blob(start + first, end - first))

    return PushedPayload(lambda: read_blob(start, size), read, size)


def prove_shortlisted(
    shortlist: Shortlist,
    blob_digest: str,
    tar_size: int,
    read_blob: Callable[[int, int], Iterable[bytes]],
    blob_size: int,
    read_tar: ReadTar,
    fallback: Callable[[], Match | NoMatch],
    avoid: Sequence[tuple[int, int]] = (),
    core: CoreFor = any_core,
) -> tuple[Match | NoMatch, Checkpoints | None]:
    """The trial restore of ingest. A gzip layer's best candidate is proven segment by
    segment, in parallel, from checkpoints found in the pushed blob: every bit of the
    body is compared with the pushed one, so this proves the encoder and the rebuilt tar
    as a full recompression would. Otherwise, or if that candidate is not the encoder,
    `fallback` (the serial proof of the whole shortlist) decides, without checkpoints."""
    trial = shortlist.trials[0] if shortlist.trials else None
    spacing = checkpoint_spacing(tar_size)
    if trial is None or not trial.screened or tar_size < 2 * spacing:
        return fallback(), None
    encoder, params = trial.screened[0], trial.target.params
    if not encoder.encoder_id.startswith("gzip/"):
        return fallback(), None
    payload = gzip_payload(read_blob, blob_size, params)
    plan = find_candidates(encoder, blob_digest, tar_size, payload, spacing, avoid)
    if not plan.points:  # nowhere to resume: the usual serial proof
        return fallback(), None
    with ThreadPoolExecutor(PROOF_THREADS, thread_name_prefix="proof") as pool:
        proof = prove_plan(encoder, plan, payload, read_tar, pool, core)
    if proof.checkpoints is None:
        return fallback(), None
    logger.info(
        "%s: %d of %d checkpoints proven (%s), %d rounds", blob_digest,
        len(proof.checkpoints.points), proof.checkpoints.candidates, encoder.encoder_id,
        proof.rounds,
    )  # fmt: skip
    return Match(
        encoder.encoder_id, params
    ), proof.checkpoints if proof.checkpoints.points else None
