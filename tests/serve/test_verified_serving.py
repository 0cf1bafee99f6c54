"""The non-negotiable, on a live stack: a blob GET returns exactly the pushed bytes or an
error, never other bytes. Each test breaks something under the registry (a stored file,
a recipe, the spool's disk, Redis or S3 in the middle of an ingest, an intact copy in
the middle of a slow download) and checks what clients get."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import urllib3

from deploy.stack import free_port, wait_until
from pipelines.formats.recipe import Raw, Recipe, RecipeBuilder
from pipelines.formats.tarsplit import FileRef
from pipelines.ingest.ingestor import INTACT, LayerRecord, layer_record_key, save_record
from pipelines.store.blobs import BlobInfo
from tests.client import RegistryClient, image_manifest, sha256
from tests.conftest import LiveStack, PausePoints, extra_api
from tests.layers import make_tar, push_layers, wait_for_layers, wait_until_retired
from workers.app import make_celery

MiB = 1 << 20


def random_layer(files: int, file_bytes: int = MiB, level: int = 1) -> bytes:
    """A gzip layer of random files: its compressed bytes are about its tar bytes, so a
    layer of n MiB of files spans about 5 + (n - 4) / 4 segments (256 KiB doubling to
    4 MiB, then 4 MiB each)."""
    tar = make_tar({f"data/{n:04d}.bin": os.urandom(file_bytes) for n in range(files)})
    return gzip.compress(tar, compresslevel=level, mtime=0)


def deduplicated(client: RegistryClient, repo: str, live: LiveStack, layer: bytes) -> BlobInfo:
    (digest,) = push_layers(client, repo, [layer])
    assert wait_for_layers(live, [digest])[digest]["state"] == "deduplicated"
    wait_until_retired(live, digest)
    info = live.registry.blobs.stored_info(digest)
    assert info is not None and info.recipe is not None
    return info


def segment_ends(live: LiveStack, info: BlobInfo) -> tuple[int, ...]:
    """Where the layer's verified segments end, as its recipe records them."""
    assert info.recipe is not None
    recipe = Recipe.decode(live.registry.store.get_bytes(info.recipe))
    assert recipe.segments is not None
    return recipe.segments.ends


def fetch(client: RegistryClient, repo: str, digest: str, byte_range: str = "") -> bytes | None:
    """The body of a complete 2xx answer, or None when the client saw an error: a 5xx, or a
    body cut short of its Content-Length."""
    headers = {"Range": byte_range} if byte_range else {}
    try:
        response = client.request("GET", f"/v2/{repo}/blobs/{digest}", headers=headers)
    except urllib3.exceptions.HTTPError:
        return None
    if response.status >= 500:
        return None
    assert response.status in (200, 206), (response.status, response.data[:300])
    return bytes(response.data)


def recipe_of(live: LiveStack, info: BlobInfo) -> Recipe:
    return Recipe.decode(live.registry.store.get_bytes(info.recipe or ""))


@contextlib.contextmanager
def recipe_rewritten(
    live: LiveStack, info: BlobInfo, edit: Callable[[list[Raw | FileRef]], list[Raw | FileRef]]
) -> Iterator[None]:
    """The layer's recipe replaced by a valid (checksummed) one with edited entries."""
    original = live.registry.store.get_bytes(info.recipe or "")
    recipe = Recipe.decode(original)
    builder = RecipeBuilder()
    for entry in edit(list(recipe.entries())):
        builder.add(entry)
    edited = builder.finish(
        blob_digest=recipe.blob_digest,
        blob_size=recipe.blob_size,
        tar_sha256=recipe.tar_sha256,
        encoder_id=recipe.encoder_id,
        encoder_params=recipe.encoder_params,
        segments=recipe.segments,
    )
    live.registry.store.put_bytes(info.recipe or "", edited.encode())
    try:
        yield
    finally:
        live.registry.store.put_bytes(info.recipe or "", original)


