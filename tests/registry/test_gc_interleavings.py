"""Garbage collection against everything that may run beside it, one interleaving at a time.

Each test holds the real code at a named pause point (`pipelines.pauses`), lets the other
party act, then lets it go on, and checks that nothing pushed was lost: every image that
was pushed and not deleted is served byte-exact and restores from packs alone. The
interleavings and the argument why each is safe are in docs/deletion.md.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from deploy.stack import wait_until
from pipelines.formats.recipe import Recipe
from pipelines.ingest.ingestor import RETIRE_BLOCKED_KEY
from pipelines.pauses import PAUSE_DIR_VARIABLE
from pipelines.registry.facade import Registry
from pipelines.registry.gc import GcReport
from pipelines.serve.restore import restore_blob
from pipelines.store.blobs import BlobInfo, Segment
from pipelines.store.filestore import read_pack_table
from pipelines.store.index import FILES_KEY, READY_KEY
from tests.client import RegistryClient, image_manifest, sha256
from tests.conftest import LiveStack, PausePoints, own_live_stack
from tests.registry.conftest import GC_STACK_SETTINGS
from tests.registry.test_gc import (
    Image,
    delete_image,
    make_image,
    push_and_wait,
    run_gc,
    stored_state,
)
from workers.app import make_celery

KiB = 1 << 10
GRACE = 2.0


@pytest.fixture(scope="module")
def paused(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveStack, PausePoints]]:
    workdir = tmp_path_factory.mktemp("gc-interleavings")
    points = PausePoints(workdir / "pauses")
    settings = {
        **GC_STACK_SETTINGS,
        "DUPHUNTER_GC_GRACE_SECONDS": str(GRACE),
        **points.environment(),
    }
    before = os.environ.get(PAUSE_DIR_VARIABLE)
    os.environ.update(points.environment())
    try:
        with own_live_stack(workdir, settings) as live:
            yield live, points
    finally:  # the session's stack's, if it set one
        os.environ.pop(PAUSE_DIR_VARIABLE, None)
        if before is not None:
            os.environ[PAUSE_DIR_VARIABLE] = before


@pytest.fixture
def live(paused: tuple[LiveStack, PausePoints]) -> Iterator[LiveStack]:
    yield paused[0]
    paused[1].release_all()


@pytest.fixture
def points(paused: tuple[LiveStack, PausePoints]) -> PausePoints:
    return paused[1]


def in_background(work: Callable[[], Any]) -> Future[Any]:
    return ThreadPoolExecutor(1).submit(work)


def past_grace() -> None:
    time.sleep(GRACE + 1.1)


def packs(live: LiveStack) -> set[str]:
    return {key for key, _size in live.registry.store.list("packs/")}


def restored_from_packs(registry: Registry, digest: str) -> bytes:
    """The layer rebuilt from its recipe and the packs alone: no buffer, spool or copy."""
    info = registry.blobs.stored_info(digest)
    assert info is not None and info.recipe is not None, f"{digest} is not deduplicated"
    recipe = Recipe.decode(registry.store.get_bytes(info.recipe))
    return b"".join(restore_blob(recipe, registry.files))


def assert_intact(live: LiveStack, images: list[Image]) -> None:
    """Every image is served byte-exact, and its layer restores from packs alone."""
    client = RegistryClient(live.url)
    for image in images:
        response = client.request("GET", f"/v2/{image.repo}/blobs/{image.digest}")
        assert response.status == 200, (image.repo, response.status, response.data[:300])
        assert response.data == image.layer, image.repo
        assert restored_from_packs(live.registry, image.digest) == image.layer, image.repo


def garbage_and_kept(live: LiveStack, name: str, shared_files: int = 20) -> tuple[Image, Image]:
    """A deleted image and a kept one that shares half its files, both older than grace."""
    client = RegistryClient(live.url)
    shared = {f"{name}/lib/{n}": os.urandom(8 * KiB) for n in range(shared_files)}
    garbage = make_image(f"{name}/garbage", shared, own_files=10)
    kept = make_image(f"{name}/kept", dict(list(shared.items())[: shared_files // 2]), 5)
    for image in (garbage, kept):
        push_and_wait(client, live, image)
    delete_image(client, garbage)
    past_grace()
    return garbage, kept


def settled(live: LiveStack) -> None:
    """GC a grace apart until no compacted pack waits: what a run defers, a later one ends."""
    for _run in range(4):
        past_grace()
        live.registry.collector().run()
        if not list(live.registry.store.list("gc/deferred/")):
            return


# 1. The index in Redis is lost or partial: liveness comes from S3.


def test_a_gc_after_redis_lost_its_keys_deletes_no_live_pack(live: LiveStack) -> None:
    garbage, kept = garbage_and_kept(live, "flushed")
    before = packs(live)
    live.registry.index.redis.flushall()
    report = run_gc(live)
    assert packs(live) == before, "a GC on an empty index deleted packs"
    assert "index" in str(report.get("refused", "")), report
    wait_until(live.registry.index.is_ready, "the reindex GC started", timeout=120)
    assert_intact(live, [kept])
    settled(live)
    assert_intact(live, [kept])
    assert live.registry.blobs.stored_info(garbage.digest) is None


def test_a_gc_with_a_partial_index_keeps_the_files_it_lost(live: LiveStack) -> None:
    """Redis lost the file entries of a live image (eviction, a failover): the files stay
    and their entries come back."""
    _garbage, kept = garbage_and_kept(live, "partial")
    lost = sorted(kept.file_hexes())
    live.registry.index.redis.hdel("dh:files", *lost)
    live.registry.collector().run()
    assert all(live.registry.index.file_locations(lost)), "the lost entries were not repaired"
    assert_intact(live, [kept])


@pytest.mark.parametrize("loss", ["lock deleted", "redis flushed", "index cleared"])
def test_a_gc_that_loses_its_lock_or_its_index_stops_deleting(
    live: LiveStack, points: PausePoints, loss: str
) -> None:
    garbage, kept = garbage_and_kept(live, f"lost-{loss.split()[0]}")
    before = packs(live)
    points.hold("gc.marked")
    run = in_background(live.registry.collector().run)
    points.wait_reached("gc.marked")
    redis = live.registry.index.redis
    if loss == "lock deleted":
        redis.delete("dh:lock:gc")
    elif loss == "redis flushed":
        redis.flushall()
    else:
        live.registry.index.clear()  # a reindex began
    points.release("gc.marked")
    with pytest.raises(Exception, match=r"lock|index"):
        run.result(timeout=120)
    assert packs(live) == before
    assert live.registry.blobs.stored_info(garbage.digest) is not None, "deleted after the loss"
    live.registry.ensure_index()
    assert_intact(live, [kept])


# 2. An ingest deduplicates against files that GC deletes.


def newcomer_held_before_its_recipe(
    live: LiveStack, points: PausePoints, name: str
) -> tuple[Image, Image]:
    """A deleted image, and an image pushed with its shared files whose ingest is held
    after it found them in the deleted image's packs and before it writes its recipe."""
    garbage, _kept = garbage_and_kept(live, name)
    newcomer = make_image(f"{name}/new", {n: garbage.files[n] for n in garbage.files
                                          if "/lib/" in n}, own_files=3)  # fmt: skip
    points.hold("ingest.before_recipe")
    RegistryClient(live.url).push_image(newcomer.repo, "v1", [newcomer.layer])
    points.wait_reached("ingest.before_recipe")
    return garbage, newcomer


