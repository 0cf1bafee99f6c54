"""Celery tasks: thin wrappers that run pipelines code in a worker process.

Tasks are acknowledged late and safe to run again from the start. A transient failure of
Redis or S3 (`pipelines.errors.is_transient`) is retried in the worker, with backoff, for
up to DUPHUNTER_RETRY_SECONDS: retrying in place needs no broker, which may be the very
Redis that is restarting. Work that outlives that is picked up by `resume_ingests`. A lock
held by another (`LockError`: a live holder, a dead one's lease runs out within seconds)
is waited for the same way, LOCK_ATTEMPTS times at most.

Per-layer maintenance jobs that schedules ask for again and again (retirements and
demotions, promotions) are queued at most once at a time, and given up after repeated
failures (pipelines.registry.jobmarks).
"""

from __future__ import annotations

import base64
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from functools import cache
from typing import Any, TypeVar

from celery import Task, signals
from redis.exceptions import LockError

from pipelines.encoders.canaries import CheckAbandoned, check_at_start
from pipelines.encoders.table import prepare_encoders
from pipelines.errors import IndexIncomplete, is_transient
from pipelines.formats import Buffer
from pipelines.ingest.ingestor import QUEUED
from pipelines.metrics import INGEST_SECONDS
from pipelines.registry.facade import Registry
from pipelines.registry.jobmarks import DEATHS_GIVEN_UP_AFTER
from pipelines.serve.buffer import SWEEP_AFTER_SECONDS
from pipelines.serve.predict import PERIOD, Prediction
from pipelines.serve.rebuild import RestoreError
from pipelines.serve.restore import encode_layer_segment
from workers.app import celery_app

FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0
LOCK_ATTEMPTS = 5
RETIRE, PROMOTE, INGEST = "retire", "promote", "ingest"  # pipelines.registry.jobmarks' kinds
Result = TypeVar("Result")
logger = logging.getLogger(__name__)


@cache
def registry() -> Registry:
    return Registry.connect()


def retrying(work: Callable[[], Result]) -> Result:
    """Run `work`, again after each transient failure, until DUPHUNTER_RETRY_SECONDS."""
    deadline = time.monotonic() + registry().settings.retry_seconds
    delay = FIRST_RETRY_DELAY
    lock_attempts = 0
    while True:
        try:
            return work()
        except Exception as error:
            lock_attempts += isinstance(error, LockError)
            retry = is_transient(error) or 0 < lock_attempts < LOCK_ATTEMPTS
            if not retry or time.monotonic() + delay > deadline:
                raise
            logger.warning("transient failure, retrying in %.1fs: %r", delay, error)
            time.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)


@signals.worker_process_init.connect
def _prepare_encoders(**_kwargs: object) -> None:
    """Each worker process makes the encoders' first-use checks before its first task (a
    preconstruction that a GET follows must not pay them)."""
    prepare_encoders()


_canaries_stop, _canaries_running = threading.Event(), threading.Event()


@signals.worker_ready.connect
def _check_encoder_canaries(**_kwargs: object) -> None:
    """At start, check every encoder against its canary (once per host when the workers
    start together), in the background: until it is recorded, retirement waits."""

    def check() -> None:
        _canaries_running.set()
        try:
            results = check_at_start(registry().index.redis, _canaries_stop)
        except CheckAbandoned:
            logger.info("encoder canary check abandoned: the worker stops (the next start checks)")
            return
        except Exception:
            logger.exception("encoder canary check failed to run")
            return
        finally:
            _canaries_running.clear()
        if results is not None:
            failed = sum(bool(reason) for reason in results.values())
            logger.info("encoder canaries: %d checked, %d failed", len(results), failed)
            retire_unblocked()

    threading.Thread(target=check, name="encoder-canaries", daemon=True).start()


