"""Online garbage collection down to packed files. Nothing is deleted on the word of Redis:
what is live is read from S3, and relying on an object and deleting it exclude each other
through notices (pipelines.store.deletion; the argument is in docs/deletion.md).

A run, while pushes and pulls go on, under a lock and a lease in S3:

1. refuse if the index is incomplete (Redis lost keys, or a rebuild runs): say why; the
   caller starts a rebuild;
2. registry objects. Mark from S3: the manifests repositories hold (all, or with
   DUPHUNTER_GC_UNTAGGED only tagged ones and what they name: index children, referrers),
   the blobs they name, blobs linked or given a recipe within the grace window
   (DUPHUNTER_GC_GRACE_SECONDS, by S3's LastModified). Candidates are what is unmarked and
   older than the grace: untagged revisions, manifest bytes no revision names, blobs.
   Publish a notice naming them, mark again, delete what is still unmarked, withdraw;
3. crash leftovers: data objects no descriptor and no upload (listed first) names,
   recipes, records, checkpoints and links of blobs that are gone;
4. files. Mark from S3: the files every recipe names. Each pack's table (S3) says which
   files it holds; a live file keeps the copy the index points to (a missing or stale
   entry is pointed at a copy that exists). Files no recipe names are candidates: notice,
   mark again, then their index entries go, packs with no kept copy are deleted, packs
   whose kept bytes fell below DUPHUNTER_GC_COMPACT_BELOW are rewritten (their kept
   copies moved to a new pack) and the old one waits a grace for restores that located
   a file there before (`gc/deferred/`; every later run honours it).

Before every deletion the run checks it still holds its lock and its lease and that the
index is complete; if not, it stops (GcStopped). Every step can be cut short by a crash
and done again: the next run finishes the job.

One module of ~790 lines: the steps above are one run's methods, sharing its lease, lock,
pacer and report and re-checking them before each deletion; cut apart, every step would
have to carry that state and the checks, which is where a deletion could slip past one.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.formats.recipe import Recipe, RecipeError
from pipelines.ingest.ingestor import layer_record_key, recipe_key
from pipelines.pauses import pause
from pipelines.registry.manifests import ManifestStore, manifest_key, revision_key
from pipelines.serve.buffer import LayerBuffer
from pipelines.serve.checkpoints import checkpoints_key
from pipelines.store.blobs import BlobInfo, BlobStore, blob_key, layer_link_key
from pipelines.store.deletion import Notice, RunLease
from pipelines.store.filestore import (
    FileStore,
    Location,
    check_stored,
    new_pack_key,
    pack_table,
    read_pack_table,
)
from pipelines.store.index import Index
from pipelines.store.storage import Listed, ObjectNotFound, ObjectStore

REPORT_KEY = "gc/last-report.json"
DEFERRED_PREFIX = "gc/deferred/"
# of the run's lease in S3, renewed every 10 s (the lock: pipelines.store.leases)
LEASE_SECONDS = 60
COUNTED_PREFIXES = ("data/", "recipes/", "checkpoints/")  # counted in stored bytes
DELETE_BATCH = 500  # keys per S3 delete request, each after a check that the run may
LOOKUP_BATCH = 1000  # files asked of the index in one round trip (each blocks Redis briefly)
READ_THREADS = 3
READ_CHUNK = 32  # objects read between two of the pacer's pauses


class GcStopped(Exception):
    """The run stopped before deleting more: it lost its lock, its lease or its index."""


@dataclass
class GcReport:
    dry_run: bool
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    refused: str = ""  # why nothing was deleted ("" when the run went ahead)
    untagged_manifests: int = 0
    manifests: int = 0
    manifest_bytes: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    files: int = 0
    packs_deleted: int = 0
    packs_compacted: int = 0
    packs_waiting: int = 0  # compacted earlier, deleted once restores had time to finish
    pack_bytes_freed: int = 0
    orphans: int = 0
    orphan_bytes: int = 0
    rescued: int = 0  # condemned, then relied on before the second marking: kept
    index_entries_repaired: int = 0
    grace_seconds: float = 0.0  # nothing younger than this was freed
    freed_total_bytes: int = 0  # freed_bytes(), for the report's readers

    def freed_bytes(self) -> int:
        return self.manifest_bytes + self.blob_bytes + self.pack_bytes_freed + self.orphan_bytes


@dataclass
class Marks:
    """What S3 says is in use by the registry's objects."""

    revisions: dict[tuple[str, str], Listed]  # (repository, digest) -> revision object
    links: dict[tuple[str, str], Listed]  # (repository, blob digest) -> link object
    live_manifests: set[str]
    live_blobs: set[str]
    recipe_sizes: dict[str, int]  # blob digest -> size of its recipe object


