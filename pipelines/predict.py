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

import time
from collections.abc import Collection
from dataclasses import dataclass, field

import redis

PAPER_THRESHOLD = 6
PREDICT_MIN_PROBABILITY = 0.3
PREDICTORS = ("none", "paper", "history")


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
    if name == "history":
        return history_rule(layers, history, sizes)
    return []


class AccessHistory:
    """ULmap, RLmap and the per-client statistics, in Redis."""

    def __init__(self, client: redis.Redis[bytes], half_life_seconds: float) -> None:
        self.redis = client
        self.half_life = half_life_seconds
        self._add = client.register_script(_DECAYED_ADD_LUA)

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
