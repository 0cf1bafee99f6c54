"""bench-buffer: which eviction policy the layer buffer should use, by simulation.

    python -m bench.buffer_policies [--hours 6] [--clients 200] [--no-docs]

The synthetic pull workload of `duphunter replay` (api/replay/synthetic.py), simulated
rather than replayed (hours of pulls in seconds), against a buffer of 5, 10 and 20% of
the unique layer bytes with every layer deduplicated (mode b0). Clients pull like docker:
the manifest, then the layers they lack (all of them on a fresh pull). Admission is the
same for every policy, as in the registry: the layers a client lacks are filled when it
asks for them (predicted at its manifest GET). A GET counts as a hit only if the buffer
kept its layer from earlier pulls: a rebuild started at the manifest GET cannot end before
the GETs that follow it by tens of milliseconds. Policies:

- LRU: least recently filled or read goes first;
- ARC: Megiddo and Modha's adaptive replacement cache, with sizes in bytes (recency and
  frequency lists, ghost lists steering the split);
- LRFU: exponentially decayed access count (time constant tau), lowest first; a small
  tau makes it LRU with frequency as the tie-break, a large one LFU with aging;
The registry also pins an entry filled for a predicted GET until that GET came (or 60 s
passed): it protects a prediction from being evicted before its GET, which this
simulation (where a fill and its GET are one step) does not need to model. Three seeds;
the table gives each policy's mean and its range.

Reported: hit ratio (layer GETs served by the buffer), byte hit ratio, and fills evicted
before any GET (wasted).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from api.replay.synthetic import SyntheticSpec, generate
from api.replay.workload import Pull, Workload
from bench.report import REPO_ROOT, bar_chart, git_state, machine, save_json, write_section

SECTION = "## bench-buffer: eviction policies of the layer buffer, simulated"
SHARES = (0.05, 0.10, 0.20)
PIN_SECONDS = 60.0
TAU_SECONDS = 3600.0


@dataclass
class Entry:
    size: int
    key: float = 0.0  # LRFU rank
    pinned_until: float = 0.0
    hits: int = 0


class Buffer:
    """A byte-bounded buffer; subclasses choose the victim."""

    def __init__(self, capacity: int, pins: bool) -> None:
        self.capacity = capacity
        self.pins = pins
        self.entries: dict[str, Entry] = {}
        self.used = 0
        self.wasted = 0

    def has(self, layer: str) -> bool:
        return layer in self.entries

    def read(self, layer: str, now: float) -> None:
        entry = self.entries[layer]
        entry.hits += 1
        entry.pinned_until = 0.0
        self.touch(layer, now)

    def fill(self, layer: str, size: int, now: float, predicted: bool) -> None:
        if layer in self.entries or size > self.capacity:
            return
        while self.used + size > self.capacity:
            victim = self.victim(now)
            if victim is None:
                return  # everything left is pinned: not admitted
            self.evict(victim)
        pinned = now + PIN_SECONDS if predicted and self.pins else 0.0
        self.entries[layer] = Entry(size, pinned_until=pinned)
        self.used += size
        self.admitted(layer, now)

    def evict(self, layer: str) -> None:
        entry = self.entries.pop(layer)
        self.used -= entry.size
        self.wasted += entry.hits == 0
        self.forgotten(layer)

    def evictable(self, layer: str, now: float) -> bool:
        return self.entries[layer].pinned_until <= now

    def touch(self, layer: str, now: float) -> None: ...
    def admitted(self, layer: str, now: float) -> None: ...
    def forgotten(self, layer: str) -> None: ...
    def victim(self, now: float) -> str | None:
        raise NotImplementedError


class LRU(Buffer):
    def __init__(self, capacity: int, pins: bool) -> None:
        super().__init__(capacity, pins)
        self.order: OrderedDict[str, None] = OrderedDict()

    def touch(self, layer: str, now: float) -> None:
        self.order.move_to_end(layer)

    def admitted(self, layer: str, now: float) -> None:
        self.order[layer] = None

    def forgotten(self, layer: str) -> None:
        del self.order[layer]

    def victim(self, now: float) -> str | None:
        return next((layer for layer in self.order if self.evictable(layer, now)), None)


class LRFU(Buffer):
    tau = TAU_SECONDS

    def touch(self, layer: str, now: float) -> None:
        entry = self.entries[layer]
        high, low = max(entry.key, now / self.tau), min(entry.key, now / self.tau)
        entry.key = high + math.log1p(math.exp(low - high))

    def admitted(self, layer: str, now: float) -> None:
        self.entries[layer].key = now / self.tau

    def victim(self, now: float) -> str | None:
        candidates = [layer for layer in self.entries if self.evictable(layer, now)]
        return min(candidates, key=lambda layer: self.entries[layer].key, default=None)


class LRFU600(LRFU):
    tau = 600.0


class LRFU60(LRFU):
    tau = 60.0


class ARC(Buffer):
    """ARC with byte sizes: T1 (seen once) and T2 (seen again) hold entries, B1 and B2
    remember what they evicted; a hit in a ghost list moves the target size of T1."""

    def __init__(self, capacity: int, pins: bool) -> None:
        super().__init__(capacity, pins)
        self.t1: OrderedDict[str, int] = OrderedDict()
        self.t2: OrderedDict[str, int] = OrderedDict()
        self.b1: OrderedDict[str, int] = OrderedDict()
        self.b2: OrderedDict[str, int] = OrderedDict()
        self.target = 0.0

    def touch(self, layer: str, now: float) -> None:
        size = self.t1.pop(layer, None) or self.t2.pop(layer)
        self.t2[layer] = size

    def admitted(self, layer: str, now: float) -> None:
        size = self.entries[layer].size
        if layer in self.b1:
            self.target = min(
                self.capacity,
                self.target + max(_bytes(self.b2) / max(_bytes(self.b1), 1), 1) * size,
            )
            del self.b1[layer]
            self.t2[layer] = size
        elif layer in self.b2:
            self.target = max(
                0.0, self.target - max(_bytes(self.b1) / max(_bytes(self.b2), 1), 1) * size
            )
            del self.b2[layer]
            self.t2[layer] = size
        else:
            self.t1[layer] = size

    def forgotten(self, layer: str) -> None:
        for live, ghost in ((self.t1, self.b1), (self.t2, self.b2)):
            if layer in live:
                ghost[layer] = live.pop(layer)
                while _bytes(ghost) > self.capacity:
                    ghost.popitem(last=False)

    def victim(self, now: float) -> str | None:
        first = self.t1 if _bytes(self.t1) > self.target else self.t2
        for side in (first, self.t2 if first is self.t1 else self.t1):
            found = next((layer for layer in side if self.evictable(layer, now)), None)
            if found is not None:
                return found
        return None


def _bytes(items: OrderedDict[str, int]) -> int:
    return sum(items.values())


POLICIES: dict[str, tuple[type[Buffer], bool]] = {
    "LRU": (LRU, False),
    "ARC": (ARC, False),
    "LRFU tau 60 s": (LRFU60, False),
    "LRFU tau 600 s (ours)": (LRFU600, False),
    "LRFU tau 3600 s": (LRFU, False),
}
SEEDS = (7, 8, 9)


@dataclass
class Outcome:
    gets: int = 0
    hits: int = 0
    bytes_got: int = 0
    bytes_hit: int = 0
    fills: int = 0
    wasted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def simulate(workload: Workload, buffer: Buffer) -> Outcome:
    sizes = {key: layer.target_bytes for key, layer in workload.layers.items()}
    held: dict[str, set[str]] = {}
    outcome = Outcome()
    for event in workload.events:
        if not isinstance(event, Pull):
            continue
        image = workload.images[(event.repository, event.tag)]
        have = held.setdefault(event.client, set())
        if event.fresh:
            have.clear()
        wanted = [layer for layer in image.layers if layer not in have]
        # A rebuild started at the manifest GET ends after the client's GETs come (tens
        # of ms later): a hit is a layer the buffer kept from earlier pulls.
        kept = [layer for layer in wanted if buffer.has(layer)]
        for layer in kept:
            outcome.hits += 1
            outcome.bytes_hit += sizes[layer]
            buffer.read(layer, event.at)
        for layer in wanted:
            outcome.gets += 1
            outcome.bytes_got += sizes[layer]
            if layer not in kept:
                outcome.fills += 1
                buffer.fill(layer, sizes[layer], event.at, predicted=False)
            have.add(layer)
    outcome.wasted = buffer.wasted
    return outcome


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[tuple[float, str], list[Outcome]] = {}
    summaries = []
    for seed in SEEDS:
        spec = SyntheticSpec(
            seed=seed, duration_s=args.hours * 3600, clients=args.clients,
            repositories=args.repositories, layers_per_image=4, mean_interval_s=1800,
            new_tag_interval_s=3600, repositories_per_client=(1, 3),
        )  # fmt: skip
        workload = generate(spec)
        unique = sum(layer.target_bytes for layer in workload.layers.values())
        summaries.append({**workload.summary(), "unique_bytes": unique})
        for share in SHARES:
            for name, (kind, pins) in POLICIES.items():
                outcome = simulate(workload, kind(int(unique * share), pins))
                rows.setdefault((share, name), []).append(outcome)
    return {"workloads": summaries, "rows": [_row(k, v) for k, v in rows.items()]}


def _row(key: tuple[float, str], outcomes: list[Outcome]) -> dict[str, Any]:
    share, policy = key
    ratios = [o.hits / max(o.gets, 1) for o in outcomes]
    byte_ratios = [o.bytes_hit / max(o.bytes_got, 1) for o in outcomes]
    return {
        "share": share, "policy": policy, "gets": sum(o.gets for o in outcomes),
        "hit_ratio": sum(ratios) / len(ratios), "hit_ratio_range": [min(ratios), max(ratios)],
        "byte_hit_ratio": sum(byte_ratios) / len(byte_ratios),
        "fills": sum(o.fills for o in outcomes), "wasted_fills": sum(o.wasted for o in outcomes),
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| buffer (share of unique bytes) | policy | hit ratio (range) | byte hit ratio | "
        "fills | wasted fills |",
        "|--:|---|--:|--:|--:|--:|",
    ]
    for row in rows:
        low, high = row["hit_ratio_range"]
        lines.append(
            f"| {row['share']:.0%} | {row['policy']} | {row['hit_ratio']:.3f} "
            f"({low:.3f}-{high:.3f}) | {row['byte_hit_ratio']:.3f} | {row['fills']} | "
            f"{row['wasted_fills']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--repositories", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    began = time.perf_counter()
    result = run(args)
    result.update(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), git=git_state(),
        command=f"python -m bench.buffer_policies --hours {args.hours} --clients {args.clients}",
        total_s=time.perf_counter() - began,
    )  # fmt: skip
    save_json("buffer", result)
    print(table(result["rows"]))
    if not args.no_docs:
        write_docs(result)


def write_docs(result: dict[str, Any]) -> None:
    chart = bar_chart(
        REPO_ROOT / "docs" / "img" / "bench-buffer.png",
        "Layer-GET hit ratio of the buffer, by eviction policy",
        {f"{share:.0%}": {row["policy"]: row["hit_ratio"] for row in result["rows"]
                          if row["share"] == share} for share in SHARES},
        "hit ratio",
    )  # fmt: skip
    workloads = result["workloads"]
    first = workloads[0]
    spread = ", ".join(
        f"{w['layers']} layers ({w['unique_bytes'] / 1e6:.0f} MB unique), {w['pulls']} pulls"
        for w in workloads
    )
    body = f"""![bench-buffer]({chart.relative_to(REPO_ROOT / "docs")})

Run {result["date"]} by `make bench-buffer` (`{result["command"]}`, {result["total_s"]:.0f} s,
a simulation: no stack), code at {result["git"]}. Workloads: the synthetic generator of
`duphunter replay` with seeds {", ".join(str(seed) for seed in SEEDS)} (the range in the table is
over them), each {first["clients"]} clients, {first["repositories"]} repositories and
{first["duration_s"] / 3600:.1f} h of pulls: {spread}. Every layer deduplicated;
admission as in the registry (the layers a client lacks are filled at its manifest GET;
a missed GET fills its layer). Pins last {PIN_SECONDS:.0f} s. The registry's buffer is
LRFU with a time constant of 600 s (`DUPHUNTER_BUFFER_TAU_SECONDS`).

{table(result["rows"])}

Raw data: `docs/bench/buffer.json`.
"""
    write_section(SECTION, body, machine())


if __name__ == "__main__":
    main()