@dataclass
class PackVerdict:
    """One pack's files against the live set: the copies readers are pointed at (kept)
    and the files no recipe names (dead)."""

    listed: Listed
    kept_count: int
    kept_bytes: int
    file_bytes: int
    dead: list[bytes]
    dead_indexed_here: dict[bytes, Location]  # dead files whose index entry points here
    movable: list[tuple[bytes, Location]]  # the kept copies, held for a pack to compact

    def sparse(self, below: float) -> bool:
        """Whether its kept bytes fell below this share of its file bytes."""
        return self.kept_bytes < below * self.file_bytes


@dataclass
class Judging:
    """What judging the packs of one run shares: the packs that exist, and the files
    whose missing index entry a kept copy already answers."""

    existing: set[str]
    chosen: set[bytes] = field(default_factory=set)


class Pacer:
    """Keeps a run's load on the services it shares with pushes and pulls (S3, Redis)
    to about `share` of the time: after each step it pauses so that steps take that
    share of the wall time (DUPHUNTER_GC_PACE; 1 runs flat out)."""

    def __init__(self, share: float) -> None:
        self.share = min(1.0, max(0.01, share))

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        started = time.monotonic()
        yield
        time.sleep((time.monotonic() - started) * (1 - self.share) / self.share)

    def map(self, work: Any, items: list[Any]) -> Iterator[tuple[Any, Any]]:
        """(item, work(item)) for each item, READ_THREADS at a time, paced by chunks."""
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for start in range(0, len(items), READ_CHUNK):
                chunk = items[start : start + READ_CHUNK]
                with self.step():
                    results = list(pool.map(work, chunk))
                yield from zip(chunk, results, strict=True)


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
        pace: float = 1.0,
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
        self.pacer = Pacer(pace)
        self.parsed = ParsedObjects(store, self.pacer)
        self.lock = index.lock("gc", blocking_timeout=5)
        self.lease = RunLease(store, LEASE_SECONDS)

    def run(self, dry_run: bool = False, token: str | None = None) -> GcReport:
        """Collect in a thread of lower CPU priority (`nice`), so that on a shared host
        pushes and pulls come first; the calling thread keeps its own priority. A run
        given the `token` of one that failed or died (its job's id) takes its lock back
        at once rather than waiting for it to expire."""
        outcome: list[GcReport | BaseException] = []

        def collect() -> None:
            thread = threading.get_native_id()  # on Linux, a nice value is per thread
            current = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, max(current, self.nice))
            try:
                outcome.append(self._run(dry_run, token))
            except BaseException as error:  # handed to the caller below
                outcome.append(error)

        worker = threading.Thread(target=collect, name="gc")
        worker.start()
        worker.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _run(self, dry_run: bool, token: str | None) -> GcReport:
        report = GcReport(dry_run, grace_seconds=self.grace)
        self.parsed = ParsedObjects(self.store, self.pacer)
        self.lease = RunLease(self.store, LEASE_SECONDS)
        if not self.index.is_ready():
            report.refused = ("the index is incomplete (Redis lost keys, or a rebuild runs): "
                              "nothing deleted; rebuild the index, then collect")  # fmt: skip
            return report
        if not self.lock.acquire(token):
            raise GcStopped("another garbage collection holds the lock")
        stop = threading.Event()
        try:
            if not dry_run:
                self.lease.start()
            threading.Thread(target=self._renew, args=(stop,), daemon=True).start()
            self._collect(report)
        finally:
            stop.set()
            self._let_go(dry_run)
        report.seconds = round(time.time() - report.started, 3)
        report.freed_total_bytes = report.freed_bytes()
        if not dry_run:
            self.store.put_bytes(REPORT_KEY, json.dumps(asdict(report)).encode())
        return report

    def _let_go(self, dry_run: bool) -> None:
        """End the lease (withdrawing the notices) and release the lock, if still held."""
        try:
            if not dry_run:
                self.lease.end()
        finally:
            self.lock.release()

    def _renew(self, stop: threading.Event) -> None:
        """Keep the lease in S3 while this process lives (the lock renews itself); a
        renewal that fails is not retried: the run stops at its next deletion
        (`_may_delete`)."""
        while not stop.wait(LEASE_SECONDS / 6):
            try:
                if self.lease.expires:
                    self.lease.renew()
            except Exception:
                return

    def _may_delete(self, report: GcReport) -> bool:
        """Whether to go on deleting (False in a dry run); GcStopped if the run lost what
        makes its deletions safe."""
        if report.dry_run:
            return False
        if not self.lock.held():
            raise GcStopped("the GC lock was lost (Redis restarted or emptied?): stopped")
        if not self.index.is_ready():
            raise GcStopped("the index became incomplete (a rebuild began?): stopped")
        if not self.lease.may_delete():
            raise GcStopped("the run's lease could not be renewed in time: stopped")
        return True

    def _collect(self, report: GcReport) -> None:
        cutoff = time.time() - self.grace
        uploads = {key.removeprefix("uploads/") for key, _s in self.store.list("uploads/")}
        marks = self._mark(cutoff)
        descriptors = self._descriptors()
        candidates = self._registry_candidates(marks, descriptors, cutoff)
        pause("gc.marked")
        self._collect_registry(candidates, marks, descriptors, cutoff, report)
        self._sweep_orphans(uploads, cutoff, report)
        self._collect_files(cutoff, report)

    # registry objects: manifests and blobs
    def _mark(self, cutoff: float) -> Marks:
        revisions: dict[tuple[str, str], Listed] = {}
        tag_objects: list[Listed] = []
        links: dict[tuple[str, str], Listed] = {}
        for listed in self.store.listing("repositories/"):
            repo, kind, rest = _split_repository_key(listed.key)
            if kind == "revision":
                revisions[(repo, rest)] = listed
            elif kind == "tag":
                tag_objects.append(listed)
            elif kind == "link":
                links[(repo, rest)] = listed
        young = {digest for (_r, digest), listed in revisions.items() if listed.modified >= cutoff}
        if self.untagged:
            targets = self.parsed.read(tag_objects, _tag_target).values()
            roots = {str(target) for target in targets if target} | young
        else:
            roots = {digest for _repo, digest in revisions}
        live_manifests, live_blobs = self._closure(roots, {d for _r, d in revisions})
        live_blobs |= {digest for (_repo, digest), listed in links.items()
                       if listed.modified >= cutoff}  # fmt: skip
        recipes = list(self.store.listing("recipes/"))
        live_blobs |= {_digest_of_key(listed.key, "recipes/")
                       for listed in recipes if listed.modified >= cutoff}  # fmt: skip
        sizes = {_digest_of_key(listed.key, "recipes/"): listed.size for listed in recipes}
        return Marks(revisions, links, live_manifests, live_blobs, sizes)

    def _closure(self, roots: set[str], held: set[str]) -> tuple[set[str], set[str]]:
        """Live manifests (the roots, what indexes name, referrers of live ones: of the
        manifests repositories hold) and the blobs they name."""
        bodies = self.parsed.read([manifest_key(digest) for digest in held], _manifest_names)
        referrers: dict[str, set[str]] = {}
        for digest in held:
            subject = (bodies.get(manifest_key(digest)) or NAMES_NONE).subject
            if subject:
                referrers.setdefault(subject, set()).add(digest)
        live: set[str] = set()
        blobs: set[str] = set()
        level = set(roots)
        while level:
            live |= level
            named = self.parsed.read([manifest_key(digest) for digest in level], _manifest_names)
            found: set[str] = set()
            for digest in level:
                names = named.get(manifest_key(digest)) or NAMES_NONE
                blobs.update(names.blobs)
                found.update(names.children)
                found |= referrers.get(digest, set())
            level = found - live
        return live, blobs

    def _descriptors(self) -> dict[str, tuple[Listed, BlobInfo]]:
        listing = list(self.store.listing("blobs/"))
        parsed = self.parsed.read(listing, _descriptor)
        found = {}
        for listed in listing:
            data = parsed.get(listed.key)
            if isinstance(data, dict):
                digest = _digest_of_key(listed.key, "blobs/")
                found[digest] = (listed, BlobInfo.from_json(digest, data))
        return found

    def _registry_candidates(
        self,
        marks: Marks,
        descriptors: dict[str, tuple[Listed, BlobInfo]],
        cutoff: float,
    ) -> RegistryCandidates:
        untagged = [(repo, digest) for (repo, digest), listed in marks.revisions.items()
                    if self.untagged and digest not in marks.live_manifests
                    and listed.modified < cutoff]  # fmt: skip
        named = _named_by_revisions(marks, untagged)
        unnamed = {
            _digest_of_key(listed.key, "manifests/"): listed
            for listed in self.store.listing("manifests/")
            if listed.modified < cutoff
        }
        blobs = [digest for digest, (listed, _info) in descriptors.items()
                 if digest not in marks.live_blobs and listed.modified < cutoff]  # fmt: skip
        return RegistryCandidates(
            untagged,
            {digest: listed for digest, listed in unnamed.items() if digest not in named},
            blobs,
        )

    def _collect_registry(
        self,
        candidates: RegistryCandidates,
        marks: Marks,
        descriptors: dict[str, tuple[Listed, BlobInfo]],
        cutoff: float,
        report: GcReport,
    ) -> None:
        condemned_manifests = {d for _r, d in candidates.untagged} | set(candidates.unnamed)
        if not report.dry_run and (condemned_manifests or candidates.blobs):
            self.lease.publish(Notice(self.lease.run, frozenset(candidates.blobs),
                                      frozenset(condemned_manifests)))  # fmt: skip
            pause("gc.registry_noticed")
            before = candidates.count()
            candidates = candidates.still_unmarked(self._mark(cutoff))
            report.rescued += before - candidates.count()
            pause("gc.registry_marked_again")
        self._delete_untagged(candidates.untagged, report)
        self._delete_manifest_bytes(candidates.unnamed, report)
        self._delete_blobs([descriptors.pop(d)[1] for d in candidates.blobs], marks, report)
        if not report.dry_run:
            self.lease.withdraw()

    def _delete_untagged(self, untagged: list[tuple[str, str]], report: GcReport) -> None:
        report.untagged_manifests += len(untagged)
        for batch in _batches(untagged, DELETE_BATCH):
            if not self._may_delete(report):
                return
            self.store.delete([revision_key(repo, digest) for repo, digest in batch])
            for repo, digest in batch:
                self.manifests.forget_revision(repo, digest)

    def _delete_manifest_bytes(self, unnamed: dict[str, Listed], report: GcReport) -> None:
        report.manifests += len(unnamed)
        report.manifest_bytes += sum(listed.size for listed in unnamed.values())
        for batch in _batches(list(unnamed.items()), DELETE_BATCH):
            if not self._may_delete(report):
                return
            self.store.delete([listed.key for _digest, listed in batch])
            self.index.drop_manifest_bytes([digest for digest, _listed in batch])
            size = sum(listed.size for _digest, listed in batch)
            self.index.add_bytes(logical=-size, stored=-size)

    def _delete_blobs(self, infos: list[BlobInfo], marks: Marks, report: GcReport) -> None:
        report.blobs += len(infos)
        report.blob_bytes += sum(s.size for info in infos for s in info.segments + info.retired)
        linked: dict[str, list[str]] = {}
        for repo, digest in marks.links:
            linked.setdefault(digest, []).append(repo)
        for batch in _batches(infos, DELETE_BATCH // 8):
            if not self._may_delete(report):
                return
            keys = [key for info in batch for key in _blob_keys(info, linked.get(info.digest, []))]
            with self.pacer.step():
                for start in range(0, len(keys), DELETE_BATCH):
                    self.store.delete(keys[start : start + DELETE_BATCH])
                for info in batch:
                    self._forget_blob(info, linked.get(info.digest, []), marks.recipe_sizes)

    def _forget_blob(self, info: BlobInfo, repos: list[str], recipe_sizes: dict[str, int]) -> None:
        """The index entries, buffer entry and counters of a deleted blob."""
        for repo in repos:
            self.index.unlink_layer(repo, info.digest)
        self.index.drop_blob(info.digest)
        self.index.drop_layer(info.digest)
        self.buffer.drop(info.digest)
        recipe = recipe_sizes.get(info.digest, 0) if info.recipe else 0
        freed = sum(s.size for s in info.segments + info.retired) + recipe
        self.index.add_bytes(logical=-info.size, stored=-freed)

    # crash leftovers
    def _sweep_orphans(self, uploads: set[str], cutoff: float, report: GcReport) -> None:
        """Objects nothing names. Uploads were listed at the run's start, descriptors now:
        an upload's data objects are named by its state until its descriptor names them
        (the descriptor is written first), so one of the two listings sees them. A data
        object nothing names may be one being written (a monolithic upload, a replica):
        it is left alone for an upload's longest life (its TTL) beyond the grace."""
        descriptors = self._descriptors()
        named = {s.key for _l, info in descriptors.values() for s in info.segments + info.retired}
        doomed = []
        for prefix in ("data/", "recipes/", "layers/", "checkpoints/"):
            horizon = cutoff - (self.blobs.upload_ttl if prefix == "data/" else 0)
            for listed in self.store.listing(prefix):
                if listed.modified >= horizon or listed.key in named:
                    continue
                if prefix == "data/" and listed.key.split("/")[1] in uploads:
                    continue
                if prefix != "data/" and _digest_of_key(listed.key, prefix) in descriptors:
                    continue
                doomed.append(listed)
        links = [(repo, digest, listed) for listed in self.store.listing("repositories/")
                 for repo, kind, digest in [_split_repository_key(listed.key)]
                 if kind == "link" and digest not in descriptors
                 and listed.modified < cutoff]  # fmt: skip
        report.orphans += len(doomed) + len(links)
        counted = sum(item.size for item in doomed if item.key.startswith(COUNTED_PREFIXES))
        report.orphan_bytes += counted
        if doomed or links:
            if not self._may_delete(report):
                return
            self.store.delete([item.key for item in doomed] + [x.key for _r, _d, x in links])
            for repo, digest, _listed in links:
                self.index.unlink_layer(repo, digest)
            self.index.add_bytes(stored=-counted)

    # files and packs
    def _collect_files(self, cutoff: float, report: GcReport) -> None:
        live = LiveFiles(self.store, self.pacer)
        live.read_recipes()
        listing = list(self.store.listing("packs/"))
        judging = Judging(existing={listed.key for listed in listing})
        verdicts = self._judge_packs(listing, live, cutoff, judging, report)
        dead = {digest for verdict in verdicts for digest in verdict.dead}
        if not report.dry_run and dead:
            pause("gc.packs_judged")
            self.lease.publish(Notice(self.lease.run, files=frozenset(dead)))
            pause("gc.files_decided")
            rescued = live.read_recipes(dead)
            report.rescued += len(rescued)
            verdicts = self._judge_again(verdicts, rescued, live, judging, report)
            dead -= rescued
        report.files += len(dead)
        self._forget_dead_files(dead, verdicts, report)
        self._sweep_packs(verdicts, cutoff, report)
        if not report.dry_run:
            self.lease.withdraw()

    def _judge_packs(
        self,
        listing: list[Listed],
        live: LiveFiles,
        cutoff: float,
        judging: Judging,
        report: GcReport,
    ) -> list[PackVerdict]:
        """Each pack older than the grace, judged from its table (S3) against the live
        files; the index only says which copy of a live file readers use, and where it
        says none (or a pack that is gone), the first copy found is kept and pointed at."""
        return [self._judge(listed, live, judging, report)
                for listed in listing if listed.modified < cutoff]  # fmt: skip

    def _judge(
        self, listed: Listed, live: LiveFiles, judging: Judging, report: GcReport
    ) -> PackVerdict:
        with self.pacer.step():
            table = read_pack_table(self.store, listed.key, listed.size)
            indexed = self._indexed(table)
        kept, dead, dead_here, repairs = [], [], {}, {}
        for (digest, location), where in zip(table, indexed, strict=True):
            if not live.names(digest):
                dead.append(digest)
                if where == location.encode():
                    dead_here[digest] = location
            elif where == location.encode():
                kept.append((digest, location))
            elif (where is None or where.split(" ", 1)[0] not in judging.existing) and (
                digest not in judging.chosen
            ):
                judging.chosen.add(digest)
                kept.append((digest, location))
                repairs[digest.hex()] = (where, location.encode())
        if repairs and not report.dry_run:
            report.index_entries_repaired += self.index.replace_files(repairs)
        kept_bytes = sum(location.length for _digest, location in kept)
        file_bytes = sum(location.length for _digest, location in table)
        movable = kept if kept_bytes < self.compact_below * file_bytes else []
        return PackVerdict(listed, len(kept), kept_bytes, file_bytes, dead, dead_here, movable)

    def _judge_again(
        self,
        verdicts: list[PackVerdict],
        rescued: set[bytes],
        live: LiveFiles,
        judging: Judging,
        report: GcReport,
    ) -> list[PackVerdict]:
        """The packs holding a rescued file, judged again against the grown live set (with
        the first judging's packs and choices): their dead files now are a subset of those
        the notice named, so they may still go."""
        return [self._judge(v.listed, live, judging, report) if rescued.intersection(v.dead)
                else v for v in verdicts]  # fmt: skip

    def _indexed(self, table: list[tuple[bytes, Location]]) -> list[str | None]:
        hexes = [digest.hex() for digest, _location in table]
        found: list[str | None] = []
        for start in range(0, len(hexes), LOOKUP_BATCH):
            found += self.index.file_locations(hexes[start : start + LOOKUP_BATCH])
        return found

    def _forget_dead_files(
        self, dead: set[bytes], verdicts: list[PackVerdict], report: GcReport
    ) -> None:
        """Drop the index entries of dead files that point into the packs judged, so that
        no new ingest finds them (an ingest that found one before saw the notice)."""
        if report.dry_run or not dead:
            return
        items = [(digest.hex(), location.encode()) for verdict in verdicts
                 for digest, location in verdict.dead_indexed_here.items()
                 if digest in dead]  # fmt: skip
        for batch in _batches(items, LOOKUP_BATCH):
            if not self._may_delete(report):
                return
            with self.pacer.step():
                self.index.forget_files(dict(batch))
                self.index.forget_file_references([digest for digest, _place in batch])

    def _sweep_packs(self, verdicts: list[PackVerdict], cutoff: float, report: GcReport) -> None:
        waiting = self._deferred()
        for verdict in verdicts:
            key, size = verdict.listed.key, verdict.listed.size
            if not verdict.kept_count:
                if waiting.get(key, 0.0) > time.time():
                    report.packs_waiting += 1
                    continue
                report.packs_deleted += 1
                report.pack_bytes_freed += size
                if self._may_delete(report):
                    self.store.delete([key])
                    self.index.add_bytes(stored=-size)
            elif key not in waiting and verdict.sparse(self.compact_below):
                report.packs_compacted += 1
                report.pack_bytes_freed += size - verdict.kept_bytes
                if self._may_delete(report):
                    self._compact(verdict)
        self._forget_deferrals(waiting, report)

    def _compact(self, verdict: PackVerdict) -> None:
        """Copy a pack's kept files into a new one, move their index entries if they still
        point at the old place, and let the old pack wait a grace before it may go."""
        data = self.store.get_bytes(verdict.listed.key)
        parts: list[bytes] = []
        entries: list[tuple[bytes, int, int]] = []
        offset = 0
        for digest, location in verdict.movable:
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
            for (digest, old), (_d, new_offset, length) in zip(
                verdict.movable, entries, strict=True
            )
        }
        self.index.replace_files(moves)
        self.index.add_bytes(stored=len(body))
        due = time.time() + self.grace
        record = {"keys": [verdict.listed.key], "bytes": verdict.listed.size, "due": due}
        self.store.put_bytes(f"{DEFERRED_PREFIX}{due:.0f}-{uuid.uuid4().hex}",
                             json.dumps(record).encode())  # fmt: skip

    def _deferred(self) -> dict[str, float]:
        """Pack -> when it may be deleted, for packs compacted by earlier runs."""
        due: dict[str, float] = {}
        for key, _size in self.store.list(DEFERRED_PREFIX):
            try:
                record = json.loads(self.store.get_bytes(key))
            except (ObjectNotFound, ValueError):
                continue
            for pack in record["keys"]:
                due[pack] = max(due.get(pack, 0.0), float(record.get("due", 0.0)), _due_of(key))
        return due

    def _forget_deferrals(self, waiting: dict[str, float], report: GcReport) -> None:
        """Drop the deferral records whose packs are gone."""
        if report.dry_run or not waiting:
            return
        present = {key for key, _size in self.store.list("packs/")}
        for key, _size in list(self.store.list(DEFERRED_PREFIX)):
            try:
                record = json.loads(self.store.get_bytes(key))
            except (ObjectNotFound, ValueError):
                continue
            if not set(record["keys"]) & present:
                self.store.delete([key])


