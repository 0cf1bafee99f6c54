"""The Celery application: one queue per kind of worker, each scaled on its own.

ingest       layer ingestion after a manifest push
restore      layer reads on behalf of pulls (scheduled verification now, rebuilds later),
             and segments of large layers that a pull re-encodes in parallel
predict      pull history that the prediction worker learns from
maintenance  retiring intact copies, the schedules (verification sampling, resuming
             unfinished ingests, expiring abandoned uploads) and index rebuilds
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from pipelines.config import Settings

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
            "workers.tasks.encode_segment": {"queue": "restore"},
            "workers.tasks.record_pull": {"queue": "predict"},
            "workers.tasks.purge_stale_uploads": {"queue": "maintenance"},
            "workers.tasks.rebuild_index": {"queue": "maintenance"},
            "workers.tasks.retire_intact_copy": {"queue": "maintenance"},
            "workers.tasks.verify_sample": {"queue": "maintenance"},
            "workers.tasks.resume_ingests": {"queue": "maintenance"},
        },
        # A job is acknowledged only once done, and requeued if its worker dies mid-way.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
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
                "schedule": 600.0,
            },
        },
    )
    return celery


celery_app = make_celery()
