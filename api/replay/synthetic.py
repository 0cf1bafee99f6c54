"""A seeded generator of pull workloads, with the shape the trace studies report: a few
clients pull each image once, others pull again and again (mostly only the manifest, since
they keep their layers, unless a repull starts them from an empty store); repositories
share base layers; new tags appear over time (a publisher puts each at its time: a Tag
event) and change only their top layers.

Every random choice comes from one `random.Random(seed)`: the same spec gives the same
workload.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from api.replay.content import plan_files
from api.replay.workload import Event, ImageSpec, LayerSpec, Pull, Tag, Workload, knob

MB = 1_000_000
PUBLISHER = "publisher"  # the client that puts each new tag (a CI system)


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = knob(1, "all random choices derive from it")
    duration_s: float = knob(120.0, "pulls start in [0, duration)")
    clients: int = knob(20, "clients (each pulls from its own address)")
    repositories: int = knob(6, "repositories, each starting with tag v1")
    layers_per_image: int = knob(4, "layers of every image")
    base_layers: int = knob(1, "bottom layers of an image that come from a base image")
    base_images: int = knob(2, "bases in the shared pool")
    sharing: float = knob(0.5, "probability that a repository's base is from the shared pool")
    layer_mb: float = knob(2.0, "median compressed layer size, MB (lognormal)")
    layer_sigma: float = knob(0.8, "sigma of the lognormal layer size")
    min_layer_bytes: int = knob(16 << 10, "smallest layer")
    max_layer_bytes: int = knob(64 << 20, "largest layer (before --size-scale)")
    size_scale: float = knob(1.0, "multiplies every layer size")
    files_per_layer: int = knob(4, "files in a layer")
    file_overlap: float = knob(0.4, "share of its files a new version of a layer keeps")
    pull_once_share: float = knob(0.5, "share of clients that pull each tag once, never again")
    repull: tuple[float, float] = knob(
        (0.0, 0.4), "range of the per-client probability that a pull starts from an empty store"
    )
    arrivals: str = knob("poisson", "poisson or bursty pull times (always-pull clients)")
    mean_interval_s: float = knob(30.0, "mean time between a client's pulls")
    burst_size: float = knob(4.0, "bursty: about this many pulls per burst")
    burst_spacing_s: float = knob(1.0, "bursty: mean gap between pulls of a burst")
    repositories_per_client: tuple[int, int] = knob((1, 2), "range of repositories a client pulls")
    popularity_skew: float = knob(1.0, "Zipf exponent of repository popularity")
    new_tag_interval_s: float = knob(60.0, "per repository, mean time between new tags; 0: none")
    changed_layers: int = knob(1, "top layers a new tag replaces")

    def check(self) -> None:
        probabilities = [self.sharing, self.file_overlap, self.pull_once_share, *self.repull]
        if any(not 0.0 <= p <= 1.0 for p in probabilities) or self.repull[0] > self.repull[1]:
            raise ValueError("probabilities must lie in [0, 1] (and repull low <= high)")
        if self.arrivals not in ("poisson", "bursty"):
            raise ValueError(f"arrivals must be poisson or bursty, not {self.arrivals!r}")
        if min(self.clients, self.repositories, self.layers_per_image) < 1:
            raise ValueError("clients, repositories and layers per image must be >= 1")
        if not 0 <= self.base_layers <= self.layers_per_image or self.base_images < 1:
            raise ValueError("need 0 <= base layers <= layers per image, and >= 1 base image")
        low, high = self.repositories_per_client
        if not 1 <= low <= high:
            raise ValueError("repositories per client: 1 <= low <= high")
        if self.duration_s <= 0 or self.mean_interval_s <= 0:
            raise ValueError("duration and mean interval must be > 0")


@dataclass
class ClientPlan:
    name: str
    pull_once: bool
    repull: float
    repositories: list[str] = field(default_factory=list)


class _Builder:
    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.layers: dict[str, LayerSpec] = {}
        self.images: dict[tuple[str, str], ImageSpec] = {}
        self.tag_times: dict[str, list[tuple[float, str]]] = {}  # repository -> (time, tag)

    def layer_size(self) -> int:
        spec = self.spec
        drawn = self.rng.lognormvariate(math.log(spec.layer_mb * MB), spec.layer_sigma)
        return int(min(max(drawn, spec.min_layer_bytes), spec.max_layer_bytes) * spec.size_scale)

    def new_layer(self, key: str, keep_from: LayerSpec | None = None) -> str:
        target = keep_from.target_bytes if keep_from else self.layer_size()
        files = plan_files(self.rng.getrandbits(62), target, self.spec.files_per_layer)
        if keep_from is not None:  # a new version: some files unchanged
            kept = [f for f in keep_from.files if self.rng.random() < self.spec.file_overlap]
            files = tuple(kept) + files[len(kept) :] if len(kept) < len(files) else tuple(kept)
        self.layers[key] = LayerSpec(key, tuple(files), target)
        return key

    def bases(self) -> list[list[str]]:
        spec = self.spec
        return [
            [self.new_layer(f"base{b}-l{n}") for n in range(spec.base_layers)]
            for b in range(spec.base_images)
        ]

    def repositories(self) -> list[str]:
        spec, shared = self.spec, self.bases()
        names = [f"replay/repo{r:02d}" for r in range(spec.repositories)]
        for name in names:
            if self.rng.random() < spec.sharing:
                base = self.rng.choice(shared)
            else:
                base = [self.new_layer(f"{name}/base-l{n}") for n in range(spec.base_layers)]
            own = spec.layers_per_image - spec.base_layers
            top = [self.new_layer(f"{name}/v1-l{n}") for n in range(own)]
            self.images[(name, "v1")] = ImageSpec(name, "v1", tuple(base + top))
            self.tag_times[name] = [(0.0, "v1")]
            self.new_tags(name)
        return names

    def new_tags(self, repository: str) -> None:
        spec, clock, version = self.spec, 0.0, 1
        while spec.new_tag_interval_s > 0:
            clock += self.rng.expovariate(1 / spec.new_tag_interval_s)
            if clock >= spec.duration_s:
                return
            previous = self.images[(repository, f"v{version}")]
            version += 1
            changed = min(spec.changed_layers, len(previous.layers))
            layers = list(previous.layers)
            for position in range(len(layers) - changed, len(layers)):
                old = self.layers[layers[position]]
                layers[position] = self.new_layer(f"{repository}/v{version}-l{position}", old)
            tag = f"v{version}"
            self.images[(repository, tag)] = ImageSpec(repository, tag, tuple(layers))
            self.tag_times[repository].append((clock, tag))

    def publications(self) -> list[Event]:
        """A Tag event for each tag that appears after the start."""
        return [
            Tag(time, PUBLISHER, repository, tag)
            for repository, times in self.tag_times.items()
            for time, tag in times
            if time > 0
        ]

    def latest_tag(self, repository: str, at: float) -> str:
        return [tag for time, tag in self.tag_times[repository] if time <= at][-1]

    def clients(self, repositories: list[str]) -> list[ClientPlan]:
        spec = self.spec
        weights = [1 / (rank + 1) ** spec.popularity_skew for rank in range(len(repositories))]
        plans = []
        for number in range(spec.clients):
            pull_once = number < round(spec.clients * spec.pull_once_share)
            plan = ClientPlan(f"client{number:03d}", pull_once, self.rng.uniform(*spec.repull))
            wanted = self.rng.randint(*spec.repositories_per_client)
            while len(plan.repositories) < min(wanted, len(repositories)):
                choice = self.rng.choices(repositories, weights)[0]
                if choice not in plan.repositories:
                    plan.repositories.append(choice)
            plans.append(plan)
        return plans

    def arrivals(self) -> list[float]:
        """Pull times of one always-pull client in [0, duration)."""
        spec, times, clock = self.spec, [], 0.0
        if spec.arrivals == "poisson":
            while (
                clock := clock + self.rng.expovariate(1 / spec.mean_interval_s)
            ) < spec.duration_s:
                times.append(clock)
            return times
        burst_rate = 1 / (spec.mean_interval_s * spec.burst_size)
        while (clock := clock + self.rng.expovariate(burst_rate)) < spec.duration_s:
            moment = clock
            for _ in range(1 + int(self.rng.expovariate(1 / max(spec.burst_size - 1, 1e-9)))):
                if moment < spec.duration_s:
                    times.append(moment)
                moment += self.rng.expovariate(1 / spec.burst_spacing_s)
        return sorted(times)

    def pulls_of(self, plan: ClientPlan) -> list[Event]:
        if plan.pull_once:  # each tag once, some time after it appears
            return [
                Pull(
                    time + self.rng.expovariate(1 / self.spec.mean_interval_s), plan.name, repo, tag
                )
                for repo in plan.repositories
                for time, tag in self.tag_times[repo]
            ]
        return [
            Pull(
                at,
                plan.name,
                repo := self.rng.choice(plan.repositories),
                self.latest_tag(repo, at),
                fresh=self.rng.random() < plan.repull,
            )
            for at in self.arrivals()
        ]


def generate(spec: SyntheticSpec) -> Workload:
    spec.check()
    builder = _Builder(spec)
    repositories = builder.repositories()
    plans = builder.clients(repositories)
    events = [
        event for plan in plans for event in builder.pulls_of(plan) if event.at < spec.duration_s
    ] + builder.publications()
    events.sort(key=lambda event: (event.at, event.client))
    workload = Workload("synthetic", builder.layers, builder.images, events, asdict(spec))
    workload.parameters["client_plans"] = [asdict(plan) for plan in plans]
    return workload
