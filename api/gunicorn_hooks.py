"""gunicorn settings for the API: Prometheus multiprocess metrics (each worker writes its
samples to PROMETHEUS_MULTIPROC_DIR; a worker that exits is marked dead), TLS from
DUPHUNTER_TLS_CERT / DUPHUNTER_TLS_KEY, the auth configuration checked at start, and each
process's application prepared before its first request.

gunicorn's access log shows the user name of Basic credentials (`%(u)s`), never the
Authorization header itself: no format here names request headers (`%({...}i)s`).

Clients that try HTTPS first (docker, podman, skopeo before falling back to plain HTTP)
send a TLS handshake to a plain-HTTP API: gunicorn warns "Invalid HTTP request line" for
each one. Each API process logs the first as one line saying what it is and what to do;
the others only when gunicorn logs at debug level.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from prometheus_client import multiprocess

from pipelines.config import AuthSettings
from pipelines.registry.auth import authority_from_settings

TLS_HANDSHAKE = b"\x16\x03"  # a TLS record of type handshake, protocol 3.x

_settings = AuthSettings()
if _settings.tls_cert or _settings.tls_key:
    if not (_settings.tls_cert and _settings.tls_key):
        raise SystemExit("DUPHUNTER_TLS_CERT and DUPHUNTER_TLS_KEY go together")
    certfile = str(_settings.tls_cert)
    keyfile = str(_settings.tls_key)


class TlsProbeHint(logging.Filter):
    """Turns gunicorn's warning for a TLS handshake on the plain-HTTP port into one hint.
    gunicorn logs it while handling the parse error, whose message may not show the bytes
    ("bare LF as line terminator"): the parser's frames hold what was read."""

    def __init__(self) -> None:
        super().__init__()
        self.hinted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Invalid request from") or not _tls_handshake():
            return True
        if self.hinted:
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        self.hinted = True
        record.msg = (
            "a client spoke TLS (HTTPS) to this plain-HTTP port; clients that try HTTPS "
            "first fall back to HTTP when told the registry is insecure (docker: "
            "insecure-registries; podman, skopeo: --tls-verify=false); to serve HTTPS set "
            "DUPHUNTER_TLS_CERT and DUPHUNTER_TLS_KEY (further ones are logged at debug level)"
        )
        record.args = ()
        return True


def _tls_handshake() -> bool:
    """Whether the request being rejected began as a TLS handshake record does."""
    error = sys.exc_info()[1]
    trace = error.__traceback__ if error else None
    while trace is not None:
        for name in ("data", "buf", "line_bytes"):
            read = trace.tb_frame.f_locals.get(name)
            if isinstance(read, bytes | bytearray) and read.startswith(TLS_HANDSHAKE):
                return True
        trace = trace.tb_next
    return False


logging.getLogger("gunicorn.error").addFilter(TlsProbeHint())


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
