"""Hiding restores: the shared layer buffer, preconstruction, the GET path and its sources,
popularity-driven intact replicas (S-mode) and the modes, on the live stack."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
import urllib3

from deploy.stack import REPO_ROOT, VENV_BIN, wait_until
from pipelines.serve.buffer import (
    LEASE_MS,
    PART_BYTES,
    RANK_KEY,
    BufferMiss,
    Filler,
    LayerBuffer,
    entry_key,
    fill_key,
    part_key,
)
from pipelines.store.storage import ObjectStore, S3Store
from tests.client import RegistryClient, image_manifest, sha256
from tests.conftest import LiveStack, PausePoints, extra_api
from tests.layers import (
    SOURCE,
    deduplicated_layer,
    get,
    make_tar,
    push_layers,
    wait_for_layers,
)
from tests.storage import fill_whole
from workers.app import make_celery

MiB = 1 << 20


def slow_layer(megabytes: int) -> bytes:
    """Compressible text at gzip -9: a restore that takes a while."""
    words = " ".join(f"{n}:{os.urandom(3).hex()}" for n in range(megabytes * MiB // 12))
    return gzip.compress(make_tar({"text": words.encode()}), compresslevel=9, mtime=0)


def warm(client: RegistryClient, repo: str, reference: str) -> dict[str, object]:
    body = json.dumps({"repository": repo, "reference": reference}).encode()
    started = client.request("POST", "/api/v1/jobs/preconstruct", body)
    assert started.status == 202, started.data
    job_id = json.loads(started.data)["id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = json.loads(client.request("GET", f"/api/v1/jobs/{job_id}").data)
        if status["state"] in ("success", "failure"):
            return dict(status)
        time.sleep(0.3)
    raise TimeoutError(f"warm job {job_id} did not finish")


def test_warm_fills_the_buffer_and_both_hosts_serve_from_it(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """`POST /api/v1/jobs/preconstruct` rebuilds an image's layers into the buffer, with
    progress; then an API process on another port (another host: its own spool) serves
    them from the buffer too, whole and in ranges."""
    layer = os.urandom(3 * MiB)
    blob = gzip.compress(make_tar({"a.bin": layer, "b.txt": b"x" * MiB}), mtime=0)
    digest = deduplicated_layer(client, repo, live, blob)
    status = warm(client, repo, "latest")
    assert status["state"] == "success" and status["progress"] == {"done": 1, "total": 1}
    assert status["layers"] == {digest: "filled"}
    assert get(client, repo, digest) == ("buffer", blob)
    with extra_api(live, {}) as other_host:
        assert get(other_host, repo, digest) == ("buffer", blob)
        source, part = get(other_host, repo, digest, "bytes=1000-1999")
        assert (source, part) == ("buffer", blob[1000:2000])
    assert warm(client, repo, "latest")["layers"] == {digest: "buffered"}


def test_a_get_reading_an_entry_the_lowered_bound_evicts_goes_on_from_a_restore(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """A slow GET streams a buffered layer of several parts. Meanwhile the bound is
    lowered and `enforce_bound` evicts the entry, deleting its parts under the reader: the
    GET goes on from a restore at the offset it had reached and ends with the pushed
    bytes (never other bytes, never short)."""
    blob = gzip.compress(make_tar({"a.bin": os.urandom(24 * MiB)}), compresslevel=1, mtime=0)
    digest = deduplicated_layer(client, repo, live, blob)
    assert get(client, repo, digest) == ("restore", blob)  # and fills the buffer
    buffer = live.registry.buffer
    wait_until(lambda: (entry := buffer.entry(digest)) is not None and entry.complete, "fill")
    resumed = live.registry.index.counters().get("buffer_reads_resumed_from_restore", 0)
    slow_reader = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=60))
    response = slow_reader.request(
        "GET", f"{client.url}/v2/{repo}/blobs/{digest}", preload_content=False
    )
    assert response.status == 200 and response.headers[SOURCE] == "buffer"
    received = bytearray(response.read(256 << 10))
    lowered = LayerBuffer(live.registry.store, buffer.redis, 0, buffer.tau, buffer.pin_seconds)
    assert lowered.enforce_bound() >= 1
    assert buffer.entry(digest) is None
    while piece := response.read(MiB):
        received += piece
        time.sleep(0.01)
    assert len(received) == len(blob) and sha256(bytes(received)) == digest
    after = live.registry.index.counters().get("buffer_reads_resumed_from_restore", 0)
    assert after > resumed, "the GET read all of the entry before it was evicted"


def test_a_filler_killed_with_its_process_is_taken_over_within_a_lease(
    live: LiveStack,
) -> None:
    """A process claims a layer's fill, writes some of it and lives on: its claim stays
    well past a lease (a thread renews it). Killed (-9, as a lost API host), its claim is
    gone within a lease: a GET following the fill stops waiting for parts that will never
    come (BufferMiss, then restores) and another process can fill the layer. Before, the
    claim lived until 60 s after the last part written."""
    client = empty_redis_db(live, 9)
    url = live.settings.redis_url.rsplit("/", 1)[0] + "/9"
    data = os.urandom(PART_BYTES + 1000)
    digest = sha256(data)
    filler = subprocess.Popen(
        [str(VENV_BIN / "python"), "-c",
         "import sys, time, redis\n"
         "from pipelines.config import Settings\n"
         "from pipelines.serve.buffer import LayerBuffer\n"
         "from pipelines.store.storage import S3Store\n"
         f"buffer = LayerBuffer(S3Store(Settings()), redis.Redis.from_url({url!r}), "
         f"{4 * PART_BYTES}, 60, 60)\n"
         f"fill = buffer.start_fill({digest!r}, {len(data)}, 'miss')\n"
         "fill.write(b'x' * 1000); print('filling', flush=True); time.sleep(600)"],
        cwd=REPO_ROOT, env=live.stack.env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    buffer = LayerBuffer(S3Store(live.settings), client, 4 * PART_BYTES, 60, 60)
    try:
        assert filler.stdout is not None and filler.stdout.readline().strip() == "filling"
        time.sleep(LEASE_MS / 1000 * 1.5)
        assert buffer.filling_alive(digest)  # renewed while its process lives
        filler.send_signal(signal.SIGKILL)
        filler.wait()
        killed = time.monotonic()
        with pytest.raises(BufferMiss):
            b"".join(buffer.read(digest, 0, len(data)))
        assert time.monotonic() - killed <= LEASE_MS / 1000 + 1
    finally:
        filler.kill()
        filler.wait()
    taking_over = buffer.start_fill(digest, len(data), "miss")
    assert taking_over is not None
    taking_over.write(data)
    taking_over.finish()
    assert b"".join(buffer.read(digest, 0, len(data))) == data


def test_a_get_racing_a_preconstruction_gets_exact_bytes(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """GETs sent while the layer is being rebuilt into the buffer follow the rebuild (or
    restore on their own if they came first); every one gets the pushed bytes, and the
    layer is rebuilt at most twice (the preconstruction and one on-demand restore)."""
    blob = slow_layer(6)
    digest = deduplicated_layer(client, repo, live, blob)
    restores_before = live.registry.stats()["restores"]["on_demand_or_preconstructed"]
    results: list[tuple[str, bytes]] = []

    def pull() -> None:
        results.append(get(RegistryClient(client.url), repo, digest))

    body = json.dumps({"repository": repo, "reference": "latest"}).encode()
    assert client.request("POST", "/api/v1/jobs/preconstruct", body).status == 202
    threads = [threading.Thread(target=pull) for _ in range(4)]
    for number, thread in enumerate(threads):
        time.sleep(0.2 * number)
        thread.start()
    for thread in threads:
        thread.join()
    assert [data == blob for _source, data in results] == [True] * 4
    assert {source for source, _data in results} <= {"inflight", "buffer", "restore", "spool"}
    restores = live.registry.stats()["restores"]["on_demand_or_preconstructed"]
    assert restores - restores_before <= 2


def test_the_buffer_never_exceeds_its_bound_under_concurrent_fills(live: LiveStack) -> None:
    """Two waves of four fillers at once into a buffer of 5 parts' bytes (its own Redis
    database, the stack's S3), the second wave evicting the first: reserved bytes and the
    bytes S3 holds stay within the bound throughout, and every entry that completed
    reads back exactly."""
    capacity = 5 * PART_BYTES
    client = empty_redis_db(live, 5)
    store = S3Store(live.settings)
    buffer = LayerBuffer(store, client, capacity, tau_seconds=60, pin_seconds=60)
    layers = {f"sha256:{os.urandom(32).hex()}": os.urandom(2 * PART_BYTES + n) for n in range(8)}
    done = threading.Event()
    observed: list[int] = []

    def watch() -> None:
        while not done.is_set():
            in_s3 = buffer_bytes_in_s3(store, layers)
            observed.append(max(in_s3, buffer.used_bytes()))

    def fill(digest: str, data: bytes) -> None:
        filler = buffer.start_fill(digest, len(data), "test")
        if filler is None:
            return
        for start in range(0, len(data), 777_777):
            filler.write(data[start : start + 777_777])
        filler.finish()

    watcher = threading.Thread(target=watch)
    watcher.start()
    items = list(layers.items())
    for wave in (items[:4], items[4:]):
        fillers = [threading.Thread(target=fill, args=item) for item in wave]
        for thread in fillers:
            thread.start()
        for thread in fillers:
            thread.join()
    done.set()
    watcher.join()
    assert observed and max(observed) <= capacity, max(observed)
    complete = [d for d in layers if (e := buffer.entry(d)) is not None and e.complete]
    assert complete and buffer.used_bytes() <= capacity
    for digest in complete:
        assert b"".join(buffer.read(digest, 0, len(layers[digest]))) == layers[digest]
    assert buffer.stats()["evictions"] >= 1
    for digest in complete:
        buffer.drop(digest)


class DeleteHeldStore(S3Store):
    """The stack's S3, with its deletes held until the test lets them go on."""

    def __init__(self, live: LiveStack) -> None:
        super().__init__(live.settings)
        self.deleting, self.go_on = threading.Event(), threading.Event()

    def delete(self, keys: list[str]) -> None:
        self.deleting.set()
        assert self.go_on.wait(30)
        super().delete(keys)


