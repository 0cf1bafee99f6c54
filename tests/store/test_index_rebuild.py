"""The Redis index rebuilt from S3, on a stack of its own (its Redis is flushed here):
`duphunter reindex` ends with its job's result; a rebuild never runs beside another; while
the index is incomplete (Redis lost its keys, a rebuild runs) a lookup that misses answers
503, never 404, and the registry asks for one rebuild by itself."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.stack import VENV_BIN, wait_until
from pipelines.pauses import PAUSE_DIR_VARIABLE
from pipelines.store.index import Index
from tests.client import OCI_MANIFEST, RegistryClient, error_codes, sha256
from tests.conftest import LiveStack, PausePoints, own_live_stack
from tests.layers import make_tar

KiB = 1 << 10


@pytest.fixture(scope="module")
def index_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    workdir = tmp_path_factory.mktemp("index-stack")
    with own_live_stack(workdir, {"DUPHUNTER_PREDICTOR": "none"}) as live:
        yield live


@dataclass(frozen=True)
class Pushed:
    repo: str
    tag: str
    manifest: bytes
    layer: bytes

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    def lookups(self) -> list[str]:
        """A GET of each: the manifest by tag and by digest, the layer, the tag list."""
        base = f"/v2/{self.repo}"
        return [
            f"{base}/manifests/{self.tag}",
            f"{base}/manifests/{self.digest}",
            f"{base}/blobs/{sha256(self.layer)}",
            f"{base}/tags/list",
        ]


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
    with index.lock("rebuild-index", blocking_timeout=5):
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


def test_while_redis_lost_its_keys_lookups_answer_503_until_rebuilt_by_itself(
    index_live: LiveStack, pushed: Pushed
) -> None:
    live, client, index = index_live, RegistryClient(index_live.url), index_live.registry.index
    assert not live.settings.redis_url.startswith("redis://127.0.0.1:6379/")  # the stack's own
    live.stack.kill("worker-maintenance")  # nothing rebuilds until it is back
    try:
        index.redis.flushall()
        assert_unavailable(client, pushed.lookups() * 10)
        assert [job["trigger"] for job in reindex_jobs(index)] == ["index incomplete"]
    finally:
        live.stack.respawn("worker-maintenance")
    wait_until(lambda: index.is_ready(), "the index rebuilt by itself", timeout=120)
    assert_served(client, pushed)
    (job_id,) = [job["id"] for job in reindex_jobs(index)]
    wait_until(lambda: job_state(client, job_id) == "success", "its job's record")


def test_while_a_rebuild_runs_lookups_answer_503_and_ask_for_no_other(
    index_live: LiveStack, pushed: Pushed
) -> None:
    client, index = RegistryClient(index_live.url), index_live.registry.index
    before = {job["id"] for job in reindex_jobs(index)}
    with index.lock("rebuild-index", blocking_timeout=5):
        index.clear()  # as a rebuild running elsewhere does first
        assert_unavailable(client, pushed.lookups() * 5)
        assert {job["id"] for job in reindex_jobs(index)} == before
    # That rebuild died (its lock released, the index incomplete): the next miss asks.
    assert_unavailable(client, pushed.lookups()[:1])
    wait_until(lambda: index.is_ready(), "the index rebuilt by itself", timeout=120)
    assert_served(client, pushed)
    assert len({job["id"] for job in reindex_jobs(index)} - before) == 1


def test_an_index_that_lost_its_keys_is_rebuilt_with_no_lookup_asking(
    index_live: LiveStack, pushed: Pushed
) -> None:
    """Pushes do not meet an incomplete index (they check S3 instead): a watch on the
    maintenance queue asks for the rebuild."""
    index = index_live.registry.index
    wait_until(lambda: index.is_ready(), "the index complete")
    index.redis.flushall()
    wait_until(lambda: index.is_ready(), "the index rebuilt by itself", timeout=120)
    assert [job["trigger"] for job in reindex_jobs(index)] == ["index incomplete"]
    assert_served(RegistryClient(index_live.url), pushed)


def test_a_rebuild_that_redis_loses_keys_under_leaves_the_index_incomplete(
    index_live: LiveStack, pushed: Pushed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its entries made before the loss are gone: it must not call the index complete."""
    points = PausePoints(tmp_path / "pauses")
    monkeypatch.setenv(PAUSE_DIR_VARIABLE, str(points.directory))
    registry, index = index_live.registry, index_live.registry.index
    wait_until(lambda: index.is_ready(), "the index complete")
    points.hold("rebuild.filled")
    with ThreadPoolExecutor(1) as pool:
        rebuild = pool.submit(registry.rebuild_index)
        points.wait_reached("rebuild.filled")
        index.redis.flushall()
        points.release("rebuild.filled")
        with pytest.raises(RuntimeError, match="lost keys while the index was rebuilt"):
            rebuild.result(timeout=60)
    monkeypatch.delenv(PAUSE_DIR_VARIABLE)
    wait_until(lambda: index.is_ready(), "the index rebuilt again by itself", timeout=120)
    assert_served(RegistryClient(index_live.url), pushed)