def test_an_ingest_cannot_commit_on_files_gc_deleted_meanwhile(
    live: LiveStack, points: PausePoints
) -> None:
    _garbage, newcomer = newcomer_held_before_its_recipe(live, points, "dedup-race")
    report = live.registry.collector().run()
    assert report.blobs >= 1 and report.files >= 1, report
    points.release("ingest.before_recipe")
    wait_until(lambda: _retired_deduplicated(live, newcomer.digest), "ingest", timeout=180)
    assert_intact(live, [newcomer])


def test_an_ingest_that_meets_a_gc_deleting_its_files_is_tried_again(
    live: LiveStack, points: PausePoints
) -> None:
    _garbage, newcomer = newcomer_held_before_its_recipe(live, points, "dedup-meets")
    points.hold("gc.files_decided")
    run = in_background(live.registry.collector().run)
    points.wait_reached("gc.files_decided")  # the garbage's files are condemned
    points.release("ingest.before_recipe")
    time.sleep(3)  # the ingest writes its recipe and meets the condemnation
    points.release("gc.files_decided")
    run.result(timeout=120)
    wait_until(lambda: _retired_deduplicated(live, newcomer.digest), "ingest", timeout=180)
    assert_intact(live, [newcomer])


def test_files_an_ingest_relies_on_before_the_notice_are_rescued_and_the_rest_freed(
    live: LiveStack, points: PausePoints
) -> None:
    garbage, newcomer = newcomer_held_before_its_recipe(live, points, "dedup-rescue")
    garbage_own = garbage.file_hexes() - newcomer.file_hexes()
    points.hold("gc.packs_judged")
    run = in_background(live.registry.collector().run)
    points.wait_reached("gc.packs_judged")  # the garbage's files are judged dead, no notice yet
    points.release("ingest.before_recipe")
    wait_until(lambda: _retired_deduplicated(live, newcomer.digest), "ingest", timeout=180)
    points.release("gc.packs_judged")
    report: GcReport = run.result(timeout=120)
    assert report.rescued >= 1 and report.packs_compacted >= 1, report
    _blobs, indexed, _packed = stored_state(live)
    assert not garbage_own & indexed, "the rescue spared the garbage's other files"
    settled(live)  # the compacted pack goes a grace later
    assert not garbage_own & stored_state(live)[2]
    assert_intact(live, [newcomer])


