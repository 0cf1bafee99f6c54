"""Password guesses slow down their sender: an exponential backoff per client address and
per user name, counted in Redis so that every API process and host shares one count.

An attempt is charged before its password is checked (atomically, with the check that
neither count is blocked), and taken back when it succeeds: however many
guesses arrive at once, at most `free_failures` of one client or against one user reach
bcrypt before the backoff starts. Then each failure blocks both for 4 s, doubling with
every further one up to `max_seconds`; a count is forgotten after `4 * max_seconds`
without a failure. While blocked, attempts are refused unchecked and not counted.

Credentials already verified (the success cache of `pipelines.registry.auth.Htpasswd`) and bearer
tokens never come here: a throttled user keeps working with what they logged in with. A
user's count does not block them at an address they logged in from within a day (only
that address's own count does): a flood of guesses at their name, which blocks new logins
elsewhere, leaves them logging in at every API process and host from where they work.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

PREFIX = "dh:auth:failures:"
FIRST_DELAY_SECONDS = 4
FORGET_AFTER_MAX_DELAYS = 4
KNOWN_ADDRESS_SECONDS = 86400
IPV6_CLIENT_PREFIX = 64  # one IPv6 host usually holds a whole /64

# KEYS: the client's count, the user's, the mark of the user's success at that address;
# ARGV: now, free failures, max delay, forget after, first delay. Returns 0 when the
# attempt is charged, else the seconds until the latest block ends (rounded up, >= 1).
_CHARGE = """
local now = tonumber(ARGV[1])
local counts = {KEYS[1]}
if redis.call('EXISTS', KEYS[3]) == 0 then table.insert(counts, KEYS[2]) end
local blocked_until = 0
for _, key in ipairs(counts) do
  blocked_until = math.max(blocked_until, tonumber(redis.call('HGET', key, 'until') or '0'))
end
if blocked_until > now then
  return math.max(1, math.ceil(blocked_until - now))
end
local free, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
for _, key in ipairs(counts) do
  local n = redis.call('HINCRBY', key, 'n', 1)
  local delay = 0
  if n > free then delay = math.min(tonumber(ARGV[5]) * 2 ^ (n - free - 1), cap) end
  redis.call('HSET', key, 'until', tostring(now + delay))
  redis.call('EXPIRE', key, ARGV[4])
end
return 0
"""

# KEYS as _CHARGE's; ARGV: whether it succeeded, how long an address stays known.
_REFUND = """
local counts = {KEYS[1]}
if redis.call('EXISTS', KEYS[3]) == 0 then table.insert(counts, KEYS[2]) end
for _, key in ipairs(counts) do
  if redis.call('EXISTS', key) == 1 and redis.call('HINCRBY', key, 'n', -1) <= 0 then
    redis.call('DEL', key)
  end
end
if ARGV[1] == '1' then redis.call('SET', KEYS[3], '1', 'EX', ARGV[2]) end
return 0
"""


class TooManyAttempts(Exception):
    """A login refused before its password was checked; retry after `retry_after` s."""

    def __init__(self, retry_after: int, reason: str) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Backoff:
    free_failures: int = 5
    max_seconds: float = 300.0

    def delay(self, failures: int) -> float:
        """The wait after `failures` failures (as the Redis script computes it)."""
        if failures <= self.free_failures:
            return 0.0
        return float(
            min(FIRST_DELAY_SECONDS * 2 ** (failures - self.free_failures - 1), self.max_seconds)
        )


class LoginThrottle:
    def __init__(
        self, client: redis.Redis[bytes], backoff: Backoff, clock: Callable[[], float] = time.time
    ) -> None:
        self.backoff = backoff
        self.clock = clock
        self._redis = client
        self._charge = client.register_script(_CHARGE)
        self._refund = client.register_script(_REFUND)

    def charge(self, address: str, user: str) -> None:
        """Count an attempt from `address` against `user`, or TooManyAttempts."""
        backoff = self.backoff
        forget = max(1, math.ceil(backoff.max_seconds * FORGET_AFTER_MAX_DELAYS))
        args = [self.clock(), backoff.free_failures, backoff.max_seconds, forget]
        wait = int(self._charge(keys=_keys(address, user), args=[*args, FIRST_DELAY_SECONDS]))
        if wait:
            raise TooManyAttempts(wait, "too many failed logins; retry later")

    def known(self, address: str, user: str) -> bool:
        """Whether `user` logged in from `address` within KNOWN_ADDRESS_SECONDS."""
        return bool(self._redis.exists(_keys(address, user)[2]))

    def succeeded(self, address: str, user: str) -> None:
        """Take back a successful attempt; the address becomes one the user is known at."""
        self._refund(keys=_keys(address, user), args=[1, KNOWN_ADDRESS_SECONDS])


def _keys(address: str, user: str) -> list[str]:
    """Redis keys of bounded length whatever the client sends: the user name hashed."""
    named = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    client = client_key(address)
    return [f"{PREFIX}client:{client}", f"{PREFIX}user:{named}", f"{PREFIX}known:{client}:{named}"]


def client_key(address: str) -> str:
    """The address a client is counted under: itself for IPv4, its /64 for IPv6."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return hashlib.sha256(address.encode()).hexdigest()[:32]
    if not isinstance(parsed, ipaddress.IPv6Address):
        return str(parsed)
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(ipaddress.ip_network(f"{parsed}/{IPV6_CLIENT_PREFIX}", strict=False))