@signals.worker_shutting_down.connect
def _abandon_encoder_canaries(**_kwargs: object) -> None:
    """A worker stopped during its start check (~5 s, far longer on a loaded host) stops
    within its stop timeout instead of finishing every encoder first."""
    _canaries_stop.set()
    if _canaries_running.is_set():
        logger.info("worker stopping: encoder canary checks not yet begun are skipped")


# Priorities on the restore queue (Redis transport: 0 is served first).
PRIORITY_WARM, PRIORITY_PREDICTED, PRIORITY_REPLICA, PRIORITY_VERIFY = 0, 3, 6, 9


@celery_app.task(name="workers.tasks.ingest_layer")
def ingest_layer(repository: str, digest: str) -> dict[str, str]:
    """Deduplicate a pushed layer. Not while the index is incomplete: it would find none of
    the layer's files stored and store them all again, and its proof could not locate
    them; the job asks for the rebuild and comes back after it. An ingest that killed
    its worker DEATHS_GIVEN_UP_AFTER times in a row is not run again: the layer stays
    intact (pipelines.registry.jobmarks)."""
    marks = registry().jobmarks
    deaths = retrying(lambda: marks.started(INGEST, digest))
    try:
        if deaths >= DEATHS_GIVEN_UP_AFTER:
            given_up = retrying(lambda: registry().ingestor.give_up(digest, deaths))
            if given_up is not None:
                logger.error("ingest of %s given up: %s", digest, given_up.record.reason)
                return given_up.record.as_fields()
        return _ingest(repository, digest)
    finally:
        retrying(lambda: marks.ended(INGEST, digest))


def _ingest(repository: str, digest: str) -> dict[str, str]:
    started = time.perf_counter()
    if not retrying(registry().index.is_ready):
        return _ingest_after_the_rebuild(repository, digest)
    try:
        result = retrying(lambda: registry().ingestor.ingest(digest))
    except IndexIncomplete:  # Redis lost its keys mid-ingest
        return _ingest_after_the_rebuild(repository, digest)
    INGEST_SECONDS.labels(result.record.state).observe(time.perf_counter() - started)
    if result.retire_after_grace:
        grace = registry().settings.retire_grace_seconds
        registry().jobmarks.claim(RETIRE, digest)  # queued even if a schedule gave up on it
        retire_intact_copy.apply_async(args=(digest, None, repository), countdown=grace)
    return result.record.as_fields()


def _ingest_after_the_rebuild(repository: str, digest: str) -> dict[str, str]:
    """Not waited out here, where the ingests queued behind this one would wait as long."""
    request_index_rebuild(registry())
    wait = registry().settings.index_wait_seconds
    ingest_layer.apply_async(args=(repository, digest), countdown=wait)
    return {"digest": digest, "state": QUEUED, "reason": "waits for the index rebuild"}


def queue_retirement(digest: str, keep: bool | None) -> bool:
    """Queue a layer's retirement (or demotion) for a schedule: not when one is queued or
    running already, nor when it failed repeatedly lately; whether it was queued."""
    marks, settings = registry().jobmarks, registry().settings
    # a retirement waits its grace, then its turn in the queue: older, it was lost
    stale_after = 2 * settings.visibility_timeout_seconds + settings.retire_grace_seconds
    if digest in marks.given_up(RETIRE) or not marks.claim(RETIRE, digest, stale_after):
        return False
    retire_intact_copy.apply_async(args=(digest, keep, ""))
    return True


def _settling(kind: str, digest: str, work: Callable[[], Result | None]) -> Result | None:
    """Run a per-layer job, recording how it ended (pipelines.registry.jobmarks); None from `work`
    says it queued a follow-up of itself: not ended."""
    try:
        result = work()
    except Exception as error:
        if isinstance(error, LockError) or is_transient(error):
            # a busy lock or a backend away: asked for again later, never given up on
            registry().jobmarks.released(kind, digest)
            raise
        failures = registry().jobmarks.failed(kind, digest, error)
        logger.warning("%s of %s failed (%d in a row): %r", kind, digest, failures, error)
        raise
    if result is not None:
        registry().jobmarks.succeeded(kind, digest)
    return result


