"""bench-rebuild-cpu: the CPU time of the tar rebuild alone (issue 20), and its profile.

Usage::

    python -m bench.rebuild_cpu [--tar-mb 96] [--reps 5] [--floor] [--profile 25]

The tar of real files bench-restore uses (build/bench/restore/layer-<N>mb.tar) is split
and stored as an ingest would (its files in zstd packs on a local S3, the recipe in
memory), with Redis and S3 only: no workers, no API. Then `rebuild_tar` is drained --reps
times and its process CPU time (every thread of this process: user + system, from
getrusage; not the S3 server's) is printed per run and as CPU seconds per 100 MB of tar.
The machine is shared: wall time is printed only for reference. --floor times, on this
thread alone, the work no rebuild can skip: receiving the packs' bytes, decompressing
each distinct file and hashing it (its sha256 check), with the recipe walk and the file
lookup; their sum is the least CPU a rebuild of this tar costs. --profile N prints the
top N entries of a cProfile of one more rebuild, sorted by own time (cProfile sees this
thread only: for the prefetch threads, run it under `py-spy record --native`).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import os
import pstats
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import zstandard

from bench.restore import real_tar
from deploy.stack import Stack, free_port
from pipelines.config import Settings
from pipelines.formats.recipe import Recipe, RecipeBuilder
from pipelines.formats.tarsplit import FileRef, Payload, split_tar
from pipelines.serve.rebuild import rebuild_tar
from pipelines.store.filestore import (
    CODEC_ZSTD,
    FileStore,
    Location,
    Packer,
    SpooledPayload,
    new_sha256,
)
from pipelines.store.index import Index
from pipelines.store.storage import S3Store

BUCKET, ACCESS, SECRET = "duphunter", "duphunter", "duphunter-secret-key"
T = TypeVar("T")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def store_layer(tar: bytes, files: FileStore) -> Recipe:
    """Split the tar and store its files, as an ingest's split-and-store step does."""
    builder = RecipeBuilder()
    with Packer(files) as packer:
        for entry in split_tar(io.BytesIO(tar)):
            if isinstance(entry, Payload):
                spooled = SpooledPayload(entry.chunks())
                builder.add_file(spooled.digest, spooled.size)
                packer.add(spooled)
            else:
                builder.add_raw(entry.data)
    return builder.finish(
        blob_digest="sha256:" + "0" * 64,
        blob_size=0,
        tar_sha256=hashlib.sha256(tar).digest(),
        encoder_id="gzip/zlib-1.2.13/6",
        encoder_params=b"",
    )


def drained(recipe: Recipe, files: FileStore) -> bytes:
    digest = hashlib.sha256()
    for chunk in rebuild_tar(recipe, files):
        digest.update(chunk)
    return digest.digest()