def test_an_entry_dropped_by_two_processes_at_once_gives_its_bytes_back_once(
    live: LiveStack,
) -> None:
    """A fill fails and its parts are being deleted when another process claims the layer
    and finds no filler: the claim waits for that delete instead of dropping the entry a
    second time (which gave its bytes back twice: the buffer then counted fewer bytes
    than S3 held, and let S3 hold more than the bound)."""
    client = empty_redis_db(live, 6)
    held = DeleteHeldStore(live)
    failing = LayerBuffer(held, client, 4 * PART_BYTES, tau_seconds=60, pin_seconds=60)
    other = LayerBuffer(S3Store(live.settings), client, 4 * PART_BYTES, 60, 60)
    data = os.urandom(PART_BYTES + 1000)
    digest = sha256(data)
    filler = failing.start_fill(digest, len(data), "miss")
    assert filler is not None
    filler.write(data[:PART_BYTES])
    aborting = threading.Thread(target=filler.abort)
    aborting.start()
    assert held.deleting.wait(30)
    claim = other.start_fill(digest, len(data), "miss")  # while the failed fill drops
    held.go_on.set()
    aborting.join()
    claim = claim or other.start_fill(digest, len(data), "miss")
    assert claim is not None
    claim.write(data)
    claim.finish()
    in_s3 = buffer_bytes_in_s3(held, {digest: data})
    assert other.used_bytes() == in_s3 == len(data)
    assert b"".join(other.read(digest, 0, len(data))) == data
    other.drop(digest)
    assert other.used_bytes() == 0