def test_what_is_unknown_is_404_once_the_index_is_complete(
    index_live: LiveStack, pushed: Pushed
) -> None:
    client, index = RegistryClient(index_live.url), index_live.registry.index
    wait_until(lambda: index.is_ready(), "the index complete")
    unknown_digest = sha256(b"never pushed")
    expected = {
        f"/v2/{pushed.repo}/manifests/v2": "MANIFEST_UNKNOWN",
        f"/v2/{pushed.repo}/manifests/{unknown_digest}": "MANIFEST_UNKNOWN",
        f"/v2/{pushed.repo}/blobs/{unknown_digest}": "BLOB_UNKNOWN",
        "/v2/rebuild/nothing-here/tags/list": "NAME_UNKNOWN",
    }
    for path, code in expected.items():
        answer = client.request("GET", path)
        assert (answer.status, error_codes(answer)) == (404, [code]), path


def assert_unavailable(client: RegistryClient, paths: list[str]) -> None:
    """Each GET (and HEAD, for manifests and blobs) answers 503 UNAVAILABLE with a
    Retry-After, many at once."""
    heads = [path for path in paths if "/tags/" not in path]
    with ThreadPoolExecutor(8) as pool:
        gets = list(pool.map(lambda path: client.request("GET", path), paths))
        head_answers = list(pool.map(lambda path: client.request("HEAD", path), heads))
    for path, answer in zip(paths, gets, strict=True):
        assert (answer.status, error_codes(answer)) == (503, ["UNAVAILABLE"]), path
        assert answer.headers["Retry-After"] == "5"
    assert {answer.status for answer in head_answers} == {503}


def assert_served(client: RegistryClient, pushed: Pushed) -> None:
    """The manifest, by tag and by digest, the layer and the tag list, as pushed."""
    by_tag, by_digest, blob, tags = (
        client.request("GET", path, headers={"Accept": OCI_MANIFEST}) for path in pushed.lookups()
    )
    for manifest in (by_tag, by_digest):
        assert (manifest.status, manifest.data) == (200, pushed.manifest)
        assert manifest.headers["Docker-Content-Digest"] == pushed.digest
    assert (blob.status, sha256(blob.data)) == (200, sha256(pushed.layer))
    assert json.loads(tags.data)["tags"] == [pushed.tag]


def reindex_jobs(index: Index) -> list[dict[str, str]]:
    """The records of the rebuilds the registry asked for by itself."""
    job_ids = [key.decode().removeprefix("dh:job:") for key in index.redis.scan_iter("dh:job:*")]
    records = [{"id": job_id, **index.job(job_id)} for job_id in job_ids]
    return [record for record in records if record.get("trigger") == "index incomplete"]
