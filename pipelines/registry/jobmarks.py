"""Per-layer maintenance jobs (a retirement or demotion, a promotion to a replica) that
schedules ask for again and again (popularity every interval, `resume_ingests`, the
canaries): each is queued at most once at a time, and one that keeps failing on a layer
is given up, with why, rather than queued every interval for ever.

- queued: a mark per (kind, layer) set when the job is queued and dropped when it ends
  (either way); a schedule that finds it does not queue the job again, unless the mark
  is older than the job could take (lost with a worker killed at the wrong moment). It
  expires after QUEUED_MARK_SECONDS.
- failures: each run that fails (after its own bounded retries) counts one, with its
  error. After GIVE_UP_AFTER failures in a row the schedules stop asking, until the job
  succeeds when asked for otherwise (the retirement an ingest queues, an operator's
  job), or FAILURE_MEMORY_SECONDS pass (a cause that went away is tried again daily).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

QUEUED_MARK_SECONDS = 3600
GIVE_UP_AFTER = 3
FAILURE_MEMORY_SECONDS = 24 * 3600
DEATHS_GIVEN_UP_AFTER = 3
FAILURES_KEY = "dh:job-failures:{kind}"  # layer digest -> {"count", "error", "at"}
STARTS_KEY = "dh:job-starts:{kind}"  # layer digest -> runs started and not ended


class JobMarks:
    def __init__(self, client: redis.Redis[bytes]) -> None:
        self.redis = client

    def claim(self, kind: str, digest: str, stale_after: float = QUEUED_MARK_SECONDS) -> bool:
        """Whether the caller is the one to queue this job: none is queued or running, or
        the one marked is older than `stale_after` (lost with a killed worker: taken over,
        by one caller only)."""
        key, now = _queued_key(kind, digest), time.time()
        if self.redis.set(key, str(now), nx=True, ex=QUEUED_MARK_SECONDS):
            return True
        marked = self.redis.get(key)
        if marked is None or now - float(marked) < stale_after:
            return False
        # one command: the mark renewed with its expiry, and the value it replaced
        previous: object = self.redis.set(key, str(now), ex=QUEUED_MARK_SECONDS, get=True)
        return previous == marked  # another caller that took it over first got `marked`

    def keep_claim(self, kind: str, digest: str) -> None:
        """The job queued a follow-up of itself: it is still queued."""
        self.redis.set(_queued_key(kind, digest), str(time.time()), ex=QUEUED_MARK_SECONDS)

    def released(self, kind: str, digest: str) -> None:
        """The job ended without an answer (its lock was busy, a backend away): it may be
        queued again, and this does not count as a failure."""
        self.redis.delete(_queued_key(kind, digest))

    def succeeded(self, kind: str, digest: str) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(_queued_key(kind, digest))
        pipe.hdel(FAILURES_KEY.format(kind=kind), digest)
        pipe.execute()

    def failed(self, kind: str, digest: str, error: BaseException) -> int:
        """Record a failed run; how many in a row."""
        key = FAILURES_KEY.format(kind=kind)
        count = self.failures(kind).get(digest, {}).get("count", 0) + 1
        record = {"count": count, "error": repr(error)[:500], "at": time.time()}
        pipe = self.redis.pipeline()
        pipe.delete(_queued_key(kind, digest))
        pipe.hset(key, digest, json.dumps(record))
        pipe.execute()
        return int(count)

    def failures(self, kind: str) -> dict[str, dict[str, Any]]:
        """The layers this job failed on lately, with how often and the last error."""
        raw = self.redis.hgetall(FAILURES_KEY.format(kind=kind))
        records = {key.decode(): json.loads(value) for key, value in raw.items()}
        fresh = time.time() - FAILURE_MEMORY_SECONDS
        return {digest: record for digest, record in records.items() if record["at"] >= fresh}

    def started(self, kind: str, digest: str) -> int:
        """Count a run's start; how many runs before it started and never ended (each
        died with its worker)."""
        return int(self.redis.hincrby(STARTS_KEY.format(kind=kind), digest, 1)) - 1

    def ended(self, kind: str, digest: str) -> None:
        """The run ended, however: the runs that died before it no longer count."""
        self.redis.hdel(STARTS_KEY.format(kind=kind), digest)

    def given_up(self, kind: str) -> set[str]:
        """The layers the schedules no longer queue this job for."""
        return {d for d, record in self.failures(kind).items() if record["count"] >= GIVE_UP_AFTER}


def _queued_key(kind: str, digest: str) -> str:
    return f"dh:job-queued:{kind}:{digest}"