@contextlib.contextmanager
def middle_file_corrupted(live: LiveStack, info: BlobInfo) -> Iterator[None]:
    """One byte flipped in the stored form of the file in the middle of the layer's tar."""
    refs = [entry for entry in recipe_of(live, info).entries() if isinstance(entry, FileRef)]
    middle = refs[len(refs) // 2]
    (where,) = live.registry.files.locate([middle.digest])
    assert where is not None
    original = live.registry.store.get_bytes(where.pack)
    damaged = bytearray(original)
    damaged[where.offset + where.length // 2] ^= 0x01
    live.registry.store.put_bytes(where.pack, bytes(damaged))
    try:
        yield
    finally:
        live.registry.store.put_bytes(where.pack, original)


def first_header_changed(entries: list[Raw | FileRef]) -> list[Raw | FileRef]:
    """Same length, one byte different in the first tar header (its mtime field)."""
    first = entries[0]
    assert isinstance(first, Raw)
    header = bytearray(first.data)
    header[140] = ord("7") if header[140] != ord("7") else ord("6")
    return [Raw(bytes(header)), *entries[1:]]


def tail_appended(entries: list[Raw | FileRef]) -> list[Raw | FileRef]:
    """128 KiB more tar after the end-of-archive blocks: a restore that runs long."""
    return [*entries, Raw(bytes(128 << 10))]


def tail_dropped(entries: list[Raw | FileRef]) -> list[Raw | FileRef]:
    """The end-of-archive blocks gone: a restore that ends short."""
    assert isinstance(entries[-1], Raw)
    return entries[:-1]


Damage = Callable[[LiveStack, BlobInfo], contextlib.AbstractContextManager[None]]


def recipe_edited(edit: Callable[[list[Raw | FileRef]], list[Raw | FileRef]]) -> Damage:
    return lambda live, info: recipe_rewritten(live, info, edit)


DAMAGES: dict[str, tuple[Damage, bool]] = {
    # name: (damage, whether the segments before the damage are still served)
    "corrupted-pack-file": (middle_file_corrupted, True),
    "same-length-wrong-bytes": (recipe_edited(first_header_changed), False),
    "restore-runs-long": (recipe_edited(tail_appended), True),
    "restore-ends-short": (recipe_edited(tail_dropped), True),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_layer_gives_exact_bytes_or_an_error(
    client: RegistryClient, repo: str, live: LiveStack, damage: str
) -> None:
    """Range GETs at the start, middle and end of a damaged deduplicated layer, and a full
    GET: each gets the pushed bytes or an error. Segments verified before the damage are
    still served, so a resumed pull of the start of a layer is not held up."""
    layer = random_layer(13)  # seven segments: 0.25 + 0.5 + 1 + 2 + 4 + 4 + 1.25 MiB
    info = deduplicated(client, repo, live, layer)
    start, middle = (0, 4095), (len(layer) // 2, len(layer) // 2 + 4095)
    assert middle[1] < segment_ends(live, info)[-2]  # not in the last segment
    damage_of, early_segments_served = DAMAGES[damage]
    with damage_of(live, info):
        at_start = fetch(client, repo, info.digest, f"bytes={start[0]}-{start[1]}")
        in_middle = fetch(client, repo, info.digest, f"bytes={middle[0]}-{middle[1]}")
        at_end = fetch(client, repo, info.digest, "bytes=-4096")
        whole = fetch(client, repo, info.digest)
    assert at_end is None and whole is None
    if early_segments_served:
        assert at_start == layer[: start[1] + 1]
        if damage != "corrupted-pack-file":  # that file sits in the middle segment
            assert in_middle == layer[middle[0] : middle[1] + 1]
    for got, (first, last) in ((at_start, start), (in_middle, middle)):
        assert got is None or got == layer[first : last + 1]
    assert fetch(client, repo, info.digest) == layer  # undamaged again: served whole


def test_range_gets_at_every_kind_of_position(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """Ranges around each segment boundary, at the first and last byte, suffixes and open
    ends, of one deduplicated layer: each is exactly its slice."""
    layer = random_layer(9)  # six segments: 0.25 + 0.5 + 1 + 2 + 4 + 1.25 MiB
    info = deduplicated(client, repo, live, layer)
    size = len(layer)
    ends = segment_ends(live, info)
    assert ends[:5] == tuple(quarters * MiB // 4 for quarters in (1, 3, 7, 15, 31))
    ranges: list[tuple[str, int, int]] = [
        ("bytes=0-0", 0, 1),
        (f"bytes={size - 1}-{size - 1}", size - 1, size),
        ("bytes=-1", size - 1, size),
        ("bytes=-5000", size - 5000, size),
        (f"bytes={size - 10}-", size - 10, size),
        (f"bytes=0-{size + 100}", 0, size),
    ]
    for boundary in ends[:-1]:
        for first in (boundary - 1, boundary, boundary + 1):
            ranges.append((f"bytes={first}-{first}", first, first + 1))
        ranges.append((f"bytes={boundary - 100}-{boundary + 99}", boundary - 100, boundary + 100))
    for header, first, end in ranges:
        assert fetch(client, repo, info.digest, header) == layer[first:end], header


def limited_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child: writes past `limit` come back short, then EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_short_spool_write_is_an_error_never_a_hang(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """The spool file is capped just short of the layer: its last write comes back short.
    Readers get the verified bytes before that point and then an error, in bounded time;
    the file is never taken for complete."""
    layer = random_layer(6)
    info = deduplicated(client, repo, live, layer)
    with extra_api(live, {}, limited_file_size(len(layer) - 1000)) as limited:
        started = time.monotonic()
        assert fetch(limited, repo, info.digest) is None
        assert fetch(limited, repo, info.digest, "bytes=-100") is None
        assert fetch(limited, repo, info.digest, "bytes=0-4095") == layer[:4096]
        assert time.monotonic() - started < 100
    assert fetch(client, repo, info.digest) == layer


# Redis and S3 restarting under an ingest.


def many_files_layer() -> bytes:
    """Two thousand small files of random bytes: files to store and references to count."""
    files = {f"pkg/{n // 100}/{n}.py": os.urandom(1500) for n in range(2000)}
    return gzip.compress(make_tar(files), compresslevel=6, mtime=0)


def assert_consistent(live: LiveStack, client: RegistryClient, repo: str, layer: bytes) -> None:
    """S3 (descriptor, layer record) and Redis (state, file references) agree that the
    layer is deduplicated, and it pulls back exactly."""
    digest = sha256(layer)
    info = live.registry.blobs.stored_info(digest)
    assert info is not None and info.deduplicated
    stored_record = json.loads(live.registry.store.get_bytes(layer_record_key(digest)))
    assert stored_record["state"] == live.registry.index.layer(digest)["state"] == "deduplicated"
    for file_digest in recipe_of(live, info).file_refs():
        assert live.registry.index.file_refcount(file_digest.hex()) == 1
    wait_until_retired(live, digest)
    assert fetch(client, repo, digest) == layer


@pytest.mark.parametrize("service", ["redis", "s3"])
def test_backend_restart_during_ingest(
    client: RegistryClient, repo: str, live: LiveStack, live_points: PausePoints, service: str
) -> None:
    """Redis or S3 goes away while the ingest worker has stored a layer's files and not
    yet committed it (held there by a pause point, so the outage cannot miss the ingest):
    the worker retries until the backend is back, and the layer ends deduplicated,
    consistent in S3 and Redis."""
    log = live.workdir / "worker-ingest.log"
    log_start = log.stat().st_size
    layer = many_files_layer()
    live_points.hold("ingest.files_stored", sha256(layer))
    (digest,) = push_layers(client, repo, [layer])
    live_points.wait_reached("ingest.files_stored")
    live.stack.stop_service(service)
    live_points.release("ingest.files_stored")
    wait_until(lambda: b"transient failure, retrying" in log_since(log, log_start),
               "the ingest meeting the outage", timeout=120)  # fmt: skip
    live.stack.respawn(service)
    if service == "redis":
        wait_until(lambda: bool(live.registry.index.redis.ping()), "redis back")
    else:
        wait_until(lambda: live.registry.store.size("probe") is None, "S3 back", timeout=120)
    record = wait_for_layers(live, [digest], timeout=300)[digest]
    assert record["state"] == "deduplicated", record
    assert_consistent(live, client, repo, layer)


def log_since(log: Path, offset: int) -> bytes:
    with open(log, "rb") as handle:
        handle.seek(offset)
        return handle.read()


def test_a_half_done_commit_is_repaired(client: RegistryClient, repo: str, live: LiveStack) -> None:
    """The descriptor in S3 says deduplicated (the commit point passed) but the steps after
    it never ran: references uncounted, the record saying the ingest failed. The
    scheduled `resume_ingests` finds it and finishes the commit, counting once."""
    files = {f"f{n}": os.urandom(20_000) for n in range(10)}
    layer = gzip.compress(make_tar(files), mtime=0)
    info = deduplicated(client, repo, live, layer)
    index = live.registry.index
    file_hexes = [digest.hex() for digest in recipe_of(live, info).file_refs()]
    pipe = index.redis.pipeline()
    for file_hex in file_hexes:
        pipe.hincrby("dh:filerefs", file_hex, -1)
    pipe.execute()
    failed = LayerRecord(info.digest, INTACT, reason="ingest failed: ConnectionError: gone")
    save_record(live.registry.store, index, failed)
    celery = make_celery(live.settings)
    resumed = celery.send_task("workers.tasks.resume_ingests").get(timeout=60)
    assert info.digest in resumed
    wait_until(lambda: recorded_states(live, info.digest) == ["deduplicated"] * 2,
               "the resumed ingest's record, in S3 and in Redis")  # fmt: skip
    assert_consistent(live, client, repo, layer)


def recorded_states(live: LiveStack, digest: str) -> list[str]:
    """The layer's state in its record in S3 and in Redis. A commit sets Redis's first
    (`commit_deduplication`), then writes the record to both: waiting on Redis alone, a
    test may read S3 before the record reaches it."""
    stored = json.loads(live.registry.store.get_bytes(layer_record_key(digest)))
    return [stored["state"], live.registry.index.layer(digest)["state"]]


# A slow download of an intact blob while the layer is deduplicated under it.


def test_throttled_download_survives_the_dedup_commit(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """A client reads 256 KiB of a 20 MiB intact blob, then stops reading (the API blocks
    on the full socket) while the layer is ingested, its descriptor switched and its intact
    chunks deleted; read on, the download goes on from the restored layer at the same
    offset and ends with the pushed bytes."""
    layer = random_layer(20)
    digest = client.push_blob_chunked(repo, layer, MiB)  # 21 data objects
    resumed_before = live.registry.index.counters().get("intact_reads_resumed_from_restore", 0)
    slow_reader = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=60))
    response = slow_reader.request(
        "GET", f"{client.url}/v2/{repo}/blobs/{digest}", preload_content=False
    )
    assert response.status == 200
    received = bytearray(response.read(256 << 10))
    config = b'{"architecture":"amd64","os":"linux"}'
    manifest = image_manifest(client.push_blob(repo, config), len(config), [(digest, len(layer))])
    assert client.push_manifest(repo, "v1", manifest).status == 201
    wait_until_retired(live, digest, timeout=180)  # while the download stands still
    while piece := response.read(64 << 10):
        received += piece
    assert sha256(bytes(received)) == digest
    resumed_after = live.registry.index.counters().get("intact_reads_resumed_from_restore", 0)
    assert resumed_after > resumed_before


# Scheduled verification.


def test_scheduled_verification_finds_and_clears_a_failure(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    layer = random_layer(2)
    info = deduplicated(client, repo, live, layer)
    celery = make_celery(live.settings)
    before = live.registry.stats()["verification"]
    with middle_file_corrupted(live, info):
        sampled = celery.send_task("workers.tasks.verify_sample").get(timeout=60)
        assert info.digest in sampled  # never verified and newest: first in line
        wait_until(lambda: bool(live.registry.index.layer(info.digest).get("verify_error")),
                   "verification result", timeout=120)  # fmt: skip
    stats = live.registry.stats()["verification"]
    assert info.digest in stats["failing_layers"]
    assert stats["failures"] == before["failures"] + 1
    celery.send_task("workers.tasks.verify_blob", args=(info.digest,)).get(timeout=120)
    record = live.registry.index.layer(info.digest)
    assert record["verify_error"] == "" and float(record["verified"]) > 0
    assert info.digest not in live.registry.stats()["verification"]["failing_layers"]


def test_redis_errors_are_transient_and_format_errors_are_not() -> None:
    from minio.error import S3Error

    from pipelines.errors import is_transient

    refused = redis.Redis(port=free_port(), socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError) as caught:
        refused.ping()
    assert is_transient(caught.value)
    assert is_transient(urllib3.exceptions.MaxRetryError(None, "/", None))  # type: ignore[arg-type]
    slow_down = S3Error(None, "SlowDown", "slow down", "k", "r", "h")  # type: ignore[arg-type]
    assert is_transient(slow_down)
    assert not is_transient(S3Error(None, "AccessDenied", "no", "k", "r", "h"))  # type: ignore[arg-type]
    assert not is_transient(ValueError("bad recipe"))
