"""What a replay measured: layer-GET latency percentiles overall and by serving path, the
hit ratio, the registry's own counters (as a delta of GET /api/v1/stats), errors; as a
dict (the JSON result), as text, and as a latency CDF plot.

The registry's counters are read defensively: a key it does not report is left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from api.cli_output import human_bytes
from api.replay.push import Pushed
from api.replay.runner import ReplayOptions, ReplayResult
from api.replay.transport import Get
from api.replay.workload import Workload

SOURCES = ("intact", "buffer", "inflight", "spool", "restore")  # X-DupHunter-Source values
UNKNOWN = "unknown"
# counters that grow during a replay: reported as after - before; first path found wins
COUNTERS = {
    "restore_cpu_seconds": ("restore_cpu_seconds", "restores.cpu_seconds"),
    "preconstructions": ("preconstructions.done", "restores.preconstructions"),
    "preconstructions_wasted": ("preconstructions.wasted", "restores.preconstructions_wasted"),
    "buffer_hits": ("buffer.hits",),
    "buffer_misses": ("buffer.misses",),
}
# levels: reported as read after the replay
LEVELS = {
    "stored_bytes": ("storage.stored_bytes", "stored_bytes"),
    "buffer_bytes": ("buffer.bytes", "buffer.used_bytes", "storage.buffer_bytes"),
    "stored_with_buffer_bytes": ("storage.stored_with_buffer_bytes",),
}


SETTINGS = {"mode": ("storage.mode", "mode"), "predictor": ("predictor",)}


def quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks of an ascending list."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency(seconds: Iterable[float]) -> dict[str, Any]:
    ordered = sorted(seconds)
    if not ordered:
        return {"count": 0}
    summary: dict[str, Any] = {"count": len(ordered)}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        summary[name] = round(quantile(ordered, q), 4)
    summary["max"] = round(ordered[-1], 4)
    summary["mean"] = round(sum(ordered) / len(ordered), 4)
    return summary


def _gets_summary(gets: list[Get]) -> dict[str, Any]:
    good = [get for get in gets if not get.error]
    return {
        "count": len(gets),
        "errors": len(gets) - len(good),
        "verified": sum(1 for get in gets if get.verified),
        "bytes": sum(get.bytes for get in good),
        "latency": latency(get.seconds for get in good),
    }


def layer_summary(gets: list[Get]) -> dict[str, Any]:
    layers = [get for get in gets if get.kind == "layer"]
    summary = _gets_summary(layers)
    paths = sorted({get.source for get in layers}, key=lambda s: (s not in SOURCES, s))
    summary["by_source"] = {
        source: _gets_summary([get for get in layers if get.source == source]) for source in paths
    }
    summary["ttfb"] = latency(get.ttfb_s for get in layers if not get.error)
    return summary


def hit_ratio(gets: list[Get]) -> dict[str, Any]:
    """Layer GETs not served by an on-demand restore, among those whose path the registry
    named. Every layer the replayer pushes is deduplicated once ingested, and the replay
    starts after ingestion, so these are GETs of deduplicated layers."""
    named = [get for get in gets if get.kind == "layer" and get.source in SOURCES]
    restores = sum(1 for get in named if get.source == "restore")
    unknown = sum(1 for get in gets if get.kind == "layer" and get.source not in SOURCES)
    ratio = round(1 - restores / len(named), 4) if named else None
    return {"ratio": ratio, "hits": len(named) - restores, "restores": restores, "unnamed": unknown}


def lookup(stats: dict[str, Any] | None, path: str) -> float | None:
    node: Any = stats
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return float(node)


def _first(stats: dict[str, Any] | None, paths: tuple[str, ...]) -> tuple[str, float] | None:
    for path in paths:
        value = lookup(stats, path)
        if value is not None:
            return path, value
    return None


def registry_counters(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> dict[str, Any]:
    """The registry's own figures for the replay; absent keys are not reported."""
    found: dict[str, Any] = {}
    for name, paths in COUNTERS.items():
        hit = _first(after, paths)
        if hit is not None:
            found[name] = round(hit[1] - (lookup(before, hit[0]) or 0.0), 3)
    for name, paths in LEVELS.items():
        hit = _first(after, paths)
        if hit is not None:
            found[name] = hit[1]
    done, wasted = found.get("preconstructions"), found.get("preconstructions_wasted")
    if done and wasted is not None:
        found["wasted_share"] = round(wasted / done, 4)
    return found


def registry_settings(stats: dict[str, Any] | None) -> dict[str, str]:
    """Mode and predictor, as the registry reports them (absent before issue 7)."""
    found = {}
    for name, paths in SETTINGS.items():
        for path in paths:
            node: Any = stats
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, str):
                found[name] = node
                break
    return found


def flatten(stats: dict[str, Any] | None, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in (stats or {}).items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[prefix + key] = float(value)
    return flat


def stats_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, float]:
    old, new = flatten(before), flatten(after)
    return {
        key: round(value - old.get(key, 0.0), 4)
        for key, value in new.items()
        if value != old.get(key, 0.0)
    }


