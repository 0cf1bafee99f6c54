"""`duphunter`: the operator's command line, a client of the HTTP API.

duphunter stats                     storage and layer accounting
duphunter ingest REPOSITORY DIGEST  queue a layer for ingestion, print the job id
duphunter job ID                    the state and result of a job
duphunter warm REPO:TAG [--platform P ...] [--wait]
                                    rebuild an image's deduplicated layers ahead of a
                                    rollout (into the layer buffer); --wait shows progress
duphunter reindex                   rebuild the Redis index from S3 (runs locally)
duphunter replay synthetic|trace …  replay pulls at real time, report latency by path
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from api.replay import cli as replay


def _call(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise SystemExit(f"{method} {path}: {error.code} {error.read().decode()}") from error


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return str(count)


def print_stats(stats: dict[str, Any]) -> None:
    for key, value in stats.items():
        if key.endswith("_bytes") and isinstance(value, int):
            print(f"{key:24} {_human(value):>12}  ({value} bytes)")
        elif isinstance(value, dict):
            print(f"{key:24} " + ", ".join(f"{k}={v}" for k, v in sorted(value.items())))
        else:
            print(f"{key:24} {value}")


def main(argv: list[str] | None = None) -> None:
    default_url = "http://" + os.environ.get("DUPHUNTER_LISTEN", "127.0.0.1:5000")
    parser = argparse.ArgumentParser(
        prog="duphunter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=default_url, help=f"API address (default {default_url})")
    parser.add_argument("--json", action="store_true", help="print raw JSON")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("stats")
    ingest = commands.add_parser("ingest")
    ingest.add_argument("repository")
    ingest.add_argument("digest")
    job = commands.add_parser("job")
    job.add_argument("id")
    commands.add_parser("reindex")
    warm = commands.add_parser("warm")
    warm.add_argument("image", help="REPOSITORY:TAG or REPOSITORY@DIGEST")
    warm.add_argument("--platform", action="append", default=[], help="e.g. linux/amd64")
    warm.add_argument("--wait", action="store_true", help="wait until every layer is rebuilt")
    replay.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "replay":
        raise SystemExit(replay.run(args))
    result = _run(args)
    if args.json or not isinstance(result, dict) or args.command != "stats":
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_stats(result)


def _run(args: argparse.Namespace) -> Any:
    if args.command == "stats":
        return _call(args.url, "GET", "/api/v1/stats")
    if args.command == "ingest":
        return _call(
            args.url,
            "POST",
            "/api/v1/jobs/ingest",
            {"repository": args.repository, "digest": args.digest},
        )
    if args.command == "job":
        return _call(args.url, "GET", f"/api/v1/jobs/{args.id}")
    if args.command == "warm":
        return _warm(args)
    from pipelines.registry import Registry

    return Registry.connect().rebuild_index()


def split_image(image: str) -> tuple[str, str]:
    """ "team/app:v1" -> ("team/app", "v1"); "team/app@sha256:..." -> (..., "sha256:...")."""
    if "@" in image:
        repository, reference = image.split("@", 1)
    else:
        repository, _, reference = image.rpartition(":")
        if not repository or "/" in reference:
            repository, reference = image, "latest"
    return repository, reference


def _warm(args: argparse.Namespace) -> Any:
    repository, reference = split_image(args.image)
    body = {"repository": repository, "reference": reference, "platforms": args.platform}
    job = _call(args.url, "POST", "/api/v1/jobs/preconstruct", body)
    while args.wait:
        status = _call(args.url, "GET", f"/api/v1/jobs/{job['id']}")
        progress = status["progress"]
        print(f"\r{progress['done']}/{progress['total']} layers rebuilt", end="", file=sys.stderr)
        if status["state"] in ("success", "failure"):
            print(file=sys.stderr)
            return status
        time.sleep(0.5)
    return job


if __name__ == "__main__":
    main()
