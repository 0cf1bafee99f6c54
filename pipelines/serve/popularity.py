"""Layer popularity, measured online, and the modes that act on it.

Every layer GET adds one access. A layer's GET rate at time t is an exponentially decayed
count, with time constant tau (DUPHUNTER_POPULARITY_TAU_SECONDS):

    rate(t) = (1 / tau) * sum_i exp(-(t - t_i) / tau)      GETs per second

so a layer pulled n times within the last few minutes has rate ~ n / tau, and one not
pulled for k * tau has lost all but e^-k of it. It is stored as the key
K = log(sum_i exp(t_i / tau)), updated per GET as K <- logaddexp(K, t / tau), because
rate(t) = exp(K - t / tau) / tau: the order of layers by K is their order by rate at
every instant, so a Redis sorted set keeps them ranked without ever being rewritten.

Modes (DUPHUNTER_MODE):
- `intact`: no deduplication at all (a plain registry, for comparison);
- `b0`: every supported layer deduplicated; intact bytes only in the layer buffer;
- `s` (default): deduplicated, but the hottest layers keep (or get back) an intact
  replica: those whose rate is at least DUPHUNTER_HOT_GETS_PER_HOUR, hottest first, while
  their bytes fit in DUPHUNTER_HOT_BYTES. The maintenance job `apply_popularity` promotes
  and demotes; a GET never waits for it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis

RANK_KEY = "dh:pop:rank"  # layer digest -> K
HOT_KEY = "dh:pop:hot"  # the hot set the last plan chose

MODES = ("intact", "b0", "s")


@dataclass(frozen=True)
class HotSet:
    """The layers that should keep an intact replica, and those that should not."""

    hot: frozenset[str]
    rates: dict[str, float]  # GETs per hour, of every layer looked at


class Popularity:
    def __init__(self, client: redis.Redis[bytes], tau_seconds: float) -> None:
        self.redis = client
        self.tau = tau_seconds
        self._record = client.register_script(_RECORD_LUA)

    def record_get(self, digest: str, when: float | None = None) -> None:
        self._record(keys=[RANK_KEY], args=[digest, (when or time.time()) / self.tau])

    def rate_per_hour(self, digest: str, now: float | None = None) -> float:
        key = self.redis.zscore(RANK_KEY, digest)
        return 0.0 if key is None else self._rate(key, now or time.time())

    def _rate(self, key: float, now: float) -> float:
        return math.exp(key - now / self.tau) / self.tau * 3600

    def hot_set(self, sizes: dict[str, int], budget_bytes: int, min_per_hour: float) -> HotSet:
        """Of the layers in `sizes`, the hottest whose rate reaches `min_per_hour`, while
        their bytes fit in the budget (a layer that does not fit is skipped, the next
        hottest may)."""
        now = time.time()
        floor: float | str = "-inf"
        if min_per_hour > 0:
            floor = math.log(min_per_hour * self.tau / 3600) + now / self.tau
        ranked = self.redis.zrevrangebyscore(RANK_KEY, "+inf", floor, withscores=True)
        rates: dict[str, float] = {}
        hot: set[str] = set()
        spent = 0
        for member, key in ranked:
            digest = member.decode()
            if digest not in sizes:
                continue
            rates[digest] = self._rate(key, now)
            if spent + sizes[digest] <= budget_bytes:
                hot.add(digest)
                spent += sizes[digest]
        return HotSet(frozenset(hot), rates)

    def remember_hot(self, hot: frozenset[str]) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(HOT_KEY)
        if hot:
            pipe.sadd(HOT_KEY, *hot)
        pipe.execute()

    def was_hot(self, digest: str) -> bool:
        return bool(self.redis.sismember(HOT_KEY, digest))


# KEYS: rank. ARGV: digest, now / tau.
_RECORD_LUA = """
local t = tonumber(ARGV[2])
local k = redis.call('ZSCORE', KEYS[1], ARGV[1])
if k then
  k = tonumber(k)
  local high, low = math.max(k, t), math.min(k, t)
  t = high + math.log(1 + math.exp(low - high))
end
redis.call('ZADD', KEYS[1], t, ARGV[1])
return tostring(t)
"""
