"""`make bench-memory`: API memory stays flat while a 2 GiB blob streams in and out,
and adversarial layers (of about 1 MB, or of random bytes) cost no process more than
its configured bound.

Part 1: starts Redis, S3 and the API (one gunicorn process, so its peak RSS is the
figure), pushes a 2 GiB blob in one streamed PATCH (as docker and skopeo do), pulls it
back, and prints the API process's peak resident memory (VmHWM) before and after.

Part 2 (`--only adversarial` runs it alone): the whole stack (one API process, one
worker per queue); each layer of `bench.hostile` is pushed, ingested, its intact copy
retired (after a restore from its packs), then pulled; the growth of each process's
peak resident memory (VmHWM reset through /proc/<pid>/clear_refs) during the ingest and
during the pull, against `ingest_memory_bound()` and `restore_memory_bound()`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import urllib3

from bench.hostile import LAYERS, HostileLayer, PeakGrowth, random_file, stack_processes
from bench.report import RESULTS, git_state, machine, save_json, write_section
from deploy.stack import Stack, free_port, wait_until
from pipelines.config import Settings
from pipelines.ingest.ingestor import ingest_memory_bound
from pipelines.registry.facade import Registry
from pipelines.serve.restore import restore_memory_bound

SIZE = 2 << 30
HEADING = "## bench-memory: a 2 GiB blob streams through flat memory"
ADVERSARIAL_HEADING = "## bench-memory: adversarial layers, bounded memory"
MIB = 1 << 20
CHUNK = 1 << 20


def pattern() -> Iterator[bytes]:
    """2 GiB of incompressible-looking bytes without holding them: a seeded chunk cycle."""
    seed = os.urandom(CHUNK)
    for number in range(SIZE // CHUNK):
        yield hashlib.sha256(number.to_bytes(8, "big")).digest() + seed[32:]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def api_worker_pid(stack: Stack) -> int:
    master = next(process.pid for name, process in stack.processes if name == "api")
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def stream_2gib() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir, Stack(Path(workdir)) as stack:
        stack.env["DUPHUNTER_REDIS_URL"] = stack.start_redis(free_port())
        stack.env["DUPHUNTER_S3_ENDPOINT"] = stack.start_s3(
            free_port(10000), "duphunter", "duphunter-secret-key", "duphunter"
        )
        stack.env["DUPHUNTER_SPOOL_DIR"] = str(Path(workdir) / "spool")
        listen = f"127.0.0.1:{free_port()}"
        stack.start_api(listen, processes=1)
        pid = api_worker_pid(stack)
        http = urllib3.PoolManager(timeout=urllib3.Timeout(total=3600))
        base = f"http://{listen}/v2/bench/memory/blobs"
        idle = peak_rss_mib(pid)
        hasher = hashlib.sha256()

        def hashed() -> Iterator[bytes]:
            for chunk in pattern():
                hasher.update(chunk)
                yield chunk

        started = time.monotonic()
        location = http.request("POST", f"{base}/uploads/").headers["Location"]
        patch = http.request("PATCH", f"http://{listen}{location}", body=hashed(), chunked=True)
        digest = "sha256:" + hasher.hexdigest()
        done = http.request("PUT", f"http://{listen}{patch.headers['Location']}?digest={digest}")
        assert done.status == 201, done.data
        push_seconds = time.monotonic() - started
        after_push = peak_rss_mib(pid)
        started = time.monotonic()
        response = http.request("GET", f"{base}/{digest}", preload_content=False)
        pulled = hashlib.sha256()
        for chunk in response.stream(CHUNK):
            pulled.update(chunk)
        pull_seconds = time.monotonic() - started
        assert "sha256:" + pulled.hexdigest() == digest, "pulled bytes differ"
        after_pull = peak_rss_mib(pid)
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "git": git_state(),
            "bytes": SIZE,
            "push_s": push_seconds,
            "pull_s": pull_seconds,
            "peak_rss_mib": {"idle": idle, "after_push": after_push, "after_pull": after_pull},
        }
        report = (
            f"Run {result['date']} by `make bench-memory`, code at {result['git']}: "
            "one gunicorn API process, SeaweedFS S3 and Redis on loopback; a 2 GiB blob pushed "
            "in one streamed PATCH (chunked transfer encoding, as docker and skopeo send it), "
            "then pulled and re-hashed.\n\n"
            f"- push {push_seconds:.1f} s ({SIZE / push_seconds / 1e6:.0f} MB/s), "
            f"pull {pull_seconds:.1f} s ({SIZE / pull_seconds / 1e6:.0f} MB/s)\n"
            f"- API process peak resident memory (VmHWM): idle {idle:.0f} MiB, after the push "
            f"{after_push:.0f} MiB, after the pull {after_pull:.0f} MiB\n"
            "\nRaw data: `docs/bench/memory.json`.\n"
        )
        print(report)
        write_section(HEADING, report, machine())
        return result


def push_layer(http: urllib3.PoolManager, base: str, blob: bytes) -> str:
    """Push a one-layer image (monolithic blob uploads, then the manifest); its digest."""
    config = b'{"architecture":"amd64","os":"linux"}'
    digests = []
    for data in (config, blob):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        done = http.request("POST", f"{base}/blobs/uploads/?digest={digest}", body=data)
        assert done.status == 201, done.data
        digests.append(digest)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digests[0], "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digests[1], "size": len(blob)}],
    }  # fmt: skip
    headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    done = http.request("PUT", f"{base}/manifests/v1", body=json.dumps(manifest), headers=headers)
    assert done.status == 201, done.data
    return digests[1]


def retired(registry: Registry, digest: str) -> bool:
    info = registry.blobs.stored_info(digest)
    return info is not None and info.deduplicated and not info.retired


def max_growth_by_service(growth: dict[Any, int]) -> dict[str, float]:
    by_service: dict[str, float] = {}
    for process, grown in growth.items():
        by_service[process.service] = max(by_service.get(process.service, 0), grown / MIB)
    return {service: round(grown, 1) for service, grown in sorted(by_service.items())}


# the tests' layers, with the random file at the size the issue names
BENCH_LAYERS = {
    **{name: layer for name, layer in LAYERS.items() if "random" not in name},
    "1 GiB file of random bytes": HostileLayer(functools.partial(random_file, 1 << 30)),
}


def ingested(registry: Registry, digest: str, layer: HostileLayer) -> bool:
    """Deduplicated with its intact copy retired, or kept intact for the expected reason."""
    if layer.kept_intact_because:
        return registry.index.layer(digest).get("state") == "intact"
    return retired(registry, digest)


def adversarial() -> dict[str, Any]:
    settings = {"DUPHUNTER_RETIRE_GRACE_SECONDS": "1", "DUPHUNTER_RESTORE_KEEP_SECONDS": "1"}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as workdir, Stack(Path(workdir)) as stack:
        listen = stack.start_registry(settings, api_processes=1)
        registry = Registry.connect(Settings())
        http = urllib3.PoolManager(timeout=urllib3.Timeout(total=3600))
        for number, (name, layer) in enumerate(BENCH_LAYERS.items()):
            blob, tar_size = layer.make()
            base = f"http://{listen}/v2/bench/hostile{number}"
            ingest = PeakGrowth(stack_processes(stack))
            started = time.monotonic()
            digest = push_layer(http, base, blob)
            done = functools.partial(ingested, registry, digest, layer)
            wait_until(done, "ingest and retirement", timeout=1800, interval=0.5)
            ingest_seconds = time.monotonic() - started
            ingest_growth = ingest.growth()
            time.sleep(2)  # the ingest's restore spool expires: the pull restores anew
            pull = PeakGrowth(stack_processes(stack))
            started = time.monotonic()
            response = http.request("GET", f"{base}/blobs/{digest}", preload_content=False)
            pulled = hashlib.sha256()
            for chunk in response.stream(CHUNK):
                pulled.update(chunk)
            assert "sha256:" + pulled.hexdigest() == digest, f"{name}: pulled bytes differ"
            record = registry.index.layer(digest)
            results[name] = {
                "blob_bytes": len(blob),
                "tar_bytes": tar_size,
                "state": record.get("state"),
                "encoder": record.get("encoder") or record.get("reason"),
                "ingest_and_retire_s": round(ingest_seconds, 1),
                "pull_s": round(time.monotonic() - started, 1),
                "ingest_growth_mib": max_growth_by_service(ingest_growth),
                "pull_growth_mib": max_growth_by_service(pull.growth()),
                "ingest_bound_mib": ingest_memory_bound(layer.zstd_window) / MIB,
                "restore_bound_mib": restore_memory_bound() / MIB,
            }
            print(name, results[name])
    write_section(ADVERSARIAL_HEADING, adversarial_report(results), machine())
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": git_state(),
            "layers": results}  # fmt: skip


# Measured once the same way on the code before the bounds (commit 62f38eb, glibc's
# default malloc): MiB of peak growth of the ingest worker / maintenance worker during
# ingest, of the API process during the pull.
BEFORE_BOUNDS = {
    "gzip bomb (1 GiB of zeros)": (1053, 2051, 2051),
    "zstd, 512 MiB of zero blocks after the tar": (606, 624, 629),
    "100,000 tiny files": (112, 89, 41),
}


def adversarial_report(results: dict[str, Any]) -> str:
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench-memory`, "
        f"code at {git_state()}: the whole stack (one gunicorn API process, a Celery worker "
        "per queue, SeaweedFS S3, Redis) on loopback. Each layer pushed, ingested, its intact "
        "copy retired after a restore from its packs alone (maintenance worker), then pulled "
        "and re-hashed. Figures: the most any process of a service grew its peak resident "
        "memory (VmHWM, reset before each phase) above what it held then, in MiB; and the "
        "seconds from the push to the retirement, and of the pull.\n",
        "| layer | blob | tar | outcome | ingest: ingest worker / maintenance / API | "
        "pull: API | bounds: ingest / restore | before the bounds (62f38eb) | "
        "push to retired s | pull s |",
        "|---|---|---|---|---|---|---|---|--:|--:|",
    ]
    for name, row in results.items():
        ingest, pull = row["ingest_growth_mib"], row["pull_growth_mib"]
        lines.append(
            f"| {name} | {row['blob_bytes'] / 1e6:.2f} MB | {row['tar_bytes'] / MIB:,.0f} MiB | "
            f"{row['state']} ({row['encoder']}) | "
            f"{ingest.get('worker-ingest', 0):.0f} / {ingest.get('worker-maintenance', 0):.0f} / "
            f"{ingest.get('api', 0):.0f} | {pull.get('api', 0):.0f} | "
            f"{row['ingest_bound_mib']:.0f} / {row['restore_bound_mib']:.0f} | "
            + " / ".join(str(v) for v in BEFORE_BOUNDS.get(name, ()))
            + f" | {row['ingest_and_retire_s']:.1f} | {row['pull_s']:.1f} |"
        )
    lines.append("\nRaw data: `docs/bench/memory.json` (`adversarial`).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("stream", "adversarial"))
    args = parser.parse_args(argv)
    path = RESULTS / "memory.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if args.only != "adversarial":
        result.update(stream_2gib())
    if args.only != "stream":
        result["adversarial"] = adversarial()
    save_json("memory", result)


if __name__ == "__main__":
    main()
