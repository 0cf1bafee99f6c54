"""File-level deduplication end to end: layers pushed by real clients are split into
unique files and recipes, their intact copies go away, and every pull returns the pushed
bytes. Also what must never happen: wrong bytes served, or a layer left half-done."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import urllib3
import zstandard

from deploy.stack import wait_until
from pipelines.formats.recipe import Recipe
from pipelines.registry.jobmarks import DEATHS_GIVEN_UP_AFTER
from pipelines.serve import rebuild
from pipelines.serve.rebuild import FIRST_BATCH, LOCATE_BATCH, rebuild_tar, rebuild_tar_range
from pipelines.store.filestore import FileStore, Location
from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack, PausePoints
from tests.layers import make_tar, push_layers, wait_for_layers, wait_until_retired
from tests.real_clients import build_image, layout_manifest, needs_umoci_and_skopeo, skopeo_copy
from workers.app import make_celery
from workers.tasks import INGEST, ingest_layer


@needs_umoci_and_skopeo
def test_skopeo_images_sharing_files(live: LiveStack, tmp_path: Path) -> None:
    """Two images whose layers share most files: after ingest the intact blobs are gone,
    storage drops, each shared file is stored once, and skopeo pulls both back exactly."""
    shared = {f"usr/lib/lib{n}.so": os.urandom(400_000) for n in range(6)}
    images = []
    for name in ("alpha", "beta"):
        layout = tmp_path / name
        layers = [
            dict(shared, **{"etc/name": name.encode()}),
            {f"app/{name}.bin": os.urandom(300_000), "app/common.txt": b"same\n" * 999},
        ]
        build_image(layout, "v1", layers)
        images.append(layout)
    host = live.url.removeprefix("http://")
    before = live.registry.stats()
    digests = []
    for layout in images:
        skopeo_copy(
            f"oci:{layout}:v1", f"docker://{host}/dedup/{layout.name}:v1", "--preserve-digests"
        )
        _digest, manifest = layout_manifest(layout)
        digests += [layer["digest"] for layer in manifest["layers"]]  # type: ignore[attr-defined]
    records = wait_for_layers(live, digests)
    assert {record["state"] for record in records.values()} == {"deduplicated"}, records
    assert all(record["encoder"].startswith("gzip/pgzip") for record in records.values())
    for digest in digests:
        wait_until_retired(live, digest)
    after = live.registry.stats()
    pushed = after["logical_bytes"] - before["logical_bytes"]
    added = after["stored_bytes"] - before["stored_bytes"]
    assert added < pushed * 0.75, (added, pushed)
    for content in shared.values():
        refs = live.registry.index.file_refcount(sha256(content).split(":")[1])
        assert refs == 2  # the base layer of each image
    for layout in images:
        pulled = tmp_path / f"pulled-{layout.name}"
        skopeo_copy(
            f"docker://{host}/dedup/{layout.name}:v1", f"oci:{pulled}:v1", "--preserve-digests"
        )
        assert layout_manifest(pulled) == layout_manifest(layout)
        for digest in layout_manifest(pulled)[1]["layers"]:  # type: ignore[attr-defined]
            path = pulled / "blobs" / digest["digest"].replace(":", "/")
            assert sha256(path.read_bytes()) == digest["digest"]


def test_python_gzip_zstd_and_plain_layers(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    files = {f"data/{n}.bin": os.urandom(50_000) for n in range(8)}
    tar = make_tar(files)
    layers = [
        gzip.compress(tar, compresslevel=1, mtime=0),
        gzip.compress(tar, compresslevel=6, mtime=0),
        gzip.compress(tar, compresslevel=9, mtime=0),
        zstandard.ZstdCompressor(level=3).compress(tar),
        tar,
    ]
    digests = push_layers(client, repo, layers)
    records = wait_for_layers(live, digests)
    assert [records[d]["state"] for d in digests] == ["deduplicated"] * 5, records
    for digest, layer in zip(digests, layers, strict=True):
        wait_until_retired(live, digest)
        assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == layer
        part = client.request(
            "GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=100-4099"}
        )
        assert part.status == 206 and part.data == layer[100:4100]
    stats = live.registry.stats()
    assert sum(stats["layers_by_encoder"].values()) >= 5


def test_layers_no_encoder_reproduces_stay_intact(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """GNU gzip and pigz are covered, but not every way to run them: `--rsyncable` and a
    pigz block size of its own make other bytes. Such layers keep their blob, store no
    file, and pull exactly."""
    text = " ".join(f"line {n} of {os.urandom(4).hex()}" for n in range(40000)).encode()
    tar = make_tar({f"x/{n}": text[n:] for n in range(4)})  # compressible, as real files are
    layers = [
        subprocess.run(tool, input=tar, capture_output=True, check=True).stdout
        for tool in (["gzip", "-n", "-6", "--rsyncable"], ["pigz", "-n", "-6", "-b", "256"])
    ]
    digests = push_layers(client, repo, layers)
    records = wait_for_layers(live, digests)
    for digest, layer in zip(digests, layers, strict=True):
        assert records[digest]["state"] == "intact", records[digest]
        assert records[digest]["reason"], records[digest]
        assert records[digest]["new_files"] == "0"  # nothing stored for a layer kept intact
        assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == layer


def _deduplicated_layer(
    client: RegistryClient, repo: str, live: LiveStack, text_bytes: int = 0
) -> bytes:
    """A gzip-9 layer of random files (and, if asked, of slow-to-compress text)."""
    files = {f"f{n}": os.urandom(30_000) for n in range(20)}
    words = " ".join(f"{n}:{os.urandom(3).hex()}" for n in range(text_bytes // 12)).encode()
    if words:
        files["text"] = words
    layer = gzip.compress(make_tar(files), compresslevel=9, mtime=0)
    (digest,) = push_layers(client, repo, [layer])
    assert wait_for_layers(live, [digest])[digest]["state"] == "deduplicated"
    wait_until_retired(live, digest)
    time.sleep(live.settings.restore_keep_seconds + 0.5)  # no spool file left from ingest
    return layer


def test_concurrent_gets_share_one_restore(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    # Several MB of text at gzip -9: the restore lasts long enough for all six GETs to
    # arrive while it runs, even on a loaded machine (the spool is kept only 1 s in tests).
    layer = _deduplicated_layer(client, repo, live, text_bytes=8_000_000)
    restores_before = live.registry.index.counters().get("restores", 0)
    bodies: list[bytes] = []
    barrier = threading.Barrier(6)

    def pull() -> None:
        own = RegistryClient(client.url)
        barrier.wait()
        bodies.append(own.request("GET", f"/v2/{repo}/blobs/{sha256(layer)}").data)

    threads = [threading.Thread(target=pull) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert bodies == [layer] * 6
    assert live.registry.index.counters().get("restores", 0) - restores_before == 1


def deduplicated_recipe(client: RegistryClient, repo: str, live: LiveStack, layer: bytes) -> Recipe:
    """The recipe of `layer`, pushed and deduplicated."""
    (digest,) = push_layers(client, repo, [layer])
    assert wait_for_layers(live, [digest])[digest]["state"] == "deduplicated"
    info = live.registry.blobs.stored_info(digest)
    assert info is not None and info.recipe is not None
    return Recipe.decode(live.registry.store.get_bytes(info.recipe))


def test_a_rebuild_fetches_a_pack_region_once(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """A tar listing the files of one pack out of their stored order, one of them twice,
    is rebuilt with one ranged GET of that pack, not one per backward jump."""
    files = {f"f{n}": os.urandom(30_000) for n in range(6)}
    stored_in_order = gzip.compress(make_tar(files), mtime=0)
    shuffled = {name: files[name] for name in ("f3", "f0", "f5", "f1", "f4", "f2")}
    shuffled["f0-again"] = files["f0"]
    reordered = gzip.compress(make_tar(shuffled), mtime=0)
    for layer in (stored_in_order, reordered):
        (digest,) = push_layers(client, repo, [layer])
        assert wait_for_layers(live, [digest])[digest]["state"] == "deduplicated"
    info = live.registry.blobs.stored_info(sha256(reordered))
    assert info is not None and info.recipe is not None
    recipe = Recipe.decode(live.registry.store.get_bytes(info.recipe))
    store = FileStore(live.registry.store, live.registry.index)
    ranges: list[tuple[str, int, int]] = []
    read_range = store.read_range

    def counted(pack: str, offset: int, length: int) -> bytes:
        ranges.append((pack, offset, length))
        return read_range(pack, offset, length)

    store.read_range = counted  # type: ignore[method-assign]
    assert b"".join(rebuild_tar(recipe, store)) == make_tar(shuffled)
    assert len(ranges) == 1, ranges


def test_a_file_the_tar_holds_again_in_later_batches_is_fetched_once(
    client: RegistryClient, repo: str, live: LiveStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same content under three names, in the first, second and third batch of the
    rebuild, far in its pack from the files around its later names: it is fetched and
    checked once and kept for the others, not fetched by each batch. With nothing kept
    (REPEATS_KEPT_BYTES 0) each batch fetches it again; the tar is the same either way."""
    again = os.urandom(100_000)
    names = {0: "first", 150: "second", 299: "third"}
    files = {f"d/{names.get(n, 'f')}{n:04}": again if n in names else os.urandom(8_000)
             for n in range(300)}  # fmt: skip
    layer = gzip.compress(make_tar(files), mtime=0)
    recipe = deduplicated_recipe(client, repo, live, layer)
    file_digest = hashlib.sha256(again).digest()
    assert recipe.repeated_files() == {file_digest: 3}
    store = FileStore(live.registry.store, live.registry.index)
    (where,) = store.locate([file_digest])
    assert where is not None
    fetches: list[tuple[str, int, int]] = []
    read_range = store.read_range

    def counted(pack: str, offset: int, length: int) -> bytes:
        if pack == where.pack and offset <= where.offset < offset + length:
            fetches.append((pack, offset, length))
        return read_range(pack, offset, length)

    store.read_range = counted  # type: ignore[method-assign]
    assert b"".join(rebuild_tar(recipe, store)) == make_tar(files)
    assert len(fetches) == 1, fetches
    fetches.clear()
    monkeypatch.setattr(rebuild, "REPEATS_KEPT_BYTES", 0)
    assert b"".join(rebuild_tar(recipe, store)) == make_tar(files)
    assert len(fetches) == 3, fetches


