"""`duphunter replay synthetic|trace`: build, push, replay at real time, report.

    duphunter replay synthetic --clients 20 --duration-s 120 --seed 1
    duphunter replay trace prod-dal09-*.json --start-s 3600 --duration-s 600 --size-scale 0.1

It prints a summary, writes the whole result (every GET included) as JSON and a PNG of
the layer-GET latency CDF by serving path. The exit status is 1 if any GET failed or
returned bytes that do not hash to their digest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

from api.replay.content import LayerCache
from api.replay.progress import Status
from api.replay.push import Pushed, build_layers, push_workload, wait_for_quiet
from api.replay.report import latency_series, plot_cdf, render, summarize
from api.replay.runner import Replayer, ReplayOptions
from api.replay.synthetic import SyntheticSpec, generate
from api.replay.trace import TraceError, TraceOptions, load_trace
from api.replay.transport import Connection, PushError
from api.replay.workload import Workload

WORKDIR = Path("var") / "replay"


def replay(
    url: str,
    workload: Workload,
    options: ReplayOptions,
    cache: Path,
    push: bool = True,
    wait_timeout: float = 1800.0,
) -> dict[str, Any]:
    """The whole replay against the registry at `url`: its result as a dict."""
    status, api = Status(options.progress), Connection(url)
    layers = build_layers(workload, LayerCache(cache), status)
    pushed = push_workload(api, workload, layers, status) if push else Pushed(layers, 0.0, 0)
    waited = wait_for_quiet(api, wait_timeout, status)
    before = api.stats()
    result = Replayer(url, workload, pushed, options).run()
    settled = wait_for_quiet(api, wait_timeout, status)  # late counters (wasted, cpu)
    summary = summarize(url, workload, pushed, result, (before, api.stats()), options)
    summary["ingest_wait_s"] = round(waited, 1)
    summary["settle_after_s"] = round(settled, 1)
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return summary


# --- arguments ----------------------------------------------------------------------------


def _add_spec_options(parser: argparse.ArgumentParser, spec: type[Any]) -> None:
    """One --option per field of a spec dataclass, typed from its default."""
    hints = typing.get_type_hints(spec)
    for item in dataclasses.fields(spec):
        flag, default = "--" + item.name.replace("_", "-"), item.default
        meaning = item.metadata.get("help", "")
        if isinstance(default, tuple):
            parser.add_argument(
                flag,
                type=type(default[0]),
                nargs=2,
                default=list(default),
                metavar=("LOW", "HIGH"),
                help=f"{meaning} (default {default[0]} {default[1]})",
            )
        else:
            optional = isinstance(hints[item.name], types.UnionType)
            kind = float if optional else type(default)
            parser.add_argument(
                flag, type=kind, default=default, help=f"{meaning} (default {default})"
            )


def _spec_from(args: argparse.Namespace, spec: type[Any]) -> Any:
    values = {}
    for item in dataclasses.fields(spec):
        value = getattr(args, item.name)
        values[item.name] = tuple(value) if isinstance(value, list) else value
    return spec(**values)


def add_parser(commands: Any, parents: list[argparse.ArgumentParser] | None = None) -> None:
    """The `replay` subcommand of `duphunter` (`parents`: options every command takes)."""
    replay_parser = commands.add_parser(
        "replay",
        help="replay pulls against the registry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = replay_parser.add_subparsers(dest="workload", required=True)
    synthetic = kinds.add_parser(
        "synthetic", help="a seeded synthetic workload", parents=parents or []
    )
    _add_spec_options(synthetic, SyntheticSpec)
    trace = kinds.add_parser(
        "trace", help="an IBM registry trace (JSON array or lines, .gz ok)", parents=parents or []
    )
    trace.add_argument("files", nargs="+", type=Path)
    trace.add_argument("--lenient", action="store_true", help="skip malformed records")
    _add_spec_options(trace, TraceOptions)
    for sub in (synthetic, trace):
        _add_common(sub)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-clients", type=int, default=16, help="clients replaying at once")
    parser.add_argument("--downloads", type=int, default=3, help="concurrent layer GETs per pull")
    parser.add_argument(
        "--oracle", action="store_true", help="preconstruct exactly what will be GET"
    )
    parser.add_argument("--no-push", action="store_true", help="the images are already pushed")
    parser.add_argument(
        "--shared-address", action="store_true", help="all clients from one address"
    )
    parser.add_argument("--wait-timeout", type=float, default=1800.0, help="for ingestion, seconds")
    parser.add_argument("--cache", type=Path, default=WORKDIR / "layers", help="built layers")
    parser.add_argument("--out", type=Path, default=WORKDIR / "result.json")
    parser.add_argument("--plot", type=Path, default=WORKDIR / "latency.png")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def load_workload(args: argparse.Namespace) -> Workload:
    if args.workload == "synthetic":
        return generate(_spec_from(args, SyntheticSpec))
    return load_trace(list(args.files), _spec_from(args, TraceOptions), args.lenient)


def run(args: argparse.Namespace) -> int:
    try:
        workload = load_workload(args)
    except (TraceError, ValueError) as error:
        print(f"duphunter replay: {error}", file=sys.stderr)
        return 2
    options = ReplayOptions(
        args.max_clients, args.downloads, args.oracle, not args.quiet, not args.shared_address
    )
    try:
        summary = replay(
            args.url, workload, options, args.cache, not args.no_push, args.wait_timeout
        )
    except (PushError, TimeoutError, OSError) as error:
        print(f"duphunter replay: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    plot_cdf(args.plot, latency_series(summary["gets"]), f"layer GETs by path: {args.url}")
    print(render(summary))
    print(f"wrote {args.out} and {args.plot}")
    return 1 if summary["errors"]["count"] else 0
