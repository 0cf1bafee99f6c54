"""Celery tasks: thin wrappers that run pipelines code in a worker process.

Tasks are acknowledged late and retried: each is safe to run again from the start.
"""

from __future__ import annotations

import hashlib
import time
from functools import cache
from typing import Any

from pipelines.registry import Registry
from pipelines.restore import RestoreError
from workers.app import celery_app


@cache
def registry() -> Registry:
    return Registry.connect()


@celery_app.task(
    name="workers.tasks.ingest_layer",
    max_retries=5,
    autoretry_for=(ConnectionError, TimeoutError),
    retry_backoff=True,
)
def ingest_layer(repository: str, digest: str) -> dict[str, str]:
    result = registry().ingestor.ingest(digest)
    if result.retire_after_grace:
        grace = registry().settings.retire_grace_seconds
        retire_intact_copy.apply_async(args=(digest,), countdown=grace)
    return result.record.as_fields()


@celery_app.task(name="workers.tasks.retire_intact_copy")
def retire_intact_copy(digest: str) -> int:
    """Delete a deduplicated layer's intact copy once in-flight GETs had time to finish."""
    return registry().ingestor.retire_intact_copy(digest)


@celery_app.task(name="workers.tasks.verify_blob")
def verify_blob(digest: str) -> dict[str, Any]:
    """Read a blob as a pull would (restoring it if deduplicated); check its digest."""
    info = registry().blobs.info(digest)
    if info is None:
        return {"digest": digest, "ok": False, "reason": "blob not found"}
    algorithm = digest.split(":", 1)[0]
    hasher = hashlib.new(algorithm)
    try:
        for chunk in registry().read_blob(info):
            hasher.update(chunk)
    except RestoreError as error:
        return {"digest": digest, "ok": False, "reason": str(error)}
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
