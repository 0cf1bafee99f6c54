"""Garbage collection tortured: many seeds of random pushes sharing files, deletes,
pushes of deleted images again, chunked uploads, retention and GC with tiny graces, with
workers (and so GC) killed at random points, and in some seeds Redis emptied.

At the end of a seed, every image that was pushed (its manifest PUT answered 201) and not
deleted is served byte-exact and restores from its packs alone. DUPHUNTER_TORTURE_SEEDS
sets how many seeds run (default 2, of which one empties Redis; each on a stack of its
own, about a minute and a half) and DUPHUNTER_TORTURE_FIRST_SEED the first of them
(default 0), so that a longer run explores seeds that CI does not.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import urllib3

from deploy.stack import wait_until
from pipelines.serve.layercheck import check_from_packs
from tests.client import RegistryClient, image_manifest, sha256
from tests.conftest import LiveStack, own_live_stack
from tests.layers import make_tar
from tests.registry.conftest import GC_STACK_SETTINGS
from workers.app import make_celery

KiB = 1 << 10
SEEDS = int(os.environ.get("DUPHUNTER_TORTURE_SEEDS", "2"))
FIRST_SEED = int(os.environ.get("DUPHUNTER_TORTURE_FIRST_SEED", "0"))
ACTION_SECONDS = 25.0  # of random actions per seed, then the system settles
WORKERS = ("worker-ingest", "worker-maintenance", "worker-restore")
ACCEPT_IMAGE = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
RETENTION = {"rules": [{"repositories": "torture/kept-*", "keep_last": 1}]}


@dataclass
class Pushed:
    repo: str
    tag: str
    layer: bytes
    manifest_digest: str

    @property
    def layer_digest(self) -> str:
        return sha256(self.layer)


@dataclass
class World:
    """What the driver pushed and deleted, and so what must still be there."""

    rng: random.Random
    client: RegistryClient
    shared: list[tuple[str, bytes]]
    alive: dict[tuple[str, str], Pushed] = field(default_factory=dict)
    deleted: list[Pushed] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    retention_unknown: bool = False  # a retention run failed halfway


@pytest.fixture(params=range(FIRST_SEED, FIRST_SEED + SEEDS), ids=lambda seed: f"seed{seed}")
def seeded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[LiveStack, int]]:
    seed = int(request.param)
    policy = tmp_path / "retention.json"
    policy.write_text(json.dumps(RETENTION))
    settings = {
        **GC_STACK_SETTINGS,
        "DUPHUNTER_GC_GRACE_SECONDS": "2",
        "DUPHUNTER_GC_UNTAGGED": "1",
        "DUPHUNTER_MODE": "b0",
        "DUPHUNTER_RETENTION_POLICY": str(policy),
        "DUPHUNTER_RETRY_SECONDS": "60",
        # a job on a killed worker comes back after this (and resume_ingests re-queues
        # a layer still queued after twice this): the default hour outlasts the test
        "DUPHUNTER_VISIBILITY_TIMEOUT_SECONDS": "30",
    }
    with own_live_stack(tmp_path / "stack", settings) as live:
        yield live, seed


def test_gc_torture(seeded: tuple[LiveStack, int]) -> None:
    live, seed = seeded
    rng = random.Random(seed)
    world = World(rng, RegistryClient(live.url), _shared_files(rng))
    flushes = seed % 2 == 1  # every other seed empties Redis, about once
    weights = [weight for _action, weight in ACTIONS_WEIGHTED]
    deadline = time.monotonic() + ACTION_SECONDS
    while time.monotonic() < deadline:
        action = rng.choices(ACTIONS, weights=weights)[0]
        if action is flush_redis and not flushes:
            continue
        world.log.append(action.__name__)
        action(world, live)
        time.sleep(rng.uniform(0, 0.3))
    settle(world, live)
    check_everything_alive(world, live)
    check_garbage_gone(world, live)


# actions


def push_image(world: World, live: LiveStack) -> None:
    rng = world.rng
    family = rng.choice(["app", "base", "kept-a", "kept-b"])
    repo = f"torture/{family}-{rng.randrange(4)}"
    files = dict(rng.sample(world.shared, rng.randrange(3, 12)))
    files |= {f"own/{rng.random()}": rng.randbytes(rng.randrange(1, 16) * KiB)
              for _n in range(rng.randrange(0, 6))}  # fmt: skip
    layer = gzip.compress(make_tar(files), compresslevel=rng.choice([1, 6]), mtime=0)
    _push(world, live, repo, f"t{rng.randrange(1000)}", layer)


def push_deleted_again(world: World, live: LiveStack) -> None:
    """An image deleted earlier comes back: its blobs may be garbage being collected."""
    if world.deleted:
        gone = world.rng.choice(world.deleted)
        _push(world, live, gone.repo, gone.tag, gone.layer)


def _push(world: World, live: LiveStack, repo: str, tag: str, layer: bytes) -> None:
    client, rng = world.client, world.rng
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": rng.random()}).encode()
    try:
        layer_digest = (client.push_blob_chunked(repo, layer, max(1, len(layer) // 3))
                        if rng.random() < 0.5 else client.push_blob(repo, layer))  # fmt: skip
        manifest = image_manifest(client.push_blob(repo, config), len(config),
                                  [(layer_digest, len(layer))])  # fmt: skip
        response = client.push_manifest(repo, tag, manifest)
    except (AssertionError, urllib3.exceptions.HTTPError) as error:
        world.log.append(f"push {repo}:{tag} failed: {str(error)[:120]}")
        return
    if response.status != 201:  # a refusal is allowed (503 while Redis is rebuilt, ...)
        world.log.append(f"push {repo}:{tag} refused: {response.status}")
        return
    pushed = Pushed(repo, tag, layer, response.headers["Docker-Content-Digest"])
    world.alive[(repo, tag)] = pushed


def delete_image(world: World, live: LiveStack) -> None:
    if not world.alive:
        return
    key = world.rng.choice(sorted(world.alive))
    pushed = world.alive[key]
    response = world.client.request(
        "DELETE", f"/v2/{pushed.repo}/manifests/{pushed.manifest_digest}"
    )
    if response.status == 202:
        image = (pushed.repo, pushed.manifest_digest)
        for other in [k for k, p in world.alive.items() if (p.repo, p.manifest_digest) == image]:
            world.deleted.append(world.alive.pop(other))


def collect(world: World, live: LiveStack) -> None:
    make_celery(live.settings).send_task("workers.tasks.collect_garbage", args=(False,))


def apply_retention(world: World, live: LiveStack) -> None:
    """The retention job's own code, run here so that what it deleted is known exactly."""
    try:
        deleted = live.registry.apply_retention(dry_run=False)
    except Exception as error:  # a rebuild of the index under it: it deleted some, or none
        world.log.append(f"retention failed: {error!r}")
        world.retention_unknown = True
        return
    for repo, tags in deleted.items():
        for tag in tags:
            if (repo, tag) in world.alive:
                world.deleted.append(world.alive.pop((repo, tag)))


