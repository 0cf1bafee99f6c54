"""Online garbage collection, down to packed files: a mark over S3, a handshake with
whoever starts to rely on an object meanwhile, a sweep, and pack compaction.

A run, under a lock (one at a time), while pushes and pulls go on:

1. delete the old packs earlier compactions left for later (`gc/deferred/`);
2. mark, from S3 alone: the manifests a repository holds (all of them, or, with
   DUPHUNTER_GC_UNTAGGED, only tagged ones and what they name: index children,
   referrers), the blobs they name, and the files the recipes of those blobs name;
3. candidates: what is unmarked and older than the grace window
   (DUPHUNTER_GC_GRACE_SECONDS, by S3's LastModified);
4. the handshake: GC *condemns* its candidates in Redis, except what a push, a mount, a
   manifest PUT or a dedup commit *touched* since the run began; those users touch what
   they rely on and check it is not condemned, so one of the two sees the other
   (pipelines.index). Then the marks are taken again from S3 (recipes, manifests written
   meanwhile) and whatever they name is absolved;
5. sweep: untagged manifests, blobs (descriptor, data objects, recipe, record, links),
   files (index entries), packs: a pack with no live file is deleted; one whose live bytes
   fell below DUPHUNTER_GC_COMPACT_BELOW of its size is rewritten (its live files, checked
   against their sha256, into a new pack; index entries moved only if still pointing at
   the old place) and the old pack is deleted a grace later, for restores that located a
   file there just before;
6. orphans that crashes leave: data objects no descriptor or upload names, recipes and
   records of blobs that are gone, packs no index entry points to.

Every step can be cut short by a crash and done again: the next run finishes the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.blobs import BlobInfo, BlobStore, blob_key, layer_link_key
from pipelines.buffer import LayerBuffer
from pipelines.checkpoints import checkpoints_key
from pipelines.filestore import (
    FileStore,
    Location,
    check_stored,
    new_pack_key,
    pack_table,
    read_pack_table,
)
from pipelines.index import Index
from pipelines.ingest import layer_record_key
from pipelines.manifests import (
    ManifestStore,
    manifest_key,
)
from pipelines.pauses import pause
from pipelines.recipe import Recipe
from pipelines.storage import Listed, ObjectNotFound, ObjectStore

REPORT_KEY = "gc/last-report.json"
DEFERRED_PREFIX = "gc/deferred/"
LEASE_SECONDS = 60
COUNTED_PREFIXES = ("data/", "recipes/", "checkpoints/")  # counted in stored bytes


@dataclass
class GcReport:
    dry_run: bool
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    untagged_manifests: int = 0
    manifests: int = 0
    manifest_bytes: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    files: int = 0
    packs_deleted: int = 0
    packs_compacted: int = 0
    pack_bytes_freed: int = 0
    orphans: int = 0
    orphan_bytes: int = 0
    deferred_deleted: int = 0
    kept_because_touched: int = 0

    def freed_bytes(self) -> int:
        return self.manifest_bytes + self.blob_bytes + self.pack_bytes_freed + self.orphan_bytes


@dataclass
class Marks:
    """What S3 says is in use."""

    manifests: dict[tuple[str, str], Listed]  # (repository, digest) -> its revision object
    tags: dict[tuple[str, str], str]  # (repository, tag) -> manifest digest
    links: dict[tuple[str, str], Listed]  # (repository, blob digest) -> link object
    live_manifests: set[str]
    live_blobs: set[str]


class GarbageCollector:
    def __init__(
        self,
        store: ObjectStore,
        index: Index,
        blobs: BlobStore,
        manifests: ManifestStore,
        files: FileStore,
        buffer: LayerBuffer,
        grace_seconds: float,
        compact_below: float,
        untagged: bool,
        nice: int = 0,
    ) -> None:
        self.store = store
        self.index = index
        self.blobs = blobs
        self.manifests = manifests
        self.files = files
        self.buffer = buffer
        self.grace = grace_seconds
        self.compact_below = compact_below
        self.untagged = untagged
        self.nice = nice
        self.objects = ObjectCache(store)

    def run(self, dry_run: bool = False) -> GcReport:
        """Collect in a thread of lower CPU priority (`nice`), so that on a shared host
        pushes and pulls come first; the calling thread keeps its own priority."""
        outcome: list[GcReport | BaseException] = []

        def collect() -> None:
            thread = threading.get_native_id()  # on Linux, a nice value is per thread
            current = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, max(current, self.nice))
            try:
                outcome.append(self._run(dry_run))
            except BaseException as error:  # handed to the caller below
                outcome.append(error)

        worker = threading.Thread(target=collect, name="gc")
        worker.start()
        worker.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _run(self, dry_run: bool) -> GcReport:
        report = GcReport(dry_run)
        self.objects = ObjectCache(self.store)
        with self.index.lock("gc", timeout=LEASE_SECONDS, blocking_timeout=5) as lock:
            renewing = threading.Event()
            renewer = threading.Thread(target=self._renew, args=(lock, renewing), daemon=True)
            renewer.start()
            if not dry_run:
                self._delete_deferred(report)
                self.index.start_gc(LEASE_SECONDS)
            try:
                self._collect(report)
            finally:
                renewing.set()
                if not dry_run:
                    self.index.end_gc()
        report.seconds = round(time.time() - report.started, 3)
        if not dry_run:
            self.store.put_bytes(REPORT_KEY, json.dumps(asdict(report)).encode())
        return report

    def _renew(self, lock: Any, stop: threading.Event) -> None:
        """Keep the run's lock and its 'GC is running' flag alive while this process is;
        if it dies, both lapse within LEASE_SECONDS and the next run may start."""
        while not stop.wait(LEASE_SECONDS / 3):
            lock.reacquire()
            self.index.renew_gc(LEASE_SECONDS)

    def _collect(self, report: GcReport) -> None:
        cutoff = time.time() - self.grace
        marks = self._mark(cutoff)
        self._sweep_manifests(marks, cutoff, report)
        descriptors = self._descriptors()
        pause("gc.marked")
        dead_blobs = self._decide(
            "blob",
            [d for d, (listed, _i) in descriptors.items()
             if d not in marks.live_blobs and listed.modified < cutoff],
            lambda: self._mark(cutoff).live_blobs,
            report,
        )  # fmt: skip
        for digest in dead_blobs:
            self._delete_blob(descriptors.pop(digest)[1], marks, report)
        live_files = self._live_files(info for _listed, info in descriptors.values())
        dead_files = self._dead_files(live_files, cutoff, descriptors, report)
        pause("gc.files_decided")
        self._sweep_packs(dead_files, cutoff, report)
        self._sweep_orphans(descriptors, cutoff, report)

    # marking, from S3
    def _mark(self, cutoff: float) -> Marks:
        manifests: dict[tuple[str, str], Listed] = {}
        tag_objects: dict[tuple[str, str], Listed] = {}
        links: dict[tuple[str, str], Listed] = {}
        for listed in self.store.listing("repositories/"):
            repo, kind, rest = _split_repository_key(listed.key)
            if kind == "revision":
                manifests[(repo, rest)] = listed
            elif kind == "tag":
                tag_objects[(repo, rest)] = listed
            elif kind == "link":
                links[(repo, rest)] = listed
        contents = self.objects.get_many([*tag_objects.values(), *manifests.values()])
        tags = {
            name: data.decode()
            for name, listed in tag_objects.items()
            if (data := contents.get(listed.key)) is not None
        }
        roots = {d for (_r, d) in manifests} if not self.untagged else set(tags.values())
        live_manifests, live_blobs = self._closure(roots, manifests, contents, cutoff)
        return Marks(manifests, tags, links, live_manifests, live_blobs)

    def _closure(
        self,
        roots: set[str],
        manifests: dict[tuple[str, str], Listed],
        contents: dict[str, bytes | None],
        cutoff: float,
    ) -> tuple[set[str], set[str]]:
        """Live manifests (the roots, what indexes name, referrers of live ones, and, for
        safety, any manifest newer than the grace window) and the blobs they name."""
        recent = {d for (_r, d), listed in manifests.items() if listed.modified >= cutoff}
        subjects = self._subjects(manifests, contents)
        live: set[str] = set()
        blobs: set[str] = set()
        level = roots | recent
        while level:
            live |= level
            bodies = self.objects.get_many([manifest_key(digest) for digest in level])
            found: set[str] = set()
            for digest in level:
                body = _json_object(bodies.get(manifest_key(digest)))
                named = [
                    d.get("digest") for d in [body.get("config") or {}, *body.get("layers", [])]
                ]
                blobs.update(str(d) for d in named if d)
                found |= {str(m["digest"]) for m in body.get("manifests", []) if "digest" in m}
                found |= set(subjects.get(digest, []))
            level = found - live
        return live, blobs

    @staticmethod
    def _subjects(
        manifests: dict[tuple[str, str], Listed], contents: dict[str, bytes | None]
    ) -> dict[str, list[str]]:
        """subject digest -> referrers naming it (a referrer lives while its subject does)."""
        found: dict[str, list[str]] = {}
        for (_repo, digest), listed in manifests.items():
            revision = _json_object(contents.get(listed.key))
            if revision.get("subject"):
                found.setdefault(str(revision["subject"]), []).append(digest)
        return found

    def _descriptors(self) -> dict[str, tuple[Listed, BlobInfo]]:
        listing = list(self.store.listing("blobs/"))
        contents = self.objects.get_many(listing)
        found = {}
        for listed in listing:
            _prefix, algorithm, hexdigest = listed.key.split("/")
            data = _json_object(contents.get(listed.key))
            if data:
                digest = f"{algorithm}:{hexdigest}"
                found[digest] = (listed, BlobInfo.from_json(digest, data))
        return found

    def _live_files(self, infos: Iterable[BlobInfo]) -> set[bytes]:
        return self._files_of([info.recipe for info in infos if info.recipe is not None])

    def _files_of(self, recipe_keys: list[str]) -> set[bytes]:
        files: set[bytes] = set()
        for data in self.objects.get_many(recipe_keys).values():
            if data is not None:
                with contextlib.suppress(ValueError):
                    files.update(Recipe.decode(data).file_refs())
        return files

    # the handshake
    def _decide(
        self, kind: str, candidates: list[str], marked_again: Any, report: GcReport
    ) -> list[str]:
        """Of the candidates, those to delete: condemned (nobody touched them) and still
        unmarked when S3 is read again. A dry run takes them all."""
        if report.dry_run or not candidates:
            return candidates
        condemned = self.index.condemn(kind, candidates)
        report.kept_because_touched += len(candidates) - len(condemned)
        again = marked_again()
        rescued = [digest for digest in condemned if digest in again]
        self.index.absolve(kind, rescued)
        return [digest for digest in condemned if digest not in again]

    # sweeping
    def _sweep_manifests(self, marks: Marks, cutoff: float, report: GcReport) -> None:
        named = {digest for (_repo, digest) in marks.manifests}
        if self.untagged:
            named -= self._delete_untagged(marks, cutoff, report)
        unnamed = {
            f"{listed.key.split('/')[1]}:{listed.key.split('/')[2]}": listed
            for listed in self.store.listing("manifests/")
            if listed.modified < cutoff
        }
        unnamed = {digest: listed for digest, listed in unnamed.items() if digest not in named}
        doomed = self._decide("manifest", list(unnamed), self._revision_digests, report)
        for digest in doomed:
            report.manifests += 1
            report.manifest_bytes += unnamed[digest].size
            if not report.dry_run:
                self.store.delete([unnamed[digest].key])
                self.index.redis.delete(f"dh:manifest:{digest}")
                self.index.add_bytes(logical=-unnamed[digest].size, stored=-unnamed[digest].size)
                self.index.absolve("manifest", [digest])

    def _delete_untagged(self, marks: Marks, cutoff: float, report: GcReport) -> set[str]:
        """Revisions no tag leads to (DUPHUNTER_GC_UNTAGGED): the digests deleted."""
        untagged = [(repo, digest) for (repo, digest), listed in marks.manifests.items()
                    if digest not in marks.live_manifests and listed.modified < cutoff]  # fmt: skip
        doomed = set(self._decide("manifest", [d for _r, d in untagged],
                                  lambda: self._mark(cutoff).live_manifests, report))  # fmt: skip
        for repo, digest in untagged:
            if digest in doomed:
                report.untagged_manifests += 1
                if not report.dry_run:
                    self.manifests.delete(repo, digest)
        return doomed

    def _revision_digests(self) -> set[str]:
        """Every manifest some repository holds, from a listing of S3 (nothing read)."""
        found = set()
        for key, _size in self.store.list("repositories/"):
            _repo, kind, rest = _split_repository_key(key)
            if kind == "revision":
                found.add(rest)
        return found

    def _delete_blob(self, info: BlobInfo, marks: Marks, report: GcReport) -> None:
        data = info.segments + info.retired
        report.blobs += 1
        report.blob_bytes += sum(segment.size for segment in data)
        if report.dry_run:
            return
        for repo, digest in marks.links:
            if digest == info.digest:
                self.store.delete([layer_link_key(repo, digest)])
                self.index.unlink_layer(repo, digest)
        recipe_size = self.store.size(info.recipe) if info.recipe else None
        self.store.delete([blob_key(info.digest)])
        self.index.redis.delete(f"dh:blob:{info.digest}")
        self.store.delete([s.key for s in data] + ([info.recipe] if info.recipe else []))
        self.store.delete([layer_record_key(info.digest), checkpoints_key(info.digest)])
        self.index.redis.delete(f"dh:layer:{info.digest}")
        self.index.redis.hdel("dh:layers", info.digest)
        self.buffer.drop(info.digest)
        freed = sum(s.size for s in data) + (recipe_size or 0)
        self.index.add_bytes(logical=-info.size, stored=-freed)
        self.index.absolve("blob", [info.digest])

    def _dead_files(
        self,
        live: set[bytes],
        cutoff: float,
        descriptors: dict[str, tuple[Listed, BlobInfo]],
        report: GcReport,
    ) -> set[str]:
        """Indexed files no recipe names, in packs older than the grace window; their
        index entries removed (not in a dry run)."""
        old_packs = {l.key for l in self.store.listing("packs/") if l.modified < cutoff}  # noqa: E741
        candidates = [
            hexdigest for hexdigest, location in self._indexed_files()
            if bytes.fromhex(hexdigest) not in live and location.pack in old_packs
        ]  # fmt: skip

        def marked_again() -> set[str]:
            recipes = [key for key, _size in self.store.list("recipes/")]
            return {digest.hex() for digest in self._files_of(recipes)}

        dead = self._decide("file", candidates, marked_again, report)
        report.files += len(dead)
        if not report.dry_run and dead:
            pipe = self.index.redis.pipeline()
            pipe.hdel("dh:files", *dead)
            pipe.hdel("dh:filerefs", *dead)
            pipe.execute()
            self.index.absolve("file", dead)
        return set(dead)

    def _indexed_files(self) -> Iterator[tuple[str, Location]]:
        for hexdigest, text in self.index.redis.hscan_iter("dh:files", count=5000):
            yield hexdigest.decode(), Location.decode(text.decode())

    def _sweep_packs(self, dead: set[str], cutoff: float, report: GcReport) -> None:
        for listed in self.store.listing("packs/"):
            if listed.modified >= cutoff:
                continue
            table = read_pack_table(self.store, listed.key, listed.size)
            where = self.index.file_locations([digest.hex() for digest, _loc in table])
            live = [
                (digest, location)
                for (digest, location), indexed in zip(table, where, strict=True)
                if indexed == location.encode() and digest.hex() not in dead
            ]
            live_bytes = sum(location.length for _d, location in live)
            file_bytes = sum(location.length for _d, location in table)  # the table aside
            if not live:
                report.packs_deleted += 1
                report.pack_bytes_freed += listed.size
                if not report.dry_run:
                    self.store.delete([listed.key])
                    self.index.add_bytes(stored=-listed.size)
            elif live_bytes < self.compact_below * file_bytes:
                report.packs_compacted += 1
                report.pack_bytes_freed += listed.size - live_bytes
                if not report.dry_run:
                    self._compact(listed, live)

    def _compact(self, listed: Listed, live: list[tuple[bytes, Location]]) -> None:
        """Copy the live files of a pack into a new one, move their index entries if they
        still point at the old place, and delete the old pack a grace later."""
        data = self.store.get_bytes(listed.key)
        parts: list[bytes] = []
        entries: list[tuple[bytes, int, int]] = []
        offset = 0
        for digest, location in live:
            stored = data[location.offset : location.offset + location.length]
            check_stored(stored, digest)  # a damaged copy is not carried over
            entries.append((digest, offset, location.length))
            parts.append(stored)
            offset += location.length
        key = new_pack_key()
        body = b"".join(parts) + pack_table(entries)
        self.store.put_bytes(key, body)
        moves = {
            digest.hex(): (old.encode(), Location(key, new_offset, length).encode())
            for (digest, old), (_d, new_offset, length) in zip(live, entries, strict=True)
        }
        self.index.move_files(moves)
        self.index.add_bytes(stored=len(body))
        self._defer_delete([listed.key], listed.size)

    def _defer_delete(self, keys: list[str], size: int) -> None:
        due = time.time() + self.grace
        record = {"keys": keys, "bytes": size}
        self.store.put_bytes(
            f"{DEFERRED_PREFIX}{due:.0f}-{uuid.uuid4().hex}", json.dumps(record).encode()
        )

    def _delete_deferred(self, report: GcReport) -> None:
        for key, _size in list(self.store.list(DEFERRED_PREFIX)):
            due = float(key.removeprefix(DEFERRED_PREFIX).split("-", 1)[0])
            if due > time.time():
                continue
            record = json.loads(self.store.get_bytes(key))
            present = [k for k in record["keys"] if self.store.size(k) is not None]
            self.store.delete(present)
            if present:
                self.index.add_bytes(stored=-int(record["bytes"]))
            self.store.delete([key])
            report.deferred_deleted += len(present)

    def _sweep_orphans(
        self, descriptors: dict[str, tuple[Listed, BlobInfo]], cutoff: float, report: GcReport
    ) -> None:
        """Data objects, recipes and records that no blob or upload names (crash leftovers)."""
        named = {s.key for _l, info in descriptors.values() for s in info.segments + info.retired}
        named |= {info.recipe for _l, info in descriptors.values() if info.recipe}
        named |= {layer_record_key(digest) for digest in descriptors}
        named |= {checkpoints_key(digest) for digest in descriptors}
        uploads = {key.removeprefix("uploads/") for key, _s in self.store.list("uploads/")}
        doomed = []
        for prefix in ("data/", "recipes/", "layers/", "checkpoints/"):
            for listed in self.store.listing(prefix):
                in_upload = prefix == "data/" and listed.key.split("/")[1] in uploads
                if listed.key not in named and not in_upload and listed.modified < cutoff:
                    doomed.append(listed)
        report.orphans += len(doomed)
        counted = [item for item in doomed if item.key.startswith(COUNTED_PREFIXES)]
        report.orphan_bytes += sum(item.size for item in counted)
        if not report.dry_run and doomed:
            self.store.delete([listed.key for listed in doomed])
            self.index.add_bytes(stored=-sum(item.size for item in counted))


class ObjectCache:
    """The S3 objects one GC run reads: many at once, each version read once. Keys named
    by content (manifests, recipes) never change; the others are reread when S3's time of
    last write says they changed."""

    THREADS = 16

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.cache: dict[str, tuple[float, bytes | None]] = {}

    def get_many(self, objects: Iterable[Listed | str]) -> dict[str, bytes | None]:
        wanted = {item.key if isinstance(item, Listed) else item: item for item in objects}
        missing = [
            key for key, item in wanted.items()
            if key not in self.cache
            or (isinstance(item, Listed) and self.cache[key][0] != item.modified)
        ]  # fmt: skip
        with ThreadPoolExecutor(self.THREADS) as pool:
            for key, data in zip(missing, pool.map(self._get, missing), strict=True):
                item = wanted[key]
                self.cache[key] = (item.modified if isinstance(item, Listed) else 0.0, data)
        return {key: self.cache[key][1] for key in wanted}

    def _get(self, key: str) -> bytes | None:
        try:
            return self.store.get_bytes(key)
        except ObjectNotFound:
            return None


def _json_object(data: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(data) if data else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _split_repository_key(key: str) -> tuple[str, str, str]:
    """repositories/<repo>/_manifests/revisions/<alg>/<hex> -> (repo, "revision", digest);
    .../_manifests/tags/<tag> -> (repo, "tag", tag); .../_layers/<alg>/<hex> -> "link"."""
    head, _, tail = key.partition("/_")
    repo = head.removeprefix("repositories/")
    parts = tail.split("/")
    if parts[:2] == ["manifests", "revisions"]:
        return repo, "revision", f"{parts[2]}:{parts[3]}"
    if parts[:2] == ["manifests", "tags"]:
        return repo, "tag", parts[2]
    if parts[0] == "layers":
        return repo, "link", f"{parts[1]}:{parts[2]}"
    return repo, "other", tail