@celery_app.task(name="workers.tasks.retire_intact_copy")
def retire_intact_copy(digest: str, keep: bool | None = None, repository: str = "") -> int:
    """Settle a deduplicated layer's intact copy once in-flight GETs had time to finish:
    keep it as a replica if the layer is hot (`keep` None: decide now), else delete it,
    first copying it into the buffer if clients of its repository will likely pull it."""
    return _settling(RETIRE, digest, lambda: _retire(digest, keep, repository)) or 0


def _retire(digest: str, keep: bool | None, repository: str) -> int | None:
    keep_replica = registry().keeps_replica(digest) if keep is None else keep
    if not keep_replica and retrying(lambda: registry().ingestor.withdraw_replica(digest)):
        grace = registry().settings.retire_grace_seconds  # presigned URLs for it run out first
        retire_intact_copy.apply_async(args=(digest, False, repository), countdown=grace)
        registry().jobmarks.keep_claim(RETIRE, digest)
        return None
    pullers = registry().expected_pullers(repository) if repository else 0
    if not keep_replica and pullers:
        retrying(lambda: registry().server.preconstruct(digest, "retired", pullers))
    try:
        return retrying(lambda: registry().ingestor.retire_intact_copy(digest, keep_replica))
    except IndexIncomplete:  # not waited out here: the rebuild may need this very worker
        # asked again once the rebuild (queued behind us) may have run
        wait = registry().settings.index_wait_seconds
        retire_intact_copy.apply_async(args=(digest, keep, repository), countdown=wait)
        registry().jobmarks.keep_claim(RETIRE, digest)
        return None


def retire_unblocked(of: Registry | None = None) -> list[str]:
    """Queue the retirements that canaries blocked and that may go ahead now."""
    ingestor = (of or registry()).ingestor
    digests = retrying(ingestor.unblocked_retirements)
    return [digest for digest in digests if queue_retirement(digest, None)]


@celery_app.task(name="workers.tasks.manifest_fetched", ignore_result=True)
def manifest_fetched(
    client: str, repository: str, digest: str, when: float, reference: str = ""
) -> list[str]:
    """Learn from a manifest GET; queue the rebuilds the predictor asks for, each useless
    after the deadline (the client has pulled by then)."""
    predictions = retrying(
        lambda: registry().on_manifest_get(client, repository, digest, when, reference)
    )
    return _queue_preconstructions(predictions, "predicted", 1, when)


@celery_app.task(name="workers.tasks.predict_periodic_pulls", ignore_result=True)
def predict_periodic_pulls() -> list[str]:
    """The `period` predictor's scan (beat): queue the rebuilds for the regular pulls due
    soon, each for its pull's window (pinned from when it opens, useless once it closed)."""
    queued = []
    for plan, predictions in retrying(lambda: registry().on_periods_due(time.time())):
        expires = datetime.fromtimestamp(plan.expires, tz=UTC)
        queued += _queue_preconstructions(predictions, PERIOD, 1, plan.ready_by, expires)
    return queued


@celery_app.task(name="workers.tasks.tag_put", ignore_result=True)
def tag_put(repository: str, reference: str, digest: str, when: float) -> list[str]:
    """Act on a manifest put by tag: rebuild what the repository's pullers will GET."""
    pullers, predictions = retrying(
        lambda: registry().on_tag_put(repository, reference, digest, when)
    )
    return _queue_preconstructions(predictions, "pushed", pullers, when)


def _queue_preconstructions(
    predictions: list[Prediction],
    origin: str,
    gets: int,
    when: float,
    expires: datetime | None = None,
) -> list[str]:
    """Queue the rebuilds for GETs expected from `when`, each useless after `expires`
    (by default the deadline after `when`: the clients have pulled)."""
    if expires is None:
        deadline = when + registry().settings.preconstruct_deadline_seconds
        expires = datetime.fromtimestamp(deadline, tz=UTC)
    for prediction in predictions:
        preconstruct_layer.apply_async(
            args=(prediction.digest, origin, gets, when),
            priority=PRIORITY_PREDICTED,
            expires=expires,
        )
    return [prediction.digest for prediction in predictions]


