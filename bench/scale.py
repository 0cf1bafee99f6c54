"""bench-scale: ingest and restore throughput with 1, 2 and 4 worker processes.

    python -m bench.scale [--workers 1,2,4] [--images 8] [--no-docs]

For each worker count, a fresh stack (Redis, SeaweedFS S3, one API process) receives the
same images, whose layers share most of their files (a common base of text-like files,
plus files of their own), gzip level 6 as Python and Jib write them. Ingest: N processes of
`celery worker -Q ingest -c 1` start, every manifest is pushed at once, and the clock runs
until every layer is deduplicated; MB/s of tar. Restore: N processes on the `restore`
queue rebuild every layer into the buffer (a warm job per image); MB/s of blob. Stored
bytes (packs and recipes) must not depend on N.

Results: a table on stdout, `docs/bench/scale.json`, and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import urllib3

from bench.report import REPO_ROOT, bar_chart, git_state, machine, save_json, write_section
from deploy.stack import Stack, wait_until
from pipelines.config import Settings
from pipelines.store.storage import S3Store

SECTION = "## bench-scale: ingest and restore with 1, 2 and 4 worker processes"
CACHE = REPO_ROOT / "build" / "bench" / "scale"
MB = 1e6
WORDS = [
    f"{w}{n}"
    for w in ("usr", "lib", "share", "doc", "python", "json", "config")
    for n in range(300)
]


def text_file(rng: random.Random, size: int) -> bytes:
    """Source-like text: compresses about 3:1, at zlib's usual speed."""
    out: list[str] = []
    length = 0
    while length < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "\n"
        out.append(line)
        length += len(line)
    return "".join(out).encode()[:size]


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), 1_700_000_000, 0o644
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def workload(images: int) -> list[tuple[bytes, int]]:
    """(gzip layer, tar bytes) per image, cached: a shared base of 40 MB and 4 MB each."""
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20261130)
    base = {
        f"usr/lib/base/{n}.py": text_file(rng, rng.randint(20_000, 400_000)) for n in range(200)
    }
    layers = []
    for number in range(images):
        path = CACHE / f"layer-{number}.gz"
        if not path.exists():
            own = {f"app/{number}/{n}.py": text_file(rng, 100_000) for n in range(40)}
            tar = tar_of({**base, **own})
            path.write_bytes(gzip.compress(tar, compresslevel=6, mtime=0))
            (CACHE / f"layer-{number}.tarsize").write_text(str(len(tar)))
        layers.append((path.read_bytes(), int((CACHE / f"layer-{number}.tarsize").read_text())))
    return layers


