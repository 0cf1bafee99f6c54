"""bench-predict: synthetic pull workloads replayed at real time against DupHunter with
each predictor, an oracle, and Distribution 2.8.2, side by side on the same S3.

Usage::

    python -m bench.predict [--duration-s 120] [--clients 24] [--seed 11]
                            [--workloads present,periodic] [--layer-mb 20]
                            [--configs distribution,s/none,...] [--ingest-each] [--no-docs]
    python -m bench.predict --offline        # the simulation only: seconds, no stack

Workloads: `present`, the random clients below; `periodic`, the same over 240 s
(`--periodic-duration-s`) with clients that pull on a schedule added (4 CI runners pulling
one tag from an empty store every 40-80 s, 6 fleet nodes pulling the newest tag every
60 s; bench.predict_offline.with_periodic_clients): the periods of CI runners (5-15 min)
and nodes (10 min) scaled to the replay. The periodic workload runs every configuration
but `s/oracle` and `b0/history`. Layers are of real size by default (`--layer-mb`, the
median compressed size: 20 MB, lognormal, at most 4x that; `--layer-mb 2` gives the
~6.5 MB tars of the runs before).

`--offline` runs bench.predict_offline's simulation of every predictor on the two
workloads, on a periodic workload at real time scale (6 hours, CI runners every 5-15
min, nodes every 10 min) and on the IBM trace samples, and writes its section.

One Redis and one SeaweedFS S3 server serve every registry (a Redis database and a bucket
each). The workload's layers (real gzip tars, zlib level 6, which DupHunter reproduces) are
pushed once per DupHunter mode into a template bucket and ingested there; every DupHunter
run then starts from a server-side copy of its mode's template, its Redis index rebuilt
from S3 by `duphunter reindex`, with no access history: the same deduplicated store for
every predictor, and two ingests instead of five (`--ingest-each` pushes and ingests
for every run instead). Distribution gets the same images pushed by the same code.

Runs, one after the other (never two at once: they share 2 cores):

- `distribution`: Distribution 2.8.2, S3 driver, redirects off (it proxies blob bytes);
- `s/none`, `s/paper`, `s/history`, `s/period`: DUPHUNTER_MODE=s with DUPHUNTER_PREDICTOR
  none, paper, history (the default), period;
- `s/oracle`: predictor none, and the replayer posts to `/api/v1/jobs/preconstruct`, at
  each manifest GET, exactly the layers the client is about to GET;
- `b0/history`: DUPHUNTER_MODE=b0, for the storage comparison.

Every run: DUPHUNTER_BUFFER_BYTES = 10% of the unique layer bytes and DUPHUNTER_HOT_BYTES
(the S-mode's intact replicas) = 8%, so that buffer and replicas together stay within the
target of 1.15x b0's stored bytes (b0 holds a buffer too); the replay waits until
ingestion is done, replays at real time, then waits for the registry's background work
before its counters and the bucket size are read. Other DUPHUNTER_* variables of the
environment reach every DupHunter run.

Results: a table on stdout, `docs/bench/predict.json`, and the section
`## bench-predict: …` in `docs/benchmarks.md` with a latency CDF plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from minio import Minio
from minio.commonconfig import CopySource

from api.replay.cli import replay
from api.replay.content import BuiltLayer, LayerCache
from api.replay.progress import Status
from api.replay.push import build_layers, push_workload, wait_for_quiet
from api.replay.report import latency_series, plot_cdf
from api.replay.runner import ReplayOptions
from api.replay.synthetic import MB, SyntheticSpec, generate
from api.replay.trace import TraceOptions, load_trace
from api.replay.transport import Connection
from api.replay.workload import Workload
from bench.core import ACCESS, PEER_BUCKET, SECRET, stack_cpu_seconds, start_distribution, versions
from bench.predict_offline import (
    PeriodicSpec,
    SimParams,
    offline_table,
    periods_found,
    simulate,
    with_periodic_clients,
)
from bench.report import REPO_ROOT, git_state, machine, save_json, write_section
from deploy.stack import Stack, free_port

SECTION = "## bench-predict: prediction, buffer and popularity against Distribution 2.8.2"
OUT_DIR = REPO_ROOT / "build" / "bench" / "predict"
PLOT = REPO_ROOT / "docs" / "img" / "bench-predict.png"
BUFFER_SHARE = 0.10
HOT_SHARE = 0.08
RETIRE_GRACE_S = 1
OURS = "s/history"  # the configuration the targets are for
LATENCY_TARGETS = {"p50": 1.1, "p90": 1.5, "p99": 3.0}
HIT_TARGET, WASTED_TARGET, STORAGE_TARGET = 0.95, 0.20, 1.15
SPOOL_KEEP_S = 30.0  # the registry's default DUPHUNTER_RESTORE_KEEP_SECONDS
GET_COLUMNS = ["at", "client", "repository", "digest", "kind", "status", "bytes", "seconds"]
GET_COLUMNS += ["ttfb_s", "source", "verified", "error"]


@dataclass(frozen=True)
class Config:
    name: str
    mode: str | None = None  # None: Distribution
    predictor: str = "none"
    oracle: bool = False


CONFIGS = [
    Config("distribution"),
    Config("s/none", "s", "none"),
    Config("s/paper", "s", "paper"),
    Config("s/history", "s", "history"),
    Config("s/period", "s", "period"),
    Config("s/oracle", "s", "none", oracle=True),
    Config("b0/history", "b0", "history"),
]


def workload_spec(args: argparse.Namespace) -> SyntheticSpec:
    """The default: 24 clients, 6 repositories of 3 layers (one base layer, shared by
    about half of them), a new tag per repository every ~60 s, ~130 pulls in 120 s;
    29 layers; ~180 layer GETs. `--layer-mb 2` gives the layers of the runs before
    (56 MB, ~6.5 MB of tar each)."""
    return SyntheticSpec(
        seed=args.seed,
        duration_s=args.duration_s,
        clients=args.clients,
        repositories=6,
        layers_per_image=3,
        base_layers=1,
        base_images=2,
        sharing=0.5,
        layer_mb=args.layer_mb,
        layer_sigma=0.6,
        max_layer_bytes=int(args.layer_mb * 4 * MB),
        pull_once_share=0.5,
        repull=(0.0, 0.4),
        mean_interval_s=20.0,
        new_tag_interval_s=60.0,
    )


BENCH_PERIODIC = PeriodicSpec(
    ci_runners=4, ci_period_s=(40.0, 80.0), nodes=6, node_period_s=60.0, jitter=0.1
)  # the periods of CI runners (5-15 min) and nodes (10 min), scaled to a 4-minute replay
REAL_PERIODIC = PeriodicSpec()  # 5-15 min, 10 min
WORKLOADS = ("present", "periodic")
PERIODIC_SKIPS = ("s/oracle", "b0/history")  # their question is the present workload's


def make_workload(name: str, args: argparse.Namespace) -> Workload:
    if name == "present":
        return generate(workload_spec(args))
    spec = dataclasses.replace(workload_spec(args), duration_s=args.periodic_duration_s)
    return with_periodic_clients(generate(spec), BENCH_PERIODIC)


# --- services -----------------------------------------------------------------------------


@dataclass
class Shared:
    """Redis and S3, used by every registry of the run."""

    stack: Stack
    redis_port: int
    s3: str
    minio: Minio
    workdir: Path
    databases: int = 0

    def next_database(self) -> int:
        """A Redis database of its own for the next registry (1-15 in turn: a run's is
        no longer needed once it ended), emptied."""
        self.databases = self.databases % 15 + 1
        redis.Redis(port=self.redis_port, db=self.databases).flushdb()
        return self.databases


def start_shared(workdir: Path) -> Shared:
    shutil.rmtree(workdir, ignore_errors=True)
    stack = Stack(workdir / "shared")
    try:
        port = free_port()
        stack.start_redis(port)
        s3 = stack.start_s3(free_port(10000), ACCESS, SECRET, PEER_BUCKET)
    except BaseException:
        stack.stop()
        raise
    minio = Minio(s3, access_key=ACCESS, secret_key=SECRET, secure=False)
    return Shared(stack, port, s3, minio, workdir)


def duphunter_env(
    shared: Shared, name: str, mode: str, predictor: str, buffer: int
) -> dict[str, str]:
    bucket = "dh-" + name.replace("/", "-")
    if not shared.minio.bucket_exists(bucket):
        shared.minio.make_bucket(bucket)
    return {
        "DUPHUNTER_REDIS_URL": f"redis://127.0.0.1:{shared.redis_port}/{shared.next_database()}",
        "DUPHUNTER_S3_ENDPOINT": shared.s3,
        "DUPHUNTER_S3_ACCESS_KEY": ACCESS,
        "DUPHUNTER_S3_SECRET_KEY": SECRET,
        "DUPHUNTER_S3_BUCKET": bucket,
        "DUPHUNTER_LISTEN": f"127.0.0.1:{free_port()}",
        "DUPHUNTER_SPOOL_DIR": str(shared.workdir / name.replace("/", "-") / "spool"),
        "DUPHUNTER_MODE": mode,
        "DUPHUNTER_PREDICTOR": predictor,
        "DUPHUNTER_BUFFER_BYTES": str(buffer),
        "DUPHUNTER_HOT_BYTES": str(int(buffer * HOT_SHARE / BUFFER_SHARE)),
        "DUPHUNTER_RETIRE_GRACE_SECONDS": str(RETIRE_GRACE_S),
    }


@contextmanager
def duphunter(shared: Shared, name: str, env: dict[str, str], reindex: bool) -> Iterator[Stack]:
    """A DupHunter (2 API processes and its workers) on the shared Redis and S3."""
    with Stack(shared.workdir / name.replace("/", "-")) as stack:
        stack.env.update(env)
        if reindex:  # the index of a copied bucket, rebuilt from S3 before anything starts
            rebuild = (
                "from pipelines.registry.facade import Registry; Registry.connect().rebuild_index()"
            )
            done = subprocess.run(
                [sys.executable, "-c", rebuild],
                cwd=REPO_ROOT,
                env=stack.env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"index rebuild failed: {done.stderr[-2000:]}")
        stack.start_workers()
        stack.start_api(env["DUPHUNTER_LISTEN"], processes=2)
        yield stack


def bucket_bytes(minio: Minio, bucket: str) -> dict[str, int]:
    """Bytes stored in a bucket, in total and by top-level prefix."""
    sizes: dict[str, int] = {"total": 0}
    for item in minio.list_objects(bucket, recursive=True):
        name, size = str(item.object_name), int(item.size or 0)
        prefix = name.split("/", 1)[0]
        sizes[prefix] = sizes.get(prefix, 0) + size
        sizes["total"] += size
    return sizes


def copy_bucket(minio: Minio, source: str, target: str) -> int:
    """Server-side copy of every object but the buffer's (a cache)."""
    copied = 0
    for item in minio.list_objects(source, recursive=True):
        name = str(item.object_name)
        if not name.startswith("buffer/"):
            minio.copy_object(target, name, CopySource(source, name))
            copied += 1
    return copied


