"""bench-pull: cold pulls of multi-layer images with skopeo and podman, DupHunter vs
CNCF Distribution 2.8.2, against the least time 2 cores allow for re-encoding the layers.

Usage::

    python -m bench.pull [--reps 5] [--images docker-3,pgzip-6,zstd-5] [--scale 1.0]
                         [--small] [--no-docs]

Images (OCI layouts, cached under build/bench/pull/): layers are GNU tars of real files of
this machine (no file in two layers), compressed by their producer's code: Go <= 1.26's
compress/gzip at level 6 (docker, BuildKit), klauspost pgzip with 1 MiB blocks at level 5
(skopeo, podman, buildah), klauspost zstd (podman --compression-format zstd). Each image
is pushed with skopeo to DupHunter and to Distribution (bench-core's set-up: both on the
same local S3). DupHunter runs in mode b0 with no layer buffer; the bench waits until every
layer is deduplicated and its intact copy deleted: every layer GET must restore.

Then, per repetition, image and client, one cold pull from each registry, the order
alternating: `skopeo copy docker://... oci:...` into a fresh layout (verified digest by
digest), and `podman pull` into a fresh storage root (overlay) in a private mount
namespace, removed after (its image digest checked). A DupHunter pull is cold: nothing in
the buffer, its restore spool (kept KEEP_S s in this stack) gone, and the bench checks that
each layer GET was served by a restore.

The bound, per image: each layer re-encoded by its encoder (the one the ingest identified,
with its parameters) on one thread from the tar in memory, summed, halved (2 cores),
measured in the same run, once per repetition (median). Target: DupHunter's cold pull
<= TARGET x the bound.

Results: a table on stdout, `docs/bench/pull.json`, and the section HEADING in
`docs/benchmarks.md`; with --no-docs (trial runs) only `build/bench/pull/pull.json`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench import core
from bench.report import REPO_ROOT, git_state, machine, save_json, sh, write_section
from bench.restore import SOURCES, cpu_seconds, drain, helper_gzip, write_layout
from deploy.stack import wait_until
from pipelines.encoders.gzip_families import pgzip_library
from pipelines.encoders.table import lookup_encoder
from pipelines.encoders.zstd_families import klauspost_zstd_helper, klauspost_zstd_library
from pipelines.formats.recipe import Recipe
from pipelines.registry.facade import Registry

WORK = REPO_ROOT / "build" / "bench" / "pull"
HEADING = "## bench-pull: cold pulls of multi-layer images with skopeo and podman"
TARGET = 1.3  # DupHunter's cold pull / the 2-core encoding bound
CORES = 2  # the bound the issue names: 2 cores, whatever this machine has
KEEP_S = 2.0  # the restore spool's keep time in this bench's stack
RETIRE_GRACE_S = 1.0  # intact copies deleted a second after their layer is deduplicated
MB = 1_000_000
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
CLIENTS = ("skopeo", "podman")


@dataclass(frozen=True)
class Producer:
    label: str
    media_type: str
    produce: Callable[[bytes], bytes]


def helper_zstd(*args: str) -> Callable[[bytes], bytes]:
    def produce(data: bytes) -> bytes:
        argv = [str(klauspost_zstd_helper()), "-mode", "frame", *args]
        return subprocess.run(argv, input=data, capture_output=True, check=True).stdout

    return produce


def producers() -> dict[str, Producer]:
    """Producer name -> how it compresses a layer (the helpers that are built here)."""
    chosen = {
        "docker": Producer(
            "Go <=1.26 gzip level 6 (docker)",
            GZIP_LAYER,
            helper_gzip("gzip-go1.26", "-level", "6"),
        )
    }
    if pgzip_library():
        chosen["pgzip"] = Producer(
            "pgzip 1 MiB level 5 (skopeo, podman)",
            GZIP_LAYER,
            helper_gzip("gzip-pgzip-deb", "-blocksize", str(1 << 20), "-level", "5"),
        )
    if klauspost_zstd_library():  # containers/image: checksum on, its 8 sniffed bytes first
        chosen["zstd"] = Producer(
            "klauspost zstd default (podman --compression-format zstd)",
            ZSTD_LAYER,
            helper_zstd("-speed", "default", "-crc=true", "-first", "8"),
        )
    return chosen


@dataclass(frozen=True)
class ImageSpec:
    name: str
    producer: str
    layer_mb: tuple[float, ...]  # tar sizes, largest first as in most images


# All of them are planned (files assigned) whichever are run, so that the layers of an
# image stay the same whatever subset is chosen.
IMAGES = (
    ImageSpec("docker-3", "docker", (40, 40, 40)),
    ImageSpec("pgzip-6", "pgzip", (40, 20, 10, 3, 0.5, 0.05)),
    ImageSpec("zstd-5", "zstd", (30, 15, 5, 1, 0.1)),
)


# --- inputs -------------------------------------------------------------------------------


def file_pool() -> list[tuple[str, int]]:
    """Regular files of this machine, in a stable order, with their sizes."""
    pool = []
    for root in SOURCES:
        for file in sorted(Path(root).rglob("*")):
            if file.is_file() and not file.is_symlink():
                pool.append((str(file), file.stat().st_size))
    return pool


def take_files(pool: list[tuple[str, int]], target: int) -> list[str]:
    """Files from the pool, in order, adding up to about `target` bytes (at most 10% more);
    the chosen ones leave the pool."""
    chosen, total, rest = [], 0, []
    for path, size in pool:
        if total < target and total + size <= target * 1.1 + 4096:
            chosen.append(path)
            total += size
        else:
            rest.append((path, size))
    if not chosen:
        raise RuntimeError(f"no files left for a layer of {target} bytes")
    pool[:] = rest
    return chosen


def plan_layers(
    pool: list[tuple[str, int]], specs: tuple[ImageSpec, ...], scale: float
) -> dict[str, list[list[str]]]:
    """Image name -> the files of each of its layers; no file is in two layers."""
    return {
        spec.name: [take_files(pool, int(mb * scale * MB)) for mb in spec.layer_mb]
        for spec in specs
    }


def make_tar(files: list[str], path: Path) -> bytes:
    """A GNU tar of these files, named relative to / as in an image layer."""
    listing = path.with_suffix(".files")
    listing.write_text("".join(name.lstrip("/") + "\n" for name in files))
    sh(["tar", "-C", "/", "-cf", str(path), "--no-recursion", "-T", str(listing)])
    return path.read_bytes()


@dataclass
class BuiltImage:
    spec: ImageSpec
    producer: Producer
    image: core.Image
    tars: list[bytes]


def build_images(chosen: list[ImageSpec], scale: float) -> list[BuiltImage]:
    """The chosen images as OCI layouts, rebuilt only when their layers' files changed."""
    makers = producers()
    missing = [spec.name for spec in chosen if spec.producer not in makers]
    if missing:
        raise RuntimeError(f"no helper built for the producer of {missing}: run `make helpers`")
    plan = plan_layers(file_pool(), IMAGES, scale)
    built = []
    for spec in chosen:
        work = WORK / f"images-x{scale:g}" / spec.name
        stamp, layout = work / "stamp.json", work / "layout"
        wanted = json.dumps({"producer": spec.producer, "layers": plan[spec.name]})
        tars = []
        if not (stamp.exists() and stamp.read_text() == wanted):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            tars = [
                make_tar(files, work / f"layer-{n}.tar") for n, files in enumerate(plan[spec.name])
            ]
            producer = makers[spec.producer]
            diff_ids = [f"sha256:{hashlib.sha256(tar).hexdigest()}" for tar in tars]
            blobs = [producer.produce(tar) for tar in tars]
            write_layout(layout, blobs, media_type=producer.media_type, diff_ids=diff_ids)
            stamp.write_text(wanted)
        else:
            tars = [(work / f"layer-{n}.tar").read_bytes() for n in range(len(spec.layer_mb))]
        image = core.load_image(spec.name, layout)
        built.append(BuiltImage(spec, makers[spec.producer], image, tars))
        print(f"image {spec.name}: {len(tars)} layers, {sum(map(len, tars)) / MB:.1f} MB of tar, "
              f"{image.size / MB:.1f} MB as pushed", flush=True)  # fmt: skip
    return built


