"""Settings read from DUPHUNTER_* environment variables, with working local defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The cores this host runs on (2 where the system does not say): one segment, one proof
# thread and one kept helper per core.
HOST_CORES = os.cpu_count() or 2
# libzstd's own default limit (window log 27); here so that config imports no format code
DEFAULT_ZSTD_MAX_WINDOW = 128 << 20


def _env(name: str, default: str) -> str:
    return os.environ.get(f"DUPHUNTER_{name}", default)


@dataclass(frozen=True)
class Settings:
    s3_endpoint: str = field(default_factory=lambda: _env("S3_ENDPOINT", "127.0.0.1:8333"))
    s3_access_key: str = field(default_factory=lambda: _env("S3_ACCESS_KEY", "duphunter"))
    s3_secret_key: str = field(
        default_factory=lambda: _env("S3_SECRET_KEY", "duphunter-secret-key")
    )
    s3_bucket: str = field(default_factory=lambda: _env("S3_BUCKET", "duphunter"))
    s3_secure: bool = field(default_factory=lambda: _env("S3_SECURE", "0") == "1")
    s3_region: str = field(default_factory=lambda: _env("S3_REGION", "us-east-1"))
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL", "redis://127.0.0.1:6379/0"))
    listen: str = field(default_factory=lambda: _env("LISTEN", "127.0.0.1:5000"))
    max_blob_bytes: int = field(default_factory=lambda: int(_env("MAX_BLOB_BYTES", str(64 << 30))))
    max_manifest_bytes: int = field(
        default_factory=lambda: int(_env("MAX_MANIFEST_BYTES", str(4 << 20)))
    )
    upload_ttl_seconds: int = field(
        default_factory=lambda: int(_env("UPLOAD_TTL_SECONDS", str(24 * 3600)))
    )
    spool_dir: Path = field(
        default_factory=lambda: Path(_env("SPOOL_DIR", str(REPO_ROOT / "var" / "spool")))
    )
    retire_grace_seconds: float = field(
        default_factory=lambda: float(_env("RETIRE_GRACE_SECONDS", "60"))
    )
    restore_keep_seconds: float = field(
        default_factory=lambda: float(_env("RESTORE_KEEP_SECONDS", "30"))
    )
    visibility_timeout_seconds: int = field(
        default_factory=lambda: int(_env("VISIBILITY_TIMEOUT_SECONDS", "300"))
    )
    claim_lease_seconds: float = field(
        default_factory=lambda: float(_env("CLAIM_LEASE_SECONDS", "60"))
    )
    retry_seconds: float = field(default_factory=lambda: float(_env("RETRY_SECONDS", "300")))
    verify_share_per_day: float = field(
        default_factory=lambda: float(_env("VERIFY_SHARE_PER_DAY", "0.1"))
    )
    verify_interval_seconds: float = field(
        default_factory=lambda: float(_env("VERIFY_INTERVAL_SECONDS", "3600"))
    )
    resume_interval_seconds: float = field(
        default_factory=lambda: float(_env("RESUME_INTERVAL_SECONDS", "600"))
    )
    index_wait_seconds: float = field(  # a job that needs the whole index comes back after
        default_factory=lambda: float(_env("INDEX_WAIT_SECONDS", "30"))  # its rebuild
    )
    mode: str = field(default_factory=lambda: _env("MODE", "s"))
    predictor: str = field(default_factory=lambda: _env("PREDICTOR", "history"))
    buffer_bytes: int = field(default_factory=lambda: int(_env("BUFFER_BYTES", str(4 << 30))))
    buffer_tau_seconds: float = field(
        default_factory=lambda: float(_env("BUFFER_TAU_SECONDS", "600"))
    )
    buffer_pin_seconds: float = field(
        default_factory=lambda: float(_env("BUFFER_PIN_SECONDS", "60"))
    )
    prediction_pin_seconds: float = field(
        default_factory=lambda: float(_env("PREDICTION_PIN_SECONDS", "10"))
    )
    popularity_tau_seconds: float = field(
        default_factory=lambda: float(_env("POPULARITY_TAU_SECONDS", "3600"))
    )
    popularity_interval_seconds: float = field(
        default_factory=lambda: float(_env("POPULARITY_INTERVAL_SECONDS", "60"))
    )
    hot_bytes: int = field(default_factory=lambda: int(_env("HOT_BYTES", str(2 << 30))))
    hot_gets_per_hour: float = field(default_factory=lambda: float(_env("HOT_GETS_PER_HOUR", "6")))
    history_half_life_seconds: float = field(
        default_factory=lambda: float(_env("HISTORY_HALF_LIFE_SECONDS", str(7 * 86400)))
    )
    period_scan_seconds: float = field(  # how often the `period` predictor's plans are fired
        default_factory=lambda: float(_env("PERIOD_SCAN_SECONDS", "5"))
    )
    preconstruct_deadline_seconds: float = field(
        default_factory=lambda: float(_env("PRECONSTRUCT_DEADLINE_SECONDS", "300"))
    )
    trusted_proxies: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            item.strip() for item in _env("TRUSTED_PROXIES", "").split(",") if item.strip()
        )
    )
    redirect: str = field(default_factory=lambda: _env("REDIRECT", "off"))
    gc_grace_seconds: float = field(default_factory=lambda: float(_env("GC_GRACE_SECONDS", "3600")))
    gc_compact_below: float = field(default_factory=lambda: float(_env("GC_COMPACT_BELOW", "0.5")))
    gc_untagged: bool = field(default_factory=lambda: _env("GC_UNTAGGED", "0") == "1")
    gc_nice: int = field(default_factory=lambda: int(_env("GC_NICE", "10")))
    gc_pace: float = field(default_factory=lambda: float(_env("GC_PACE", "0.25")))
    gc_interval_seconds: float = field(
        default_factory=lambda: float(_env("GC_INTERVAL_SECONDS", "86400"))
    )
    metrics_port: int = field(default_factory=lambda: int(_env("METRICS_PORT", "0")))
    retention_policy: str = field(default_factory=lambda: _env("RETENTION_POLICY", ""))
    zstd_max_window: int = field(
        default_factory=lambda: int(_env("ZSTD_MAX_WINDOW", str(DEFAULT_ZSTD_MAX_WINDOW)))
    )
    helper_dir: Path = field(
        default_factory=lambda: Path(_env("HELPER_DIR", str(REPO_ROOT / "build" / "helpers")))
    )

    def __post_init__(self) -> None:
        choices = {
            "MODE": (self.mode, ("intact", "b0", "s")),
            "PREDICTOR": (self.predictor, ("none", "paper", "history", "period")),
            "REDIRECT": (self.redirect, ("off", "presigned")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"DUPHUNTER_{name}={value!r}: choose one of {', '.join(allowed)}")

    @property
    def s3_endpoint_hostport(self) -> str:
        """The endpoint without a scheme, as the minio SDK wants it."""
        return self.s3_endpoint.split("://", 1)[-1].rstrip("/")

    @property
    def s3_endpoint_is_https(self) -> bool:
        return self.s3_secure or self.s3_endpoint.startswith("https://")


def _optional_path(name: str) -> Path | None:
    value = _env(name, "")
    return Path(value) if value else None


def _flag(name: str, default: str) -> bool:
    return _env(name, default).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class AuthSettings:
    """Authentication and TLS (docs/operations.md: "Authentication and TLS"); checked by
    `pipelines.registry.auth.authority_from_settings` when the API starts."""

    auth: str = field(default_factory=lambda: _env("AUTH", "none"))
    htpasswd: Path | None = field(default_factory=lambda: _optional_path("HTPASSWD"))
    auth_policy: Path | None = field(default_factory=lambda: _optional_path("AUTH_POLICY"))
    anonymous_pull: bool = field(default_factory=lambda: _flag("ANONYMOUS_PULL", "false"))
    token_key: Path | None = field(default_factory=lambda: _optional_path("TOKEN_KEY"))
    token_service: str = field(default_factory=lambda: _env("TOKEN_SERVICE", "duphunter"))
    token_realm: str = field(default_factory=lambda: _env("TOKEN_REALM", ""))
    token_ttl_seconds: int = field(default_factory=lambda: int(_env("TOKEN_TTL_SECONDS", "300")))
    token_issuer: str = field(default_factory=lambda: _env("TOKEN_ISSUER", ""))
    token_public_key: Path | None = field(
        default_factory=lambda: _optional_path("TOKEN_PUBLIC_KEY")
    )
    auth_free_failures: int = field(default_factory=lambda: int(_env("AUTH_FREE_FAILURES", "5")))
    auth_backoff_max_seconds: float = field(
        default_factory=lambda: float(_env("AUTH_BACKOFF_MAX_SECONDS", "300"))
    )
    auth_checks: int = field(default_factory=lambda: int(_env("AUTH_CHECKS", "2")))
    tls_cert: Path | None = field(default_factory=lambda: _optional_path("TLS_CERT"))
    tls_key: Path | None = field(default_factory=lambda: _optional_path("TLS_KEY"))