def _retired_deduplicated(live: LiveStack, digest: str) -> bool:
    info = live.registry.blobs.stored_info(digest)
    return info is not None and info.deduplicated and not info.retired and not info.segments


# 3. An upload is committed while GC runs.


def test_an_upload_committed_during_gc_keeps_its_data(live: LiveStack, points: PausePoints) -> None:
    client = RegistryClient(live.url)
    image = make_image("upload-race/app", {}, own_files=12)
    started = client.request("POST", f"/v2/{image.repo}/blobs/uploads/")
    half = len(image.layer) // 2
    location = started.headers["Location"]
    patched = client.request("PATCH", location, image.layer[:half],
                             {"Content-Range": f"0-{half - 1}"})  # fmt: skip
    assert patched.status == 202
    past_grace()  # the first chunk's data object is older than the grace now
    points.hold("gc.marked")
    run = in_background(live.registry.collector().run)
    points.wait_reached("gc.marked")
    done = client.request("PUT", patched.headers["Location"], image.layer[half:],
                          digest=image.digest)  # fmt: skip
    assert done.status == 201, done.data
    config = b'{"architecture":"amd64","os":"linux"}'
    manifest = image_manifest(client.push_blob(image.repo, config), len(config),
                              [(image.digest, len(image.layer))])  # fmt: skip
    assert client.push_manifest(image.repo, "v1", manifest).status == 201
    points.release("gc.marked")
    run.result(timeout=120)
    response = client.request("GET", f"/v2/{image.repo}/blobs/{image.digest}")
    assert response.status == 200 and response.data == image.layer
    wait_until(lambda: _retired_deduplicated(live, image.digest), "ingest", timeout=180)
    assert_intact(live, [image])


# 4. A blob that is garbage comes back: uploaded again, or mounted, before its manifest.


@pytest.mark.parametrize("how", ["uploaded again", "mounted"])
def test_a_garbage_blob_that_comes_back_survives_until_its_manifest(
    live: LiveStack, how: str
) -> None:
    client = RegistryClient(live.url)
    image = make_image(f"comeback/{how.split()[0]}", {}, own_files=4)
    source = f"{image.repo}-source"
    client.push_blob(source, image.layer)  # never named by a manifest: garbage after grace
    past_grace()
    if how == "mounted":
        mounted = client.request(
            "POST", f"/v2/{image.repo}/blobs/uploads/?mount={image.digest}&from={source}"
        )
        assert mounted.status == 201, mounted.data
    else:
        client.push_blob(image.repo, image.layer)
    live.registry.collector().run()  # between the 201 and the manifest PUT
    config = b'{"architecture":"amd64","os":"linux","comeback":1}'
    manifest = image_manifest(client.push_blob(image.repo, config), len(config),
                              [(image.digest, len(image.layer))])  # fmt: skip
    pushed = client.push_manifest(image.repo, "v1", manifest)
    assert pushed.status == 201, pushed.data
    response = client.request("GET", f"/v2/{image.repo}/blobs/{image.digest}")
    assert response.status == 200 and response.data == image.layer