# --- the bound ----------------------------------------------------------------------------


@contextmanager
def one_thread() -> Iterator[None]:
    """Go helpers (pgzip's goroutines, klauspost zstd's) on one thread."""
    os.environ["GOMAXPROCS"] = "1"
    try:
        yield
    finally:
        del os.environ["GOMAXPROCS"]


def encoding_seconds(recipes: list[Recipe], tars: list[bytes]) -> tuple[float, float]:
    """Each layer re-encoded by its encoder on one thread from its tar in memory, summed:
    wall seconds (the bound's) and CPU seconds (the same on an idle machine)."""
    wall = cpu = 0.0
    with one_thread():
        for recipe, tar in zip(recipes, tars, strict=True):
            encoder = lookup_encoder(recipe.encoder_id)
            started, cpu_started = time.perf_counter(), cpu_seconds()
            drain(encoder.body([tar], recipe.encoder_params))
            wall, cpu = wall + time.perf_counter() - started, cpu + cpu_seconds() - cpu_started
    return wall, cpu


# --- DupHunter's state --------------------------------------------------------------------


def cold_recipes(registry: Registry, image: core.Image) -> list[Recipe] | None:
    """The recipes of the image's layers once each is deduplicated with no intact copy
    left (nothing but a restore can serve it), else None."""
    recipes = []
    for digest in image.layers:
        info = registry.blobs.stored_info(digest)
        if info is None or info.recipe is None or info.segments or info.retired:
            return None
        recipes.append(Recipe.decode(registry.store.get_bytes(info.recipe)))
    return recipes