def test_an_entry_evicted_while_a_get_ranks_it_again_is_dropped_once(live: LiveStack) -> None:
    """A GET served from an entry records its hit while the entry's eviction deletes its
    parts: the hit must not put it back among the candidates, where another fill's
    eviction took it a second time and its bytes were given back twice (S3 then held two
    layers in a buffer of one and a half)."""
    client = empty_redis_db(live, 7)
    size = PART_BYTES + 1000
    held = DeleteHeldStore(live)
    evicting = LayerBuffer(held, client, size * 3 // 2, tau_seconds=60, pin_seconds=60)
    other = LayerBuffer(S3Store(live.settings), client, size * 3 // 2, 60, 60)
    layers = {sha256(data): data for data in (os.urandom(size) for _ in range(3))}
    first, second, third = layers
    fill_whole(other, first, layers[first])
    claims: list[Filler | None] = []
    evicting_first = threading.Thread(
        target=lambda: claims.append(evicting.start_fill(second, size, "miss"))
    )
    evicting_first.start()
    assert held.deleting.wait(30)
    other.record_hit(first)  # a GET it served, recorded mid-eviction
    third_claim = other.start_fill(third, size, "miss")
    held.go_on.set()
    evicting_first.join()
    for digest, claim in ((second, claims[0]), (third, third_claim)):
        if claim is not None:
            claim.write(layers[digest])
            claim.finish()
    in_s3 = buffer_bytes_in_s3(held, layers)
    assert other.used_bytes() == in_s3 <= size * 3 // 2
    assert [member.decode() for member in client.zrange(RANK_KEY, 0, -1)] == [
        digest for digest in (second, third) if other.entry(digest) is not None
    ]


@pytest.mark.parametrize("end", ["finish", "abort"])
def test_a_filler_whose_layer_was_taken_over_leaves_the_new_fill_alone(
    live: LiveStack, end: str
) -> None:
    """A filler stalled past its lease while another process took its layer over: its
    later parts, and its finish or abort, leave the new filler's entry alone (before, its
    finish marked the new entry complete half-written, its abort dropped it under the new
    filler), and S3 holds only the bytes the buffer counts."""
    client = empty_redis_db(live, 8)
    stalling = LayerBuffer(S3Store(live.settings), client, 4 * PART_BYTES, 60, 60)
    other = LayerBuffer(S3Store(live.settings), client, 4 * PART_BYTES, 60, 60)
    data = os.urandom(2 * PART_BYTES + 1000)
    digest = sha256(data)
    stalled = stalling.start_fill(digest, len(data), "miss")
    assert stalled is not None
    stalled.write(data[:PART_BYTES])
    wait_until(lambda: parts_written(stalling, digest) == 1, "the first part written")
    client.delete(fill_key(digest))  # its lease ran out
    taking_over = other.start_fill(digest, len(data), "miss")
    assert taking_over is not None
    stalled.write(data[PART_BYTES:])
    stalled.finish() if end == "finish" else stalled.abort()
    entry = other.entry(digest)
    assert entry is not None and not entry.complete and entry.parts == 0
    taking_over.write(data)
    taking_over.finish()
    assert b"".join(other.read(digest, 0, len(data))) == data
    in_s3 = buffer_bytes_in_s3(other.store, {digest: data})
    assert other.used_bytes() == in_s3 == len(data)


def test_a_drop_under_a_live_filler_leaves_no_remnant(live: LiveStack) -> None:
    """GC drops the entry of a layer it deleted while a live filler writes it: the filler's
    next step finds its entry gone and stops (its claim freed). Before, the step wrote
    `parts` into the deleted key: an entry with no size, marked complete at the finish,
    that every later fill of the layer was refused for (the torture test's seed 0)."""
    client = empty_redis_db(live, 10)
    buffer = LayerBuffer(S3Store(live.settings), client, 4 * PART_BYTES, 60, 60)
    data = os.urandom(2 * PART_BYTES + 1000)
    digest = sha256(data)
    filler = buffer.start_fill(digest, len(data), "miss")
    assert filler is not None
    filler.write(data[:PART_BYTES])
    wait_until(lambda: parts_written(buffer, digest) == 1, "a part written")
    buffer.drop(digest)  # GC's, of a deleted blob
    filler.write(data[PART_BYTES:])
    filler.finish()
    assert filler.lost and not client.exists(entry_key(digest), fill_key(digest))
    assert buffer.used_bytes() == buffer_bytes_in_s3(buffer.store, {digest: data}) == 0
    again = buffer.start_fill(digest, len(data), "miss")  # the layer can be buffered again
    assert again is not None
    again.write(data)
    again.finish()
    assert b"".join(buffer.read(digest, 0, len(data))) == data


def parts_written(buffer: LayerBuffer, digest: str) -> int:
    entry = buffer.entry(digest)
    return 0 if entry is None else entry.parts


def test_a_part_uploaded_after_its_layer_was_dropped_is_swept(
    live: LiveStack, live_points: PausePoints
) -> None:
    """A filler checks its claim, then stalls before the upload (frozen past its lease, or
    a drop begins): its part lands after the drop deleted the entry's parts, counted by
    nothing (the torture test's seed 8). The sweep deletes it and keeps the parts an
    entry counts, a complete one's and those of a fill still writing beside it; S3 then
    holds exactly what the buffer counts."""
    client = empty_redis_db(live, 11)
    buffer = LayerBuffer(S3Store(live.settings), client, 6 * PART_BYTES, 60, 60)
    late, kept = os.urandom(PART_BYTES + 1000), os.urandom(PART_BYTES + 1000)
    filling = os.urandom(2 * PART_BYTES)
    fill_whole(buffer, sha256(kept), kept)
    live_fill = buffer.start_fill(sha256(filling), len(filling), "miss")
    assert live_fill is not None
    live_fill.write(filling[:PART_BYTES])
    wait_until(lambda: parts_written(buffer, sha256(filling)) == 1, "the live fill's first part")
    live_points.hold("buffer.upload", sha256(late))
    filler = buffer.start_fill(sha256(late), len(late), "miss")
    assert filler is not None
    filler.write(late[:PART_BYTES])  # its upload checks the claim, then waits
    live_points.wait_reached("buffer.upload")
    buffer.drop(sha256(late))
    live_points.release("buffer.upload")
    filler.finish()
    layers = {sha256(late): late, sha256(kept): kept, sha256(filling): filling}
    orphan = PART_BYTES
    assert buffer_bytes_in_s3(buffer.store, layers) == len(kept) + PART_BYTES + orphan
    assert buffer.sweep(time.time() - 3600, list(layers)) == 0  # written too lately
    assert buffer.sweep(time.time() + 1, list(layers)) == 1
    live_fill.write(filling[PART_BYTES:])
    live_fill.finish()
    in_s3 = buffer_bytes_in_s3(buffer.store, layers)
    assert in_s3 == buffer.used_bytes() == len(kept) + len(filling)
    for data in (kept, filling):
        assert b"".join(buffer.read(sha256(data), 0, len(data))) == data


def test_a_sweep_leaves_alone_the_parts_a_new_fill_writes_under_it(
    live: LiveStack, live_points: PausePoints
) -> None:
    """A sweep lists a dropped fill's late part and judges it an orphan; before it
    deletes, a new fill of the same layer writes and completes. Before parts were keyed by
    their fill, the new fill's first part had the orphan's key and the sweep deleted it:
    a complete entry with a part missing. Now the sweep deletes only the orphan."""
    client = empty_redis_db(live, 13)
    buffer = LayerBuffer(S3Store(live.settings), client, 4 * PART_BYTES, 60, 60)
    data = os.urandom(PART_BYTES + 1000)
    digest = sha256(data)
    live_points.hold("buffer.upload", digest)
    late = buffer.start_fill(digest, len(data), "miss")
    assert late is not None
    late.write(data[:PART_BYTES])
    live_points.wait_reached("buffer.upload")
    buffer.drop(digest)
    live_points.release("buffer.upload")
    late.finish()
    assert late.lost and buffer_bytes_in_s3(buffer.store, {digest: data}) == PART_BYTES
    live_points.hold("buffer.sweep")
    swept: list[int] = []

    def sweep() -> None:
        swept.append(buffer.sweep(time.time() + 1, [digest]))

    sweeping = threading.Thread(target=sweep)
    sweeping.start()
    live_points.wait_reached("buffer.sweep")  # the orphan listed and judged
    fill_whole(buffer, digest, data)
    live_points.release("buffer.sweep")
    sweeping.join(30)
    assert swept == [1]
    assert b"".join(buffer.read(digest, 0, len(data))) == data
    assert buffer_bytes_in_s3(buffer.store, {digest: data}) == buffer.used_bytes() == len(data)


def test_a_sweep_after_redis_lost_the_buffer_deletes_every_part_and_serves_nothing(
    live: LiveStack,
) -> None:
    """Redis emptied (restarted without its data) under a buffer with entries complete
    and being filled: no entry is left to read, so every GET misses and restores; the
    live filler finds its claim gone and stops; the sweep deletes every part, which
    nothing can reach any more; a reader that began before the loss stops with a miss
    after exact bytes; and the buffer fills and serves again."""
    client = empty_redis_db(live, 14)
    buffer = LayerBuffer(S3Store(live.settings), client, 8 * PART_BYTES, 60, 60)
    layers = {sha256(data): data for data in (os.urandom(n) for n in (2 * PART_BYTES + 7, 999))}
    filling = os.urandom(2 * PART_BYTES)
    layers[sha256(filling)] = filling
    for digest, data in layers.items():
        if data is not filling:
            fill_whole(buffer, digest, data)
    filler = buffer.start_fill(sha256(filling), len(filling), "miss")
    assert filler is not None
    filler.write(filling[:PART_BYTES])
    wait_until(lambda: parts_written(buffer, sha256(filling)) == 1, "the live fill's first part")
    complete = next(iter(layers))
    reading = buffer.read(complete, 0, len(layers[complete]))
    received = bytearray(next(reading))  # its entry looked up, its first part being read
    client.flushdb()
    for digest in layers:
        with pytest.raises(BufferMiss) as miss:
            b"".join(buffer.read(digest, 0, len(layers[digest])))
        assert miss.value.offset == 0
    filler.write(filling[PART_BYTES:])
    filler.finish()
    assert filler.lost and buffer.entry(sha256(filling)) is None
    assert buffer.sweep(time.time() + 1, list(layers)) == 3 + 1 + 1  # the live fill's first
    with pytest.raises(BufferMiss) as miss:
        for chunk in reading:
            received += chunk
    assert bytes(received) == layers[complete][: miss.value.offset]
    assert buffer_bytes_in_s3(buffer.store, layers) == 0 == buffer.used_bytes()
    fill_whole(buffer, sha256(filling), filling)
    assert b"".join(buffer.read(sha256(filling), 0, len(filling))) == filling


def test_an_entry_of_the_release_before_fill_tokens_is_read_swept_and_dropped(
    live: LiveStack,
) -> None:
    """Entries filled before parts were keyed by their fill have no fill field, and their
    parts no fill in the key: after an upgrade they still serve, a sweep keeps them, and a
    drop deletes them and gives their bytes back."""
    client = empty_redis_db(live, 15)
    buffer = LayerBuffer(S3Store(live.settings), client, 4 * PART_BYTES, 60, 60)
    data = os.urandom(PART_BYTES + 1000)
    digest = sha256(data)
    fill_whole(buffer, digest, data)
    entry = buffer.entry(digest)
    assert entry is not None and entry.fill
    for number, start in enumerate(range(0, len(data), PART_BYTES)):  # as the release before
        buffer.store.put_bytes(part_key(digest, "", number), data[start : start + PART_BYTES])
        buffer.store.delete([part_key(digest, entry.fill, number)])
    client.hdel(entry_key(digest), "fill")
    assert buffer.sweep(time.time() + 1, [digest]) == 0
    assert b"".join(buffer.read(digest, 1, len(data))) == data[1:]
    buffer.drop(digest)
    assert buffer_bytes_in_s3(buffer.store, {digest: data}) == 0 == buffer.used_bytes()


def test_a_prediction_pins_only_an_entry_nobody_read_since(live: LiveStack) -> None:
    """A prediction from a manifest GET that came before the entry was last read or
    filled, or before the layer was fetched by any path, pins nothing: its GET came
    already, and a pin would hold the bytes of a full buffer for nothing, refusing every
    other fill. A prediction made after pins it, and the pin is counted from the manifest
    GET, so a late one pins nothing either."""
    client = empty_redis_db(live, 6)
    buffer = LayerBuffer(S3Store(live.settings), client, 2 * PART_BYTES, 60, pin_seconds=30)
    old, new = (f"sha256:{os.urandom(32).hex()}" for _ in range(2))
    before_fill = time.time() - 1
    filler = buffer.start_fill(old, PART_BYTES + 1, "miss")
    assert filler is not None
    filler.write(os.urandom(PART_BYTES + 1))
    filler.finish()
    buffer.expect(old, 1, since=before_fill)
    buffer.expect(old, 1, since=time.time() - 31)
    assert client.hget(entry_key(old), "expected") == b"0"
    predicted = buffer.start_fill(new, PART_BYTES, "predicted", 1, time.time())
    assert predicted is not None  # `old` was evicted
    predicted.write(os.urandom(PART_BYTES))
    predicted.finish()
    assert buffer.entry(old) is None and buffer.stats().get("refused_full", 0) == 0
    assert client.hget(entry_key(new), "expected") == b"1"
    assert buffer.start_fill(old, PART_BYTES + 1, "miss") is None  # `new` is pinned
    assert buffer.stats()["refused_full"] == 1
    fetched = f"sha256:{os.urandom(32).hex()}"
    predicted_at = time.time()
    buffer.record_get(fetched)  # served by a restore before the prediction was acted on
    late = buffer.start_fill(fetched, PART_BYTES, "predicted", 1, predicted_at)
    assert late is not None
    assert client.hget(entry_key(fetched), "expected") == b"0"  # admitted, not pinned
    late.abort()
    buffer.drop(new)
    client.flushdb()


def test_pins_hold_at_most_half_the_buffer(live: LiveStack) -> None:
    """Predictions pin entries until their GETs come; pinned entries hold at most half the
    bound (PIN_SHARE), so an on-demand fill always finds room. A preconstruction beyond
    it is refused (unpinned, it would be evicted before its GET), and a prediction for a
    buffered entry leaves it unpinned."""
    client = empty_redis_db(live, 7)
    buffer = LayerBuffer(S3Store(live.settings), client, 4 * PART_BYTES, 60, pin_seconds=60)
    first, second, third, demanded = (f"sha256:{os.urandom(32).hex()}" for _ in range(4))

    def fill(digest: str, parts: int, origin: str, expected: int) -> bool:
        filler = buffer.start_fill(digest, parts * PART_BYTES, origin, expected, time.time())
        if filler is None:
            return False
        filler.write(os.urandom(parts * PART_BYTES))
        filler.finish()
        return True

    assert fill(first, 1, "predicted", 1) and fill(second, 1, "predicted", 1)
    assert not fill(third, 1, "predicted", 1)  # it would pin 3 parts of 4
    assert buffer.stats_counters()["pins_refused"] == 1
    assert fill(demanded, 2, "miss", 0)  # room in the unpinned half
    buffer.expect(demanded, 1, time.time())  # 2 parts pinned already
    assert client.hget(entry_key(demanded), "expected") == b"0"
    assert buffer.stats_counters()["pins_refused"] == 2
    buffer.record_hit(first)  # their GETs came: unpinned, and room for a new pin
    buffer.record_hit(second)
    buffer.expect(demanded, 1, time.time())
    assert client.hget(entry_key(demanded), "expected") == b"1"
    assert fill(third, 1, "miss", 0)  # evicts an unpinned entry
    assert buffer.entry(demanded) is not None
    for digest in (first, second, third, demanded):
        if buffer.entry(digest) is not None:
            buffer.drop(digest)
    client.flushdb()


def test_a_prediction_from_a_manifest_get_pins_for_less_time_than_one_for_a_fleet(
    live: LiveStack,
) -> None:
    """A client GETs the layers of the manifest it fetched within seconds, or not at all:
    a prediction from a manifest GET pins for the prediction pin time; one from a tag
    put (the repository's pullers come at their next pulls) for the buffer's pin time."""
    client = empty_redis_db(live, 8)
    buffer = LayerBuffer(S3Store(live.settings), client, 4 * PART_BYTES, 60, 60, 10)
    predicted, pushed = (f"sha256:{os.urandom(32).hex()}" for _ in range(2))
    since = time.time()
    for digest, origin in ((predicted, "predicted"), (pushed, "pushed")):
        filler = buffer.start_fill(digest, PART_BYTES, origin, 1, since)
        assert filler is not None
        filler.write(os.urandom(PART_BYTES))
        filler.finish()
    until = {d: float(client.hget(entry_key(d), "pinned_until") or 0) for d in (predicted, pushed)}
    assert until == {predicted: pytest.approx(since + 10), pushed: pytest.approx(since + 60)}
    for digest in (predicted, pushed):
        buffer.drop(digest)
    client.flushdb()


def test_a_prediction_acted_on_after_its_get_rebuilds_nothing(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """Predictions reach the restore queue after the client's GETs more often than not; a
    preconstruction for a layer fetched since its manifest GET is skipped, not filled into
    the buffer for a GET that came already."""
    digest = deduplicated_layer(client, repo, live, slow_layer(1))
    predicted_at = time.time()
    get(client, repo, digest)
    server = live.registry.server
    assert server.preconstruct(digest, "predicted", 1, predicted_at) == "fetched already"
    assert server.preconstruct(digest, "predicted", 1, time.time()) != "fetched already"


def _ours(key: str, layers: dict[str, bytes]) -> bool:
    return any(digest.split(":")[1] in key for digest in layers)


def buffer_bytes_in_s3(store: ObjectStore, layers: dict[str, bytes]) -> int:
    """The bytes S3 holds in buffer parts of `layers`."""
    return sum(size for key, size in store.list("buffer/") if _ours(key, layers))


def empty_redis_db(live: LiveStack, number: int) -> redis.Redis[bytes]:
    """Database `number` of the stack's Redis, emptied: a buffer of the test's own."""
    client = redis.Redis.from_url(live.settings.redis_url.rsplit("/", 1)[0] + f"/{number}")
    client.flushdb()
    return client


def test_popular_layers_get_an_intact_replica_and_lose_it_when_cold(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """S-mode: a layer pulled at the hot rate gets an intact replica from the background
    job (GETs then say `intact`); once its decayed rate falls, the next run takes it away."""
    blob = gzip.compress(make_tar({"hot.bin": os.urandom(MiB)}), mtime=0)
    digest = deduplicated_layer(client, repo, live, blob)
    celery = make_celery(live.settings)
    for _ in range(40):
        assert get(client, repo, digest)[1] == blob
    wait_until(lambda: live.registry.popularity.rate_per_hour(digest) > 3600, "GET events")
    plan = celery.send_task("workers.tasks.apply_popularity").get(timeout=60)
    assert digest in plan["promote"]
    wait_until(lambda: bool(_stored(live, digest).segments), "the replica", timeout=120)
    assert get(client, repo, digest) == ("intact", blob)
    assert live.registry.stats()["storage"]["replica_bytes"] >= len(blob)
    tau = live.settings.popularity_tau_seconds
    wait_until(
        lambda: live.registry.popularity.rate_per_hour(digest) < 3600,
        "the layer to cool",
        timeout=10 * tau,
    )
    plan = celery.send_task("workers.tasks.apply_popularity").get(timeout=60)
    assert digest in plan["demote"]
    wait_until(lambda: not _stored(live, digest).segments, "the demotion", timeout=60)
    source, data = get(client, repo, digest)
    assert data == blob and source != "intact"


def _stored(live: LiveStack, digest: str):  # type: ignore[no-untyped-def]
    info = live.registry.blobs.stored_info(digest)
    assert info is not None
    return info


def test_manifest_and_blob_gets_feed_the_history_and_predictions(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """A manifest GET by a new client predicts its deduplicated layers (the history
    predictor), which the restore queue rebuilds into the buffer before the GETs come;
    the GETs then count as pulls in the client's and the repository's history."""
    blob = gzip.compress(make_tar({"p.bin": os.urandom(2 * MiB)}), mtime=0)
    digest = deduplicated_layer(client, repo, live, blob)
    other = f"10.9.{os.urandom(1)[0]}.{os.urandom(1)[0]}"
    with extra_api(live, {"DUPHUNTER_TRUSTED_PROXIES": "127.0.0.1/32"}) as behind_proxy:
        forwarded = {"X-Forwarded-For": other}
        manifest = behind_proxy.request("GET", f"/v2/{repo}/manifests/latest", headers=forwarded)
        assert manifest.status == 200
        entry_filled = lambda: (e := live.registry.buffer.entry(digest)) is not None and e.complete  # noqa: E731
        wait_until(entry_filled, "the predicted preconstruction", timeout=120)
        response = behind_proxy.request("GET", f"/v2/{repo}/blobs/{digest}", headers=forwarded)
        assert response.headers[SOURCE] == "buffer" and response.data == blob
    wait_until(
        lambda: live.registry.history.client(other).layers.get(digest) is not None,
        "the blob GET event",
    )
    assert live.registry.history.repository_layers(repo) == {digest: 1}
    assert live.registry.history.client("127.0.0.1").layers.get(digest) is None


def test_mode_intact_never_deduplicates(live: LiveStack, repo: str, tmp_path: Path) -> None:
    blob = gzip.compress(make_tar({"i.bin": os.urandom(100_000)}), mtime=0)
    with extra_api(live, {"DUPHUNTER_MODE": "intact"}) as plain:
        (digest,) = push_layers(plain, repo, [blob])
        time.sleep(2)
        assert live.registry.index.layer(digest).get("state") is None
        info = live.registry.blobs.stored_info(digest)
        assert info is not None and not info.deduplicated
        assert get(plain, repo, digest) == ("intact", blob)


def test_presigned_redirect_for_an_intact_blob(live: LiveStack, repo: str) -> None:
    blob = os.urandom(300_000)
    with extra_api(live, {"DUPHUNTER_REDIRECT": "presigned"}) as redirecting:
        digest = redirecting.push_blob(repo, blob)
        response = redirecting.request("GET", f"/v2/{repo}/blobs/{digest}")
        assert response.status == 307
        followed = redirecting.request("GET", response.headers["Location"])
        assert followed.status == 200 and sha256(bytes(followed.data)) == digest
        ranged = redirecting.request(
            "GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-9"}
        )
        assert ranged.status == 206 and ranged.data == blob[:10]  # ranges are streamed


def test_a_layer_pushed_where_clients_pull_is_retired_into_the_buffer(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """Clients fetch this repository's manifests: when a new layer pushed there is
    deduplicated, its intact copy goes into the buffer (copied, not restored: origin
    "retired") before it is deleted, so that the fleet's coming pulls find it."""
    first = gzip.compress(make_tar({"v1.bin": os.urandom(200_000)}), mtime=0)
    deduplicated_layer(client, repo, live, first)
    assert client.request("GET", f"/v2/{repo}/manifests/latest").status == 200
    wait_until(lambda: live.registry.expected_pullers(repo) > 0, "the manifest GET event")
    second = gzip.compress(make_tar({"v2.bin": os.urandom(300_000)}), mtime=0)
    digest = deduplicated_layer(client, repo, live, second)
    entry = live.registry.buffer.entry(digest)
    assert entry is not None and entry.complete and entry.origin == "retired"
    assert get(client, repo, digest) == ("buffer", second)


def test_a_tag_put_where_clients_pull_rebuilds_its_new_layer_before_any_get(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """A publisher pushes an image by digest, its layers deduplicated long ago, then tags
    it in a repository whose manifests clients fetch: the layer that no client pulled
    through the repository is rebuilt into the buffer (origin "pushed") before any GET,
    so the first GET of the fleet is served from it. A put by digest predicts nothing."""
    source = f"{repo}-source"
    top = gzip.compress(make_tar({"top.bin": os.urandom(300_000)}), mtime=0)
    top_digest = deduplicated_layer(client, source, live, top)
    base = gzip.compress(make_tar({"base.bin": os.urandom(200_000)}), mtime=0)
    base_digest = deduplicated_layer(client, repo, live, base)
    assert client.request("GET", f"/v2/{repo}/manifests/latest").status == 200
    assert get(client, repo, base_digest)[1] == base
    wait_until(lambda: base_digest in live.registry.history.repository_layers(repo), "events")
    mount = f"/v2/{repo}/blobs/uploads/?mount={top_digest}&from={source}"
    assert client.request("POST", mount).status == 201
    config = b'{"architecture":"amd64","os":"linux"}'
    layers = [(base_digest, len(base)), (top_digest, len(top))]
    manifest = image_manifest(client.push_blob(repo, config), len(config), layers)
    manifest_digest = sha256(json.dumps(manifest).encode())
    assert client.push_manifest(repo, manifest_digest, manifest).status == 201
    assert live.registry.on_tag_put(repo, manifest_digest, manifest_digest, time.time()) == (
        0,
        [],
    )
    assert live.registry.buffer.entry(top_digest) is None
    assert client.push_manifest(repo, "v2", manifest).status == 201

    def rebuilt() -> bool:
        entry = live.registry.buffer.entry(top_digest)
        return entry is not None and entry.complete

    wait_until(rebuilt, "the rebuild for the repository's pullers", timeout=60)
    entry = live.registry.buffer.entry(top_digest)
    assert entry is not None and entry.origin == "pushed"
    assert get(client, repo, top_digest) == ("buffer", top)


def test_a_layer_hot_at_its_dedup_keeps_its_intact_copy(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """S-mode: a layer pulled at the hot rate while it is ingested keeps its intact copy
    as a replica when the dedup commits (no restore, no re-upload)."""
    blob = gzip.compress(make_tar({"busy.bin": os.urandom(MiB)}), mtime=0)
    digest = client.push_blob(repo, blob)  # pulled a lot before its manifest comes
    for _ in range(40):
        assert get(client, repo, digest)[1] == blob
    wait_until(lambda: live.registry.popularity.rate_per_hour(digest) > 3600, "GET events")
    config = b'{"architecture":"amd64","os":"linux"}'
    manifest = image_manifest(client.push_blob(repo, config), len(config), [(digest, len(blob))])
    assert client.push_manifest(repo, "hot", manifest).status == 201
    assert wait_for_layers(live, [digest])[digest]["state"] == "deduplicated"
    wait_until(lambda: not _stored(live, digest).retired, "the copy settled", timeout=60)
    info = _stored(live, digest)
    assert info.recipe is not None and info.segments, "the intact copy was not kept"
    assert get(client, repo, digest) == ("intact", blob)
