"""`duphunter`: the operator's command line, a client of the HTTP API.

  duphunter status                    is everything up: Redis, S3, workers, encoders
  duphunter stats                     what the bucket holds (packs, intact copies and
                                      replicas, layer buffer), dedup ratio, layers,
                                      failing layers, last GC, pack garbage, buffer
  duphunter ingest REPOSITORY DIGEST... [--wait]
                                      queue layers for ingestion (again); only blobs a
                                      manifest names as layers; --wait shows progress
  duphunter job ID                    the state and result of a job
  duphunter warm REPO:TAG [--platform P ...] [--wait]
                                      rebuild an image's deduplicated layers into the
                                      layer buffer ahead of a rollout (a platform the
                                      image lacks is refused)
  duphunter reindex                   rebuild the Redis index from S3 (a maintenance job)
  duphunter gc [--dry-run]            garbage collection now: the total it freed (would
                                      free), and why nothing when nothing
  duphunter retention [--dry-run] [--yes]
                                      delete the tags the retention policy does not keep
  duphunter verify [--sample N | --all]
                                      rebuild deduplicated layers from their packs alone
                                      (--all: every stored blob, intact ones from their
                                      data objects) and check their digests; names each
                                      missing or damaged file
  duphunter verify --encoders [--sample N | --all]
                                      run every encoder's canary on the API's build (before
                                      an upgrade: a failure means do not roll it out); with
                                      --sample or --all, then verify layers as above
  duphunter repo delete REPOSITORY [--yes]
                                      drop a repository (GC frees its bytes)
  duphunter replay synthetic|trace …  replay pulls at real time, report latency by path

Every command takes --json (machine output: numbers as numbers, times as ISO 8601 in UTC,
flags as true/false), --url (the API, default http://$DUPHUNTER_LISTEN or
http://127.0.0.1:5000) and --user (default $DUPHUNTER_USER; the password is
$DUPHUNTER_PASSWORD, or asked for). Credentials are sent only when the API asks (a 401
challenge): Basic, or a token from its realm. Progress goes to stderr: redrawn in place on
a terminal, one plain line now and then elsewhere. Waiting on a job rides out an API
restart (up to a minute without an answer).
"""

from __future__ import annotations

import argparse
import base64
import getpass
import http.client
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

from api import cli_output as out
from api.replay import cli as replay
from api.replay.progress import Status, bar

EPILOG = """exit status:
  0  what was asked succeeded (stats shown, job done, every layer verified, ready)
  1  it ran but failed or found problems (a job failed, a layer or an encoder failed
     verification, not ready, the API refused or could not be reached)
  2  usage error: bad arguments, or a destructive command off a terminal without --yes
  130 interrupted; 141 stdout closed early (e.g. `duphunter stats | head`)
"""
WAIT_POLL_SECONDS = 0.5
PATIENCE_SECONDS = 60.0  # how long polling a job waits for an API that does not answer
MAX_BACKOFF_SECONDS = 5.0


class ApiError(Exception):
    """The API could not be reached, or refused the request: one line for the user."""


class Unreachable(ApiError):
    """No answer, or 503: worth asking again (the API restarts, a backend is back soon)."""


class UsageRefused(Exception):
    """The command will not run as given (exit status 2)."""


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
            kind = Unreachable if error.code == 503 else ApiError
            raise kind(_refusal(method, path, error)) from error
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            raise Unreachable(f"cannot reach the API at {base}: {reason}") from error


def _poll(base: str, path: str) -> Any:
    """GET `path`, asking again with backoff while the API does not answer (it restarts)
    or answers 503, for at most PATIENCE_SECONDS."""
    deadline, delay, told = time.monotonic() + PATIENCE_SECONDS, WAIT_POLL_SECONDS, False
    while True:
        try:
            return _call(base, "GET", path)
        except Unreachable as error:
            if time.monotonic() + delay > deadline:
                raise ApiError(f"{error} (gave up after {PATIENCE_SECONDS:.0f} s)") from None
            if not told:
                print(f"duphunter: {error}; asking again for up to {PATIENCE_SECONDS:.0f} s",
                      file=sys.stderr)  # fmt: skip
                told = True
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)


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


# commands


@dataclass
class Outcome:
    """What a command answered (printed as JSON, or by `show` as text), and whether what
    was asked succeeded (the exit status)."""

    result: Any
    show: Callable[[Any], None]
    ok: bool = True


def cmd_stats(args: argparse.Namespace) -> Outcome:
    return Outcome(_call(args.url, "GET", "/api/v1/stats?fresh=1"), out.show_stats)


def cmd_status(args: argparse.Namespace) -> Outcome:
    ready = _call(args.url, "GET", "/api/v1/ready", also=503)
    return Outcome(ready, out.show_status, bool(ready.get("ok")))