def wait_until_restorable(
    registry: Registry, image: core.Image, timeout: float = 600
) -> list[Recipe]:
    wait_until(
        lambda: cold_recipes(registry, image) is not None, f"{image.name} deduplicated", timeout
    )
    recipes = cold_recipes(registry, image)
    assert recipes is not None
    return recipes


def server_counters(ours: core.Registry) -> dict[str, float]:
    """DupHunter's counters that say what served a pull and what its restores cost."""
    stats = core.http_json(f"http://{ours.hostport}/api/v1/stats")
    counters = {
        "restores": float(stats["restores"]["on_demand_or_preconstructed"]),
        "restore_cpu_s": float(stats["restores"]["cpu_seconds"]),
        "buffer_bytes": float(stats["buffer"]["used_bytes"]),
    }
    with urllib.request.urlopen(f"http://{ours.hostport}/metrics", timeout=5) as response:
        counters.update(metric_samples(response.read().decode()))
    return counters


def metric_samples(text: str) -> dict[str, float]:
    """Blob GETs by source and restore wall time from a Prometheus exposition."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "duphunter_blob_gets_total":
                found[f"gets_{sample.labels['source']}"] = sample.value
            elif sample.name in (
                "duphunter_restore_seconds_sum",
                "duphunter_restore_seconds_count",
            ):
                kind = sample.name.rsplit("_", 1)[1]
                key = f"restore_wall_{kind}"
                found[key] = found.get(key, 0.0) + sample.value
    return found


def difference(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: round(value - before.get(key, 0.0), 3) for key, value in after.items()}


# --- clients ------------------------------------------------------------------------------


@dataclass
class Ran:
    seconds: float
    cpu_seconds: float  # of the command and every process it waited for
    stdout: str
    idle_core_s: float = 0.0  # the machine's cores left idle while it ran (/proc/stat)
    idle_by_tenth: list[float] = field(default_factory=list)  # the same, per 0.1 s


class IdleCores:
    """The machine's idle core-seconds while a command runs, sampled from /proc/stat: a
    pull on 2 cores is at the bound only if they are never idle."""

    TICK_S = 0.1

    def __init__(self) -> None:
        self.by_tick: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> IdleCores:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        last = _idle_jiffies()
        while not self._stop.wait(self.TICK_S):
            now = _idle_jiffies()
            self.by_tick.append((now - last) / os.sysconf("SC_CLK_TCK"))
            last = now
        self.by_tick.append((_idle_jiffies() - last) / os.sysconf("SC_CLK_TCK"))


def _idle_jiffies() -> int:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[4]) + int(fields[5])  # idle + iowait


def in_private_namespace(argv: list[str], env: dict[str, str] | None = None) -> Ran:
    """Run `argv` with an empty private blob-info cache (core.with_empty_cache)."""
    command = core.with_empty_cache(argv)
    started, cpu = time.perf_counter(), children_cpu_seconds()
    with IdleCores() as idle:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds, cpu = time.perf_counter() - started, children_cpu_seconds() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-2000:]}")
    return Ran(seconds, cpu, done.stdout, sum(idle.by_tick), idle.by_tick)


def children_cpu_seconds() -> float:
    """CPU of this process's finished children (and theirs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


