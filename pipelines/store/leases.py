"""Redis locks held on a short lease that a thread of the holder renews while it works:
a holder that dies (kill -9, a lost host) frees its lock within LEASE_SECONDS, however
long the work it guarded may run. A renewal refused because the lock is no longer the
holder's (it expired while the holder was frozen, or Redis lost it) marks the lease lost:
the holder checks `held()` before any step that needs the lock, and stops. A renewal
that fails because Redis is unreachable is tried again at the next beat."""

from __future__ import annotations

import threading
from contextlib import suppress
from types import TracebackType
from typing import Any

import redis
from redis.exceptions import LockError, LockNotOwnedError

LEASE_SECONDS = 20
RENEWALS_PER_LEASE = 4


class LeaseLost(LockError):
    """The lock expired or was taken by another while its holder worked: stop."""


class Lease:
    def __init__(
        self,
        client: redis.Redis[bytes],
        name: str,
        blocking_timeout: float = 30,
        seconds: float = LEASE_SECONDS,
    ) -> None:
        self.client = client
        self.name = name
        self.seconds = seconds
        # Not thread-local: the renewing thread acts for the holder.
        self.lock: Any = client.lock(
            name, timeout=seconds, blocking_timeout=blocking_timeout, thread_local=False
        )
        self._stop = threading.Event()
        self._lost = threading.Event()

    def acquire(self, token: str | None = None) -> bool:
        """Take the lock (waiting up to `blocking_timeout`) and keep renewing it. With a
        `token` (say a task's id), a lock still held under that token is this holder's
        own, left by an attempt that failed or died: it is taken back at once."""
        encoded = token.encode() if token is not None else None
        if not self.lock.acquire(token=encoded) and not self._take_back(encoded):
            return False
        self._stop.clear()
        self._lost.clear()
        threading.Thread(target=self._renew, name=f"lease {self.name}", daemon=True).start()
        return True

    def _take_back(self, token: bytes | None) -> bool:
        if token is None or self.client.get(self.name) != token:
            return False
        self.lock.local.token = token
        with suppress(LockNotOwnedError):
            self.lock.reacquire()
            return True
        return False

    def held(self) -> bool:
        """Whether the lock is still this holder's (asks Redis)."""
        return not self._lost.is_set() and bool(self.lock.owned())

    def ensure_held(self) -> None:
        if not self.held():
            raise LeaseLost(f"the lock {self.name} was lost (expired, or Redis lost it)")

    def locked(self) -> bool:
        return bool(self.lock.locked())

    def release(self) -> None:
        self._stop.set()
        with suppress(LockError):
            self.lock.release()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / RENEWALS_PER_LEASE):
            try:
                self.lock.reacquire()
            except LockError:  # not ours any more
                self._lost.set()
                return
            except redis.RedisError:
                continue  # unreachable for now: if it stays so, the lease runs out

    def __enter__(self) -> Lease:
        if not self.acquire():
            raise LockError(f"the lock {self.name} is held by another")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()
