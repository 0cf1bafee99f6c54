"""Restoring deduplicated layers: the recipe's tar rebuilt from stored files (each checked
against its sha256; pipelines.serve.rebuild), recompressed by the recorded encoder, and
released segment by segment only once verified (`pipelines.formats.verify`), so wrong
bytes are never served as good.

`RestoreHub` makes concurrent GETs of one layer share a single restore, also across the
API processes of one host: the first request restores into a spool file, the others
follow that file as it grows. Only verified bytes are ever written to the spool, so a
reader may read whatever the file holds. This is the seam where a shared layer buffer
will sit.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO

from pipelines.config import HOST_CORES
from pipelines.encoders.base import Encoder, charge_cpu, thread_cpu_seconds
from pipelines.encoders.gzip_families import decode_gzip_params
from pipelines.encoders.table import encode, lookup_encoder
from pipelines.errors import RegistryError, is_transient
from pipelines.formats import Buffer, total_length
from pipelines.formats.recipe import Recipe
from pipelines.formats.verify import SPOOL_IN_MEMORY, release_verified
from pipelines.pauses import pause
from pipelines.serve.checkpoints import (
    Checkpoints,
    CoreFor,
    ReadTar,
    Segment,
    SegmentError,
    checkpoints_key,
    cut,
    encode_segment,
    fits_in_memory,
    join_segments,
    segment_input,
    window_reader,
)
from pipelines.serve.cores import CoreThreads, HostCores, Turn, background_turn, turn_now
from pipelines.serve.rebuild import (
    BATCH_BYTES,
    PREFETCH_BYTES,
    PREFETCH_THREADS,
    REPEATS_KEPT_BYTES,
    SPAN_LIMIT,
    RestoreError,
    file_paths,
    rebuild_tar,
    rebuild_tar_range,
)
from pipelines.store.filestore import (
    IN_MEMORY_LIMIT,
    FileStore,
    FileStoreError,
)
from pipelines.store.storage import ObjectNotFound, ObjectStore

POLL_SECONDS = 0.005
RESTORE_THREADS = HOST_CORES  # segments re-encoded at once on this host
SEGMENTS_AHEAD_BYTES = 64 << 20  # of tar cut into segments ahead of the one being joined

logger = logging.getLogger(__name__)

# An in-process encoder's own state (zlib's, libzstd's at its usual levels: a few MiB of
# window and tables) and the interpreter's buffers along the way.
WORKING_BYTES = 16 << 20


def restore_memory_bound() -> int:
    """The most one serial restore holds, whatever the layer (docs/architecture.md,
    Memory bounds): the tar planned ahead and the batch being planned (files decoded
    whole only when both their stored and real sizes are within SPAN_LIMIT), the stored
    bytes of the spans being decoded (one per prefetch thread), the files kept for their
    next occurrence in the tar, a large file's in-memory spool, the verified segment
    being checked, and the encoder's working state. Parallel restores add their
    segments'."""
    spans = PREFETCH_THREADS * SPAN_LIMIT
    planned = PREFETCH_BYTES + BATCH_BYTES + spans + REPEATS_KEPT_BYTES
    held = planned + IN_MEMORY_LIMIT + SPOOL_IN_MEMORY
    return held + WORKING_BYTES


class DamagedFileError(RestoreError):
    """A file of the layer is missing or damaged in the content store. Names the layer,
    the file by the sha256 it must hash to and its path in the layer's tar (where the
    recipe shows it), and the pack it was read from: what the recovery from corruption
    needs (docs/operations.md)."""

    def __init__(
        self, message: str, layer: str = "", file: str = "", path: str = "", pack: str = ""
    ) -> None:
        super().__init__(message)
        self.layer, self.file, self.path, self.pack = layer, file, path, pack


def damaged_file(recipe: Recipe, error: FileStoreError) -> DamagedFileError:
    """`error` (a file of this layer's recipe) with the layer and the file's path named."""
    if error.digest is None:
        return DamagedFileError(f"layer {recipe.blob_digest}: {error}", recipe.blob_digest)
    file = f"sha256:{error.digest.hex()}"
    path = file_paths(recipe, {error.digest}).get(error.digest, "")
    named = f"{file} ({path})" if path else file
    where = f" in pack {error.pack}" if error.pack else ""
    message = f"layer {recipe.blob_digest}: file {named}{where} {error.problem}"
    return DamagedFileError(message, recipe.blob_digest, file, path, error.pack)


