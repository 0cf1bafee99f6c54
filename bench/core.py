"""bench-core: push and pull real images with skopeo, DupHunter vs CNCF Distribution 2.8.2.

Usage::

    python -m bench.core [--reps 3] [--images a,b] [--big] [--no-redirect] [--no-docs]

Both registries run on this machine on loopback ports and keep their bytes on the SAME local
S3 server (SeaweedFS `weed mini`): DupHunter (gunicorn, 2 processes, plus its Celery workers and
a Redis) in bucket `duphunter`, Debian's `docker-registry` in bucket `distribution` with
`redirect: disable: true`, so that both proxy blob bytes. The test images are OCI layouts built
offline with umoci from files of this machine (real pgzip layers), cached under
`build/bench/images/`. Every push goes to a fresh repository, with a private, empty skopeo
blob-info cache (a private mount namespace with a tmpfs over /var/lib/containers/cache), so
every layer is really uploaded; every pull goes to a fresh OCI layout and is checked digest by
digest against what was pushed. Measurements alternate between the registries (peer, ours,
then ours, peer, ...); the table shows the median of `--reps` runs. Before every timed run the
benchmark waits until DupHunter's ingest queue is idle, so that background ingestion of the
previous push does not eat into the next measurement (its duration is reported separately).

Results: a table on stdout, `docs/bench/core.json`, and the section
`## bench-core: push and pull against Distribution 2.8.2` in `docs/benchmarks.md`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from minio import Minio

from bench.report import RESULTS, bar_chart, git_state, machine, sh, write_section
from deploy.services import api_command
from deploy.stack import REPO_ROOT, VENV_BIN, Stack, free_port, wait_until
from pipelines.encoders.base import helper_dir

OUT_DIR = REPO_ROOT / "build" / "bench"
IMAGE_DIR = OUT_DIR / "images"
SECTION = "## bench-core: push and pull against Distribution 2.8.2"
ACCESS, SECRET = "duphunter", "duphunter-secret-key"
OUR_BUCKET, PEER_BUCKET = "duphunter", "distribution"
TARGET_RATIO = 1.3
# a pull this long after the previous one of the same layers finds no restore spool left
KEEP_S = float(os.environ.get("DUPHUNTER_RESTORE_KEEP_SECONDS", "30"))
COLD_GAP_S = KEEP_S + 5
MB = 1_000_000
SKOPEO_CACHE = "/var/lib/containers/cache"
IMAGE_FORMAT = 3  # bump to rebuild the cached image layouts

# image name -> one list of source paths per layer (copied into the rootfs, same path)
IMAGE_SPECS: dict[str, list[list[str]]] = {
    "python": [["/usr/lib/python3.11"], ["/usr/lib/python3"]],
    "share": [["/usr/share/locale"], ["/usr/share/vim", "/usr/share/perl"]],
    "tools": [
        ["/usr/lib/go-1.19/bin", "/usr/lib/go-1.19/pkg/tool"],
        ["/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1"],
    ],
}
BIG_IMAGE = "big-random"
BIG_BYTES = 1 << 30
REDIRECT_BYTES = 64 << 20


@dataclass
class Image:
    name: str
    layout: Path
    tag: str
    manifest: str
    config: str
    layers: list[str]
    size: int  # bytes of manifest + config + layers, as transferred


@dataclass
class Registry:
    name: str
    hostport: str


@dataclass
class Run:
    image: str
    registry: str
    rep: int
    push_s: float
    pull_intact_s: float  # pull right after the push, before ingestion: intact layers
    pull_s: float  # first pull after ingestion (DupHunter restores deduplicated layers)
    pull_warm_s: float  # the same pull again at once (DupHunter may serve its restore spool)
    settle_after_push_s: float  # waiting for DupHunter's background work before the pull
    layer_states: dict[str, int]  # DupHunter's layers by state, when the pull started


@dataclass
class Services:
    stack: Stack
    ours: Registry
    peer: Registry
    redirect_peer: Registry | None
    ours_redirecting: Registry | None
    workdir: Path
    notes: list[str] = field(default_factory=list)
    last_pull: dict[tuple[str, str], float] = field(default_factory=dict)


# --- commands -----------------------------------------------------------------------------


def with_empty_cache(argv: list[str]) -> list[str]:
    """`argv` run in a private mount namespace with an empty blob-info cache over
    SKOPEO_CACHE (nothing of an earlier pull is reused; the mount dies with it)."""
    Path(SKOPEO_CACHE).mkdir(parents=True, exist_ok=True)  # absent until skopeo first ran
    script = f'mount -t tmpfs tmpfs {SKOPEO_CACHE} && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]


def skopeo(args: list[str]) -> float:
    """Run `skopeo` with an empty private blob-info cache; returns the wall time in seconds."""
    started = time.perf_counter()
    sh(with_empty_cache(["skopeo", *args]))
    return time.perf_counter() - started


# --- images -------------------------------------------------------------------------------


def read_layout(layout: Path, tag: str) -> tuple[str, dict[str, Any]]:
    """The manifest digest and parsed manifest of `tag` in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            digest = str(entry["digest"])
            return digest, json.loads(blob_path(layout, digest).read_bytes())
    raise RuntimeError(f"{layout} has no tag {tag}")


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, hex_part = digest.split(":", 1)
    return layout / "blobs" / algorithm / hex_part