def counting_gets(files: FileStore) -> list[int]:
    """A counter of the S3 GETs this FileStore's store makes (ranged or not, every one
    goes through `iter_range`)."""
    count = [0]
    iter_range = files.store.iter_range

    def counted(key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        count[0] += 1
        return iter_range(key, offset, length)

    files.store.iter_range = counted  # type: ignore[method-assign]
    return count


def hashing_seconds(recipe: Recipe, files: FileStore) -> float:
    """This thread's CPU for hashing the rebuilt tar chunk by chunk, as `measure` does: the
    bench's own check, taken out of its figures. Timed once around the whole loop:
    reading the thread's clock twice per chunk (0.6 us a read here) had charged the
    rebuild with about 0.01 CPU-s per 100 MB of the bench's own."""
    chunks = list(rebuild_tar(recipe, files))
    spent = []
    for _ in range(5):
        before = time.thread_time()
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        spent.append(time.thread_time() - before)
    return statistics.median(spent)


def measure(recipe: Recipe, files: FileStore, reps: int) -> list[float]:
    runs = []
    hashing = hashing_seconds(recipe, files)
    gets = counting_gets(files)
    for rep in range(reps):
        wall, cpu = time.perf_counter(), cpu_seconds()
        # the check of the whole tar is the bench's, not the rebuild's: left out of the figure
        digest = hashlib.sha256()
        for chunk in rebuild_tar(recipe, files):
            digest.update(chunk)
        cpu = cpu_seconds() - cpu - hashing
        if digest.digest() != recipe.tar_sha256:
            raise RuntimeError("the rebuilt tar differs from the stored one")
        per_100mb = cpu * 1e8 / recipe.tar_size
        wall = time.perf_counter() - wall
        print(f"  run {rep}: {cpu:.3f} CPU-s ({per_100mb:.3f} per 100 MB), "
              f"wall {wall:.2f} s, {gets[0]} S3 GETs", flush=True)  # fmt: skip
        gets[0] = 0
        runs.append(per_100mb)
    return runs


def floor_parts(recipe: Recipe, files: FileStore) -> dict[str, float]:
    """This thread's CPU seconds for each part of a rebuild's unavoidable work, once."""
    parts: dict[str, float] = {}

    def timed(name: str, work: Callable[[], T]) -> T:
        started = time.thread_time()
        result = work()
        parts[name] = time.thread_time() - started
        return result

    refs = timed("recipe walk", lambda: [e for e in recipe.entries() if isinstance(e, FileRef)])
    sizes = {ref.digest: ref.size for ref in refs}
    found = timed("file lookup", lambda: files.locate(list(sizes)))
    located = [(digest, where) for digest, where in zip(sizes, found, strict=True) if where]
    stored = timed("receive packs", lambda: stored_forms(files, located))
    decompressor = zstandard.ZstdDecompressor()
    contents = timed("decompress", lambda: [
        decompressor.decompress(form[1:], max_output_size=sizes[digest])
        if form[0] == CODEC_ZSTD else bytes(form[1:])
        for digest, form in stored
    ])  # fmt: skip
    timed("sha256", lambda: [sha256_of(content) for content in contents])
    return parts


def sha256_of(content: bytes) -> bytes:
    hasher = new_sha256()  # as the rebuild's check makes one
    hasher.update(content)
    return hasher.digest()


def stored_forms(
    files: FileStore, located: list[tuple[bytes, Location]]
) -> list[tuple[bytes, memoryview]]:
    """Each file's stored form, from one GET per pack of the range its files span."""
    by_pack: defaultdict[str, list[tuple[bytes, Location]]] = defaultdict(list)
    for digest, location in located:
        by_pack[location.pack].append((digest, location))
    forms = []
    for pack, members in by_pack.items():
        start = min(location.offset for _d, location in members)
        end = max(location.offset + location.length for _d, location in members)
        data = memoryview(files.read_range(pack, start, end - start))
        forms += [(digest, data[loc.offset - start : loc.offset - start + loc.length])
                  for digest, loc in members]  # fmt: skip
    return forms


def measure_floor(recipe: Recipe, files: FileStore, reps: int) -> float:
    """The median of each part over `reps` runs, printed per 100 MB of tar; their sum."""
    runs = [floor_parts(recipe, files) for _ in range(reps)]
    per_100mb = 1e8 / recipe.tar_size
    medians = {name: statistics.median(run[name] for run in runs) * per_100mb for name in runs[0]}
    for name, seconds in medians.items():
        print(f"  {name}: {seconds:.3f} CPU-s per 100 MB", flush=True)
    total = sum(medians.values())
    print(f"floor {total:.3f} CPU-s per 100 MB of tar (the sum of the medians)")
    return total


def profile(recipe: Recipe, files: FileStore, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    drained(recipe, files)
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tar-mb", type=int, default=96)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--floor", action="store_true", help="time the unavoidable work")
    parser.add_argument("--profile", type=int, default=0, help="top N of a cProfile run")
    args = parser.parse_args()
    tar = real_tar(args.tar_mb)
    with tempfile.TemporaryDirectory(prefix="rebuild-cpu-") as work, Stack(Path(work)) as stack:
        redis_url = stack.start_redis(free_port())
        endpoint = stack.start_s3(free_port(10000), ACCESS, SECRET, BUCKET)
        os.environ.update(DUPHUNTER_REDIS_URL=redis_url, DUPHUNTER_S3_ENDPOINT=endpoint)
        settings = Settings()
        files = FileStore(S3Store(settings), Index.from_url(settings.redis_url))
        recipe = store_layer(tar, files)
        print(f"tar {recipe.tar_size / 1e6:.1f} MB, {recipe.entry_count} entries", flush=True)
        runs = measure(recipe, files, args.reps)
        print(f"median {statistics.median(runs):.3f} CPU-s per 100 MB of tar rebuilt "
              f"(min {min(runs):.3f}, load {os.getloadavg()[0]:.1f})")  # fmt: skip
        if args.floor:
            floor = measure_floor(recipe, files, args.reps)
            print(f"the rebuild costs {statistics.median(runs) / floor:.2f}x its floor")
        if args.profile:
            profile(recipe, files, args.profile)


if __name__ == "__main__":
    main()