@celery_app.task(name="workers.tasks.blob_fetched", ignore_result=True)
def blob_fetched(client: str, repository: str, digest: str, when: float) -> None:
    retrying(lambda: registry().on_blob_get(client, repository, digest, when))


@celery_app.task(name="workers.tasks.preconstruct_layer")
def preconstruct_layer(
    digest: str, origin: str, expected_gets: int, since: float | None = None
) -> str:
    """Rebuild a layer into the buffer (never twice at once: the buffer's fill claim), for
    GETs predicted at `since`."""
    return retrying(lambda: registry().server.preconstruct(digest, origin, expected_gets, since))


@celery_app.task(name="workers.tasks.materialize_intact")
def materialize_intact(digest: str) -> int:
    work = lambda: retrying(lambda: registry().server.materialize_intact(digest))  # noqa: E731
    return _settling(PROMOTE, digest, work) or 0


@celery_app.task(name="workers.tasks.apply_popularity")
def apply_popularity() -> dict[str, list[str]]:
    """Give hot layers an intact replica and take it from those that cooled (S-mode; in
    b0 mode every replica goes). Runs in the background: a GET never waits for it."""
    plan = registry().replica_plan()
    marks = registry().jobmarks
    given_up = marks.given_up(PROMOTE)
    promote = [d for d in plan.to_promote if d not in given_up and marks.claim(PROMOTE, d)]
    for digest in promote:
        materialize_intact.apply_async(args=(digest,), priority=PRIORITY_REPLICA)
    demote = [digest for digest in plan.to_demote if queue_retirement(digest, False)]
    return {"promote": promote, "demote": demote}


@celery_app.task(name="workers.tasks.verify_blob")
def verify_blob(digest: str) -> dict[str, Any]:
    """Prove a blob from its packs (or data objects) alone, never from a cache."""
    return retrying(lambda: registry().verify_blob(digest))


@celery_app.task(name="workers.tasks.encode_segment")
def encode_segment(digest: str, index: int, began: int | None = None) -> str:
    """Re-encode one segment of a deduplicated layer from its checkpoint (a parallel
    restore spread over restore workers, begun at `began`: its turn on this host's
    cores); its bits, base64 (results travel as JSON)."""

    def work() -> Buffer:
        info = registry().blobs.stored_info(digest)
        if info is None or info.recipe is None:
            raise RestoreError(f"{digest} is not a deduplicated layer")
        return encode_layer_segment(registry().store, registry().files, info.recipe, index, began)

    return base64.b64encode(retrying(work)).decode()


@celery_app.task(name="workers.tasks.verify_sample")
def verify_sample() -> list[str]:
    """Queue verification reads for the deduplicated layers verified longest ago: each
    run takes the share of them that DUPHUNTER_VERIFY_SHARE_PER_DAY gives per interval."""
    settings = registry().settings
    runs_per_day = 86400 / settings.verify_interval_seconds
    layers = registry().layers_by_last_verification()
    count = min(len(layers), math.ceil(len(layers) * settings.verify_share_per_day / runs_per_day))
    for digest in layers[:count]:
        verify_blob.apply_async(args=(digest,), priority=PRIORITY_VERIFY)
    return layers[:count]


@celery_app.task(name="workers.tasks.resume_ingests")
def resume_ingests() -> list[str]:
    """Queue again the ingests, and the retirements of intact copies, that a long outage
    or a lost job left unfinished. Not while ingests wait in their queue: a backlog
    older than the threshold is not lost, and queued twice it would only grow."""
    older_than = time.time() - 2 * registry().settings.visibility_timeout_seconds
    waiting = registry().index.queue_length("ingest")
    stale = [] if waiting else registry().unfinished_ingests(older_than)
    for digest in stale:
        job = ingest_layer.apply_async(args=("", digest))
        registry().index.put_layer(digest, {"job": job.id, "updated": str(time.time())})
    for digest in registry().overdue_retirements(older_than):
        queue_retirement(digest, None)
    retire_unblocked()  # a failed proof may have been passing trouble: proved again
    return stale


