"""bench-gc: garbage collection of a large store while pushes go on.

    python -m bench.gc [--layers 10000] [--files 1000000] [--no-docs]

A fresh stack (Redis, SeaweedFS, the API and its workers) holds a synthetic store written
straight into S3 (no ingest: that would take hours): `--layers` deduplicated layers, one
per image, each a recipe naming `--files / --layers` files, the files packed 8 MiB to a
pack, every image tagged in its repository; the Redis index is then rebuilt from S3, as
`duphunter reindex` does. A tenth of the images are deleted (their files are unique to
them, so a tenth of the packs' bytes become garbage). Then GC runs in a process of its
own while a client pushes small images through the API, one after the other. The GC
process is frozen (SIGSTOP) and let go (SIGCONT) in turn, `--window` seconds each, so that
pushes while GC works and pushes while it is frozen are taken in the same minutes: a
registry that keeps taking pushes slows down by itself as its store and its background
work grow, and a baseline taken before GC would count that drift against GC. Reported:
GC working time (its running windows), wall time and peak memory (VmHWM of its process),
what it freed, and push latency in its running and frozen windows (medians, p90,
failures), beside pushes before GC. Target: no push fails, and the median push while GC
runs is at most 1.10x the median while it is frozen.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import signal
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import urllib3

from bench.report import git_state, machine, save_json, write_section
from deploy.stack import VENV_BIN, Stack
from pipelines.config import Settings
from pipelines.formats.recipe import RecipeBuilder
from pipelines.formats.verify import SegmentDigests
from pipelines.registry.facade import Registry
from pipelines.store.filestore import CODEC_RAW, PACK_TARGET, pack_table
from pipelines.store.storage import S3Store

SECTION = "## bench-gc: online garbage collection of 10k layers and 1M files"
FILE_BYTES = 48
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def synthesize(store: S3Store, layers: int, files: int) -> list[tuple[str, str, str]]:
    """Write the synthetic store; (repository, manifest digest, layer digest) per image."""
    per_layer = max(1, files // layers)
    images = []
    with ThreadPoolExecutor(16) as pool:
        packer = _PackWriter(store, pool)
        for number in range(layers):
            contents = [os.urandom(FILE_BYTES) for _ in range(per_layer)]
            digests = [hashlib.sha256(content).digest() for content in contents]
            for digest, content in zip(digests, contents, strict=True):
                packer.add(digest, content)
            images.append(_image(store, pool, number, digests))
        packer.seal()
    return images


class _PackWriter:
    def __init__(self, store: S3Store, pool: ThreadPoolExecutor) -> None:
        self.store, self.pool = store, pool
        self.parts: list[bytes] = []
        self.entries: list[tuple[bytes, int, int]] = []
        self.offset = 0

    def add(self, digest: bytes, content: bytes) -> None:
        stored = bytes((CODEC_RAW,)) + content
        self.entries.append((digest, self.offset, len(stored)))
        self.parts.append(stored)
        self.offset += len(stored)
        if self.offset >= PACK_TARGET:
            self.seal()

    def seal(self) -> None:
        if self.entries:
            body = b"".join(self.parts) + pack_table(self.entries)
            name = uuid.uuid4().hex
            self.pool.submit(self.store.put_bytes, f"packs/{name[:2]}/{name}", body)
            self.parts, self.entries, self.offset = [], [], 0


def _image(
    store: S3Store, pool: ThreadPoolExecutor, number: int, files: list[bytes]
) -> tuple[str, str, str]:
    """A layer's recipe and descriptor, and a manifest naming it in its own repository.
    The layer's "blob" digest is made up (nothing restores it here)."""
    layer = "sha256:" + hashlib.sha256(b"layer%d" % number).hexdigest()
    builder = RecipeBuilder()
    for digest in files:
        builder.add_file(digest, FILE_BYTES)
    size = len(files) * FILE_BYTES
    segments = SegmentDigests((size,), (bytes(32),))
    recipe = builder.finish(
        blob_digest=layer,
        blob_size=size,
        tar_sha256=bytes(32),
        encoder_id="identity",
        encoder_params=b"",
        segments=segments,
    )
    hexdigest = layer.split(":")[1]
    repo = f"gcbench/r{number}"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer, "size": size}],
    }).encode()  # fmt: skip
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    mhex = manifest_digest.split(":")[1]
    referrer = {"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest)}
    revision = {**referrer, "subject": None, "referrer": referrer}
    descriptor = {
        "format": 1,
        "size": size,
        "segments": [],
        "recipe": f"recipes/sha256/{hexdigest}",
        "encoder": "identity",
        "retired": [],
    }
    writes = {
        f"recipes/sha256/{hexdigest}": recipe.encode(),
        f"blobs/sha256/{hexdigest}": json.dumps(descriptor).encode(),
        f"manifests/sha256/{mhex}": manifest,
        f"repositories/{repo}/_manifests/revisions/sha256/{mhex}": json.dumps(revision).encode(),
        f"repositories/{repo}/_manifests/tags/v1": manifest_digest.encode(),
        f"repositories/{repo}/_layers/sha256/{hexdigest}": b"",
    }
    for key, data in writes.items():
        pool.submit(store.put_bytes, key, data)
    return repo, manifest_digest, layer


def tiny_layer() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        content = os.urandom(2048)
        info = tarfile.TarInfo("f")
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    return gzip.compress(buffer.getvalue(), mtime=0)


Push = tuple[float, float | None]  # (when it started, monotonic; seconds, None if it failed)


def push_for(url: str, seconds: float, stop: threading.Event | None = None) -> list[Push]:
    """Push small images one after the other for `seconds` (or until `stop`)."""
    http = urllib3.PoolManager(timeout=urllib3.Timeout(total=120))
    pushes: list[Push] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        repo = f"gcbench/push-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        try:
            _push(http, url, repo, tiny_layer())
            pushes.append((started, time.monotonic() - started))
        except (AssertionError, urllib3.exceptions.HTTPError):
            pushes.append((started, None))
    return pushes


def _push(http: urllib3.PoolManager, url: str, repo: str, layer: bytes) -> None:
    digests = []
    for blob in (b"{}", layer):
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        response = http.request(
            "POST", f"{url}/v2/{repo}/blobs/uploads/?digest={digest}", body=blob
        )
        assert response.status == 201, response.data
        digests.append((digest, len(blob)))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digests[0][0], "size": digests[0][1]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digests[1][0], "size": digests[1][1]}],
    }).encode()  # fmt: skip
    response = http.request("PUT", f"{url}/v2/{repo}/manifests/v1", body=manifest,
                            headers={"Content-Type": OCI_MANIFEST})  # fmt: skip
    assert response.status == 201, response.data