# 5. A restore planned its reads before a compaction.


def test_a_compacted_pack_outlives_the_restores_that_planned_on_it(
    live: LiveStack, points: PausePoints
) -> None:
    _garbage, kept = garbage_and_kept(live, "compaction")
    points.hold("restore.planned")
    client = RegistryClient(live.url)
    get = in_background(lambda: client.request("GET", f"/v2/{kept.repo}/blobs/{kept.digest}"))
    points.wait_reached("restore.planned")  # it located the kept files in the shared pack
    first = live.registry.collector().run()
    assert first.packs_compacted >= 1, first
    live.registry.collector().run()  # the next run must honour the deferral
    points.release("restore.planned")
    response = get.result(timeout=120)
    assert response.status == 200 and response.data == kept.layer


# 6. The last full copy of a layer goes only after a restore from packs alone.


def test_an_intact_copy_is_kept_when_the_packs_cannot_restore_its_layer(
    live: LiveStack, points: PausePoints
) -> None:
    client = RegistryClient(live.url)
    image = make_image("last-copy/app", {}, own_files=6)
    points.hold("retire.start", image.digest)
    client.push_image(image.repo, "v1", [image.layer])
    points.wait_reached("retire.start")  # deduplicated; the intact copy is about to go
    info = live.registry.blobs.stored_info(image.digest)
    assert info is not None and info.deduplicated
    recipe = Recipe.decode(live.registry.store.get_bytes(info.recipe or ""))
    (location,) = live.registry.files.locate([next(iter(recipe.file_refs()))])
    assert location is not None
    live.registry.store.delete([location.pack])  # storage lost under the registry
    points.release("retire.start")
    redis = live.registry.index.redis
    wait_until(lambda: redis.hget(RETIRE_BLOCKED_KEY, image.digest) is not None, "kept")
    response = client.request("GET", f"/v2/{image.repo}/blobs/{image.digest}")
    assert response.status == 200 and response.data == image.layer
    kept = live.registry.blobs.stored_info(image.digest)
    assert kept is not None and kept.segments, "the last copy was deleted, or is not served"
    blocked = redis.hget(RETIRE_BLOCKED_KEY, image.digest) or b""
    assert b"does not restore from its packs" in blocked, blocked


def _kept_while_a_pack_was_away(live: LiveStack, points: PausePoints, repo: str) -> Image:
    """A layer whose retirement found a pack missing (its intact copy kept, the failed
    proof recorded), and the pack back in place since (an S3 replica had lagged)."""
    image = make_image(repo, {}, own_files=6)
    points.hold("retire.start", image.digest)
    RegistryClient(live.url).push_image(image.repo, "v1", [image.layer])
    points.wait_reached("retire.start")
    info = live.registry.blobs.stored_info(image.digest)
    assert info is not None and info.deduplicated
    recipe = Recipe.decode(live.registry.store.get_bytes(info.recipe or ""))
    (location,) = live.registry.files.locate([next(iter(recipe.file_refs()))])
    assert location is not None
    pack = live.registry.store.get_bytes(location.pack)
    live.registry.store.delete([location.pack])
    points.release("retire.start")
    redis = live.registry.index.redis
    wait_until(lambda: redis.hget(RETIRE_BLOCKED_KEY, image.digest) is not None, "kept")
    live.registry.store.put_bytes(location.pack, pack)
    return image


def _withdrawn(live: LiveStack, digest: str) -> bool:
    """Its retirement went ahead: the intact copy awaits deletion, or is deleted."""
    info = live.registry.blobs.stored_info(digest)
    return info is not None and not info.segments


def _deleted(live: LiveStack, digest: str) -> bool:
    info = live.registry.blobs.stored_info(digest)
    return info is not None and not info.segments and not info.retired


