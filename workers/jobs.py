"""Enqueueing and tracking jobs: the only part of `workers` the API calls.

Importing it also sends the segments of large parallel restores to the `restore` workers
(`pipelines.restore.use_restore_workers`): the API's processes are the ones that can
reach them; the API's own threads encode segments too. DUPHUNTER_RESTORE_WORKERS_MIN_BYTES
sets from what tar size (default 64 MiB; 0 keeps every restore on the API's host)."""

from __future__ import annotations

import base64
import logging
import os
import time
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from pipelines.checkpoints import Checkpoints
from pipelines.filestore import FileStore
from pipelines.ingest import mark_queued
from pipelines.recipe import Recipe
from pipelines.registry import Registry
from pipelines.restore import (
    RESTORE_THREADS,
    SegmentEncoder,
    SegmentRunner,
    encode_stored_segment,
    pooled_runner,
    use_restore_workers,
)
from workers.app import QUEUES, celery_app
from workers.tasks import encode_segment, ingest_layer, record_pull

# A segment (about 4 MiB of tar) takes a worker a second or two; past this, a missing or
# overloaded restore worker is assumed and the segment is encoded here.
SEGMENT_TIMEOUT_SECONDS = 20.0
logger = logging.getLogger(__name__)


def enqueue_ingest(registry: Registry, repository: str, digest: str, force: bool = False) -> str:
    """Queue ingestion of a layer once; `force` queues it again (the jobs API)."""
    if not mark_queued(registry.store, registry.index, digest) and not force:
        return registry.index.layer(digest).get("job", "")
    result = ingest_layer.apply_async(args=(repository, digest))
    registry.index.put_job(
        result.id,
        {"kind": "ingest", "repository": repository, "digest": digest, "created": str(time.time())},
    )
    registry.index.put_layer(digest, {"job": result.id})
    return str(result.id)


def enqueue_pull_record(repository: str, client: str, layers: list[str]) -> None:
    record_pull.apply_async(args=(repository, client, layers))


def status(registry: Registry, job_id: str) -> dict[str, Any] | None:
    job = registry.index.job(job_id)
    if not job:
        return None
    result: AsyncResult[Any] = AsyncResult(job_id, app=celery_app)
    body: dict[str, Any] = {"id": job_id, **job, "state": result.state.lower()}
    if result.successful():
        body["result"] = result.result
    elif result.failed():
        body["error"] = str(result.result)
    return body


def queue_depths(registry: Registry) -> dict[str, int]:
    return {queue: registry.index.queue_length(queue) for queue in QUEUES}


def restore_workers_runner(app: Celery = celery_app, remote_slots: int = 0) -> SegmentRunner:
    """Segments shared between this host's threads and `remote_slots` restore workers
    (default DUPHUNTER_RESTORE_WORKER_SLOTS, else 2): each remote slot queues a segment
    and waits for it; a segment a worker fails or is late with is encoded here (every
    restore is verified before its bytes leave, whoever encoded it)."""
    slots = remote_slots or int(os.environ.get("DUPHUNTER_RESTORE_WORKER_SLOTS", "2"))

    def remote(recipe: Recipe, files: FileStore, plan: Checkpoints, index: int) -> bytes:
        result = app.send_task(encode_segment.name, args=(recipe.blob_digest, index))
        try:
            return base64.b64decode(result.get(timeout=SEGMENT_TIMEOUT_SECONDS))
        except Exception as error:
            logger.warning("segment %d of %s: %r; encoding it here", index, recipe.blob_digest,
                           error)  # fmt: skip
            result.revoke()
            return encode_stored_segment(recipe, files, plan, index)
        finally:
            result.forget()  # megabytes of bits: not kept in Redis for the results' lifetime

    local: list[SegmentEncoder] = [encode_stored_segment] * RESTORE_THREADS
    return pooled_runner([*local, *[remote] * slots])


_min_bytes = int(os.environ.get("DUPHUNTER_RESTORE_WORKERS_MIN_BYTES", str(64 << 20)))
if _min_bytes > 0:
    use_restore_workers(restore_workers_runner(), _min_bytes)
