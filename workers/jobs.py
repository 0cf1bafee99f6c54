"""Enqueueing and tracking jobs: the only part of `workers` the API calls.

Importing it also sends the segments of large parallel restores to the `restore` workers
(`pipelines.serve.restore.use_restore_workers`): the API's processes are the ones that can
reach them; the API's own threads encode segments too. DUPHUNTER_RESTORE_WORKERS_MIN_BYTES
sets from what tar size (default 64 MiB; 0 keeps every restore on the API's host)."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from pipelines.formats import Buffer
from pipelines.formats.recipe import Recipe
from pipelines.ingest.ingestor import mark_queued
from pipelines.registry.facade import Registry
from pipelines.serve.checkpoints import Checkpoints
from pipelines.serve.restore import (
    RESTORE_THREADS,
    SegmentEncoder,
    SegmentRunner,
    encode_stored_segment,
    pooled_runner,
    use_restore_workers,
)
from pipelines.store.filestore import FileStore
from workers.app import QUEUES, celery_app
from workers.tasks import (
    PRIORITY_WARM,
    apply_retention,
    blob_fetched,
    collect_garbage,
    encode_segment,
    ingest_layer,
    manifest_fetched,
    preconstruct_layer,
    rebuild_index,
    retire_unblocked,
    tag_put,
    verify_blob,
)
from workers.tasks import (
    request_index_rebuild as request_index_rebuild,  # the API asks through this module
)

# A segment (about 4 MiB of tar) takes a worker a second or two; past this, a missing or
# overloaded restore worker is assumed and the segment is encoded here.
SEGMENT_TIMEOUT_SECONDS = 20.0
logger = logging.getLogger(__name__)


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


def enqueue_manifest_event(client: str, repository: str, digest: str, reference: str) -> None:
    manifest_fetched.apply_async(args=(client, repository, digest, time.time(), reference))


def enqueue_manifest_put(repository: str, reference: str, digest: str) -> None:
    tag_put.apply_async(args=(repository, reference, digest, time.time()))


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


def enqueue_gc(registry: Registry, dry_run: bool) -> str:
    return _enqueue(registry, collect_garbage, "gc", dry_run)


def enqueue_retention(registry: Registry, dry_run: bool) -> str:
    return _enqueue(registry, apply_retention, "retention", dry_run)


def _enqueue(registry: Registry, task: Any, kind: str, dry_run: bool) -> str:
    result = task.apply_async(args=(dry_run,))
    fields = {"kind": kind, "dry_run": str(int(dry_run)), "created": str(time.time())}
    registry.index.put_job(result.id, fields)
    return str(result.id)


def enqueue_verify(registry: Registry, sample: int | None, every: bool = False) -> str:
    """Verification of blobs from their packs or data objects, one job id for all:
    the deduplicated layers, the least recently verified first, or with `every` each blob
    with a descriptor (intact ones too); at most `sample` of them."""
    layers = registry.stored_blobs() if every else registry.layers_by_last_verification()
    layers = layers[:sample]
    children = [verify_blob.apply_async(args=(digest,)).id for digest in layers]
    job_id = f"verify-{time.time_ns():x}"
    registry.index.put_job(
        job_id,
        {
            "kind": "verify",
            "layers": json.dumps(layers),
            "children": json.dumps(children),
            "created": str(time.time()),
        },
    )
    return job_id


def verify_encoders(registry: Registry) -> dict[str, Any]:
    """Check every encoder's canary in this process and record the results; the intact
    copies that were kept for a canary and may go now are queued for retirement."""
    report = registry.check_encoder_canaries()
    report["retirements_queued"] = len(retire_unblocked(registry))
    return report


def enqueue_reindex(registry: Registry) -> str:
    result = rebuild_index.apply_async()
    registry.index.put_job(result.id, {"kind": "reindex", "created": str(time.time())})
    return str(result.id)


def status(registry: Registry, job_id: str) -> dict[str, Any] | None:
    """A job's state and result, with numbers as numbers and times in ISO 8601."""
    job = registry.index.job(job_id)
    if not job:
        return None
    if job.get("kind") in ("preconstruct", "verify"):
        return _group_status(job_id, job)
    result: AsyncResult[Any] = AsyncResult(job_id, app=celery_app)
    fields = {key: value for key, value in job.items() if key != "progress_done"}
    state = result.state  # read once: the task may finish between two reads
    body: dict[str, Any] = {"id": job_id, **typed(fields), "state": state.lower()}
    if "progress_done" in job:
        body["progress"] = {"done": int(job["progress_done"])}
    if state == "SUCCESS":
        value = result.result
        body["result"] = typed(value) if isinstance(value, dict) else value
    elif state == "FAILURE":
        body["error"] = str(result.result)
    return body


TIME_FIELDS = ("created", "updated", "verified", "checked")


