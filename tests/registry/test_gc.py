"""Online garbage collection on a stack of its own: what it frees is exactly what no image
needs (a reference set computed here, from the tars pushed), while pushes that share files
with the deleted images go on; a compacted pack serves the files it kept; a GC killed
halfway loses nothing and the next run finishes."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from deploy.stack import VENV_BIN, wait_until
from pipelines.store.filestore import read_pack_table
from pipelines.store.leases import Lease
from tests.client import (
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
    descriptor,
    image_manifest,
    sha256,
)
from tests.conftest import LiveStack, own_live_stack
from tests.layers import make_tar
from tests.registry.conftest import GC_STACK_SETTINGS
from workers.app import make_celery

KiB = 1 << 10


@pytest.fixture(scope="module")
def gc_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    workdir = tmp_path_factory.mktemp("gc-stack")
    policy = workdir / "retention.json"
    policy.write_text(json.dumps({"rules": [{"repositories": "ret/*", "keep_last": 2}]}))
    settings = {
        **GC_STACK_SETTINGS,
        "DUPHUNTER_GC_GRACE_SECONDS": "4",  # pushes finish well within it
        "DUPHUNTER_GC_UNTAGGED": "1",
        "DUPHUNTER_RETENTION_POLICY": str(policy),
    }
    with own_live_stack(workdir, settings) as live:
        yield live


@dataclass
class Image:
    repo: str
    files: dict[str, bytes]
    layer: bytes

    @property
    def digest(self) -> str:
        return sha256(self.layer)

    def file_hexes(self) -> set[str]:
        return {hashlib.sha256(content).hexdigest() for content in self.files.values()}


def make_image(repo: str, shared: dict[str, bytes], own_files: int) -> Image:
    files = dict(shared, **{f"own/{n}": os.urandom(20 * KiB) for n in range(own_files)})
    return Image(repo, files, gzip.compress(make_tar(files), compresslevel=1, mtime=0))


def push_and_wait(client: RegistryClient, live: LiveStack, image: Image) -> None:
    client.push_image(image.repo, "v1", [image.layer])
    wait_until(lambda: live.registry.index.layer(image.digest).get("state") == "deduplicated",
               "dedup", timeout=180)  # fmt: skip
    wait_until(lambda: _retired(live, image.digest), "retire", timeout=60)


def _ingested(live: LiveStack, digest: str) -> bool:
    info = live.registry.blobs.stored_info(digest)
    return info is not None and info.deduplicated and not info.segments and not info.retired


def _retired(live: LiveStack, digest: str) -> bool:
    info = live.registry.blobs.stored_info(digest)
    return info is not None and not info.retired


def settle(live: LiveStack, runs: int = 4) -> None:
    """GC again, a grace apart, until no pack holds a dead copy and no compacted pack
    waits for deletion: what a GC left for later, the next ones finish."""
    for _run in range(runs):
        time.sleep(live.settings.gc_grace_seconds + 1)
        run_gc(live)
        deferred = list(live.registry.store.list("gc/deferred/"))
        if not deferred and live.registry.files.audit().dead_bytes == 0:
            return


def run_gc(live: LiveStack, dry_run: bool = False) -> dict[str, Any]:
    result = make_celery(live.settings).send_task("workers.tasks.collect_garbage", args=(dry_run,))
    return dict(result.get(timeout=600))


def stored_state(live: LiveStack) -> tuple[set[str], set[str], set[str]]:
    """Blob digests with a descriptor, file digests indexed, file digests in pack tables."""
    store = live.registry.store
    blobs = {"sha256:" + key.rsplit("/", 1)[1] for key, _s in store.list("blobs/sha256/")}
    indexed = {h.decode() for h in live.registry.index.redis.hkeys("dh:files")}
    packed = {
        digest.hex()
        for key, size in store.list("packs/")
        for digest, _loc in read_pack_table(store, key, size)
    }
    return blobs, indexed, packed


def delete_image(client: RegistryClient, image: Image) -> None:
    manifest = client.request("GET", f"/v2/{image.repo}/manifests/v1", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})  # fmt: skip
    digest = manifest.headers["Docker-Content-Digest"]
    assert client.request("DELETE", f"/v2/{image.repo}/manifests/{digest}").status == 202


def test_gc_frees_exactly_what_no_image_needs_while_pushes_go_on(gc_live: LiveStack) -> None:
    live = gc_live
    client = RegistryClient(live.url)
    shared = {f"lib/{n}.so": os.urandom(30 * KiB) for n in range(40)}
    doomed = [make_image(f"gc/old{n}", shared, own_files=30) for n in range(3)]
    kept = [make_image(f"gc/keep{n}", dict(list(shared.items())[:20]), own_files=10)
            for n in range(2)]  # fmt: skip
    for image in doomed + kept:
        push_and_wait(client, live, image)
    for image in doomed:
        delete_image(client, image)
    time.sleep(5)  # past the grace window: the deleted images are candidates now
    later = [make_image(f"gc/new{n}", shared, own_files=5) for n in range(3)]
    pushers = [threading.Thread(target=push_and_wait, args=(RegistryClient(live.url), live, i))
               for i in later]  # fmt: skip
    for pusher in pushers:
        pusher.start()
    report = run_gc(live)
    for pusher in pushers:
        pusher.join()
    settle(live)
    survivors = kept + later
    blobs, indexed, packed = stored_state(live)
    wanted_files = set().union(*(image.file_hexes() for image in survivors))
    config = sha256(b'{"architecture":"amd64","os":"linux"}')
    assert blobs == {image.digest for image in survivors} | {config}, report
    assert indexed == wanted_files, (len(indexed - wanted_files), len(wanted_files - indexed))
    assert packed == wanted_files  # every dead copy freed, every live one kept once
    assert int(report["blobs"]) >= len(doomed) and int(report["packs_compacted"]) >= 1
    time.sleep(live.settings.restore_keep_seconds + 0.5)
    for image in survivors:  # restored from the compacted packs
        response = client.request("GET", f"/v2/{image.repo}/blobs/{image.digest}")
        assert response.status == 200 and response.data == image.layer
    assert live.registry.files.audit().dead_bytes == 0, _pack_ages(live)


def _pack_ages(live: LiveStack) -> list[tuple[str, float, int, int]]:
    """Per pack: key, age in seconds, live and dead entries (for a failure message)."""
    out = []
    store, index = live.registry.store, live.registry.index
    for listed in store.listing("packs/"):
        table = read_pack_table(store, listed.key, listed.size)
        where = index.file_locations([digest.hex() for digest, _loc in table])
        alive = sum(found == loc.encode() for (_d, loc), found in zip(table, where, strict=True))
        out.append((listed.key, round(time.time() - listed.modified, 1), alive, len(table) - alive))
    return out


def test_the_gc_lease_is_renewed_from_another_thread(gc_live: LiveStack) -> None:
    """A GC longer than its lease keeps its lock: the renewing thread is not the one that
    took it (a thread-local lock token made every GC over 60 s fail at its end)."""
    lock = Lease(gc_live.registry.index.redis, "lease-renewal-test", 1, seconds=2)
    assert lock.acquire()
    time.sleep(5)  # over two leases: renewed from the lease's own thread
    assert lock.held()
    lock.release()
    assert not lock.locked()


def test_a_dry_run_deletes_nothing(gc_live: LiveStack) -> None:
    live = gc_live
    client = RegistryClient(live.url)
    image = make_image("gc/dry", {}, own_files=5)
    push_and_wait(client, live, image)
    delete_image(client, image)
    time.sleep(5)
    before = stored_state(live)
    report = run_gc(live, dry_run=True)
    assert report["dry_run"] and int(report["blobs"]) >= 1
    assert stored_state(live) == before
    run_gc(live)
    assert image.digest not in stored_state(live)[0]


def test_a_gc_killed_halfway_loses_nothing_and_the_next_run_finishes(gc_live: LiveStack) -> None:
    live = gc_live
    client = RegistryClient(live.url)
    shared = {f"crash/{n}": os.urandom(16 * KiB) for n in range(60)}
    doomed = [make_image(f"gc/crash-old{n}", shared, own_files=60) for n in range(4)]
    kept = make_image("gc/crash-keep", dict(list(shared.items())[:30]), own_files=5)
    for image in [*doomed, kept]:
        push_and_wait(client, live, image)
    for image in doomed:
        delete_image(client, image)
    time.sleep(5)
    make_celery(live.settings).send_task("workers.tasks.collect_garbage", args=(False,))
    wait_until(  # a GC of this store takes ~0.2 s: watch closely, kill at once
        lambda: bool(list(live.registry.store.list("gc/runs/"))), "GC start", interval=0.001
    )
    live.stack.kill("worker-maintenance")
    live.stack.respawn("worker-maintenance")
    wait_until(lambda: not live.registry.index.redis.exists("dh:lock:gc"), "GC lock",
               timeout=RUN_LOCK_WAIT)  # fmt: skip
    response = client.request("GET", f"/v2/{kept.repo}/blobs/{kept.digest}")
    assert response.status == 200 and response.data == kept.layer
    settle(live)
    blobs, indexed, _packed = stored_state(live)
    assert not {image.digest for image in doomed} & blobs
    assert kept.file_hexes() <= indexed
    time.sleep(live.settings.restore_keep_seconds + 0.5)
    response = client.request("GET", f"/v2/{kept.repo}/blobs/{kept.digest}")
    assert response.status == 200 and response.data == kept.layer


RUN_LOCK_WAIT = 120.0


def duphunter(live: LiveStack, *args: str) -> Any:
    done = subprocess.run(
        [str(VENV_BIN / "duphunter"), "--url", live.url, "--json", *args],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


def test_retention_keeps_the_newest_tags(gc_live: LiveStack) -> None:
    live = gc_live
    client = RegistryClient(live.url)
    layer = gzip.compress(make_tar({"r": os.urandom(10 * KiB)}), mtime=0)
    for number in range(1, 6):
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": number}).encode()
        client.push_image("ret/app", f"t{number}", [layer], config=config)
        time.sleep(1.1)  # tag times are S3's LastModified, to the second
    dry = duphunter(live, "retention", "--dry-run")["result"]
    assert dry == {"ret/app": ["t1", "t2", "t3"]}
    assert len(json.loads(client.request("GET", "/v2/ret/app/tags/list").data)["tags"]) == 5
    duphunter(live, "retention", "--yes")
    tags = json.loads(client.request("GET", "/v2/ret/app/tags/list").data)["tags"]
    assert tags == ["t4", "t5"]


def test_a_deleted_repository_is_freed_by_gc(gc_live: LiveStack) -> None:
    live = gc_live
    client = RegistryClient(live.url)
    image = make_image("gc/whole-repo", {}, own_files=4)
    push_and_wait(client, live, image)
    assert duphunter(live, "repo", "delete", image.repo, "--yes")["objects_dropped"] >= 3
    assert client.request("GET", f"/v2/{image.repo}/tags/list").status == 404
    assert image.repo not in json.loads(client.request("GET", "/v2/_catalog").data)["repositories"]
    settle(live)
    assert image.digest not in stored_state(live)[0]
    assert not image.file_hexes() & stored_state(live)[1]


def test_verify_re_restores_and_reports(gc_live: LiveStack) -> None:
    live = gc_live
    client = RegistryClient(live.url)
    image = make_image("gc/verified", {}, own_files=3)
    push_and_wait(client, live, image)
    status = duphunter(live, "verify")
    assert status["state"] == "success" and status["layers"][image.digest] == "verified"


def test_untagged_gc_keeps_what_tags_lead_to_and_frees_the_rest(gc_live: LiveStack) -> None:
    """With DUPHUNTER_GC_UNTAGGED, a manifest lives if a tag leads to it: directly, as the
    child of a tagged index, or as a referrer of a live manifest; the rest is freed."""
    live = gc_live
    client = RegistryClient(live.url)
    repo = "gc/untagged"

    def pushed(reference: str, manifest: dict[str, Any], media_type: str = OCI_MANIFEST) -> str:
        response = client.push_manifest(repo, reference, manifest, media_type)
        assert response.status == 201, response.data
        return str(response.headers["Docker-Content-Digest"])

    layers: list[str] = []

    def image(n: int) -> dict[str, Any]:
        layer = gzip.compress(make_tar({f"f{n}": os.urandom(4 * KiB)}), mtime=0)
        layers.append(sha256(layer))
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": n}).encode()
        return image_manifest(client.push_blob(repo, config), len(config),
                              [(client.push_blob(repo, layer), len(layer))])  # fmt: skip

    tagged = pushed("v1", image(1))
    child = image(2)
    child_digest = pushed(sha256(json.dumps(child).encode()), child)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        descriptor(OCI_MANIFEST, child_digest, len(json.dumps(child)))]}  # fmt: skip
    pushed("multi", index, OCI_INDEX)
    referrer = image(3) | {"subject": descriptor(OCI_MANIFEST, tagged, 0),
                           "artifactType": "application/example"}  # fmt: skip
    referrer_digest = pushed(sha256(json.dumps(referrer).encode()), referrer)
    loose = image(4)
    loose_digest = pushed(sha256(json.dumps(loose).encode()), loose)
    # a recipe committed within the grace keeps its layer: let every ingest commit first
    wait_until(lambda: all(_ingested(live, layer) for layer in layers), "ingests", timeout=180)
    time.sleep(live.settings.gc_grace_seconds + 1)
    run_gc(live)
    for digest in (tagged, child_digest, referrer_digest):
        assert client.request("GET", f"/v2/{repo}/manifests/{digest}").status == 200, digest
    assert client.request("GET", f"/v2/{repo}/manifests/{loose_digest}").status == 404
    loose_layer = loose["layers"][0]["digest"]
    assert live.registry.blobs.stored_info(loose_layer) is None
    assert live.registry.blobs.stored_info(referrer["layers"][0]["digest"]) is not None