def load_image(name: str, layout: Path, tag: str = "t") -> Image:
    digest, manifest = read_layout(layout, tag)
    layers = [str(layer["digest"]) for layer in manifest["layers"]]
    config = str(manifest["config"]["digest"])
    size = blob_path(layout, digest).stat().st_size
    size += sum(blob_path(layout, d).stat().st_size for d in [config, *layers])
    return Image(name, layout, tag, digest, config, layers, size)


def build_image(name: str, layers: list[list[str]], work: Path) -> Path:
    """An OCI layout with one gzip layer per entry of `layers`, made by umoci."""
    layout, bundle = work / "layout", work / "bundle"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sh(["umoci", "init", "--layout", str(layout)])
    sh(["umoci", "new", "--image", f"{layout}:t"])
    sh(["umoci", "unpack", "--image", f"{layout}:t", str(bundle)])
    for sources in layers:
        for source in sources:
            target = bundle / "rootfs" / source.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            sh(["cp", "-a", "-H", source, str(target)])
        sh(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:t", str(bundle)])
    sh(["umoci", "gc", "--layout", str(layout)])
    shutil.rmtree(bundle)
    return layout


def make_random_files(folder: Path, total: int, pieces: int = 4) -> None:
    """`total` bytes of incompressible data in `pieces` files."""
    folder.mkdir(parents=True, exist_ok=True)
    with open("/dev/urandom", "rb") as source:
        for number in range(pieces):
            with open(folder / f"random-{number}.bin", "wb") as out:
                left = total // pieces
                while left > 0:
                    left -= out.write(source.read(min(left, 16 << 20)))


def cached_image(name: str, layers: list[list[str]]) -> Image:
    work = IMAGE_DIR / name
    stamp = work / "stamp.json"
    wanted = json.dumps({"format": IMAGE_FORMAT, "layers": layers})
    if not (stamp.exists() and stamp.read_text() == wanted):
        started = time.perf_counter()
        build_image(name, layers, work)
        stamp.write_text(wanted)
        print(f"built image {name} in {time.perf_counter() - started:.1f}s", flush=True)
    return load_image(name, work / "layout")


def all_images(big: bool, only: set[str]) -> list[Image]:
    specs = {name: spec for name, spec in IMAGE_SPECS.items() if not only or name in only}
    images = [cached_image(name, layers) for name, layers in specs.items()]
    if big and (not only or BIG_IMAGE in only):
        source = IMAGE_DIR / "big-random-source" / "opt" / "random"
        if not (source / "random-3.bin").exists():
            make_random_files(source, BIG_BYTES)
        images.append(cached_image(BIG_IMAGE, [[str(source)]]))
    return images


# --- services -----------------------------------------------------------------------------


def distribution_config(s3: str, bucket: str, root: str, listen: str, redirect: bool) -> str:
    """Its upload purger is off: it starts at a random minute of the first hour, walks the
    bucket, and 2.8.2's panics on a listing from SeaweedFS (index out of range in
    purgeuploads.go), taking the peer down in the middle of a bench."""
    return f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  s3:
    region: us-east-1
    regionendpoint: http://{s3}
    bucket: {bucket}
    rootdirectory: {root}
    accesskey: {ACCESS}
    secretkey: {SECRET}
    secure: false
    v4auth: true
  redirect:
    disable: {"false" if redirect else "true"}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {listen}
"""


def start_distribution(stack: Stack, s3: str, name: str, root: str, redirect: bool) -> Registry:
    listen = f"127.0.0.1:{free_port()}"
    config = stack.workdir / f"{name}.yml"
    config.write_text(distribution_config(s3, PEER_BUCKET, root, listen, redirect))
    env = {k: v for k, v in stack.env.items() if k != "AWS_CA_BUNDLE"}
    stack.spawn(name, ["docker-registry", "serve", str(config)], env=env)
    wait_until(lambda: http_json(f"http://{listen}/v2/") is not None, name)
    return Registry(name, listen)


def start_services(workdir: Path, redirect: bool) -> Services:
    shutil.rmtree(workdir, ignore_errors=True)
    stack = Stack(workdir)
    try:
        redis_url = stack.start_redis(free_port())
        s3 = stack.start_s3(free_port(10000), ACCESS, SECRET, OUR_BUCKET)
        Minio(s3, access_key=ACCESS, secret_key=SECRET, secure=False).make_bucket(PEER_BUCKET)
        listen = f"127.0.0.1:{free_port()}"
        stack.env.update(
            {
                "DUPHUNTER_REDIS_URL": redis_url,
                "DUPHUNTER_S3_ENDPOINT": s3,
                "DUPHUNTER_S3_ACCESS_KEY": ACCESS,
                "DUPHUNTER_S3_SECRET_KEY": SECRET,
                "DUPHUNTER_S3_BUCKET": OUR_BUCKET,
                "DUPHUNTER_LISTEN": listen,
                "DUPHUNTER_SPOOL_DIR": str(workdir / "spool"),
                # No popularity replicas: phase 1's pulls would make the layers hot and
                # keep their intact copies, and the "cold" pulls would not restore.
                "DUPHUNTER_MODE": "b0",
                "DUPHUNTER_BUFFER_BYTES": "0",  # nor a buffer: every cold pull restores
            }
        )
        stack.start_workers()
        stack.start_api(listen, processes=2)
        peer = start_distribution(stack, s3, "distribution", "/proxy", redirect=False)
        other = ours_redirecting = None
        if redirect:
            other = start_distribution(stack, s3, "distribution-redirect", "/redirect", True)
            ours_redirecting = start_redirecting_api(stack, workdir)
    except BaseException:
        stack.stop()
        raise
    ours = Registry("duphunter", listen)
    return Services(stack, ours, peer, other, ours_redirecting, workdir)


def start_redirecting_api(stack: Stack, workdir: Path) -> Registry:
    """A second DupHunter API on the same Redis and S3 that answers blob GETs of single-
    object intact blobs with a 307 to a presigned S3 URL, and deduplicates nothing (mode
    intact), so that the image pushed through it stays intact."""
    listen = f"127.0.0.1:{free_port()}"
    env = dict(stack.env, DUPHUNTER_REDIRECT="presigned", DUPHUNTER_MODE="intact",
               DUPHUNTER_SPOOL_DIR=str(workdir / "spool-redirect"))  # fmt: skip
    stack.spawn("api-redirect", api_command(VENV_BIN, listen, 2), env)
    wait_until(lambda: http_json(f"http://{listen}/v2/") == {}, "redirecting API")
    return Registry("duphunter-redirect", listen)


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read() or b"null")


def stack_cpu_seconds(stack: Stack, children: bool = False) -> float:
    """CPU seconds used so far by the live processes of every service of the stack, and
    with `children` by the processes they started and waited for (encoder helpers)."""
    return sum(stack_cpu_by_service(stack, children).values())


def stack_cpu_split(stack: Stack) -> dict[str, float]:
    """`stack_cpu_by_service`: each service's own processes, and apart ("<name> helpers")
    the processes they started and waited for, where there were any."""
    split = {}
    for name, (own, helpers) in _stack_cpu(stack).items():
        split[name] = own
        if helpers:
            split[f"{name} helpers"] = helpers
    return split


def stack_cpu_by_service(stack: Stack, children: bool = False) -> dict[str, float]:
    """`stack_cpu_seconds`, per service of the stack (its name in `Stack.processes`)."""
    cpu = _stack_cpu(stack).items()
    return {name: own + (helpers if children else 0) for name, (own, helpers) in cpu}


def _stack_cpu(stack: Stack) -> dict[str, tuple[float, float]]:
    """Per service, the CPU seconds of its live processes and of its helpers: those it
    waited for, and the served segment helpers it keeps up (live, in its process group)."""
    names = {process.pid: name for name, process in stack.processes}
    ticks = {name: [0, 0] for name in names.values()}
    helpers = helper_dir().resolve()
    for entry, fields in _processes():
        name = names.get(int(fields[2]))  # pgrp; utime, stime, cutime, cstime at 11-14
        if name is None:
            continue
        own, waited = int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
        ticks[name][is_helper_process(entry, helpers)] += own
        ticks[name][1] += waited
    tick = os.sysconf("SC_CLK_TCK")
    return {name: (own / tick, waited / tick) for name, (own, waited) in ticks.items()}


def live_helpers_cpu_seconds() -> float:
    """CPU seconds of this process's live encoder helpers (the served segment helpers it
    keeps up: not waited for, so not in RUSAGE_CHILDREN yet)."""
    me, ticks, helpers = os.getpid(), 0, helper_dir().resolve()
    for entry, fields in _processes():
        if int(fields[1]) == me and is_helper_process(entry, helpers):
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _processes() -> Iterator[tuple[Path, list[str]]]:
    """Each live process's /proc directory and the fields of its stat after the name."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            yield entry, (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue


def is_helper_process(process: Path, helpers: Path) -> bool:
    """Whether /proc/<pid> runs a program of `helpers`, the encoder helpers' directory."""
    try:
        return Path(os.readlink(process / "exe")).parent == helpers
    except OSError:
        return False


def ingest_pending(ours: Registry) -> bool:
    """Whether DupHunter reports queued jobs or layers still waiting for ingestion."""
    stats = http_json(f"http://{ours.hostport}/api/v1/stats")
    queued = int(stats.get("layers", {}).get("queued", 0))
    return queued > 0 or any(int(v) for v in stats.get("queues", {}).values())


def wait_for_quiet(services: Services, timeout: float = 600) -> float:
    """Wait until DupHunter's background work is done; returns the seconds waited.

    Done means: every service together uses under 10% of a core for 2 s in a row and no
    job or layer is queued, or 6 s in a row of quiet whatever the stats say (a layer
    whose ingest job failed stays "queued" for ever)."""
    started = time.perf_counter()
    quiet = 0
    before = stack_cpu_seconds(services.stack)
    while time.perf_counter() - started < timeout:
        time.sleep(1)
        now = stack_cpu_seconds(services.stack)
        quiet = quiet + 1 if now - before < 0.1 else 0
        before = now
        if quiet >= 6 or (quiet >= 2 and not ingest_pending(services.ours)):
            return time.perf_counter() - started
    services.notes.append(f"background work did not settle within {timeout:.0f}s")
    return time.perf_counter() - started


