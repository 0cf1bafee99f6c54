"""bench-fleet: layer-GET latency with N restore cores, simulated from measured costs and the
measured replay, validated against the 2-core run, and the fleet's cost against the storage
that deduplication saves.

Usage::

    python -m bench.fleet [--cores 2,4,8,...] [--host-cores 8,16] [--seed 1] [--no-docs]

Nothing is measured here: the inputs are `docs/bench/predict.json` (bench-predict: every
layer GET of the replay, its latency and the path that served it, Distribution's run beside
it), `docs/bench/restore.json` (bench-restore: CPU per tar byte of the zlib-6 encoder, of the
tar rebuild and of a parallel restore's extra work) and `docs/bench/dedup.json` (bench-dedup:
stored against pushed bytes). The simulation is a deterministic discrete-event model (see
`simulate`); a seed only draws the serving paths' measured residuals.

Results: a table on stdout, `docs/bench/fleet.json`, `docs/img/bench-fleet.png` and the
section `## bench-fleet: …` in `docs/benchmarks.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.replay.content import RATIO as TAR_PER_BLOB
from api.replay.report import latency
from bench.report import REPO_ROOT, RESULTS, git_state, save_json, write_section
from pipelines.serve.checkpoints import FIRST_SEGMENT_TAR_BYTES, checkpoint_spacing

SECTION = "## bench-fleet: restore cores against Distribution's latency, and what they cost"
PLOT = REPO_ROOT / "docs" / "img" / "bench-fleet.png"
MB = 1_000_000
OURS = "s/history"  # the run whose GETs are replayed (the targets are for it)
REPLAYED_WORKLOAD = "present"  # of bench-predict's workloads, the one the model replays
ENCODER = "gzip/zlib-1.2.13/6"  # the replay's layers (api.replay.content: zlib level 6)
RESTORE_SOURCES = ("restore", "inflight")  # GETs that waited for an on-demand restore
QUANTILES = ("p50", "p90", "p99")
REAL_LAYER_MB = 22.0  # the mean layer of the real-sized replay


# --- costs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Serving:
    """A GET served from stored bytes: `fixed_s` + MB / `mb_per_s`, plus a residual drawn
    from the measured ones (the spread a fit by size does not explain)."""

    fixed_s: float
    mb_per_s: float
    residuals: tuple[float, ...] = ()

    def seconds(self, blob_bytes: int, rng: random.Random) -> float:
        noise = rng.choice(self.residuals) if self.residuals else 0.0
        return max(self.fixed_s + blob_bytes / MB / self.mb_per_s + noise, 0.0)


@dataclass(frozen=True)
class Costs:
    """Every cost the model charges, named, with its unit."""

    encode_cpu_s_per_tar_mb: float  # the layer's encoder, one thread
    rebuild_cpu_s_per_tar_mb: float  # the tar rebuilt from stored files, each file checked
    extra_cpu_s_per_tar_mb: float  # a parallel restore's more: priming, joining, verifying
    restore_setup_s: float  # recipe, checkpoints and file locations read before segment 0
    s3_rtt_s: float  # one S3 GET's first byte (a segment's files: one ranged read)
    s3_mb_per_s: float  # S3 read bandwidth of one stream
    stored_per_tar: float  # stored (compressed file) bytes a segment fetches per tar byte
    net_rtt_s: float  # between restore hosts
    net_mb_per_s: float  # a remote segment's compressed bytes sent to the serving host
    other_cpu_share: float  # of each core taken by other processes (S3, API, the clients)
    stored: Serving  # a GET from the buffer, the spool or an intact copy
    distribution: Serving  # Distribution's GET of the same layer
    spacing_bytes: int = 0  # tar bytes per segment; 0: the registry's checkpoint spacing
    first_segment_bytes: int = FIRST_SEGMENT_TAR_BYTES  # at most, as the registry places it

    def segments(self, blob_bytes: int) -> list[int]:
        """Tar bytes of each segment of a layer's restore."""
        tar_bytes = int(blob_bytes * TAR_PER_BLOB)
        return segment_sizes(tar_bytes, self.spacing_bytes, self.first_segment_bytes)

    def segment_cpu_s(self, tar_bytes: int) -> float:
        per_mb = self.encode_cpu_s_per_tar_mb + self.rebuild_cpu_s_per_tar_mb
        per_mb += self.extra_cpu_s_per_tar_mb
        return tar_bytes / MB * per_mb / (1.0 - self.other_cpu_share)

    def segment_fetch_s(self, tar_bytes: int) -> float:
        return self.s3_rtt_s + tar_bytes * self.stored_per_tar / MB / self.s3_mb_per_s

    def remote_s(self, tar_bytes: int) -> float:
        return self.net_rtt_s + tar_bytes / TAR_PER_BLOB / MB / self.net_mb_per_s


def segment_sizes(
    tar_bytes: int, spacing: int = 0, first: int = FIRST_SEGMENT_TAR_BYTES
) -> list[int]:
    """Tar bytes of each segment of a restore: the first at most `first` (the registry's
    short first segment, for the first bytes' sake), the others `spacing` apart, or (0) at
    the checkpoint spacing of the registry (pipelines.serve.checkpoints), every candidate
    assumed proven."""
    spacing = spacing or checkpoint_spacing(tar_bytes)
    sizes = [min(first, spacing, tar_bytes)]
    rest = tar_bytes - sizes[0]
    count = math.ceil(rest / spacing)
    sizes += [spacing] * max(0, count - 1)
    return [*sizes, rest - spacing * (count - 1)] if count else sizes


