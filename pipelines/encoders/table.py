"""The encoder table: every encoder this build knows, an encoder looked up by its stored
id, and `encode`, which streams a blob's exact bytes for a recipe's encoder id and params.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pipelines.encoders.base import Encoder, EncoderUnavailableError
from pipelines.encoders.gzip_families import (
    PGZIP_BLOCK_SIZES,
    GoStdlibEncoder,
    GzipProgramEncoder,
    PgzipEncoder,
    ZlibEncoder,
    decode_gzip_params,
    pgzip_library,
)
from pipelines.encoders.zstd_cli import zstd_cli_encoders
from pipelines.encoders.zstd_families import (
    KLAUSPOST_WINDOWS,
    ZSTD_CHUNKED_LEVELS,
    KlauspostZstdEncoder,
    ZstdChunkedEncoder,
    ZstdEncoder,
    klauspost_zstd_library,
    zstd_chunked_library,
)
from pipelines.encoders.zstd_frames import FRAMES_PREFIX, ZstdFramesEncoder

IDENTITY_ID = "identity"
GO_GENERATIONS = ("1.26", "1.27")
GO_LEVELS = (6, 1, 9, 2, 3, 4, 5, 7, 8, -2, 0)  # default (6) and BestSpeed first
PGZIP_LEVELS = (5, 1, 9, 6, 2, 3, 4, 7, 8, -2, 0)  # klauspost default is 5
ZLIB_LEVELS = (6, 9, 1, 2, 3, 4, 5, 7, 8, 0)
PROGRAM_LEVELS = (6, 9, 1, 2, 3, 4, 5, 7, 8)  # GNU gzip and pigz: -6 is the default
ZSTD_LEVELS = (3, *range(1, 3), *range(4, 20), -1, -3, -5, *range(20, 23))


def gzip_encoders() -> list[Encoder]:
    encoders: list[Encoder] = [ZlibEncoder(level) for level in ZLIB_LEVELS]
    for generation in GO_GENERATIONS:
        encoders += [GoStdlibEncoder(generation, level) for level in GO_LEVELS]
    library = pgzip_library()
    if library is not None:
        for block_size in PGZIP_BLOCK_SIZES:
            encoders += [PgzipEncoder(library, block_size, level) for level in PGZIP_LEVELS]
    for program in ("gnu", "pigz"):
        encoders += [GzipProgramEncoder(program, level) for level in PROGRAM_LEVELS]
    # pigz -p 1 (or on one core): only its levels 1-3 write other bytes than in parallel
    encoders += [GzipProgramEncoder("pigz", level, single_thread=True) for level in (1, 2, 3)]
    return encoders


def zstd_encoders() -> list[Encoder]:
    """Streaming encoders (screenable) first, then workers and one-shot level by level."""
    encoders: list[Encoder] = [ZstdEncoder("stream", level) for level in ZSTD_LEVELS]
    encoders += [ZstdEncoder(mode, level) for level in ZSTD_LEVELS for mode in ("mt", "oneshot")]
    encoders += zstd_cli_encoders()  # the pinned zstd program
    library = klauspost_zstd_library()
    if library is not None:
        encoders += [KlauspostZstdEncoder(library, speed) for speed in KLAUSPOST_WINDOWS]
    chunked = zstd_chunked_library()
    if chunked is not None:
        encoders += [ZstdChunkedEncoder(chunked, speed) for speed in ZSTD_CHUNKED_LEVELS]
    return encoders


def all_encoders() -> list[Encoder]:
    """Every encoder this build knows, gzip first, whether or not it can run here."""
    return gzip_encoders() + zstd_encoders()


def prepare_encoders() -> None:
    """Make now the checks each encoder makes on first use (stock zlib's golden digests,
    the helpers' versions: ~130 ms here), so that a process that serves GETs does not
    make its first restore pay them."""
    for encoder in all_encoders():
        encoder.unavailable_reason()


def vouching_encoder_id(encoder_id: str) -> str:
    """The id whose canary vouches for an encoder: a multi-frame zstd layer's frames
    encoder is as safe as the encoder of its frames (pipelines.encoders.zstd_frames)."""
    return encoder_id.removeprefix(FRAMES_PREFIX)


def lookup_encoder(encoder_id: str) -> Encoder:
    """The encoder for a stored id; raises EncoderUnavailableError if it cannot run here."""
    if encoder_id.startswith(FRAMES_PREFIX):
        return ZstdFramesEncoder(lookup_encoder(encoder_id.removeprefix(FRAMES_PREFIX)))
    for encoder in all_encoders():
        if encoder.encoder_id == encoder_id:
            reason = encoder.unavailable_reason()
            if reason:
                raise EncoderUnavailableError(f"{encoder_id}: {reason}")
            return encoder
    if encoder_id.startswith("gzip/pgzip"):
        raise EncoderUnavailableError(
            f"{encoder_id}: no matching pgzip helper (found: {pgzip_library() or 'none'})"
        )
    if encoder_id.startswith("zstd/chunked"):
        found = zstd_chunked_library() or "none"
        raise EncoderUnavailableError(f"{encoder_id}: no matching zstd:chunked helper ({found})")
    if encoder_id.startswith("zstd/klauspost"):
        found = klauspost_zstd_library() or "none"
        raise EncoderUnavailableError(
            f"{encoder_id}: no matching klauspost zstd helper (found: {found})"
        )
    raise EncoderUnavailableError(f"{encoder_id}: unknown encoder (or other library version)")


def encode(encoder_id: str, encoder_params: bytes, tar_chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The exact blob bytes, streamed, for a recipe's encoder id and params."""
    if encoder_id == IDENTITY_ID:
        yield from tar_chunks
        return
    encoder = lookup_encoder(encoder_id)
    if encoder_id.startswith("gzip/"):
        header, trailer = decode_gzip_params(encoder_params)
        yield header
        yield from encoder.body(tar_chunks, encoder_params)
        yield trailer
    else:
        yield from encoder.body(tar_chunks, encoder_params)
