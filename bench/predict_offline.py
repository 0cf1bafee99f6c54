"""bench-predict offline: the predictors replayed on a workload in simulated time, in a
second or two and without a stack, to see when their rebuilds finish against the GETs
they were for (lead time) rather than how fast a registry serves.

The model, named so that its results can be judged:
- a pull is a manifest GET at its time; the layers the client lacks (all of them for a
  pull from an empty store) are GET `get_delay_s` later; a lone Fetch is one layer GET;
- the predictors are the registry's own functions (pipelines.serve.predict) on a history kept
  as the registry keeps it (counts, follow-through and repull rates, without decay);
  `history` and `period` also rebuild a new tag's layers when it is put (fleet_rule);
  `period` also plans each regular pull (estimate_period, plan_next), its plans fired at
  the scans (every `scan_s`);
- a prediction reaches the restore queue `event_delay_s` after its manifest GET; the
  queue has one worker, restoring `restore_bytes_per_s` (the bench's stacks run one
  restore worker); a queued rebuild is skipped if the layer is buffered or being
  rebuilt, or was fetched since the prediction was made (too late), or dropped once
  expired; a GET that finds no buffered layer restores it on demand (in the API, beside
  the queue), and the buffer keeps that too;
- the buffer is LRU by bytes (capacity `buffer_share` of the unique layer bytes), its
  rebuilt entries pinned for their GETs as the registry pins them, beside a spool that
  serves GETs of a layer within `spool_s` of its on-demand restore; intact replicas of
  hot layers (S-mode) are left out: every layer is deduplicated.

Per predictor: predictions made; rebuilt ahead (hit: the layer's next GET came after the
rebuild finished, with the lead time it had); late (the GET came first: the prediction
arrived after the GET, or its rebuild finished after it); wasted (rebuilt, and no GET
came before it was evicted or the workload ended, or the buffer had no room for it beside
its pinned entries); skipped (buffered already); and the
hit ratio: layer GETs served from the buffer or spool, not by an on-demand restore.
"""

from __future__ import annotations

import heapq
import random
import statistics
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from api.replay.workload import Fetch, ImageSpec, Pull, Tag, Workload
from pipelines.serve.buffer import PIN_SHARE
from pipelines.serve.predict import (
    PERIOD,
    PREDICTORS,
    ClientHistory,
    LayerPulls,
    estimate_period,
    fleet_rule,
    plan_next,
    predict,
    restore_bytes_ahead,
)


@dataclass(frozen=True)
class SimParams:
    restore_bytes_per_s: float = 20e6
    event_delay_s: float = 0.1  # a manifest GET to its predictions queued (two Celery hops)
    get_delay_s: float = 0.05  # a manifest GET to its layer GETs (docker: the config first)
    scan_s: float = 5.0
    spool_s: float = 30.0
    buffer_share: float = 0.10
    deadline_s: float = 300.0  # a manifest GET's predictions expire (the registry's default)
    pin_s: float = 10.0  # DUPHUNTER_PREDICTION_PIN_SECONDS: a manifest GET's predictions
    fleet_pin_s: float = 60.0  # DUPHUNTER_BUFFER_PIN_SECONDS: a tag put's, a period plan's


@dataclass(frozen=True)
class PeriodicSpec:
    """Clients that pull on a schedule, added to a workload: CI runners pulling one tag
    of a repository every `ci_period_s` (drawn per runner) from an empty store, with
    `jitter` of it (uniform) each time; fleet nodes pulling the newest tag of one
    repository every `node_period_s` (jitter alike), keeping their layers."""

    ci_runners: int = 6
    ci_period_s: tuple[float, float] = (300.0, 900.0)
    nodes: int = 8
    node_period_s: float = 600.0
    jitter: float = 0.1
    seed: int = 7


