"""The tar of a deduplicated layer rebuilt from its recipe and the stored files, in order
and with bounded memory: the files of a batch of recipe entries located in one round trip,
fetched ahead by ranged GETs that cover neighbouring files of a pack at once, a large file
streamed on its own; each file checked against its sha256 (pipelines.store.filestore).
Recompressing and verifying the tar is pipelines.serve.restore's.
"""

from __future__ import annotations

import re
import tarfile
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from pipelines.formats.recipe import Recipe
from pipelines.formats.tarsplit import FileRef, Raw
from pipelines.pauses import pause
from pipelines.store.filestore import (
    FileStore,
    FileStoreError,
    Location,
    decode_stored,
    file_error,
)
from pipelines.store.storage import ObjectNotFound

LOCATE_BATCH = 2048  # recipe entries whose files are looked up in one round trip
FIRST_BATCH = 128  # and in the first one: the batches double from this, so the tar's first
# bytes wait for a few hundred entries to be planned, not thousands
BATCH_BYTES = 16 << 20  # and at most this much of their tar (files and raw) planned at once
SPAN_LIMIT = 4 << 20  # a ranged GET covers at most this much of a pack; a file larger than
# this (stored, or once decompressed) streams on its own
SPAN_GAP = 256 << 10  # files this close in a pack are fetched together: a GET costs the
# client as much CPU as receiving ~1.5 MB (measured with bench.rebuild_cpu), and S3 a request
PREFETCH_WINDOW = 2048  # recipe entries planned ahead of the one being written
PREFETCH_BYTES = 64 << 20
PREFETCH_THREADS = 4
REPEATS_KEPT_BYTES = 8 << 20  # of files the tar holds again later, kept checked till then
KEPT_ENTRY_BYTES = 200  # what keeping one costs beyond its bytes (its entries, its object)


class RestoreError(Exception):
    """The layer could not be rebuilt into the bytes that were pushed."""


PATH_TAIL_BYTES = 1 << 20  # of raw tar before a file, searched for its name
_PAX_PATH = re.compile(rb"\d+ path=([^\n]*)\n")


def file_paths(recipe: Recipe, digests: Collection[bytes]) -> dict[bytes, str]:
    """The path in the layer's tar of each of these files (its first member with that
    content), read from the header the recipe keeps raw before it: a PAX `path` record
    if there is one, else the ustar name. For messages only: a file whose header cannot
    be read is left out."""
    paths: dict[bytes, str] = {}
    tail = b""
    for entry in recipe.entries():
        if isinstance(entry, Raw):
            tail = (tail + entry.data)[-PATH_TAIL_BYTES:]
            continue
        if entry.digest in digests and entry.digest not in paths:
            if path := _member_path(tail):
                paths[entry.digest] = path
            if len(paths) == len(digests):
                break
        tail = b""
    return paths


def _member_path(raw_before: bytes) -> str:
    if len(raw_before) < tarfile.BLOCKSIZE:
        return ""
    pax: list[bytes] = _PAX_PATH.findall(raw_before[: -tarfile.BLOCKSIZE])
    if pax:
        return pax[-1].decode("utf-8", "replace")
    try:
        header = tarfile.TarInfo.frombuf(raw_before[-tarfile.BLOCKSIZE :], "utf-8", "replace")
    except tarfile.TarError:
        return ""
    return str(header.name)


def rebuild_tar(recipe: Recipe, files: FileStore) -> Iterator[bytes]:
    """The layer's tar. Files are located in batches; neighbours in a pack are fetched
    together in one ranged GET (a span), spans run ahead on a few threads, large files
    stream on their own, and a file the tar holds again later is kept for then."""
    return _rebuild(recipe.entries(), files, _Repeats(recipe.repeated_files()))


