"""What `/metrics` answers: the samples of every process of this host (gunicorn workers
and Celery workers share PROMETHEUS_MULTIPROC_DIR), plus registry-wide gauges read from
Redis at scrape time."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from pipelines.metrics import RegistryCollector
from pipelines.registry.facade import Registry
from workers import jobs


def metrics_exposition(registry: Registry) -> tuple[bytes, str]:
    gauges = CollectorRegistry()
    gauges.register(RegistryCollector(lambda: registry_gauges(registry)))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        processes = CollectorRegistry()
        MultiProcessCollector(processes)  # type: ignore[no-untyped-call]
    else:
        processes = REGISTRY  # this process only
    return generate_latest(processes) + generate_latest(gauges), CONTENT_TYPE_LATEST


def registry_gauges(registry: Registry) -> dict[str, Any]:
    """The registry-wide figures, from a handful of Redis reads."""
    counters = registry.index.counters()
    logical, stored = counters.get("logical_bytes", 0), counters.get("stored_bytes", 0)
    buffer = registry.buffer.stats_counters()
    hits, restores = buffer.get("hits", 0), counters.get("restores", 0)
    return {
        "logical": logical,
        "stored": stored,
        "ratio": logical / stored if stored else 0.0,
        "buffer_bytes": registry.buffer.used_bytes(),
        "buffer_hit_ratio": hits / (hits + restores) if hits + restores else 0.0,
        "queues": jobs.queue_depths(registry),
        "canaries": registry.encoder_canaries(),
    }