class Registry:
    """The benchmark's view of one fresh stack, over HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=600))

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        response = self.http.request(
            "POST", f"{self.url}/v2/{repo}/blobs/uploads/?digest={digest}", body=data
        )
        assert response.status == 201, response.data
        return digest

    def push_manifest(self, repo: str, config: str, layer: str, size: int) -> None:
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer, "size": size}],
        }  # fmt: skip
        response = self.http.request(
            "PUT",
            f"{self.url}/v2/{repo}/manifests/v1",
            body=json.dumps(manifest).encode(),
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert response.status == 201, response.data

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(self.http.request("GET", f"{self.url}/api/v1/stats").data))

    def warm(self, repo: str) -> None:
        body = json.dumps({"repository": repo, "reference": "v1"}).encode()
        response = self.http.request("POST", f"{self.url}/api/v1/jobs/preconstruct", body=body)
        assert response.status == 202, response.data


def run_one(workers: int, layers: list[tuple[bytes, int]]) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-scale-") as workdir,
        Stack(Path(workdir)) as stack,
    ):
        settings = {
            "DUPHUNTER_MODE": "b0",
            "DUPHUNTER_PREDICTOR": "none",
            "DUPHUNTER_RETIRE_GRACE_SECONDS": "1",
        }
        listen = stack.start_registry(settings, ("predict", "maintenance"), api_processes=1)
        registry = Registry(f"http://{listen}")
        repos = [f"scale/image-{n}" for n in range(len(layers))]
        config = None
        digests = []
        for repo, (blob, _tar) in zip(repos, layers, strict=True):
            config = registry.push_blob(repo, b"{}")
            digests.append(registry.push_blob(repo, blob))
        for number in range(workers):
            stack.start_worker("ingest", f"ingest-{number}")
        time.sleep(5)  # the workers connect
        started = time.perf_counter()
        for repo, digest, (blob, _tar) in zip(repos, digests, layers, strict=True):
            registry.push_manifest(repo, config or "", digest, len(blob))
        wait_until(lambda: _all_done(registry, len(layers)), "ingest", timeout=3600)
        ingest_s = time.perf_counter() - started
        stored = _stored_dedup_bytes()
        for number in range(workers):
            stack.start_worker("restore", f"restore-{number}")
        time.sleep(5)
        started = time.perf_counter()
        for repo in repos:
            registry.warm(repo)
        wait_until(
            lambda: registry.stats()["buffer"].get("fills", 0) >= len(layers),
            "restores",
            timeout=3600,
        )
        restore_s = time.perf_counter() - started
        tar_bytes = sum(tar for _blob, tar in layers)
        blob_bytes = sum(len(blob) for blob, _tar in layers)
        return {
            "workers": workers,
            "ingest_s": ingest_s,
            "ingest_tar_mb_s": tar_bytes / ingest_s / MB,
            "restore_s": restore_s,
            "restore_blob_mb_s": blob_bytes / restore_s / MB,
            "stored_dedup_bytes": stored,
            "pack_garbage": registry.stats()["pack_garbage"],
        }


def _all_done(registry: Registry, count: int) -> bool:
    layers = registry.stats()["layers"]
    return int(layers.get("deduplicated", 0)) + int(layers.get("intact", 0)) >= count


def _stored_dedup_bytes() -> int:
    """Packs and recipes in S3: what deduplication stores (intact copies are going away)."""
    store = S3Store(Settings())
    return sum(size for prefix in ("packs/", "recipes/") for _key, size in store.list(prefix))


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    lines = [
        "| worker processes | ingest s | ingest MB/s (tar) | x 1 worker | restore s | "
        "restore MB/s (blob) | x 1 worker | stored MB (packs + recipes) | vs 1 worker |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['workers']} | {row['ingest_s']:.1f} | {row['ingest_tar_mb_s']:.1f} | "
            f"{row['ingest_tar_mb_s'] / base['ingest_tar_mb_s']:.2f} | {row['restore_s']:.1f} | "
            f"{row['restore_blob_mb_s']:.1f} | "
            f"{row['restore_blob_mb_s'] / base['restore_blob_mb_s']:.2f} | "
            f"{row['stored_dedup_bytes'] / MB:.2f} | "
            f"{row['stored_dedup_bytes'] / base['stored_dedup_bytes']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    layers = workload(args.images)
    began = time.perf_counter()
    rows = []
    for count in (int(n) for n in args.workers.split(",")):
        rows.append(run_one(count, layers))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "git": git_state(),
        "machine": machine(),
        "images": args.images,
        "tar_bytes": sum(tar for _blob, tar in layers),
        "blob_bytes": sum(len(blob) for blob, _tar in layers),
        "total_s": time.perf_counter() - began,
        "rows": rows,
    }
    save_json("scale", result)
    print(table(rows))
    if not args.no_docs:
        write_docs(result)


def write_docs(result: dict[str, Any]) -> None:
    rows = result["rows"]
    base = rows[0]
    chart = bar_chart(
        REPO_ROOT / "docs" / "img" / "bench-scale.png",
        "Throughput with N worker processes, relative to 1 (2 cores)",
        {
            f"{row['workers']} worker(s)": {
                "ingest": row["ingest_tar_mb_s"] / base["ingest_tar_mb_s"],
                "restore": row["restore_blob_mb_s"] / base["restore_blob_mb_s"],
            }
            for row in rows
        },
        "x the throughput of 1 process",
        target=1.7,
    )
    body = f"""![bench-scale]({chart.relative_to(REPO_ROOT / "docs")})

Run {result["date"]} by `make bench-scale` (`python -m bench.scale`, total
{result["total_s"]:.0f} s), code at {result["git"]}.

```
{result["machine"]}
```

Workload: {result["images"]} images of one gzip-6 layer each (Python zlib), sharing a base
of 200 text-like files (40 MB) and holding 40 files (4 MB) of their own:
{result["tar_bytes"] / MB:.0f} MB of tar, {result["blob_bytes"] / MB:.0f} MB of blobs. For
each worker count a fresh stack (Redis, SeaweedFS, one API process, all on this machine);
`DUPHUNTER_MODE=b0`, no predictor. Ingest: N `celery worker -Q ingest -c 1` processes, all
manifests pushed at once, clock until every layer is deduplicated. Restore: N processes
on the `restore` queue rebuild every layer into the buffer (one warm job per image).
Target: 2 processes >= 1.7x the throughput of 1; stored bytes within 1% of 1 process.

{table(rows)}

Raw data: `docs/bench/scale.json`.
"""
    write_section(SECTION, body, result["machine"])


if __name__ == "__main__":
    main()