# --- runs ---------------------------------------------------------------------------------


@dataclass
class Plan:
    workload: Workload
    layers: dict[str, BuiltLayer]
    cache: Path
    buffer_bytes: int
    options: ReplayOptions


def template_key(workload: Workload, mode: str) -> str:
    """Workloads with the same images share their templates: `mode` and a digest of the
    images' layer specifications."""
    images = sorted((key, [workload.layers[layer] for layer in image.layers])
                    for key, image in workload.images.items())  # fmt: skip
    return f"{mode} {hashlib.sha256(repr(images).encode()).hexdigest()[:12]}"


def make_template(shared: Shared, plan: Plan, mode: str, number: int) -> dict[str, Any]:
    """Push the workload into DupHunter in `mode` and let it ingest every layer."""
    name = f"template{number}-{mode}"
    env = duphunter_env(shared, name, mode, "none", plan.buffer_bytes)
    status = Status()
    started = time.monotonic()
    with duphunter(shared, name, env, reindex=False):
        connection = Connection("http://" + env["DUPHUNTER_LISTEN"])
        pushed = push_workload(connection, plan.workload, plan.layers, status)
        ingest_s = wait_for_quiet(connection, 3600, status)
        time.sleep(RETIRE_GRACE_S + 4)  # intact copies retired after the grace delay
        wait_for_quiet(connection, 600, status)
        stats = connection.stats() or {}
    return {
        "bucket": env["DUPHUNTER_S3_BUCKET"],
        "push_s": round(pushed.seconds, 1),
        "ingest_s": round(ingest_s, 1),
        "total_s": round(time.monotonic() - started, 1),
        "layers": stats.get("layers"),
        "stored": bucket_bytes(shared.minio, env["DUPHUNTER_S3_BUCKET"]),
    }


