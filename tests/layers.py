"""Layers the tests make and push, and waiting on a live stack until they are ingested,
retired and served from recipes; then getting them back."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sysconfig
import time
from pathlib import Path

from bench.scale import tar_of
from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack, served_from_dedup

TERMINAL = ("intact", "deduplicated")
SOURCE = "X-DupHunter-Source"  # the response header that says where a GET was served from
KiB = 1 << 10
make_tar = tar_of  # a PAX tar of these files: one builder for the tests and the benches


def real_files_tar(target_bytes: int) -> bytes:
    """A GNU tar of real files from Python's standard library, about target_bytes long."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    picked: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        picked.append(path.name)
        total += path.stat().st_size
        if total >= target_bytes:
            break
    return subprocess.run(
        ["tar", "-cf", "-", "-C", str(stdlib), *picked], capture_output=True, check=True
    ).stdout


def random_files(prefix: str, count: int) -> dict[str, bytes]:
    return {f"{prefix}/{n}": os.urandom(20 * KiB) for n in range(count)}


def layer_of(files: dict[str, bytes]) -> bytes:
    return gzip.compress(make_tar(files), compresslevel=1, mtime=0)


def oci_config(layer_tars: list[bytes]) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar) for tar in layer_tars]},
        }
    ).encode()


def push_layers(client: RegistryClient, repo: str, layers: list[bytes]) -> list[str]:
    client.push_image(repo, "latest", layers)
    return [sha256(layer) for layer in layers]


def wait_for_layers(
    live: LiveStack, digests: list[str], timeout: float = 180
) -> dict[str, dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        records = {digest: live.registry.index.layer(digest) for digest in digests}
        if all(record.get("state") in TERMINAL for record in records.values()):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"layers not ingested: {records}")
        time.sleep(0.3)


def wait_until_retired(live: LiveStack, digest: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = live.registry.blobs.stored_info(digest)
        if info is not None and info.deduplicated and not info.retired:
            return
        time.sleep(0.3)
    raise TimeoutError(f"intact copy of {digest} was not retired")


def deduplicated_layer(client: RegistryClient, repo: str, live: LiveStack, layer: bytes) -> str:
    (digest,) = push_layers(client, repo, [layer])
    assert wait_for_layers(live, [digest])[digest]["state"] == "deduplicated"
    wait_until_retired(live, digest)
    return digest


def wait_until_restorable(live: LiveStack, digests: list[str]) -> int:
    """Wait until the layers are served only from recipes; the restore count so far."""
    for digest in digests:
        wait_until_retired(live, digest, timeout=90)
    time.sleep(live.settings.restore_keep_seconds + 0.5)  # no spool copy left from ingest
    return served_from_dedup(live)


def get(client: RegistryClient, repo: str, digest: str, byte_range: str = "") -> tuple[str, bytes]:
    headers = {"Range": byte_range} if byte_range else {}
    response = client.request("GET", f"/v2/{repo}/blobs/{digest}", headers=headers)
    assert response.status in (200, 206), response.data[:200]
    return response.headers.get(SOURCE, ""), bytes(response.data)


def assert_pulled_exactly(client: RegistryClient, repo: str, digest: str, blob: bytes) -> None:
    full = client.request("GET", f"/v2/{repo}/blobs/{digest}")
    assert full.status == 200, (digest, full.status)
    assert sha256(full.data) == digest and full.data == blob
    start = len(blob) // 3
    end = start + 100_000
    part = client.request(
        "GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes={start}-{end}"}
    )
    assert part.status == 206, (digest, part.status)
    assert part.data == blob[start : end + 1]