def with_periodic_clients(workload: Workload, spec: PeriodicSpec) -> Workload:
    """`workload` with the pulls of `spec`'s periodic clients added (same images). A
    runner pulls one of the tags there at the start; a node the newest tag at each pull
    (a replay cannot move a tag: a rollout is a new tag)."""
    rng = random.Random(spec.seed)
    repositories = sorted({repository for repository, _tag in workload.images})
    tag_times = _tag_times(workload)
    duration = workload.duration()
    added: list[Pull] = []
    for number in range(spec.ci_runners):
        repository = rng.choice(repositories)
        tag = rng.choice([tag for at, tag in tag_times[repository] if at == 0.0])
        period = rng.uniform(*spec.ci_period_s)
        for at in _schedule(rng, period, spec.jitter, duration):
            added.append(Pull(at, f"ci-runner{number:02d}", repository, tag, fresh=True))
    for number in range(spec.nodes):
        repository = repositories[number % len(repositories)]
        for at in _schedule(rng, spec.node_period_s, spec.jitter, duration):
            newest = [tag for when, tag in tag_times[repository] if when <= at][-1]
            added.append(Pull(at, f"node{number:02d}", repository, newest))
    events = sorted([*workload.events, *added], key=lambda event: (event.at, event.client))
    periodic = Workload(
        workload.source, workload.layers, workload.images, events, dict(workload.parameters)
    )
    periodic.parameters["periodic"] = asdict(spec)
    periodic.notes = [*workload.notes]
    return periodic


def _tag_times(workload: Workload) -> dict[str, list[tuple[float, str]]]:
    """Per repository, when each tag appears (0: before the start), in time order."""
    later = {(event.repository, event.tag): event.at for event in workload.events
             if isinstance(event, Tag)}  # fmt: skip
    times: dict[str, list[tuple[float, str]]] = {}
    for repository, tag in workload.images:
        times.setdefault(repository, []).append((later.get((repository, tag), 0.0), tag))
    return {repository: sorted(found) for repository, found in times.items()}


def _schedule(rng: random.Random, period: float, jitter: float, duration: float) -> list[float]:
    times, clock = [], rng.uniform(0, period)
    while clock < duration:
        times.append(clock)
        clock += period * (1 + rng.uniform(-jitter, jitter))
    return times


# --- the simulation -----------------------------------------------------------------------


@dataclass
class Rebuild:
    digest: str
    made_at: float  # when the prediction was made
    expected_from: float  # the GET it is for comes at or after this
    expires: float
    origin: str
    done: float | None = None
    admitted: bool = False  # into the buffer (refused: no room beside the pinned entries)
    evicted: float | None = None
    skipped: str = ""

    @property
    def since(self) -> float:
        """From when a GET is the one it was for: its manifest GET, or (a period plan, made
        ahead of its pull) when it was made."""
        return min(self.made_at, self.expected_from)


@dataclass
class Outcome:
    predictions: int = 0
    rebuilt: int = 0
    hits: int = 0
    late: int = 0
    wasted: int = 0
    skipped: int = 0
    leads: list[float] = field(default_factory=list)
    gets: int = 0
    served: int = 0

    def as_row(self) -> dict[str, Any]:
        return {
            "predictions": self.predictions,
            "rebuilt": self.rebuilt,
            "hits": self.hits,
            "late": self.late,
            "wasted": self.wasted,
            "skipped": self.skipped,
            "lead_p50_s": round(statistics.median(self.leads), 1) if self.leads else None,
            "layer_gets": self.gets,
            "hit_ratio": round(self.served / self.gets, 3) if self.gets else None,
        }


