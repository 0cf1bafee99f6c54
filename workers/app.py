"""The Celery application: one queue per kind of worker, each scaled on its own.

ingest       layer ingestion after a manifest push
restore      layer rebuilds: preconstruction into the layer buffer (warm requests first,
             then predictions), intact replicas of hot layers, verification reads, and
             segments of large layers that a restore re-encodes in parallel
predict      the prediction worker: access events from every manifest and blob GET and
             every tag put,
             the history it learns from, and the rebuilds it asks for
maintenance  retiring intact copies, the schedules (popularity, verification sampling,
             resuming unfinished ingests, expiring abandoned uploads), index rebuilds
"""

from __future__ import annotations

import os

from celery import Celery, signals
from kombu import Queue
from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from pipelines.config import Settings
from workers import unacked

QUEUES = ("ingest", "restore", "predict", "maintenance")


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    celery = Celery(
        "duphunter",
        broker=settings.redis_url,
        backend=settings.redis_url,
        include=["workers.tasks"],
    )
    celery.conf.update(
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="maintenance",
        task_routes={
            "workers.tasks.ingest_layer": {"queue": "ingest"},
            "workers.tasks.verify_blob": {"queue": "restore"},
            "workers.tasks.manifest_fetched": {"queue": "predict"},
            "workers.tasks.blob_fetched": {"queue": "predict"},
            "workers.tasks.tag_put": {"queue": "predict"},
            "workers.tasks.predict_periodic_pulls": {"queue": "predict"},
            "workers.tasks.preconstruct_layer": {"queue": "restore"},
            "workers.tasks.materialize_intact": {"queue": "restore"},
            "workers.tasks.apply_popularity": {"queue": "maintenance"},
            "workers.tasks.audit_packs": {"queue": "maintenance"},
            "workers.tasks.collect_garbage": {"queue": "maintenance"},
            "workers.tasks.apply_retention": {"queue": "maintenance"},
            "workers.tasks.encode_segment": {"queue": "restore"},
            "workers.tasks.purge_stale_uploads": {"queue": "maintenance"},
            "workers.tasks.sweep_buffer": {"queue": "maintenance"},
            "workers.tasks.rebuild_index": {"queue": "maintenance"},
            "workers.tasks.complete_index": {"queue": "maintenance"},
            "workers.tasks.watch_index": {"queue": "maintenance"},
            "workers.tasks.retire_intact_copy": {"queue": "maintenance"},
            "workers.tasks.verify_sample": {"queue": "maintenance"},
            "workers.tasks.resume_ingests": {"queue": "maintenance"},
        },
        # A job is acknowledged only once done, and requeued if its worker dies mid-way.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A held message is kept fresh by its worker (workers/unacked.py): the timeout
        # bounds how long a dead worker's messages wait, swept for every 10 s.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 2,
            "unacked_mutex_expire": 30,  # a sweep takes milliseconds; its holder may die
            # Message priorities on Redis: one list per step, the lowest number first.
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
        task_default_priority=5,
        result_expires=7 * 24 * 3600,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        beat_schedule={
            "purge-stale-uploads": {
                "task": "workers.tasks.purge_stale_uploads",
                "schedule": 3600.0,
            },
            "verify-sample": {
                "task": "workers.tasks.verify_sample",
                "schedule": settings.verify_interval_seconds,
            },
            "resume-ingests": {
                "task": "workers.tasks.resume_ingests",
                "schedule": settings.resume_interval_seconds,
            },
            "audit-packs": {"task": "workers.tasks.audit_packs", "schedule": 3600.0},
            "sweep-buffer": {"task": "workers.tasks.sweep_buffer", "schedule": 3600.0},
            "watch-index": {"task": "workers.tasks.watch_index", "schedule": 30.0},
            "apply-retention": {"task": "workers.tasks.apply_retention", "schedule": 86400.0},
            "collect-garbage": {
                "task": "workers.tasks.collect_garbage",
                "schedule": settings.gc_interval_seconds,
            },
            "apply-popularity": {
                "task": "workers.tasks.apply_popularity",
                "schedule": settings.popularity_interval_seconds,
            },
        },
    )
    if settings.predictor == "period":  # its plans wait in Redis for this scan
        celery.conf.beat_schedule["predict-periodic-pulls"] = {
            "task": "workers.tasks.predict_periodic_pulls",
            "schedule": settings.period_scan_seconds,
            "options": {"expires": settings.period_scan_seconds},  # the next scan does it
        }
    unacked.install(celery)
    return celery


celery_app = make_celery()


@signals.worker_init.connect
def _export_metrics(**_kwargs: object) -> None:
    """With DUPHUNTER_METRICS_PORT set (one worker per pod), serve the samples of this
    worker's processes on it; on a host whose API serves /metrics, leave it unset."""
    port = Settings().metrics_port
    if not port:
        return
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(int(port), registry=registry)
    else:
        start_http_server(int(port))


@signals.worker_process_shutdown.connect
def _forget_process(**_kwargs: object) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