def forget_what_retention_deleted(world: World) -> None:
    """In the repositories retention applies to, what the registry lists is what it kept."""
    for repo in sorted({repo for repo, _tag in world.alive if "/kept-" in repo}):
        response = world.client.request("GET", f"/v2/{repo}/tags/list")
        assert response.status == 200, response.data
        tags = set(json.loads(response.data)["tags"] or [])
        for key in [k for k in world.alive if k[0] == repo and k[1] not in tags]:
            world.deleted.append(world.alive.pop(key))


def kill_worker(world: World, live: LiveStack) -> None:
    name = world.rng.choice(WORKERS)
    live.stack.kill(name)
    live.stack.respawn(name)


def flush_redis(world: World, live: LiveStack) -> None:
    live.registry.index.redis.flushall()


ACTIONS_WEIGHTED = [
    (push_image, 10),
    (push_deleted_again, 3),
    (delete_image, 4),
    (collect, 4),
    (apply_retention, 1),
    (kill_worker, 2),
    (flush_redis, 1),
]
ACTIONS = [action for action, _weight in ACTIONS_WEIGHTED]


# the end of a seed


def settle(world: World, live: LiveStack) -> None:
    """Let every pushed layer be ingested and its intact copy retired (the jobs Redis lost
    with its keys are found again by `resume_ingests`), then collect until a run completes."""
    celery = make_celery(live.settings)
    wait_until(live.registry.index.is_ready, "the index rebuilt", timeout=180)
    if world.retention_unknown:
        forget_what_retention_deleted(world)
    layers = {pushed.layer_digest for pushed in world.alive.values()}
    deadline = time.monotonic() + 300
    while not all(_settled(live, digest) for digest in layers):
        assert time.monotonic() < deadline, {
            digest: (live.registry.index.layer(digest), live.registry.blobs.stored_info(digest))
            for digest in layers
            if not _settled(live, digest)
        }
        celery.send_task("workers.tasks.resume_ingests")  # what Redis lost, asked for again
        time.sleep(10)
    completed = 0
    for _attempt in range(12):  # a GC killed at random holds its lock for up to a minute
        time.sleep(live.settings.gc_grace_seconds + 1)
        try:
            report = celery.send_task("workers.tasks.collect_garbage", (False,)).get(timeout=300)
        except Exception as error:
            world.log.append(f"settling GC: {error!r}")
            continue
        assert not report["refused"], report
        completed += 1
        if completed == 2:
            return
    raise AssertionError(f"no two GC runs completed: {world.log[-5:]}")


def _settled(live: LiveStack, digest: str) -> bool:
    info = live.registry.blobs.stored_info(digest)
    return info is not None and info.deduplicated and not info.retired and not info.segments


def check_everything_alive(world: World, live: LiveStack) -> None:
    client, registry = world.client, live.registry
    assert world.alive, f"nothing was pushed: {world.log}"
    for (repo, tag), pushed in sorted(world.alive.items()):
        manifest = client.request("GET", f"/v2/{repo}/manifests/{tag}", headers=ACCEPT_IMAGE)
        assert manifest.status == 200, (repo, tag, manifest.data, world.log)
        assert manifest.headers["Docker-Content-Digest"] == pushed.manifest_digest
        blob = client.request("GET", f"/v2/{repo}/blobs/{pushed.layer_digest}")
        assert blob.status == 200 and blob.data == pushed.layer, (repo, tag, world.log)
        info = registry.blobs.stored_info(pushed.layer_digest)
        assert info is not None and info.deduplicated
        proof = check_from_packs(registry.store, registry.files, info)
        assert proof.ok, (repo, tag, proof.reason, proof.problems, world.log)


def check_garbage_gone(world: World, live: LiveStack) -> None:
    """The layers of deleted images that no image still names were collected."""
    alive = {pushed.layer_digest for pushed in world.alive.values()}
    for gone in world.deleted:
        if gone.layer_digest not in alive:
            assert live.registry.blobs.stored_info(gone.layer_digest) is None, gone.repo


def _shared_files(rng: random.Random) -> list[tuple[str, bytes]]:
    return [(f"lib/{n}.so", rng.randbytes(rng.randrange(2, 24) * KiB)) for n in range(30)]
