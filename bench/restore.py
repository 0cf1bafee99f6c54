"""bench-restore: cold restores of deduplicated layers, serial and parallel from checkpoints.

Usage::

    python -m bench.restore [--tar-mb 96] [--reps 3] [--no-docs]
                            [--large-file-mb 40] [--encoders "Go <=1.26 level 6,zlib 6"]

One tar of real files of this machine (about --tar-mb MB, cached under build/bench/restore/)
is compressed by each producer's own code (Python's gzip for zlib, the Go helpers' gzip mode
for Go's compress/gzip, pgzip), pushed to DupHunter with skopeo and ingested: the ingest
finds and proves checkpoints. Then, for each encoder, median of --reps runs:

- `original`: the encoder alone on the tar in memory, one stream, one thread (pgzip with
  GOMAXPROCS=1);
- `serial`: a cold restore as before checkpoints (tar rebuilt from S3, one encoder, every
  segment verified);
- `hosts N`: a cold restore from checkpoints, its segments shared among N processes standing
  in for hosts (each rebuilds its tar range from S3 and encodes), joined and verified here;
- `threads`: what the API does on its own (for layers under 64 MiB): the segments on this
  host's threads, cut from one streamed rebuild of the tar.

Then CONCURRENT `threads` restores of the docker layer (Go <=1.26 level 6), begun
STAGGER_SECONDS apart, twice: the host's cores oldest restore first (as the registry
takes them), and in the order segments ask for them (how concurrent restores shared the
cores before): each restore's wall time from its own start.

"Cold" means nothing of the layer was restored before: no spool, no buffer. Then an image of
three docker-style layers (Go <= 1.26, level 6) is pushed to DupHunter and to CNCF
Distribution 2.8.2 (bench-core's set-up: both on the same local S3), and pulled cold with
skopeo from each, alternating. Checkpoint objects are compared with the stored bytes.

`--large-file-mb N` makes the tar's bytes three files, the middle one N MB: a file too large
for one segment, whose checkpoints lie inside it. `--encoders` keeps the encoders whose
labels contain one of these.

Results: a table on stdout, `docs/bench/restore.json`, and the section
`## bench-restore: parallel restore from checkpoints` in `docs/benchmarks.md`
(`restore-large-file.json` and its own section with `--large-file-mb`); with --no-docs
(trial runs) only the JSON, in build/bench/restore/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench import core
from bench.report import REPO_ROOT, bar_chart, git_state, machine, save_json, write_section
from bench.scale import tar_of
from pipelines.encoders.base import helper_dir
from pipelines.encoders.gzip_families import pgzip_library
from pipelines.encoders.table import encode, lookup_encoder
from pipelines.formats import Buffer
from pipelines.formats.recipe import Recipe
from pipelines.formats.verify import release_verified
from pipelines.registry.facade import Registry
from pipelines.serve import restore
from pipelines.serve.checkpoints import (
    PROOF_THREADS,
    Checkpoints,
    any_core,
    checkpoint_spacing,
    checkpoints_key,
    find_candidates,
    gzip_payload,
    prove_plan,
)
from pipelines.serve.cores import HostCores, Turn
from pipelines.serve.rebuild import large_file_spans, rebuild_tar, rebuild_tar_range
from pipelines.serve.restore import (
    SegmentEncoder,
    encode_layer_segment,
    load_checkpoints,
    pooled_runner,
    restore_blob,
)
from pipelines.store.filecache import KEEP_SECONDS, VerifiedFiles
from pipelines.store.filestore import FileStore

WORK = REPO_ROOT / "build" / "bench" / "restore"
HEADING = "## bench-restore: parallel restore from checkpoints"
LARGE_FILE_HEADING = "## bench-restore --large-file-mb: a layer with a file too large for a segment"
TARGET_RATIO = 0.6  # cold restore time / the original encoder's single-thread time
PULL_TARGET = 3.0  # cold image pull / Distribution
STORE_TARGET = 0.01  # checkpoints / stored bytes
BOUND_TARGET = 1.15  # the API's own restore (threads) / the least ratio 2 cores allow
HOSTS = (1, 2, 4)
CONCURRENT = 4
STAGGER_SECONDS = 0.1
CONCURRENT_ENCODER = "Go <=1.26 level 6 (docker)"
PROOF_ENCODER = "zlib 6 (Python gzip, Java)"  # the layer an ingest proves meanwhile
PROOF_CORES = {  # how the ingest's proof takes its segments' cores
    "alone": None,  # no proof at all
    "no core": "none",  # as before 1363b71: beside the restores
    "background turn": "background",  # the host's cores, behind the restores
}
CORES = os.cpu_count() or 1
SOURCES = [
    "/usr/lib/python3.11",
    "/usr/share/doc",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/bin",
    "/usr/share/perl",
    "/usr/share/locale",
]


# --- inputs -------------------------------------------------------------------------------


def real_tar(megabytes: int) -> bytes:
    """A GNU tar of real files of this machine (text, machine code, compressed docs)."""
    path = WORK / f"layer-{megabytes}mb.tar"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        picked, total = [], 0
        for root in SOURCES:
            for file in sorted(Path(root).rglob("*")):
                if file.is_file() and not file.is_symlink():
                    picked.append(str(file))
                    total += file.stat().st_size
                if total >= megabytes * 1_000_000:
                    break
            if total >= megabytes * 1_000_000:
                break
        listing = WORK / "files.txt"
        listing.write_text("\n".join(picked) + "\n")
        command = ["tar", "-cf", str(path), "--absolute-names", "-T", str(listing)]
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    return path.read_bytes()


def with_large_file(tar: bytes, megabytes: int) -> bytes:
    """The same real bytes as a tar of three files, the middle one of `megabytes` MB: more
    than one segment can hold, so its checkpoints lie inside it."""
    head, size = 2_000_000, megabytes * 1_000_000
    parts = {"lib/head": tar[:head], "big.bin": tar[head : head + size],
             "lib/tail": tar[head + size :]}  # fmt: skip
    return tar_of(parts)


def python_gzip(level: int) -> Callable[[bytes], bytes]:
    def produce(data: bytes) -> bytes:
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0) as gz:
            for start in range(0, len(data), 1 << 20):
                gz.write(data[start : start + (1 << 20)])
        return out.getvalue()

    return produce


def helper_gzip(name: str, *args: str) -> Callable[[bytes], bytes]:
    def produce(data: bytes) -> bytes:
        argv = [str(helper_dir() / name), "-mode", "gzip", *args]
        return subprocess.run(argv, input=data, capture_output=True, check=True).stdout

    return produce


def encoders() -> dict[str, tuple[str, Callable[[bytes], bytes]]]:
    """label -> (encoder id, the producer's own code)."""
    chosen = {
        "zlib 6 (Python gzip, Java)": ("gzip/zlib-1.2.13/6", python_gzip(6)),
        "Go <=1.26 level 6 (docker)": ("gzip/go1.26/6", helper_gzip("gzip-go1.26", "-level", "6")),
        "Go >=1.27 level 6": ("gzip/go1.27/6", helper_gzip("gzip-go1.27", "-level", "6")),
        "Go <=1.26 level 1 (crane)": ("gzip/go1.26/1", helper_gzip("gzip-go1.26", "-level", "1")),
    }
    library = pgzip_library()
    if library:
        produce = helper_gzip("gzip-pgzip-deb", "-blocksize", str(1 << 20), "-level", "5")
        chosen["pgzip 1 MiB level 5 (skopeo)"] = (f"gzip/{library}/b1048576/5", produce)
    return chosen


GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def write_layout(
    root: Path, layers: list[bytes], tag: str = "t", media_type: str = GZIP_LAYER,
    diff_ids: list[str] | None = None,
) -> None:  # fmt: skip
    """An OCI image layout with these layers (gzip unless `media_type` says otherwise;
    then their tars' `diff_ids` are needed)."""
    shutil.rmtree(root, ignore_errors=True)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    if diff_ids is None:
        diff_ids = [
            f"sha256:{hashlib.sha256(gzip.decompress(layer)).hexdigest()}" for layer in layers
        ]
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}  # fmt: skip
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **put(json.dumps(config).encode()),
        },
        "layers": [{"mediaType": media_type, **put(layer)} for layer in layers],
    }
    reference = put(json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **reference,
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}  # fmt: skip
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


