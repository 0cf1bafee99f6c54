"""The OCI Distribution error vocabulary, raised by the domain and rendered by the API;
and which failures of the backends (Redis, S3) are transient, worth trying again."""

from __future__ import annotations

from typing import Any

import redis
import urllib3
from minio.error import S3Error, ServerError

# code -> HTTP status, as the distribution spec and CNCF Distribution use them.
STATUS_BY_CODE: dict[str, int] = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 400,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "TAG_INVALID": 400,
    "RANGE_INVALID": 416,
    "PAGINATION_NUMBER_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 415,
    "TOOMANYREQUESTS": 429,
    "UNAVAILABLE": 503,
    "UNKNOWN": 500,  # as CNCF Distribution: a server-side failure, e.g. a failed restore
}


class RegistryError(Exception):
    """A request the registry refuses, with the spec's error code."""

    def __init__(
        self, code: str, message: str, detail: Any = None, status: int | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail
        self.status = status if status is not None else STATUS_BY_CODE[code]

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"errors": [error]}


class IndexIncomplete(RegistryError):
    """A lookup missed while the Redis index is incomplete (Redis lost its keys, or a
    rebuild runs): what was looked up may be in S3 all the same, so the client is told to
    come back (503) rather than that it is unknown (404)."""

    def __init__(self, detail: Any = None) -> None:
        message = "the registry's index is being rebuilt from storage; try again shortly"
        super().__init__("UNAVAILABLE", message, detail)


def unknown(code: str, message: str, detail: Any, index_complete: bool) -> RegistryError:
    """What a lookup that missed raises: `code` (a 404) once the index is complete."""
    return RegistryError(code, message, detail) if index_complete else IndexIncomplete(detail)


class BeingCollected(ConnectionError):
    """An object this work relies on is being garbage-collected: try again later (it is
    a ConnectionError so that the retries for transient failures take it)."""


# S3 error codes that say "not now" rather than "never" (AWS, MinIO and SeaweedFS use them).
TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "OperationAborted",
        "XMinioServerNotInitialized",
        "XMinioStorageFull",
    }
)
_TRANSIENT_TYPES = (
    redis.ConnectionError,  # BusyLoadingError (a restarting Redis) included
    redis.TimeoutError,
    redis.ReadOnlyError,  # a replica promoted while we wrote
    ServerError,  # an S3 5xx without an error document
    urllib3.exceptions.HTTPError,  # connection refused or reset, read timeouts, retries spent
    ConnectionError,
    TimeoutError,
)


def is_transient(error: BaseException) -> bool:
    """Whether a failure may pass by itself: Redis or S3 unreachable, restarting, busy.
    The exception's cause is looked at too (wrappers keep the original as __cause__)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, S3Error) and seen.code in TRANSIENT_S3_CODES:
            return True
        if isinstance(seen, _TRANSIENT_TYPES):
            return True
        seen = seen.__cause__
    return False