def _latency_summary(pushes: list[Push]) -> dict[str, Any]:
    ordered = sorted(latency for _started, latency in pushes if latency is not None)
    return {
        "pushes": len(ordered),
        "failures": sum(latency is None for _started, latency in pushes),
        "p50_ms": 1000 * statistics.median(ordered) if ordered else None,
        "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))] if ordered else None,
    }


Window = tuple[float, float, bool]  # start, end (monotonic), whether GC ran in it


def run_gc_process(env: dict[str, str], window: float) -> tuple[dict[str, Any], list[Window]]:
    """GC in a process of its own, let go and frozen in turn, `window` seconds each; its
    report (with its peak resident memory) and the windows."""
    code = (
        "import json, resource\n"
        "from dataclasses import asdict\n"
        "from pipelines.registry.facade import Registry\n"
        "report = asdict(Registry.connect().collector().run())\n"
        "report['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps(report))\n"
    )
    process = subprocess.Popen([str(VENV_BIN / "python"), "-c", code], env=env,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    windows: list[Window] = []
    running, start = True, time.monotonic()
    while process.poll() is None:
        try:
            process.wait(timeout=window)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGSTOP if running else signal.SIGCONT)
        windows.append((start, time.monotonic(), running))
        running, start = not running, time.monotonic()
    output, _errors = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"GC failed (exit {process.returncode})")
    return dict(json.loads(output.strip().splitlines()[-1])), windows