def typed(fields: dict[str, Any]) -> dict[str, Any]:
    """Record fields as stored (strings) made JSON-friendly: numbers as numbers, times as
    ISO 8601 (None for a time never set)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        number = _number(value) if isinstance(value, str) else value
        if key in TIME_FIELDS and isinstance(number, int | float):
            out[key] = _iso(float(number))
        else:
            out[key] = number
    return out


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _iso(epoch: float) -> str | None:
    if epoch <= 0:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")


def _group_status(job_id: str, job: dict[str, str]) -> dict[str, Any]:
    """A job of one task per layer (warm, verify): each layer's outcome, and how far; a
    verification also says why each broken layer is broken (`broken`)."""
    layers, children = json.loads(job["layers"]), json.loads(job["children"])
    outcomes: dict[str, str] = {}
    broken: dict[str, dict[str, Any]] = {}
    for layer, child in zip(layers, children, strict=True):
        result: AsyncResult[Any] = AsyncResult(child, app=celery_app)
        child_state = result.state  # read once: the task may finish between two reads
        value = result.result if child_state in ("SUCCESS", "FAILURE") else None
        outcomes[layer] = _outcome(value) if child_state == "SUCCESS" else child_state.lower()
        if (why := _why_broken(child_state, value)) is not None:
            broken[layer] = why
    done = sum(result not in ("pending", "started", "retry") for result in outcomes.values())
    state = "success" if done == len(layers) else ("started" if done else "pending")
    failed = [layer for layer, outcome in outcomes.items() if outcome == "failure"]
    body: dict[str, Any] = {
        "id": job_id,
        "kind": job["kind"],
        **{key: job[key] for key in ("repository", "reference") if key in job},
        "state": "failure" if failed else state,
        "progress": {"done": done, "total": len(layers)},
        "layers": outcomes,
    }
    if job["kind"] == "verify":
        body["broken"] = broken
    return body


def _why_broken(state: str, value: Any) -> dict[str, Any] | None:
    """A failed verification's reason and problems; a task that failed could not check."""
    if state == "FAILURE":
        return {"reason": f"could not be checked: {value!r}", "problems": []}
    if state == "SUCCESS" and isinstance(value, dict) and value.get("ok") is False:
        return {"reason": value.get("reason", ""), "problems": value.get("problems", [])}
    return None


def readiness(registry: Registry, scope: str = "all") -> dict[str, dict[str, Any]]:
    """Whether this deployment can do its work, check by check, with what is wrong.
    scope "backends" leaves out the queue consumers: what an API process needs to serve
    (its readiness probe, so that a worker kind being down does not stop pulls)."""
    checks = {
        "redis": _check(lambda: "" if registry.index.redis.ping() else "no answer to PING"),
        "s3": _check(lambda: _s3_problem(registry)),
        "encoders": _check(lambda: _failing_canaries(registry)),
    }
    if scope != "backends":
        checks["queues"] = _check(_queues_without_consumer)
    return checks


READY_MAX_AGE_SECONDS = 5.0
# A refresh running this long without an answer (a backend that accepts connections and
# never answers) makes the answer not-ready: the last one says nothing of now.
READY_STALE_AFTER_SECONDS = 3 * READY_MAX_AGE_SECONDS
STALE = "readiness check stale"
Checks = dict[str, dict[str, Any]]


class CachedReadiness:
    """`readiness` at most once per `max_age` seconds and scope in this process: whoever
    asks (probes, anyone: the endpoint is open) gets the last answer, never a broadcast
    to the workers of their own. A stale answer is served while one background thread
    refreshes it, but a refresh that hangs for `stale_after` seconds turns the answer
    not-ready (check `fresh`, "readiness check stale"). A process's first answer of a
    scope is waited for, at most `stale_after` seconds."""

    def __init__(
        self,
        registry: Registry,
        max_age: float = READY_MAX_AGE_SECONDS,
        check: Callable[[Registry, str], Checks] = readiness,
        stale_after: float = READY_STALE_AFTER_SECONDS,
    ) -> None:
        self.registry = registry
        self.max_age = max_age
        self.stale_after = stale_after
        self._check = check
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[float, Checks]] = {}
        self._refreshing: dict[str, tuple[float, threading.Event]] = {}  # started, done

    def get(self, scope: str) -> Checks:
        scope = "backends" if scope == "backends" else "all"  # a closed set of cache keys
        with self._lock:
            found = self._answers.get(scope)
            if found is None or time.monotonic() - found[0] >= self.max_age:
                started, done = self._refresh_started(scope)
            else:
                return found[1]
        if found is None:
            done.wait(self.stale_after)
        if done.is_set():  # the refresh answered: its answer is the newest
            with self._lock:
                return self._answers[scope][1]
        hung = time.monotonic() - started
        if found is None or hung >= self.stale_after:
            return self._stale(found, hung)
        return found[1]

    def _refresh_started(self, scope: str) -> tuple[float, threading.Event]:
        """The running refresh of `scope`, or a new one (called holding the lock)."""
        if scope not in self._refreshing:
            self._refreshing[scope] = (time.monotonic(), threading.Event())
            threading.Thread(target=self._refresh, args=(scope,), daemon=True).start()
        return self._refreshing[scope]

    def _refresh(self, scope: str) -> None:
        started = time.monotonic()
        try:
            checks = self._check(self.registry, scope)
        except Exception as error:  # an answer all the same: not ready, and why
            checks = {"readiness": {"ok": False, "error": f"{type(error).__name__}: {error}"}}
        with self._lock:
            self._answers[scope] = (started, checks)  # as old as the state it saw
            _started, done = self._refreshing.pop(scope)
        done.set()

    def _stale(self, found: tuple[float, Checks] | None, hung: float) -> Checks:
        """The last answer (if any) and `fresh`: not ok, since a refresh hangs."""
        error = f"{STALE}: no answer for {hung:.0f} s (a backend accepts but does not answer?)"
        return {**(found[1] if found else {}), "fresh": {"ok": False, "error": error}}