@celery_app.task(name="workers.tasks.audit_packs")
def audit_packs() -> dict[str, int]:
    """Count the bytes in packs that no index entry points to (for the stats, and GC)."""
    return retrying(lambda: registry().audit_packs())


@celery_app.task(name="workers.tasks.collect_garbage", bind=True)
def collect_garbage(task: Task[[bool], dict[str, Any]], dry_run: bool = False) -> dict[str, Any]:
    """Online garbage collection (pipelines/registry/gc.py): what it freed, or would free. A run
    that refused (the index is incomplete) asks for the index to be rebuilt. The job's
    id and this process are its lock's token: a retry here (after a Redis blip) takes
    back the lock its failed attempt could not release, at once. (The job run again by
    another worker after this one died waits for the lease to run out, a few seconds:
    were this worker only frozen, the two must not both hold it.)"""
    token = f"{task.request.id}/{socket.gethostname()}/{os.getpid()}"
    report = retrying(lambda: registry().collector().run(dry_run, token))
    if report.refused:
        request_index_rebuild(registry())
    return asdict(report)


def request_index_rebuild(of: Registry) -> str:
    """Queue one rebuild of an incomplete index, ahead of other maintenance, however many
    find it so (the first asks); its job id, or "" when one runs or was asked for."""
    if not of.claim_rebuild_request():
        return ""
    try:
        result = complete_index.apply_async(priority=0)
    except Exception:
        of.release_rebuild_request()
        raise
    fields = {"kind": "reindex", "trigger": "index incomplete", "created": str(time.time())}
    of.index.put_job(result.id, fields)
    return str(result.id)


@celery_app.task(name="workers.tasks.apply_retention")
def apply_retention(dry_run: bool = False) -> dict[str, list[str]]:
    """Delete the tags the retention policy does not keep (or list them, dry run)."""
    return retrying(lambda: registry().apply_retention(dry_run))


@celery_app.task(name="workers.tasks.purge_stale_uploads")
def purge_stale_uploads() -> int:
    settings = registry().settings
    return registry().blobs.purge_stale_uploads(time.time() - settings.upload_ttl_seconds)


@celery_app.task(name="workers.tasks.sweep_buffer")
def sweep_buffer() -> int:
    """Delete the layer buffer's parts that no entry counts (pipelines.serve.buffer's
    `sweep`), written SWEEP_AFTER_SECONDS ago or more: how many."""
    written_before = time.time() - SWEEP_AFTER_SECONDS
    return retrying(lambda: registry().buffer.sweep(written_before))


@celery_app.task(name="workers.tasks.watch_index")
def watch_index() -> str:
    """Ask for a rebuild of an incomplete index (Redis lost its keys) before any lookup
    meets it; the job id, or "" when the index is complete or a rebuild was asked for."""
    if registry().index.is_ready():
        return ""
    return request_index_rebuild(registry())


@celery_app.task(name="workers.tasks.complete_index")
def complete_index() -> dict[str, int] | None:
    """Rebuild the index if it is still incomplete (asked for by the API when a lookup
    found it so), or wait for the rebuild running elsewhere; what it indexed."""
    try:
        return retrying(registry().ensure_index)
    finally:
        registry().release_rebuild_request()


@celery_app.task(name="workers.tasks.rebuild_index", bind=True)
def rebuild_index(task: Task[[], dict[str, int]]) -> dict[str, int]:
    job_id = str(task.request.id)

    def progress(indexed: int) -> None:
        registry().index.put_job(job_id, {"progress_done": str(indexed)})

    return registry().rebuild_index(progress)