@dataclass
class RegistryCandidates:
    untagged: list[tuple[str, str]]  # revisions no tag leads to
    unnamed: dict[str, Listed]  # manifest bytes no revision names
    blobs: list[str]

    def count(self) -> int:
        return len(self.untagged) + len(self.unnamed) + len(self.blobs)

    def still_unmarked(self, marks: Marks) -> RegistryCandidates:
        """Those the marks taken again (after the notice) do not save."""
        untagged = [(repo, digest) for repo, digest in self.untagged
                    if digest not in marks.live_manifests]  # fmt: skip
        named = _named_by_revisions(marks, untagged)
        return RegistryCandidates(
            untagged,
            {digest: listed for digest, listed in self.unnamed.items() if digest not in named},
            [digest for digest in self.blobs if digest not in marks.live_blobs],
        )


def _named_by_revisions(marks: Marks, doomed: list[tuple[str, str]]) -> set[str]:
    """Manifest digests some revision names, other than the revisions to be deleted."""
    going = set(doomed)
    return {digest for key in marks.revisions if key not in going for digest in [key[1]]}


class LiveFiles:
    """The files the recipes in S3 name, read without keeping a recipe: a set of 8-byte
    prefixes of their sha256 (a dead file that shares a prefix with a live one is only
    kept, never the reverse), and which recipes were read, to read only new ones again."""

    def __init__(self, store: ObjectStore, pacer: Pacer) -> None:
        self.store = store
        self.pacer = pacer
        self.prefixes: set[int] = set()
        self.seen: dict[str, float] = {}

    def names(self, digest: bytes) -> bool:
        return int.from_bytes(digest[:8], "big") in self.prefixes

    def read_recipes(self, watched: AbstractSet[bytes] = frozenset()) -> set[bytes]:
        """Read the recipes not read yet (or rewritten); of `watched`, those they name."""
        new = [listed for listed in self.store.listing("recipes/")
               if self.seen.get(listed.key) != listed.modified]  # fmt: skip
        found: set[bytes] = set()
        for listed, digests in self.pacer.map(self._files_of, new):
            self.seen[listed.key] = listed.modified
            self.prefixes.update(int.from_bytes(d[:8], "big") for d in digests)
            found.update(digest for digest in digests if digest in watched)
        return found

    def _files_of(self, listed: Listed) -> list[bytes]:
        try:
            return list(Recipe.decode(self.store.get_bytes(listed.key)).file_refs())
        except (ObjectNotFound, RecipeError):
            return []


