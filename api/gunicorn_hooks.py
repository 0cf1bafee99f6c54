"""gunicorn settings for the API: Prometheus multiprocess metrics (each worker writes its
samples to PROMETHEUS_MULTIPROC_DIR; a worker that exits is marked dead)."""

from __future__ import annotations

from typing import Any

from prometheus_client import multiprocess


def child_exit(server: Any, worker: Any) -> None:
    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
