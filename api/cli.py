"""`duphunter`: the operator's command line, a client of the HTTP API.

  duphunter status                    is everything up: Redis, S3, workers, encoders
  duphunter stats                     storage, dedup ratio, layers, buffer, restores
  duphunter ingest REPOSITORY DIGEST... [--wait]
                                      queue layers for ingestion (again); --wait shows
                                      progress until all are done
  duphunter job ID                    the state and result of a job
  duphunter warm REPO:TAG [--platform P ...] [--wait]
                                      rebuild an image's deduplicated layers into the
                                      layer buffer ahead of a rollout
  duphunter reindex                   rebuild the Redis index from S3 (a maintenance job)
  duphunter gc [--dry-run]            garbage collection now: what it freed (would free)
  duphunter retention [--dry-run]     delete the tags the retention policy does not keep
  duphunter verify [--sample N | --all]
                                      rebuild deduplicated layers from their packs alone
                                      (--all: every stored blob, intact ones from their
                                      data objects) and check their digests; names each
                                      missing or damaged file; exits 1 if any is broken
  duphunter verify --encoders         run every encoder's canary on the API's build (before
                                      an upgrade: a failure means do not roll it out)
  duphunter repo delete REPOSITORY    drop a repository (GC frees its bytes)
  duphunter replay synthetic|trace …  replay pulls at real time, report latency by path

Every command takes --json (machine output: numbers as numbers, times in ISO 8601),
--url (the API, default http://$DUPHUNTER_LISTEN or http://127.0.0.1:5000) and --user
(default $DUPHUNTER_USER; the password is $DUPHUNTER_PASSWORD, or asked for). Credentials
are sent only when the API asks (a 401 challenge): Basic, or a token from its realm.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api.replay import cli as replay

WAIT_POLL_SECONDS = 0.5


class ApiError(Exception):
    """The API could not be reached, or refused the request: one line for the user."""


@dataclass
class Credentials:
    """Who the CLI is; `authorization` is the header that last answered a challenge."""

    user: str | None = None
    password: str = ""
    authorization: str | None = None

    def answer(self, challenge: str) -> bool:
        """Take up a 401's challenge: Basic credentials, or a token fetched from the
        Bearer realm for the scope asked. False when there is nothing new to send."""
        if self.user is None:
            return False
        scheme, _, rest = challenge.partition(" ")
        basic = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if scheme.lower() == "basic":
            fresh = basic
        elif scheme.lower() == "bearer":
            fresh = "Bearer " + _fetch_token(dict(re.findall(r'(\w+)="([^"]*)"', rest)), basic)
        else:
            return False
        if fresh == self.authorization:
            return False
        self.authorization = fresh
        return True


_credentials = Credentials()


def _fetch_token(params: dict[str, str], basic: str) -> str:
    realm = params.pop("realm", "")
    query = urllib.parse.urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
    request = urllib.request.Request(f"{realm}?{query}", headers={"Authorization": basic})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ApiError(f"no token from {realm}: {getattr(error, 'code', error)}") from error
    return str(body.get("token") or body.get("access_token") or "")


def _call(
    base: str, method: str, path: str, body: dict[str, Any] | None = None, also: int = 0
) -> Any:
    """The JSON an API call answers; `also`: one more status whose body is an answer."""
    data = None if body is None else json.dumps(body).encode()
    while True:
        headers = {"Content-Type": "application/json"}
        if _credentials.authorization:
            headers["Authorization"] = _credentials.authorization
        request = urllib.request.Request(
            base.rstrip("/") + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == also:
                return json.loads(error.read())
            challenge = error.headers.get("WWW-Authenticate", "")
            if error.code == 401 and challenge and _credentials.answer(challenge):
                continue
            raise ApiError(_refusal(method, path, error)) from error
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ApiError(f"cannot reach the API at {base}: {reason}") from error


def _refusal(method: str, path: str, error: urllib.error.HTTPError) -> str:
    message = f"{method} {path}: {error.code} {_error_message(error.read())}"
    if error.code == 401 and _credentials.user is None:
        message += " (set DUPHUNTER_USER and DUPHUNTER_PASSWORD, or pass --user)"
    return message


def _error_message(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except ValueError:
        return body.decode(errors="replace")[:200]


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return str(count)


# human output


def show_stats(stats: dict[str, Any]) -> None:
    storage = stats.get("storage", {})
    waiting = stats.get("awaiting_deletion_bytes", {})
    rows = [
        ("mode", storage.get("mode", "?")),
        ("pushed (logical)", human_bytes(stats["logical_bytes"])),
        ("stored", human_bytes(stats["stored_bytes"])),
        ("dedup ratio", _ratio(stats.get("dedup_ratio"))),
        ("  once copies in grace go", _ratio(stats.get("dedup_ratio_once_deleted"))),
        ("intact copies in grace", human_bytes(waiting.get("intact_copies_in_grace", 0))),
        ("hot-layer replicas", human_bytes(storage.get("replica_bytes", 0))),
        ("layer buffer", human_bytes(storage.get("buffer_bytes", 0))),
        ("unique files", stats.get("unique_files", 0)),
        ("repositories", stats.get("repositories", 0)),
    ]
    _table(rows)
    for title in ("layers", "layers_by_encoder", "intact_layers_by_reason", "queues"):
        if stats.get(title):
            print(f"\n{title.replace('_', ' ')}")
            _table(sorted(stats[title].items(), key=lambda item: -int(item[1])))
    restores = stats.get("restores", {})
    if restores:
        print("\nrestores")
        _table(sorted(restores.items()))


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def show_status(ready: dict[str, Any]) -> None:
    for name, check in ready["checks"].items():
        mark = "ok  " if check["ok"] else "FAIL"
        print(f"{mark} {name:10} {check.get('error', '')}")
    print("ready" if ready["ok"] else "NOT READY")


def show_fields(body: dict[str, Any]) -> None:
    _table([(key, json.dumps(value) if isinstance(value, dict | list) else value)
            for key, value in body.items()])  # fmt: skip


def _table(rows: list[tuple[Any, Any]]) -> None:
    width = max((len(str(key)) for key, _value in rows), default=0)
    for key, value in rows:
        print(f"  {key!s:{width}}  {value}")


# commands


def cmd_stats(args: argparse.Namespace) -> tuple[Any, Callable[[Any], None]]:
    return _call(args.url, "GET", "/api/v1/stats"), show_stats


def cmd_status(args: argparse.Namespace) -> tuple[Any, Callable[[Any], None]]:
    return _call(args.url, "GET", "/api/v1/ready", also=503), show_status


def cmd_ingest(args: argparse.Namespace) -> tuple[Any, Callable[[Any], None]]:
    jobs = [
        _call(args.url, "POST", "/api/v1/jobs/ingest", {"repository": args.repository, "digest": d})
        for d in args.digests
    ]
    if args.wait:
        jobs = _wait_all(args.url, [job["id"] for job in jobs])
    if len(jobs) == 1:
        return jobs[0], show_fields
    return jobs, lambda done: _table([(job.get("digest", job["id"]), job["state"]) for job in done])


def _wait_all(base: str, job_ids: list[str]) -> list[dict[str, Any]]:
    """Poll jobs until all end, with one progress bar on stderr."""
    while True:
        statuses = [_call(base, "GET", f"/api/v1/jobs/{job_id}") for job_id in job_ids]
        done = sum(status["state"] in ("success", "failure") for status in statuses)
        print(f"\r{_bar(done, len(statuses))} jobs done   ", end="", file=sys.stderr)
        if done == len(statuses):
            print(file=sys.stderr)
            return statuses
        time.sleep(WAIT_POLL_SECONDS)


def cmd_job(args: argparse.Namespace) -> tuple[Any, Callable[[Any], None]]:
    return _call(args.url, "GET", f"/api/v1/jobs/{args.id}"), show_fields


def cmd_warm(args: argparse.Namespace) -> tuple[Any, Callable[[Any], None]]:
    repository, reference = split_image(args.image)
    body = {"repository": repository, "reference": reference, "platforms": args.platform}
    job = _call(args.url, "POST", "/api/v1/jobs/preconstruct", body)
    if args.wait:
        job = _wait(args.url, job["id"], "layers rebuilt")
    return job, show_fields


def cmd_gc(args: argparse.Namespace) -> tuple[Any, Callable[[Any], None]]:
    job = _call(args.url, "POST", "/api/v1/jobs/gc", {"dry_run": args.dry_run})
    status = _wait(args.url, job["id"], "steps")
    return status, lambda s: show_fields(s.get("result") or s)


def cmd_retention(args: argparse.Namespace) -> tuple[Any, Callable[[Any], None]]:
    job = _call(args.url, "POST", "/api/v1/jobs/retention", {"dry_run": args.dry_run})
    status = _wait(args.url, job["id"], "steps")
    return status, lambda s: show_fields(s.get("result") or s)


def cmd_verify(args: argparse.Namespace) -> tuple[Any, Callable[[Any], None]]:
    if args.encoders:
        return _call(args.url, "POST", "/api/v1/encoders/verify", {}), show_canaries
    body = {"sample": args.sample, "all": args.all}
    job = _call(args.url, "POST", "/api/v1/jobs/verify", body)
    return _wait(args.url, job["id"], "layers verified"), show_verification


def show_canaries(report: dict[str, Any]) -> None:
    failed = report.get("failed", {})
    print(f"{report['checked'] - len(failed)} of {report['checked']} encoders passed their canary")
    _table(sorted(failed.items()))
    if failed:
        print("FAILED: do not roll this build out; intact copies of their layers are kept")


def show_verification(status: dict[str, Any]) -> None:
    outcomes = status.get("layers", {})
    broken = status.get("broken", {})
    failed = {layer: outcome for layer, outcome in outcomes.items() if outcome != "verified"}
    proven = len(outcomes) - len(failed)
    print(f"{proven} of {len(outcomes)} layers verified from their packs (or data objects)")
    for layer in sorted(failed):
        why = broken.get(layer) or {"reason": failed[layer], "problems": []}
        print(f"  {layer}  BROKEN: {why['reason']}")
        for problem in why["problems"]:
            print(f"      {problem}")


def verification_passed(status: dict[str, Any]) -> bool:
    """Whether every layer of a verify job was proven (a pending one was not)."""
    return status.get("state") == "success" and all(
        outcome == "verified" for outcome in status.get("layers", {}).values()
    )


def cmd_repo(args: argparse.Namespace) -> tuple[Any, Callable[[Any], None]]:
    return _call(args.url, "DELETE", f"/api/v1/repositories/{args.repository}"), show_fields


def cmd_reindex(args: argparse.Namespace) -> tuple[Any, Callable[[Any], None]]:
    job = _call(args.url, "POST", "/api/v1/jobs/reindex", {})
    return _wait(args.url, job["id"], "objects indexed"), show_fields


def _wait(base: str, job_id: str, unit: str) -> dict[str, Any]:
    """Poll a job, with a progress line on stderr, until it ends."""
    started = time.monotonic()
    while True:
        status: dict[str, Any] = _call(base, "GET", f"/api/v1/jobs/{job_id}")
        progress = status.get("progress") or {}
        done, total = progress.get("done", 0), progress.get("total")
        bar = _bar(done, total) if total else f"{done} {unit}"
        elapsed = time.monotonic() - started
        print(f"\r{bar}  {status['state']}  {elapsed:.0f}s   ", end="", file=sys.stderr)
        if status["state"] in ("success", "failure"):
            print(file=sys.stderr)
            return status
        time.sleep(WAIT_POLL_SECONDS)


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def split_image(image: str) -> tuple[str, str]:
    """ "team/app:v1" -> ("team/app", "v1"); "team/app@sha256:..." -> (..., "sha256:...")."""
    if "@" in image:
        repository, reference = image.split("@", 1)
    else:
        repository, _, reference = image.rpartition(":")
        if not repository or "/" in reference:
            repository, reference = image, "latest"
    return repository, reference


COMMANDS: dict[str, Callable[[argparse.Namespace], tuple[Any, Callable[[Any], None]]]] = {
    "status": cmd_status,
    "stats": cmd_stats,
    "ingest": cmd_ingest,
    "job": cmd_job,
    "warm": cmd_warm,
    "reindex": cmd_reindex,
    "gc": cmd_gc,
    "retention": cmd_retention,
    "verify": cmd_verify,
    "repo": cmd_repo,
}


def build_parser() -> argparse.ArgumentParser:
    default_url = "http://" + os.environ.get("DUPHUNTER_LISTEN", "127.0.0.1:5000")
    common = argparse.ArgumentParser(add_help=False)  # accepted before or after the command
    common.add_argument("--url", default=argparse.SUPPRESS, help=f"API (default {default_url})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON out")
    common.add_argument(
        "--user", default=argparse.SUPPRESS, help="user name (default $DUPHUNTER_USER)"
    )
    parser = argparse.ArgumentParser(
        prog="duphunter", description=__doc__, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("status", "stats", "reindex"):
        commands.add_parser(name, parents=[common])
    ingest = commands.add_parser("ingest", parents=[common])
    ingest.add_argument("repository")
    ingest.add_argument("digests", nargs="+", metavar="digest")
    ingest.add_argument("--wait", action="store_true", help="wait until every layer is done")
    commands.add_parser("job", parents=[common]).add_argument("id")
    warm = commands.add_parser("warm", parents=[common])
    warm.add_argument("image", help="REPOSITORY:TAG or REPOSITORY@DIGEST")
    warm.add_argument("--platform", action="append", default=[], help="e.g. linux/amd64")
    warm.add_argument("--wait", action="store_true", help="wait until every layer is rebuilt")
    for name in ("gc", "retention"):
        dry = commands.add_parser(name, parents=[common])
        dry.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    verify = commands.add_parser("verify", parents=[common])
    scope = verify.add_mutually_exclusive_group()
    scope.add_argument("--sample", type=int, default=None, help="at most N deduplicated layers")
    scope.add_argument(
        "--all", action="store_true", help="every stored blob, deduplicated or intact"
    )
    verify.add_argument(
        "--encoders", action="store_true", help="check every encoder against its canary"
    )
    repo = commands.add_parser("repo", parents=[common])
    repo.add_argument("action", choices=["delete"])
    repo.add_argument("repository")
    replay.add_parser(commands, parents=[common])
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments; --url and --json may come before or after the command (their
    actions are shared by every subparser, so their defaults are filled in here)."""
    args = build_parser().parse_args(argv)
    args.url = getattr(
        args, "url", "http://" + os.environ.get("DUPHUNTER_LISTEN", "127.0.0.1:5000")
    )
    args.json = getattr(args, "json", False)
    args.user = getattr(args, "user", None) or os.environ.get("DUPHUNTER_USER") or None
    return args


def credentials(user: str | None) -> Credentials:
    """The password from $DUPHUNTER_PASSWORD, else asked on the terminal (never echoed,
    never printed, never an argument: those show in `ps`)."""
    if user is None:
        return Credentials()
    password = os.environ.get("DUPHUNTER_PASSWORD")
    if password is None:
        password = getpass.getpass(f"password for {user}: ") if sys.stdin.isatty() else ""
    return Credentials(user, password)


def main(argv: list[str] | None = None) -> None:
    global _credentials
    args = parse(argv)
    _credentials = credentials(args.user)
    if args.command == "replay":
        raise SystemExit(replay.run(args))
    try:
        result, show = COMMANDS[args.command](args)
    except ApiError as error:
        print(f"duphunter: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        show(result)
    if args.command == "status" and not result.get("ok"):
        raise SystemExit(1)
    if args.command == "verify" and not (
        result.get("ok") if args.encoders else verification_passed(result)
    ):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