# --- measurements -------------------------------------------------------------------------


def push(image: Image, registry: Registry, repo: str, scratch: Path) -> float:
    digest_file = scratch / "pushed.digest"
    seconds = skopeo(
        [
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--digestfile",
            str(digest_file),
            f"oci:{image.layout}:{image.tag}",
            f"docker://{registry.hostport}/{repo}:{image.tag}",
        ]
    )
    pushed = digest_file.read_text().strip()
    if pushed != image.manifest:
        raise RuntimeError(f"{registry.name}: pushed {pushed}, expected {image.manifest}")
    return seconds


def pull(image: Image, registry: Registry, repo: str, scratch: Path) -> float:
    layout = scratch / "pulled"
    shutil.rmtree(layout, ignore_errors=True)
    seconds = skopeo(
        [
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            f"docker://{registry.hostport}/{repo}:{image.tag}",
            f"oci:{layout}:{image.tag}",
        ]
    )
    verify_pulled(image, registry, layout)
    shutil.rmtree(layout)
    return seconds


def verify_pulled(image: Image, registry: Registry, layout: Path) -> None:
    """Fail loudly unless the pulled manifest, config and layers are the pushed ones."""
    digest, manifest = read_layout(layout, image.tag)
    layers = [str(layer["digest"]) for layer in manifest["layers"]]
    config = str(manifest["config"]["digest"])
    if (digest, config, layers) != (image.manifest, image.config, image.layers):
        raise RuntimeError(
            f"{registry.name} returned {digest} config {config} layers {layers}; pushed "
            f"{image.manifest} config {image.config} layers {image.layers}"
        )
    for blob in [digest, config, *layers]:
        if file_digest(blob_path(layout, blob)) != blob:
            raise RuntimeError(f"{registry.name}: pulled blob {blob} does not hash to its digest")


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()