# --- restores -----------------------------------------------------------------------------


def drain(chunks: Iterator[Buffer]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def cpu_seconds() -> float:
    """CPU time of this process and of its Go helpers, finished or kept up (served);
    not of the S3 server, nor of the stand-in hosts' processes."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    finished = children.ru_utime + children.ru_stime
    return own.ru_utime + own.ru_stime + finished + core.live_helpers_cpu_seconds()


CPU: dict[str, list[float]] = {}  # label/run -> CPU seconds, beside the wall times


def timed(work: Callable[[], str], expected: str | None = None, cpu_key: str = "") -> float:
    started, cpu_started = time.perf_counter(), cpu_seconds()
    result = work()
    seconds = time.perf_counter() - started
    if cpu_key:
        CPU.setdefault(cpu_key, []).append(cpu_seconds() - cpu_started)
    if expected is not None and result != expected:
        raise RuntimeError(f"restored {result}, expected {expected}")
    return seconds


def original_seconds(encoder_id: str, tar: bytes) -> float:
    """The encoder alone, one stream, one thread, the tar in memory."""
    encoder = lookup_encoder(encoder_id)
    os.environ["GOMAXPROCS"] = "1"  # pgzip's own goroutines: one thread
    try:
        return timed(lambda: drain(encoder.body([tar], b"")), cpu_key=f"{encoder_id} original")
    finally:
        del os.environ["GOMAXPROCS"]


def serial_restore(recipe: Recipe, files: FileStore) -> str:
    rebuilt = encode(recipe.encoder_id, recipe.encoder_params, rebuild_tar(recipe, files))
    verified = release_verified(rebuilt, recipe.blob_digest, recipe.blob_size, recipe.segments)
    return drain(verified)


def tar_length(recipe: Recipe, files: FileStore) -> str:
    return str(sum(len(chunk) for chunk in rebuild_tar(recipe, files)))


def local_restore(recipe: Recipe, files: FileStore, first_byte: list[float] | None = None) -> str:
    """The API's own path, with no restore workers; when the first verified bytes came
    is appended to `first_byte` (perf_counter)."""
    restore.use_restore_workers(None)
    return drain(_noting_first(restore_blob(recipe, files), first_byte))


def _noting_first(chunks: Iterator[Buffer], first: list[float] | None) -> Iterator[Buffer]:
    for chunk in chunks:
        if first is not None and not first:
            first.append(time.perf_counter())
        yield chunk


def runner_restore(recipe: Recipe, files: FileStore, runner: restore.SegmentRunner) -> str:
    restore.use_restore_workers(runner, 0)
    try:
        return drain(restore_blob(recipe, files))
    finally:
        restore.use_restore_workers(None)


_host: Registry | None = None
_runs = itertools.count()


def _connect_host() -> None:
    global _host
    _host = Registry.connect()
    # a stand-in for another host: its cores are its own, not this host's
    restore.share_host_cores(WORK / "hosts" / str(os.getpid()) / "cores")


_host_run = -1  # the timed run this host process last encoded a segment for


def _encode_on_host(recipe_key: str, index: int, run: int, began: int) -> bytes:
    global _host_run
    assert _host is not None
    if run != _host_run:  # a cold restore: no large file kept from the last run
        _host.files.verified = VerifiedFiles()
        _host_run = run
    return bytes(encode_layer_segment(_host.store, _host.files, recipe_key, index, began))


def hosts_runner(pool: ProcessPoolExecutor, hosts: int, recipe_key: str) -> restore.SegmentRunner:
    """Segments shared among `hosts` processes, each a stand-in for a restore host."""
    run = next(_runs)

    def slot(recipe: Recipe, files: FileStore, plan: Checkpoints, index: int, began: int) -> bytes:
        return pool.submit(_encode_on_host, recipe_key, index, run, began).result()

    slots: list[SegmentEncoder] = [slot] * hosts
    return pooled_runner(slots)


def measure_layer(
    registry: Registry, label: str, encoder_id: str, digest: str, tar: bytes, reps: int,
    pools: dict[int, ProcessPoolExecutor],
) -> dict[str, Any]:  # fmt: skip
    info = registry.blobs.stored_info(digest)
    if info is None or info.recipe is None:
        record = registry.index.layer(digest)
        raise RuntimeError(f"{label}: {digest} was not deduplicated: {record}")
    recipe = Recipe.decode(registry.store.get_bytes(info.recipe))
    plan = load_checkpoints(recipe, registry.store)
    record = registry.index.layer(digest)
    files = registry.files
    runs: dict[str, list[float]] = {"original": [], "serial": [], "threads": []}
    runs.update({f"hosts {n}": [] for n in HOSTS})
    rebuild_runs: list[float] = []  # the tar alone, from S3: the restore's own work
    first_bytes: list[float] = []  # when the threads restore's first verified bytes came
    for _ in range(reps):
        runs["original"].append(original_seconds(encoder_id, tar))
        runs["serial"].append(
            timed(lambda: serial_restore(recipe, files), digest, f"{encoder_id} serial")
        )
        rebuild = timed(lambda: tar_length(recipe, files), cpu_key=f"{encoder_id} rebuild")
        rebuild_runs.append(rebuild)
        if plan is None:
            continue
        first: list[float] = []
        started = time.perf_counter()
        threads = timed(
            lambda: local_restore(recipe, files, first),  # noqa: B023
            digest,
            f"{encoder_id} threads",
        )
        runs["threads"].append(threads)
        first_bytes.append(first[0] - started)
        for hosts in HOSTS:
            runner = hosts_runner(pools[hosts], hosts, info.recipe)
            runs[f"hosts {hosts}"].append(
                timed(lambda: runner_restore(recipe, files, runner), digest)  # noqa: B023
            )
    load = os.getloadavg()[0]  # the machine is shared: say how busy it was
    medians = {name: statistics.median(values) for name, values in runs.items() if values}
    checkpoint_bytes = registry.store.size(checkpoints_key(digest)) or 0
    result = {
        "label": label,
        "encoder": encoder_id,
        "digest": digest,
        "tar_bytes": len(tar),
        "blob_bytes": info.size,
        "candidates": plan.candidates if plan else 0,
        "proven": len(plan.points) if plan else 0,
        "checkpoint_bytes": checkpoint_bytes,
        "ingest_prove_seconds": float(record.get("prove_seconds", 0) or 0),
        "ingest_split_seconds": float(record.get("split_seconds", 0) or 0),
        "load_average": load,
        "cpu_seconds": {
            name: statistics.median(CPU[f"{encoder_id} {name}"])
            for name in ("original", "rebuild", "serial", "threads")
            if CPU.get(f"{encoder_id} {name}")
        },
        "rebuild_seconds": statistics.median(rebuild_runs),
        "first_byte_seconds": statistics.median(first_bytes) if first_bytes else None,
        "seconds": medians,
        "ratio": {name: value / medians["original"] for name, value in medians.items()},
    }
    print(
        f"  {label:<30} {len(plan.points) if plan else 0:>3}/{plan.candidates if plan else 0:<3} "
        + "  ".join(f"{name} {value:6.2f}s" for name, value in medians.items()),
        flush=True,
    )
    return result


# --- concurrent restores -----------------------------------------------------------------


class _ArrivalOrder(HostCores):
    """The host's cores taken in the order segments ask, whatever their restore's age."""

    @contextlib.contextmanager
    def held(self, turn: Turn | None = None) -> Iterator[None]:
        with super().held(None):
            yield


def concurrent_restores(registry: Registry, digest: str, reps: int) -> dict[str, Any]:
    """Median walls of CONCURRENT restores of the layer begun STAGGER_SECONDS apart, by
    the order the host's cores go in: per restore (in start order), their mean, and the
    last to end."""
    info = registry.blobs.stored_info(digest)
    assert info is not None and info.recipe is not None
    recipe = Recipe.decode(registry.store.get_bytes(info.recipe))
    in_turns = restore._segment_cores
    as_asked = _ArrivalOrder(in_turns.directory, in_turns.count)
    orders = {"oldest first": in_turns, "as asked": as_asked}
    walls: dict[str, list[list[float]]] = {order: [] for order in orders}
    try:
        for _ in range(reps):
            for order, cores in orders.items():  # alternating: the machine drifts
                restore._segment_cores = cores
                walls[order].append(_staggered_walls(recipe, registry.files))
    finally:
        restore._segment_cores = in_turns
    result = {}
    for order, runs in walls.items():
        each = [statistics.median(run[n] for run in runs) for n in range(CONCURRENT)]
        result[order] = {
            "each": each,
            "mean": statistics.median(statistics.mean(run) for run in runs),
            "last_end": statistics.median(_last_end(run) for run in runs),
        }
    print(f"  concurrent restores: {result}", flush=True)
    return result


def _last_end(walls: list[float]) -> float:
    """When the last restore ended, from the first one's start."""
    return max(number * STAGGER_SECONDS + wall for number, wall in enumerate(walls))


def _staggered_walls(recipe: Recipe, files: FileStore) -> list[float]:
    def one(number: int) -> float:
        time.sleep(number * STAGGER_SECONDS)
        return timed(lambda: local_restore(recipe, files), recipe.blob_digest)

    files.verified = VerifiedFiles()  # cold: no large file kept from the last run
    with ThreadPoolExecutor(CONCURRENT) as pool:
        return list(pool.map(one, range(CONCURRENT)))


# --- a restore during an ingest's proof -------------------------------------------------


def restore_during_proof(
    registry: Registry, digest: str, proved: str, proved_blob: Path, reps: int
) -> dict[str, Any]:
    """Median walls of a cold `threads` restore of layer `digest` alone and while another
    process (standing in for the ingest worker) proves the checkpoints of layer `proved`
    over and over, its segments on no core or on the host's cores in a background turn;
    and the median wall of the proofs that overlapped the restores."""
    info = registry.blobs.stored_info(digest)
    assert info is not None and info.recipe is not None
    recipe = Recipe.decode(registry.store.get_bytes(info.recipe))
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    prover = context.Process(target=_prove_when_asked, args=(proved, str(proved_blob), theirs))
    prover.start()
    walls: dict[str, list[float]] = {mode: [] for mode in PROOF_CORES}
    proofs: dict[str, list[float]] = {mode: [] for mode in PROOF_CORES}
    try:
        for _ in range(reps):
            for mode, cores in PROOF_CORES.items():  # alternating: the machine drifts
                time.sleep(KEEP_SECONDS + 0.5)  # cold: the files the last run kept have left
                if cores:
                    ours.send(cores)
                    assert ours.recv() == "proving"
                walls[mode].append(timed(lambda: local_restore(recipe, registry.files), digest))
                if cores:
                    proofs[mode].append(float(ours.recv()))
    finally:
        ours.send("stop")
        prover.join(60)
    result = {
        mode: {
            "restore": statistics.median(walls[mode]),
            "proof": statistics.median(proofs[mode]) if proofs[mode] else None,
        }
        for mode in PROOF_CORES
    }
    print(f"  a restore during an ingest's proof: {result}", flush=True)
    return result


def _prove_when_asked(digest: str, blob_path: str, commands: Connection) -> None:
    """In a process of its own, as the ingest worker: prove the layer's checkpoints (its
    plan found in the pushed blob, each segment re-encoded from the tar rebuilt from the
    stored files) each time asked, its segments' cores taken as asked; answer with the
    proof's wall time."""
    registry = Registry.connect()
    blob = Path(blob_path).read_bytes()
    info = registry.blobs.stored_info(digest)
    assert info is not None and info.recipe is not None
    recipe = Recipe.decode(registry.store.get_bytes(info.recipe))
    encoder = lookup_encoder(recipe.encoder_id)
    payload = gzip_payload(lambda start, length: [blob[start : start + length]], len(blob),
                           recipe.encoder_params)  # fmt: skip
    spacing = checkpoint_spacing(recipe.tar_size)
    plan = find_candidates(encoder, digest, recipe.tar_size, payload, spacing,
                           large_file_spans(recipe))  # fmt: skip
    while (command := commands.recv()) != "stop":
        core = restore.background_cores(time.time_ns()) if command == "background" else any_core
        commands.send("proving")
        started = time.perf_counter()
        with ThreadPoolExecutor(PROOF_THREADS) as pool:
            proof = prove_plan(encoder, plan, payload,
                               lambda start, end: list(rebuild_tar_range(recipe, registry.files,
                                                                         start, end)),
                               pool, core)  # fmt: skip
        if proof.checkpoints is None or not proof.checkpoints.points:
            raise RuntimeError(f"{digest}: the proof found no checkpoints")
        commands.send(time.perf_counter() - started)


def proof_lines(during: dict[str, Any] | None) -> list[str]:
    if not during:
        return []
    alone, beside, behind = (during[mode] for mode in PROOF_CORES)
    return [
        f"- A cold `threads` restore of the {CONCURRENT_ENCODER} layer while another process "
        f"proves the {PROOF_ENCODER} layer's checkpoints (an ingest's proof, from the same "
        f"tar): alone {alone['restore']:.2f} s; the proof's segments on no core (as before "
        f"1363b71) {beside['restore']:.2f} s ({beside['restore'] / alone['restore']:.2f}x; the "
        f"proof {beside['proof']:.2f} s); on the host's cores in a background turn "
        f"{behind['restore']:.2f} s ({behind['restore'] / alone['restore']:.2f}x; the proof "
        f"{behind['proof']:.2f} s)."
    ]


# --- image pull ---------------------------------------------------------------------------


def image_pull(services: core.Services, tar: bytes, reps: int, scratch: Path) -> dict[str, Any]:
    """Three docker-style layers (thirds of the tar, Go <= 1.26 level 6), pushed to both
    registries, pulled cold from each."""
    produce = helper_gzip("gzip-go1.26", "-level", "6")
    third = len(tar) // 3 // 512 * 512
    parts = [tar[:third], tar[third : 2 * third], tar[2 * third :]]
    tars = [b"v2" + part[2:] for part in parts]  # not the layers pushed above
    layers = [produce(part) for part in tars]
    encoder_s = sum(original_seconds("gzip/go1.26/6", part) for part in tars)
    layout = WORK / "image"
    write_layout(layout, layers)
    image = core.load_image("restore-image", layout)
    for registry in (services.peer, services.ours):
        core.push(image, registry, "bench/restore-image", scratch)
    core.wait_for_quiet(services)
    pulls: dict[str, list[float]] = {services.peer.name: [], services.ours.name: []}
    for rep in range(reps):
        order = [services.peer, services.ours] if rep % 2 == 0 else [services.ours, services.peer]
        for registry in order:
            core.wait_until_cold(services, (image.name, registry.name))
            seconds = core.pull(image, registry, "bench/restore-image", scratch)
            services.last_pull[(image.name, registry.name)] = time.monotonic()
            pulls[registry.name].append(seconds)
            print(f"  image pull {registry.name:<14} rep {rep}: {seconds:6.2f}s", flush=True)
    peer = statistics.median(pulls[services.peer.name])
    ours = statistics.median(pulls[services.ours.name])
    return {
        "layers": len(layers),
        "image_bytes": image.size,
        "tar_bytes": len(tar),
        "distribution_s": peer,
        "duphunter_s": ours,
        "ratio": ours / peer,
        "runs": pulls,
        "encoder_single_thread_s": encoder_s,  # the three layers' encoding, one thread
        "bound_ratio": encoder_s / CORES / peer,  # that work spread over every core
    }


def stored_bytes(registry: Registry) -> dict[str, int]:
    totals: dict[str, int] = {}
    for key, size in registry.store.list(""):
        kind = key.split("/", 1)[0]
        totals[kind] = totals.get(kind, 0) + size
    return totals


# --- reporting ----------------------------------------------------------------------------


def table(layers: list[dict[str, Any]]) -> str:
    columns = ["original", "serial", "threads", *(f"hosts {n}" for n in HOSTS)]
    head = "| encoder | tar MB | checkpoints proven | " + " | ".join(columns) + " | load |"
    rule = "|" + "---|" * (4 + len(columns))
    rows = [head, rule]
    for layer in layers:
        cells = []
        for name in columns:
            seconds = layer["seconds"].get(name)
            cells.append(
                "-" if seconds is None else f"{seconds:.2f} s ({layer['ratio'][name]:.2f}x)"
            )
        rows.append(
            f"| {layer['label']} | {layer['tar_bytes'] / 1e6:.0f} | "
            f"{layer['proven']} of {layer['candidates']} | "
            + " | ".join(cells)
            + f" | {layer.get('load_average', 0):.1f} |"
        )
    return "\n".join(rows)


def markdown(result: dict[str, Any]) -> str:
    layers, pull, store = result["layers"], result["image_pull"], result["store"]
    parallel = ["threads", *(f"hosts {n}" for n in HOSTS)]
    best = {layer["label"]: min(layer["ratio"][name] for name in parallel if
                                name in layer["ratio"]) for layer in layers
            if any(name in layer["ratio"] for name in parallel)}  # fmt: skip
    lines = [
        f"Measured {result['date']} at {result['git']}, {result['reps']} runs each (median).",
        "Cold restore of one deduplicated layer: wall time, and in brackets the ratio to the",
        "original encoder alone on the same tar (one stream, one thread). `hosts N`: segments",
        "shared among N processes standing in for restore hosts; `threads`: the API's own",
        "path, segments on this host's threads.",
        f"Target: <= {TARGET_RATIO}x for layers of 64 MB or more.",
        "",
        table(layers),
        "",
        *([] if result.get("large_file_mb") else ["![restore ratios](bench/restore.png)", ""]),
        "- Best ratio per encoder: "
        + ", ".join(f"{label} {ratio:.2f}x" for label, ratio in best.items())
        + ".",
        f"- Cold pull of an image of {pull['layers']} docker-style layers "
        f"({pull['image_bytes'] / 1e6:.0f} MB compressed, "
        f"{pull['tar_bytes'] / 1e6:.0f} MB of tar): "
        f"Distribution {pull['distribution_s']:.2f} s, DupHunter {pull['duphunter_s']:.2f} s "
        f"= {pull['ratio']:.2f}x (target <= {PULL_TARGET}x, no buffer).",
        f"- What {CORES} cores allow. A restore re-encodes: the encoder's single-thread "
        "CPU, plus the tar's rebuild (fetching, decompressing and checking its files; "
        "the S3 server's CPU, on the same cores, not counted), spread evenly over every "
        "core, gives the least ratio a restore here can reach: "
        + ", ".join(f"{layer['label']} {bound_ratio(layer):.2f}x" for layer in layers)
        + f". The cold pull's three layers take {pull['encoder_single_thread_s']:.2f} s of "
        f"encoding on one thread: on {CORES} cores, at least "
        f"{pull['bound_ratio']:.1f}x Distribution's pull, before anything else a pull does.",
        f"- The API's own path (`threads`) against that least ratio (target <= {BOUND_TARGET}x): "
        + ", ".join(
            f"{layer['label']} {bound_share(layer)}"
            for layer in layers
            if "threads" in layer["ratio"]
        )
        + ".",
        *concurrent_lines(result.get("concurrent")),
        *proof_lines(result.get("during_proof")),
        "- The first verified bytes of the `threads` restore came after: "
        + ", ".join(
            f"{layer['label']} {layer['first_byte_seconds']:.3f} s"
            for layer in layers
            if layer.get("first_byte_seconds") is not None
        )
        + ".",
        f"- Checkpoint objects: {store['checkpoints']} bytes, "
        f"{100 * store['share']:.4f}% of the {store['stored'] / 1e6:.0f} MB stored "
        f"(target < {100 * STORE_TARGET:.0f}%).",
        "- CPU seconds (this process and the Go helpers; not the S3 server), "
        "original / tar rebuild alone / serial restore / parallel restore on threads: "
        + ", ".join(
            f"{layer['label']} "
            + " / ".join(
                f"{layer['cpu_seconds'].get(n, 0):.1f}"
                for n in ("original", "rebuild", "serial", "threads")
            )
            for layer in layers
        )
        + ". On a machine shared with other work, these show the parallel path's extra work,"
        " and half of the parallel figure what 2 idle cores would take.",
        "- Ingest (find + prove checkpoints, which is also the encoder's proof; each layer "
        "pushed once the large files the last proof kept have left): "
        + ", ".join(f"{layer['label']} {layer['ingest_prove_seconds']:.1f} s" for layer in layers)
        + ".",
    ]
    return "\n".join(lines)


def concurrent_lines(concurrent: dict[str, Any] | None) -> list[str]:
    if not concurrent:
        return []
    first, shared = concurrent["oldest first"], concurrent["as asked"]

    def walls(order: dict[str, Any]) -> str:
        return ", ".join(f"{wall:.2f}" for wall in order["each"])

    return [
        f"- {CONCURRENT} `threads` restores of the {CONCURRENT_ENCODER} layer begun "
        f"{STAGGER_SECONDS} s apart, each restore's wall time from its start. The host's "
        f"cores oldest restore first: {walls(first)} s (mean {first['mean']:.2f} s, "
        f"the last ended {first['last_end']:.2f} s after the first began); in the order "
        f"segments ask: {walls(shared)} s (mean {shared['mean']:.2f} s, last "
        f"{shared['last_end']:.2f} s). Mean ratio {first['mean'] / shared['mean']:.2f}."
    ]


def bound_ratio(layer: dict[str, Any]) -> float:
    """(encoder CPU + rebuild CPU) / cores, against the original encoder's wall time."""
    cpu = layer["cpu_seconds"]
    work = float(cpu.get("original", 0)) + float(cpu.get("rebuild", 0))
    return work / CORES / float(layer["seconds"]["original"])


def bound_share(layer: dict[str, Any]) -> str:
    """The `threads` restore's ratio over the least one 2 cores allow, marked if missed."""
    share = layer["ratio"]["threads"] / bound_ratio(layer)
    return f"{share:.2f}x" + ("" if share <= BOUND_TARGET else " ✗")


def chart(layers: list[dict[str, Any]]) -> Path:
    groups = {
        layer["label"]: {
            name: layer["ratio"][name] for name in layer["ratio"] if name != "original"
        }
        for layer in layers
    }
    return bar_chart(
        REPO_ROOT / "docs" / "bench" / "restore.png",
        "Cold restore time / original encoder's single-thread time",
        groups,
        "ratio (lower is faster)",
        target=TARGET_RATIO,
    )


# --- main ---------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    tar = real_tar(args.tar_mb)
    if args.large_file_mb:
        tar = with_large_file(tar, args.large_file_mb)
    wanted = [name for name in args.encoders.split(",") if name]
    chosen = {label: encoder for label, encoder in encoders().items()
              if not wanted or any(name in label for name in wanted)}  # fmt: skip
    scratch = WORK / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    services = core.start_services(WORK / "stack", redirect=False)
    os.environ.update({k: v for k, v in services.stack.env.items() if k.startswith("DUPHUNTER_")})
    pools = {n: ProcessPoolExecutor(n, initializer=_connect_host) for n in HOSTS}
    try:
        registry = Registry.connect()
        pushed: dict[str, tuple[str, str]] = {}
        for number, (label, (encoder_id, produce)) in enumerate(chosen.items()):
            if number:  # each proof cold: the last one's large files (the same) have left
                core.wait_for_quiet(services)
                time.sleep(KEEP_SECONDS + 1)
            blob = produce(tar)
            if label == PROOF_ENCODER:
                (WORK / "proof-blob").write_bytes(blob)
            layout = WORK / f"layer-{number}"
            write_layout(layout, [blob])
            image = core.load_image(f"layer-{number}", layout)
            core.push(image, services.ours, f"bench/layer-{number}", scratch)
            pushed[label] = (encoder_id, image.layers[0])
        core.wait_for_quiet(services)
        for hosts, pool in pools.items():  # the stand-in hosts are up before a pull comes
            list(pool.map(_connect_host_probe, range(hosts)))
        layers = [
            measure_layer(registry, label, encoder_id, digest, tar, args.reps, pools)
            for label, (encoder_id, digest) in pushed.items()
        ]
        concurrent = (
            concurrent_restores(registry, pushed[CONCURRENT_ENCODER][1], args.reps)
            if CONCURRENT_ENCODER in pushed
            else None
        )
        during_proof = (
            restore_during_proof(registry, pushed[CONCURRENT_ENCODER][1],
                                 pushed[PROOF_ENCODER][1], WORK / "proof-blob", args.reps)
            if CONCURRENT_ENCODER in pushed and PROOF_ENCODER in pushed
            else None
        )  # fmt: skip
        pull = image_pull(services, tar, args.reps, scratch)
        stored = stored_bytes(registry)
        ours = sum(stored.get(kind, 0) for kind in ("data", "packs", "recipes", "checkpoints"))
        store = {
            "checkpoints": stored.get("checkpoints", 0),
            "stored": ours,
            "share": stored.get("checkpoints", 0) / max(ours, 1),
            "by_prefix": stored,
        }
    finally:
        for pool in pools.values():
            pool.shutdown(cancel_futures=True)
        services.stack.stop()
    return {
        "date": datetime.date.today().isoformat(),
        "git": git_state(),
        "machine": machine(),
        "reps": args.reps,
        "layers": layers,
        "image_pull": pull,
        "concurrent": concurrent,
        "during_proof": during_proof,
        "store": store,
    }


def _connect_host_probe(_: int) -> bool:
    return _host is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tar-mb", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--large-file-mb", type=int, default=0, help="the tar as three files, the middle this big"
    )
    parser.add_argument("--encoders", default="", help="labels containing these, comma-separated")
    args = parser.parse_args()
    result = bench(args)
    result["large_file_mb"] = args.large_file_mb
    name = "restore-large-file" if args.large_file_mb else "restore"
    print(markdown(result))
    if args.no_docs:  # a trial: nothing in docs/
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / f"{name}.json").write_text(json.dumps(result, indent=2))
        return
    save_json(name, result)
    if args.large_file_mb:
        write_section(LARGE_FILE_HEADING, markdown(result), result["machine"])
    else:
        chart(result["layers"])
        write_section(HEADING, markdown(result), result["machine"])


if __name__ == "__main__":
    main()
