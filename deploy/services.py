"""The processes DupHunter runs, named once: the local stack (`make run`, the tests), the
compose file and the Kubernetes manifests all run these commands, and
tests/operations/test_deploy.py checks that the deploy files agree with this module.
"""

from __future__ import annotations

from pathlib import Path

from workers.app import QUEUES

__all__ = [
    "PROCESS_ENV",
    "QUEUES",
    "api_command",
    "beat_command",
    "flower_command",
    "worker_command",
]

API_PORT = 5000
FLOWER_PORT = 5555
WORKER_METRICS_PORT = 9808  # each Celery worker's Prometheus exporter
CELERY_APP = "workers.app:celery_app"
# glibc raises its mmap threshold as large buffers are freed, after which freed 1 MiB
# buffers stay resident: the memory bounds (docs/architecture.md) hold with the threshold fixed.
PROCESS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


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


def redis_command(server: str, port: int, data_dir: Path) -> list[str]:
    """A Redis for the index and the queues, on loopback, keeping an append-only file. Its
    process title stays its command: retitling overwrites the environment the kernel shows,
    by which deploy/leftovers.py knows the programs of a stack."""
    return [
        server, "--port", str(port), "--bind", "127.0.0.1", "--set-proc-title", "no",
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
        "--dir", str(data_dir),
    ]  # fmt: skip


def s3_command(
    bin_dir: Path | None, port: int, data_dir: Path, ports: dict[str, int], bucket: str
) -> list[str]:
    """SeaweedFS `weed mini`, the local stand-in for MinIO (`ports`: master, volume,
    filer, admin; SeaweedFS also listens on each port+10000)."""
    return [
        _tool(bin_dir, "weed"), "mini",
        f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={port}",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", f"-bucket={bucket}",
    ]  # fmt: skip


def _tool(bin_dir: Path | None, name: str) -> str:
    return str(bin_dir / name) if bin_dir else name