def push_and_pull_intact(
    image: Image, registry: Registry, services: Services, rep: int, scratch: Path
) -> Run:
    wait_for_quiet(services)
    repo = f"bench/{image.name}-{rep}"
    pushed = push(image, registry, repo, scratch)
    intact = pull(image, registry, repo, scratch)
    print(
        f"  {image.name:<11} {registry.name:<22} rep {rep}: push {pushed:6.2f}s  "
        f"pull intact {intact:6.2f}s",
        flush=True,
    )
    return Run(image.name, registry.name, rep, pushed, intact, 0.0, 0.0, 0.0, {})


def pull_deduplicated(
    run: Run, image: Image, registry: Registry, services: Services, scratch: Path
) -> None:
    wait_until_cold(services, (image.name, registry.name))
    repo = f"bench/{image.name}-{run.rep}"
    run.pull_s = pull(image, registry, repo, scratch)
    run.pull_warm_s = pull(image, registry, repo, scratch)
    services.last_pull[(image.name, registry.name)] = time.monotonic()
    print(
        f"  {image.name:<11} {registry.name:<22} rep {run.rep}: pull {run.pull_s:6.2f}s  "
        f"pull again {run.pull_warm_s:6.2f}s",
        flush=True,
    )


def wait_until_cold(services: Services, key: tuple[str, str]) -> None:
    """Sleep until the last pull of these layers from this registry is COLD_GAP_S old."""
    last = services.last_pull.get(key)
    if last is not None:
        time.sleep(max(0.0, last + COLD_GAP_S - time.monotonic()))


def run_all(images: list[Image], services: Services, reps: int, scratch: Path) -> list[Run]:
    """Phase 1, DupHunter's ingest worker held back: every push, then a pull of the layers as
    pushed (intact). Phase 2, after ingestion: cold pulls (DupHunter restores) and warm ones."""
    plan = [
        (rep, image, registry)
        for rep in range(reps)
        for image in images
        for registry in (
            [services.peer, services.ours] if rep % 2 == 0 else [services.ours, services.peer]
        )
    ]
    services.stack.kill("worker-ingest")
    runs = [
        push_and_pull_intact(image, registry, services, rep, scratch)
        for rep, image, registry in plan
    ]
    services.stack.respawn("worker-ingest")
    settle = wait_for_quiet(services)
    stats_url = f"http://{services.ours.hostport}/api/v1/stats"
    before = http_json(stats_url)
    states = dict(before.get("layers", {}))
    for run, (_rep, image, registry) in zip(runs, plan, strict=True):
        run.settle_after_push_s, run.layer_states = settle, states
        pull_deduplicated(run, image, registry, services, scratch)
    restores = http_json(stats_url)["restores"]["on_demand_or_preconstructed"]
    services.notes.append(
        f"DupHunter restored {restores - before['restores']['on_demand_or_preconstructed']}"
        f" layers during phase 2 (its {len(runs) // 2} cold pulls; b0 mode, no buffer)"
    )
    return runs


