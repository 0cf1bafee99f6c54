"""Enqueueing and tracking jobs: the only part of `workers` the API calls."""

from __future__ import annotations

import time
from typing import Any

from celery.result import AsyncResult

from pipelines.ingest import mark_queued
from pipelines.registry import Registry
from workers.app import QUEUES, celery_app
from workers.tasks import ingest_layer, record_pull


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
