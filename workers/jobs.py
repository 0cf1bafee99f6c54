"""Enqueueing and tracking jobs: the only part of `workers` the API calls."""

from __future__ import annotations

import json
import time
from typing import Any

from celery.result import AsyncResult

from pipelines.ingest import mark_queued
from pipelines.registry import Registry
from workers.app import QUEUES, celery_app
from workers.tasks import (
    PRIORITY_WARM,
    blob_fetched,
    ingest_layer,
    manifest_fetched,
    preconstruct_layer,
)


def enqueue_ingest(registry: Registry, repository: str, digest: str, force: bool = False) -> str:
    """Queue ingestion of a layer once; `force` queues it again (the jobs API)."""
    if not registry.deduplicates():
        return ""
    if not mark_queued(registry.store, registry.index, digest) and not force:
        return registry.index.layer(digest).get("job", "")
    result = ingest_layer.apply_async(args=(repository, digest))
    registry.index.put_job(
        result.id,
        {"kind": "ingest", "repository": repository, "digest": digest, "created": str(time.time())},
    )
    registry.index.put_layer(digest, {"job": result.id})
    return str(result.id)


def enqueue_manifest_event(client: str, repository: str, digest: str) -> None:
    manifest_fetched.apply_async(args=(client, repository, digest, time.time()))


def enqueue_blob_event(client: str, repository: str, digest: str) -> None:
    blob_fetched.apply_async(args=(client, repository, digest, time.time()))


def enqueue_warm(registry: Registry, repository: str, reference: str, layers: list[str]) -> str:
    """Rebuild layers ahead of a rollout, first in the restore queue; one job id for all."""
    children = [
        preconstruct_layer.apply_async(args=(digest, "warm", 1), priority=PRIORITY_WARM).id
        for digest in layers
    ]
    job_id = f"warm-{time.time_ns():x}"
    registry.index.put_job(
        job_id,
        {
            "kind": "preconstruct",
            "repository": repository,
            "reference": reference,
            "layers": json.dumps(layers),
            "children": json.dumps(children),
            "created": str(time.time()),
        },
    )
    return job_id


def status(registry: Registry, job_id: str) -> dict[str, Any] | None:
    job = registry.index.job(job_id)
    if not job:
        return None
    if job.get("kind") == "preconstruct":
        return _group_status(job_id, job)
    result: AsyncResult[Any] = AsyncResult(job_id, app=celery_app)
    body: dict[str, Any] = {"id": job_id, **job, "state": result.state.lower()}
    if result.successful():
        body["result"] = result.result
    elif result.failed():
        body["error"] = str(result.result)
    return body


def _group_status(job_id: str, job: dict[str, str]) -> dict[str, Any]:
    """A warm job: its layers' rebuilds, and how far they got."""
    layers, children = json.loads(job["layers"]), json.loads(job["children"])
    outcomes: dict[str, str] = {}
    for layer, child in zip(layers, children, strict=True):
        result: AsyncResult[Any] = AsyncResult(child, app=celery_app)
        outcomes[layer] = str(result.result) if result.successful() else result.state.lower()
    done = sum(result not in ("pending", "started", "retry") for result in outcomes.values())
    state = "success" if done == len(layers) else ("started" if done else "pending")
    failed = [layer for layer, outcome in outcomes.items() if outcome == "failure"]
    return {
        "id": job_id,
        "kind": "preconstruct",
        "repository": job["repository"],
        "reference": job["reference"],
        "state": "failure" if failed else state,
        "progress": {"done": done, "total": len(layers)},
        "layers": outcomes,
    }


def queue_depths(registry: Registry) -> dict[str, int]:
    return {queue: registry.index.queue_length(queue) for queue in QUEUES}
