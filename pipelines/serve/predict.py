"""Access history and the predictors that decide which layers to rebuild ahead of pulls.

The history is the paper's: per client, the layers it pulled with their pull counts and
last time (ULmap); per repository, the layers pulled through it (RLmap); plus, per
client, how often it follows a manifest GET with GETs of the layers it lacks, how often
it GETs again a layer it holds (its repull probability), and which platforms it takes
from image indexes. It lives in Redis (`dh:ul:`, `dh:rl:`, `dh:cs:`, `dh:exp:`,
`dh:plat:`), fed by the prediction worker from the API's access events.

Predictors (DUPHUNTER_PREDICTOR) turn a manifest GET into layers to preconstruct:
- `none`: nothing;
- `paper`: the DupHunter prototype's rule: the manifest's layers the client does not
  have, plus those it has pulled more than `threshold` (6) times;
- `history` (default): every layer of the manifest gets a probability of being pulled
  next: for a layer the client lacks, its measured follow-through rate; for one it holds,
  its repull probability, both as Beta(1, 1)-smoothed counts decayed with time (half-life
  DUPHUNTER_HISTORY_HALF_LIFE_SECONDS) so that a changed habit shows. Layers at or above
  PREDICT_MIN_PROBABILITY are preconstructed, most probable and largest first (expected
  restore time saved). For an image index, it predicts the platform the client takes
  (its most frequent, else the first) and predicts that manifest's layers right away.
  It also acts before any manifest GET: when a tag is put in a repository that clients
  pull, the layers of its image never pulled through that repository are rebuilt at once,
  each expecting a GET from every such client (`fleet_rule`): the clients that follow the
  repository hold its other layers, and will GET these at their next pull.
Predictions for layers already intact or buffered only pin the buffer entry.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import redis

PAPER_THRESHOLD = 6
PREDICT_MIN_PROBABILITY = 0.3
PREDICTORS = ("none", "paper", "history", "period")
PERIOD = "period"  # the predictor, and the origin of its rebuilds in the buffer

PERIOD_HISTORY = 8  # pull times kept per (client, repository, reference)
PERIOD_MIN_INTERVALS = 3  # regular intervals needed before a period is trusted
PERIOD_JITTER = 0.25  # an interval within this share of the period is regular
PERIOD_REGULAR_SHARE = 0.75  # of the intervals kept, at least this share regular
SAME_PULL_SECONDS = 5.0  # manifest GETs closer than this are one pull (an index, a retry)
PERIOD_MIN_SECONDS = 10.0  # shorter: the client pulls back to back, as others do
PERIOD_MAX_SECONDS = 86400.0  # longer: a weekly job, rare; its pull times would be kept for weeks
PERIOD_MISSED = 2  # periods predicted after the last pull; a client silent longer stopped
PERIOD_MARGIN_SECONDS = 10.0  # added to the expected restore time
RESTORE_BYTES_PER_SECOND = 20e6  # of layer bytes, one restore on one core (conservative)
PERIOD_MAX_PER_SCAN = 16  # pulls planned per scan; the rest wait for the next scan
PERIOD_KEEP_SECONDS = PERIOD_MAX_SECONDS * (PERIOD_MISSED + 1)  # a silent key expires


@dataclass
class LayerPulls:
    count: int
    last: float


@dataclass
class ClientHistory:
    """What the predictors know of one client."""

    layers: dict[str, LayerPulls] = field(default_factory=dict)
    lacked: float = 0.0  # layers a manifest listed that the client did not have (decayed)
    fetched_lacking: float = 0.0  # of which it then GET
    held: float = 0.0  # layers a manifest listed that it had already
    repulled: float = 0.0  # of which it GET again
    platforms: dict[str, int] = field(default_factory=dict)

    def follow_probability(self) -> float:
        return (self.fetched_lacking + 1) / (self.lacked + 2)

    def repull_probability(self) -> float:
        return (self.repulled + 1) / (self.held + 2)


@dataclass(frozen=True)
class Prediction:
    digest: str
    probability: float


def paper_rule(layers: list[str], history: ClientHistory) -> list[Prediction]:
    """(layers the client lacks) U (its layers pulled more than PAPER_THRESHOLD times)."""
    predicted = []
    for digest in dict.fromkeys(layers):
        pulls = history.layers.get(digest)
        if pulls is None or pulls.count > PAPER_THRESHOLD:
            predicted.append(Prediction(digest, 1.0))
    return predicted


def history_rule(
    layers: list[str], history: ClientHistory, sizes: dict[str, int]
) -> list[Prediction]:
    """Layers whose probability of being pulled next reaches PREDICT_MIN_PROBABILITY,
    by expected bytes of restore saved (probability x size), largest first."""
    predicted = []
    for digest in dict.fromkeys(layers):
        held = digest in history.layers
        probability = history.repull_probability() if held else history.follow_probability()
        if probability >= PREDICT_MIN_PROBABILITY:
            predicted.append(Prediction(digest, round(probability, 4)))
    return sorted(predicted, key=lambda p: -p.probability * sizes.get(p.digest, 0))


def fleet_rule(layers: list[str], pulled_through_repository: Collection[str]) -> list[Prediction]:
    """The layers of a newly tagged image that no client pulled through its repository
    yet: those its pullers lack."""
    return [
        Prediction(digest, 1.0)
        for digest in dict.fromkeys(layers)
        if digest not in pulled_through_repository
    ]


def choose_platform(platforms: list[str], history: ClientHistory) -> int:
    """The index of the platform the client most often took; the first one otherwise."""
    if not platforms:
        return -1
    return max(range(len(platforms)), key=lambda i: (history.platforms.get(platforms[i], 0), -i))


def predict(
    name: str, layers: list[str], history: ClientHistory, sizes: dict[str, int]
) -> list[Prediction]:
    if name == "paper":
        return paper_rule(layers, history)
    if name in ("history", PERIOD):  # `period` acts at manifest GETs as `history` does
        return history_rule(layers, history, sizes)
    return []


@dataclass(frozen=True)
class PullPeriod:
    """A client's regular pulls: every `period` seconds, each within `spread` of it (the
    largest deviation of a regular interval), the last at `last`."""

    period: float
    spread: float
    last: float

    def window(self, n: int) -> tuple[float, float]:
        """When the n-th pull after the last is expected: from .. to (the spread adds up)."""
        expected = self.last + n * self.period
        return expected - n * self.spread, expected + n * self.spread


def distinct_pulls(times: list[float]) -> list[float]:
    """Pull times, in order, with the manifest GETs of one pull (within SAME_PULL_SECONDS
    of the pull's first) taken as one."""
    pulls: list[float] = []
    for at in sorted(times):
        if not pulls or at - pulls[-1] >= SAME_PULL_SECONDS:
            pulls.append(at)
    return pulls


def estimate_period(times: list[float]) -> PullPeriod | None:
    """The period of a client's pulls from their times: the median of the last intervals,
    if at least PERIOD_MIN_INTERVALS of them, and PERIOD_REGULAR_SHARE of those kept, lie
    within PERIOD_JITTER of it, and the latest does too (a client that changed its habit
    is not predicted on the old one). None for a client that does not pull regularly."""
    pulls = distinct_pulls(times)[-PERIOD_HISTORY:]
    intervals = [later - earlier for earlier, later in itertools.pairwise(pulls)]
    if len(intervals) < PERIOD_MIN_INTERVALS:
        return None
    period = statistics.median(intervals)
    if not PERIOD_MIN_SECONDS <= period <= PERIOD_MAX_SECONDS:
        return None
    deviations = [abs(interval - period) for interval in intervals]
    regular = [deviation for deviation in deviations if deviation <= PERIOD_JITTER * period]
    needed = max(PERIOD_MIN_INTERVALS, math.ceil(PERIOD_REGULAR_SHARE * len(intervals)))
    if len(regular) < needed or deviations[-1] > PERIOD_JITTER * period:
        return None
    return PullPeriod(period, max(regular), pulls[-1])


@dataclass(frozen=True)
class PeriodPlan:
    """When to queue the rebuilds for a client's next regular pull: at `fire_at`, so that
    they are done by `ready_by` (the pull's window opens); useless after `expires` (the
    window closed, PERIOD_MARGIN_SECONDS ago). `n`: which pull after the last one it is for."""

    fire_at: float
    ready_by: float
    expires: float
    n: int


def lead_seconds(restore_bytes: int, scan_seconds: float) -> float:
    """How long before a pull its rebuilds start: their expected restore time, a margin,
    and the scan's interval (a plan waits for the next scan)."""
    return restore_bytes / RESTORE_BYTES_PER_SECOND + PERIOD_MARGIN_SECONDS + scan_seconds


def plan_next(
    period: PullPeriod, restore_bytes: int, not_before: float, scan_seconds: float
) -> PeriodPlan | None:
    """The plan for the first expected pull whose window closes after `not_before` (the
    time of planning, or the end of the window a plan fired for), among the PERIOD_MISSED
    pulls after the last one; None when they are all past (the client stopped)."""
    lead = lead_seconds(restore_bytes, scan_seconds)
    for n in range(1, PERIOD_MISSED + 1):
        opens, closes = period.window(n)
        expires = closes + PERIOD_MARGIN_SECONDS
        if expires > not_before:
            return PeriodPlan(max(not_before, opens - lead), opens, expires, n)
    return None


def restore_bytes_ahead(predicted: list[Prediction], sizes: dict[str, int]) -> int:
    """The bytes a client's next pull will likely need rebuilt, for its lead time: those
    of the layers predicted now, at least its largest layer (a tag that moves brings new
    layers, usually the top one)."""
    chosen = sum(sizes.get(prediction.digest, 0) for prediction in predicted)
    return max(chosen, max(sizes.values(), default=0))


@dataclass(frozen=True)
class DuePull:
    client: str
    repository: str
    reference: str
    plan: PeriodPlan


class PullPeriods:
    """Per (client, repository, reference), the times of its last pulls (`dh:pp:t:`, a
    list trimmed to PERIOD_HISTORY) and its lead bytes and last plan (`dh:pp:k:`); the
    plans to fire, by time (`dh:pp:due`)."""

    DUE = "dh:pp:due"

    def __init__(self, client: redis.Redis[bytes], scan_seconds: float) -> None:
        self.redis = client
        self.scan_seconds = scan_seconds

    @staticmethod
    def member(client: str, repository: str, reference: str) -> str:
        return json.dumps([client, repository, reference])

    def record_pull(
        self, client: str, repository: str, reference: str, when: float, restore_bytes: int
    ) -> PeriodPlan | None:
        """A manifest GET of `repository:reference` by the client at `when`: remember it,
        and plan its next pull if it pulls regularly (replacing any plan made before)."""
        member = self.member(client, repository, reference)
        pipe = self.redis.pipeline()
        pipe.rpush(f"dh:pp:t:{member}", when)
        pipe.ltrim(f"dh:pp:t:{member}", -PERIOD_HISTORY * 2, -1)  # GETs of one pull count once
        pipe.expire(f"dh:pp:t:{member}", int(PERIOD_KEEP_SECONDS))
        pipe.hset(f"dh:pp:k:{member}", mapping={"bytes": restore_bytes, "after": when})
        pipe.expire(f"dh:pp:k:{member}", int(PERIOD_KEEP_SECONDS))
        pipe.lrange(f"dh:pp:t:{member}", 0, -1)
        times = [float(at) for at in pipe.execute()[-1]]
        return self._schedule(member, times, restore_bytes, when)

    def _schedule(
        self, member: str, times: list[float], restore_bytes: int, not_before: float
    ) -> PeriodPlan | None:
        period = estimate_period(times)
        plan = (
            None
            if period is None
            else plan_next(period, restore_bytes, not_before, self.scan_seconds)
        )
        if plan is None:
            self.redis.zrem(self.DUE, member)
        else:
            self.redis.zadd(self.DUE, {member: plan.fire_at})
        return plan

    def claim_due(self, now: float, limit: int = PERIOD_MAX_PER_SCAN) -> list[DuePull]:
        """The plans due by `now`, at most `limit`, each claimed by this caller alone
        (removed from the due set), and the next pull of each planned in their place."""
        due = self.redis.zrangebyscore(self.DUE, "-inf", now, start=0, num=limit)
        claimed = []
        for raw in due:
            member = raw.decode()
            if not self.redis.zrem(self.DUE, member):
                continue  # another scan took it
            plan = self._fire(member, now)
            if plan is not None:
                client, repository, reference = json.loads(member)
                claimed.append(DuePull(client, repository, reference, plan))
        return claimed

    def _fire(self, member: str, now: float) -> PeriodPlan | None:
        """The plan to fire now for a claimed member (None: the client stopped, or its
        pulls stopped being regular), the one after it put in the due set."""
        pipe = self.redis.pipeline()
        pipe.lrange(f"dh:pp:t:{member}", 0, -1)
        pipe.hgetall(f"dh:pp:k:{member}")
        raw_times, state = pipe.execute()
        times = [float(at) for at in raw_times]
        restore_bytes = int(state.get(b"bytes", 0) or 0)
        period = estimate_period(times)
        after = float(state.get(b"after", 0) or 0)
        plan = (
            None
            if period is None
            else plan_next(period, restore_bytes, max(after, now), self.scan_seconds)
        )
        if plan is None or plan.fire_at > now:
            if plan is not None:  # its pull came and moved the plan later
                self.redis.zadd(self.DUE, {member: plan.fire_at})
            return None
        self.redis.hset(f"dh:pp:k:{member}", "after", plan.expires)
        self._schedule(member, times, restore_bytes, plan.expires)
        return plan


class AccessHistory:
    """ULmap, RLmap and the per-client statistics, in Redis."""

    def __init__(
        self, client: redis.Redis[bytes], half_life_seconds: float, scan_seconds: float = 5.0
    ) -> None:
        self.redis = client
        self.half_life = half_life_seconds
        self._add = client.register_script(_DECAYED_ADD_LUA)
        self.periods = PullPeriods(client, scan_seconds)

    def client(self, name: str) -> ClientHistory:
        pipe = self.redis.pipeline()
        pipe.hgetall(f"dh:ul:{name}")
        pipe.hgetall(f"dh:ult:{name}")
        pipe.hgetall(f"dh:cs:{name}")
        pipe.hgetall(f"dh:plat:{name}")
        counts, lasts, stats, platforms = pipe.execute()
        history = ClientHistory(
            layers={
                key.decode(): LayerPulls(int(value), float(lasts.get(key, 0) or 0))
                for key, value in counts.items()
            },
            platforms={key.decode(): int(value) for key, value in platforms.items()},
        )
        since = float(stats.get(b"at", 0) or 0)
        decay = 0.5 ** (max(0.0, time.time() - since) / self.half_life) if since else 1.0
        for counter in _COUNTERS:
            setattr(history, counter, float(stats.get(counter.encode(), 0) or 0) * decay)
        return history

    def record_manifest_get(self, client: str, layers: list[str], history: ClientHistory) -> None:
        """The client will now GET the layers it wants: note which it had, to learn from
        what it does next."""
        listed = set(layers)
        held = {digest for digest in listed if digest in history.layers}
        pipe = self.redis.pipeline()
        pipe.delete(f"dh:exp:{client}")
        if listed:
            marks = {digest: "held" if digest in held else "lacked" for digest in listed}
            pipe.hset(f"dh:exp:{client}", mapping=marks)  # type: ignore[arg-type]
            pipe.expire(f"dh:exp:{client}", 3600)
        pipe.execute()
        self._count(client, lacked=len(listed - held), held=len(held))

    def remember_index(self, client: str, children: dict[str, str]) -> None:
        """The platforms of the index the client just fetched, to learn which it takes."""
        pipe = self.redis.pipeline()
        pipe.delete(f"dh:idx:{client}")
        pipe.hset(f"dh:idx:{client}", mapping=children)  # type: ignore[arg-type]
        pipe.expire(f"dh:idx:{client}", 600)
        pipe.execute()

    def fetched_from_index(self, client: str, manifest_digest: str) -> bool:
        """Whether the client fetched this manifest as a platform of the index it just
        fetched (one pull, not a pull of its own)."""
        return bool(self.redis.hexists(f"dh:idx:{client}", manifest_digest))

    def record_platform_choice(self, client: str, manifest_digest: str) -> None:
        """If the client fetched an index just before, count the platform it took."""
        platform = self.redis.hget(f"dh:idx:{client}", manifest_digest)
        if platform is not None:
            self.redis.hincrby(f"dh:plat:{client}", platform.decode(), 1)
            self.redis.delete(f"dh:idx:{client}")

    def record_blob_get(self, client: str, repo: str, digest: str, when: float) -> None:
        pipe = self.redis.pipeline()
        pipe.hincrby(f"dh:ul:{client}", digest, 1)
        pipe.hset(f"dh:ult:{client}", digest, when)
        pipe.zincrby(f"dh:rl:{repo}", 1, digest)
        pipe.hget(f"dh:exp:{client}", digest)
        pipe.hdel(f"dh:exp:{client}", digest)
        expected = pipe.execute()[3]
        if expected == b"held":
            self._count(client, repulled=1)
        elif expected == b"lacked":
            self._count(client, fetched_lacking=1)

    def _count(self, client: str, **add: float) -> None:
        """Add to the client's counters, all decayed to now first (atomically)."""
        self._add(
            keys=[f"dh:cs:{client}"],
            args=[time.time(), self.half_life, *(add.get(name, 0.0) for name in _COUNTERS)],
        )

    def record_repository_client(self, repo: str, client: str, when: float) -> None:
        self.redis.zadd(f"dh:rc:{repo}", {client: when})

    def recent_clients(self, repo: str, since: float) -> int:
        """How many clients fetched a manifest of the repository since `since`."""
        return int(self.redis.zcount(f"dh:rc:{repo}", since, "+inf"))

    def pulled_through(self, repo: str, layers: list[str]) -> set[str]:
        """Those of `layers` that some client pulled through the repository."""
        unique = list(dict.fromkeys(layers))
        pipe = self.redis.pipeline(transaction=False)
        for digest in unique:
            pipe.zscore(f"dh:rl:{repo}", digest)
        scores = pipe.execute()
        return {digest for digest, score in zip(unique, scores, strict=True) if score is not None}

    def repository_layers(self, repo: str) -> dict[str, int]:
        raw = self.redis.zrange(f"dh:rl:{repo}", 0, -1, withscores=True)
        return {member.decode(): int(score) for member, score in raw}


_COUNTERS = ("lacked", "fetched_lacking", "held", "repulled")

# KEYS: the client's counters. ARGV: now, half-life, then an amount per _COUNTERS name.
_DECAYED_ADD_LUA = """
local now, half_life = tonumber(ARGV[1]), tonumber(ARGV[2])
local since = tonumber(redis.call('HGET', KEYS[1], 'at') or '0')
local decay = 1
if since > 0 then decay = math.pow(0.5, math.max(0, now - since) / half_life) end
local names = {'lacked', 'fetched_lacking', 'held', 'repulled'}
for i, name in ipairs(names) do
  local value = tonumber(redis.call('HGET', KEYS[1], name) or '0') * decay
  redis.call('HSET', KEYS[1], name, tostring(value + tonumber(ARGV[2 + i])))
end
redis.call('HSET', KEYS[1], 'at', ARGV[1])
return 1
"""