class PodmanHome:
    """A throwaway podman: its own configuration and overlay storage in a short folder
    (podman refuses a run root over 50 characters), none of the host's."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="dh-pull-"))
        (self.home / "tmp").mkdir()
        (self.home / "containers.conf").write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'events_logfile_path = "{self.home / "events.log"}"\n'
        )
        (self.home / "registries.conf").write_text("unqualified-search-registries = []\n")
        (self.home / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.home / "root"}"\n'
            f'runroot = "{self.home / "run"}"\n'
        )
        (self.home / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        (self.home / "auth.json").write_text('{"auths": {}}')

    def run(self, *args: str) -> Ran:
        env = dict(
            os.environ,
            CONTAINERS_CONF=str(self.home / "containers.conf"),
            CONTAINERS_REGISTRIES_CONF=str(self.home / "registries.conf"),
            CONTAINERS_STORAGE_CONF=str(self.home / "storage.conf"),
            REGISTRY_AUTH_FILE=str(self.home / "auth.json"),
            TMPDIR=str(self.home / "tmp"),
        )
        argv = ["podman", "--root", str(self.home / "root"), "--runroot", str(self.home / "run"),
                "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs",
                "--events-backend", "file", *args]  # fmt: skip
        return in_private_namespace(argv, env)

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


def podman_pull(image: core.Image, registry: core.Registry, repo: str) -> Ran:
    """A cold `podman pull` into fresh storage, removed after; fails unless the image
    pulled is the one pushed (podman checks every blob's digest as it pulls)."""
    podman = PodmanHome()
    reference = f"{registry.hostport}/{repo}:{image.tag}"
    policy = str(podman.home / "policy.json")
    try:
        pull = podman.run("pull", "--quiet", "--tls-verify=false", "--signature-policy", policy,
                          reference)  # fmt: skip
        pulled = podman.run("image", "inspect", "--format", "{{.Digest}}", reference).stdout
        if pulled.strip() != image.manifest:
            raise RuntimeError(f"{registry.name}: podman pulled {pulled}, pushed {image.manifest}")
        return pull
    finally:
        podman.remove()


def skopeo_pull(image: core.Image, registry: core.Registry, repo: str) -> Ran:
    """A cold `skopeo copy` into a fresh OCI layout, removed after; fails unless every
    blob pulled is the one pushed."""
    (WORK / "scratch").mkdir(parents=True, exist_ok=True)
    layout = Path(tempfile.mkdtemp(prefix="pulled-", dir=WORK / "scratch"))
    pull = in_private_namespace(["skopeo", "copy", "--quiet", "--preserve-digests",
                                 "--src-tls-verify=false",
                                 f"docker://{registry.hostport}/{repo}:{image.tag}",
                                 f"oci:{layout}:{image.tag}"])  # fmt: skip
    try:
        core.verify_pulled(image, registry, layout)
    finally:
        shutil.rmtree(layout)
    return pull


PULLERS: dict[str, Callable[[core.Image, core.Registry, str], Ran]] = {
    "skopeo": skopeo_pull,
    "podman": podman_pull,
}


# --- measurements -------------------------------------------------------------------------

REPO = "bench/pull-{name}"


@dataclass
class Pull:
    image: str
    client: str
    registry: str
    rep: int
    seconds: float
    client_cpu_s: float  # the client's CPU (skopeo or podman)
    stack_cpu_s: float  # every service's CPU (API and its encoders, workers, S3, Redis,
    # Distribution) during the pull
    service_cpu_s: dict[str, float]  # the same, per service (api, s3, redis, worker-...),
    # and apart the helpers each one ran ("api helpers": the encoders)
    load_average: float  # the 1-minute load when it started: how busy the machine was
    server: dict[str, float]  # DupHunter's counters' changes (its pulls only)
    idle_core_s: float  # the machine's cores left idle during the pull
    idle_by_tenth: list[float]  # the same, per 0.1 s of the pull


class Bench:
    def __init__(self, services: core.Services, registry: Registry) -> None:
        self.services = services
        self.registry = registry
        self.last_ours: dict[str, float] = {}  # image -> when its last DupHunter pull ended

    def pull(self, built: BuiltImage, client: str, target: core.Registry, rep: int) -> Pull:
        image = built.image
        ours = target is self.services.ours
        core.wait_for_quiet(self.services)
        if ours:  # the restore spool of its last pull is gone
            time.sleep(max(0.0, self.last_ours.get(image.name, 0) + KEEP_S + 1 - time.monotonic()))
            before = server_counters(target)
        load, stack = os.getloadavg()[0], core.stack_cpu_split(self.services.stack)
        pulled = PULLERS[client](image, target, REPO.format(name=image.name))
        used = difference(core.stack_cpu_split(self.services.stack), stack)
        total = sum(used.values())
        seconds, cpu = pulled.seconds, pulled.cpu_seconds
        server = {}
        if ours:
            self.last_ours[image.name] = time.monotonic()
            server = difference(server_counters(target), before)
            check_cold(image, server)
        print(
            f"  {image.name:<9} {client:<7} {target.name:<13} rep {rep}: {seconds:6.2f}s"
            f"  (client CPU {cpu:5.2f}s, services {total:5.2f}s, idle cores"
            f" {pulled.idle_core_s:5.2f}s, load {load:.1f})",
            flush=True,
        )
        return Pull(image.name, client, target.name, rep, seconds, cpu, total, used, load, server,
                    pulled.idle_core_s, pulled.idle_by_tenth)  # fmt: skip


def check_cold(image: core.Image, server: dict[str, float]) -> None:
    """Every layer GET of the pull must have restored: none from the buffer or a spool."""
    warm = {key: value for key, value in server.items()
            if key in ("gets_buffer", "gets_spool", "gets_inflight") and value}  # fmt: skip
    if server.get("gets_restore", 0) < len(image.layers) or warm:
        raise RuntimeError(f"{image.name}: not a cold pull of {len(image.layers)} layers: {server}")


def push_everywhere(built: list[BuiltImage], services: core.Services) -> None:
    scratch = WORK / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    for item in built:
        for target in (services.peer, services.ours):
            seconds = core.push(item.image, target, REPO.format(name=item.image.name), scratch)
            print(f"  pushed {item.image.name} to {target.name} in {seconds:.2f}s", flush=True)


def measure(
    built: list[BuiltImage], services: core.Services, registry: Registry, reps: int
) -> dict[str, Any]:
    push_everywhere(built, services)
    recipes = {item.image.name: wait_until_restorable(registry, item.image) for item in built}
    core.wait_for_quiet(services)
    bench = Bench(services, registry)
    pulls: list[Pull] = []
    encoding: dict[str, list[tuple[float, float]]] = {item.image.name: [] for item in built}
    for rep in range(reps):
        for item in built:
            name = item.image.name
            encoding[name].append(encoding_seconds(recipes[name], item.tars))
            for number, client in enumerate(CLIENTS):
                order = [services.peer, services.ours]
                if (rep + number) % 2:
                    order.reverse()
                pulls += [bench.pull(item, client, target, rep) for target in order]
    return {
        "images": [
            image_summary(
                item, recipes[item.image.name], encoding[item.image.name], pulls, services
            )
            for item in built
        ],
        "pulls": [pull.__dict__ for pull in pulls],
        "notes": services.notes,
    }


def median_range(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def client_summary(pulls: list[Pull], bound: float, ours: str, peer: str) -> dict[str, Any]:
    mine = [pull for pull in pulls if pull.registry == ours]
    theirs = [pull for pull in pulls if pull.registry == peer]
    ours_s = median_range([pull.seconds for pull in mine])
    peer_s = median_range([pull.seconds for pull in theirs])

    def server(key: str) -> float:
        return statistics.median(pull.server.get(key, 0.0) for pull in mine)

    return {
        "duphunter_s": ours_s,
        "distribution_s": peer_s,
        "bound_ratio": ours_s["median"] / bound,
        "distribution_bound_ratio": peer_s["median"] / bound,
        "ratio": ours_s["median"] / peer_s["median"],
        "restore_cpu_s": server("restore_cpu_s"),  # the API's restores: encoders, rebuilds
        "restore_wall_sum_s": server("restore_wall_sum"),  # summed over the layers
        "services_cpu_s": statistics.median(pull.stack_cpu_s for pull in mine),
        "distribution_services_cpu_s": statistics.median(pull.stack_cpu_s for pull in theirs),
        "service_cpu_s": median_per_service(mine),
        "distribution_service_cpu_s": median_per_service(theirs),
        "client_cpu_s": statistics.median(pull.client_cpu_s for pull in mine),
        "distribution_client_cpu_s": statistics.median(pull.client_cpu_s for pull in theirs),
        "load_average": statistics.median(pull.load_average for pull in mine + theirs),
        "idle_core_s": statistics.median(pull.idle_core_s for pull in mine),
        "distribution_idle_core_s": statistics.median(pull.idle_core_s for pull in theirs),
    }


def median_per_service(pulls: list[Pull]) -> dict[str, float]:
    names = sorted({name for pull in pulls for name in pull.service_cpu_s})
    medians = {name: statistics.median(pull.service_cpu_s.get(name, 0.0) for pull in pulls)
               for name in names}  # fmt: skip
    return {name: round(seconds, 2) for name, seconds in medians.items() if seconds >= 0.01}


def image_summary(
    item: BuiltImage, recipes: list[Recipe], encoding: list[tuple[float, float]],
    pulls: list[Pull],
    services: core.Services,
) -> dict[str, Any]:  # fmt: skip
    name = item.image.name
    one_thread = statistics.median(wall for wall, _cpu in encoding)
    bound = one_thread / CORES
    return {
        "image": name,
        "producer": item.producer.label,
        "encoders": sorted({recipe.encoder_id for recipe in recipes}),
        "layers": len(item.tars),
        "tar_bytes": [len(tar) for tar in item.tars],
        "pushed_bytes": item.image.size,
        "encoding_one_thread_s": one_thread,
        "encoding_one_thread_cpu_s": statistics.median(cpu for _wall, cpu in encoding),
        "encoding_runs_s": [wall for wall, _cpu in encoding],
        "bound_s": bound,
        "clients": {
            client: client_summary(
                [pull for pull in pulls if pull.image == name and pull.client == client],
                bound,
                services.ours.name,
                services.peer.name,
            )
            for client in CLIENTS
        },
    }


# --- reporting ----------------------------------------------------------------------------


def seconds_cell(found: dict[str, float]) -> str:
    return f"{found['median']:.2f} ({found['min']:.2f}-{found['max']:.2f})"


def table(images: list[dict[str, Any]]) -> str:
    head = ("| image | producer | layers (MB of tar) | MB pushed | encoding, 1 thread s | "
            "bound s | client | Distribution s | DupHunter s | DupHunter / bound | "
            "DupHunter / Distribution | restores CPU s / wall s | load |")  # fmt: skip
    rows = [head, "|---|---|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|"]
    for image in images:
        sizes = ", ".join(f"{size / MB:.2g}" for size in image["tar_bytes"])
        for client, found in image["clients"].items():
            flag = "" if found["bound_ratio"] <= TARGET else " ✗"
            rows.append(
                f"| {image['image']} | {image['producer']} | {image['layers']} ({sizes}) | "
                f"{image['pushed_bytes'] / MB:.1f} | {image['encoding_one_thread_s']:.2f} | "
                f"{image['bound_s']:.2f} | {client} | {seconds_cell(found['distribution_s'])} | "
                f"{seconds_cell(found['duphunter_s'])} | {found['bound_ratio']:.2f}x{flag} | "
                f"{found['ratio']:.1f}x | {found['restore_cpu_s']:.2f} / "
                f"{found['restore_wall_sum_s']:.2f} | {found['load_average']:.1f} |"
            )
    return "\n".join(rows)


def by_service(seconds: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in seconds.items()) or "none"


def where_the_time_goes(images: list[dict[str, Any]]) -> str:
    lines = []
    for image in images:
        for client, found in image["clients"].items():
            extra = found["duphunter_s"]["median"] - found["distribution_s"]["median"]
            lines.append(
                f"  - {image['image']}, {client}: DupHunter {found['duphunter_s']['median']:.2f} s "
                f"= Distribution's {found['distribution_s']['median']:.2f} s "
                f"({found['distribution_bound_ratio']:.2f}x the bound) "
                f"{extra:+.2f} s ({extra / image['bound_s']:.2f}x the bound); "
                f"CPU of the services {found['services_cpu_s']:.2f} s (Distribution's run "
                f"{found['distribution_services_cpu_s']:.2f} s), of which the API's restores "
                f"{found['restore_cpu_s']:.2f} s against {image['encoding_one_thread_s']:.2f} s "
                f"of one-thread encoding ({image['encoding_one_thread_cpu_s']:.2f} CPU-s); "
                f"restores' wall time summed over the layers {found['restore_wall_sum_s']:.2f} s; "
                f"the client's CPU {found['client_cpu_s']:.2f} s "
                f"({found['distribution_client_cpu_s']:.2f} s from Distribution); "
                f"the machine's cores idle {found['idle_core_s']:.2f} core-s of "
                f"{(os.cpu_count() or 1) * found['duphunter_s']['median']:.2f} "
                f"({found['distribution_idle_core_s']:.2f} during Distribution's pull). "
                f"Services' CPU s by process: {by_service(found['service_cpu_s'])} "
                f"(Distribution's run: {by_service(found['distribution_service_cpu_s'])})."
            )
    return "\n".join(lines)


SETUP = f"""\
- Stack: bench-core's (one SeaweedFS S3; DupHunter with gunicorn 2 processes, its Celery
  workers and a Redis, `DUPHUNTER_MODE=b0`, no layer buffer; Distribution 2.8.2 proxying
  blob bytes from the same S3). Every layer is deduplicated and its intact copy deleted
  before the first pull (`DUPHUNTER_RETIRE_GRACE_SECONDS={RETIRE_GRACE_S:g}`); a DupHunter
  pull starts at least {KEEP_S + 1:g} s after the last one of the same image (its restore
  spool kept {KEEP_S:g} s) and must be served by a restore for every layer (checked from
  DupHunter's metrics), with all services idle before any pull.
- Images: layers are GNU tars of real files of this machine, no file in two layers,
  compressed by their producer's code; pushed with `skopeo copy --preserve-digests`.
- skopeo: `skopeo copy --preserve-digests docker://... oci:OUT:t` into a fresh layout (its
  blobs re-hashed after); podman: `podman pull --tls-verify=false` into a fresh overlay
  storage root, removed after. Both with an empty blob-info cache (a private mount
  namespace); both fetch layers concurrently.
- Bound: the image's layers re-encoded each by its encoder (as identified by the ingest, with
  its parameters) on one thread (`GOMAXPROCS=1`) from the tar in memory, summed, halved
  for {CORES} cores; measured in the same run, once per repetition. Target: DupHunter's
  cold pull <= {TARGET}x the bound (✗ = missed).
- Seconds: median (min-max) of the repetitions, each registry pulled once per repetition,
  the order alternating. "restores CPU / wall": the API's restore CPU (encoders, tar
  rebuild, verification; not S3's) and the restores' wall time summed over the layers.
- Idle cores: the machine's idle and iowait time (`/proc/stat`) while the client ran, in
  core-seconds: a pull on the bound's 2 cores leaves them idle only where it waits.
"""


def markdown(result: dict[str, Any]) -> str:
    worst = max(client["bound_ratio"] for image in result["images"]
                for client in image["clients"].values())  # fmt: skip
    lines = [
        *core.run_header(result, "bench-pull"),
        SETUP,
        table(result["images"]),
        "",
        f"Worst DupHunter cold pull / bound: {worst:.2f}x (target <= {TARGET}x).",
        "",
        "Where the time goes (medians):",
        "",
        where_the_time_goes(result["images"]),
    ]
    lines += [f"\nNote: {note}" for note in result.get("notes", [])]
    lines += ["", "Raw data: `docs/bench/pull.json`.", ""]
    return "\n".join(lines)


def versions() -> str:
    return core.versions() + "; " + sh(["podman", "--version"]).strip()


# --- main ---------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    only = set(args.images.split(",")) if args.images else set()
    unknown = only - {spec.name for spec in IMAGES}
    if unknown:
        raise SystemExit(f"unknown images {sorted(unknown)}; known: {[s.name for s in IMAGES]}")
    built = build_images([spec for spec in IMAGES if not only or spec.name in only], args.scale)
    os.environ["DUPHUNTER_RESTORE_KEEP_SECONDS"] = str(KEEP_S)
    os.environ["DUPHUNTER_RETIRE_GRACE_SECONDS"] = str(RETIRE_GRACE_S)
    services = core.start_services(WORK / "stack", redirect=False)
    with services.stack:
        env = services.stack.env
        os.environ.update({k: v for k, v in env.items() if k.startswith("DUPHUNTER_")})
        found = measure(built, services, Registry.connect(), args.reps)
    for bulky in ("s3", "spool"):  # keep only the logs
        shutil.rmtree(services.workdir / bulky, ignore_errors=True)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench.pull", *sys.argv[1:]]),
        "reps": args.reps,
        "scale": args.scale,
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
        **found,
        "total_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--images", default="", help="comma-separated subset of the images")
    parser.add_argument("--scale", type=float, default=1.0, help="layer sizes times this")
    parser.add_argument("--small", action="store_true", help="a trial: --reps 1 --scale 0.25")
    parser.add_argument("--no-docs", action="store_true", help="touch nothing in docs/")
    args = parser.parse_args()
    if args.small:
        args.reps, args.scale = 1, 0.25
    result = bench(args)
    if args.no_docs:  # a trial: its figures stay out of docs/
        path = WORK / "pull.json"
        path.write_text(json.dumps(result, indent=2))
    else:
        path = save_json("pull", result)
    print()
    print(table(result["images"]))
    print()
    print(where_the_time_goes(result["images"]))
    if not args.no_docs:
        write_section(HEADING, markdown(result), result["machine"])
    print(f"\nwrote {path}" + ("" if args.no_docs else " and docs/benchmarks.md"))


if __name__ == "__main__":
    main()
