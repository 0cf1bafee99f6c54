"""`duphunter replay synthetic|trace`: build, push, replay at real time, report.

    duphunter replay synthetic --clients 20 --duration-s 120 --seed 1
    duphunter replay trace prod-dal09-*.json --start-s 3600 --duration-s 600 --size-scale 0.1

It prints a summary (with --json: the result without its GETs), writes the whole result
(every GET included) as result.json and a PNG of the layer-GET latency CDF by serving path
as latency.png into --out-dir (default: a new directory under the system's temporary
directory), and deletes the repositories it created (--keep-repositories keeps them; a
repository that existed before is never deleted). The exit status is 1 if any GET failed
or returned bytes that do not hash to their digest, or if the workload has no pull to
replay (too short, too few clients); 2 for a bad trace or option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import types
import typing
from pathlib import Path
from typing import Any

import urllib3

from api.presentation import iso_time
from api.replay.content import LayerCache
from api.replay.progress import Status
from api.replay.push import Pushed, build_layers, push_workload, wait_for_quiet
from api.replay.report import latency_series, plot_cdf, render, summarize
from api.replay.runner import Replayer, ReplayOptions
from api.replay.synthetic import SyntheticSpec, generate
from api.replay.trace import TraceError, TraceOptions, load_trace
from api.replay.transport import Connection, PushError
from api.replay.workload import Workload

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "duphunter"


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
    summary["finished"] = iso_time(time.time())
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
    parser.add_argument(
        "--cache", type=Path, default=CACHE_DIR / "replay-layers",
        help=f"built layers, kept between runs (default {CACHE_DIR / 'replay-layers'})",
    )  # fmt: skip
    parser.add_argument(
        "--out-dir", type=Path, default=None,
        help="where result.json and latency.png go (default: a new temporary directory)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="the result (in --out-dir)")
    parser.add_argument("--plot", type=Path, default=None, help="the plot (in --out-dir)")
    parser.add_argument(
        "--keep-repositories", action="store_true", help="leave the pushed repositories"
    )
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
    work = workload.summary()
    if not work["pulls"] + work["fetches"]:
        print(f"duphunter replay: nothing to replay: {work['clients']} clients and no pull "
              f"in {work['duration_s']:g} s; make the run longer (--duration-s) or busier",
              file=sys.stderr)  # fmt: skip
        return 1
    options = ReplayOptions(
        args.max_clients, args.downloads, args.oracle, not args.quiet, not args.shared_address
    )
    connection = Connection(args.url)
    created = [] if args.no_push else new_repositories(connection, workload)
    try:
        summary = replay(
            args.url, workload, options, args.cache, not args.no_push, args.wait_timeout
        )
    except (PushError, TimeoutError, OSError) as error:
        print(f"duphunter replay: {error}", file=sys.stderr)
        return 2
    finally:
        if not args.keep_repositories:
            delete_repositories(connection, created)
    out, plot = output_paths(args)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    plot_cdf(plot, latency_series(summary["gets"]), f"layer GETs by path: {args.url}")
    if args.json:
        brief = {key: value for key, value in summary.items() if key != "gets"}
        print(json.dumps({**brief, "result_file": str(out), "plot_file": str(plot)}, indent=2))
    else:
        print(render(summary))
        print(f"wrote {out} and {plot}")
    return 1 if summary["errors"]["count"] else 0


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where the result and the plot go: --out and --plot, else in --out-dir, else in a
    new temporary directory (never the current directory unless asked)."""
    directory = args.out_dir or Path(tempfile.mkdtemp(prefix="duphunter-replay-"))
    out = args.out or directory / "result.json"
    plot = args.plot or directory / "latency.png"
    for path in (out, plot):
        path.parent.mkdir(parents=True, exist_ok=True)
    return out, plot


def new_repositories(connection: Connection, workload: Workload) -> list[str]:
    """The workload's repositories that the registry does not have yet: the replay
    creates them, and may delete them afterwards."""
    names = sorted({image.repository for image in workload.images.values()})
    return [name for name in names if _absent(connection, name)]


def _absent(connection: Connection, repository: str) -> bool:
    try:
        return connection.request("GET", f"/v2/{repository}/tags/list").status == 404
    except (urllib3.exceptions.HTTPError, OSError):
        return False


def delete_repositories(connection: Connection, names: list[str]) -> None:
    for name in names:
        try:
            response = connection.request("DELETE", f"/api/v1/repositories/{name}")
        except (urllib3.exceptions.HTTPError, OSError) as error:
            response_status = f"{type(error).__name__}: {error}"
        else:
            response_status = "" if response.status in (202, 404) else str(response.status)
        if response_status:
            print(f"duphunter replay: repository {name} not deleted: {response_status}",
                  file=sys.stderr)  # fmt: skip