def restore_blob(recipe: Recipe, files: FileStore) -> Iterator[Buffer]:
    """The pushed blob's bytes, each segment passed on only once it is verified. A layer
    with proven checkpoints is re-encoded segment by segment in parallel and joined."""
    rebuilt = _rebuilt_blob(recipe, files)
    verified = release_verified(rebuilt, recipe.blob_digest, recipe.blob_size, recipe.segments)
    return _naming_damage(verified, recipe)


def _naming_damage(chunks: Iterator[Buffer], recipe: Recipe) -> Iterator[Buffer]:
    """The chunks; a missing or damaged file's error names the layer and the file's path."""
    try:
        yield from chunks
    except FileStoreError as error:
        raise damaged_file(recipe, error) from error


def _rebuilt_blob(recipe: Recipe, files: FileStore) -> Iterator[Buffer]:
    plan = load_checkpoints(recipe, files.store)
    if plan is None:
        yield from encode(recipe.encoder_id, recipe.encoder_params, rebuild_tar(recipe, files))
        return
    header, trailer = decode_gzip_params(recipe.encoder_params)
    yield header
    bits = _runner_for(recipe)(recipe, files, plan)
    yield from join_segments(zip(bits, plan.segments(), strict=True))
    yield trailer


def load_checkpoints(recipe: Recipe, store: ObjectStore) -> Checkpoints | None:
    """The layer's proven checkpoints, or None (then the restore is serial): none were
    stored, the object cannot be read or decoded, or it is for another encoding."""
    try:
        plan = Checkpoints.decode(store.get_bytes(checkpoints_key(recipe.blob_digest)))
    except ObjectNotFound:
        return None
    except Exception as error:  # optional by design: never worse than a serial restore
        logger.warning("checkpoints of %s unusable, restoring serially: %s",
                       recipe.blob_digest, error)  # fmt: skip
        return None
    same = (plan.blob_digest, plan.encoder_id, plan.tar_size) == (
        recipe.blob_digest, recipe.encoder_id, recipe.tar_size)  # fmt: skip
    if not same or not plan.points or not recipe.encoder_id.startswith("gzip/"):
        return None
    if not all(fits_in_memory(segment) for segment in plan.segments()):
        return None  # proven before segments were bounded: a serial restore streams
    return plan


def encode_stored_segment(
    recipe: Recipe, files: FileStore, plan: Checkpoints, index: int, began: int | None = None
) -> memoryview:
    """The bits of segment `index` of a layer, from the tar rebuilt around it (before the
    encoding takes one of the host's cores, in the turn of a restore that `began`, by
    default now: the rebuild waits on S3)."""
    encoder = lookup_encoder(recipe.encoder_id)
    segment = plan.segments()[index]
    start, end = segment_input(encoder, segment, recipe.tar_size)
    window = list(rebuild_tar_range(recipe, files, start, end))
    turn = None if began is None else (began, index)
    return _encoded(encoder, segment, window_reader(start, window), recipe.tar_size, turn)


# One core per segment, shared by every restore of this process, and once
# `share_host_cores` named the host's directory, by every process of the host: however
# many layers restore at once, at most RESTORE_THREADS segments are encoded at a time,
# and a core one restore frees goes to the oldest restore with a segment waiting.
_segment_cores = HostCores(count=RESTORE_THREADS)


def share_host_cores(directory: Path) -> None:
    """Encode segments on cores shared with the other processes of this host that name
    `directory` (the API's processes and a restore worker beside them)."""
    global _segment_cores
    if _segment_cores.directory != directory:
        _segment_cores = HostCores(directory, RESTORE_THREADS)


def background_cores(began: int) -> CoreFor:
    """The core each segment of background work that `began` then (ns since the epoch:
    an ingest's proof) takes: one of those restores encode on, in a background turn."""
    return lambda segment: _segment_cores.held(background_turn(began, segment.index))


def _encoded(
    encoder: Encoder, segment: Segment, read_tar: ReadTar, tar_size: int, turn: Turn | None = None
) -> memoryview:
    """The segment's bits, encoded on a core of the host in `turn` (by default: now)."""
    with _segment_cores.held(turn):
        return _segment_bits(encoder, segment, read_tar, tar_size)