class Simulation:
    """One predictor over one workload (module docstring: the model)."""

    def __init__(self, workload: Workload, predictor: str, params: SimParams) -> None:
        self.workload, self.predictor, self.params = workload, predictor, params
        self.sizes = {key: layer.target_bytes for key, layer in workload.layers.items()}
        self.capacity = int(sum(self.sizes.values()) * params.buffer_share)
        self.tags = _tag_times(workload)
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.sequence = 0
        self.now = 0.0
        self.histories: dict[str, ClientHistory] = {}
        self.expected: dict[str, dict[str, str]] = {}  # client -> layer -> held|lacked
        self.held: dict[str, set[str]] = {}  # what each client has locally
        self.through: dict[str, set[str]] = {}  # repository -> layers pulled through it
        self.pullers: dict[str, set[str]] = {}
        self.pulls: dict[tuple[str, str, str], list[float]] = {}
        self.planned: dict[tuple[str, str, str], float] = {}  # key -> fire time planned
        self.buffer: OrderedDict[str, int] = OrderedDict()
        self.pinned: dict[str, float] = {}  # layer -> pinned until
        self.filling: set[str] = set()
        self.spool: dict[str, float] = {}
        self.fetched: dict[str, list[float]] = {}
        self.queue: list[Rebuild] = []
        self.busy_until = 0.0
        self.rebuilds: list[Rebuild] = []
        self.entries: dict[str, Rebuild] = {}
        self.outcome = Outcome()

    # the clock
    def at(self, when: float, action: Callable[[], None]) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (when, self.sequence, action))

    def run(self) -> dict[str, Any]:
        for event in self.workload.events:
            self.at(event.at, self._handler(event))
        while self.events:
            self.now, _, action = heapq.heappop(self.events)
            action()
        return self._score()

    def _handler(self, event: Pull | Fetch | Tag) -> Callable[[], None]:
        if isinstance(event, Pull):
            return lambda: self.pull(event)
        if isinstance(event, Fetch):
            return lambda: self.get(event.client, event.repository, event.layer)
        return lambda: self.tag_put(event)

    # the client side
    def image(self, repository: str, tag: str) -> ImageSpec | None:
        return self.workload.images.get((repository, tag))

    def pull(self, pull: Pull) -> None:
        image = self.image(pull.repository, pull.tag)
        layers = list(image.layers) if image else []
        self.manifest_get(pull.client, pull.repository, pull.tag, layers)
        held = self.held.setdefault(pull.client, set())
        for layer in layers:
            if pull.fresh or layer not in held:
                when = self.now + self.params.get_delay_s
                self.at(when, partial(self.get, pull.client, pull.repository, layer))
        if pull.fresh:
            held.clear()

    def get(self, client: str, repository: str, layer: str) -> None:
        self.held.setdefault(client, set()).add(layer)
        self.outcome.gets += 1
        self.fetched.setdefault(layer, []).append(self.now)
        if layer in self.buffer:
            self.buffer.move_to_end(layer)
            self.pinned.pop(layer, None)  # the GET it was pinned for came
            self.outcome.served += 1
        elif self.now - self.spool.get(layer, -1e18) <= self.params.spool_s:
            self.outcome.served += 1
        elif layer not in self.filling:  # restored on demand, kept in the spool and buffer
            done = self.now + self.sizes[layer] / self.params.restore_bytes_per_s
            self.spool[layer] = done
            self.at(done, lambda: self.admit(layer))
        self.learn_from_get(client, repository, layer)

    # the registry side: history
    def history(self, client: str) -> ClientHistory:
        return self.histories.setdefault(client, ClientHistory())

    def learn_from_get(self, client: str, repository: str, layer: str) -> None:
        history = self.history(client)
        pulls = history.layers.setdefault(layer, LayerPulls(0, 0.0))
        pulls.count, pulls.last = pulls.count + 1, self.now
        self.through.setdefault(repository, set()).add(layer)
        mark = self.expected.get(client, {}).pop(layer, None)
        if mark == "held":
            history.repulled += 1
        elif mark == "lacked":
            history.fetched_lacking += 1

    def manifest_get(self, client: str, repository: str, tag: str, layers: list[str]) -> None:
        history = self.history(client)
        self.pullers.setdefault(repository, set()).add(client)
        made = self.now + self.params.event_delay_s
        for prediction in predict(self.predictor, layers, history, self.sizes):
            expires = self.now + self.params.deadline_s
            self.request(Rebuild(prediction.digest, made, self.now, expires, "predicted"), made)
        if self.predictor == PERIOD:
            self.record_pull(client, repository, tag, layers, history)
        marks = {layer: "held" if layer in history.layers else "lacked" for layer in layers}
        history.held += sum(mark == "held" for mark in marks.values())
        history.lacked += sum(mark == "lacked" for mark in marks.values())
        self.expected[client] = marks

    def tag_put(self, tag: Tag) -> None:
        if self.predictor not in ("history", PERIOD) or not self.pullers.get(tag.repository):
            return
        image = self.image(tag.repository, tag.tag)
        layers = list(image.layers) if image else []
        for prediction in fleet_rule(layers, self.through.get(tag.repository, set())):
            expires = self.now + self.params.deadline_s
            self.request(Rebuild(prediction.digest, self.now, self.now, expires, "pushed"),
                         self.now)  # fmt: skip

    # the period predictor
    def record_pull(
        self, client: str, repository: str, tag: str, layers: list[str], history: ClientHistory
    ) -> None:
        key = (client, repository, tag)
        self.pulls.setdefault(key, []).append(self.now)
        self.planned.pop(key, None)
        self.plan(key, layers, history, self.now)

    def plan(
        self, key: tuple[str, str, str], layers: list[str], history: ClientHistory, after: float
    ) -> None:
        period = estimate_period(self.pulls[key])
        if period is None:
            return
        sizes = {layer: self.sizes[layer] for layer in layers}
        ahead = restore_bytes_ahead(predict("history", layers, history, sizes), sizes)
        plan = plan_next(period, ahead, after, self.params.scan_s)
        if plan is None:
            return
        scan = -(-plan.fire_at // self.params.scan_s) * self.params.scan_s  # the next scan
        self.planned[key] = scan
        self.at(scan, lambda: self.fire(key, scan, plan.ready_by, plan.expires))

    def fire(self, key: tuple[str, str, str], scan: float, ready_by: float, expires: float) -> None:
        if self.planned.get(key) != scan:
            return  # a pull came and replaced the plan
        client, repository, tag = key
        image = self.image(repository, tag)
        layers = list(image.layers) if image else []
        history = self.history(client)
        for prediction in predict("history", layers, history, self.sizes):
            self.request(Rebuild(prediction.digest, self.now, ready_by, expires, PERIOD), self.now)
        self.plan(key, layers, history, expires)

    # the restore queue and the buffer
    def request(self, rebuild: Rebuild, when: float) -> None:
        self.outcome.predictions += 1
        self.at(when, lambda: self.enqueue(rebuild))

    def enqueue(self, rebuild: Rebuild) -> None:
        self.queue.append(rebuild)
        if self.busy_until <= self.now:
            self.start_next()

    def start_next(self) -> None:
        while self.queue:
            rebuild = self.queue.pop(0)
            self.rebuilds.append(rebuild)
            if self.now > rebuild.expires:
                rebuild.skipped = "expired"
            elif rebuild.digest in self.buffer or rebuild.digest in self.filling:
                rebuild.skipped = "buffered"
            elif any(t > rebuild.since for t in self.fetched.get(rebuild.digest, [])[-3:]):
                rebuild.skipped = "fetched already"
            else:
                self.filling.add(rebuild.digest)
                done = self.now + self.sizes[rebuild.digest] / self.params.restore_bytes_per_s
                self.busy_until = done
                self.at(done, partial(self.finish, rebuild))
                return

    def finish(self, rebuild: Rebuild) -> None:
        rebuild.done = self.now
        self.filling.discard(rebuild.digest)
        self.admit(rebuild.digest, rebuild)
        self.start_next()

    def admit(self, layer: str, rebuild: Rebuild | None = None) -> None:
        """Into the LRU buffer, evicting unpinned entries; a rebuild for an expected GET is
        pinned until that GET or its pin time (as the registry's buffer does: pins hold
        at most PIN_SHARE of it, a rebuild beyond that is not admitted)."""
        size = self.sizes[layer]
        self.buffer.pop(layer, None)
        self.pinned.pop(layer, None)
        until = 0.0
        if rebuild is not None:
            pin = self.params.pin_s if rebuild.origin == "predicted" else self.params.fleet_pin_s
            until = rebuild.expected_from + pin
            pinned = sum(self.buffer[d] for d, t in self.pinned.items() if t > self.now)
            if pinned + size > self.capacity * PIN_SHARE:
                return
        unpinned = [d for d in self.buffer if self.pinned.get(d, 0.0) <= self.now]
        free = self.capacity - sum(self.buffer.values())
        if free + sum(self.buffer[d] for d in unpinned) < size:
            return
        while free < size:
            victim = unpinned.pop(0)
            free += self.buffer.pop(victim)
            self.pinned.pop(victim, None)
            evicted = self.entries.pop(victim, None)
            if evicted is not None:
                evicted.evicted = self.now
        self.buffer[layer] = size
        if rebuild is not None:
            rebuild.admitted = True
            self.entries[layer] = rebuild
            self.pinned[layer] = until

    # scoring
    def _score(self) -> dict[str, Any]:
        outcome = self.outcome
        for rebuild in self.rebuilds:
            if rebuild.skipped:
                late = rebuild.skipped in ("fetched already", "expired")
                outcome.late += late
                outcome.skipped += not late
                continue
            outcome.rebuilt += 1
            following = [t for t in self.fetched.get(rebuild.digest, []) if t >= rebuild.since]
            first = following[0] if following else None
            assert rebuild.done is not None
            if first is not None and first < rebuild.done:
                outcome.late += 1
            elif (
                first is None
                or not rebuild.admitted
                or (rebuild.evicted is not None and rebuild.evicted < first)
            ):
                outcome.wasted += 1
            else:
                outcome.hits += 1
                outcome.leads.append(first - rebuild.done)
        row = outcome.as_row()
        row["unqueued"] = outcome.predictions - len(self.rebuilds)  # still queued at the end
        return row


def simulate(workload: Workload, params: SimParams) -> dict[str, dict[str, Any]]:
    """Every predictor over the workload: one row each."""
    return {name: Simulation(workload, name, params).run() for name in PREDICTORS}


def periods_found(workload: Workload) -> dict[str, int]:
    """How many (client, repository, tag) of the workload pull with a period (estimate
    over all their pulls), of how many that pulled at least twice."""
    times: dict[tuple[str, str, str], list[float]] = {}
    for event in workload.events:
        if isinstance(event, Pull):
            times.setdefault((event.client, event.repository, event.tag), []).append(event.at)
    repeated = [pulls for pulls in times.values() if len(pulls) > 1]
    regular = [pulls for pulls in repeated if estimate_period(pulls) is not None]
    return {"pulled_twice_or_more": len(repeated), "with_a_period": len(regular)}


def iterate_rows(
    results: dict[str, dict[str, dict[str, Any]]],
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for workload, rows in results.items():
        for predictor, row in rows.items():
            yield workload, predictor, row


def offline_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| workload | predictor | predictions | rebuilt | hits (ahead of the GET) "
        "| late (after the GET) | wasted | skipped (buffered) | lead p50 s | layer GETs "
        "| hit ratio |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for workload, predictor, row in iterate_rows(results):
        lead = "n/a" if row["lead_p50_s"] is None else f"{row['lead_p50_s']:.1f}"
        ratio = "n/a" if row["hit_ratio"] is None else f"{row['hit_ratio']:.3f}"
        lines.append(
            f"| {workload} | {predictor} | {row['predictions']} | {row['rebuilt']} "
            f"| {row['hits']} | {row['late']} | {row['wasted']} | {row['skipped']} | {lead} "
            f"| {row['layer_gets']} | {ratio} |"
        )
    return "\n".join(lines)
