"""Encoder canaries: every encoder id has one, a drifted encoder fails it, and a failed or
missing canary turns readiness red and keeps intact copies, while pulls stay byte-exact.

No mocks: the helpers are the ones build.sh makes; a drifted one is a real wrapper that
makes the real program write other bytes; GNU gzip and pigz run for real."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from deploy.stack import REPO_ROOT, wait_until
from pipelines.encoders import canaries
from pipelines.encoders.canaries import (
    CANARY_FILE,
    CANARY_KEY,
    STARTS_KEY,
    canary_input,
    check_all,
    default_params,
    load_canaries,
    produce,
    registered_ids,
    retirement_blocker,
)
from pipelines.encoders.gzip_families import GZIP_TRAILER_LEN
from pipelines.ingest.ingestor import RETIRE_BLOCKED_KEY
from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack, PausePoints, extra_api
from tests.layers import make_tar, push_layers, wait_for_layers, wait_until_retired

GNU_LEVEL6 = "gzip/gnu-1.12/level6"
ABANDONING = "encoder canary checks not yet begun are skipped"


def test_canary_file_covers_every_encoder_id(helper_dir: Path) -> None:
    recorded = load_canaries()
    ids = registered_ids()
    assert len(ids) == len(set(ids)), "encoder ids must be unique"
    assert set(ids) <= set(recorded), sorted(set(ids) - set(recorded))
    assert set(recorded) <= set(ids), (
        f"canaries of ids no longer registered: {set(recorded) - set(ids)}"
    )
    assert {c.sha256 for c in recorded.values() if c.encoder_id.startswith("gzip/gnu")}


def test_canary_file_is_package_data() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert CANARY_FILE.name in project["tool"]["setuptools"]["package-data"]["pipelines.encoders"]
    assert CANARY_FILE.parent == REPO_ROOT / "pipelines" / "encoders"


def test_every_encoder_passes_its_canary(helper_dir: Path) -> None:
    failed = {encoder_id: reason for encoder_id, reason in check_all().items() if reason}
    assert not failed


@pytest.mark.parametrize(
    ("argv", "encoder_id"),
    [
        (["gzip", "-n", "-6"], "gzip/gnu-1.12/level6"),
        (["gzip", "-n", "-9"], "gzip/gnu-1.12/level9"),
        (["gzip", "-n", "-1"], "gzip/gnu-1.12/level1"),
        (["pigz", "-n", "-6"], "gzip/pigz-2.6-zlib-1.2.13/level6"),
        (["pigz", "-n", "-1", "-p", "4"], "gzip/pigz-2.6-zlib-1.2.13/level1"),
        (["pigz", "-n", "-1", "-p", "1"], "gzip/pigz-2.6-zlib-1.2.13/single/level1"),
    ],
)
def test_program_canaries_are_what_the_real_programs_write(
    helper_dir: Path, argv: list[str], encoder_id: str
) -> None:
    """The canary of a program's id is what the host's Debian program writes (installed
    by deploy/system-deps.sh test), not merely what our build writes."""
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    member = subprocess.run([*argv, "-c"], input=canary_input(), capture_output=True, check=True)
    body = member.stdout[10:-GZIP_TRAILER_LEN]
    params = default_params(encoder_id)
    header = params[6:-GZIP_TRAILER_LEN]
    expected = sha256(header + body + bytes(GZIP_TRAILER_LEN)).removeprefix("sha256:")
    assert load_canaries()[encoder_id].sha256 == expected
    assert produce(encoder_id, params) == expected


@pytest.mark.parametrize(
    ("options", "encoder_id"),
    [
        ([], "zstd/cli-1.5.4/level3"),
        (["-19", "--long"], "zstd/cli-1.5.4/level19-long"),
        (["--single-thread"], "zstd/cli-1.5.4/level3-single"),
        (["-19", "--single-thread"], "zstd/cli-1.5.4/level19-single"),
    ],
)
def test_zstd_cli_canaries_are_what_the_real_program_writes(
    helper_dir: Path, options: list[str], encoder_id: str
) -> None:
    if shutil.which("zstd") is None:
        pytest.skip("zstd is not installed")
    data = canary_input()
    argv = ["zstd", "-q", "-c", *options, f"--stream-size={len(data)}", "-"]
    frame = subprocess.run(argv, input=data, capture_output=True, check=True).stdout
    expected = sha256(frame).removeprefix("sha256:")
    assert load_canaries()[encoder_id].sha256 == expected
    assert produce(encoder_id, default_params(encoder_id)) == expected


def test_tampered_canary_fails(helper_dir: Path, tmp_path: Path) -> None:
    document = json.loads(CANARY_FILE.read_text())
    document["canaries"][GNU_LEVEL6]["sha256"] = "0" * 64
    tampered = tmp_path / "canaries.json"
    tampered.write_text(json.dumps(document))
    results = check_all(load_canaries(tampered))
    assert results[GNU_LEVEL6].startswith("drifted")
    assert not results["gzip/gnu-1.12/level5"] and not results["gzip/zlib-1.2.13/6"]
    del document["canaries"][GNU_LEVEL6]
    tampered.write_text(json.dumps(document))
    assert "no canary recorded" in check_all(load_canaries(tampered))[GNU_LEVEL6]


def drifted_helpers(helper_dir: Path, directory: Path) -> Path:
    """A copy of the helper directory whose GNU gzip is a wrapper that makes the real one
    write other bytes (--rsyncable), while it still says it is gzip 1.12."""
    directory.mkdir()
    for entry in helper_dir.iterdir():
        (directory / entry.name).symlink_to(entry)
    wrapper = directory / "gzip-gnu-1.12"
    wrapper.unlink()
    wrapper.write_text(f'#!/bin/sh\nexec "{helper_dir / "gzip-gnu-1.12"}" --rsyncable "$@"\n')
    wrapper.chmod(0o755)
    return directory


def test_replaced_helper_fails_its_canaries(
    helper_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DUPHUNTER_HELPER_DIR", str(drifted_helpers(helper_dir, tmp_path / "h")))
    results = check_all()
    failed = sorted(encoder_id for encoder_id, reason in results.items() if reason)
    assert failed == sorted(i for i in registered_ids() if i.startswith("gzip/gnu-1.12/"))
    assert all(results[i].startswith("drifted") for i in failed)
    monkeypatch.setenv("DUPHUNTER_HELPER_DIR", str(tmp_path / "nothing-here"))
    assert check_all()[GNU_LEVEL6].startswith("missing")


def test_workers_check_the_canaries_at_start(live: LiveStack) -> None:
    """A worker started anew checks every encoder (whatever the session's first start
    did: its check may have run before a test emptied Redis, or may still be running)."""
    redis = live.registry.index.redis
    live.stack.stop_service("worker-predict")
    redis.delete(STARTS_KEY, CANARY_KEY, f"{CANARY_KEY}:started:{socket.gethostname()}")
    live.stack.respawn("worker-predict")
    wait_until(lambda: bool(redis.hlen(STARTS_KEY)), "a check at worker start", 180)
    assert redis.hlen(CANARY_KEY) >= len(registered_ids())


def test_a_worker_stopped_during_its_start_check_abandons_it(
    live: LiveStack, live_points: PausePoints
) -> None:
    """SIGTERM while the check at start runs: the worker ends (status 0) once its checks
    in flight end, without running the others; nothing is recorded, and the next start
    checks every encoder. Before, it ran all ~160 first: longer than supervisord's stop
    timeout on a loaded host, which then killed it."""
    redis = live.registry.index.redis
    lock = f"{CANARY_KEY}:started:{socket.gethostname()}"
    log = live.stack.workdir / "worker-predict.log"
    live.stack.stop_service("worker-predict")
    redis.delete(STARTS_KEY, CANARY_KEY, lock)
    live_points.hold("canaries.check")
    logged_before = log.read_text(errors="replace").count(ABANDONING)
    live.stack.respawn("worker-predict")
    live_points.wait_reached("canaries.check", timeout=180)
    live.stack.signal_service("worker-predict", signal.SIGTERM)
    wait_until(lambda: log.read_text(errors="replace").count(ABANDONING) > logged_before,
               "the worker's shutdown to begin", 60)  # fmt: skip
    live_points.release("canaries.check")
    assert live.stack.wait_service("worker-predict", timeout=60) == 0
    assert "encoder canary check abandoned" in log.read_text(errors="replace")
    assert not redis.exists(CANARY_KEY, STARTS_KEY, lock)
    live.stack.respawn("worker-predict")
    wait_until(lambda: bool(redis.hlen(STARTS_KEY)), "a check at the next start", 180)
    assert redis.hlen(CANARY_KEY) >= len(registered_ids())


def test_retirement_blocker_reads_the_recorded_results(live: LiveStack) -> None:
    redis = live.registry.index.redis
    assert retirement_blocker(redis, "gzip/never-checked/level1") is not None
    assert live.registry.check_encoder_canaries()["ok"]
    assert retirement_blocker(redis, GNU_LEVEL6) is None
    assert redis.hget(CANARY_KEY, GNU_LEVEL6) == b"ok"


def gnu_gzip_layer(tar: bytes) -> bytes:
    return subprocess.run(["gzip", "-n", "-c"], input=tar, capture_output=True, check=True).stdout


def verify_encoders(client: RegistryClient) -> dict[str, Any]:
    response = client.request("POST", "/api/v1/encoders/verify", b"{}")
    assert response.status == 200, response.data
    return dict(json.loads(response.data))


def test_failed_canary_turns_health_red_and_keeps_intact_copies(
    live: LiveStack, client: RegistryClient, repo: str, helper_dir: Path, tmp_path: Path
) -> None:
    """An API whose GNU gzip drifted runs `verify --encoders`: readiness turns red, a GNU
    gzip layer is deduplicated but keeps its intact copy (and pulls exactly from it); once
    the right build passes again, the copy is retired and the layer restores exactly."""
    if shutil.which("gzip") is None:
        pytest.skip("gzip is not installed")
    env = {"DUPHUNTER_HELPER_DIR": str(drifted_helpers(helper_dir, tmp_path / "h"))}
    redis = live.registry.index.redis
    wait_until(lambda: bool(redis.exists(CANARY_KEY)), "the workers' check at start", 180)
    try:
        with extra_api(live, env) as drifted:
            report = verify_encoders(drifted)
        assert not report["ok"]
        failed = report["failed"]
        assert isinstance(failed, dict) and GNU_LEVEL6 in failed, report
        assert all(encoder_id.startswith("gzip/gnu-1.12/") for encoder_id in failed)
        # readiness is answered from a state a few seconds old
        wait_until(lambda: client.request("GET", "/api/v1/ready").status == 503, "red", 30)
        ready = client.request("GET", "/api/v1/ready")
        assert GNU_LEVEL6 in json.loads(ready.data)["checks"]["encoders"]["error"]

        files = {f"usr/share/doc/f{n}.txt": os.urandom(2000).hex().encode() for n in range(60)}
        layer = gnu_gzip_layer(make_tar(files))
        (digest,) = push_layers(client, repo, [layer])
        record = wait_for_layers(live, [digest])[digest]
        assert record["state"] == "deduplicated" and record["encoder"] == GNU_LEVEL6, record
        wait_until(lambda: redis.hget(RETIRE_BLOCKED_KEY, digest) is not None, "blocked retire")
        assert GNU_LEVEL6 in redis.hget(RETIRE_BLOCKED_KEY, digest).decode()  # type: ignore[union-attr]
        info = live.registry.blobs.stored_info(digest)
        assert info is not None and info.deduplicated and info.retired  # the copy is kept
        assert live.registry.ingestor.retire_intact_copy(digest) == 0  # a demotion, blocked
        pulled = client.request("GET", f"/v2/{repo}/blobs/{digest}")
        assert pulled.status == 200 and pulled.data == layer
        assert digest in live.registry.stats()["intact_copies_kept_for_canaries"]
    finally:
        report = verify_encoders(client)  # the stack's own, right build
    assert report["ok"], report
    assert report["retirements_queued"] >= 1  # the kept copy goes now
    wait_until(lambda: client.request("GET", "/api/v1/ready").status == 200, "green", 30)
    wait_until_retired(live, digest)
    assert live.registry.index.redis.hget(RETIRE_BLOCKED_KEY, digest) is None
    time.sleep(live.settings.restore_keep_seconds + 0.5)  # no spool copy left
    pulled = client.request("GET", f"/v2/{repo}/blobs/{digest}")
    assert pulled.status == 200 and sha256(pulled.data) == digest and pulled.data == layer


def test_cli_verify_encoders(live: LiveStack) -> None:
    done = subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "duphunter"), "verify", "--encoders", "--url", live.url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    checked = len(canaries.registered_ids())
    assert f"{checked} of {checked} encoders passed their canary" in done.stdout