def _check(problem: Callable[[], str]) -> dict[str, Any]:
    """{"ok": True}, or {"ok": False, "error": why} when the probe names or raises one."""
    try:
        found = problem()
    except Exception as error:
        found = f"{type(error).__name__}: {error}"
    return {"ok": False, "error": found} if found else {"ok": True}


def _s3_problem(registry: Registry) -> str:
    registry.store.size("readiness-probe")  # raises unless S3 answers
    return ""


def _queues_without_consumer() -> str:
    served = consumed_queues(celery_app)
    missing = [queue for queue in QUEUES if queue not in served]
    return f"no worker consumes {', '.join(missing)}" if missing else ""


def consumed_queues(app: Celery) -> set[str]:
    """The queues some worker consumes now (a broadcast: up to a second)."""
    with app.connection() as connection:  # a fresh one: a pooled one may be stale
        replies = app.control.inspect(timeout=1.0, connection=connection).active_queues()
    return {queue["name"] for queues in (replies or {}).values() for queue in queues}


class ConsumerWatch:
    """Whether a worker consumes `queue`, asked again at most every `seconds`."""

    def __init__(self, app: Celery, queue: str, seconds: float = 10.0) -> None:
        self.app, self.queue, self.seconds = app, queue, seconds
        self.lock = threading.Lock()
        self.asked = -seconds
        self.answer = False

    def present(self) -> bool:
        with self.lock:
            if time.monotonic() - self.asked >= self.seconds:
                try:
                    self.answer = self.queue in consumed_queues(self.app)
                except Exception:  # the broker unreachable: no remote work either
                    self.answer = False
                self.asked = time.monotonic()
            return self.answer


def _failing_canaries(registry: Registry) -> str:
    failing = sorted(name for name, ok in registry.encoder_canaries().items() if not ok)
    return f"encoder canaries failing: {', '.join(failing)}" if failing else ""


def _outcome(result: Any) -> str:
    if isinstance(result, dict) and "ok" in result:  # a verification
        return "verified" if result["ok"] else f"FAILED: {result.get('reason', '')}"
    return str(result)


def queue_depths(registry: Registry) -> dict[str, int]:
    return {queue: registry.index.queue_length(queue) for queue in QUEUES}


def restore_workers_runner(app: Celery = celery_app, remote_slots: int = 0) -> SegmentRunner:
    """Segments shared between this host's threads and `remote_slots` restore workers
    (default DUPHUNTER_RESTORE_WORKER_SLOTS, else 2): each remote slot queues a segment
    and waits for it; a segment a worker fails or is late with is encoded here (every
    restore is verified before its bytes leave, whoever encoded it). While no worker
    consumes the restore queue, a remote slot encodes here at once instead of waiting out
    SEGMENT_TIMEOUT_SECONDS for nobody."""
    slots = remote_slots or int(os.environ.get("DUPHUNTER_RESTORE_WORKER_SLOTS", "2"))
    workers = ConsumerWatch(app, "restore")

    def remote(
        recipe: Recipe, files: FileStore, plan: Checkpoints, index: int, began: int
    ) -> Buffer:
        if not workers.present():
            return encode_stored_segment(recipe, files, plan, index, began)
        result = app.send_task(encode_segment.name, args=(recipe.blob_digest, index, began))
        try:
            return base64.b64decode(result.get(timeout=SEGMENT_TIMEOUT_SECONDS))
        except Exception as error:
            logger.warning("segment %d of %s: %r; encoding it here", index, recipe.blob_digest,
                           error)  # fmt: skip
            result.revoke()
            return encode_stored_segment(recipe, files, plan, index, began)
        finally:
            result.forget()  # megabytes of bits: not kept in Redis for the results' lifetime

    local: list[SegmentEncoder] = [encode_stored_segment] * RESTORE_THREADS
    return pooled_runner([*local, *[remote] * slots])


_min_bytes = int(os.environ.get("DUPHUNTER_RESTORE_WORKERS_MIN_BYTES", str(64 << 20)))
if _min_bytes > 0:
    use_restore_workers(restore_workers_runner(), _min_bytes)
