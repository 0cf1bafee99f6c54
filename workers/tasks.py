"""Celery tasks: thin wrappers that run pipelines code in a worker process.

Tasks are acknowledged late and safe to run again from the start. A transient failure of
Redis or S3 (`pipelines.errors.is_transient`) is retried in the worker, with backoff, for
up to DUPHUNTER_RETRY_SECONDS: retrying in place needs no broker, which may be the very
Redis that is restarting. Work that outlives that is picked up by `resume_ingests`.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

from pipelines.errors import is_transient
from pipelines.registry import Registry
from pipelines.restore import RestoreError, encode_layer_segment
from workers.app import celery_app

FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0
Result = TypeVar("Result")
logger = logging.getLogger(__name__)


@cache
def registry() -> Registry:
    return Registry.connect()


def retrying(work: Callable[[], Result]) -> Result:
    """Run `work`, again after each transient failure, until DUPHUNTER_RETRY_SECONDS."""
    deadline = time.monotonic() + registry().settings.retry_seconds
    delay = FIRST_RETRY_DELAY
    while True:
        try:
            return work()
        except Exception as error:
            if not is_transient(error) or time.monotonic() + delay > deadline:
                raise
            logger.warning("transient failure, retrying in %.1fs: %r", delay, error)
            time.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)


@celery_app.task(name="workers.tasks.ingest_layer")
def ingest_layer(repository: str, digest: str) -> dict[str, str]:
    result = retrying(lambda: registry().ingestor.ingest(digest))
    if result.retire_after_grace:
        grace = registry().settings.retire_grace_seconds
        retire_intact_copy.apply_async(args=(digest,), countdown=grace)
    return result.record.as_fields()


@celery_app.task(name="workers.tasks.retire_intact_copy")
def retire_intact_copy(digest: str) -> int:
    """Delete a deduplicated layer's intact copy once in-flight GETs had time to finish."""
    return retrying(lambda: registry().ingestor.retire_intact_copy(digest))


@celery_app.task(name="workers.tasks.verify_blob")
def verify_blob(digest: str) -> dict[str, Any]:
    """Read a blob as a pull would (restoring it if deduplicated); check its digest."""
    return retrying(lambda: registry().verify_blob(digest))


@celery_app.task(name="workers.tasks.encode_segment")
def encode_segment(digest: str, index: int) -> str:
    """Re-encode one segment of a deduplicated layer from its checkpoint (a parallel
    restore spread over restore workers); its bits, base64 (results travel as JSON)."""

    def work() -> bytes:
        info = registry().blobs.stored_info(digest)
        if info is None or info.recipe is None:
            raise RestoreError(f"{digest} is not a deduplicated layer")
        return encode_layer_segment(registry().store, registry().files, info.recipe, index)

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
        verify_blob.apply_async(args=(digest,))
    return layers[:count]


@celery_app.task(name="workers.tasks.resume_ingests")
def resume_ingests() -> list[str]:
    """Queue again the ingests that a long outage or a lost job left unfinished."""
    stale = registry().unfinished_ingests(
        older_than=time.time() - 2 * registry().settings.visibility_timeout_seconds
    )
    for digest in stale:
        job = ingest_layer.apply_async(args=("", digest))
        registry().index.put_layer(digest, {"job": job.id, "updated": str(time.time())})
    return stale


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