def summarize(
    url: str,
    workload: Workload,
    pushed: Pushed,
    result: ReplayResult,
    stats: tuple[dict[str, Any] | None, dict[str, Any] | None],
    options: ReplayOptions,
) -> dict[str, Any]:
    gets = result.gets
    unique = {layer.digest: layer.size for layer in pushed.layers.values()}
    errors = [f"{get.kind} {get.repository} {get.digest}: {get.error}" for get in gets if get.error]
    errors += [
        f"{p.kind} {p.repository}:{p.tag}: {p.error}"
        for p in result.pulls
        if p.error and ("replayer" in p.error or p.kind == "tag")
    ]
    pulls = [pull for pull in result.pulls if pull.kind != "tag"]
    return {
        "url": url,
        "workload": workload.summary() | {"unique_layer_bytes": sum(unique.values())},
        "options": asdict(options),
        "push_s": round(pushed.seconds, 2),
        "replay_s": round(result.wall_s, 2),
        "layer_gets": layer_summary(gets),
        "hit_ratio": hit_ratio(gets),
        "manifest_gets": _gets_summary([get for get in gets if get.kind == "manifest"]),
        "config_gets": _gets_summary([get for get in gets if get.kind == "config"]),
        "pulls": {
            "count": len(pulls),
            "lag": latency(pull.lag_s for pull in pulls),
            "seconds": latency(pull.seconds for pull in pulls if not pull.error),
        },
        "tags_published": len(result.pulls) - len(pulls),
        "oracle": {"requests": result.oracle_requests, "errors": result.oracle_errors[:20]}
        if options.oracle
        else None,
        "registry": registry_counters(*stats),
        "registry_settings": registry_settings(stats[1]),
        "stats_delta": stats_delta(*stats),
        "layer_states": (stats[0] or {}).get("layers"),
        "errors": {"count": len(errors), "first": errors[:20]},
        "gets": [asdict(get) for get in gets],
    }


def _row(name: str, summary: dict[str, Any]) -> str:
    lat = summary["latency"]
    if not lat.get("count"):
        return f"  {name:<10} {summary['count']:>6}  {'-':>8}"
    cells = [f"{lat[k] * 1000:8.1f}" for k in ("p50", "p90", "p99", "max")]
    return f"  {name:<10} {summary['count']:>6}  " + " ".join(cells) + f"  {summary['errors']:>6}"


def _figure(name: str, value: float) -> str:
    """A counter for people: bytes in binary units, other figures in plain decimals."""
    if name.endswith("_bytes"):
        return human_bytes(value)
    return f"{value:.3f}".rstrip("0").rstrip(".")


def render(summary: dict[str, Any]) -> str:
    work, layers, hits = summary["workload"], summary["layer_gets"], summary["hit_ratio"]
    lines = [
        f"replayed a {work['source']} workload against {summary['url']}: {work['clients']} clients,"
        f" {work['pulls']} pulls, {work['fetches']} lone layer GETs, {work['images']} images, "
        f"{work['layers']} layers ({human_bytes(work['unique_layer_bytes'])}), "
        f"in {summary['replay_s']:.0f} s",
        f"layer GETs: {layers['count']}, {layers['verified']} verified (sha256 and size), "
        f"{layers['errors']} errors, {human_bytes(layers['bytes'])}",
        f"  {'path':<10} {'GETs':>6}  "
        + " ".join(f"{name + ' ms':>8}" for name in ("p50", "p90", "p99", "max"))
        + "  errors",
        _row("all", layers),
        *(_row(source, part) for source, part in layers["by_source"].items()),
    ]
    if hits["ratio"] is None:
        lines.append("hit ratio: not reported (the registry names no serving path)")
    else:
        lines.append(
            f"hit ratio: {hits['ratio']:.1%} ({hits['hits']} of {hits['hits'] + hits['restores']} "
            "layer GETs served without an on-demand restore)"
        )
    manifests, lag = summary["manifest_gets"], summary["pulls"]["lag"]
    lines.append(
        f"manifest GETs: {manifests['count']} "
        f"(p50 {manifests['latency'].get('p50', 0) * 1000:.1f} ms); "
        f"start lag p50 {lag.get('p50', 0) * 1000:.0f} ms, max {lag.get('max', 0):.2f} s"
    )
    counters = summary["registry"]
    if counters:
        lines.append("registry: " + ", ".join(f"{k} {_figure(k, v)}" for k, v in counters.items()))
    else:
        lines.append("registry: no counters (no /api/v1/stats, or none of the known keys)")
    if summary["errors"]["count"]:
        lines.append(
            f"errors: {summary['errors']['count']}; first: {summary['errors']['first'][0]}"
        )
    return "\n".join(lines)


def plot_cdf(path: Path, series: dict[str, list[float]], title: str) -> Path:
    """A PNG of the latency CDF of each series (log time axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    for name, seconds in series.items():
        ordered = sorted(max(value, 1e-4) for value in seconds)
        if ordered:
            shares = [(index + 1) / len(ordered) for index in range(len(ordered))]
            label, times = f"{name} ({len(ordered)})", [v * 1000 for v in ordered]
            if name == "all":
                axes.step(
                    times, shares, where="post", label=label, color="black", ls="--", zorder=3
                )
            else:
                axes.step(times, shares, where="post", label=label)
    axes.set_xscale("log")
    axes.set_xlabel("layer GET latency, ms (log)")
    axes.set_ylabel("share of GETs")
    axes.set_ylim(0, 1.01)
    axes.grid(True, which="both", linewidth=0.3)
    axes.set_title(title, fontsize=10)
    if any(series.values()):
        axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def latency_series(gets: Iterable[dict[str, Any]]) -> dict[str, list[float]]:
    """Layer-GET latencies from a result's `gets`: all, then by serving path."""
    layers = [get for get in gets if get["kind"] == "layer" and not get["error"]]
    series = {"all": [get["seconds"] for get in layers]}
    for source in sorted({get["source"] for get in layers}):
        series[source] = [get["seconds"] for get in layers if get["source"] == source]
    return series