def _segment_bits(
    encoder: Encoder, segment: Segment, read_tar: ReadTar, tar_size: int
) -> memoryview:
    """The segment's bits, encoded on the core this thread holds."""
    try:
        bits = encode_segment(encoder, segment, read_tar, tar_size)
    except SegmentError as error:
        raise RestoreError(str(error)) from error
    pause("restore.segment_encoded", str(segment.index))  # its core not yet kept or freed
    return bits


def encode_layer_segment(
    store: ObjectStore, files: FileStore, recipe_key: str, index: int, began: int | None = None
) -> memoryview:
    """What a restore worker does for a parallel restore elsewhere (that `began` then):
    segment `index` of the layer whose recipe is at `recipe_key`."""
    recipe, plan = _layer_plan(store, recipe_key)
    if plan is None or index >= len(plan.segments()):
        raise RestoreError(f"{recipe.blob_digest} has no segment {index}")
    return encode_stored_segment(recipe, files, plan, index, began)


_plans: dict[tuple[int, str], tuple[Recipe, Checkpoints | None]] = {}
_PLANS_KEPT = 8  # a worker asked for one segment is likely asked for the next ones


def _layer_plan(store: ObjectStore, recipe_key: str) -> tuple[Recipe, Checkpoints | None]:
    """A layer's recipe and checkpoints, kept for the next segments (both are written
    once, before the layer's commit point, and never changed under the same key)."""
    key = (id(store), recipe_key)
    if key not in _plans:
        recipe = Recipe.decode(store.get_bytes(recipe_key))
        _plans[key] = (recipe, load_checkpoints(recipe, store))
        while len(_plans) > _PLANS_KEPT:
            del _plans[next(iter(_plans))]
    return _plans[key]


# Runs the segments of a plan, yielding their bits in order.
SegmentRunner = Callable[[Recipe, FileStore, Checkpoints], Iterator[Buffer]]
# Encodes segment `index` of a plan for a restore begun at the given time (ns since the
# epoch: the turn it takes a core in): here, or by asking another process or host.
SegmentEncoder = Callable[[Recipe, FileStore, Checkpoints, int, int], Buffer]


def local_runner(threads: int = RESTORE_THREADS) -> SegmentRunner:
    """Segments on this host's threads (the encoders run outside the GIL: zlib, or Go
    helper processes; at most RESTORE_THREADS at a time for all the restores of this
    host, see `share_host_cores`; a thread keeps its core for the restore's next segment
    unless an older restore waits, see `CoreThreads`), each cut from one streamed rebuild
    of the tar: a rebuild per segment would walk the recipe, and fetch the files at its
    edges, once per segment.
    Segments are cut ahead of the one being joined up to SEGMENTS_AHEAD_BYTES of input:
    one segment may be a few times longer than the others (a large file is kept whole in
    one, up to checkpoints.KEPT_WHOLE_BYTES), and the other threads go on meanwhile."""

    def run(recipe: Recipe, files: FileStore, plan: Checkpoints) -> Iterator[Buffer]:
        began = turn_now()[0]  # an older restore's segments take the host's cores first
        encoder = lookup_encoder(recipe.encoder_id)
        cuts = segment_cuts(encoder, plan.segments(), rebuild_tar(recipe, files), recipe.tar_size)
        pool: CoreThreads[tuple[Buffer, float]] = CoreThreads(threads, _segment_cores, "segment")
        pending: deque[tuple[Future[tuple[Buffer, float]], int]] = deque()
        ahead = 0
        broken: list[Exception] = []
        try:
            for segment, start, window in _until_broken(cuts, broken):
                read_tar = window_reader(start, window)
                job = functools.partial(_segment_bits, encoder, segment, read_tar, recipe.tar_size)
                size = total_length(window)
                pending.append(
                    (pool.submit((began, segment.index), functools.partial(_metered, job)), size)
                )
                ahead += size
                while pending and (pending[0][0].done() or ahead > SEGMENTS_AHEAD_BYTES):
                    future, size = pending.popleft()
                    ahead -= size
                    yield _charged(future.result())
            for future, _size in pending:
                yield _charged(future.result())
            if broken:  # a damaged file: raised once the segments cut before it went out
                raise broken[0]
        finally:
            pool.shutdown()

    return run


