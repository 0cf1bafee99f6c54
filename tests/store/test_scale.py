"""Several ingest workers at once: a new file is stored once however many workers meet it,
a dead claimant's files are taken over, and the copies a crash leaves are counted."""

from __future__ import annotations

import gzip
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from deploy.stack import wait_until
from pipelines.store.filestore import read_pack_table
from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack
from tests.layers import make_tar, wait_for_layers

KiB = 1 << 10
BROKER_POLL_SECONDS = 1  # kombu's BRPOP timeout on Redis (its default polling_interval)


def pack_keys(live: LiveStack) -> set[str]:
    return {key for key, _size in live.registry.store.list("packs/")}


def copies_in_packs(live: LiveStack, packs: set[str]) -> Counter[str]:
    """How many times each file is stored in these packs."""
    sizes = dict(live.registry.store.list("packs/"))
    counts: Counter[str] = Counter()
    for key in packs:
        for digest, _location in read_pack_table(live.registry.store, key, sizes[key]):
            counts[digest.hex()] += 1
    return counts


def image_layer(shared: dict[str, bytes], own: int) -> bytes:
    files = dict(shared, **{f"own/{own}.bin": os.urandom(50 * KiB)})
    return gzip.compress(make_tar(files), compresslevel=1, mtime=0)


@pytest.fixture
def extra_ingest_workers(live: LiveStack) -> Iterator[list[str]]:
    names = ["worker-ingest-b", "worker-ingest-c"]
    for name in names:
        live.stack.start_worker("ingest", name)
    time.sleep(3)  # let them connect to the broker
    yield names
    for name in names:
        live.stack.stop_service(name)


def test_concurrent_workers_store_each_new_file_once(
    client: RegistryClient, live: LiveStack, extra_ingest_workers: list[str]
) -> None:
    """Four images sharing 400 new files pushed at once, ingested by three workers: every
    file is stored in exactly one pack, no copy is garbage, every image pulls exactly."""
    shared = {f"lib/{n}.so": os.urandom(8 * KiB) for n in range(400)}
    layers = [image_layer(shared, n) for n in range(4)]
    repos = [f"scale/{os.urandom(4).hex()}" for _ in layers]
    before_packs = pack_keys(live)
    garbage_before = live.registry.stats()["pack_garbage"]["lost_race_bytes"]
    pushers = [
        threading.Thread(target=RegistryClient(client.url).push_image, args=(repo, "v1", [layer]))
        for repo, layer in zip(repos, layers, strict=True)
    ]
    for pusher in pushers:
        pusher.start()
    for pusher in pushers:
        pusher.join()
    digests = [sha256(layer) for layer in layers]
    records = wait_for_layers(live, digests, timeout=300)
    assert {record["state"] for record in records.values()} == {"deduplicated"}
    copies = copies_in_packs(live, pack_keys(live) - before_packs)
    shared_hexes = {sha256(content)[7:] for content in shared.values()}
    assert {copies[h] for h in shared_hexes} == {1}, "a shared file was stored twice"
    assert live.registry.stats()["pack_garbage"]["lost_race_bytes"] == garbage_before
    for repo, digest, layer in zip(repos, digests, layers, strict=True):
        assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == layer


def test_a_killed_claimant_is_taken_over(client: RegistryClient, live: LiveStack) -> None:
    """Worker V claims the new files of image A and hangs (SIGSTOP) while it holds them,
    then is killed (-9); worker Y, ingesting image B with the same files, waits for V's
    claims, takes them over when their lease lapses, and stores them. Each file ends
    indexed once, stored at most twice (V may have uploaded a pack before it hung), and
    the audit counts the extra copies."""
    shared = {f"big/{n}.bin": os.urandom(64 * KiB) for n in range(600)}
    layer_a, layer_b = image_layer(shared, 1), image_layer(shared, 2)
    before_packs = pack_keys(live)
    live.stack.stop_service("worker-ingest")
    try:
        live.stack.start_worker("ingest", "worker-ingest-v")
        live.stack.start_worker("ingest", "worker-ingest-y")
        time.sleep(4)  # both connected
        live.stack.signal_service("worker-ingest-y", signal.SIGSTOP)  # so that V takes A
        # A frozen worker still has a BRPOP waiting on Redis (1 s polls); had A arrived
        # then, Redis would have handed it to Y's socket, and V would never see it.
        time.sleep(BROKER_POLL_SECONDS + 1)
        client.push_image("scale/claims-a", "v1", [layer_a])
        wait_until(lambda: _holds_claims(live), "V's claims", timeout=120, interval=0.01)
        live.stack.signal_service("worker-ingest-v", signal.SIGSTOP)
        live.stack.signal_service("worker-ingest-y", signal.SIGCONT)
        client.push_image("scale/claims-b", "v1", [layer_b])
        wait_until(lambda: _job_started(live, sha256(layer_b)), "Y's job", timeout=120)
        live.stack.kill("worker-ingest-v")
        records = wait_for_layers(live, [sha256(layer_a), sha256(layer_b)], timeout=300)
        assert {record["state"] for record in records.values()} == {"deduplicated"}, records
    finally:
        try:
            for name in ("worker-ingest-v", "worker-ingest-y"):
                live.stack.stop_service(name)
        finally:
            live.stack.respawn("worker-ingest")
    took_over = (live.workdir / "worker-ingest-y.log").read_text()
    assert "taking over" in took_over, "Y never waited for V's claims"
    copies = copies_in_packs(live, pack_keys(live) - before_packs)
    hexes = [sha256(content)[7:] for content in shared.values()]
    assert max(copies[h] for h in hexes) <= 2
    assert all(location is not None for location in live.registry.index.file_locations(hexes))
    extra = sum(copies[h] - 1 for h in hexes)
    audit = live.registry.audit_packs()
    assert audit["dead_copies"] >= extra
    for repo, layer in (("scale/claims-a", layer_a), ("scale/claims-b", layer_b)):
        assert client.request("GET", f"/v2/{repo}/blobs/{sha256(layer)}").data == layer


def _holds_claims(live: LiveStack) -> bool:
    return any(True for _key in live.registry.index.redis.scan_iter(match="dh:claim:*"))


def _job_started(live: LiveStack, digest: str) -> bool:
    job = live.registry.index.layer(digest).get("job", "")
    meta = live.registry.index.redis.get(f"celery-task-meta-{job}")
    return meta is not None and b"STARTED" in meta