def run_duphunter(
    shared: Shared, plan: Plan, config: Config, template: dict[str, Any] | None
) -> dict[str, Any]:
    assert config.mode is not None
    env = duphunter_env(shared, config.name, config.mode, config.predictor, plan.buffer_bytes)
    if template is not None:
        copy_bucket(shared.minio, template["bucket"], env["DUPHUNTER_S3_BUCKET"])
    options = dataclasses.replace(plan.options, oracle=config.oracle)
    with duphunter(shared, config.name, env, reindex=template is not None) as stack:
        url = "http://" + env["DUPHUNTER_LISTEN"]
        if template is None:  # --ingest-each: push and ingest outside the CPU measured
            connection = Connection(url)
            push_workload(connection, plan.workload, plan.layers, Status())
            wait_for_quiet(connection, 3600, Status())
        cpu = stack_cpu_seconds(stack)
        summary = replay(url, plan.workload, options, plan.cache, push=False)
        summary["registry_cpu_s"] = round(stack_cpu_seconds(stack) - cpu, 1)
    summary["stored"] = bucket_bytes(shared.minio, env["DUPHUNTER_S3_BUCKET"])
    summary["env"] = {k: v for k, v in env.items() if k.startswith("DUPHUNTER_") and "KEY" not in k}
    return summary