# --- reporting ----------------------------------------------------------------------------


KINDS = ("push", "pull_intact", "pull", "pull_warm")
HEADS = {
    "push": "push",
    "pull_intact": "pull (intact)",
    "pull": "pull (dedup, cold)",
    "pull_warm": "pull again (local spool)",
}


def median_of(runs: list[Run], image: str, registry: str, attr: str) -> float:
    values = [getattr(r, attr) for r in runs if r.image == image and r.registry == registry]
    return float(statistics.median(values))


def summarize(images: list[Image], runs: list[Run], ours: str, peer: str) -> list[dict[str, Any]]:
    rows = []
    for image in images:
        row: dict[str, Any] = {"image": image.name, "bytes": image.size}
        row["layers"] = len(image.layers)
        for kind in KINDS:
            mine = median_of(runs, image.name, ours, f"{kind}_s")
            theirs = median_of(runs, image.name, peer, f"{kind}_s")
            row[kind] = {
                "peer_s": round(theirs, 3),
                "ours_s": round(mine, 3),
                "ratio": round(mine / theirs, 3),
                "peer_mb_s": round(image.size / MB / theirs, 1),
                "ours_mb_s": round(image.size / MB / mine, 1),
            }
        rows.append(row)
    return rows


def first_settle(runs: list[Run], ours: str) -> dict[str, float]:
    """Seconds DupHunter took to ingest every pushed layer once its worker ran."""
    return {"all images": round(max(run.settle_after_push_s for run in runs), 1)}