def cmd_ingest(args: argparse.Namespace) -> Outcome:
    jobs = [
        _call(args.url, "POST", "/api/v1/jobs/ingest", {"repository": args.repository, "digest": d})
        for d in args.digests
    ]
    if args.wait:
        jobs = _wait_all(args.url, [job["id"] for job in jobs])
    ok = not args.wait or all(job["state"] == "success" for job in jobs)
    if len(jobs) == 1:
        return Outcome(jobs[0], out.show_fields, ok)
    return Outcome(jobs, out.show_jobs, ok)


def _wait_all(base: str, job_ids: list[str]) -> list[dict[str, Any]]:
    """Poll jobs until all end, with one progress bar on stderr."""
    status = Status()
    while True:
        statuses = [_poll(base, f"/api/v1/jobs/{job_id}") for job_id in job_ids]
        done = sum(status["state"] in ("success", "failure") for status in statuses)
        line = f"{bar(done, len(statuses))} {done}/{len(statuses)} jobs done"
        if done == len(statuses):
            status.done(line)
            return statuses
        status.update(line)
        time.sleep(WAIT_POLL_SECONDS)


def cmd_job(args: argparse.Namespace) -> Outcome:
    return Outcome(_call(args.url, "GET", f"/api/v1/jobs/{args.id}"), out.show_fields)


def cmd_warm(args: argparse.Namespace) -> Outcome:
    repository, reference = split_image(args.image)
    body = {"repository": repository, "reference": reference, "platforms": args.platform}
    job = _call(args.url, "POST", "/api/v1/jobs/preconstruct", body)
    if args.wait:
        job = _wait(args.url, job["id"], "layers rebuilt")
    return Outcome(job, out.show_fields, job["state"] != "failure")


def cmd_gc(args: argparse.Namespace) -> Outcome:
    job = _call(args.url, "POST", "/api/v1/jobs/gc", {"dry_run": args.dry_run})
    status = _wait(args.url, job["id"], "steps")
    report = status.get("result")
    ok = status["state"] == "success" and isinstance(report, dict) and not report.get("refused")
    return Outcome(status, out.show_gc, ok)


def cmd_retention(args: argparse.Namespace) -> Outcome:
    if not args.dry_run:
        confirm(args, "delete every tag the retention policy does not keep")
    job = _call(args.url, "POST", "/api/v1/jobs/retention", {"dry_run": args.dry_run})
    status = _wait(args.url, job["id"], "steps")
    return Outcome(status, out.show_retention, status["state"] == "success")


def cmd_verify(args: argparse.Namespace) -> Outcome:
    if args.encoders:
        canaries = _call(args.url, "POST", "/api/v1/encoders/verify", {})
        if args.sample is None and not args.all:
            return Outcome(canaries, out.show_canaries, bool(canaries.get("ok")))
        layers = _verify_layers(args)
        ok = bool(canaries.get("ok")) and verification_passed(layers)
        return Outcome({"encoders": canaries, "layers": layers}, out.show_encoders_and_layers, ok)
    layers = _verify_layers(args)
    return Outcome(layers, out.show_verification, verification_passed(layers))


def _verify_layers(args: argparse.Namespace) -> dict[str, Any]:
    job = _call(args.url, "POST", "/api/v1/jobs/verify", {"sample": args.sample, "all": args.all})
    return _wait(args.url, job["id"], "layers verified")


def verification_passed(status: dict[str, Any]) -> bool:
    """Whether every layer of a verify job was proven (a pending one was not)."""
    return status.get("state") == "success" and all(
        outcome == "verified" for outcome in status.get("layers", {}).values()
    )


def cmd_repo(args: argparse.Namespace) -> Outcome:
    confirm(args, f"delete repository {args.repository} and every tag and manifest in it")
    dropped = _call(args.url, "DELETE", f"/api/v1/repositories/{args.repository}")
    return Outcome(dropped, out.show_fields)


def cmd_reindex(args: argparse.Namespace) -> Outcome:
    job = _call(args.url, "POST", "/api/v1/jobs/reindex", {})
    status = _wait(args.url, job["id"], "objects indexed")
    return Outcome(status, out.show_fields, status["state"] == "success")


