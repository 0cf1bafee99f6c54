"""Celery tasks: thin wrappers that run pipelines code in a worker process."""

from __future__ import annotations

import hashlib
import time
from functools import cache
from typing import Any

from pipelines.ingest import inspect_layer, save_record
from pipelines.registry import Registry
from workers.app import celery_app


@cache
def registry() -> Registry:
    return Registry.connect()


@celery_app.task(
    name="workers.tasks.ingest_layer",
    bind=True,
    max_retries=5,
    autoretry_for=(ConnectionError, TimeoutError),
    retry_backoff=True,
)
def ingest_layer(self: Any, repository: str, digest: str) -> dict[str, str]:
    record = inspect_layer(registry().blobs, digest)
    save_record(registry().store, registry().index, record)
    return record.as_fields()


@celery_app.task(name="workers.tasks.verify_blob")
def verify_blob(digest: str) -> dict[str, Any]:
    """Re-read a stored blob and check that it still hashes to its digest."""
    blobs = registry().blobs
    info = blobs.info(digest)
    if info is None:
        return {"digest": digest, "ok": False, "reason": "blob not found"}
    algorithm = digest.split(":", 1)[0]
    hasher = hashlib.new(algorithm)
    for chunk in blobs.read(info):
        hasher.update(chunk)
    actual = f"{algorithm}:{hasher.hexdigest()}"
    return {"digest": digest, "ok": actual == digest, "actual": actual}


@celery_app.task(name="workers.tasks.record_pull", ignore_result=True)
def record_pull(repository: str, client: str, layers: list[str]) -> None:
    registry().index.record_pull(repository, client, layers)


@celery_app.task(name="workers.tasks.purge_stale_uploads")
def purge_stale_uploads() -> int:
    settings = registry().settings
    return registry().blobs.purge_stale_uploads(time.time() - settings.upload_ttl_seconds)


@celery_app.task(name="workers.tasks.rebuild_index")
def rebuild_index() -> dict[str, int]:
    return registry().rebuild_index()