# --- workload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Get:
    """A layer GET of the replay: when it was sent, the layer, its size, and whether it
    needed an on-demand restore in the measured run (`restore`) or was served by stored
    bytes (buffer, spool, intact copy)."""

    at: float
    digest: str
    blob_bytes: int
    restore: bool


@dataclass(frozen=True)
class Fleet:
    """`cores` restore cores on hosts of `host_cores`; `spread`: a layer's segments run on
    any core of the fleet ("fleet") or only on the host that serves the GET ("host")."""

    cores: int
    host_cores: int
    spread: str = "fleet"

    @property
    def hosts(self) -> int:
        return max(1, math.ceil(self.cores / self.host_cores))

    def host_of(self, core: int) -> int:
        return core // self.host_cores


@dataclass
class Restore:
    """One restore of a layer, shared by every GET that arrives while it runs: the time each
    segment is verified and on the serving host, in order."""

    started: float
    ready: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)  # of the layer's bytes, per segment

    @property
    def finished(self) -> float:
        return max(self.ready)


@dataclass(frozen=True)
class Served:
    get: Get
    seconds: float  # from sending the GET to its last byte, as the replay measures
    ttfb_s: float
    source: str  # "stored", "restore" or "joined"


# --- the simulation -----------------------------------------------------------------------


class CorePool:
    """The fleet's cores: FIFO service of segment jobs in the order they become ready, each
    on the core that frees first (the home host's on a tie). Jobs are placed in ready-time
    order, so this is the exact schedule of a FIFO multi-server queue."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.free: list[list[tuple[float, int]]] = [[] for _ in range(fleet.hosts)]
        for core in range(fleet.cores):
            heapq.heappush(self.free[fleet.host_of(core)], (0.0, core))

    def run(self, ready: float, seconds: float, home: int) -> tuple[float, int]:
        """Run a job that may start at `ready` for `seconds`; its end and its host."""
        hosts = [home] if self.fleet.spread == "host" else range(len(self.free))
        host = min(hosts, key=lambda h: (max(self.free[h][0][0], ready), h != home))
        free_at, core = heapq.heappop(self.free[host])
        end = max(free_at, ready) + seconds
        heapq.heappush(self.free[host], (end, core))
        return end, host


def home_host(digest: str, fleet: Fleet) -> int:
    """GETs of a layer go to one host (the load balancer hashes the digest), so that
    concurrent GETs of it share one restore there (RestoreHub shares within a host)."""
    return int(digest.removeprefix("sha256:")[:8] or "0", 16) % fleet.hosts


def start_restore(get: Get, at: float, pool: CorePool, costs: Costs) -> Restore:
    home = home_host(get.digest, pool.fleet)
    restore = Restore(at)
    begin = at + costs.restore_setup_s
    sizes = costs.segments(get.blob_bytes)
    for tar_bytes in sizes:
        ready = begin + costs.segment_fetch_s(tar_bytes)
        end, host = pool.run(ready, costs.segment_cpu_s(tar_bytes), home)
        restore.ready.append(end + (costs.remote_s(tar_bytes) if host != home else 0.0))
        restore.shares.append(tar_bytes / sum(sizes))
    return restore


def stream(get: Get, restore: Restore, costs: Costs) -> tuple[float, float]:
    """Last and first byte of `get` from a restore: each verified segment is sent in order,
    at the stored path's rate, as soon as it and the ones before it are sent."""
    sent = get.at + costs.stored.fixed_s
    first = None
    for ready, share in zip(restore.ready, restore.shares, strict=True):
        sent = max(sent, ready)
        first = sent if first is None else first
        sent += get.blob_bytes * share / MB / costs.stored.mb_per_s
    return sent, first or sent


def simulate(gets: Sequence[Get], fleet: Fleet, costs: Costs, seed: int = 1) -> list[Served]:
    """Every GET in time order: stored ones by the stored path; the others start a restore
    of their layer, or follow the one running (until its last segment is ready)."""
    rng = random.Random(seed)
    pool = CorePool(fleet)
    running: dict[str, Restore] = {}
    served = []
    for get in sorted(gets, key=lambda g: g.at):
        if not get.restore:
            seconds = costs.stored.seconds(get.blob_bytes, rng)
            served.append(Served(get, seconds, seconds, "stored"))
            continue
        restore = running.get(get.digest)
        source = "joined"
        if restore is None or restore.finished <= get.at:
            restore = running[get.digest] = start_restore(get, get.at, pool, costs)
            source = "restore"
        last, first = stream(get, restore, costs)
        served.append(Served(get, last - get.at, first - get.at, source))
    return served