def _metered(work: Callable[[], Buffer]) -> tuple[Buffer, float]:
    """The bits `work` returns, with the CPU seconds it took on this (segment) thread."""
    started = thread_cpu_seconds()
    bits = work()
    return bits, thread_cpu_seconds() - started


def _charged(result: tuple[Buffer, float]) -> Buffer:
    """A segment's bits; its CPU counted as the restoring thread's, whose restore it is."""
    bits, seconds = result
    charge_cpu(seconds)
    return bits


def segment_cuts(
    encoder: Encoder, segments: list[Segment], tar: Iterator[bytes], tar_size: int
) -> Iterator[tuple[Segment, int, list[memoryview]]]:
    """Each segment with the tar offset and bytes of its encoder's input, cut in one pass
    over the tar (inputs overlap by the history and lookahead). The tar's chunks are held
    as they come and each input is views of them: no copy (the encoder copies its input
    once, into its helper's or its own buffer)."""
    held: deque[bytes] = deque()
    base = held_end = 0  # the tar offsets of the first held chunk and of the held bytes' end
    for segment in segments:
        start, end = segment_input(encoder, segment, tar_size)
        while held and base + len(held[0]) <= start:
            base += len(held.popleft())
        while held_end < end:
            chunk = next(tar, None)
            if chunk is None:
                raise RestoreError(f"the tar ends before byte {end}")
            held.append(chunk)
            held_end += len(chunk)
        yield segment, start, cut(held, start - base, end - base)


def _until_broken(
    cuts: Iterator[tuple[Segment, int, list[memoryview]]], broken: list[Exception]
) -> Iterator[tuple[Segment, int, list[memoryview]]]:
    """The cuts, until the tar fails: its error goes to `broken`, not up through the
    loop that is still sending the segments before it (a segment's own encoding error
    is not caught here, so no later segment can take its place)."""
    try:
        yield from cuts
    except Exception as error:
        broken.append(error)


def pooled_runner(slots: Sequence[SegmentEncoder], ahead: int = 0) -> SegmentRunner:
    """Segments shared among `slots` (each a thread calling its encoder: a local one, or
    one that waits for a restore worker), each slot taking the next segment when free, at
    most `ahead` (default: four per slot) past the one being joined: a segment many times
    longer than the others must not leave the other slots idle."""
    window = ahead or 4 * len(slots)

    def run(recipe: Recipe, files: FileStore, plan: Checkpoints) -> Iterator[Buffer]:
        shared = _Shared(len(plan.segments()), window)
        began = turn_now()[0]
        threads = [
            threading.Thread(
                target=shared.work,
                args=(functools.partial(encode, recipe, files, plan), began),
                daemon=True,
                name=f"segment-{number}",
            )
            for number, encode in enumerate(slots)
        ]
        for thread in threads:
            thread.start()
        try:
            yield from shared.in_order()
        finally:
            shared.stop()

    return run