def confirm(args: argparse.Namespace, action: str) -> None:
    """Go ahead with a destructive action only when --yes says so or a person at the
    terminal answers yes; off a terminal, without --yes, refuse (UsageRefused)."""
    if args.yes:
        return
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise UsageRefused(f"refusing to {action}: not on a terminal to ask for "
                           "confirmation; pass --yes to go ahead")  # fmt: skip
    print(f"{action}? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise UsageRefused("not confirmed: nothing done")


def _wait(base: str, job_id: str, unit: str) -> dict[str, Any]:
    """Poll a job, with a progress line on stderr, until it ends."""
    started, status = time.monotonic(), Status()
    while True:
        job: dict[str, Any] = _poll(base, f"/api/v1/jobs/{job_id}")
        progress = job.get("progress") or {}
        done, total = progress.get("done", 0), progress.get("total")
        count = f"{bar(done, total)} {done}/{total} {unit}" if total else f"{done} {unit}"
        line = f"{count}  {job['state']}  {time.monotonic() - started:.0f}s"
        if job["state"] in ("success", "failure"):
            status.done(line)
            return job
        status.update(line)
        time.sleep(WAIT_POLL_SECONDS)


def split_image(image: str) -> tuple[str, str]:
    """ "team/app:v1" -> ("team/app", "v1"); "team/app@sha256:..." -> (..., "sha256:...")."""
    if "@" in image:
        repository, reference = image.split("@", 1)
    else:
        repository, _, reference = image.rpartition(":")
        if not repository or "/" in reference:
            repository, reference = image, "latest"
    return repository, reference


COMMANDS: dict[str, Callable[[argparse.Namespace], Outcome]] = {
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
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS,
        help="machine output: ISO 8601 UTC times, true/false flags",
    )  # fmt: skip
    common.add_argument(
        "--user", default=argparse.SUPPRESS, help="user name (default $DUPHUNTER_USER)"
    )
    parser = argparse.ArgumentParser(
        prog="duphunter", description=__doc__, epilog=EPILOG, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    _add_commands(commands, [common])
    replay.add_parser(commands, parents=[common])
    return parser


def _add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    def add(name: str, summary: str) -> argparse.ArgumentParser:
        raw = argparse.RawDescriptionHelpFormatter
        return commands.add_parser(name, parents=parents, help=summary, description=summary,
                                   epilog=EPILOG, formatter_class=raw)  # fmt: skip

    add("status", "is everything up: Redis, S3, workers, encoders (exit 1 if not)")
    add("stats", "what the bucket holds, dedup ratio, failing layers, last GC, buffer")
    add("reindex", "rebuild the Redis index from S3")
    ingest = add(
        "ingest", "queue layers for ingestion (again); a blob that is not a layer is refused"
    )
    ingest.add_argument("repository")
    ingest.add_argument("digests", nargs="+", metavar="digest")
    ingest.add_argument("--wait", action="store_true", help="wait until every layer is done")
    add("job", "the state and result of a job").add_argument("id")
    warm = add("warm", "rebuild an image's deduplicated layers into the layer buffer")
    warm.add_argument("image", help="REPOSITORY:TAG or REPOSITORY@DIGEST")
    lacks = "e.g. linux/amd64 (repeatable); one the image lacks is refused"
    warm.add_argument("--platform", action="append", default=[], help=lacks)
    warm.add_argument("--wait", action="store_true", help="wait until every layer is rebuilt")
    gc = add("gc", "garbage collection now: the total freed, and why nothing when nothing")
    gc.add_argument("--dry-run", action="store_true", help="report what it would free")
    retention = add("retention", "delete the tags the retention policy does not keep")
    retention.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    retention.add_argument("--yes", action="store_true", help="delete without asking")
    verify = add("verify", "prove layers from their packs alone; exit 1 if any is broken")
    scope = verify.add_mutually_exclusive_group()
    scope.add_argument("--sample", type=int, default=None, help="at most N deduplicated layers")
    scope.add_argument(
        "--all", action="store_true", help="every stored blob, deduplicated or intact"
    )
    verify.add_argument("--encoders", action="store_true",
                        help="check every encoder against its canary (then layers, with "
                             "--sample or --all)")  # fmt: skip
    repo = add("repo", "drop a repository (GC frees its bytes)")
    repo.add_argument("action", choices=["delete"])
    repo.add_argument("repository")
    repo.add_argument("--yes", action="store_true", help="delete without asking")


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


def run(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (see EPILOG)."""
    global _credentials
    args = parse(argv)
    _credentials = credentials(args.user)
    if args.command == "replay":
        return replay.run(args)
    try:
        outcome = COMMANDS[args.command](args)
    except UsageRefused as error:
        print(f"duphunter: {error}", file=sys.stderr)
        return 2
    except ApiError as error:
        print(f"duphunter: {error}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(outcome.result, sys.stdout, indent=2)
        print()
    else:
        outcome.show(outcome.result)
    return 0 if outcome.ok else 1


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `duphunter stats | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush fails no more
        code = 141
    raise SystemExit(code)


if __name__ == "__main__":
    main()