def test_an_intact_copy_kept_for_a_failed_proof_is_proved_again_later(
    live: LiveStack, points: PausePoints
) -> None:
    image = _kept_while_a_pack_was_away(live, points, "last-copy/back")
    make_celery(live.settings).send_task("workers.tasks.resume_ingests").get(timeout=120)
    wait_until(lambda: _withdrawn(live, image.digest), "retired once proved", timeout=120)


def test_an_intact_copy_whose_reason_redis_lost_is_retired_again(
    live: LiveStack, points: PausePoints
) -> None:
    image = _kept_while_a_pack_was_away(live, points, "last-copy/reason-lost")
    live.registry.index.redis.hdel(RETIRE_BLOCKED_KEY, image.digest)  # as Redis emptied does
    assert image.digest in live.registry.overdue_retirements(time.time() + 1)


def test_a_get_reading_an_intact_copy_outlives_its_overdue_retirement(
    live: LiveStack, points: PausePoints
) -> None:
    """A GET chose the intact copy (kept for a failed proof); Redis lost the reason, so
    the overdue route withdraws the copy and deletes it a grace later. The GET, held in
    between, resumes from a restore when it finds the copy gone: the pushed bytes."""
    image = _kept_while_a_pack_was_away(live, points, "last-copy/read-across")
    live.registry.index.redis.hdel(RETIRE_BLOCKED_KEY, image.digest)
    points.hold("serve.intact", image.digest)
    client = RegistryClient(live.url)
    get = in_background(lambda: client.request("GET", f"/v2/{image.repo}/blobs/{image.digest}"))
    points.wait_reached("serve.intact")  # the GET answers from the intact copy
    resumed = _counter(live, "intact_reads_resumed_from_restore")
    celery = make_celery(live.settings)

    def overdue_route_ran() -> bool:  # once the layer's record is old enough to be overdue
        celery.send_task("workers.tasks.resume_ingests").get(timeout=120)
        return _withdrawn(live, image.digest)

    wait_until(overdue_route_ran, "withdrawn by the overdue route", timeout=120, interval=2)
    wait_until(lambda: _deleted(live, image.digest), "the copy deleted", timeout=180)
    points.release("serve.intact")
    response = get.result(timeout=120)
    assert response.status == 200 and response.data == image.layer
    assert _counter(live, "intact_reads_resumed_from_restore") == resumed + 1


def _counter(live: LiveStack, name: str) -> int:
    return int(live.registry.index.counters().get(name, 0))


def test_a_proof_made_while_the_index_is_incomplete_keeps_nothing_for_good(
    live: LiveStack, points: PausePoints
) -> None:
    """A file missed in an emptied index is no evidence that a pack lost it: the proof is
    put off until the index is rebuilt, not recorded as failed."""
    client = RegistryClient(live.url)
    image = make_image("last-copy/emptied", {}, own_files=6)
    points.hold("retire.start", image.digest)
    client.push_image(image.repo, "v1", [image.layer])
    points.wait_reached("retire.start")
    redis = live.registry.index.redis
    redis.delete(READY_KEY, FILES_KEY)  # every file entry gone, as after a flush
    early = client.request("GET", f"/v2/{image.repo}/blobs/{image.digest}")
    assert (early.status, early.data) in ((200, image.layer), (503, early.data)), early.data
    points.release("retire.start")
    wait_until(lambda: _deleted(live, image.digest), "retired after the rebuild", timeout=240)
    assert redis.hget(RETIRE_BLOCKED_KEY, image.digest) is None
    wait_until(live.registry.index.is_ready, "the rebuild finished", timeout=120)
    response = client.request("GET", f"/v2/{image.repo}/blobs/{image.digest}")
    assert response.status == 200 and response.data == image.layer


def test_an_ingest_that_meets_an_emptied_index_is_asked_again_and_finishes(
    live: LiveStack, points: PausePoints
) -> None:
    """Redis loses its keys after an ingest stored the layer's files and before its proof
    reads them back: the proof cannot locate them, which says nothing about the layer. The
    ingest is queued again (not failed, not recorded intact for good) and ends once the
    index is rebuilt."""
    client = RegistryClient(live.url)
    image = make_image("ingest/emptied", {}, own_files=6)
    points.hold("ingest.files_stored", image.digest)
    client.push_image(image.repo, "v1", [image.layer])
    points.wait_reached("ingest.files_stored")
    live.registry.index.redis.delete(READY_KEY, FILES_KEY)  # as a flush, for the files
    points.release("ingest.files_stored")
    wait_until(lambda: _deleted(live, image.digest), "ingested and retired", timeout=300)
    assert live.registry.index.layer(image.digest)["state"] == "deduplicated"
    assert_intact(live, [image])


