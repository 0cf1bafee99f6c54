"""Proving a stored blob from durable objects alone: a deduplicated layer from its recipe
and the content store (its packs), anything else from its data objects.

A pull may be served by the layer buffer, a host's restore spool, a replica or an intact
copy awaiting deletion: none of them count here, so that a layer whose packs are gone is
found broken even while a cache still serves it. This is what `duphunter verify` runs,
and what must hold before a layer's last intact copy is deleted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipelines.encoders.base import EncoderUnavailableError, HelperFailedError
from pipelines.errors import IndexIncomplete, is_transient
from pipelines.formats import Buffer
from pipelines.formats.recipe import Recipe, RecipeError
from pipelines.serve.rebuild import file_paths
from pipelines.serve.restore import restore_blob
from pipelines.store.blobs import BlobInfo
from pipelines.store.filestore import (
    FileStore,
    FileStoreError,
    Location,
    check_stored,
    decode_stored,
)
from pipelines.store.storage import ObjectNotFound, ObjectStore

PROBLEMS_LISTED = 20  # files (or data objects) a check reports in detail; the rest counted
LOCATE_BATCH = 512  # files looked up in the index in one round trip
READ_SPAN_BYTES = 4 << 20  # neighbouring files of a pack read with one ranged GET
READ_SPAN_GAP = 64 << 10  # files this close in a pack are read together
# Failures of this host or of the moment, not of the layer: the check could not be made
# (an incomplete index misses files that packs hold all the same).
CANNOT_CHECK_HERE = (EncoderUnavailableError, HelperFailedError, IndexIncomplete)


@dataclass(frozen=True)
class LayerCheck:
    """The outcome of proving one blob; `problems` names each missing or damaged file
    (or data object), at most PROBLEMS_LISTED of them (`reason` counts them all)."""

    digest: str
    ok: bool
    reason: str = ""  # "" when ok
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "ok": self.ok,
            "reason": self.reason,
            "problems": list(self.problems),
        }


def check_from_packs(store: ObjectStore, files: FileStore, info: BlobInfo) -> LayerCheck:
    """Rebuild a blob from durable objects only (never the buffer, a spool, a replica or
    an intact copy of a deduplicated layer) and compare it with its digest. A broken blob
    is reported, never raised; a transient Redis or S3 failure, an encoder this host
    cannot run, or a file an incomplete index does not name (IndexIncomplete) is raised:
    the check could not be made, try again."""
    if info.recipe is None:
        return _check_intact(store, info)
    try:
        recipe = Recipe.decode(store.get_bytes(info.recipe))
    except ObjectNotFound:
        return _broken(info, f"its recipe {info.recipe} is missing")
    except RecipeError as error:
        return _broken(info, f"its recipe {info.recipe} is damaged: {error}")
    if (recipe.blob_digest, recipe.blob_size) != (info.digest, info.size):
        return _broken(info, f"its recipe {info.recipe} is for {recipe.blob_digest}")
    failure = _restore_failure(recipe, files)
    if not failure:
        return LayerCheck(info.digest, True)
    total, problems = len(recipe.file_refs()), _named(recipe, _file_problems(recipe, files))
    if not problems:
        return _broken(info, f"{failure}; its {total} files read back intact")
    return _broken(info, f"{failure}; {_counted(problems, total, 'files')}", problems)


def _broken(info: BlobInfo, reason: str, problems: list[str] | None = None) -> LayerCheck:
    return LayerCheck(info.digest, False, reason, (problems or [])[:PROBLEMS_LISTED])


def _counted(problems: list[str], total: int, what: str) -> str:
    listed = f" (the first {PROBLEMS_LISTED} listed)" if len(problems) > PROBLEMS_LISTED else ""
    return f"{len(problems)} of {total} {what} missing or damaged{listed}"


def _named(recipe: Recipe, problems: list[tuple[bytes, str]]) -> list[str]:
    """`file sha256:<hex> (<path>) <problem>` for each problem: the file by the hash it
    must have and, where the recipe shows it, its path in the layer."""
    paths = file_paths(recipe, {digest for digest, _problem in problems[:PROBLEMS_LISTED]})
    return [
        f"file {_name(digest)} ({paths[digest]}) {problem}"
        if digest in paths
        else f"file {_name(digest)} {problem}"
        for digest, problem in problems
    ]


def _restore_failure(recipe: Recipe, files: FileStore) -> str:
    """Why the layer does not rebuild from its packs into its digest ("" when it does)."""
    try:
        actual = _digest_of(restore_blob(recipe, files), recipe.blob_digest)
    except Exception as error:
        if is_transient(error) or isinstance(error, CANNOT_CHECK_HERE):
            raise
        return f"does not restore from its packs: {_described(error)}"
    return "" if actual == recipe.blob_digest else f"restores to {actual}"


def _digest_of(chunks: Iterable[Buffer], like: str) -> str:
    algorithm = like.split(":", 1)[0]
    hasher = hashlib.new(algorithm)
    for chunk in chunks:
        hasher.update(chunk)
    return f"{algorithm}:{hasher.hexdigest()}"


def _described(error: Exception) -> str:
    if isinstance(error, ObjectNotFound):
        return f"{error.args[0]} is missing"
    return str(error) or type(error).__name__


# per file: each distinct file of the recipe located and read once


def _file_problems(recipe: Recipe, files: FileStore) -> list[tuple[bytes, str]]:
    """Each distinct file of the recipe that is not indexed, whose pack is missing, or
    whose stored bytes are damaged (do not decode, wrong size or sha256), and what."""
    sizes = recipe.file_refs()
    located = _located(list(sizes), files)
    problems = [(digest, NOT_INDEXED) for digest, at in located.items() if at is None]
    by_pack: dict[str, list[tuple[bytes, Location]]] = {}
    for digest, location in located.items():
        if location is not None:
            by_pack.setdefault(location.pack, []).append((digest, location))
    for pack, members in by_pack.items():
        problems += _pack_problems(files, pack, members, sizes)
    return problems


def _located(digests: list[bytes], files: FileStore) -> dict[bytes, Location | None]:
    located: dict[bytes, Location | None] = {}
    for start in range(0, len(digests), LOCATE_BATCH):
        batch = digests[start : start + LOCATE_BATCH]
        located.update(zip(batch, files.locate(batch), strict=True))
    return located


def _name(digest: bytes) -> str:
    return f"sha256:{digest.hex()}"


def _pack_problems(
    files: FileStore, pack: str, members: list[tuple[bytes, Location]], sizes: dict[bytes, int]
) -> list[tuple[bytes, str]]:
    pack_size = files.store.size(pack)
    if pack_size is None:
        return [(digest, _pack_missing(pack)) for digest, _location in members]
    problems = [
        (digest, f"in pack {pack} damaged: the pack ends at byte {pack_size}")
        for digest, location in members
        if location.offset + location.length > pack_size
    ]
    whole = [(d, loc) for d, loc in members if loc.offset + loc.length <= pack_size]
    for span in _spans(whole):
        problems += _span_problems(files, pack, span, sizes)
    return problems


def _spans(members: list[tuple[bytes, Location]]) -> Iterator[list[tuple[bytes, Location]]]:
    """The files of one pack in offset order, cut into runs read with one GET each."""
    span: list[tuple[bytes, Location]] = []
    start = end = 0
    for digest, location in sorted(members, key=lambda member: member[1].offset):
        stop = location.offset + location.length
        if span and (location.offset > end + READ_SPAN_GAP or stop - start > READ_SPAN_BYTES):
            yield span
            span = []
        if not span:
            start, end = location.offset, stop
        span.append((digest, location))
        end = max(end, stop)
    if span:
        yield span


def _span_problems(
    files: FileStore, pack: str, span: list[tuple[bytes, Location]], sizes: dict[bytes, int]
) -> list[tuple[bytes, str]]:
    digest, first = span[0]
    if len(span) == 1 and first.length > READ_SPAN_BYTES:
        return _large_file_problems(files, pack, digest, sizes[digest])
    start, end = first.offset, max(location.offset + location.length for _d, location in span)
    try:
        data = files.read_range(pack, start, end - start)
    except ObjectNotFound:  # deleted since its size was read
        return [(digest, _pack_missing(pack)) for digest, _location in span]
    problems = []
    for digest, location in span:
        stored = data[location.offset - start : location.offset - start + location.length]
        try:
            if sizes[digest] > READ_SPAN_BYTES:  # stored small, large once decoded: streamed
                check_stored(stored, digest, pack)
            else:
                decode_stored(stored, digest, sizes[digest], pack)
        except FileStoreError as error:
            problems.append((digest, _damaged(pack, error)))
    return problems


def _large_file_problems(
    files: FileStore, pack: str, digest: bytes, size: int
) -> list[tuple[bytes, str]]:
    """A file too large to hold in memory, streamed and checked (FileStore.open)."""
    try:
        for _chunk in files.open(digest, size):
            pass
    except ObjectNotFound:
        return [(digest, _pack_missing(pack))]
    except FileStoreError as error:
        return [(digest, _damaged(pack, error))]
    return []


NOT_INDEXED = "is not in the index"


def _pack_missing(pack: str) -> str:
    return f"in pack {pack} missing: the pack is gone"


def _damaged(pack: str, error: FileStoreError) -> str:
    return f"in pack {error.pack or pack} damaged: {error.problem}"


# a blob that is not deduplicated: its data objects


def _check_intact(store: ObjectStore, info: BlobInfo) -> LayerCheck:
    hasher = hashlib.new(info.digest.split(":", 1)[0])
    problems = []
    for segment in info.segments:
        read = 0
        try:
            for chunk in store.iter_range(segment.key):
                hasher.update(chunk)
                read += len(chunk)
        except ObjectNotFound:
            problems.append(f"data object {segment.key} missing")
            continue
        if read != segment.size:
            problems.append(f"data object {segment.key} holds {read} bytes, not {segment.size}")
    if problems:
        return _broken(info, _counted(problems, len(info.segments), "data objects"), problems)
    actual = f"{hasher.name}:{hasher.hexdigest()}"
    if actual != info.digest:
        return _broken(info, f"its data objects read back as {actual}")
    return LayerCheck(info.digest, True)