def run_distribution(shared: Shared, plan: Plan, workload: str) -> dict[str, Any]:
    if not shared.minio.bucket_exists(PEER_BUCKET):
        shared.minio.make_bucket(PEER_BUCKET)
    with Stack(shared.workdir / f"distribution-{workload}") as stack:
        peer = start_distribution(stack, shared.s3, "distribution", "/proxy", redirect=False)
        cpu = stack_cpu_seconds(stack)
        summary = replay(f"http://{peer.hostport}", plan.workload, plan.options, plan.cache)
        summary["registry_cpu_s"] = round(stack_cpu_seconds(stack) - cpu, 1)
    summary["stored"] = bucket_bytes(shared.minio, PEER_BUCKET)
    return summary


def run_configs(
    args: argparse.Namespace,
    plan: Plan,
    configs: list[Config],
    shared: Shared,
    templates: dict[str, Any],
    workload: str,
) -> dict[str, Any]:
    """Every configuration on one workload, one after the other; the templates (one per
    mode) serve every workload: they hold the same images."""
    runs: dict[str, Any] = {}
    for config in configs:
        print(f"\n=== {workload}: {config.name}", flush=True)
        started = time.monotonic()
        if config.mode is None:
            runs[config.name] = run_distribution(shared, plan, workload)
        else:
            template = None
            if not args.ingest_each:
                key = template_key(plan.workload, config.mode)
                if key not in templates:
                    print(f"--- template: the workload pushed and ingested in mode {config.mode}")
                    templates[key] = make_template(shared, plan, config.mode, len(templates))
                template = templates[key]
            named = dataclasses.replace(config, name=f"{workload}/{config.name}")
            runs[config.name] = run_duphunter(shared, plan, named, template)
        runs[config.name]["run_s"] = round(time.monotonic() - started, 1)
        print(render_run(config.name, runs[config.name]), flush=True)
    return runs


# --- results ------------------------------------------------------------------------------


def compact_gets(summary: dict[str, Any]) -> None:
    """Every GET as one row (GET_COLUMNS), to keep the raw JSON small."""
    summary["gets"] = [[get[column] for column in GET_COLUMNS] for get in summary["gets"]]


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or not theirs:
        return None
    return round(ours / theirs, 3)