class _Shared:
    """Segment indexes handed out to slots, and their results handed back in order."""

    def __init__(self, count: int, window: int) -> None:
        self.count, self.window = count, window
        self.next = self.consumed = 0
        self.results: dict[int, tuple[Buffer, float] | BaseException] = {}
        self.stopped = False
        self.changed = threading.Condition()

    def work(self, encode: Callable[[int, int], Buffer], began: int) -> None:
        """Encode (index, began) the segments handed out, until none is left."""
        while (index := self._take()) is not None:
            try:
                value: tuple[Buffer, float] | BaseException = _metered(
                    functools.partial(encode, index, began)
                )
            except BaseException as error:  # handed to the consumer
                value = error
            with self.changed:
                self.results[index] = value
                self.changed.notify_all()

    def _take(self) -> int | None:
        with self.changed:
            while (
                not self.stopped
                and self.next < self.count
                and (self.next - self.consumed >= self.window)
            ):
                self.changed.wait()
            if self.stopped or self.next >= self.count:
                return None
            self.next += 1
            return self.next - 1

    def in_order(self) -> Iterator[Buffer]:
        for index in range(self.count):
            with self.changed:
                while index not in self.results:
                    self.changed.wait()
                value = self.results.pop(index)
                self.consumed = index + 1
                self.changed.notify_all()
            if isinstance(value, BaseException):
                raise value
            yield _charged(value)

    def stop(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify_all()


_remote_runner: SegmentRunner | None = None
_remote_min_tar_bytes = 0


def use_restore_workers(runner: SegmentRunner | None, min_tar_bytes: int = 64 << 20) -> None:
    """Send the segments of layers of at least `min_tar_bytes` of tar to `runner` (the
    `restore` workers, set by the process that can reach them); None: this host only."""
    global _remote_runner, _remote_min_tar_bytes
    _remote_runner, _remote_min_tar_bytes = runner, min_tar_bytes


def _runner_for(recipe: Recipe) -> SegmentRunner:
    """Who encodes the segments: the restore workers for a large layer, if there are
    any, else this host's threads. (Also for pgzip, whose one stream uses every core by
    itself: its segments on served helpers took 10% less time and 5% less CPU, no pipe
    to feed and drain.)"""
    if _remote_runner is not None and recipe.tar_size >= _remote_min_tar_bytes:
        return _remote_runner
    return local_runner()


class RestoreHub:
    """One restore per layer at a time per host; every reader follows its spool file.

    The producer writes only verified bytes to the spool file, each write checked to be
    whole. The file's mode bits carry the restore's outcome, so that a reader holding the
    file open learns it even after the file was unlinked: 0o600 while restoring, 0o640
    once complete, 0o604 when the restore failed. The producer holds an exclusive flock
    while restoring, so readers can tell a crashed producer from a slow one.
    """

    def __init__(self, spool_dir: Path, keep_seconds: float = 30.0) -> None:
        self.spool_dir = spool_dir
        self.keep_seconds = keep_seconds
        # why this process's last restore of a layer failed: for its readers' errors (a
        # reader in another process learns only that it failed; the reason is logged)
        self._failures: dict[str, Exception] = {}
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.sweep()

    def sweep(self) -> None:
        """Remove spool files nobody is producing that outlived their keep time (their
        producer's timer died with its process)."""
        deadline = time.time() - self.keep_seconds
        for path in self.spool_dir.glob("*.data*"):
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as handle:
                status = os.fstat(handle.fileno())
                if status.st_mtime < deadline and not _producer_alive(handle):
                    _unlink_if_same(path, _identity(status))

    def state(self, digest: str) -> str | None:
        """ "restoring" or "complete" if this host has a spool file for the layer."""
        handle = _open_existing(self._path(digest))
        if handle is None:
            return None
        with handle:
            mode = _mode(handle)
        return {MODE_RESTORING: "restoring", MODE_VERIFIED: "complete"}.get(mode)

    def _path(self, digest: str) -> Path:
        return self.spool_dir / (digest.replace(":", "-") + ".data")

    def read(
        self,
        digest: str,
        size: int,
        produce: Callable[[], Iterable[Buffer]],
        offset: int = 0,
        length: int | None = None,
    ) -> Iterator[bytes]:
        """Bytes [offset, offset+length) of the restored layer, each passed on as soon as
        the segment holding it is verified. `produce` yields verified bytes only."""
        end = size if length is None else offset + length
        path = self._path(digest)
        while True:
            handle = self._claim_or_open(path, digest, size, produce)
            if handle is None:
                continue  # the previous producer died or its file went away: try again
            try:
                yield from _stream(handle, size, offset, end)
            except RestoreError as error:
                failure = self._failures.get(digest)
                if str(error) != RESTORE_FAILED or failure is None:
                    raise
                if isinstance(failure, RegistryError) or is_transient(failure):
                    raise failure from error  # not the layer's fault: come back (a 503)
                raise RestoreError(f"{error}: {failure}") from error
            return

    def _claim_or_open(
        self, path: Path, digest: str, size: int, produce: Callable[[], Iterable[Buffer]]
    ) -> BinaryIO | None:
        scratch = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
        descriptor = os.open(scratch, os.O_CREAT | os.O_TRUNC | os.O_RDWR, MODE_RESTORING)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        # opened by its own name: whatever later happens to `path`, this reads this file
        handle = open(scratch, "rb")  # noqa: SIM115 - the caller's generator closes it
        try:
            os.link(scratch, path)  # atomic: exactly one claimant wins
        except BaseException as error:
            handle.close()
            os.close(descriptor)
            if isinstance(error, FileExistsError):
                return _open_existing(path)
            raise
        finally:
            scratch.unlink()
        thread = threading.Thread(
            target=self._produce,
            name=f"restore-{digest[7:19]}",
            args=(descriptor, path, digest, size, produce),
            daemon=True,
        )
        thread.start()
        return handle

    def _produce(
        self,
        descriptor: int,
        path: Path,
        digest: str,
        size: int,
        produce: Callable[[], Iterable[Buffer]],
    ) -> None:
        outcome = MODE_FAILED
        try:
            for chunk in produce():
                _write_all(descriptor, chunk)
            if os.fstat(descriptor).st_size != size:
                raise RestoreError(f"the spool holds {os.fstat(descriptor).st_size} bytes")
            outcome = MODE_VERIFIED
            self._failures.pop(digest, None)
        except Exception as error:
            logger.exception("restore of %s failed", digest)
            self._failures[digest] = error
            while len(self._failures) > FAILURES_KEPT:
                del self._failures[next(iter(self._failures))]
        finally:  # whatever ended it: a file left restoring by a live process is waited on
            self._settle(descriptor, path, outcome)

    def _settle(self, descriptor: int, path: Path, outcome: int) -> None:
        """Mark the spool file with the restore's outcome and let it go. A failed one is
        removed while its flock is held, when `path` can only be this file: the next GET
        restores again, its readers still see the mode."""
        os.fchmod(descriptor, outcome)
        if outcome == MODE_FAILED:
            _unlink_quietly(path)
        judged = _identity(os.fstat(descriptor))
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)
        if outcome == MODE_VERIFIED:
            timer = threading.Timer(self.keep_seconds, _unlink_if_same, args=(path, judged))
            timer.daemon = True
            timer.start()


