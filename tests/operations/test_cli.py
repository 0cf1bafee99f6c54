"""`duphunter` as an operator meets it (issue 19), run as a program against live stacks:
--json everywhere with ISO 8601 times and real booleans, exit codes that say whether
what was asked succeeded, text that shows every problem the JSON holds, progress as
plain lines off a terminal, a quiet end when stdout closes early, confirmation for
destructive verbs, a GC that rides out an API restart, refusals of what cannot be done,
and stats that agree with what S3 really holds (the layer buffer bound included)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from api.presentation import TIME_KEYS
from api.replay.report import render
from deploy.stack import REPO_ROOT, VENV_BIN, free_port, wait_until
from pipelines.formats.digests import digest_key
from pipelines.ingest.ingestor import RETIRE_BLOCKED_KEY
from pipelines.serve.buffer import RANK_KEY, LayerBuffer
from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack, extra_api, own_live_stack
from tests.layers import deduplicated_layer, get, layer_of, random_files
from tests.storage import files_by_pack, fill_whole, hexes, pack_changed

MiB = 1 << 20
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
CONFIG = b'{"architecture":"amd64","os":"linux"}'  # what push_image pushes as the config
DUPHUNTER = [str(VENV_BIN / "duphunter")]
# the venv's `duphunter` imports the package it was installed from: this checkout's instead
CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def duphunter(url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed `duphunter`, off a terminal (stdin from /dev/null, output piped)."""
    return subprocess.run(
        [*DUPHUNTER, "--url", url, *args],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, env=CLI_ENV,
    )  # fmt: skip