def test_an_ingest_waits_for_an_emptied_index_instead_of_storing_its_files_again(
    live: LiveStack,
) -> None:
    """An ingest that starts while the index is incomplete would find none of the layer's
    files stored and store them all again: it waits for the rebuild, then dedups."""
    client = RegistryClient(live.url)
    shared = {f"ingest/wait/lib/{n}": os.urandom(8 * KiB) for n in range(10)}
    first = make_image("ingest/wait-first", shared, own_files=2)
    push_and_wait(client, live, first)
    second = make_image("ingest/wait-second", shared, own_files=2)
    live.stack.stop_service("worker-ingest")
    try:
        client.push_image(second.repo, "v1", [second.layer])
        live.registry.index.redis.delete(READY_KEY, FILES_KEY)  # as a flush, for the files
    finally:
        live.stack.respawn("worker-ingest")
    wait_until(lambda: _deleted(live, second.digest), "ingested after the rebuild", timeout=300)
    store = live.registry.store
    copies = Counter(digest.hex() for key, size in store.list("packs/")
                     for digest, _location in read_pack_table(store, key, size))  # fmt: skip
    assert all(copies[hexdigest] == 1 for hexdigest in second.file_hexes()), copies
    assert_intact(live, [first, second])


# 7. Presigned URLs never outlive the object they point to.


def test_a_presigned_url_lives_no_longer_than_its_object(live: LiveStack) -> None:
    settings = replace(live.settings, redirect="presigned")
    registry = Registry.connect(settings)
    info = BlobInfo(sha256(b"x"), 1, [Segment("data/some-upload/000000", 1)])
    url = registry.redirect_url(info)
    assert url is not None
    lifetime = int(parse_qs(urlparse(url).query)["X-Amz-Expires"][0])
    assert lifetime <= min(settings.retire_grace_seconds, settings.gc_grace_seconds)


def test_the_report_says_what_a_gc_did(live: LiveStack) -> None:
    report = live.registry.collector().run(dry_run=True)
    assert isinstance(report, GcReport) and report.dry_run


# 8. A manifest PUT names a blob that a GC run is deleting.


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_manifest_put_never_commits_on_a_blob_gc_deletes(
    live: LiveStack, points: PausePoints, when: str
) -> None:
    """The PUT writes its revision before GC marks again (`before`: the blob is rescued and
    the PUT succeeds) or after (`after`: it waits for GC, finds the blob gone and refuses);
    either way no manifest names a deleted blob."""
    client = RegistryClient(live.url)
    image = make_image(f"manifest-race/{when}", {}, own_files=3)
    client.push_blob(image.repo, image.layer)  # no manifest names it: garbage after grace
    config = b'{"architecture":"amd64","os":"linux","race":1}'
    manifest = image_manifest(client.push_blob(image.repo, config), len(config),
                              [(image.digest, len(image.layer))])  # fmt: skip
    past_grace()
    point = "gc.registry_noticed" if when == "before" else "gc.registry_marked_again"
    points.hold(point)
    run = in_background(live.registry.collector().run)
    points.wait_reached(point)
    put = in_background(lambda: client.push_manifest(image.repo, "v1", manifest))
    time.sleep(2)  # the PUT wrote its revision and waits on GC's notice
    assert not put.done(), "the PUT did not wait for the GC run deleting its blob"
    points.release(point)
    report = run.result(timeout=120)
    response = put.result(timeout=120)
    blob = client.request("GET", f"/v2/{image.repo}/blobs/{image.digest}")
    if when == "before":
        assert response.status == 201, response.data
        assert report.rescued >= 1, report
        assert blob.status == 200 and blob.data == image.layer
    else:
        assert response.status == 400 and b"MANIFEST_BLOB_UNKNOWN" in response.data
        assert client.request("GET", f"/v2/{image.repo}/manifests/v1").status == 404
        assert live.registry.blobs.stored_info(image.digest) is None