class ParsedObjects:
    """What one run reads of small S3 objects, parsed once per version (objects named by
    content never change; the others are read again when their LastModified changes).
    Only the parsed values are kept, never the bytes."""

    def __init__(self, store: ObjectStore, pacer: Pacer) -> None:
        self.store = store
        self.pacer = pacer
        self.cache: dict[str, tuple[float, Any]] = {}

    def read(self, objects: Iterable[Listed | str], parse: Any) -> dict[str, Any]:
        wanted = {item.key if isinstance(item, Listed) else item: item for item in objects}
        stale = [key for key, item in wanted.items()
                 if key not in self.cache or (isinstance(item, Listed)
                                              and self.cache[key][0] != item.modified)]  # fmt: skip
        for key, value in self.pacer.map(lambda k: parse(self._get(k)), stale):
            item = wanted[key]
            self.cache[key] = (item.modified if isinstance(item, Listed) else 0.0, value)
        return {key: self.cache[key][1] for key in wanted}

    def _get(self, key: str) -> bytes | None:
        try:
            return self.store.get_bytes(key)
        except ObjectNotFound:
            return None


def _blob_keys(info: BlobInfo, repos: list[str]) -> list[str]:
    """Every object of a blob, its links first (so it turns unknown before it goes)."""
    keys = [layer_link_key(repo, info.digest) for repo in repos]
    keys += [blob_key(info.digest)]
    keys += [segment.key for segment in info.segments + info.retired]
    keys += [recipe_key(info.digest), layer_record_key(info.digest), checkpoints_key(info.digest)]
    return keys


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _due_of(key: str) -> float:
    try:
        return float(key.removeprefix(DEFERRED_PREFIX).split("-", 1)[0])
    except ValueError:
        return 0.0