def rebuild_tar_range(recipe: Recipe, files: FileStore, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of the layer's tar: only the entries that overlap the range are
    fetched (a file that straddles an edge is fetched whole, and a large one is kept a
    while: the range next to this one, cut by a checkpoint inside the file, reads it too)."""
    first_offset = -1

    def overlapping() -> Iterator[Raw | FileRef]:
        nonlocal first_offset
        for offset, entry in recipe.entries_from(start):
            if offset >= end:
                return
            if first_offset < 0:
                first_offset = offset
            yield entry

    skip, left = -1, end - start
    # no repeats kept: the recipe counts them over the whole tar, not this range
    for chunk in _rebuild(overlapping(), files, _Repeats({}), keep_large=True):
        if skip < 0:
            skip = start - first_offset
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        piece = chunk[skip : skip + left]
        skip = 0
        left -= len(piece)
        yield piece
        if left == 0:
            return
    if left > 0 and end > start:
        raise RestoreError(f"the tar ends before byte {end}")


def large_file_spans(recipe: Recipe) -> list[tuple[int, int]]:
    """Tar offsets [start, end) of the files a rebuild fetches whole and on their own
    (larger than SPAN_LIMIT): a segment touching one fetches all of it, so checkpoints
    are kept away from those one segment can hold (pipelines.serve.checkpoints)."""
    spans, offset = [], 0
    for entry in recipe.entries():
        size = len(entry.data) if isinstance(entry, Raw) else entry.size
        if isinstance(entry, FileRef) and size > SPAN_LIMIT:
            spans.append((offset, offset + size))
        offset += size
    return spans


def _rebuild(
    entries: Iterator[Raw | FileRef], files: FileStore, repeats: _Repeats, keep_large: bool = False
) -> Iterator[bytes]:
    with ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prefetch") as pool:
        for item in _planned_ahead(entries, files, pool, repeats):
            if isinstance(item, bytes):
                yield item
            elif isinstance(item, tuple):
                yield _fetched(*item)
            else:
                yield from files.open(item.digest, item.size, keep_large)


def _planned_ahead(
    entries: Iterator[Raw | FileRef], files: FileStore, pool: ThreadPoolExecutor, repeats: _Repeats
) -> Iterator[_Item]:
    """The items in tar order, each once the ones after it are planned (their spans
    submitted) up to PREFETCH_WINDOW entries or PREFETCH_BYTES of tar. The window grows
    with the batches, from FIRST_BATCH: the first bytes go out early."""
    pending: deque[_Item] = deque()
    sizes: deque[int] = deque()  # apart from the items: a pair per entry would cost a GC pass
    ahead = 0  # bytes planned but not yet written: bounds the memory a restore holds
    for batch, count in _batched(entries):
        items, item_sizes = _plan(batch, files, pool, repeats)
        window = min(PREFETCH_WINDOW, count)
        for item, size in zip(items, item_sizes, strict=True):
            pending.append(item)
            sizes.append(size)
            ahead += size
            while len(pending) > window or ahead > PREFETCH_BYTES:
                ahead -= sizes.popleft()
                yield pending.popleft()
    yield from pending


def _batched(entries: Iterator[Raw | FileRef]) -> Iterator[tuple[list[Raw | FileRef], int]]:
    """Entries in batches, each with the count it may hold: FIRST_BATCH, twice as many in
    each next one up to LOCATE_BATCH; and at most BATCH_BYTES of tar: raw bytes count as
    much as files (a layer may be mostly raw, e.g. zero blocks after its end of archive).
    A batch's files are the span members planned and fetched at once."""
    batch: list[Raw | FileRef] = []
    tar_bytes = 0
    count = FIRST_BATCH
    for entry in entries:
        batch.append(entry)
        tar_bytes += entry.size if isinstance(entry, FileRef) else len(entry.data)
        if len(batch) >= count or tar_bytes >= BATCH_BYTES:
            yield batch, count
            batch, tar_bytes = [], 0
            count = min(LOCATE_BATCH, 2 * count)
    if batch:
        yield batch, count


def _streams_alone(ref: FileRef, location: Location) -> bool:
    """Whether a file is fetched and checked on its own, streaming, rather than with its
    neighbours in memory: by its real size, not its stored one (a GiB of zeros is stored
    in a few KB)."""
    return location.length > SPAN_LIMIT or ref.size > SPAN_LIMIT


@dataclass
class _Span:
    """Files of one pack fetched with one ranged GET: each distinct file of a batch once,
    with the files near it in the pack, whatever their order in the tar."""

    pack: str
    start: int
    end: int
    members: dict[int, tuple[FileRef, Location]]  # by offset in the pack

    def fits(self, location: Location) -> bool:
        return (
            location.pack == self.pack
            and location.offset <= self.end + SPAN_GAP
            and location.offset + location.length - self.start <= SPAN_LIMIT
        )

    def add(self, ref: FileRef, location: Location) -> None:
        self.members[location.offset] = (ref, location)
        self.end = max(self.end, location.offset + location.length)


# What the emitter gets, in tar order: raw bytes (or a kept file's), the file at an offset
# of a span being fetched, or a large file to stream.
_Item = bytes | tuple["Future[dict[int, bytes | FileStoreError]]", int] | FileRef


class _Repeats:
    """The files a tar holds more than once (the same content under several names), each
    kept from its first fetch to its last occurrence, up to REPEATS_KEPT_BYTES at a time:
    a later batch takes it from here, not with another ranged GET. (In bench-rebuild-cpu's
    layer of real files, 17 of a rebuild's 32 GETs fetched such files again.) Kept as
    its span's fetch until that is done, then as the file's checked bytes alone; used
    by the planning thread only."""

    def __init__(self, counts: dict[bytes, int]) -> None:
        self.left = dict(counts)  # occurrences not yet planned
        self.kept: dict[bytes, _Item] = {}
        self.kept_bytes = 0  # their sizes, and KEPT_ENTRY_BYTES each: a tar of many tiny
        # repeated files must not keep more than the bound in Python objects either
        self.fetching: list[bytes] = []  # the kept files still held as their span's fetch

    def settle(self) -> None:
        """Each kept file whose span is fetched as its own bytes: the span's others go.
        (Only those not settled yet are looked at: each once it is done.)"""
        waiting = []
        for digest in self.fetching:
            item = self.kept.get(digest)
            if not isinstance(item, tuple):
                continue  # let go meanwhile
            if not item[0].done() or item[0].exception() is not None:
                waiting.append(digest)  # an error stays with its fetch: raised in turn
                continue
            content = item[0].result()[item[1]]
            if isinstance(content, bytes):
                self.kept[digest] = content
            else:
                waiting.append(digest)
        self.fetching = waiting

    def planned(self, ref: FileRef, item: _Item) -> None:
        """One occurrence of `ref` planned as `item`: kept for the next ones, if any and
        if it fits; let go after the last."""
        left = self.left.get(ref.digest, 0) - 1
        if left < 0:
            return
        self.left[ref.digest] = left
        kept = ref.digest in self.kept
        cost = ref.size + KEPT_ENTRY_BYTES
        if left == 0 and kept:
            del self.kept[ref.digest]
            self.kept_bytes -= cost
        elif isinstance(item, FileRef):  # a large file streams again: nothing held
            return
        elif left and not kept and self.kept_bytes + cost <= REPEATS_KEPT_BYTES:
            self.kept[ref.digest] = item
            self.kept_bytes += cost
            if isinstance(item, tuple):
                self.fetching.append(ref.digest)


def _plan(
    batch: list[Raw | FileRef], files: FileStore, pool: ThreadPoolExecutor, repeats: _Repeats
) -> tuple[list[_Item], list[int]]:
    """The batch's items in tar order, and the bytes each holds ahead until written; its
    files grouped into spans by pack and offset
    (a tar lists the files of one pack out of order, and the same content more than
    once), each span submitted to `pool` in the order the tar first needs it; the files
    kept from an earlier batch taken from `repeats`."""
    repeats.settle()
    refs = [e for e in batch if isinstance(e, FileRef) and e.digest not in repeats.kept]
    digests = list(dict.fromkeys(ref.digest for ref in refs))  # each looked up once
    found = dict(zip(digests, files.locate(digests), strict=True))
    small: dict[tuple[str, int], tuple[FileRef, Location]] = {}
    for ref in refs:
        location = found[ref.digest]
        if location is None:
            raise files.unlocated(ref.digest)
        if not _streams_alone(ref, location):
            small.setdefault((location.pack, location.offset), (ref, location))
    pause("restore.planned")
    need = {key: order for order, key in enumerate(small)}
    spans = sorted(
        _spans(small.values()), key=lambda span: min(need[(span.pack, o)] for o in span.members)
    )
    futures = _submit_spans(spans, files, pool)
    items: list[_Item] = []
    sizes: list[int] = []
    for entry in batch:
        if isinstance(entry, Raw):
            items.append(entry.data)
            sizes.append(len(entry.data))
            continue
        item = repeats.kept.get(entry.digest)
        if item is None:
            item = _fetch_item(entry, found, futures)
        repeats.planned(entry, item)
        items.append(item)
        sizes.append(0 if isinstance(item, FileRef) else entry.size)  # a large file is
        # streamed when its turn comes, not held ahead
    return items, sizes


def _fetch_item(
    ref: FileRef,
    found: dict[bytes, Location | None],
    futures: dict[tuple[str, int], Future[dict[int, bytes | FileStoreError]]],
) -> _Item:
    """A file's item: itself if it streams alone, else its place in its span's fetch."""
    location = found[ref.digest]
    assert location is not None
    if _streams_alone(ref, location):
        return ref
    return futures[(location.pack, location.offset)], location.offset


def _spans(members: Iterable[tuple[FileRef, Location]]) -> list[_Span]:
    by_pack: dict[str, list[tuple[FileRef, Location]]] = {}
    for ref, location in members:
        by_pack.setdefault(location.pack, []).append((ref, location))
    spans: list[_Span] = []
    for pack, located in by_pack.items():
        span: _Span | None = None
        for ref, location in sorted(located, key=lambda member: member[1].offset):
            if span is None or not span.fits(location):
                span = _Span(pack, location.offset, location.offset, {})
                spans.append(span)
            span.add(ref, location)
    return spans


def _submit_spans(
    spans: list[_Span], files: FileStore, pool: ThreadPoolExecutor
) -> dict[tuple[str, int], Future[dict[int, bytes | FileStoreError]]]:
    """Each span's fetch, keyed by (pack, offset) of each of its files."""
    futures: dict[tuple[str, int], Future[dict[int, bytes | FileStoreError]]] = {}
    for span in spans:
        future = pool.submit(_fetch_span, files, span)
        futures.update({(span.pack, offset): future for offset in span.members})
    return futures


def _fetch_span(files: FileStore, span: _Span) -> dict[int, bytes | FileStoreError]:
    """Each member's bytes, or why they are wrong: a damaged file fails when its turn
    comes, so the tar before it (its verified segments) is still served."""
    try:
        data = files.read_range(span.pack, span.start, span.end - span.start)
    except ObjectNotFound:  # the pack went away (compacted by GC): look the files up again
        return {offset: _refetched(files, ref) for offset, (ref, _l) in span.members.items()}
    contents: dict[int, bytes | FileStoreError] = {}
    view = memoryview(data)
    for offset, (ref, location) in span.members.items():
        stored = view[offset - span.start : offset - span.start + location.length]
        try:
            contents[offset] = decode_stored(stored, ref.digest, ref.size, span.pack)
        except FileStoreError as error:
            contents[offset] = error
    return contents


def _refetched(files: FileStore, ref: FileRef) -> bytes | FileStoreError:
    """One file read where the index points now, checked; or why it cannot be."""
    try:
        return b"".join(files.open(ref.digest, ref.size))
    except ObjectNotFound as error:
        return file_error(ref.digest, str(error), "is missing: its pack is gone")
    except FileStoreError as error:
        return error


def _fetched(future: Future[dict[int, bytes | FileStoreError]], offset: int) -> bytes:
    """The checked bytes of the file at `offset` of a span, once the span is fetched."""
    content = future.result()[offset]
    if isinstance(content, FileStoreError):
        raise content
    return content