def targets(runs: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, for `s/history`, each met or missed (None: not measurable)."""
    ours, peer, b0 = runs.get(OURS), runs.get("distribution"), runs.get("b0/history")
    if ours is None:
        return []
    rows = []
    for name, limit in LATENCY_TARGETS.items():
        value = None
        if peer is not None:
            value = ratio(
                ours["layer_gets"]["latency"].get(name), peer["layer_gets"]["latency"].get(name)
            )
        rows.append(target_row(f"layer GET {name} / Distribution's", value, "<=", limit))
    rows.append(
        target_row(
            "GETs of dedup layers without an on-demand restore",
            ours["hit_ratio"]["ratio"],
            ">=",
            HIT_TARGET,
        )
    )
    rows.append(
        target_row(
            "preconstructions wasted", ours["registry"].get("wasted_share"), "<=", WASTED_TARGET
        )
    )
    stored = ratio(ours["stored"]["total"], b0["stored"]["total"]) if b0 else None
    rows.append(target_row("stored bytes (buffer included) / b0's", stored, "<=", STORAGE_TARGET))
    return rows


def target_row(name: str, value: float | None, sense: str, limit: float) -> dict[str, Any]:
    met = None if value is None else (value <= limit if sense == "<=" else value >= limit)
    return {"target": name, "value": value, "limit": f"{sense} {limit}", "met": met}


def cell(value: Any, digits: int = 0, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def runs_table(runs: dict[str, Any]) -> str:
    peer = runs.get("distribution")
    header = "| registry | layer GETs | p50 ms | p90 ms | p99 ms | max ms | ratio p50/p90/p99 "
    header += "| served by (GETs) | hit ratio | preconstructions (wasted) | restore CPU s "
    header += "| registry CPU s | stored MB | errors |"
    lines = [header, "|---|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|"]
    for name, run in runs.items():
        lat, reg = run["layer_gets"]["latency"], run["registry"]
        ratios = "/".join(
            cell(ratio(lat.get(q), peer["layer_gets"]["latency"].get(q)) if peer else None, 2)
            for q in ("p50", "p90", "p99")
        )
        paths = ", ".join(
            f"{s} {part['count']}" for s, part in run["layer_gets"]["by_source"].items()
        )
        pre = f"{cell(reg.get('preconstructions'))} ({cell(reg.get('preconstructions_wasted'))})"
        lines.append(
            f"| {name} | {run['layer_gets']['count']} | {cell(lat.get('p50'), 0, 1000)} "
            f"| {cell(lat.get('p90'), 0, 1000)} | {cell(lat.get('p99'), 0, 1000)} "
            f"| {cell(lat.get('max'), 0, 1000)} | {ratios} | {paths} "
            f"| {cell(run['hit_ratio']['ratio'], 3)} | {pre} "
            f"| {cell(reg.get('restore_cpu_seconds'), 1)} | {run['registry_cpu_s']:.1f} "
            f"| {run['stored']['total'] / 1e6:.1f} | {run['errors']['count']} |"
        )
    return "\n".join(lines)


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target (`s/history`) | measured | limit | |", "|---|--:|--:|---|"]
    if not rows:
        lines.append("| (no `s/history` run) | | | |")
    for row in rows:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[row["met"]]
        lines.append(f"| {row['target']} | {cell(row['value'], 3)} | {row['limit']} | {verdict} |")
    return "\n".join(lines)


def run_notes(runs: dict[str, Any]) -> list[str]:
    """A failed oracle is no oracle, and a registry that ignores DUPHUNTER_MODE and
    DUPHUNTER_PREDICTOR runs one configuration under many names: say so by the table."""
    notes = []
    for name, run in runs.items():
        if "env" not in run:
            continue
        asked = {k: run["env"].get(f"DUPHUNTER_{k.upper()}") for k in ("mode", "predictor")}
        said = run.get("registry_settings", {})
        if said != asked:
            notes += [
                f"Note: `{name}` asked for {asked}; the registry reports {said or 'neither'}.",
                "",
            ]
    for name, run in runs.items():
        oracle = run.get("oracle") or {}
        if oracle.get("errors"):
            notes += [
                f"Note: in `{name}`, {len(oracle['errors'])} of {oracle['requests']} "
                f"preconstruct requests failed (first: `{oracle['errors'][0]}`), so that row "
                "is not an oracle's.",
                "",
            ]
    return notes


def render_run(name: str, run: dict[str, Any]) -> str:
    lat = run["layer_gets"]["latency"]
    return (
        f"{name}: {run['layer_gets']['count']} layer GETs, p50/p90/p99 "
        f"{cell(lat.get('p50'), 0, 1000)}/{cell(lat.get('p90'), 0, 1000)}/"
        f"{cell(lat.get('p99'), 0, 1000)} ms, hit ratio {cell(run['hit_ratio']['ratio'], 3)}, "
        f"{run['errors']['count']} errors, run {run.get('run_s', 0):.0f} s"
    )


def markdown(result: dict[str, Any]) -> str:
    templates = result["templates"]
    ingest = "; ".join(
        f"{key.split()[0]}: push {t['push_s']:.0f} s, ingest {t['ingest_s']:.0f} s, "
        f"layers {t['layers']}"
        for key, t in templates.items()
    )
    lines = [
        f"Run {result['date']} by `make bench-predict` (`{result['command']}`, total "
        f"{result['total_s'] / 60:.1f} min), code at {result['git']}.",
        "",
        "```",
        result["machine"],
        "```",
        "",
        f"Tools: {result['versions']}.",
        "",
        "Setup: " + SETUP_TEXT + (f" Templates: {ingest}." if templates else ""),
        "",
    ]
    for name, part in result["workloads"].items():
        lines += workload_markdown(name, part)
    lines += [
        "Latency = from sending a layer GET to its last byte, every byte hashed and checked. "
        'ratio = DupHunter / Distribution. "served by" = the `X-DupHunter-Source` header '
        "(`unknown`: none sent). hit ratio = layer GETs not served by an on-demand restore "
        "(every layer is deduplicated before the replay starts). Preconstructions, wasted and "
        "restore CPU: the registry's own counters over the replay (n/a: not reported). "
        "Registry CPU: its processes (API, workers; S3 and Redis excluded), over the replay "
        "and the waits around it. Stored: every object in the registry's bucket after the "
        "replay (buffer entries included when the buffer lives in S3).",
        "",
        "Raw data: `docs/bench/predict.json` (every GET of every run).",
        "",
    ]
    return "\n".join(lines)


def workload_markdown(name: str, part: dict[str, Any]) -> list[str]:
    work = part["workload"]
    periodic = work["parameters"].get("periodic")
    added = ""
    if periodic:
        added = (
            f" Added: {periodic['ci_runners']} CI runners, each pulling one tag from an empty "
            f"store every {periodic['ci_period_s'][0]:.0f}-{periodic['ci_period_s'][1]:.0f} s "
            f"(drawn per runner), and {periodic['nodes']} fleet nodes pulling the newest tag "
            f"of their repository every {periodic['node_period_s']:.0f} s, both "
            f"±{periodic['jitter']:.0%} per pull: the periods of CI runners (5-15 min) and "
            "nodes (10 min), scaled to the replay."
        )
    plot = plot_path(name)
    return [
        f"### Workload `{name}`",
        "",
        f"![bench-predict latency CDF, {name}](img/{plot.name})",
        "",
        f"Synthetic, seed {work['parameters']['seed']}: {work['clients']} clients "
        f"(of the random ones, half pull each tag once, half pull again and again with a "
        f"repull probability drawn in [0, 0.4]), {work['repositories']} repositories, "
        f"{work['images']} images, {work['layers']} layers, "
        f"{work['unique_layer_bytes'] / 1e6:.1f} MB of unique layers (gzip, zlib level 6; "
        f"median {work['parameters']['layer_mb']:.0f} MB), {work['pulls']} pulls "
        f"({work['fresh_pulls']} from an empty store) over "
        f"{work['parameters']['duration_s']:.0f} s, replayed at real time, each client from "
        f"its own loopback address, 3 layer GETs at a time.{added} "
        f"Buffer: {part['buffer_bytes'] / 1e6:.1f} MB (10% of the unique layer bytes); "
        f"intact replicas of hot layers (s): at most {HOT_SHARE:.0%} of them.",
        "",
        runs_table(part["runs"]),
        "",
        targets_table(part["targets"]),
        "",
        *bound_notes(part),
        *run_notes(part["runs"]),
    ]


def bound_notes(result: dict[str, Any]) -> list[str]:
    bounds = result.get("cache_bounds")
    if not bounds:
        return []
    return [
        "Bound on the hit ratio from this workload: with the whole replay known in advance, "
        "a cache filled by restores (Belady's MIN by bytes, beside the "
        f"{SPOOL_KEEP_S:.0f} s restore spool) serves {bounds['buffer']:.3f} of the layer GETs "
        f"in the buffer's bytes, {bounds['buffer_and_replicas']:.3f} in the buffer's and the "
        f"hot replicas' bytes, {bounds['unbounded']:.3f} with no bound (every first GET of a "
        "layer is a restore). Only a rebuild finished before its GET, that is a prediction "
        "made before the manifest GET, can do better. Rebuilding every layer of each tag "
        "as it is put, and keeping every layer, would serve at most "
        f"{bounds.get('tag_puts_unbounded', float('nan')):.3f}: the first GET of each layer "
        "tagged before the replay starts is still a restore.",
        "",
    ]


SETUP_TEXT = (
    "one Redis and one SeaweedFS S3 on loopback serve every registry (a database and a "
    "bucket each). Each DupHunter run (2 API processes, one worker per queue) starts from a "
    "server-side copy of a template bucket into which the workload was pushed and ingested "
    "in the same mode, its index rebuilt with `duphunter reindex` and no access history; "
    "Distribution 2.8.2 (S3 driver, redirects off, so it proxies blob bytes like DupHunter) "
    "gets the same pushes. Runs one after the other."
)


def demand_cache_bound(gets: list[tuple[float, str, int]], capacity: int, spool_s: float) -> float:
    """The share of layer GETs (time, digest, bytes; in time order) that a clairvoyant
    demand cache of `capacity` bytes could serve without a restore: Belady's MIN by
    bytes (a restored layer is kept only if it is needed again before what it would
    evict, and the one needed furthest away goes first), beside the restore spool that
    serves any GET within `spool_s` of the layer's last restore. Every first GET is a
    restore: no cache prefetches."""
    uses: dict[str, list[int]] = {}
    for position, (_, digest, _) in enumerate(gets):
        uses.setdefault(digest, []).append(position)
    cached: dict[str, int] = {}
    restored_at: dict[str, float] = {}
    hits = 0

    def next_use(layer: str, after: int) -> int:
        return next((p for p in uses[layer] if p > after), len(gets))

    for position, (at, digest, size) in enumerate(gets):
        if digest in cached or at - restored_at.get(digest, -spool_s - 1) <= spool_s:
            hits += 1
            continue
        restored_at[digest] = at
        wanted, free, victims = next_use(digest, position), capacity - sum(cached.values()), []
        ahead = {layer: next_use(layer, position) for layer in cached}
        for layer in sorted(cached, key=ahead.__getitem__, reverse=True):
            if free >= size or ahead[layer] <= wanted:
                break
            victims.append(layer)
            free += cached[layer]
        if free >= size and wanted < len(gets):
            for layer in victims:
                del cached[layer]
            cached[digest] = size
    return hits / len(gets) if gets else 0.0


def tag_put_bound(gets: list[tuple[float, str, int]], tagged_at_start: set[str]) -> float:
    """The share of layer GETs that a registry rebuilding every layer of a tag as it is put
    (and keeping everything) could serve without a restore: all but the first GET of each
    layer of the images tagged before the replay started."""
    firsts = {digest for _, digest, _ in gets if digest in tagged_at_start}
    return 1 - len(firsts) / len(gets) if gets else 0.0


def layers_tagged_at_start(plan: Plan) -> set[str]:
    later = plan.workload.tagged_later()
    return {
        plan.layers[key].digest
        for (repository, tag), image in plan.workload.images.items()
        if (repository, tag) not in later
        for key in image.layers
    }


def cache_bounds(
    runs: dict[str, Any], buffer_bytes: int, tagged_at_start: set[str]
) -> dict[str, float]:
    """demand_cache_bound on the replay's layer GETs (Distribution's run: the workload's
    order, untouched by any DupHunter), for the buffer, the buffer and the hot replicas,
    and no bound at all; and tag_put_bound."""
    run = runs.get("distribution") or runs.get(OURS) or {}
    rows = [dict(zip(GET_COLUMNS, get, strict=True)) for get in run.get("gets", [])]
    layers = [row for row in rows if row["kind"] == "layer"]
    gets = sorted((row["at"], row["digest"], row["bytes"]) for row in layers)
    replicas = int(buffer_bytes * HOT_SHARE / BUFFER_SHARE)
    capacities = {"buffer": buffer_bytes, "buffer_and_replicas": buffer_bytes + replicas}
    bounds = {
        name: demand_cache_bound(gets, size, SPOOL_KEEP_S) for name, size in capacities.items()
    }
    bounds["unbounded"] = demand_cache_bound(gets, 1 << 62, SPOOL_KEEP_S)
    bounds["tag_puts_unbounded"] = tag_put_bound(gets, tagged_at_start)
    return bounds


def plot_path(workload: str) -> Path:
    return PLOT if workload == "present" else PLOT.with_name(f"{PLOT.stem}-{workload}.png")


def write_docs(result: dict[str, Any]) -> None:
    for name, part in result["workloads"].items():
        series = {config: run_latencies(run) for config, run in part["runs"].items()}
        plot_cdf(plot_path(name), series, f"layer GET latency, workload {name}, by registry")
    write_section(SECTION, markdown(result), result["machine"])


def run_latencies(run: dict[str, Any]) -> list[float]:
    rows = [dict(zip(GET_COLUMNS, get, strict=True)) for get in run["gets"]]
    return latency_series(rows)["all"] if rows else []


# --- main ---------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    names = args.configs.split(",")
    unknown = set(names) - {config.name for config in CONFIGS}
    unknown_workloads = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown or unknown_workloads:
        raise SystemExit(f"unknown: {', '.join(sorted(unknown | unknown_workloads))}")
    configs = [config for config in CONFIGS if config.name in names]
    shared = start_shared(OUT_DIR / "stack")
    templates: dict[str, Any] = {}
    workloads = {}
    with shared.stack:
        for name in args.workloads.split(","):
            workloads[name] = bench_workload(args, name, configs, shared, templates)
    shutil.rmtree(shared.workdir / "shared" / "s3", ignore_errors=True)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench.predict", *sys.argv[1:]]),
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
        "templates": templates,
        "workloads": workloads,
        "get_columns": GET_COLUMNS,
        "total_s": round(time.perf_counter() - started, 1),
    }


def bench_workload(
    args: argparse.Namespace,
    name: str,
    configs: list[Config],
    shared: Shared,
    templates: dict[str, Any],
) -> dict[str, Any]:
    workload = make_workload(name, args)
    cache = OUT_DIR / "layers"
    layers = build_layers(workload, LayerCache(cache), Status())
    unique = sum(layer.size for layer in {b.digest: b for b in layers.values()}.values())
    buffer_bytes = int(unique * BUFFER_SHARE)
    plan = Plan(workload, layers, cache, buffer_bytes, ReplayOptions(max_clients=16, downloads=3))
    if name != "present":
        configs = [config for config in configs if config.name not in PERIODIC_SKIPS]
    runs = run_configs(args, plan, configs, shared, templates, name)
    for run in runs.values():
        compact_gets(run)
    return {
        "workload": workload.summary() | {"unique_layer_bytes": unique},
        "buffer_bytes": buffer_bytes,
        "runs": runs,
        "targets": targets(runs),
        "cache_bounds": cache_bounds(runs, buffer_bytes, layers_tagged_at_start(plan)),
    }


OFFLINE_SECTION = "## bench-predict offline: lead time of the predictions, simulated"
IBM_SAMPLES = Path("/work/shared/data/ibm-registry-trace-samples.json")


def real_scale_spec(args: argparse.Namespace) -> SyntheticSpec:
    """The random clients of `workload_spec` at a real time scale: six hours, a pull every
    ~10 min per always-pull client, a new tag per repository every ~hour."""
    return dataclasses.replace(
        workload_spec(args), duration_s=6 * 3600.0, mean_interval_s=600.0,
        new_tag_interval_s=3600.0,
    )  # fmt: skip


def offline_workloads(args: argparse.Namespace) -> dict[str, Workload]:
    workloads = {name: make_workload(name, args) for name in WORKLOADS}
    workloads["periodic, real time scale"] = with_periodic_clients(
        generate(real_scale_spec(args)), REAL_PERIODIC
    )
    if IBM_SAMPLES.exists():
        workloads["IBM trace samples"] = load_trace([IBM_SAMPLES], TraceOptions())
    return workloads


def offline(args: argparse.Namespace) -> dict[str, Any]:
    """bench.predict_offline's simulation of every predictor on the offline workloads."""
    started = time.perf_counter()
    params = SimParams()
    workloads = offline_workloads(args)
    results = {name: simulate(workload, params) for name, workload in workloads.items()}
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench.predict", *sys.argv[1:]]),
        "git": git_state(),
        "params": dataclasses.asdict(params),
        "workloads": {name: workload.summary() for name, workload in workloads.items()},
        "periods": {name: periods_found(workload) for name, workload in workloads.items()},
        "results": results,
        "total_s": round(time.perf_counter() - started, 1),
    }
    print(offline_table(results))
    if not args.no_docs:
        save_json("predict-offline", result)
        write_section(OFFLINE_SECTION, offline_markdown(result), machine())
    return result