def _digest_of_key(key: str, prefix: str) -> str:
    """`<prefix><alg>/<hex>` -> `<alg>:<hex>`."""
    algorithm, _, hexdigest = key.removeprefix(prefix).partition("/")
    return f"{algorithm}:{hexdigest}"


def _json_object(data: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(data) if data else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _tag_target(data: bytes | None) -> str | None:
    return data.decode() if data else None


def _descriptor(data: bytes | None) -> dict[str, Any] | None:
    return _json_object(data) or None


@dataclass(frozen=True)
class ManifestNames:
    blobs: tuple[str, ...]  # config and layers
    children: tuple[str, ...]  # the manifests an index names
    subject: str | None  # what a referrer refers to


NAMES_NONE = ManifestNames((), (), None)


def _manifest_names(data: bytes | None) -> ManifestNames:
    body = _json_object(data)
    blobs = [d.get("digest") for d in [body.get("config") or {}, *body.get("layers", [])]
             if isinstance(d, dict)]  # fmt: skip
    children = [m.get("digest") for m in body.get("manifests", []) if isinstance(m, dict)]
    subject = body.get("subject")
    digest = subject.get("digest") if isinstance(subject, dict) else None
    return ManifestNames(
        tuple(str(d) for d in blobs if d),
        tuple(str(d) for d in children if d),
        str(digest) if digest else None,
    )


def _split_repository_key(key: str) -> tuple[str, str, str]:
    """repositories/<repo>/_manifests/revisions/<alg>/<hex> -> (repo, "revision", digest);
    .../_manifests/tags/<tag> -> (repo, "tag", tag); .../_layers/<alg>/<hex> -> "link"."""
    head, _, tail = key.partition("/_")
    repo = head.removeprefix("repositories/")
    parts = tail.split("/")
    if parts[:2] == ["manifests", "revisions"] and len(parts) == 4:
        return repo, "revision", f"{parts[2]}:{parts[3]}"
    if parts[:2] == ["manifests", "tags"] and len(parts) == 3:
        return repo, "tag", parts[2]
    if parts[0] == "layers" and len(parts) == 3:
        return repo, "link", f"{parts[1]}:{parts[2]}"
    return repo, "other", tail
