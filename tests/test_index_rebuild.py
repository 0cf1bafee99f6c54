"""The Redis index rebuilt from S3, on a stack of its own (its Redis is flushed here):
`duphunter reindex` ends with its job's result; a rebuild never runs beside another."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from deploy.stack import VENV_BIN, Stack, wait_until
from tests.client import OCI_MANIFEST, RegistryClient, sha256
from tests.conftest import LiveStack, start_live_stack
from tests.test_dedup import make_tar

KiB = 1 << 10


@pytest.fixture(scope="module")
def index_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    workdir = tmp_path_factory.mktemp("index-stack")
    with Stack(workdir) as stack:
        yield start_live_stack(stack, workdir, {"DUPHUNTER_PREDICTOR": "none"})


@dataclass(frozen=True)
class Pushed:
    repo: str
    tag: str
    manifest: bytes
    layer: bytes

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


@pytest.fixture(scope="module")
def pushed(index_live: LiveStack) -> Pushed:
    """One image whose layer is deduplicated and whose intact copy is gone: S3 holds it
    as files and a recipe, the Redis index points to them."""
    live, client = index_live, RegistryClient(index_live.url)
    layer = gzip.compress(make_tar({f"f{n}": os.urandom(20 * KiB) for n in range(4)}), mtime=0)
    client.push_image("rebuild/app", "v1", [layer])
    wait_until(lambda: live.registry.index.layer(sha256(layer)).get("state") == "deduplicated",
               "dedup", timeout=180)  # fmt: skip
    wait_until(lambda: _retired(live, sha256(layer)), "intact copy retired", timeout=60)
    manifest = client.request("GET", "/v2/rebuild/app/manifests/v1", headers={
        "Accept": OCI_MANIFEST}).data  # fmt: skip
    return Pushed("rebuild/app", "v1", manifest, layer)


def _retired(live: LiveStack, digest: str) -> bool:
    info = live.registry.blobs.stored_info(digest)
    return info is not None and not info.segments and not info.retired


def duphunter(live: LiveStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "duphunter"), "--url", live.url, *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_cli_reindex_ends_with_the_jobs_result(index_live: LiveStack, pushed: Pushed) -> None:
    done = duphunter(index_live, "--json", "reindex")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["kind"] == "reindex" and job["state"] == "success"
    assert (job["result"]["tags"], job["result"]["manifests_linked"]) == (1, 1)
    assert index_live.registry.index.is_ready()
    human = duphunter(index_live, "reindex")
    assert human.returncode == 0, human.stderr
    assert "success" in human.stdout and '"tags": 1' in human.stdout
    client = RegistryClient(index_live.url)
    assert client.request("GET", f"/v2/{pushed.repo}/blobs/{sha256(pushed.layer)}").data == (
        pushed.layer
    )


def test_a_rebuild_waits_for_the_one_running(index_live: LiveStack, pushed: Pushed) -> None:
    """Two rebuilds at once would clear each other's entries: the reindex job waits for
    the rebuild lock (here held by the test, standing for another process's rebuild)."""
    client, index = RegistryClient(index_live.url), index_live.registry.index
    with index.lock("rebuild-index", timeout=120, blocking_timeout=5):
        job_id = json.loads(client.request("POST", "/api/v1/jobs/reindex", b"{}").data)["id"]
        wait_until(lambda: job_state(client, job_id) == "started", "reindex job started")
        time.sleep(2)
        assert job_state(client, job_id) == "started"
        assert index.is_ready()  # nothing cleared
    wait_until(lambda: job_state(client, job_id) == "success", "reindex job done")
    assert client.request("GET", f"/v2/{pushed.repo}/manifests/{pushed.tag}").data == (
        pushed.manifest
    )


def job_state(client: RegistryClient, job_id: str) -> str:
    return str(json.loads(client.request("GET", f"/api/v1/jobs/{job_id}").data)["state"])