@pytest.mark.parametrize("seed", range(5))
def test_rebuilds_of_tars_holding_files_again_are_exact_whatever_is_kept(
    client: RegistryClient, repo: str, live: LiveStack, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Random tars whose files recur near and far, empty, small, and one larger than a
    span (it streams alone, never kept), rebuilt in batches of a few entries (repeats
    cross many) with nothing, a little or plenty kept: every rebuild is the tar, whole
    and in ranges, and keeping more never fetches more."""
    rng = random.Random(seed)
    contents = [os.urandom(rng.choice([0, 1, 700, 9_000, 70_000])) for _ in range(12)]
    contents.append(os.urandom(rebuild.SPAN_LIMIT + 5_000))
    picks = [rng.randrange(len(contents) - 1) for _ in range(80)]
    picks[rng.randrange(80)] = picks[rng.randrange(80)] = len(contents) - 1
    files = {f"d/{n:03}": contents[pick] for n, pick in enumerate(picks)}
    tar = make_tar(files)
    recipe = deduplicated_recipe(client, repo, live, gzip.compress(tar, compresslevel=1, mtime=0))
    store = FileStore(live.registry.store, live.registry.index)
    gets = [0]
    read_range = store.read_range

    def counted(pack: str, offset: int, length: int) -> bytes:
        gets[0] += 1
        return read_range(pack, offset, length)

    store.read_range = counted  # type: ignore[method-assign]
    monkeypatch.setattr(rebuild, "FIRST_BATCH", rng.choice([2, 4]))
    monkeypatch.setattr(rebuild, "LOCATE_BATCH", rng.choice([8, 16]))
    fetched = []
    for kept in (0, 10_000, 8 << 20):
        monkeypatch.setattr(rebuild, "REPEATS_KEPT_BYTES", kept)
        gets[0] = 0
        assert b"".join(rebuild_tar(recipe, store)) == tar, f"seed {seed}, kept {kept}"
        fetched.append(gets[0])
        for _ in range(3):
            start = rng.randrange(len(tar))
            end = rng.randrange(start, len(tar)) + 1
            assert b"".join(rebuild_tar_range(recipe, store, start, end)) == tar[start:end]
    assert fetched == sorted(fetched, reverse=True), fetched


def test_a_rebuilds_first_bytes_wait_for_a_few_hundred_entries_not_thousands(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """The rebuild plans its batches from FIRST_BATCH entries up, doubling: its first
    bytes go out once a few hundred of the recipe's entries are located (a restore's first
    segment starts on them), not a window of thousands. The tar is the same."""
    files = {f"d/f{n:04}": os.urandom(200) for n in range(1500)}
    layer = gzip.compress(make_tar(files), mtime=0)
    recipe = deduplicated_recipe(client, repo, live, layer)
    assert recipe.entry_count > LOCATE_BATCH
    store = FileStore(live.registry.store, live.registry.index)
    located: list[int] = []
    locate = store.locate

    def counted(digests: Sequence[bytes]) -> list[Location | None]:
        located.append(len(digests))
        return locate(digests)

    store.locate = counted  # type: ignore[method-assign]
    chunks = rebuild_tar(recipe, store)
    first = next(chunks)
    assert sum(located) <= 3 * FIRST_BATCH, located
    assert first + b"".join(chunks) == make_tar(files)
    assert located[:3] == [FIRST_BATCH // 2, FIRST_BATCH, 2 * FIRST_BATCH], located


def test_corrupted_file_is_never_served(client: RegistryClient, repo: str, live: LiveStack) -> None:
    layer = _deduplicated_layer(client, repo, live)
    info = live.registry.blobs.stored_info(sha256(layer))
    assert info is not None and info.recipe is not None
    recipe = Recipe.decode(live.registry.store.get_bytes(info.recipe))
    (where,) = live.registry.files.locate([next(iter(recipe.file_refs()))])
    assert where is not None
    original = live.registry.store.get_bytes(where.pack)
    start, end = where.offset + 1, where.offset + where.length  # keep the codec byte
    corrupted = original[:start] + os.urandom(end - start) + original[end:]
    live.registry.store.put_bytes(where.pack, corrupted)
    try:
        try:
            response = client.request("GET", f"/v2/{repo}/blobs/{sha256(layer)}")
        except urllib3.exceptions.HTTPError:
            return  # the connection was cut: the client sees an error, never the bytes
        assert response.data != layer and len(response.data) < len(layer)
    finally:
        live.registry.store.put_bytes(where.pack, original)


def test_ingest_survives_a_killed_worker(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """SIGKILL the ingest worker mid-job: the job is redelivered and the layer ends up
    intact or deduplicated, never neither, and pulls stay exact throughout."""
    files = {f"big/{n}.bin": os.urandom(2_000_000) for n in range(12)}
    layer = gzip.compress(make_tar(files), compresslevel=6, mtime=0)
    (digest,) = push_layers(client, repo, [layer])
    time.sleep(1.0)  # the worker is now splitting, storing or proving
    live.stack.kill("worker-ingest")
    assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == layer
    live.stack.respawn("worker-ingest")
    record = wait_for_layers(live, [digest], timeout=240)[digest]
    assert record["state"] == "deduplicated", record
    wait_until_retired(live, digest)
    info = live.registry.blobs.stored_info(digest)
    assert info is not None and info.recipe is not None
    recipe = Recipe.decode(live.registry.store.get_bytes(info.recipe))
    for file_digest in recipe.file_refs():
        assert live.registry.index.file_refcount(file_digest.hex()) == 1
    assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == layer


def test_an_ingest_that_kills_its_worker_each_time_is_given_up(
    client: RegistryClient, repo: str, live: LiveStack, live_points: PausePoints
) -> None:
    """A layer whose ingest kills the worker process running it (out of memory, say) each
    time: Celery hands the job to the next process, for ever. After DEATHS_GIVEN_UP_AFTER
    deaths in a row the next run gives up: the layer stays intact, says why, pulls
    byte-exact and is not queued again; the worker goes on with other layers."""
    layer = gzip.compress(make_tar({"doomed.bin": os.urandom(300_000)}), mtime=0)
    digest = sha256(layer)
    live_points.hold("ingest.files_stored", digest)
    push_layers(client, repo, [layer])
    for _death in range(DEATHS_GIVEN_UP_AFTER):
        live_points.wait_reached("ingest.files_stored")
        live_points.hold("ingest.files_stored", digest)  # to see the next run reach it
        kill_the_process_running_the_job(live, "worker-ingest")
    record = wait_for_layers(live, [digest], timeout=120)[digest]
    assert record["state"] == "intact", record
    assert f"died during {DEATHS_GIVEN_UP_AFTER} ingests in a row" in record["reason"], record
    assert not (live_points.directory / "ingest.files_stored.reached").exists()
    assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == layer
    assert digest not in live.registry.unfinished_ingests(older_than=time.time() + 3600)
    live_points.release("ingest.files_stored")
    other = gzip.compress(make_tar({"fine.bin": os.urandom(200_000)}), mtime=0)
    (other_digest,) = push_layers(client, repo, [other])
    assert wait_for_layers(live, [other_digest])[other_digest]["state"] == "deduplicated"


def test_a_give_up_racing_a_run_that_commits_ends_deduplicated(
    client: RegistryClient, repo: str, live: LiveStack, live_points: PausePoints
) -> None:
    """Runs of one ingest at once (a redelivery beside a resumed job): one gives up, having
    counted the others as dead, while one of them is alive and commits between the
    give-up's check and its record. The layer is deduplicated, its record says intact
    ("ingest failed"): `resume_ingests` finds it and finishes it. Nothing is lost."""
    layer = gzip.compress(make_tar({"raced.bin": os.urandom(300_000)}), mtime=0)
    digest = sha256(layer)
    live_points.hold("ingest.files_stored", digest)
    push_layers(client, repo, [layer])
    live_points.wait_reached("ingest.files_stored")  # the live run, in the worker
    for _dead in range(DEATHS_GIVEN_UP_AFTER - 1):
        live.registry.jobmarks.started(INGEST, digest)
    live_points.hold("ingest.give_up", digest)
    # here, not in the worker (busy with the live run): it queues nothing on this path
    giving_up = threading.Thread(target=ingest_layer, args=(repo, digest))
    giving_up.start()
    live_points.wait_reached("ingest.give_up")
    live_points.release("ingest.files_stored")
    wait_until_retired(live, digest)  # committed, its intact copy deleted
    live_points.release("ingest.give_up")
    giving_up.join(timeout=60)
    assert live.registry.index.layer(digest)["state"] == "intact"
    assert digest in live.registry.unfinished_ingests(older_than=time.time())
    make_celery(live.settings).send_task("workers.tasks.resume_ingests")
    wait_until(lambda: live.registry.index.layer(digest)["state"] == "deduplicated",
               "the resumed ingest finished the layer", timeout=60)  # fmt: skip
    assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == layer


def kill_the_process_running_the_job(live: LiveStack, worker: str) -> None:
    """SIGKILL the pool process of a Celery worker (its only one: concurrency 1), as the
    kernel's out-of-memory killer would; the worker starts another."""
    (main,) = [process.pid for name, process in live.stack.processes if name == worker]
    children = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True)
    (pool_process,) = [int(pid) for pid in children.stdout.split()]
    os.kill(pool_process, signal.SIGKILL)


