"""Detection and proof: which encoder made a layer blob.

`find_encoder` screens candidates on a prefix of the tar, then proves the survivor by
recompressing everything and comparing the sha256 with the digest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO

import zstandard

from pipelines.encoders.base import Encoder, HelperFailedError, Match, NoMatch, OpenStream
from pipelines.encoders.gzip_families import (
    GZIP_TRAILER_LEN,
    GoStdlibEncoder,
    GzipProgramEncoder,
    PgzipEncoder,
    encode_gzip_params,
)
from pipelines.encoders.table import IDENTITY_ID, gzip_encoders, zstd_encoders
from pipelines.encoders.zstd_cli import ZstdCliEncoder
from pipelines.encoders.zstd_families import (
    KLAUSPOST_FIRST_WRITES,
    KLAUSPOST_WINDOWS,
    ZSTD_CHUNKED_FOOTER_LEN,
    ZSTD_ONESHOT_MAX,
    KlauspostOptions,
    KlauspostZstdEncoder,
    ZstdChunkedEncoder,
    ZstdEncoder,
    ZstdOptions,
    is_zstd_chunked,
)
from pipelines.formats.codecs import (
    GZIP_MAGIC,
    GZIP_OS_UNIX,
    Sniff,
    gzip_header_length,
    iter_chunks,
    parse_zstd_frame_header,
)

# Screening: a small prefix drops most candidates, a larger one the look-alikes.
SCREEN_STAGES = (128 * 1024, 1024 * 1024, 4 * 1024 * 1024)
# A stage-1 agreement over this much output is proof enough to go to the full check.
SCREEN_CONCLUSIVE_BYTES = 16 * 1024
# Encoders that cannot be screened (zstd workers, one-shot) are tried by full
# recompression until this much tar has been fed to them in total.
UNSCREENED_BUDGET_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class _Target:
    """What the candidate must reproduce: payload prefix and framing."""

    payload_prefix: bytes  # the blob minus gzip header, at most SCREEN_STAGES[-1]-ish
    prefix_is_whole: bool
    params: bytes
    frame_before: bytes  # gzip header (b"" for zstd)
    frame_after: bytes  # gzip trailer (b"" for zstd)


@dataclass(frozen=True)
class _Trial:
    """Candidates for one framing guess, after screening on the tar prefix."""

    target: _Target
    screened: list[Encoder]  # passed screening, best guess first
    unscreened: list[Encoder]  # cannot be judged on a prefix: full recompression only
    available: list[Encoder]
    skipped: list[str]  # why unavailable candidates were left out


@dataclass(frozen=True)
class Shortlist:
    """Encoders that reproduce the start of a blob; `prove` settles which, if any, makes
    all of it. An identity shortlist stands for a plain tar blob."""

    trials: tuple[_Trial, ...]
    identity: bool = False

    @property
    def screened(self) -> bool:
        """Whether some candidate matched the prefix (else all are unscreenable)."""
        return self.identity or any(trial.screened for trial in self.trials)

    def narrowed(self, encoder_id: str) -> Shortlist:
        """The same shortlist with only this encoder left, to prove it again."""
        return Shortlist(
            tuple(
                replace(
                    trial,
                    screened=[
                        e for e in trial.screened + trial.unscreened if e.encoder_id == encoder_id
                    ],
                    unscreened=[],
                )
                for trial in self.trials
            ),
            self.identity,
        )


def find_encoder(
    open_blob: OpenStream,
    open_tar: OpenStream,
    blob_digest: str,
    sniff: Sniff,
    only: str | None = None,
) -> Match | NoMatch:
    """Find an encoder that regenerates the blob exactly from its tar.

    open_blob/open_tar open fresh streams of the compressed blob and of its tar;
    blob_digest is "sha256:<hex>" or "<hex>". Screens candidates on a tar prefix,
    then proves a survivor by full recompression and sha256 comparison."""
    found = shortlist(open_blob, open_tar, sniff, only)
    return found if isinstance(found, NoMatch) else prove(found, open_tar, blob_digest)


def shortlist(
    open_blob: OpenStream, open_tar: OpenStream, sniff: Sniff, only: str | None = None
) -> Shortlist | NoMatch:
    """Screen the candidates (only the encoder of id `only`, if given) on a prefix of the
    tar: cheap, and nothing survives for a blob no encoder here could make. Reads only the
    start of the tar, except for a zstd frame that does not record its content size (then
    the tar's length is needed)."""
    if sniff.kind == "tar":
        return Shortlist((), identity=True)
    if sniff.kind == "gzip":
        trials = _gzip_trials(open_blob, sniff)
    elif sniff.kind == "zstd":
        trials = _zstd_trials(open_blob, open_tar)
    else:
        return NoMatch(f"blob kind {sniff.kind!r} has no encoder")
    if isinstance(trials, NoMatch):
        return trials
    if only is not None:
        trials = [(target, [e for e in found if e.encoder_id == only]) for target, found in trials]
    with open_tar() as tar:
        tar_prefix = tar.read(SCREEN_STAGES[-1])
    screened = tuple(_screen(candidates, target, tar_prefix) for target, candidates in trials)
    if not any(trial.screened or trial.unscreened for trial in screened):
        return NoMatch(_no_match_reason(screened))
    return Shortlist(screened)


def shortlist_of(encoder: Encoder, params: bytes) -> Shortlist:
    """A shortlist of one encoder matched already (on parts of the blob: each frame of a
    multi-frame zstd layer), for `prove` to settle on the whole blob."""
    target = _Target(b"", False, params, b"", b"")
    return Shortlist((_Trial(target, [encoder], [], [encoder], []),))


def prove(found: Shortlist, open_tar: OpenStream, blob_digest: str) -> Match | NoMatch:
    """Recompress the whole tar with the shortlisted encoders, best guess first, until one
    reproduces the blob's sha256. `open_tar` may be a rebuild of the tar from stored
    files: then a match also proves that rebuild."""
    digest = _hex_digest(blob_digest)
    if found.identity:
        if _full_digest(None, None, open_tar)[0] == digest:
            return Match(IDENTITY_ID, b"")
        return NoMatch("the tar does not hash to the blob digest")
    tried: list[Encoder] = []
    for trial in found.trials:
        for encoder in trial.screened:
            tried.append(encoder)
            if _tried_digest(encoder, trial.target, open_tar)[0] == digest:
                return Match(encoder.encoder_id, trial.target.params)
    spent = 0
    for trial in found.trials:
        for encoder in trial.unscreened:
            if spent >= UNSCREENED_BUDGET_BYTES:
                break
            tried.append(encoder)
            produced, tar_bytes = _tried_digest(encoder, trial.target, open_tar)
            if produced == digest:
                return Match(encoder.encoder_id, trial.target.params)
            spent += tar_bytes
    return NoMatch(_no_match_reason(found.trials, tried))


def _tried_digest(encoder: Encoder, target: _Target, open_tar: OpenStream) -> tuple[str, int]:
    """_full_digest, where a helper that fails on this tar simply does not reproduce it."""
    try:
        return _full_digest(encoder, target, open_tar)
    except HelperFailedError:
        return "", 0


def _hex_digest(digest: str) -> str:
    return digest.removeprefix("sha256:").lower()


def _gzip_trials(
    open_blob: OpenStream, sniff: Sniff
) -> list[tuple[_Target, list[Encoder]]] | NoMatch:
    head_len = SCREEN_STAGES[-1] + 64 * 1024
    with open_blob() as blob:
        head = blob.read(head_len)
        trailer = _read_tail(blob, head, GZIP_TRAILER_LEN)
    header_len = gzip_header_length(head)
    if header_len is None or not head.startswith(GZIP_MAGIC):
        return NoMatch("malformed gzip header")
    whole = len(head) < head_len
    payload = head[header_len : len(head) - GZIP_TRAILER_LEN] if whole else head[header_len:]
    header = head[:header_len]
    params = encode_gzip_params(header, trailer)
    return [(_Target(payload, whole, params, header, trailer), _ordered_gzip_candidates(sniff))]


def _read_tail(stream: BinaryIO, head: bytes, n: int) -> bytes:
    """The last n bytes of a stream whose first bytes `head` were already read."""
    if stream.seekable():
        stream.seek(0, os.SEEK_END)
        if stream.tell() >= n:
            stream.seek(-n, os.SEEK_END)
            return stream.read(n)
    tail = head[-n:]
    for chunk in iter_chunks(stream):
        tail = (tail + chunk)[-n:]
    return tail


def _ordered_gzip_candidates(sniff: Sniff) -> list[Encoder]:
    """The gzip encoders that could have written this header: the producer family the
    header suggests first, and within a family the level XFL suggests first."""
    family_order = {
        "go-stdlib": ("gzip/go", "gzip/zlib", "gzip/pgzip"),
        "pgzip": ("gzip/pgzip", "gzip/go", "gzip/zlib"),
        "gnu-gzip": ("gzip/gnu", "gzip/pigz", "gzip/zlib"),
    }.get(sniff.producer_hint or "", ("gzip/zlib", "gzip/go", "gzip/pgzip", "gzip/gnu"))
    preferred_level = {2: 9, 4: 1}.get(sniff.xfl or 0)

    def rank(encoder: Encoder) -> tuple[int, int]:
        family = next(
            (i for i, prefix in enumerate(family_order) if encoder.encoder_id.startswith(prefix)),
            len(family_order),
        )
        level_bonus = 0 if getattr(encoder, "level", None) == preferred_level else 1
        return family, level_bonus

    candidates = [
        e for e in gzip_encoders() if _xfl_consistent(e, sniff.xfl) and _os_consistent(e, sniff.os)
    ]
    return sorted(candidates, key=rank)


def _xfl_consistent(encoder: Encoder, xfl: int | None) -> bool:
    """Go and pgzip write their own header: XFL is 2 exactly for level 9 and 4 exactly
    for level 1. zlib users (Python, Java, zlib's wrapper) set XFL in other ways."""
    if not isinstance(encoder, GoStdlibEncoder | PgzipEncoder | GzipProgramEncoder):
        return True
    return {9: 2, 1: 4}.get(encoder.level, 0) == xfl


def _os_consistent(encoder: Encoder, os_code: int | None) -> bool:
    """GNU gzip and pigz write their own header, with OS 3 (Unix)."""
    return not isinstance(encoder, GzipProgramEncoder) or os_code == GZIP_OS_UNIX


def _zstd_trials(
    open_blob: OpenStream, open_tar: OpenStream
) -> list[tuple[_Target, list[Encoder]]] | NoMatch:
    head_len = SCREEN_STAGES[-1] + 64 * 1024
    with open_blob() as blob:
        head = blob.read(head_len)
        tail = _read_tail(blob, head, ZSTD_CHUNKED_FOOTER_LEN)
    frame = parse_zstd_frame_header(head)
    if frame is None:
        return NoMatch("malformed zstd frame header")
    if frame.dict_id:
        return NoMatch(f"zstd frame uses dictionary {frame.dict_id}")
    whole = len(head) < head_len
    if is_zstd_chunked(tail):  # many frames and a table of contents: no one-frame encoder
        chunked: list[Encoder] = [e for e in zstd_encoders() if isinstance(e, ZstdChunkedEncoder)]
        return [(_Target(head, whole, b"", b"", b""), chunked)]
    tar_size = frame.content_size if frame.content_size is not None else _stream_size(open_tar)
    encoders = zstd_encoders()
    candidates: list[Encoder] = [  # the one-frame encoders with libzstd's framing
        encoder
        for encoder in encoders
        if not isinstance(encoder, KlauspostZstdEncoder | ZstdChunkedEncoder)
        and not (_mode(encoder) == "oneshot" and tar_size > ZSTD_ONESHOT_MAX)
    ]  # fmt: skip
    # A compressor that does not know the size uses its level's own window; one-shot
    # compression always knows the size.
    trials: list[tuple[_Target, list[Encoder]]] = [
        (
            _Target(head, whole, options.encode(), b"", b""),
            [
                e
                for e in candidates
                if (options.pledged_size >= 0 or _mode(e) != "oneshot")
                and _zstd_window_fits(
                    e, frame.window_size, frame.single_segment, max(options.pledged_size, 0)
                )
            ],
        )
        for options in _zstd_option_guesses(frame.checksum, frame.content_size, tar_size)
    ]
    # klauspost streams a frame without a content size, with its level's window; small
    # inputs (one block, no split) go through EncodeAll, which writes both sizes.
    klauspost: list[Encoder] = [
        encoder
        for encoder in encoders
        if isinstance(encoder, KlauspostZstdEncoder)
        and (frame.content_size is not None
             or frame.window_size == KLAUSPOST_WINDOWS[encoder.speed])
    ]  # fmt: skip
    if klauspost:
        trials += [
            (_Target(head, whole, KlauspostOptions(frame.checksum, first).encode(), b"", b""),
             klauspost)
            for first in KLAUSPOST_FIRST_WRITES
        ]  # fmt: skip
    return trials


def _mode(encoder: Encoder) -> str | None:
    return encoder.mode if isinstance(encoder, ZstdEncoder) else None


def _zstd_option_guesses(
    checksum: bool, content_size: int | None, tar_size: int
) -> list[ZstdOptions]:
    if content_size is not None:
        return [ZstdOptions(checksum, True, content_size)]
    # No size in the header: the size was unknown, or known but not written.
    return [ZstdOptions(checksum, True, -1), ZstdOptions(checksum, False, tar_size)]


def _zstd_window_fits(
    encoder: Encoder, window: int | None, single_segment: bool, size: int
) -> bool:
    """Whether the encoder at its level writes this window for a source of `size` bytes
    (0: unknown to the compressor)."""
    if isinstance(encoder, ZstdCliEncoder) and not (single_segment or window is None):
        return window == 1 << encoder.window_log(size or None)
    if single_segment or window is None or not isinstance(encoder, ZstdEncoder):
        return True
    params = zstandard.ZstdCompressionParameters.from_level(encoder.level, source_size=size)
    return bool(1 << params.window_log == window)


def _stream_size(open_stream: OpenStream) -> int:
    with open_stream() as stream:
        return sum(len(chunk) for chunk in iter_chunks(stream))


def _screen(candidates: list[Encoder], target: _Target, tar_prefix: bytes) -> _Trial:
    available = [e for e in candidates if e.unavailable_reason() is None]
    skipped = sorted({r for e in candidates if (r := e.unavailable_reason())})
    screened: list[Encoder] = []
    unscreened: list[Encoder] = []
    whole = len(tar_prefix) < SCREEN_STAGES[-1] and target.prefix_is_whole
    for encoder in available:
        if whole:  # a small blob: compare all of it, which no prefix screen can match
            verdict = _small_blob_verdict(encoder, tar_prefix, target)
        else:
            verdict = _screen_verdict(encoder, tar_prefix, target)
            if verdict == "unscreened" and _prescreen_rejects(encoder, tar_prefix, target):
                verdict = "reject"
        if verdict == "pass":
            screened.append(encoder)
        elif verdict == "unscreened":
            unscreened.append(encoder)
    return _Trial(target, screened, unscreened, available, skipped)


def _prescreen_rejects(encoder: Encoder, tar_prefix: bytes, target: _Target) -> bool:
    """Whether the first bytes the encoder would write already contradict the blob:
    a cheap rejection before a full trial."""
    produced = encoder.prescreen(tar_prefix, target.params)
    return produced is not None and not _is_prefix_of_payload(produced, target)


def _small_blob_verdict(encoder: Encoder, tar: bytes, target: _Target) -> str:
    """A blob whose whole tar is at hand: the screen's stages shorter than the tar reject
    most candidates for a fraction of a full compression each; the rest are compared
    whole."""
    if _prescreen_rejects(encoder, tar, target):
        return "reject"
    stages = tuple(stage for stage in SCREEN_STAGES if stage < len(tar))
    if _screen_verdict(encoder, tar, target, stages) == "reject":
        return "reject"
    return _whole_verdict(encoder, tar, target)


def _whole_verdict(encoder: Encoder, tar: bytes, target: _Target) -> str:
    """Small blobs: the whole tar and blob are at hand, so compare them outright."""
    try:
        produced = b"".join(encoder.body([tar], target.params))
    except HelperFailedError:
        return "reject"
    return "pass" if produced == target.payload_prefix else "reject"


def _screen_verdict(
    encoder: Encoder, tar_prefix: bytes, target: _Target, stages: Sequence[int] = SCREEN_STAGES
) -> str:
    """ "reject" if a produced prefix contradicts the blob, "pass" if one agreed,
    "unscreened" if the encoder cannot be judged on a prefix."""
    verdict = "unscreened"
    for stage in stages:
        produced = encoder.screen(tar_prefix[:stage], target.params)
        if produced is None:
            continue
        if not _is_prefix_of_payload(produced, target):
            return "reject"
        verdict = "pass"
        # The first stage never concludes: pigz writes zlib's very bytes up to its first
        # 128 KiB block's end (and pigz with larger blocks pigz's).
        conclusive = len(produced) >= SCREEN_CONCLUSIVE_BYTES and stage > SCREEN_STAGES[0]
        if stage >= len(tar_prefix) or conclusive:
            break
    return verdict


def _is_prefix_of_payload(produced: bytes, target: _Target) -> bool:
    if len(produced) > len(target.payload_prefix) and target.prefix_is_whole:
        return False
    return target.payload_prefix.startswith(produced[: len(target.payload_prefix)])


def _full_digest(
    encoder: Encoder | None, target: _Target | None, open_tar: OpenStream
) -> tuple[str, int]:
    """sha256 of the blob the encoder makes from the whole tar (of the tar itself when
    there is no encoder), and the tar's size."""
    digest = hashlib.sha256(target.frame_before if target else b"")
    tar_bytes = 0

    def counted(chunks: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal tar_bytes
        for chunk in chunks:
            tar_bytes += len(chunk)
            yield chunk

    with open_tar() as tar:
        tar_chunks = counted(iter_chunks(tar))
        produced = tar_chunks if encoder is None else encoder.body(tar_chunks, _params(target))
        for chunk in produced:
            digest.update(chunk)
    digest.update(target.frame_after if target else b"")
    return digest.hexdigest(), tar_bytes


def _params(target: _Target | None) -> bytes:
    return target.params if target else b""


def _no_match_reason(trials: Sequence[_Trial], proven_wrong: Sequence[Encoder] = ()) -> str:
    available = list(dict.fromkeys(e.encoder_id for trial in trials for e in trial.available))
    skipped = sorted({reason for trial in trials for reason in trial.skipped})
    if not available and not skipped:
        return "no encoder here can write this framing (e.g. its zstd window and size)"
    reason = f"no candidate reproduces the blob: tried {_summarise_ids(available)}"
    if proven_wrong:
        passed = _summarise_ids(list(dict.fromkeys(e.encoder_id for e in proven_wrong)))
        reason += f"; recompressed in full but digest differs: {passed}"
    if skipped:
        reason += f"; unavailable: {'; '.join(skipped)}"
    return reason


def _summarise_ids(ids: list[str]) -> str:
    """'gzip/go1.26/{6,1,9}' style grouping of encoder ids by everything but the level."""
    groups: dict[str, list[str]] = {}
    for encoder_id in ids:
        family, _, level = encoder_id.rpartition("/")
        groups.setdefault(family, []).append(level)
    return ", ".join(f"{family}/{{{','.join(levels)}}}" for family, levels in groups.items())
