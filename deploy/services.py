"""The processes DupHunter runs, named once: the local stack (`make run`, the tests), the
compose file and the Kubernetes manifests all run these commands, and tests/test_deploy.py
checks that the deploy files agree with this module.
"""

from __future__ import annotations

from pathlib import Path

from workers.app import QUEUES

__all__ = ["QUEUES", "api_command", "beat_command", "flower_command", "worker_command"]

API_PORT = 5000
FLOWER_PORT = 5555
WORKER_METRICS_PORT = 9808  # each Celery worker's Prometheus exporter
CELERY_APP = "workers.app:celery_app"


def api_command(bin_dir: Path | None, listen: str, processes: int, threads: int = 16) -> list[str]:
    return [
        _tool(bin_dir, "gunicorn"),
        "--bind", listen,
        "--workers", str(processes),
        "--worker-class", "gthread",
        "--threads", str(threads),
        "--timeout", "600",
        "--access-logfile", "-",
        "--config", "python:api.gunicorn_hooks",
        "api.app:app",
    ]  # fmt: skip


def worker_command(bin_dir: Path | None, queue: str, name: str, concurrency: int = 1) -> list[str]:
    """A Celery worker consuming one queue; `name` must be unique per host."""
    return [
        _tool(bin_dir, "celery"), "-A", CELERY_APP, "worker",
        "-Q", queue,
        "-n", f"{name}@%h",
        "-c", str(concurrency),
        "--loglevel", "INFO",
    ]  # fmt: skip


def beat_command(bin_dir: Path | None, schedule: Path) -> list[str]:
    """The periodic schedule (one per deployment)."""
    return [_tool(bin_dir, "celery"), "-A", CELERY_APP, "beat", "--schedule", str(schedule)]


def flower_command(bin_dir: Path | None, address: str, port: int) -> list[str]:
    return [
        _tool(bin_dir, "celery"), "-A", CELERY_APP, "flower",
        f"--port={port}", f"--address={address}",
    ]  # fmt: skip


def _tool(bin_dir: Path | None, name: str) -> str:
    return str(bin_dir / name) if bin_dir else name