def offline_markdown(result: dict[str, Any]) -> str:
    params, periods = result["params"], result["periods"]
    found = "; ".join(
        f"{name}: {counts['with_a_period']} of {counts['pulled_twice_or_more']}"
        for name, counts in periods.items()
    )
    ibm = result["workloads"].get("IBM trace samples")
    ibm_note = []
    if ibm is not None:
        ibm_note = [
            f"The IBM trace samples (`{IBM_SAMPLES}`) hold {ibm['events']} usable requests "
            f"({ibm['pulls']} manifest GETs, {ibm['fetches']} lone blob GETs; "
            f"{'; '.join(ibm['notes']) or 'nothing skipped'}): their fields are a timestamp, "
            "the method, the URI (repository, manifest or blob, reference; hashed), the "
            "client address (hashed), the status and the bytes written. No client pulls "
            "one reference twice in them, so no period can be derived: every predictor "
            "predicts nearly nothing there. A period estimate needs at least "
            "PERIOD_MIN_INTERVALS + 1 pulls of one reference by one client; the full "
            "traces (days of requests per client) would show whether such clients exist.",
            "",
        ]
    return "\n".join(
        [
            f"Run {result['date']} by `python -m bench.predict --offline` "
            f"({result['total_s']:.1f} s, no stack), code at {result['git']}.",
            "",
            "Each predictor replayed in simulated time (`bench/predict_offline.py`, whose "
            "docstring states the model): a restore queue with one worker restoring "
            f"{params['restore_bytes_per_s'] / 1e6:.0f} MB/s, predictions queued "
            f"{params['event_delay_s']:.2f} s after their manifest GET, layer GETs "
            f"{params['get_delay_s']:.2f} s after it, the `period` plans fired by a scan every "
            f"{params['scan_s']:.0f} s, an LRU buffer of {params['buffer_share']:.0%} of the "
            f"unique layer bytes and a {params['spool_s']:.0f} s restore spool. Workloads: "
            "`present` and `periodic` are those `make bench-predict` replays (2 and 4 "
            "minutes, periods scaled to them); `periodic, real time scale` is six hours of the "
            "random clients (a pull every ~10 min, a new tag every ~hour) with 6 CI runners "
            "(every 5-15 min, from an empty store) and 8 fleet nodes (every 10 min), "
            "±10% per pull.",
            "",
            offline_table(result["results"]),
            "",
            "hits = rebuilt before the GET they were for (lead p50: how long before); late = "
            "the GET came first (the prediction reached the queue after it, or its rebuild "
            "ended after it); wasted = rebuilt and never used before eviction or the end; "
            "skipped = buffered already. hit ratio = layer GETs served from buffer or "
            f"spool. (client, repository, tag) with a period: {found}.",
            "",
            *ibm_note,
            "Raw data: `docs/bench/predict-offline.json`.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--duration-s", type=float, default=120.0, help="of the replay")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--layer-mb", type=float, default=20.0, help="median layer size, MB")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--periodic-duration-s", type=float, default=240.0)
    parser.add_argument("--configs", default=",".join(config.name for config in CONFIGS))
    parser.add_argument("--ingest-each", action="store_true", help="push and ingest every run")
    parser.add_argument("--offline", action="store_true", help="the simulation only, no stack")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    args = parser.parse_args()
    if args.offline:
        offline(args)
        return
    result = bench(args)
    for name, part in result["workloads"].items():
        print(f"\n--- {name}\n")
        print(runs_table(part["runs"]))
        print()
        print(targets_table(part["targets"]))
    if args.no_docs:
        path = OUT_DIR / "predict.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result) + "\n")
    else:
        path = save_json("predict", result)
        write_docs(result)
    print(f"\nwrote {path}" + ("" if args.no_docs else ", docs/benchmarks.md and plots"))


if __name__ == "__main__":
    main()
