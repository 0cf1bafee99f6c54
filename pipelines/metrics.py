"""Prometheus metrics: the names dashboards and alerts use (monitoring/), defined once.

Every process of a host (gunicorn workers, Celery workers) writes to the directory in
PROMETHEUS_MULTIPROC_DIR, and `/metrics` on the API, or a worker's own exporter, merges
them (prometheus_client's multiprocess mode). Gauges of the whole registry (bytes,
queues, canaries) are read from Redis when scraped (`RegistryCollector`), so every
scrape of any process sees the same figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Label values come from closed sets, never from what a client sends: routes are handler
# names (or "unknown"), methods those below (else "other"), statuses what the API answers,
# sources, origins, reasons, outcomes, S3 operations, queues and encoders the code's own.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

HTTP_REQUESTS = Counter(
    "duphunter_http_requests_total",
    "API requests by route, method and status",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "duphunter_http_request_seconds",
    "API time to the response headers, by route and method",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
BLOB_GETS = Counter(
    "duphunter_blob_gets_total",
    "Blob GETs by what served them (intact, buffer, inflight, spool, restore)",
    ["source"],
)
RESTORE_SECONDS = Histogram(
    "duphunter_restore_seconds",
    "Wall time of whole-layer restores, by why they ran (on-demand, predicted, warm ...)",
    ["origin"],
    buckets=LATENCY_BUCKETS,
)
RESTORE_FAILURES = Counter(
    "duphunter_restore_failures_total",
    "Restores that failed, digest verification failures included",
    ["reason"],
)
INGEST_SECONDS = Histogram(
    "duphunter_ingest_seconds",
    "Wall time of layer ingests, by outcome (deduplicated, intact)",
    ["outcome"],
    buckets=LATENCY_BUCKETS,
)
S3_ERRORS = Counter(
    "duphunter_s3_errors_total",
    "S3 requests that failed, by operation and error code",
    ["operation", "code"],
)
VERIFICATION_FAILURES = Counter(
    "duphunter_verification_failures_total",
    "Scheduled verification reads whose layer did not restore to its digest",
)


def method_label(method: str) -> str:
    return method if method in HTTP_METHODS else "other"


class RegistryCollector(Collector):
    """Registry-wide gauges, read when scraped; `read` returns the stats it needs."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.read()
        yield _gauge("duphunter_logical_bytes", "Bytes of every blob as pushed", stats["logical"])
        yield _gauge(
            "duphunter_stored_bytes",
            "Bytes stored in S3 (packs, recipes, intact copies, manifests)",
            stats["stored"],
        )
        yield _gauge("duphunter_dedup_ratio", "logical / stored bytes", stats["ratio"])
        yield _gauge("duphunter_buffer_bytes", "Bytes in the layer buffer", stats["buffer_bytes"])
        yield _gauge(
            "duphunter_buffer_hit_ratio",
            "Buffer hits / (hits + on-demand restores)",
            stats["buffer_hit_ratio"],
        )
        queues = GaugeMetricFamily(
            "duphunter_queue_depth", "Jobs waiting, by queue", labels=["queue"]
        )
        for queue, depth in stats["queues"].items():
            queues.add_metric([queue], depth)
        yield queues
        canaries = GaugeMetricFamily(
            "duphunter_encoder_canary_ok",
            "1 if the encoder passed its canary, 0 if not",
            labels=["encoder"],
        )
        for encoder, ok in stats.get("canaries", {}).items():
            canaries.add_metric([encoder], 1.0 if ok else 0.0)
        yield canaries


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