def distribution(gets: Sequence[Get], costs: Costs, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [costs.distribution.seconds(get.blob_bytes, rng) for get in gets]


# --- calibration from the measured runs ---------------------------------------------------


def load(name: str) -> dict[str, Any]:
    """A bench's raw results; of a bench-predict run of several workloads, the `present`
    one's runs at the top level, as a run of that workload alone wrote them."""
    path = RESULTS / f"{name}.json"
    result: dict[str, Any] = json.loads(path.read_text())
    if "workloads" in result:
        result = {**result, **result["workloads"][REPLAYED_WORKLOAD]}
    return result


def layer_rows(run: dict[str, Any], columns: list[str]) -> list[dict[str, Any]]:
    rows = [dict(zip(columns, get, strict=True)) for get in run["gets"]]
    return [row for row in rows if row["kind"] == "layer" and not row["error"]]


def replay_gets(rows: Iterable[dict[str, Any]]) -> list[Get]:
    return [
        Get(row["at"], row["digest"], row["bytes"], row["source"] in RESTORE_SOURCES)
        for row in rows
    ]


def fit(rows: Sequence[dict[str, Any]]) -> Serving:
    """Least squares of seconds on MB, and the residuals around it."""
    xs = [row["bytes"] / MB for row in rows]
    ys = [row["seconds"] for row in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope /= sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 1e-6)
    fixed = my - slope * mx
    residuals = tuple(y - (fixed + slope * x) for x, y in zip(xs, ys, strict=True))
    return Serving(fixed, 1 / slope, residuals)


def encoder_costs(restore: dict[str, Any], encoder: str) -> dict[str, float]:
    """CPU seconds per MB of tar: the encoder alone, the tar rebuild, and what a parallel
    restore adds to both (bench-restore's `threads` CPU less the other two)."""
    layer = next(layer for layer in restore["layers"] if layer["encoder"] == encoder)
    tar_mb, cpu = layer["tar_bytes"] / MB, layer["cpu_seconds"]
    extra = max(cpu["threads"] - cpu["original"] - cpu["rebuild"], 0.0)
    return {
        "encode_cpu_s_per_tar_mb": cpu["original"] / tar_mb,
        "rebuild_cpu_s_per_tar_mb": cpu["rebuild"] / tar_mb,
        "extra_cpu_s_per_tar_mb": extra / tar_mb,
    }


def other_cpu_share(run: dict[str, Any], cores: int) -> float:
    """The share of the cores that the registry's processes took beside restores over the
    replay (its counters; the S3 server and the replaying clients are not counted)."""
    other = run["registry_cpu_s"] - run["registry"]["restore_cpu_seconds"]
    return float(max(other, 0.0) / run["replay_s"] / cores)


@dataclass(frozen=True)
class Network:
    """Named costs of the network and of S3, which the measured run cannot give."""

    name: str
    restore_setup_s: float
    s3_rtt_s: float
    s3_mb_per_s: float
    net_rtt_s: float
    net_mb_per_s: float
    added_first_byte_s: float  # added to every stored GET, Distribution's and ours


LOOPBACK = Network("loopback (as measured)", 0.010, 0.0025, 300.0, 0.0001, 1000.0, 0.0)
CLOUD = Network("cloud (S3 in region, 10 Gbit/s hosts)", 0.060, 0.020, 90.0, 0.0005, 1000.0, 0.02)


def calibrate(
    predict: dict[str, Any], restore: dict[str, Any], network: Network, shared_cores: int
) -> Costs:
    """Costs from the measured runs: the serving paths fitted to the replay's GETs, CPU per
    byte from bench-restore; `shared_cores` > 0: the registry's other CPU (measured) taken
    from that many cores (the 2-core host of the measurement), 0: dedicated restore cores."""
    columns = predict["get_columns"]
    ours = layer_rows(predict["runs"][OURS], columns)
    peer = layer_rows(predict["runs"]["distribution"], columns)
    stored = fit([row for row in ours if row["source"] not in RESTORE_SOURCES])
    peer_fit = fit(peer)
    added = network.added_first_byte_s
    share = other_cpu_share(predict["runs"][OURS], shared_cores) if shared_cores else 0.0
    cpu = encoder_costs(restore, ENCODER)
    return Costs(
        encode_cpu_s_per_tar_mb=cpu["encode_cpu_s_per_tar_mb"],
        rebuild_cpu_s_per_tar_mb=cpu["rebuild_cpu_s_per_tar_mb"],
        extra_cpu_s_per_tar_mb=cpu["extra_cpu_s_per_tar_mb"],
        restore_setup_s=network.restore_setup_s,
        s3_rtt_s=network.s3_rtt_s,
        s3_mb_per_s=network.s3_mb_per_s,
        stored_per_tar=1 / TAR_PER_BLOB,
        net_rtt_s=network.net_rtt_s,
        net_mb_per_s=network.net_mb_per_s,
        other_cpu_share=share,
        stored=dataclasses.replace(stored, fixed_s=stored.fixed_s + added),
        distribution=dataclasses.replace(peer_fit, fixed_s=peer_fit.fixed_s + added),
    )


def scaled(gets: Sequence[Get], mean_mb: float) -> list[Get]:
    """The same GETs with every layer scaled to a mean of `mean_mb`: a byte-sized buffer at
    10% of the unique bytes, the byte-sized replicas and the time-kept spool make the same
    choices when every size is scaled alike, so the measured paths carry over."""
    factor = mean_mb * MB * len(gets) / sum(get.blob_bytes for get in gets)
    return [dataclasses.replace(get, blob_bytes=int(get.blob_bytes * factor)) for get in gets]


# --- the runs -----------------------------------------------------------------------------


def quantiles(seconds: Iterable[float]) -> dict[str, float]:
    summary = latency(seconds)
    return {name: summary[name] for name in QUANTILES}


def ratios(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    return {name: round(ours[name] / theirs[name], 2) for name in QUANTILES}


def validate(predict: dict[str, Any], costs: Costs, seed: int) -> dict[str, Any]:
    """N=2 on one host against the measured run, GET for GET: the same GETs, the same
    served paths; p50/p90/p99 of all GETs and of the restoring ones, both registries."""
    columns = predict["get_columns"]
    rows = layer_rows(predict["runs"][OURS], columns)
    peer_rows = layer_rows(predict["runs"]["distribution"], columns)
    gets = replay_gets(rows)
    served = simulate(gets, Fleet(2, 2, "host"), costs, seed)
    restoring = [s.seconds for s in served if s.get.restore]
    measured_restoring = [row["seconds"] for row in rows if row["source"] in RESTORE_SOURCES]
    peer_gets = replay_gets(peer_rows)
    table = {
        "duphunter": {
            "measured": quantiles(row["seconds"] for row in rows),
            "model": quantiles(s.seconds for s in served),
        },
        "duphunter restoring GETs": {
            "measured": quantiles(measured_restoring),
            "model": quantiles(restoring),
        },
        "distribution": {
            "measured": quantiles(row["seconds"] for row in peer_rows),
            "model": quantiles(distribution(peer_gets, costs, seed)),
        },
    }
    for entry in table.values():
        entry["model / measured"] = ratios(entry["model"], entry["measured"])
    cpu_model = sum(
        costs.segment_cpu_s(size) * (1 - costs.other_cpu_share)
        for s in served
        if s.source == "restore"
        for size in costs.segments(s.get.blob_bytes)
    )
    return {
        "gets": len(gets),
        "restoring_gets": len(restoring),
        "table": table,
        "restore_cpu_s": {
            "model_on_demand": round(cpu_model, 2),
            "model_restores": sum(1 for s in served if s.source == "restore"),
            "measured_all": predict["runs"][OURS]["registry"]["restore_cpu_seconds"],
            "measured_restores": predict["runs"][OURS]["stats_delta"].get(
                "restores.on_demand_or_preconstructed"
            ),
            "preconstructions": predict["runs"][OURS]["stats_delta"].get(
                "restores.preconstructions", 0
            ),
        },
    }


def fleets(cores: Sequence[int], host_cores: Sequence[int]) -> list[Fleet]:
    found = []
    for count in cores:
        for size in host_cores:
            if count <= size:
                found.append(Fleet(count, count, "host"))
                break
            found += [Fleet(count, size, "fleet"), Fleet(count, size, "host")]
    return list(dict.fromkeys(found))


def sweep(
    gets: Sequence[Get], fleet_list: Sequence[Fleet], costs: Costs, seed: int
) -> list[dict[str, Any]]:
    peer = quantiles(distribution(gets, costs, seed))
    rows = []
    for fleet in fleet_list:
        served = simulate(gets, fleet, costs, seed)
        ours = quantiles(s.seconds for s in served)
        restoring = quantiles(s.seconds for s in served if s.get.restore)
        rows.append(
            {
                "cores": fleet.cores,
                "host_cores": fleet.host_cores,
                "hosts": fleet.hosts,
                "spread": fleet.spread,
                "ours": ours,
                "restoring": restoring,
                "distribution": peer,
                "ratio": ratios(ours, peer),
            }
        )
    return rows


def lower_bound(gets: Sequence[Get], costs: Costs) -> dict[str, float]:
    """The cold GET of the replay's median restoring layer with unlimited cores: setup, one
    segment's fetch and CPU, then the bytes streamed."""
    sizes = sorted(get.blob_bytes for get in gets if get.restore)
    blob = sizes[len(sizes) // 2]
    segment = max(costs.segments(blob))
    cold = costs.stored.fixed_s + costs.restore_setup_s + costs.segment_fetch_s(segment)
    cold += costs.segment_cpu_s(segment) + blob / MB / costs.stored.mb_per_s
    return {"blob_mb": round(blob / MB, 2), "cold_get_s": round(cold, 4)}


# --- cost ---------------------------------------------------------------------------------

CORE_HOUR_USD = 0.0446  # AWS c7i.2xlarge on demand, us-east-1: $0.357/h for 8 vCPU
S3_GB_MONTH_USD = 0.023  # S3 Standard, us-east-1, first 50 TB
HOURS_PER_MONTH = 730
REGISTRY_TB = (10, 100, 1000)  # logical (pushed) layer bytes


def dedup_savings(dedup: dict[str, Any], predict: dict[str, Any]) -> dict[str, float]:
    """Share of the pushed bytes that deduplication does not store, from two measurements:
    bench-dedup's corpus and the replay's store (buffer and hot replicas included)."""
    corpus = dedup["summary"]
    runs = predict["runs"]
    return {
        "bench-dedup corpus": 1 - corpus["dedup_store_bytes"] / corpus["logical_bytes"],
        "bench-predict store": 1
        - runs[OURS]["stored"]["total"] / runs["distribution"]["stored"]["total"],
    }


def costs_table(cores: Sequence[int], savings: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for count in cores:
        fleet_usd = count * CORE_HOUR_USD * HOURS_PER_MONTH
        saved = {
            f"{name}, {tb} TB": tb * 1000 * share * S3_GB_MONTH_USD
            for name, share in savings.items()
            for tb in REGISTRY_TB
        }
        break_even = {
            name: fleet_usd / (share * S3_GB_MONTH_USD) / 1000 for name, share in savings.items()
        }
        rows.append(
            {
                "cores": count,
                "fleet_usd_month": round(fleet_usd),
                "saved_usd_month": {k: round(v) for k, v in saved.items()},
                "break_even_tb": {k: round(v, 1) for k, v in break_even.items()},
            }
        )
    return rows


# --- report -------------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value * 1000:.0f}"


def sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| restore cores | hosts x cores | segments on | p50 ms | p90 ms | p99 ms "
        "| restoring GETs p50/p99 ms | ratio p50/p90/p99 |",
        "|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    peer = rows[0]["distribution"] if rows else None
    for row in rows:
        ours, ratio = row["ours"], row["ratio"]
        lines.append(
            f"| {row['cores']} | {row['hosts']} x {row['host_cores']} | {row['spread']} "
            f"| {ms(ours['p50'])} | {ms(ours['p90'])} | {ms(ours['p99'])} "
            f"| {ms(row['restoring']['p50'])}/{ms(row['restoring']['p99'])} "
            f"| {ratio['p50']:.2f}/{ratio['p90']:.2f}/{ratio['p99']:.2f} |"
        )
    if peer:
        lines.append(
            f"| Distribution | | | {ms(peer['p50'])} | {ms(peer['p90'])} | {ms(peer['p99'])} "
            "| | 1.00/1.00/1.00 |"
        )
    return "\n".join(lines)


def validation_table(validation: dict[str, Any]) -> str:
    lines = [
        "| N=2, one host | measured p50/p90/p99 ms | model p50/p90/p99 ms | model / measured |",
        "|---|--:|--:|--:|",
    ]
    for name, entry in validation["table"].items():
        measured, model, ratio = entry["measured"], entry["model"], entry["model / measured"]
        lines.append(
            f"| {name} | {'/'.join(ms(measured[q]) for q in QUANTILES)} "
            f"| {'/'.join(ms(model[q]) for q in QUANTILES)} "
            f"| {'/'.join(f'{ratio[q]:.2f}' for q in QUANTILES)} |"
        )
    return "\n".join(lines)


def cost_table(rows: Sequence[dict[str, Any]], savings: dict[str, float]) -> str:
    names = list(savings)
    header = "| restore cores | fleet $/month | " + " | ".join(
        f"saved $/month at {tb} TB ({name})" for name in names for tb in REGISTRY_TB[1:2]
    )
    header += " | " + " | ".join(f"break-even registry, TB ({name})" for name in names) + " |"
    lines = [header, "|--:|--:|" + "--:|" * (2 * len(names))]
    for row in rows:
        saved = [row["saved_usd_month"][f"{name}, {REGISTRY_TB[1]} TB"] for name in names]
        even = [row["break_even_tb"][name] for name in names]
        lines.append(
            f"| {row['cores']} | {row['fleet_usd_month']:,} | "
            + " | ".join(f"{value:,}" for value in saved)
            + " | "
            + " | ".join(f"{value:,.1f}" for value in even)
            + " |"
        )
    return "\n".join(lines)


def crossings(rows: Sequence[dict[str, Any]], limit: float = 1.0) -> dict[str, int | None]:
    """Per quantile, the fewest restore cores (of the best spread) whose ratio to
    Distribution is at most `limit`; None: no fleet swept reaches it."""
    found: dict[str, int | None] = {}
    for name in QUANTILES:
        fits = [row["cores"] for row in rows if row["ratio"][name] <= limit]
        found[name] = min(fits) if fits else None
    return found


def plot(
    path: Path, workloads: dict[str, list[dict[str, Any]]], costs: list[dict[str, Any]]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    styles = {"p50": ":", "p90": "--", "p99": "-"}
    for number, (name, rows) in enumerate(workloads.items()):
        best = best_rows(rows)
        color = f"C{number}"
        for quantile, style in styles.items():
            left.plot(
                [row["cores"] for row in best],
                [row["ratio"][quantile] for row in best],
                style,
                color=color,
                marker="o",
                markersize=3,
                label=f"{name} {quantile}",
            )
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("restore cores (hosts of 8, segments anywhere in the fleet)")
    left.set_ylabel("layer GET latency / Distribution's")
    left.set_title("simulated layer GETs of the replay", fontsize=10)
    left.legend(fontsize=6)
    left.grid(True, which="both", linewidth=0.3)
    cores = [row["cores"] for row in costs]
    right.plot(cores, [row["fleet_usd_month"] for row in costs], "k-o", markersize=3, label="fleet")
    for number, key in enumerate(costs[0]["saved_usd_month"]):
        value = costs[0]["saved_usd_month"][key]
        color = f"C{number // len(REGISTRY_TB) + 1}"
        right.axhline(value, linewidth=0.8, linestyle="--", color=color, label=f"saved: {key}")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("restore cores")
    right.set_ylabel("$ per month")
    right.set_title(
        f"fleet at \\${CORE_HOUR_USD}/core-hour vs S3 at \\${S3_GB_MONTH_USD}/GB-month saved",
        fontsize=9,
    )
    right.legend(fontsize=5, loc="upper left")
    right.grid(True, which="both", linewidth=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def best_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per core count, the spread with the lowest p99."""
    best: dict[int, dict[str, Any]] = {}
    for row in rows:
        kept = best.get(row["cores"])
        if kept is None or row["ours"]["p99"] < kept["ours"]["p99"]:
            best[row["cores"]] = row
    return [best[count] for count in sorted(best)]


@dataclass(frozen=True)
class Scenario:
    name: str
    real_sized: bool  # the replay's GETs with layers scaled to --layer-mb
    network: Network
    spacing_bytes: int = 0  # 0: the registry's checkpoint spacing


SCENARIOS = [
    Scenario("replay as measured, loopback", False, LOOPBACK),
    Scenario("real-sized, loopback", True, LOOPBACK),
    Scenario("real-sized, cloud S3", True, CLOUD),
    Scenario("real-sized, cloud S3, 1 MiB segments", True, CLOUD, 1 << 20),
]


def run_scenario(
    scenario: Scenario,
    gets: Sequence[Get],
    fleet_list: Sequence[Fleet],
    predict: dict[str, Any],
    restore: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    costs = calibrate(predict, restore, scenario.network, shared_cores=0)
    costs = dataclasses.replace(costs, spacing_bytes=scenario.spacing_bytes)
    rows = sweep(gets, fleet_list, costs, seed)
    return {
        "network": dataclasses.asdict(scenario.network),
        "spacing_bytes": scenario.spacing_bytes,
        "mean_layer_mb": round(sum(g.blob_bytes for g in gets) / len(gets) / MB, 2),
        "restore_demand_cores": restore_demand(gets, costs),
        "rows": rows,
        "match": crossings(rows),
        "issue_targets": {q: crossings(rows, limit)[q] for q, limit in TARGETS.items()},
        "lower_bound": lower_bound(gets, costs),
    }


def restore_demand(gets: Sequence[Get], costs: Costs) -> float:
    """Mean cores busy restoring over the replay, if every restoring GET restored alone
    (an upper bound: joined GETs share a restore)."""
    cpu = sum(
        costs.segment_cpu_s(size)
        for get in gets
        if get.restore
        for size in costs.segments(get.blob_bytes)
    )
    span = max(get.at for get in gets) - min(get.at for get in gets)
    return round(cpu / span, 2)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    predict, restore, dedup = load("predict"), load("restore"), load("dedup")
    shared = calibrate(predict, restore, LOOPBACK, shared_cores=2)
    measured = replay_gets(layer_rows(predict["runs"][OURS], predict["get_columns"]))
    real = scaled(measured, args.layer_mb)
    fleet_list = fleets(args.cores, args.host_cores)
    sweeps = {
        scenario.name: run_scenario(
            scenario,
            real if scenario.real_sized else measured,
            fleet_list,
            predict,
            restore,
            args.seed,
        )
        for scenario in SCENARIOS
    }
    savings = dedup_savings(dedup, predict)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench.fleet", *sys.argv[1:]]),
        "git": git_state(),
        "inputs": {
            "predict": f"{predict['date']}, {predict['git']}",
            "restore": f"{restore['date']}, {restore['git']}",
            "dedup": f"{dedup['date']}, {dedup['git']}",
        },
        "layer_mb": args.layer_mb,
        "segments_of_a_layer": len(shared.segments(int(args.layer_mb * MB))),
        "seed": args.seed,
        "costs_validation": costs_summary(shared),
        "validation": validate(predict, shared, args.seed),
        "validation_idle_cores": validate(
            predict, dataclasses.replace(shared, other_cpu_share=0.0), args.seed
        ),
        "sweeps": sweeps,
        "savings": savings,
        "prices": {
            "core_hour_usd": CORE_HOUR_USD,
            "s3_gb_month_usd": S3_GB_MONTH_USD,
            "registry_tb": REGISTRY_TB,
        },
        "cost": costs_table(sorted({fleet.cores for fleet in fleet_list}), savings),
        "total_s": round(time.perf_counter() - started, 2),
    }


TARGETS = {"p50": 1.1, "p90": 1.5, "p99": 3.0}  # bench-predict's targets for the ratios


def costs_summary(costs: Costs) -> dict[str, Any]:
    summary = dataclasses.asdict(costs)
    for name in ("stored", "distribution"):
        serving = summary[name]
        summary[name] = {
            "fixed_ms": round(serving["fixed_s"] * 1000, 2),
            "mb_per_s": round(serving["mb_per_s"], 1),
            "residuals": len(serving["residuals"]),
        }
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in summary.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cores", default="2,4,8,16,32,64,128,256,512")
    parser.add_argument("--host-cores", default="8,16", help="cores per restore host")
    parser.add_argument("--layer-mb", type=float, default=REAL_LAYER_MB)
    parser.add_argument("--seed", type=int, default=1, help="draws the measured residuals")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args()
    args.cores = [int(value) for value in args.cores.split(",")]
    args.host_cores = [int(value) for value in args.host_cores.split(",")]
    result = bench(args)
    print(markdown(result))
    if not args.no_docs:
        path = save_json("fleet", result)
        plot(PLOT, {name: s["rows"] for name, s in result["sweeps"].items()}, result["cost"])
        write_section(SECTION, f"![bench-fleet](img/{PLOT.name})\n\n" + markdown(result), "")
        print(f"\nwrote {path}, {PLOT} and docs/benchmarks.md")


def markdown(result: dict[str, Any]) -> str:
    validation, idle = result["validation"], result["validation_idle_cores"]
    cpu = validation["restore_cpu_s"]
    per_model = cpu["model_on_demand"] / cpu["model_restores"]
    charged = "more" if per_model > cpu["measured_all"] / cpu["measured_restores"] else "less"
    costs = result["costs_validation"]
    prices = result["prices"]
    lines = [
        f"Run {result['date']} by `make bench-fleet` (`{result['command']}`, "
        f"{result['total_s']:.1f} s, a simulation: no stack), code at {result['git']}. "
        f"Inputs: bench-predict ({result['inputs']['predict']}), bench-restore "
        f"({result['inputs']['restore']}), bench-dedup ({result['inputs']['dedup']}).",
        "",
        "Model (`bench/fleet.py`, deterministic; the seed only draws measured residuals): "
        f"the {validation['gets']} layer GETs of bench-predict's `{OURS}` run at their "
        "measured send times, each served as it was measured: from stored bytes (buffer, "
        "spool, intact copy) or by an on-demand restore (`restore`, `inflight`). A stored "
        f"GET costs a fit to the measured ones ({costs['stored']['fixed_ms']} ms + MB at "
        f"{costs['stored']['mb_per_s']} MB/s, plus a measured residual); Distribution's GET "
        f"likewise from its own run ({costs['distribution']['fixed_ms']} ms + MB at "
        f"{costs['distribution']['mb_per_s']} MB/s). A restore: a setup (recipe, checkpoints, "
        "file locations), then the layer's segments as the registry places them: the first "
        f"of at most {FIRST_SEGMENT_TAR_BYTES >> 20} MiB of tar, the others at the checkpoint "
        f"spacing (tar = {TAR_PER_BLOB}x the gzip bytes, as the replay's layers), each a FIFO "
        "job on the core of the fleet that frees first: one S3 read of its files, then CPU per MB "
        f"of tar measured by bench-restore for zlib 6: encode "
        f"{costs['encode_cpu_s_per_tar_mb'] * 1000:.1f} ms, tar rebuild "
        f"{costs['rebuild_cpu_s_per_tar_mb'] * 1000:.1f} ms, a parallel restore's priming, "
        f"joining and verifying {costs['extra_cpu_s_per_tar_mb'] * 1000:.1f} ms. A segment "
        "restored on another host than the one serving the GET (GETs of a layer go to one "
        "host, by digest) adds the network's round trip and its compressed bytes. Verified "
        "segments stream in order at the stored path's rate; latency is to the last byte, "
        "as bench-predict measures it. GETs of a layer whose restore is running follow it.",
        "",
        "### Validation: 2 cores, one host, against the measured run",
        "",
        validation_table(validation),
        "",
        f"The registry's CPU beside restores over the replay ({costs['other_cpu_share']:.1%} "
        "of each core, its own counters) is taken from the 2 cores; with idle cores instead "
        "the model gives p50/p90/p99 "
        + "/".join(ms(idle["table"]["duphunter"]["model"][q]) for q in QUANTILES)
        + " ms. Not modelled: the S3 server and the replaying clients on the same cores, "
        f"and the {cpu['preconstructions']:.0f} preconstructions of the run (restores nobody "
        "waited for). Restore CPU: "
        f"the model's {cpu['model_restores']} on-demand restores take {cpu['model_on_demand']} "
        f"CPU-s, {per_model:.3f} each; the registry "
        f"counted {cpu['measured_all']} CPU-s for {cpu['measured_restores']:.0f} restores "
        "(preconstructions included), "
        f"{cpu['measured_all'] / cpu['measured_restores']:.3f} each: bench-restore's CPU "
        f"rates charge {charged} per restore than the registry counted on these layers. "
        + validation_text(validation)
        + " A second check: "
        "the issue's held-out replay of real-sized layers (about 22 MB) measured "
        "0.94/29/49x Distribution's p50/p90/p99; the 2-core row of `real-sized, loopback` "
        "below is the model's figure for it.",
        "",
        "### Sweep",
        "",
        "Scenarios: `replay as measured` (its layers as measured); `real-sized`: the same GETs "
        f"with every layer scaled to a mean of {result['layer_mb']:.0f} MB (a buffer of 10% of "
        "the unique bytes, byte-sized replicas and the time-kept spool make the same choices "
        "when all sizes scale alike, so the measured paths carry over). Networks: "
        + "; ".join(network_text(part["network"]) for part in unique_networks(result))
        + ". Restore cores are dedicated (no other CPU on them). Hosts of 8 cores; "
        "`segments on` fleet: a layer's segments run anywhere, host: only on the host "
        "serving the GET. Every host count and the hosts of 16 are in the JSON.",
        "",
    ]
    for name, part in result["sweeps"].items():
        lines += [f"**{name}** (mean layer {part['mean_layer_mb']} MB"]
        if part["spacing_bytes"]:
            lines[-1] += f", segments of {part['spacing_bytes'] >> 20} MiB of tar"
        lines[-1] += (
            f"; restores alone would keep {part['restore_demand_cores']} cores busy on "
            f"average). Fewest cores at Distribution's p50/p90/p99: "
            f"{crossing_text(part['match'])}; at bench-predict's targets "
            f"(1.1/1.5/3.0x): {crossing_text(part['issue_targets'])}. A cold GET of the "
            f"median restoring layer ({part['lower_bound']['blob_mb']} MB) with unlimited "
            f"cores: {ms(part['lower_bound']['cold_get_s'])} ms."
        )
        lines += ["", sweep_table(shown_rows(part["rows"])), ""]
    lines += [
        "### What it says",
        "",
        *findings(result),
        "",
        "### Cost",
        "",
        f"Assumptions: a restore core at ${prices['core_hour_usd']}/core-hour (AWS "
        "c7i.2xlarge on demand, us-east-1: $0.357/h for 8 vCPU), "
        f"{HOURS_PER_MONTH} h a month; storage at ${prices['s3_gb_month_usd']}/GB-month "
        "(S3 Standard, us-east-1); a registry of 100 TB of pushed layer bytes; the share "
        "deduplication saves: "
        + ", ".join(f"{share:.1%} ({name})" for name, share in result["savings"].items())
        + ". The break-even registry is the size whose saved storage pays for the fleet. "
        "The fleets are sized for this replay's rate of restores; a registry with R times "
        "as many restoring GETs needs about R times the cores that queueing takes, not the "
        "cores one restore spreads over.",
        "",
        cost_table(result["cost"], result["savings"]),
        "",
        "Raw data: `docs/bench/fleet.json`.",
    ]
    return "\n".join(lines)


def validation_text(validation: dict[str, Any]) -> str:
    """What the validation shows, read off its own figures."""
    ours = validation["table"]["duphunter"]["model / measured"]
    restoring = validation["table"]["duphunter restoring GETs"]["model / measured"]
    text = (
        "Model / measured p50/p90/p99: "
        + "/".join(f"{ours[q]:.2f}" for q in QUANTILES)
        + " of all GETs, "
        + "/".join(f"{restoring[q]:.2f}" for q in QUANTILES)
        + " of the restoring ones: "
    )
    if all(0.9 <= ours[q] <= 1.1 for q in QUANTILES):
        return text + "the latencies validate to within 10%."
    low = [q for q in QUANTILES if ours[q] < 0.9]
    return text + (
        f"the model is short at {', '.join(low)}. It serves the segments of concurrent "
        "restores first come first served, so the earlier restore ends first; it leaves "
        "out what else ran on the same 2 cores (the S3 server, the clients)."
        if low
        else "the model is long at the tail."
    )


def tails_headline(reached: dict[str, list[int]]) -> str:
    """What reaches Distribution's p90 and p99 (the fewest cores of any scenario), and
    what never does."""
    if not any(reached.values()):
        return "**p90 and p99 never reach 1.0x, at any fleet size.**"
    parts = [f"{q} reaches 1.0x from {min(found)} cores" for q, found in reached.items() if found]
    never = [q for q, found in reached.items() if not found]
    if never:
        parts.append(f"{' and '.join(never)} never {'does' if len(never) == 1 else 'do'}")
    return "**" + "; ".join(parts) + ".**"


def findings(result: dict[str, Any]) -> list[str]:
    """The sweep's lessons, each read off this run's figures."""
    validation = result["validation"]
    measured = validation["table"]
    as_measured_scenario, real_scenario = SCENARIOS[0].name, SCENARIOS[1].name
    as_measured = result["sweeps"][as_measured_scenario]["rows"]
    real = result["sweeps"][real_scenario]["rows"]
    two = next(row for row in as_measured if row["cores"] == 2)
    many = [row["ratio"]["p50"] for row in as_measured if row["cores"] >= 8]
    run_p50 = measured["duphunter"]["measured"]["p50"] / measured["distribution"]["measured"]["p50"]
    fleet_floor = max((row for row in real if row["spread"] == "fleet"), key=lambda r: r["cores"])
    host_floor = min(
        (row for row in real if row["spread"] == "host" and row["host_cores"] == 8),
        key=lambda row: row["ratio"]["p90"],
    )
    reached = {
        q: [part["match"][q] for part in result["sweeps"].values() if part["match"][q]]
        for q in ("p90", "p99")
    }
    tails = tails_headline(reached)
    ratio = fleet_floor["ratio"]
    return [
        f"- **p50 follows the stored path, p90 and p99 the restores.** On the replay of "
        f"{result['inputs']['predict'].split(' ')[0]} ({validation['restoring_gets']} of its "
        f"{validation['gets']} GETs restored or followed a restore) the model's p50 is "
        f"{two['ratio']['p50']:.2f}x Distribution's on 2 cores and {min(many):.2f}-"
        f"{max(many):.2f}x from 8 cores on (the run measured {run_p50:.2f}x).",
        f"- {tails} A restoring GET streams the same bytes at the same rate as a stored one, "
        "after a setup and its first segment: its least latency, with unlimited cores, is a "
        "stored GET plus one segment's fetch and CPU. Distribution's p90 is one stored read. "
        "Only serving 90% (99%) of GETs from stored bytes moves p90 (p99) to 1.0x: "
        "prediction and the buffer, not cores.",
        f"- **Cores help until each restore has a core per segment**, then nothing: a "
        f"{result['layer_mb']:.0f} MB layer is {result['segments_of_a_layer']} segments, and "
        f"with {fleet_floor['cores']} cores spread over hosts p90 is {ratio['p90']:.2f}x and "
        f"p99 {ratio['p99']:.2f}x Distribution's ({real_scenario}). Segments must "
        "spread over hosts: restricted to the serving host's 8 cores, the best is "
        f"{host_floor['ratio']['p90']:.2f}x and {host_floor['ratio']['p99']:.2f}x.",
        "- **Validation at 2 cores**: " + validation_text(validation),
    ]


def network_text(network: dict[str, Any]) -> str:
    return (
        f"{network['name']}: restore setup {network['restore_setup_s'] * 1000:.0f} ms, S3 "
        f"first byte {network['s3_rtt_s'] * 1000:.1f} ms at {network['s3_mb_per_s']:.0f} MB/s, "
        f"hosts {network['net_rtt_s'] * 1000:.1f} ms apart at {network['net_mb_per_s']:.0f} "
        f"MB/s, {network['added_first_byte_s'] * 1000:.0f} ms added to every stored GET "
        "(ours and Distribution's)"
    )


def unique_networks(result: dict[str, Any]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for part in result["sweeps"].values():
        seen.setdefault(part["network"]["name"], part)
    return list(seen.values())


def crossing_text(found: dict[str, int | None]) -> str:
    return "/".join("never" if value is None else str(value) for value in found.values())


def shown_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        row for row in rows if row["host_cores"] == 8 or (row["hosts"] == 1 and row["cores"] < 8)
    ]


if __name__ == "__main__":
    main()