MODE_RESTORING, MODE_VERIFIED, MODE_FAILED = 0o600, 0o640, 0o604
RESTORE_FAILED = "the layer could not be restored to its digest"
FAILURES_KEPT = 64


def _write_all(descriptor: int, data: Buffer) -> None:
    """Write every byte: os.write may write fewer than it was given."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


def _open_existing(path: Path) -> BinaryIO | None:
    try:
        handle = open(path, "rb")  # noqa: SIM115 - the caller's generator closes it
    except FileNotFoundError:
        return None
    mode = _mode(handle)
    if mode == MODE_VERIFIED:
        return handle
    alive = _producer_alive(handle)
    if mode == MODE_RESTORING and alive:
        return handle
    judged = _identity(os.fstat(handle.fileno()))
    handle.close()
    if alive:  # a failed restore: its producer removes the file right after marking it
        time.sleep(POLL_SECONDS)
    else:  # a crashed producer's file, or a failed one left behind: restore again
        _unlink_if_same(path, judged)
    return None


def _stream(handle: BinaryIO, size: int, offset: int, end: int) -> Iterator[bytes]:
    """Bytes [offset, end) of a spool file, read as the producer appends them. Whatever
    the file holds is verified; the mode says whether more will come."""
    with handle:
        handle.seek(offset)
        position = offset
        while position < end:
            mode = _mode(handle)  # before the size: a final mode means a final size
            available = min(end, _size(handle))
            if position < available:
                data = handle.read(min(available - position, 1 << 20))
                if not data:
                    raise RestoreError("the spool file shrank under its reader")
                position += len(data)
                yield data
            elif mode == MODE_VERIFIED:
                raise RestoreError(f"the restored layer ends before byte {end} of {size}")
            elif mode == MODE_FAILED:
                raise RestoreError(RESTORE_FAILED)
            elif not _producer_alive(handle) and _mode(handle) == MODE_RESTORING:
                raise RestoreError("the restoring process died")
            else:
                time.sleep(POLL_SECONDS)


def _mode(handle: BinaryIO) -> int:
    return stat.S_IMODE(os.fstat(handle.fileno()).st_mode)


def _size(handle: BinaryIO) -> int:
    return os.fstat(handle.fileno()).st_size


def _producer_alive(handle: BinaryIO) -> bool:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _identity(status: os.stat_result) -> tuple[int, int, int]:
    """A spool file apart from the next one under its name: an inode number is reused as
    soon as it is freed, its change time is not (the last change of a judged file is its
    mode)."""
    return status.st_dev, status.st_ino, status.st_ctime_ns


def _unlink_if_same(path: Path, judged: tuple[int, int, int]) -> None:
    """Remove `path` if it is still the file judged removable: another restore may have
    claimed the name since (then removing it would only start a third restore)."""
    with contextlib.suppress(FileNotFoundError):
        if _identity(path.stat()) == judged:
            path.unlink()
