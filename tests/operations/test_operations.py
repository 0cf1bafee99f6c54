"""Running it for real: `make run` under supervisord (crash recovery, one instance, a clean
stop), readiness and metrics, and the operator's CLI."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from deploy.stack import REPO_ROOT, VENV_BIN, free_port, wait_until
from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack
from tests.layers import make_tar, wait_for_layers
from tests.operations.test_run_lifecycle import (
    LocalStack,
    assert_nothing_left,
    drain,
    start,
    temporary_workdir,
)

RECOVERY_SECONDS = 30


def test_metrics_expose_requests_gets_restores_ingests_and_gauges(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    layer = gzip.compress(make_tar({"m.bin": os.urandom(100_000)}), mtime=0)
    (digest,) = [sha256(layer)]
    client.push_image(repo, "m", [layer])
    wait_for_layers(live, [digest])
    assert client.request("GET", f"/v2/{repo}/blobs/{digest}").status == 200
    text = client.request("GET", "/metrics").data.decode()
    for series in (
        'duphunter_http_requests_total{method="GET",route="get_blob",status="200"}',
        "duphunter_http_request_seconds_bucket",
        "duphunter_blob_gets_total{",
        "duphunter_ingest_seconds_count{",  # written by the ingest worker's process
        'duphunter_queue_depth{queue="ingest"}',
        "duphunter_stored_bytes ",
        "duphunter_logical_bytes ",
        "duphunter_dedup_ratio ",
        "duphunter_buffer_bytes ",
        "duphunter_buffer_hit_ratio ",
    ):
        assert series in text, series


def ready(client: RegistryClient) -> tuple[int, dict[str, object]]:
    response = client.request("GET", "/api/v1/ready")
    return response.status, json.loads(response.data)


@pytest.mark.parametrize(
    ("service", "check"),
    [("worker-predict", "queues"), ("s3", "s3"), ("redis", "redis")],
)
def test_readiness_fails_while_a_backend_or_a_consumer_is_gone(
    client: RegistryClient, live: LiveStack, service: str, check: str
) -> None:
    wait_until(lambda: ready(client)[0] == 200, "ready before", timeout=60)
    live.stack.stop_service(service)
    try:  # readiness is answered from a state a few seconds old
        wait_until(lambda: _failing(ready(client)[1], check), f"{check} failing", timeout=30)
        status, body = ready(client)
        assert status == 503 and not body["ok"], body
        checks = body["checks"]
        assert isinstance(checks, dict) and checks[check]["ok"] is False, checks
        assert client.request("GET", "/api/v1/health").status == 200  # liveness stays
        expected = 200 if check == "queues" else 503  # the API pods' probe
        wait_until(
            lambda: client.request("GET", "/api/v1/ready?scope=backends").status == expected,
            "the backends' readiness",
            timeout=30,
        )
    finally:
        live.stack.respawn(service)
    wait_until(lambda: ready(client)[0] == 200, "ready after", timeout=120)


def _failing(body: dict[str, object], check: str) -> bool:
    checks = body["checks"]
    return isinstance(checks, dict) and checks[check]["ok"] is False


def test_cli_json_anywhere_numbers_and_one_line_errors(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    def duphunter(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "duphunter"), *args], capture_output=True, text=True, timeout=120
        )

    stats = duphunter("stats", "--url", live.url, "--json")
    assert stats.returncode == 0, stats.stderr
    assert isinstance(json.loads(stats.stdout)["stored_bytes"], int)
    human = duphunter("--url", live.url, "stats")
    assert ("dedup ratio" in human.stdout and "MiB" in human.stdout) or "KiB" in human.stdout
    status = duphunter("status", "--url", live.url)
    assert status.returncode == 0 and "ready" in status.stdout, status.stdout
    layer = os.urandom(300)
    client.push_image(repo, "cli", [layer])
    queued = json.loads(
        duphunter("--json", "ingest", repo, sha256(layer), "--url", live.url).stdout
    )
    job = json.loads(duphunter("job", queued["id"], "--json", "--url", live.url).stdout)
    assert job["digest"] == sha256(layer) and job["created"].endswith("Z")
    down = duphunter("stats", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert down.stderr.count("\n") == 1 and "cannot reach the API" in down.stderr


# `make run` under supervisord


@pytest.fixture
def local_stack() -> Iterator[LocalStack]:
    """`python -m deploy.local` (what `make run` runs) on free ports in a temporary folder."""
    with temporary_workdir() as workdir:
        stack = start(workdir)
        drain(stack)
        try:
            yield stack
        finally:
            if stack.process.poll() is None:
                os.killpg(stack.process.pid, signal.SIGKILL)


def test_make_run_recovers_from_crashes_and_stops_cleanly(local_stack: LocalStack) -> None:
    """kill -9 of each worker kind and of the API, in the middle of pushes and pulls (and of
    one API worker process during pulls): the stack is whole again within 30 s and every
    image pulls byte-exact; a second `make run` refuses to start; SIGTERM stops everything
    and frees every port."""
    client = RegistryClient(local_stack.url)
    images = {f"run/img{n}": gzip.compress(make_tar({"f": os.urandom(3 << 20)}), mtime=0)
              for n in range(3)}  # fmt: skip
    second = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "deploy.local", "--workdir", str(local_stack.workdir)],
        cwd=REPO_ROOT, env=local_stack.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode != 0 and "already running" in second.stderr + second.stdout
    for number, (program, (repo, layer)) in enumerate(
        zip(("worker-ingest", "api", "worker-restore"), images.items(), strict=False)
    ):
        _push_while_killing(client, local_stack, program, repo, layer)
        del number
    for program in ("worker-predict", "worker-maintenance", "flower", "beat"):
        os.kill(local_stack.pid_of(program), signal.SIGKILL)
    wait_until(local_stack.all_running, "every program back", timeout=RECOVERY_SECONDS)
    wait_for_each = [sha256(layer) for layer in images.values()]
    _wait_dedup(client, wait_for_each)
    for repo, layer in images.items():
        _pull_while_killing(client, local_stack, repo, layer)
        _pull_while_killing_an_api_process(client, local_stack, repo, layer)
    local_stack.process.send_signal(signal.SIGTERM)
    assert_nothing_left(local_stack)


def _push_while_killing(
    client: RegistryClient, stack: LocalStack, program: str, repo: str, layer: bytes
) -> None:
    """Push an image while `program` is killed; push again once it is back if it failed."""
    outcome: list[BaseException | None] = []

    def push() -> None:
        try:
            client.push_image(repo, "v1", [layer])
            outcome.append(None)
        except BaseException as error:  # a push cut by the kill
            outcome.append(error)

    pusher = threading.Thread(target=push)
    pusher.start()
    time.sleep(0.2)
    os.kill(stack.pid_of(program), signal.SIGKILL)
    pusher.join(timeout=120)
    wait_until(stack.all_running, f"{program} back", timeout=RECOVERY_SECONDS)
    if outcome != [None]:
        wait_until(lambda: client.request("GET", "/v2/").status == 200, "the API")
        client.push_image(repo, "v1", [layer])


def _pull_while_killing(client: RegistryClient, stack: LocalStack, repo: str, layer: bytes) -> None:
    os.kill(stack.pid_of("worker-restore"), signal.SIGKILL)
    response = client.request("GET", f"/v2/{repo}/blobs/{sha256(layer)}")
    assert response.status == 200 and bytes(response.data) == layer
    wait_until(stack.all_running, "worker-restore back", timeout=RECOVERY_SECONDS)


def _pull_while_killing_an_api_process(
    client: RegistryClient, stack: LocalStack, repo: str, layer: bytes
) -> None:
    """Pulls under way while one of the API's worker processes is killed: each one gets
    the exact bytes or fails, never other bytes with a success; then pulls work again."""
    outcomes: list[tuple[int, bytes] | BaseException] = []
    digest = sha256(layer)

    def pull() -> None:
        try:
            response = RegistryClient(client.url).request("GET", f"/v2/{repo}/blobs/{digest}")
            outcomes.append((response.status, bytes(response.data)))
        except BaseException as error:  # a connection cut by the kill
            outcomes.append(error)

    pullers = [threading.Thread(target=pull) for _ in range(4)]
    for puller in pullers:
        puller.start()
    api = str(stack.pid_of("api"))
    workers = subprocess.run(["pgrep", "-P", api], capture_output=True, text=True, check=True)
    os.kill(int(workers.stdout.split()[0]), signal.SIGKILL)
    for puller in pullers:
        puller.join(timeout=120)
    for outcome in outcomes:
        if isinstance(outcome, tuple) and outcome[0] == 200:
            assert outcome[1] == layer, "a pull cut by the kill returned other bytes"
    wait_until(stack.all_running, "the API back", timeout=RECOVERY_SECONDS)
    wait_until(lambda: client.request("GET", "/v2/").status == 200, "the API answering")
    response = client.request("GET", f"/v2/{repo}/blobs/{digest}")
    assert response.status == 200 and bytes(response.data) == layer


def _wait_dedup(client: RegistryClient, digests: list[str]) -> None:
    def done() -> bool:
        stats = json.loads(client.request("GET", "/api/v1/stats").data)
        return int(stats["layers"].get("deduplicated", 0)) >= len(digests)

    wait_until(done, "ingest after the crashes", timeout=300)