def by_window(pushes: list[Push], windows: list[Window]) -> dict[str, list[Push]]:
    """The pushes that started and ended inside one window, by whether GC ran in it."""
    found: dict[str, list[Push]] = {"running": [], "frozen": []}
    for started, latency in pushes:
        ended = started + (latency or 0.0)
        for start, end, running in windows:
            if start <= started and ended <= end:
                found["running" if running else "frozen"].append((started, latency))
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as workdir, Stack(Path(workdir)) as stack:
        gc_settings = {"DUPHUNTER_GC_GRACE_SECONDS": "1", "DUPHUNTER_PREDICTOR": "none"}
        listen = stack.start_registry(gc_settings)
        env = {**stack.env, "URL": f"http://{listen}"}
        settings = Settings()
        store = S3Store(settings)
        started = time.perf_counter()
        images = synthesize(store, args.layers, args.files)
        synth_s = time.perf_counter() - started
        registry = Registry.connect(settings)
        registry.rebuild_index()
        for repo, manifest, _layer in images[: len(images) // 10]:
            registry.manifests.delete(repo, manifest)
        time.sleep(2)  # past the grace window
        baseline = push_for(env["URL"], args.push_seconds)
        stop = threading.Event()
        during: list[Push] = []
        pusher = threading.Thread(target=lambda: during.extend(push_for(env["URL"], 1e9, stop)))
        pusher.start()
        gc_started = time.perf_counter()
        report, windows = run_gc_process(env, args.window)
        gc_s = time.perf_counter() - gc_started
        stop.set()
        pusher.join()
        split = by_window(during, windows)
        return {
            "layers": args.layers,
            "files": args.files,
            "push_seconds": args.push_seconds,
            "window_s": args.window,
            "synthesize_s": synth_s,
            "gc_s": gc_s,
            "gc_running_s": sum(end - start for start, end, running in windows if running),
            "gc": report,
            "pushes_before_gc": _latency_summary(baseline),
            "pushes_while_gc_runs": _latency_summary(split["running"]),
            "pushes_while_gc_frozen": _latency_summary(split["frozen"]),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--layers", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--push-seconds", type=float, default=60.0)
    parser.add_argument("--window", type=float, default=10.0, help="GC runs, then is frozen")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    began = time.perf_counter()
    result = run(args)
    result.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), git=git_state(),
                  machine=machine(), total_s=time.perf_counter() - began)  # fmt: skip
    save_json("gc", result)
    print(json.dumps(result, indent=1))
    if not args.no_docs:
        write_section(SECTION, markdown(result), result["machine"])


def markdown(result: dict[str, Any]) -> str:
    gc = result["gc"]
    running, frozen = result["pushes_while_gc_runs"], result["pushes_while_gc_frozen"]
    freed = sum(gc[k] for k in ("manifest_bytes", "blob_bytes", "pack_bytes_freed", "orphan_bytes"))
    rows = [
        ("GC working time (its running windows)", f"{result['gc_running_s']:.1f} s"),
        ("GC wall time (frozen half the time)", f"{result['gc_s']:.1f} s"),
        ("GC peak memory (VmHWM)", f"{gc['peak_rss_mib']:.0f} MiB"),
        ("blobs, files freed", f"{gc['blobs']}, {gc['files']}"),
        ("packs deleted / compacted", f"{gc['packs_deleted']} / {gc['packs_compacted']}"),
        ("bytes freed", f"{freed / 1e6:.1f} MB"),
        ("pushes before GC: count, failures, p50, p90", _pushes(result["pushes_before_gc"])),
        ("pushes while GC runs: count, failures, p50, p90", _pushes(running)),
        ("pushes while GC is frozen: count, failures, p50, p90", _pushes(frozen)),
        ("push p50 while GC runs / while frozen (target <= 1.10)", _ratio(running, frozen)),
    ]
    table = "\n".join(["| | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    return f"""Run {result["date"]} by `make bench-gc` (`python -m bench.gc`, total
{result["total_s"]:.0f} s), code at {result["git"]}.

```
{result["machine"]}
```

Store: {result["layers"]} deduplicated layers naming {result["files"]} files of
{FILE_BYTES} bytes, written into S3 directly in {result["synthesize_s"]:.0f} s; a tenth of the
images deleted. GC ran in its own process (DUPHUNTER_GC_PACE={_pace()}) while one client pushed
small images through the API without pause; the GC process was frozen and let go in turn,
{result["window_s"]:.0f} s each, and the pushes are compared between its running and its frozen
windows (pushes for {result["push_seconds"]:.0f} s before GC are shown beside them: the
registry slows down by itself as pushes pile up, which is why the windows are interleaved).

{table}

Raw data: `docs/bench/gc.json`.
"""


def _pace() -> str:
    return str(Settings().gc_pace)


def _pushes(summary: dict[str, Any]) -> str:
    if not summary.get("pushes"):
        return f"0, {summary.get('failures', 0)}, -, -"
    return (
        f"{summary['pushes']}, {summary['failures']}, {summary['p50_ms']:.0f} ms, "
        f"{summary['p90_ms']:.0f} ms"
    )


def _ratio(during: dict[str, Any], before: dict[str, Any]) -> str:
    if not (during.get("p50_ms") and before.get("p50_ms")):
        return "-"
    return f"{during['p50_ms'] / before['p50_ms']:.2f}x"


if __name__ == "__main__":
    main()