def table(rows: list[dict[str, Any]]) -> str:
    header = ["image", "size MB", "layers"]
    for kind in KINDS:
        header += [f"{HEADS[kind]} {x}" for x in ("peer s", "ours s", "ratio", "MB/s peer/ours")]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
    for row in rows:
        cells = [row["image"], f"{row['bytes'] / MB:.1f}", str(row["layers"])]
        for kind in KINDS:
            m = row[kind]
            flag = "" if m["ratio"] <= TARGET_RATIO else " ✗"
            cells += [
                f"{m['peer_s']:.2f}",
                f"{m['ours_s']:.2f}",
                f"{m['ratio']:.2f}{flag}",
                f"{m['peer_mb_s']:.0f} / {m['ours_mb_s']:.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions() -> str:
    return "; ".join(
        [
            sh(["skopeo", "--version"]).strip(),
            sh(["umoci", "--version"]).strip(),
            sh(["docker-registry", "--version"]).strip(),
            "SeaweedFS weed "
            + sh([str(Path(sys.executable).parent / "weed"), "version"]).splitlines()[0].strip(),
        ]
    )


SETUP = f"""\
Setup (all on loopback, one machine):

- One SeaweedFS `weed mini` S3 server. DupHunter (gunicorn, 2 processes x 16 threads, its
  Celery workers, a Redis) stores in bucket `duphunter`; Distribution 2.8.2 (Debian
  `docker-registry`, s3 driver, `v4auth`, `redirect: disable: true`, so that it proxies blob
  bytes as DupHunter does) in bucket `distribution`.
- Images: OCI layouts made offline with umoci (pgzip layers) from files of this machine:
  `python` = /usr/lib/python3.11 + /usr/lib/python3 (4.3k files), `share` =
  /usr/share/locale + /usr/share/{{vim,perl}} (6.4k files), `tools` = Go toolchain binaries +
  libLLVM-15 (21 files); cached in `build/bench/images/`.
- Push: `skopeo copy --preserve-digests --dest-tls-verify=false oci:L:t
  docker://127.0.0.1:P/bench/<image>-<rep>:t`, each time into a fresh repository and with an
  empty private blob-info cache (`unshare -m` + tmpfs over /var/lib/containers/cache), so
  every layer is uploaded (from the 2nd repetition on, the registry already holds the blobs in
  another repository; both then receive and drop the bytes).
- Pull: `skopeo copy --preserve-digests --src-tls-verify=false docker://... oci:OUT:t` into
  a fresh layout; the manifest, config and layer digests must equal the pushed ones and every
  pulled blob is re-hashed.
- Two phases. Phase 1, with DupHunter's ingest worker held back: every push, each followed
  by "pull (intact)", so both registries serve the blobs as pushed (the issue's target).
  Phase 2, once that worker has deduplicated every layer: "pull (dedup, cold)", where
  DupHunter (`DUPHUNTER_MODE=b0`, no buffer: no hot-layer replicas, no buffered copy)
  restores the layers from stored files, at least {COLD_GAP_S:.0f} s after any
  earlier pull of the same layers (no restore spool left), then "pull again (local spool)"
  at once: DupHunter then serves the layers it has just restored from this host's restore
  spool (kept {KEEP_S:.0f} s), not from a new restore.
- Order alternates per repetition (peer then ours, ours then peer); medians of the
  repetitions. MB = 10^6 bytes; ratio = ours / peer, target <= {TARGET_RATIO} (✗ = missed).
"""


def ours(run: dict[str, Any]) -> bool:
    return bool(run["registry"] == "duphunter")


def run_header(result: dict[str, Any], target: str) -> list[str]:
    """When, how and at which commit a run was made, on which machine, with which tools."""
    return [
        f"Run {result['date']} by `make {target}` (`{result['command']}`: "
        f"{result['reps']} repetitions, total {result['total_s']:.0f} s), code at "
        f"{result['git']}.",
        "",
        "```",
        result["machine"],
        "```",
        "",
        f"Tools: {result['versions']}.",
        "",
    ]


def markdown(result: dict[str, Any]) -> str:
    lines = [
        SECTION,
        "",
        *run_header(result, "bench-core"),
        SETUP,
        table(result["rows"]),
        "",
        "DupHunter's layer states when its pulls started: "
        + ", ".join(sorted({json.dumps(r["layer_states"]) for r in result["runs"] if ours(r)}))
        + ". Ingestion of all the layers pushed in phase 1 by one ingest worker, until every "
        "service was idle again (resolution ~2 s): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result["ingest_s"].items())
        + ".",
    ]
    if redirect_text(result):
        lines += ["", f"Footnote: {redirect_text(result)}"]
    lines += [f"\nNote: {note}" for note in result.get("notes", [])]
    lines += ["", "Raw data: `docs/bench/core.json`.", ""]
    return "\n".join(lines)


def write_docs(result: dict[str, Any]) -> None:
    chart = bar_chart(
        REPO_ROOT / "docs" / "img" / "bench-core.png",
        "DupHunter time / Distribution time (log scale; below the line is within target)",
        {
            row["image"]: {HEADS[kind]: row[kind]["ratio"] for kind in KINDS if kind in row}
            for row in result["rows"]
        },
        "ratio",
        target=TARGET_RATIO,
        log=True,
    )
    body = markdown(result).removeprefix(SECTION)
    write_section(SECTION, f"![bench-core ratios](img/{chart.name})\n{body}", result["machine"])


def redirect_footnote(images: list[Image], services: Services, scratch: Path) -> dict[str, Any]:
    """One push and pull of the smallest image through a Distribution that redirects GETs,
    and DupHunter's pulls of an intact image with and without redirects."""
    peer = services.redirect_peer
    if peer is None:
        return {}
    image = min(images, key=lambda i: i.size)
    try:
        pushed = push(image, peer, f"bench/redirect-{image.name}", scratch)
        pulled = pull(image, peer, f"bench/redirect-{image.name}", scratch)
    except RuntimeError as error:
        return {"image": image.name, "error": str(error)}
    found = {"image": image.name, "push_s": round(pushed, 3), "pull_s": round(pulled, 3)}
    if services.ours_redirecting is not None:
        found["ours"] = ours_redirected(services, scratch)
    return found


def ours_redirected(services: Services, scratch: Path) -> dict[str, Any]:
    """An image of random data (so that it is new, and stays intact in mode intact) pushed
    through the redirecting API; pulled through it (307s) and through the streaming one,
    three times each, alternating; medians."""
    source = IMAGE_DIR / "redirect-random-source" / "opt" / "random"
    if not (source / "random-3.bin").exists():
        make_random_files(source, REDIRECT_BYTES)
    image = cached_image("redirect-random", [[str(source)]])
    redirecting = services.ours_redirecting
    assert redirecting is not None
    repo = f"bench/redirect-random-{int(time.time())}"
    push(image, redirecting, repo, scratch)
    redirected, streamed = [], []
    for _rep in range(3):
        redirected.append(pull(image, redirecting, repo, scratch))
        streamed.append(pull(image, services.ours, repo, scratch))
    return {
        "image_bytes": image.size,
        "pull_redirected_s": round(statistics.median(redirected), 3),
        "pull_streamed_s": round(statistics.median(streamed), 3),
    }


def redirect_text(result: dict[str, Any]) -> str:
    found = result.get("redirect") or {}
    if not found:
        return ""
    if "error" in found:
        return f"Distribution with S3 redirects enabled failed: {found['error']}"
    row = next(r for r in result["rows"] if r["image"] == found["image"])
    text = (
        f"with `redirect` enabled (blob GETs answered by a 307 to a presigned S3 URL, which "
        f"skopeo follows), Distribution pushed `{found['image']}` in {found['push_s']:.2f} s "
        f"and pulled it in {found['pull_s']:.2f} s (one run; proxied medians above: "
        f"{row['push']['peer_s']:.2f} s and {row['pull']['peer_s']:.2f} s)."
    )
    ours = found.get("ours")
    if ours:
        text += (
            f" DupHunter with `DUPHUNTER_REDIRECT=presigned` pulled an intact "
            f"{ours['image_bytes'] / MB:.0f} MB image of random data in "
            f"{ours['pull_redirected_s']:.2f} s, streamed through the API in "
            f"{ours['pull_streamed_s']:.2f} s (medians of 3)."
        )
    return text


# --- main ---------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    only = set(args.images.split(",")) if args.images else set()
    images = all_images(args.big, only)
    for image in images:
        print(f"image {image.name}: {image.size / MB:.1f} MB, {len(image.layers)} layers")
    scratch = OUT_DIR / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    services = start_services(OUT_DIR / "stack", redirect=not args.no_redirect)
    with services.stack:
        runs = run_all(images, services, args.reps, scratch)
        footnote = redirect_footnote(images, services, scratch)
    for bulky in ("s3", "spool"):  # keep only the logs
        shutil.rmtree(services.workdir / bulky, ignore_errors=True)
    rows = summarize(images, runs, services.ours.name, services.peer.name)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench.core", *sys.argv[1:]]),
        "reps": args.reps,
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
        "images": [asdict(image) | {"layout": str(image.layout)} for image in images],
        "runs": [asdict(run) for run in runs],
        "rows": rows,
        "ingest_s": first_settle(runs, services.ours.name),
        "redirect": footnote,
        "notes": services.notes,
        "total_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--big", action="store_true", help="add an image with a 1 GB random layer")
    parser.add_argument("--no-redirect", action="store_true", help="skip the redirect footnote")
    parser.add_argument("--images", default="", help="comma-separated subset of images")
    parser.add_argument("--json", default=str(RESULTS / "core.json"), help="results file")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    result = bench(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(result["rows"]))
    if redirect_text(result):
        print(f"\nredirect footnote: {redirect_text(result)}")
    if not args.no_docs:
        write_docs(result)
    print(f"\nwrote {args.json}" + ("" if args.no_docs else " and docs/benchmarks.md"))


if __name__ == "__main__":
    main()
