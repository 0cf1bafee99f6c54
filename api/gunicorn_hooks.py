"""gunicorn settings for the API: Prometheus multiprocess metrics (each worker writes its
samples to PROMETHEUS_MULTIPROC_DIR; a worker that exits is marked dead), TLS from
DUPHUNTER_TLS_CERT / DUPHUNTER_TLS_KEY, the auth configuration checked at start, and each
process's application prepared before its first request.

gunicorn's access log shows the user name of Basic credentials (`%(u)s`), never the
Authorization header itself: no format here names request headers (`%({...}i)s`).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import multiprocess

from pipelines.auth import authority_from_settings
from pipelines.config import AuthSettings

_settings = AuthSettings()
if _settings.tls_cert or _settings.tls_key:
    if not (_settings.tls_cert and _settings.tls_key):
        raise SystemExit("DUPHUNTER_TLS_CERT and DUPHUNTER_TLS_KEY go together")
    certfile = str(_settings.tls_cert)
    keyfile = str(_settings.tls_key)


def on_starting(server: Any) -> None:
    """A broken auth configuration (unknown mode, unreadable htpasswd, bad policy, missing
    key) stops gunicorn here rather than failing every request."""
    try:
        authority_from_settings(AuthSettings())
    except (ValueError, OSError) as error:
        raise SystemExit(f"auth configuration: {error}") from error


def post_worker_init(worker: Any) -> None:
    """Each API process connects and makes the restore path's first-use checks before it
    accepts a request."""
    from api.app import prepare

    prepare()


def child_exit(server: Any, worker: Any) -> None:
    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
