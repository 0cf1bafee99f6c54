"""The jobs and stats API's JSON made uniform: times as ISO 8601 strings in UTC
("2026-12-06T02:13:44Z"), flags as JSON booleans, whatever the record they come from
stored (Redis hashes hold strings; reports hold epoch seconds)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# keys that hold a moment wherever they appear (epoch seconds, or an ISO string)
TIME_KEYS = frozenset({"created", "updated", "started", "finished", "at", "measured_at",
                       "bucket_measured_at"})  # fmt: skip
FLAG_KEYS = frozenset({"dry_run", "ok", "all"})


def iso_time(epoch: float) -> str | None:
    """UTC, to the second, with a Z; None for a time never set (0)."""
    if epoch <= 0:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def presentable(value: Any, key: str = "") -> Any:
    """`value` with every time under a TIME_KEYS key and every flag under a FLAG_KEYS key
    in its uniform form, through nested objects and lists."""
    if isinstance(value, dict):
        return {k: presentable(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [presentable(item) for item in value]
    if key in TIME_KEYS:
        return _time(value)
    if key in FLAG_KEYS and isinstance(value, int | str) and str(value) in ("0", "1"):
        return str(value) == "1"
    return value


def _time(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return iso_time(float(value))
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return value
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value
