"""Layer ingestion: what the `ingest` worker does to a layer blob after a manifest push.

A layer is deduplicated in five steps, each safe to repeat after a crash:

1. classify the blob and shortlist the encoders that reproduce the start of it
   (nothing is stored for a layer that no encoder could rebuild);
2. split its tar: every regular-file payload goes once into the content store, all other
   bytes into the recipe;
3. prove the encoder on the tar rebuilt from the stored files (the trial restore: the
   sha256 of the recompressed rebuild must equal the blob digest); for gzip layers this
   is done segment by segment from checkpoints, which are kept (pipelines.serve.checkpoints);
4. write the recipe durably (garbage collection marks files from recipes), check that no
   GC run is deleting the blob or a file it names and that each file's pack is still
   there (pipelines.store.deletion), then switch the blob's descriptor to it (the commit point);
5. count the file references and mark the layer, at once and once; the intact copy is
   deleted afterwards by `retire_intact_copy`, after a grace period for in-flight GETs
   and once the layer restored from its packs alone to its digest.

Until step 4 the layer is intact; from step 4 on it is deduplicated. Nothing in between.
The layer record is durable in S3 (`layers/<alg>/<hex>`, JSON) and indexed in Redis.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import BinaryIO

from pipelines.config import DEFAULT_ZSTD_MAX_WINDOW
from pipelines.encoders import detect
from pipelines.encoders.base import Match, NoMatch, OpenStream
from pipelines.encoders.canaries import retirement_blocker
from pipelines.encoders.detect import SCREEN_STAGES, Shortlist
from pipelines.encoders.detect_frames import frames_shortlist, frames_to_rebuild
from pipelines.encoders.table import IDENTITY_ID
from pipelines.errors import BeingCollected, IndexIncomplete, RegistryError, is_transient
from pipelines.formats.codecs import (
    DECODE_ERRORS,
    SNIFF_BYTES,
    ChunkReader,
    Sniff,
    UnsupportedBlobError,
    open_decompressed,
    sniff,
)
from pipelines.formats.digests import digest_key
from pipelines.formats.recipe import Recipe, RecipeBuilder, RecipeError
from pipelines.formats.tarsplit import HashingReader, Payload, TarSplitError, split_tar
from pipelines.formats.verify import SegmentHasher, VerificationError
from pipelines.pauses import pause
from pipelines.serve.checkpoints import Checkpoints, checkpoints_key, prove_shortlisted
from pipelines.serve.layercheck import check_from_packs
from pipelines.serve.rebuild import large_file_spans, rebuild_tar, rebuild_tar_range
from pipelines.serve.restore import background_cores, restore_memory_bound
from pipelines.store.blobs import BlobInfo, BlobStore, blob_key
from pipelines.store.filestore import (
    IN_MEMORY_LIMIT,
    PACK_TARGET,
    PACKS_IN_FLIGHT,
    FileStore,
    Packer,
    SpooledPayload,
)
from pipelines.store.index import Index
from pipelines.store.leases import Lease
from pipelines.store.storage import ObjectNotFound, ObjectStore

QUEUED, INTACT, DEDUPLICATED = "queued", "intact", "deduplicated"
ORPHAN_PASSES = 3  # reads of a layer to store files whose claimants died
logger = logging.getLogger(__name__)
PENDING_ENCODER = "pending"
RETIRE_BLOCKED_KEY = "dh:retire-blocked"  # digest -> why its intact copy is kept
RETIRE_WAIT_SECONDS = 30  # for another retirement of the layer (its rewrite: well under 1 s)
UNPROVEN = "does not restore from its packs"


@dataclass
class LayerRecord:
    digest: str
    state: str
    size: int = 0
    compression: str = ""
    producer_hint: str = ""
    encoder: str = ""
    tar_bytes: int = 0
    files: int = 0  # regular-file payloads in the tar
    new_files: int = 0  # of which were not stored before
    new_file_bytes: int = 0  # bytes those added to storage
    recipe_bytes: int = 0
    split_seconds: float = 0.0  # decompress, split, hash and store the files
    prove_seconds: float = 0.0  # rebuild from stored files and recompress in full
    reason: str = ""
    updated: float = 0.0
    verified: float = 0.0  # when a scheduled verification last restored the layer
    verify_error: str = ""  # why it failed then ("" if it passed); kept until one passes

    def as_fields(self) -> dict[str, str]:
        return {key: str(value) for key, value in asdict(self).items()}


@dataclass
class IngestResult:
    record: LayerRecord
    retire_after_grace: bool  # an intact copy remains to be deleted


def ingest_memory_bound(zstd_window: int) -> int:
    """The most an ingest holds beyond its process's baseline (docs/architecture.md, Memory bounds):
    the screened prefix and the blob's head, a payload in memory and the packs being
    filled, the trial restore, and for a zstd layer its frames' window (at most
    DUPHUNTER_ZSTD_MAX_WINDOW)."""
    screening = 2 * (SCREEN_STAGES[-1] + SNIFF_BYTES)
    # payloads waiting, the pack being filled, the packs uploading: each at most a pack
    # and the in-memory payload that overflowed it
    packing = (2 + PACKS_IN_FLIGHT) * (PACK_TARGET + IN_MEMORY_LIMIT)
    return screening + packing + restore_memory_bound() + zstd_window


def layer_record_key(digest: str) -> str:
    return digest_key("layers", digest)


def recipe_key(digest: str) -> str:
    return digest_key("recipes", digest)


def open_intact(blobs: BlobStore, info: BlobInfo) -> BinaryIO:
    return io.BufferedReader(ChunkReader(blobs.read(info)), 1 << 20)


def mark_queued(store: ObjectStore, index: Index, digest: str) -> bool:
    """Record that a layer awaits ingestion; False if it was queued or ingested before."""
    if index.layer(digest).get("state"):
        return False
    save_record(store, index, LayerRecord(digest, QUEUED, updated=time.time()))
    return True


def check_is_layer(index: Index, digest: str) -> None:
    """Only a blob that a manifest names as a layer is ingested (each such layer has a
    record from the manifest's push on): a config or any other blob is kept as pushed."""
    if not index.layer(digest).get("state"):
        message = (f"{digest} is not a layer: no manifest names it as one (a config or "
                   "other blob is kept as pushed, never deduplicated)")  # fmt: skip
        raise RegistryError("UNSUPPORTED", message, {"digest": digest}, status=400)


def save_record(store: ObjectStore, index: Index, record: LayerRecord) -> None:
    fields = record.as_fields()
    store.put_bytes(layer_record_key(record.digest), json.dumps(fields).encode())
    index.put_layer(record.digest, fields)


class Ingestor:
    def __init__(
        self,
        store: ObjectStore,
        index: Index,
        blobs: BlobStore,
        files: FileStore,
        zstd_max_window: int = DEFAULT_ZSTD_MAX_WINDOW,
    ):
        self.store = store
        self.index = index
        self.blobs = blobs
        self.files = files
        self.zstd_max_window = zstd_max_window

    def ingest(self, digest: str) -> IngestResult:
        info = self.blobs.stored_info(digest)
        if info is None:
            return self._gone(digest, "blob not found")
        if info.deduplicated:  # a retry after the commit point: finish what follows it
            recipe = Recipe.decode(self.store.get_bytes(info.recipe or ""))
            return self._complete(info, recipe, self._recorded(digest))
        record = LayerRecord(digest, INTACT, size=info.size)
        kind = sniff(b"".join(self.blobs.read(info, 0, min(SNIFF_BYTES, info.size))))
        record.compression, record.producer_hint = kind.kind, kind.producer_hint or ""
        if kind.kind == "other":
            return self._intact(record, f"not a tar layer ({kind.detail or 'unknown format'})")
        try:
            outcome = self._deduplicate(info, kind, record)
        except UnsupportedBlobError as error:
            return self._intact(record, f"kept intact: {error}")
        except (*DECODE_ERRORS, TarSplitError, VerificationError) as error:
            return self._intact(record, f"unreadable: {type(error).__name__}: {error}")
        except ObjectNotFound as error:
            now = self.blobs.stored_info(digest)
            if now is None:  # GC took the blob while it was read
                return self._gone(digest, "blob collected while it was ingested")
            if now != info:  # collected and pushed again meanwhile: ingest what is stored now
                return self.ingest(digest)
            self._intact(record, f"ingest failed: {type(error).__name__}: {error}")
            raise
        except Exception as error:
            if not (is_transient(error) or isinstance(error, IndexIncomplete)):
                # the layer is still intact: say so, and fail the job
                self._intact(record, f"ingest failed: {type(error).__name__}: {error}")
            raise  # a passing cause leaves the layer queued, for the job to run again
        if isinstance(outcome, IngestResult):
            return outcome
        return self._complete(*outcome, record)

    def give_up(self, digest: str, deaths: int) -> IngestResult | None:
        """Keep the layer intact, un-ingested: its last `deaths` ingests died with their
        worker. None when the layer is past its commit point (what is left is short, and
        must finish: ingest it). The reason starts as a failed ingest's does: should a
        duplicate run commit meanwhile, `unfinished_ingests` finds the layer and finishes it."""
        info = self.blobs.stored_info(digest)
        if info is None:
            return self._gone(digest, "blob not found")
        if info.deduplicated:
            return None
        pause("ingest.give_up", digest)
        reason = (
            f"ingest failed: its worker died during {deaths} ingests in a row (killed, or "
            "out of memory); given up, the layer is served from its intact copy"
        )
        return self._intact(LayerRecord(digest, INTACT, size=info.size), reason)

    def _deduplicate(
        self, info: BlobInfo, kind: Sniff, record: LayerRecord
    ) -> IngestResult | tuple[BlobInfo, Recipe]:
        """Steps 1-4: an intact result, or the descriptor just committed and its recipe."""

        def open_blob() -> BinaryIO:
            return open_intact(self.blobs, info)

        def open_tar() -> BinaryIO:
            return open_decompressed(kind.kind, open_blob(), self.zstd_max_window)

        shortlist = self._shortlist(info, kind, open_blob, open_tar)
        if isinstance(shortlist, NoMatch):
            return self._intact(record, shortlist.reason)
        if not shortlist.screened:  # unscreenable candidates: settle them on the pushed tar
            found = detect.prove(shortlist, open_tar, info.digest)  # before storing a file
            if isinstance(found, NoMatch):
                return self._intact(record, found.reason)
            shortlist = shortlist.narrowed(found.encoder_id)
        started = time.perf_counter()
        recipe = self._split_and_store(kind, info, record)
        record.split_seconds = round(time.perf_counter() - started, 3)
        pause("ingest.files_stored", info.digest)
        match, checkpoints = self._prove(shortlist, recipe, info)
        record.prove_seconds = round(time.perf_counter() - started - record.split_seconds, 3)
        if isinstance(match, NoMatch):
            return self._intact(record, match.reason)
        recipe = replace(recipe, encoder_id=match.encoder_id, encoder_params=match.encoder_params)
        record.encoder = match.encoder_id
        pause("ingest.before_recipe")
        record.recipe_bytes = self._store_recipe(recipe)
        if checkpoints is not None:  # optional for restores: never read back here
            encoded = checkpoints.encode()
            self.store.put_bytes(checkpoints_key(info.digest), encoded)
            self.index.add_bytes(stored=len(encoded))
        if not self._may_rely(info, recipe):
            return self._gone(info.digest, "the blob was garbage-collected while it was ingested")
        deduplicated = BlobInfo(
            info.digest,
            info.size,
            [],
            recipe_key(info.digest),
            match.encoder_id,
            retired=info.segments,
        )
        self.blobs.replace_descriptor(deduplicated)
        return deduplicated, recipe

    def _shortlist(
        self,
        info: BlobInfo,
        kind: Sniff,
        open_blob: OpenStream,
        open_tar: OpenStream,
    ) -> Shortlist | NoMatch:
        """Step 1. A zstd layer's frames are scanned first (their windows checked against
        the cap): one of several frames is rebuilt frame by frame
        (pipelines.encoders.zstd_frames)."""
        if kind.kind != "zstd":
            return detect.shortlist(open_blob, open_tar, kind)

        def read_blob(offset: int, length: int) -> Iterable[bytes]:
            return self.blobs.read(info, offset, length)

        frames = frames_to_rebuild(read_blob, info.size, self.zstd_max_window)
        if frames is not None:
            return frames_shortlist(frames, read_blob, self.zstd_max_window)
        return detect.shortlist(open_blob, open_tar, kind)

    def _split_and_store(self, kind: Sniff, info: BlobInfo, record: LayerRecord) -> Recipe:
        """Read the pushed blob once: store its new files, build its recipe, and record the
        digest of each segment of it (checked against the blob digest once more)."""
        pushed = SegmentHasher(self.blobs.read(info))
        blob = io.BufferedReader(ChunkReader(pushed), 1 << 20)
        builder = RecipeBuilder()
        with (
            open_decompressed(kind.kind, blob, self.zstd_max_window) as stream,
            Packer(self.files) as store,
        ):
            tar = HashingReader(stream)
            for entry in split_tar(tar):
                if isinstance(entry, Payload):
                    spooled = SpooledPayload(entry.chunks())
                    builder.add_file(spooled.digest, spooled.size)
                    record.files += 1
                    store.add(spooled)
                else:
                    builder.add_raw(entry.data)
        record.tar_bytes = tar.size
        record.new_files, record.new_file_bytes = store.new_files, store.new_bytes
        recipe = builder.finish(
            blob_digest=info.digest,
            blob_size=info.size,
            tar_sha256=tar.sha256(),
            encoder_id=PENDING_ENCODER,
            encoder_params=b"",
            segments=pushed.finish(info.digest),
        )
        self._store_orphans(kind, info, store.orphaned, record)
        return recipe

    def _store_orphans(
        self, kind: Sniff, info: BlobInfo, orphaned: set[bytes], record: LayerRecord
    ) -> None:
        """Store the files another worker claimed but never stored (it died): read the
        layer again, keeping only those."""
        for _attempt in range(ORPHAN_PASSES):
            if not orphaned:
                return
            logger.warning("taking over %d files whose claimant died", len(orphaned))
            with (
                open_decompressed(
                    kind.kind, open_intact(self.blobs, info), self.zstd_max_window
                ) as stream,
                Packer(self.files) as store,
            ):
                for entry in split_tar(stream):
                    if isinstance(entry, Payload):
                        spooled = SpooledPayload(entry.chunks())
                        if spooled.digest in orphaned:
                            store.add(spooled)
                        else:
                            spooled.close()
            record.new_files += store.new_files
            record.new_file_bytes += store.new_bytes
            orphaned = store.orphaned
        if orphaned:
            raise ConnectionError(f"{len(orphaned)} files stay claimed by dead workers")

    def _prove(
        self, shortlist: Shortlist, recipe: Recipe, info: BlobInfo
    ) -> tuple[Match | NoMatch, Checkpoints | None]:
        """Step 3, finding and proving checkpoints on the way (pipelines.serve.checkpoints):
        its segments encoded on the host's cores, behind the restores clients wait for."""
        return prove_shortlisted(
            shortlist,
            info.digest,
            recipe.tar_size,
            lambda offset, length: self.blobs.read(info, offset, length),
            info.size,
            lambda start, end: list(rebuild_tar_range(recipe, self.files, start, end)),
            lambda: detect.prove(shortlist, self._opener(recipe), info.digest),
            avoid=large_file_spans(recipe),
            core=background_cores(time.time_ns()),
        )

    def _opener(self, recipe: Recipe) -> Callable[[], BinaryIO]:
        def open_rebuilt_tar() -> BinaryIO:
            return io.BufferedReader(ChunkReader(rebuild_tar(recipe, self.files)), 1 << 20)

        return open_rebuilt_tar

    def _may_rely(self, info: BlobInfo, recipe: Recipe) -> bool:
        """Between writing the recipe (what GC marks files from) and the commit point:
        whether the blob is still there (False: GC deleted it, nothing to commit). A GC run
        deleting the blob or a file the recipe names, or a file no longer stored, stops
        the commit: the layer stays intact and the job is tried again, when the files it
        lacks are stored anew."""
        files = list(recipe.file_refs())
        condemned = self.blobs.notices.condemned(blobs=[info.digest], files=files)
        if condemned:
            raise BeingCollected(f"{recipe.blob_digest}: {condemned.describe()}")
        if self.store.size(blob_key(info.digest)) is None:
            return False
        missing = self.files.missing(files)
        if missing:
            raise BeingCollected(f"{len(missing)} files of {recipe.blob_digest} are gone")
        return True

    def _store_recipe(self, recipe: Recipe) -> int:
        """Write the recipe and read it back: what S3 holds must decode to this recipe."""
        encoded = recipe.encode()
        key = recipe_key(recipe.blob_digest)
        self.store.put_bytes(key, encoded)
        if Recipe.decode(self.store.get_bytes(key)) != recipe:
            raise RecipeError(f"recipe {key} did not read back as written")
        self.index.add_bytes(stored=len(encoded))
        return len(encoded)

    def _complete(self, info: BlobInfo, recipe: Recipe, record: LayerRecord) -> IngestResult:
        """Steps after the commit point; each is idempotent, so a retry may redo them."""
        file_hexes = [digest.hex() for digest in recipe.file_refs()]
        record.state, record.encoder, record.reason = DEDUPLICATED, info.encoder, ""
        record.updated = time.time()
        retiring = sum(segment.size for segment in info.retired)
        self.index.commit_deduplication(info.digest, file_hexes, record.as_fields(), retiring)
        save_record(self.store, self.index, record)
        return IngestResult(record, retire_after_grace=bool(info.retired))

    def _recorded(self, digest: str) -> LayerRecord:
        fields = self.index.layer(digest)
        known = {key: fields[key] for key in LayerRecord.__dataclass_fields__ if key in fields}
        record = LayerRecord(digest, DEDUPLICATED)
        for key, value in known.items():
            current = getattr(record, key)
            setattr(record, key, type(current)(value) if key != "digest" else value)
        return record

    def record_verification(self, digest: str, error: str) -> None:
        """Keep the outcome of a verification read in the layer's record and the stats."""
        record = self._recorded(digest)
        record.verified, record.verify_error = time.time(), error
        save_record(self.store, self.index, record)
        self.index.count("verifications")
        if error:
            self.index.count("verification_failures")

    def _gone(self, digest: str, reason: str) -> IngestResult:
        """The blob is not stored (GC took it): no record is kept, so that the same layer
        pushed again is queued and ingested again."""
        self.store.delete([layer_record_key(digest)])
        self.index.drop_layer(digest)
        return IngestResult(LayerRecord(digest, INTACT, reason=reason), retire_after_grace=False)

    def _intact(self, record: LayerRecord, reason: str) -> IngestResult:
        record.state, record.reason, record.updated = INTACT, reason, time.time()
        save_record(self.store, self.index, record)
        return IngestResult(record, retire_after_grace=False)

    def retirement_blocker(self, info: BlobInfo) -> str | None:
        """Why a deduplicated layer's intact copy must not be deleted now: the encoder that
        rebuilds it failed its canary or has none that passed (pipelines.encoders.canaries)."""
        if info.encoder in (None, "", IDENTITY_ID):
            return None
        return retirement_blocker(self.index.redis, info.encoder)

    def unblocked_retirements(self) -> list[str]:
        """Layers whose retirement a canary blocked and whose encoder now passes: to retire
        again (after a check records its results)."""
        ready = []
        for raw in self.index.redis.hkeys(RETIRE_BLOCKED_KEY):
            digest = raw.decode()
            info = self.blobs.stored_info(digest)
            if info is None or not (info.retired or info.segments):
                self.index.redis.hdel(RETIRE_BLOCKED_KEY, digest)
            elif self.retirement_blocker(info) is None:
                ready.append(digest)
        return ready

    def _keep_as_replica(self, info: BlobInfo | None) -> None:
        if info is not None and info.deduplicated and info.retired:
            retiring = sum(segment.size for segment in info.retired)
            kept = replace(info, segments=info.segments + info.retired, retired=[])
            self.blobs.replace_descriptor(kept)
            self.index.count("replica_bytes", retiring)
            self.index.count("retiring_bytes", -retiring)

    def _unproven(self, info: BlobInfo) -> str | None:
        """Why the packs alone do not restore the layer (None when they do); raises
        IndexIncomplete while the index misses files, which is no evidence either way."""
        proof = check_from_packs(self.store, self.files, info)
        return None if proof.ok else f"{UNPROVEN}: {proof.reason}"

    def withdraw_replica(self, digest: str) -> bool:
        """Stop offering a deduplicated layer's replica (a hot layer that cooled): it turns
        into an intact copy awaiting deletion, so that no new presigned URL names it.
        Whether there was one; `retire_intact_copy` deletes it a grace later."""
        with self._retire_lock(digest):
            info = self.blobs.stored_info(digest)
            if info is None or not info.deduplicated or not info.segments:
                return False
            withdrawn = sum(segment.size for segment in info.segments)
            self.blobs.replace_descriptor(
                replace(info, segments=[], retired=info.retired + info.segments)
            )
            self.index.count("replica_bytes", -withdrawn)
            self.index.count("retiring_bytes", withdrawn)
            return True

    def retire_intact_copy(self, digest: str, keep_replica: bool = False) -> int:
        """Settle the intact copy of a deduplicated layer: delete it (the bytes freed), or,
        for a layer hot enough to keep one (S-mode), keep it as the layer's replica. It is
        deleted only once the layer restored from its packs alone to its digest: it is the
        last full copy. The restore runs outside the lock, which guards only the short
        read and rewrite of the descriptor (a worker killed holding it blocks no one for
        long)."""
        pause("retire.start", digest)
        info = self.blobs.stored_info(digest)
        if info is None or not info.deduplicated or not (info.retired or info.segments):
            return 0
        if keep_replica:
            with self._retire_lock(digest):
                self._keep_as_replica(self.blobs.stored_info(digest))
            return 0
        blocker = self.retirement_blocker(info) or self._unproven(info)
        with self._retire_lock(digest) as lease:
            info = self.blobs.stored_info(digest)  # another retirement may have settled it
            if info is None or not info.deduplicated or not (info.retired or info.segments):
                return 0
            if blocker:  # kept, and served from; retired later once it passes
                self._keep_intact_copy(info, blocker)
                return 0
            lease.ensure_held()
            return self._delete_intact_copy(info)

    def _keep_intact_copy(self, info: BlobInfo, blocker: str) -> None:
        logger.warning("keeping the intact copy of %s: %s", info.digest, blocker)
        self.index.redis.hset(RETIRE_BLOCKED_KEY, info.digest, blocker)
        self.index.count("retirements_blocked")
        if blocker.startswith(UNPROVEN):  # the packs cannot serve it: GETs read the copy
            self._keep_as_replica(info)

    def _delete_intact_copy(self, info: BlobInfo) -> int:
        doomed = info.retired + info.segments
        self.index.redis.hdel(RETIRE_BLOCKED_KEY, info.digest)
        present = [s for s in doomed if self.store.size(s.key) is not None]
        self.store.delete([s.key for s in present])
        freed = sum(s.size for s in present)
        self.index.add_bytes(stored=-freed)
        self.index.count("replica_bytes", -sum(s.size for s in info.segments))
        self.index.count("retiring_bytes", -sum(s.size for s in info.retired))
        self.blobs.replace_descriptor(replace(info, segments=[], retired=[]))
        return freed

    def _retire_lock(self, digest: str) -> Lease:
        return self.index.lock(f"retire:{digest}", blocking_timeout=RETIRE_WAIT_SECONDS)