def answer(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def epoch_like(value: Any, path: str = "") -> list[str]:
    """Where a number that looks like epoch seconds (2001..2286) sits in a JSON value: a
    time that was not turned into ISO 8601 (byte counts aside)."""
    if isinstance(value, dict):
        return [hit for key, item in value.items() if not str(key).endswith("bytes")
                for hit in epoch_like(item, f"{path}.{key}")]  # fmt: skip
    if isinstance(value, list):
        return [hit for item in value for hit in epoch_like(item, path)]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return [path] if number and 1e9 <= value < 1e10 else []


def times(value: Any) -> list[Any]:
    """Every value under a time key, anywhere in a JSON value."""
    if isinstance(value, dict):
        found = [item for key, item in value.items() if key in TIME_KEYS]
        return found + [hit for item in value.values() for hit in times(item)]
    if isinstance(value, list):
        return [hit for item in value for hit in times(item)]
    return []


def assert_presentable(body: Any) -> None:
    assert epoch_like(body) == []
    assert all(moment is None or ISO_UTC.match(moment) for moment in times(body)), times(body)


def plain_lines(stderr: str) -> None:
    """Progress off a terminal: whole lines, never a carriage-return pile."""
    assert "\r" not in stderr and "\x1b[" not in stderr, repr(stderr[:300])


def test_help_states_the_exit_codes_and_bad_usage_exits_2(live: LiveStack) -> None:
    helped = duphunter(live.url, "--help")
    assert helped.returncode == 0
    assert "exit status" in helped.stdout and "2  usage error" in helped.stdout
    assert "--yes" in duphunter(live.url, "repo", "--help").stdout
    for wrong in (["gc", "--bogus"], ["verify", "--sample", "1", "--all"], ["repo", "delete"]):
        assert duphunter(live.url, *wrong).returncode == 2, wrong
    unknown = duphunter(live.url, "job", "no-such-job")
    assert unknown.returncode == 1 and "unknown job" in unknown.stderr


def test_gc_json_is_iso_and_boolean_and_its_text_names_the_grace(live: LiveStack) -> None:
    dry = duphunter(live.url, "gc", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    job = answer(dry)
    assert job["dry_run"] is True and job["result"]["dry_run"] is True
    assert ISO_UTC.match(job["created"]) and ISO_UTC.match(job["result"]["started"])
    assert isinstance(job["result"]["freed_total_bytes"], int)
    assert_presentable(job)
    plain_lines(dry.stderr)
    assert "steps" in dry.stderr  # the progress, as a plain line

    done = duphunter(live.url, "gc")  # nothing here is older than the stack's 1 h grace
    assert done.returncode == 0, done.stderr
    assert "freed 0 B" in done.stdout
    assert "older than the 1 h grace" in done.stdout
    assert "DUPHUNTER_GC_GRACE_SECONDS" in done.stdout
    plain_lines(done.stderr)

    stats = answer(duphunter(live.url, "stats", "--json"))
    assert ISO_UTC.match(stats["gc"]["started"]) and stats["gc"]["dry_run"] is False
    assert ISO_UTC.match(stats["storage"]["bucket_measured_at"])
    assert_presentable(stats)
    text = duphunter(live.url, "stats").stdout
    assert f"last run {stats['gc']['started']}" in text and "1 h grace" in text


def test_gc_rides_out_an_api_restart(live: LiveStack) -> None:
    """The API is killed while `duphunter gc` polls its job and comes back on the same
    address seconds later: the CLI asks again and ends with the job's result."""
    listen = f"127.0.0.1:{free_port()}"
    gc_lock = live.registry.index.lock("gc", blocking_timeout=5)
    assert gc_lock.acquire()  # the GC waits for it (up to 5 s): the job is still running
    try:
        with extra_api(live, {}, listen=listen):
            cli = subprocess.Popen(
                [*DUPHUNTER, "--url", f"http://{listen}", "--json", "gc"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                text=True, env=CLI_ENV,
            )  # fmt: skip
            assert cli.stderr is not None
            first = cli.stderr.readline()  # the first poll's progress line: the job exists
            assert "steps" in first, first
        # the API is gone (killed); the GC goes on without it
    finally:
        gc_lock.release()
    time.sleep(3)
    with extra_api(live, {}, listen=listen):
        stdout, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 0, stderr
    assert "asking again" in stderr
    job = json.loads(stdout)
    assert job["state"] == "success" and job["result"]["refused"] == ""


def test_stats_text_shows_every_problem_the_json_holds(live: LiveStack, repo: str) -> None:
    client = RegistryClient(live.url)
    files = random_files("stats", 4)
    digest = deduplicated_layer(client, repo, live, layer_of(files))
    (pack,) = [p for p, held in files_by_pack(live, digest).items() if held == hexes(files)]
    kept = f"sha256:{uuid.uuid4().hex * 2}"
    try:
        with pack_changed(live, pack, None):
            assert duphunter(live.url, "verify", "--all").returncode == 1
        # as an encoder whose canary failed records a layer it keeps intact
        live.registry.index.redis.hset(RETIRE_BLOCKED_KEY, kept, "canary of test-encoder failed")
        stats = answer(duphunter(live.url, "stats", "--json"))
        failing = stats["verification"]["failing_layers"]
        assert digest in failing
        text = duphunter(live.url, "stats")
        assert text.returncode == 0, text.stderr
        for shown in (digest, failing[digest], "FAILING LAYERS", kept, "test-encoder failed",
                      "pack garbage", "garbage collection", "evictions", "hits", "misses",
                      "in the bucket", "layer buffer", "of which replicas"):  # fmt: skip
            assert shown in text.stdout, shown
    finally:
        live.registry.index.redis.hdel(RETIRE_BLOCKED_KEY, kept)
    assert duphunter(live.url, "verify", "--all").returncode == 0  # the pack is back
    cleared = answer(duphunter(live.url, "stats", "--json"))
    assert digest not in cleared["verification"]["failing_layers"]
    assert "FAILING LAYERS" not in duphunter(live.url, "stats").stdout


def bucket_listing(live: LiveStack) -> dict[str, int]:
    """Every object in the test bucket and its size, listed with the minio SDK directly."""
    settings = live.settings
    s3 = Minio(settings.s3_endpoint_hostport, access_key=settings.s3_access_key,
               secret_key=settings.s3_secret_key, secure=False,
               region=settings.s3_region)  # fmt: skip
    listed = s3.list_objects(settings.s3_bucket, recursive=True)
    return {str(item.object_name): int(item.size or 0) for item in listed}


def quiet_listing(live: LiveStack) -> dict[str, int]:
    """The bucket's listing once two listings a second apart agree (nothing in flight)."""
    previous: dict[str, int] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = bucket_listing(live)
        if current == previous:
            return current
        previous = current
        time.sleep(1)
    raise TimeoutError("the bucket kept changing")


def test_stats_bucket_total_is_what_s3_holds(live: LiveStack, repo: str) -> None:
    client = RegistryClient(live.url)
    layer = layer_of(random_files("bucket", 6))
    digest = deduplicated_layer(client, repo, live, layer)
    assert get(client, repo, digest)[1] == layer  # a restore fills the layer buffer
    wait_until(lambda: (e := live.registry.buffer.entry(digest)) is not None and e.complete,
               "the buffer entry")  # fmt: skip
    listing = quiet_listing(live)
    stats = answer(duphunter(live.url, "stats", "--json"))
    assert bucket_listing(live) == listing  # nothing changed while stats measured
    storage = stats["storage"]

    def under(prefix: str) -> int:
        return sum(size for key, size in listing.items() if key.startswith(prefix))

    assert storage["bucket_bytes"] == sum(listing.values())
    assert storage["bucket_objects"] == len(listing)
    parts = storage["bucket_parts"]
    assert sum(parts.values()) == storage["bucket_bytes"]
    assert parts["layer_buffer"] == under("buffer/") >= len(layer)
    assert parts["packs"] == under("packs/") > 0
    assert parts["intact_copies"] == under("data/")
    of_intact = storage["intact_copies_of_which"]
    assert of_intact["replicas"] + of_intact["awaiting_deletion"] <= parts["intact_copies"]
    assert stats["stored_bytes"] <= storage["bucket_bytes"] - parts["layer_buffer"]
    assert storage["pushed_per_bucket_byte"] == round(
        stats["logical_bytes"] / storage["bucket_bytes"], 4
    )


def buffer_bytes_in_s3(live: LiveStack, filled: list[str]) -> int:
    """The bytes in S3 of the live buffer's entries and of those `filled` (other tests
    keep buffers of their own, in other Redis databases, in the same bucket)."""
    ranked = live.registry.index.redis.zrange(RANK_KEY, 0, -1)
    entries = {member.decode() for member in ranked} | set(filled)
    prefixes = tuple(digest_key("buffer", digest) + "/" for digest in entries)
    return sum(size for key, size in bucket_listing(live).items() if key.startswith(prefixes))


def fill_random_entries(buffer: LayerBuffer, count: int, size: int) -> list[str]:
    digests = [f"sha256:{os.urandom(32).hex()}" for _ in range(count)]
    for digest in digests:
        fill_whole(buffer, digest, os.urandom(size))
    return digests


def test_a_lowered_buffer_bound_is_enforced_without_a_reindex(live: LiveStack) -> None:
    """Entries filled under a larger bound are evicted down to a lowered one: by an API
    started with it, and by the next fill of a process that has it."""
    bound = 3 * MiB // 2
    filled = fill_random_entries(live.registry.buffer, 3, MiB)
    assert buffer_bytes_in_s3(live, filled) >= 3 * MiB
    with extra_api(live, {"DUPHUNTER_BUFFER_BYTES": str(bound)}):
        pass  # started: the bound is enforced before it serves
    assert buffer_bytes_in_s3(live, filled) <= bound
    assert live.registry.buffer.used_bytes() <= bound

    filled = fill_random_entries(live.registry.buffer, 3, MiB)
    lowered = LayerBuffer(live.registry.store, live.registry.index.redis, bound, 10, 10)
    filled += fill_random_entries(lowered, 1, MiB // 4)
    assert buffer_bytes_in_s3(live, filled) <= bound
    assert lowered.stats()["evicted_to_lowered_bound"] >= 3


def test_stats_into_a_closed_pipe_ends_quietly(live: LiveStack) -> None:
    for args in (["stats"], ["stats", "--json"]):
        reader, writer = os.pipe()
        os.close(reader)  # as `| head` that has read its lines and gone
        done = subprocess.run(
            [*DUPHUNTER, "--url", live.url, *args],
            stdout=writer, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            timeout=120, env=CLI_ENV,
        )  # fmt: skip
        os.close(writer)
        assert done.returncode == 141, done.stderr
        assert done.stderr == ""
    shell = subprocess.run(
        f"'{DUPHUNTER[0]}' --url {live.url} stats | head -n 1",
        shell=True, capture_output=True, text=True, timeout=120, env=CLI_ENV,
    )  # fmt: skip
    assert shell.stdout.strip() == "storage" and "Traceback" not in shell.stderr


def on_a_terminal(live: LiveStack, args: list[str], reply: bytes) -> tuple[int, str]:
    """Run duphunter with a pseudo-terminal as stdin and stderr; answer its question."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*DUPHUNTER, "--url", live.url, *args],
        stdin=terminal, stderr=terminal, stdout=subprocess.PIPE, text=True, env=CLI_ENV,
    )  # fmt: skip
    os.close(terminal)
    seen = b""
    while b"[y/N]" not in seen:
        ready, _, _ = select.select([controller], [], [], 30)
        assert ready, f"no question asked: {seen!r}"
        seen += os.read(controller, 1024)
    os.write(controller, reply)
    process.wait(timeout=60)
    os.close(controller)
    return process.returncode, seen.decode(errors="replace")


def test_repo_delete_asks_on_a_terminal_needs_yes_elsewhere(live: LiveStack, repo: str) -> None:
    client = RegistryClient(live.url)
    client.push_image(repo, "v1", [os.urandom(500)])

    def exists() -> bool:
        return client.request("GET", f"/v2/{repo}/tags/list").status == 200

    refused = duphunter(live.url, "repo", "delete", repo)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert exists()
    code, asked = on_a_terminal(live, ["repo", "delete", repo], b"n\n")
    assert code == 2 and repo in asked and exists()
    code, _asked = on_a_terminal(live, ["repo", "delete", repo], b"y\n")
    assert code == 0 and not exists()
    client.push_image(repo, "v2", [os.urandom(500)])
    deleted = duphunter(live.url, "repo", "delete", repo, "--yes", "--json")
    assert deleted.returncode == 0 and answer(deleted)["objects_dropped"] >= 3
    assert not exists()
    assert duphunter(live.url, "retention").returncode == 2  # destructive too


def test_verify_encoders_honours_sample(live: LiveStack, repo: str) -> None:
    client = RegistryClient(live.url)
    for number in range(2):
        deduplicated_layer(client, f"{repo}-{number}", live, layer_of(random_files("v", 2)))
    for sample in (1, 2):
        done = duphunter(live.url, "verify", "--encoders", "--sample", str(sample), "--json")
        assert done.returncode == 0, done.stderr
        both = answer(done)
        assert both["encoders"]["ok"] is True and both["encoders"]["failed"] == {}
        assert len(both["layers"]["layers"]) == sample
        assert set(both["layers"]["layers"].values()) == {"verified"}
    text = duphunter(live.url, "verify", "--encoders", "--sample", "1").stdout
    assert "encoders passed their canary" in text and "1 of 1 layers verified" in text


def test_warm_refuses_a_platform_the_image_lacks(live: LiveStack, repo: str) -> None:
    client = RegistryClient(live.url)
    client.push_image(repo, "v1", [layer_of(random_files("w", 2))])
    refused = duphunter(live.url, "warm", f"{repo}:v1", "--platform", "linux/s390x")
    assert refused.returncode == 1
    assert "no platform linux/s390x" in refused.stderr and "linux/amd64" in refused.stderr
    warmed = duphunter(live.url, "warm", f"{repo}:v1", "--platform", "linux/amd64", "--json")
    assert warmed.returncode == 0, warmed.stderr
    assert answer(warmed)["state"] == "queued"


def test_ingest_of_a_config_blob_is_refused(live: LiveStack, repo: str) -> None:
    client = RegistryClient(live.url)
    layer = layer_of(random_files("i", 2))
    client.push_image(repo, "v1", [layer], config=CONFIG)
    config = sha256(CONFIG)
    before = live.registry.index.layer(config)
    refused = duphunter(live.url, "ingest", repo, config)
    assert refused.returncode == 1 and "is not a layer" in refused.stderr
    assert live.registry.index.layer(config) == before == {}
    again = duphunter(live.url, "ingest", repo, sha256(layer), "--wait", "--json")
    assert again.returncode == 0, again.stderr
    assert answer(again)["state"] == "success"
    plain_lines(again.stderr)


def catalog(live: LiveStack) -> set[str]:
    body = RegistryClient(live.url).request("GET", "/v2/_catalog").data
    return set(json.loads(body)["repositories"])


def test_replay_json_in_its_own_directory_cleans_up(live: LiveStack, tmp_path: Path) -> None:
    workdir, out_dir = tmp_path / "cwd", tmp_path / "out"
    workdir.mkdir()
    before = catalog(live)
    arguments = ["--seed", "5", "--duration-s", "6", "--clients", "3", "--repositories", "2"]
    arguments += ["--layers-per-image", "2", "--layer-mb", "0.05", "--mean-interval-s", "2"]
    arguments += ["--new-tag-interval-s", "0", "--cache", str(tmp_path / "cache")]
    done = subprocess.run(
        [*DUPHUNTER, "--url", live.url, "replay", "synthetic", *arguments,
         "--out-dir", str(out_dir), "--json"],
        cwd=workdir, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
        env=CLI_ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["layer_gets"]["count"] > 0 and "gets" not in summary
    assert Path(summary["result_file"]).parent == out_dir
    assert sorted(path.name for path in out_dir.iterdir()) == ["latency.png", "result.json"]
    assert list(workdir.iterdir()) == []  # nothing written where it ran
    assert ISO_UTC.match(summary["finished"])
    plain_lines(done.stderr)
    assert catalog(live) - before == set()  # the repositories it created are gone
    text = render(json.loads(Path(summary["result_file"]).read_text()))
    assert not re.search(r"\de[+-]\d", text) and "KiB" in text


def test_a_replay_too_short_for_any_pull_says_so_and_exits_1(live: LiveStack) -> None:
    done = duphunter(live.url, "replay", "synthetic", "--duration-s", "0.5", "--clients", "1")
    assert done.returncode == 1
    assert "nothing to replay" in done.stderr and "0 clients" not in done.stdout


@pytest.fixture(scope="module")
def policy_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """A stack whose retention policy keeps the newest tag of cli-ret/*."""
    workdir = tmp_path_factory.mktemp("cli-policy-stack")
    policy = workdir / "retention.json"
    policy.write_text(json.dumps({"rules": [{"repositories": "cli-ret/*", "keep_last": 1}]}))
    with own_live_stack(workdir, {"DUPHUNTER_RETENTION_POLICY": str(policy)}) as live:
        yield live


def test_retention_says_what_it_would_delete_and_what_it_deleted(
    policy_live: LiveStack,
) -> None:
    live, client = policy_live, RegistryClient(policy_live.url)
    for number in range(1, 4):
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": number}).encode()
        client.push_image("cli-ret/app", f"t{number}", [os.urandom(300)], config=config)
        time.sleep(1.1)  # tag times are S3's LastModified, to the second

    def tags() -> list[str]:
        body = client.request("GET", "/v2/cli-ret/app/tags/list").data
        return sorted(json.loads(body)["tags"])

    dry = duphunter(live.url, "retention", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete 2 tags (dry run: nothing deleted)" in dry.stdout
    assert "cli-ret/app: t1, t2" in dry.stdout and tags() == ["t1", "t2", "t3"]
    dry_json = answer(duphunter(live.url, "retention", "--dry-run", "--json"))
    assert dry_json["dry_run"] is True and dry_json["result"] == {"cli-ret/app": ["t1", "t2"]}
    assert duphunter(live.url, "retention").returncode == 2 and len(tags()) == 3
    done = duphunter(live.url, "retention", "--yes")
    assert done.returncode == 0, done.stderr
    assert "deleted 2 tags" in done.stdout and "would" not in done.stdout
    assert tags() == ["t3"]
    nothing = duphunter(live.url, "retention", "--yes")
    assert "nothing to delete" in nothing.stdout