def test_stats_report_dedup(client: RegistryClient, live: LiveStack) -> None:
    stats = json.loads(client.request("GET", "/api/v1/stats").data)
    for key in (
        "logical_bytes",
        "stored_bytes",
        "dedup_ratio",
        "unique_files",
        "layers",
        "layers_by_encoder",
        "intact_layers_by_reason",
        "queues",
    ):
        assert key in stats, key


def test_index_rebuilt_from_s3_after_dedup(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """Redis is only an index: after losing it, packs, recipes and descriptors in S3 give
    back the same file locations, reference counts, accounting, and exact pulls."""
    shared = os.urandom(300_000)
    layers = [
        gzip.compress(make_tar({"shared.bin": shared, f"own{n}.bin": os.urandom(9000)}), mtime=0)
        for n in range(2)
    ]
    digests = push_layers(client, repo, layers)
    wait_for_layers(live, digests)
    for digest in digests:
        wait_until_retired(live, digest)
    index = live.registry.index
    shared_hex = sha256(shared).split(":")[1]
    before = (
        index.file_locations([shared_hex]),
        index.file_refcount(shared_hex),
        live.registry.stats(),
    )
    live.registry.rebuild_index()
    after = (
        index.file_locations([shared_hex]),
        index.file_refcount(shared_hex),
        live.registry.stats(),
    )
    assert after[:2] == before[:2] and before[1] == 2
    for key in ("logical_bytes", "unique_files", "layers", "layers_by_encoder"):
        assert after[2][key] == before[2][key], key
    # Stored bytes are recounted from S3 itself: a worker killed between uploading a pack
    # and counting it (an earlier test does that) leaves the running counter short.
    in_s3 = sum(
        size
        for prefix in ("data/", "manifests/", "packs/", "recipes/", "checkpoints/")
        for _key, size in live.registry.store.list(prefix)
    )
    assert after[2]["stored_bytes"] == in_s3
    time.sleep(live.settings.restore_keep_seconds + 0.5)
    for digest, layer in zip(digests, layers, strict=True):
        assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == layer
