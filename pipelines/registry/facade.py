"""The registry as the API sees it: one object holding blobs, manifests and accounting.

One module of ~720 lines because `Registry` is the one surface the API and the workers
call, most of its methods a few lines handing over to a subsystem; the index rebuild
from S3 (`rebuild_index` and its helpers, ~120 lines) is the seam to cut next.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from redis.exceptions import LockError

from pipelines import metrics
from pipelines.config import Settings
from pipelines.encoders import canaries
from pipelines.encoders.canaries import CANARY_KEY
from pipelines.encoders.table import prepare_encoders
from pipelines.errors import RegistryError, is_transient
from pipelines.formats.digests import Digest
from pipelines.formats.recipe import Recipe
from pipelines.ingest.ingestor import DEDUPLICATED, INTACT, QUEUED, RETIRE_BLOCKED_KEY, Ingestor
from pipelines.pauses import pause
from pipelines.registry.gc import REPORT_KEY as GC_REPORT_KEY
from pipelines.registry.gc import GarbageCollector
from pipelines.registry.jobmarks import JobMarks
from pipelines.registry.manifests import ManifestStore, is_digest_reference
from pipelines.registry.names import valid_name
from pipelines.registry.retention import load_policy, rule_for
from pipelines.registry.retention import plan as retention_plan
from pipelines.serve.buffer import LayerBuffer
from pipelines.serve.layercheck import check_from_packs
from pipelines.serve.popularity import Popularity
from pipelines.serve.predict import (
    PERIOD,
    PERIOD_MAX_PER_SCAN,
    AccessHistory,
    ClientHistory,
    PeriodPlan,
    Prediction,
    choose_platform,
    fleet_rule,
    history_rule,
    predict,
    restore_bytes_ahead,
)
from pipelines.serve.rebuild import RestoreError
from pipelines.serve.restore import RestoreHub, share_host_cores
from pipelines.serve.serving import BlobRead, BlobServer
from pipelines.store.blobs import BlobInfo, BlobStore
from pipelines.store.filestore import FileStore, read_pack_table
from pipelines.store.index import Index
from pipelines.store.storage import ObjectNotFound, ObjectStore, S3Store

REDIRECT_URL_SECONDS = 1200
PULLERS_WINDOW_SECONDS = 24 * 3600
AUDIT_KEY = "dh:audit:packs"
REBUILD_LOCK = "rebuild-index"
REBUILD_SECONDS = 3600  # how long a rebuild waits for one running elsewhere
REBUILD_REQUEST_KEY = "dh:index:rebuild-requested"
REBUILD_REQUEST_SECONDS = 60  # after this, a request that never ran (lost?) is made again


def _count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _blob_digest(key: str) -> str:
    """ "blobs/sha256/<hex>" -> "sha256:<hex>"."""
    _prefix, algorithm, hex_digest = key.split("/")
    return f"{algorithm}:{hex_digest}"


def paginate(items: list[str], count: int | None, last: str | None) -> tuple[list[str], bool]:
    """Items after `last`, at most `count` of them, and whether more remain."""
    if last:
        items = [item for item in items if item > last]
    if count is None:
        return items, False
    return items[:count], len(items) > count


def parse_count(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise RegistryError(
            "PAGINATION_NUMBER_INVALID", "invalid number of results requested", {"n": raw}
        )
    return int(raw)


@dataclass(frozen=True)
class ReplicaPlan:
    hot: frozenset[str]  # should hold an intact replica
    holding: frozenset[str]  # hold one (or an intact copy not yet settled)

    @property
    def to_promote(self) -> list[str]:
        return sorted(self.hot - self.holding)

    @property
    def to_demote(self) -> list[str]:
        return sorted(self.holding - self.hot)


@dataclass
class Registry:
    settings: Settings
    store: ObjectStore
    index: Index
    blobs: BlobStore
    manifests: ManifestStore
    files: FileStore
    ingestor: Ingestor
    buffer: LayerBuffer
    server: BlobServer
    popularity: Popularity
    history: AccessHistory
    jobmarks: JobMarks

    @classmethod
    def connect(cls, settings: Settings | None = None) -> Registry:
        settings = settings or Settings()
        store = S3Store(settings)
        index = Index.from_url(settings.redis_url)
        blobs = BlobStore(store, index, settings.max_blob_bytes, settings.upload_ttl_seconds)
        files = FileStore(store, index, int(settings.claim_lease_seconds * 1000))
        buffer = LayerBuffer(
            store,
            index.redis,
            settings.buffer_bytes,
            settings.buffer_tau_seconds,
            settings.buffer_pin_seconds,
            settings.prediction_pin_seconds,
        )
        hub = RestoreHub(settings.spool_dir, settings.restore_keep_seconds)
        share_host_cores(settings.spool_dir / "cores")  # the host's, as the spool is
        return cls(
            settings,
            store,
            index,
            blobs,
            ManifestStore(store, index, blobs),
            files,
            Ingestor(store, index, blobs, files, settings.zstd_max_window),
            buffer,
            BlobServer(store, index, blobs, files, hub, buffer),
            Popularity(index.redis, settings.popularity_tau_seconds),
            AccessHistory(
                index.redis, settings.history_half_life_seconds, settings.period_scan_seconds
            ),
            JobMarks(index.redis),
        )

    def read_blob(self, info: BlobInfo, offset: int = 0, length: int | None = None) -> BlobRead:
        """The blob's bytes [offset, offset+length) and what serves them (`serving`). The
        first bytes are produced before this returns, so that a blob that cannot be
        served gets an error status instead of a cut-off body."""
        end = info.size if length is None else offset + length
        read = self.server.read(info, offset, end)
        try:
            first = next(read.chunks, b"")
        except (RestoreError, ObjectNotFound) as error:
            if is_transient(error) or not self._backends_answer():
                message = f"blob {info.digest} cannot be served while a backend is unreachable"
                raise RegistryError("UNAVAILABLE", message) from error
            message = f"blob {info.digest} cannot be served: {error}"
            raise RegistryError("UNKNOWN", message) from error
        return BlobRead(read.source, itertools.chain([first], read.chunks))

    def _backends_answer(self) -> bool:
        """Whether Redis and S3 answer now: asked once a restore failed, whose cause may
        be lost on the way (a restore shared by several GETs fails for all of them)."""
        try:
            self.index.redis.ping()
            self.store.size(AUDIT_KEY)  # any key: whether S3 answers, not the object
        except Exception:
            return False
        return True

    def verify_blob(self, digest: str) -> dict[str, Any]:
        """Prove a blob from durable objects alone (`check_from_packs`: a deduplicated
        layer from its recipe and packs, never from a cache or an intact copy); a
        deduplicated layer's outcome is kept in its record, failures in the stats."""
        info = self.blobs.stored_info(digest)
        if info is None:
            return {"digest": digest, "ok": False, "reason": "blob not found", "problems": []}
        check = check_from_packs(self.store, self.files, info)
        if not check.ok:  # its descriptor may have switched meanwhile (a copy retired)
            current = self.blobs.stored_info(digest)
            if current is not None and current != info:
                info, check = current, check_from_packs(self.store, self.files, current)
        if not check.ok:
            metrics.VERIFICATION_FAILURES.inc()
        if info.deduplicated:
            self.ingestor.record_verification(digest, check.reason)
        return {**check.as_dict(), "checked": time.time()}

    def stored_blobs(self) -> list[str]:
        """Every blob with a descriptor in S3 (deduplicated or not): `verify --all`."""
        return [_blob_digest(key) for key, _size in self.store.list("blobs/")]

    def redirect_url(self, info: BlobInfo) -> str | None:
        """With DUPHUNTER_REDIRECT=presigned, a presigned S3 URL for a blob whose bytes lie
        whole in one S3 object (an intact copy pushed in one request, a replica), so that
        its bytes skip the API; None when it must be streamed."""
        if self.settings.redirect != "presigned" or len(info.segments) != 1:
            return None
        return self.store.presigned_get(info.segments[0].key, self._redirect_seconds())

    def _redirect_seconds(self) -> int:
        """A presigned URL never outlives its object: an intact copy is deleted a retire
        grace after it stops being offered (it turned into a recipe, or a replica was
        withdrawn), a blob nothing names a GC grace after its last push."""
        graces = (self.settings.retire_grace_seconds, self.settings.gc_grace_seconds)
        return max(1, int(min(REDIRECT_URL_SECONDS, *graces)))

    def encoder_canaries(self) -> dict[str, bool]:
        """Per encoder id, whether its last canary check passed (written at start and by
        `duphunter verify --encoders`)."""
        raw = self.index.redis.hgetall(CANARY_KEY)
        return {key.decode(): value == b"ok" for key, value in raw.items()}

    def check_encoder_canaries(self) -> dict[str, Any]:
        """Run every encoder's canary here, record the results (readiness and retirement
        follow them) and report: {"ok", "checked", "failed": {id: reason}}."""
        return canaries.report(canaries.check_and_record(self.index.redis))

    def collector(self) -> GarbageCollector:
        settings = self.settings
        return GarbageCollector(
            self.store,
            self.index,
            self.blobs,
            self.manifests,
            self.files,
            self.buffer,
            settings.gc_grace_seconds,
            settings.gc_compact_below,
            settings.gc_untagged,
            settings.gc_nice,
            settings.gc_pace,
        )

    def last_gc(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.store.get_bytes(GC_REPORT_KEY)))
        except ObjectNotFound:
            return None

    def apply_retention(self, dry_run: bool) -> dict[str, list[str]]:
        """Delete the tags the retention policy does not keep (all repositories); the
        tags deleted (or that would be, in a dry run), by repository."""
        rules = load_policy(self.settings.retention_policy)
        repositories = [repo for repo in self.index.repositories() if rule_for(rules, repo)]
        doomed = retention_plan(
            rules, {repo: self.manifests.tag_times(repo) for repo in repositories}
        )
        if not dry_run:
            for repo, tags in doomed.items():
                for tag in tags:
                    self.manifests.delete(repo, tag)
        return doomed

    def deduplicates(self) -> bool:
        """False in mode `intact`: a plain registry that never deduplicates a layer."""
        return self.settings.mode != "intact"

    # what the registry learns from GETs, and what it rebuilds or keeps because of it
    def on_manifest_get(
        self, client: str, repo: str, digest: str, when: float | None = None, reference: str = ""
    ) -> list[Prediction]:
        """Learn from a manifest GET (at `when`, by default now; of `reference`, the tag or
        digest asked for, by default `digest`); the layers worth rebuilding before the
        client asks. For an index, the platform the client will take is predicted and its
        layers returned at once (the client's next request is that manifest)."""
        when = time.time() if when is None else when
        manifest = self.manifests.get(repo, digest, [])
        history = self.history.client(client)
        self.history.record_repository_client(repo, client, time.time())
        children = manifest.platforms()
        if children:
            self.history.remember_index(client, dict(children))
            chosen = choose_platform([platform for _child, platform in children], history)
            child = self.manifests.get(repo, children[chosen][0], [])
            layers = child.layer_digests()
            self._record_pull(client, repo, reference or digest, when, layers, history)
            return self._worth_rebuilding(layers, history, when)
        layers = manifest.layer_digests()
        if not self.history.fetched_from_index(client, digest):
            self._record_pull(client, repo, reference or digest, when, layers, history)
        self.history.record_platform_choice(client, digest)
        predictions = self._worth_rebuilding(layers, history, when)
        self.history.record_manifest_get(client, layers, history)
        return predictions

    def _record_pull(
        self,
        client: str,
        repo: str,
        reference: str,
        when: float,
        layers: list[str],
        history: ClientHistory,
    ) -> None:
        """For the `period` predictor: one more pull of `repo:reference` by the client."""
        if self.settings.predictor != PERIOD:
            return
        infos = self._infos(layers)
        sizes = {
            d: info.size for d, info in infos.items() if info is not None and info.deduplicated
        }
        ahead = restore_bytes_ahead(history_rule(layers, history, sizes), sizes)
        self.history.periods.record_pull(client, repo, reference, when, ahead)

    def on_periods_due(
        self, now: float, limit: int = PERIOD_MAX_PER_SCAN
    ) -> list[tuple[PeriodPlan, list[Prediction]]]:
        """The `period` predictor's plans due by `now` (at most `limit`), each with the
        layers to rebuild for its pull: those the client's history expects it to GET, of
        the manifest its reference names now (a tag may have moved), not already served
        intact or buffered (a buffered one is pinned for the pull instead)."""
        planned = []
        for due in self.history.periods.claim_due(now, limit):
            try:
                manifest = self.manifests.get(due.repository, due.reference, [])
                history = self.history.client(due.client)
                children = manifest.platforms()
                if children:
                    chosen = choose_platform([platform for _c, platform in children], history)
                    manifest = self.manifests.get(due.repository, children[chosen][0], [])
            except RegistryError:
                continue  # the tag or manifest is gone: nothing to pull
            layers = manifest.layer_digests()
            infos = self._infos(layers)
            sizes = {digest: info.size for digest, info in infos.items() if info is not None}
            predicted = history_rule(layers, history, sizes)
            worth = self._needing_rebuild(predicted, infos, PERIOD, 1, due.plan.ready_by)
            planned.append((due.plan, worth))
        return planned

    def on_tag_put(
        self, repo: str, reference: str, digest: str, when: float
    ) -> tuple[int, list[Prediction]]:
        """Act on a manifest put as `repo:reference` at `when`, before any client asks: with
        the history predictor, a new tag's layers that the repository's pullers lack.
        Returns how many GETs each layer expects (the pullers) and the layers to rebuild."""
        if self.settings.predictor not in ("history", PERIOD) or is_digest_reference(reference):
            return 0, []
        pullers = self.expected_pullers(repo)
        if not pullers:
            return 0, []
        layers = self.manifests.get(repo, digest, []).layer_digests()
        predictions = fleet_rule(layers, self.history.pulled_through(repo, layers))
        infos = self._infos(prediction.digest for prediction in predictions)
        return pullers, self._needing_rebuild(predictions, infos, "pushed", pullers, when)

    def _worth_rebuilding(
        self, layers: list[str], history: ClientHistory, when: float
    ) -> list[Prediction]:
        infos = self._infos(layers)
        sizes = {digest: info.size for digest, info in infos.items() if info is not None}
        predictions = predict(self.settings.predictor, layers, history, sizes)
        return self._needing_rebuild(predictions, infos, "predicted", 1, when)

    def _infos(self, layers: Iterable[str]) -> dict[str, BlobInfo | None]:
        return {digest: self.blobs.info(digest) for digest in dict.fromkeys(layers)}

    def _needing_rebuild(
        self,
        predictions: list[Prediction],
        infos: dict[str, BlobInfo | None],
        origin: str,
        gets: int,
        when: float,
    ) -> list[Prediction]:
        """The predicted layers (their `infos` looked up) that nothing serves yet; a
        buffered one is pinned for the `gets` expected since `when` instead."""
        worth = []
        for prediction in predictions:
            info = infos.get(prediction.digest)
            if info is None or not info.deduplicated or info.segments:
                continue  # served intact: nothing to rebuild
            if self.buffer.entry(prediction.digest) is not None:
                self.buffer.expect(prediction.digest, gets, when, origin)
                continue
            worth.append(prediction)
        return worth

    def on_blob_get(self, client: str, repo: str, digest: str, when: float) -> None:
        self.history.record_blob_get(client, repo, digest, when)
        self.popularity.record_get(digest, when)

    def expected_pullers(self, repo: str) -> int:
        """Clients that fetched the repository's manifests within the last
        PULLERS_WINDOW_SECONDS: who will likely pull a layer just pushed there."""
        return self.history.recent_clients(repo, time.time() - PULLERS_WINDOW_SECONDS)

    def keeps_replica(self, digest: str) -> bool:
        """Whether a just-deduplicated layer keeps its intact copy as a replica (S-mode):
        it was in the last hot set, or it is pulled at the hot rate already. The next
        `replica_plan` applies the byte budget."""
        if self.settings.mode != "s":
            return False
        rate = self.popularity.rate_per_hour(digest)
        return rate >= self.settings.hot_gets_per_hour or self.popularity.was_hot(digest)

    def replica_plan(self) -> ReplicaPlan:
        """Which deduplicated layers should hold an intact replica, and which hold one."""
        sizes: dict[str, int] = {}
        holding: set[str] = set()
        for digest, state in self.index.layer_states().items():
            info = self.blobs.info(digest) if state == DEDUPLICATED else None
            if info is not None:
                sizes[digest] = info.size
                if info.segments or info.retired:
                    holding.add(digest)
        hot: frozenset[str] = frozenset()
        if self.settings.mode == "s":
            budget, floor = self.settings.hot_bytes, self.settings.hot_gets_per_hour
            hot = self.popularity.hot_set(sizes, budget, floor).hot
        self.popularity.remember_hot(hot)
        return ReplicaPlan(hot, frozenset(holding))

    def warm(self, repo: str, reference: str, platforms: list[str]) -> list[str]:
        """The deduplicated layers of an image (of the wanted platforms of an index) that
        nothing serves intact: what `POST /api/v1/jobs/preconstruct` rebuilds."""
        manifest = self.manifests.get(repo, reference, [])
        children = manifest.platforms()
        if children:
            wanted = [d for d, platform in children if not platforms or platform in platforms]
            layers = [
                layer
                for child in wanted
                for layer in self.manifests.get(repo, child, []).layer_digests()
            ]
        else:
            layers = manifest.layer_digests()
        worth = []
        for digest in dict.fromkeys(layers):
            info = self.blobs.info(digest)
            if info is not None and info.deduplicated and not info.segments:
                worth.append(digest)
        return worth

    def mount(self, repo: str, digest: str, source_repo: str) -> bool:
        """Cross-repository mount; False (so the client uploads instead) when `source_repo`
        cannot lend the blob, including when its name or the digest is malformed."""
        if not valid_name(source_repo):
            return False
        try:
            Digest.parse(digest)
        except RegistryError:
            return False
        return self.blobs.mount(repo, digest, source_repo)

    def catalog(self, count: int | None, last: str | None) -> tuple[list[str], bool]:
        names = self.index.repositories(last or "", None if count is None else count + 1)
        if count is None:
            return names, False
        return names[:count], len(names) > count

    def stats(self) -> dict[str, Any]:
        counters = self.index.counters()
        logical = counters.get("logical_bytes", 0)
        stored = counters.get("stored_bytes", 0)
        layers = list(self.index.layer_summaries().values())
        files = self.index.file_count()
        waiting = counters.get("retiring_bytes", 0)
        buffer = self.buffer.stats()
        return {
            "logical_bytes": logical,
            "stored_bytes": stored,
            "dedup_ratio": round(logical / stored, 4) if stored else None,
            "awaiting_deletion_bytes": {
                "intact_copies_in_grace": waiting,
                "pack_garbage_lost_races": counters.get("pack_garbage_bytes", 0),
            },
            "dedup_ratio_once_deleted": (
                round(logical / (stored - waiting), 4) if stored > waiting else None
            ),
            "repositories": len(self.index.repositories()),
            "unique_files": files,
            "unreferenced_files": files - self.index.referenced_file_count(),
            "pack_garbage": self._pack_garbage(counters),
            "layers": _count(layer["state"] for layer in layers),
            "layers_by_encoder": _count(
                layer["encoder"] for layer in layers if layer["state"] == DEDUPLICATED
            ),
            "intact_layers_by_reason": _count(
                layer["reason"] for layer in layers if layer["state"] == INTACT
            ),
            "verification": self._verification_stats(counters),
            "intact_copies_kept_for_canaries": {
                key.decode(): value.decode()
                for key, value in self.index.redis.hgetall(RETIRE_BLOCKED_KEY).items()
            },
            "storage": {
                "mode": self.settings.mode,
                "stored_bytes": stored,
                "replica_bytes": counters.get("replica_bytes", 0),
                "buffer_bytes": buffer["used_bytes"],
                "stored_with_buffer_bytes": stored + buffer["used_bytes"],
            },
            "buffer": buffer,
            "restores": {
                "on_demand_or_preconstructed": counters.get("restores", 0),
                "preconstructions": counters.get("preconstructions", 0),
                "preconstructions_skipped_late": counters.get("preconstructions_too_late", 0),
                # filled ahead of GETs, and evicted, or still held, before any GET came
                "preconstructions_wasted": buffer["wasted_preconstructions"]
                + buffer["unused_preconstructed_entries"],
                "cpu_seconds": counters.get("restore_cpu_ms", 0) / 1000,
                "intact_reads_resumed": counters.get("intact_reads_resumed_from_restore", 0),
                "buffer_reads_resumed": counters.get("buffer_reads_resumed_from_restore", 0),
            },
            "predictor": self.settings.predictor,
            "gc": self.last_gc(),
        }

    def _pack_garbage(self, counters: dict[str, int]) -> dict[str, Any]:
        """Bytes in packs that no index entry points to: copies that lost a race, counted
        as they happen, and the last full audit (which also sees crash leftovers)."""
        audit = self.index.redis.hgetall(AUDIT_KEY)
        return {
            "lost_race_bytes": counters.get("pack_garbage_bytes", 0),
            "last_audit": {key.decode(): float(value) for key, value in audit.items()},
        }

    def audit_packs(self) -> dict[str, int]:
        """Compare every pack with the index (the maintenance job, hourly) and keep the
        result for the stats."""
        result = self.files.audit().as_dict()
        fields: dict[str | bytes, float] = {key: value for key, value in result.items()}
        self.index.redis.hset(AUDIT_KEY, mapping={**fields, "at": time.time()})
        return result

    def _verification_stats(self, counters: dict[str, int]) -> dict[str, Any]:
        records = self.index.layer_summaries(("verify_error",))
        return {
            "reads": counters.get("verifications", 0),
            "failures": counters.get("verification_failures", 0),
            "failing_layers": {
                digest: fields["verify_error"]
                for digest, fields in records.items()
                if fields["verify_error"]
            },
        }

    def layers_by_last_verification(self) -> list[str]:
        """Deduplicated layers in the order they should be verified: those never verified
        first, the most recently deduplicated of them first (a problem in new code shows
        early), then those verified longest ago."""
        records = self.index.layer_summaries(("state", "verified", "updated"))
        order = {
            digest: (float(fields["verified"] or 0), -float(fields["updated"] or 0))
            for digest, fields in records.items()
            if fields["state"] == DEDUPLICATED
        }
        return sorted(order, key=lambda digest: order[digest])

    def unfinished_ingests(self, older_than: float) -> list[str]:
        """Layers whose ingest did not finish: still queued since before `older_than`, or
        recorded as failed while S3 holds a committed descriptor (a half-done commit)."""
        records = self.index.layer_summaries(("state", "reason", "updated"))
        stale = []
        for digest, fields in records.items():
            if fields["state"] == QUEUED and float(fields["updated"] or 0) < older_than:
                stale.append(digest)
            elif fields["state"] == INTACT and fields["reason"].startswith("ingest failed"):
                info = self.blobs.stored_info(digest)
                if info is not None and info.deduplicated:
                    stale.append(digest)
        return stale

    def overdue_retirements(self, older_than: float) -> list[str]:
        """Deduplicated layers, settled before `older_than`, whose intact copy still awaits
        deletion, or is kept though no canary, failed proof or heat keeps it: their
        retirement job was lost (a worker killed with it), or the reason it was kept was
        (Redis emptied)."""
        kept = {key.decode() for key in self.index.redis.hkeys(RETIRE_BLOCKED_KEY)}
        records = self.index.layer_summaries(("state", "updated"))
        overdue = []
        for digest, fields in records.items():
            settled = fields["state"] == DEDUPLICATED and float(fields["updated"] or 0) < older_than
            if settled and digest not in kept:
                info = self.blobs.info(digest)
                unwanted = info is not None and info.segments and not self.keeps_replica(digest)
                if info is not None and (info.retired or unwanted):
                    overdue.append(digest)
        return overdue

    def prepare_to_serve(self) -> None:
        """What a process that serves GETs does at start, before its first request: the
        index ready, the encoders' first-use checks made."""
        self.ensure_index()
        prepare_encoders()

    def ensure_index(self) -> dict[str, int] | None:
        """Rebuild the index from S3 if it is incomplete; one process does it, the others
        wait for it. What this call indexed (None: nothing, the index was complete)."""
        if self.index.is_ready():
            return None
        with self._holding_rebuild_lock():
            return None if self.index.is_ready() else self._rebuild_from_s3(None)

    def rebuild_index(self, progress: Callable[[int], None] | None = None) -> dict[str, int]:
        """Recreate every Redis index entry from what S3 holds, after any rebuild running
        elsewhere (two at once would clear each other's entries); `progress` hears how
        many objects were indexed, every thousand."""
        with self._holding_rebuild_lock():
            return self._rebuild_from_s3(progress)

    def claim_rebuild_request(self) -> bool:
        """Whether this caller is the one to ask for the incomplete index to be rebuilt:
        no rebuild runs, and none was asked for (and not yet done) by another."""
        if self._rebuild_lock().locked():
            return False
        claimed = self.index.redis.set(
            REBUILD_REQUEST_KEY, "1", nx=True, ex=REBUILD_REQUEST_SECONDS
        )
        return bool(claimed)

    def release_rebuild_request(self) -> None:
        """The requested rebuild ended (or could not be asked for): the next lookup to
        find the index incomplete may ask again."""
        self.index.redis.delete(REBUILD_REQUEST_KEY)

    @contextmanager
    def _holding_rebuild_lock(self) -> Iterator[None]:
        """The rebuild lock held; if Redis lost it meanwhile, the rebuild's own check (its
        mark) says what that cost, not a failed release."""
        lock = self._rebuild_lock()
        if not lock.acquire():
            raise LockError("another rebuild of the index ran for too long")
        try:
            yield
        finally:
            lock.release()

    def _rebuild_lock(self) -> Any:
        return self.index.lock(REBUILD_LOCK, blocking_timeout=REBUILD_SECONDS)

    def _rebuild_from_s3(self, progress: Callable[[int], None] | None) -> dict[str, int]:
        self.index.clear()
        token = uuid.uuid4().hex
        self.index.begin_rebuild(token)
        counts: dict[str, int] = {}
        logical = stored = 0
        recipes_in_use: list[str] = []
        self.store.delete([key for key, _size in self.store.list("buffer/")])  # a cache
        replica_bytes = retiring_bytes = 0
        for key, size in self.store.list(""):
            kind = key.split("/", 1)[0]
            if kind in ("data", "manifests", "packs", "recipes", "checkpoints"):
                stored += size
            logical += size if kind == "manifests" else 0
            if kind == "blobs":
                info = self._reindex_blob(key)
                logical += info.size
                if info.recipe is not None:
                    recipes_in_use.append(info.recipe)
                    replica_bytes += sum(segment.size for segment in info.segments)
                    retiring_bytes += sum(segment.size for segment in info.retired)
            else:
                kind = self._reindex_object(key, size)
            counts[kind] = counts.get(kind, 0) + 1
            indexed = sum(counts.values())
            if progress is not None and indexed % 1000 == 0:
                progress(indexed)
        for key in recipes_in_use:
            recipe = Recipe.decode(self.store.get_bytes(key))
            self.index.add_file_references([digest.hex() for digest in recipe.file_refs()])
        self.index.add_bytes(logical=logical, stored=stored)
        self.index.count("replica_bytes", replica_bytes)
        self.index.count("retiring_bytes", retiring_bytes)
        pause("rebuild.filled")
        if not self.index.mark_ready(token):
            raise RuntimeError("Redis lost keys while the index was rebuilt: rebuild it again")
        return counts

    def _reindex_blob(self, key: str) -> BlobInfo:
        _, algorithm, hex_digest = key.split("/")
        digest = f"{algorithm}:{hex_digest}"
        data = json.loads(self.store.get_bytes(key))
        self.index.put_blob(digest, data)
        return BlobInfo.from_json(digest, data)

    def _reindex_object(self, key: str, size: int) -> str:
        parts = key.split("/")
        if parts[0] == "uploads":
            data = json.loads(self.store.get_bytes(key))
            self.index.put_upload(parts[1], data, self.settings.upload_ttl_seconds)
        elif parts[0] == "layers":
            self.index.put_layer(f"{parts[1]}:{parts[2]}", json.loads(self.store.get_bytes(key)))
        elif parts[0] == "packs":
            table = read_pack_table(self.store, key, size)
            self.index.add_files({digest.hex(): where.encode() for digest, where in table})
        elif parts[0] == "repositories":
            return self._reindex_repository_object(key)
        return parts[0]

    def _reindex_repository_object(self, key: str) -> str:
        head, _, tail = key.partition("/_")
        repo = head.removeprefix("repositories/")
        pieces = tail.split("/")
        if pieces[0] == "layers":
            self.index.link_layer(repo, f"{pieces[1]}:{pieces[2]}")
            return "links"
        if pieces[:2] == ["manifests", "revisions"]:
            digest = f"{pieces[2]}:{pieces[3]}"
            revision = json.loads(self.store.get_bytes(key))
            self.index.put_revision(repo, digest, revision)
            if revision.get("subject"):
                self.index.add_referrer(repo, revision["subject"], digest, revision["referrer"])
            return "manifests_linked"
        if pieces[:2] == ["manifests", "tags"]:
            self.index.set_tag(repo, pieces[2], self.store.get_bytes(key).decode())
            return "tags"
        return "other"
