"""Real clients against the live registry: umoci builds, skopeo pushes and pulls, oras
pushes and pulls artifacts in chunks. Every digest must come back identical."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack
from tests.real_clients import (
    build_image,
    layout_manifest,
    needs_umoci_and_skopeo,
    run,
    skopeo_copy,
)

pytestmark = needs_umoci_and_skopeo


def blob_digests(layout: Path, manifest: dict[str, object]) -> list[str]:
    layers = manifest["layers"]
    assert isinstance(layers, list)
    return [layer["digest"] for layer in layers]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A two-layer image of fresh random content, so no client cache knows its blobs."""
    layout = tmp_path / "image"
    shared = os.urandom(200_000)
    build_image(
        layout,
        "v1",
        [
            {"usr/lib/shared.bin": shared, "etc/hostname": b"duphunter\n"},
            {"app/data.bin": os.urandom(3_000_000), "app/shared-copy.bin": shared},
        ],
    )
    return layout


def test_skopeo_push_pull_byte_identical(
    live: LiveStack, image: Path, tmp_path: Path, repo: str
) -> None:
    host = live.url.removeprefix("http://")
    pushed_digest, pushed = layout_manifest(image)
    skopeo_copy(f"oci:{image}:v1", f"docker://{host}/{repo}:v1", "--preserve-digests")
    pulled_layout = tmp_path / "pulled"
    skopeo_copy(f"docker://{host}/{repo}:v1", f"oci:{pulled_layout}:v1", "--preserve-digests")
    pulled_digest, pulled = layout_manifest(pulled_layout)
    assert pulled_digest == pushed_digest
    assert pulled == pushed
    for digest in blob_digests(pulled_layout, pulled):
        content = (pulled_layout / "blobs" / digest.replace(":", "/")).read_bytes()
        assert sha256(content) == digest
        assert content == (image / "blobs" / digest.replace(":", "/")).read_bytes()


def test_skopeo_docker_schema2_round_trip(
    live: LiveStack, image: Path, tmp_path: Path, repo: str
) -> None:
    host = live.url.removeprefix("http://")
    skopeo_copy(f"oci:{image}:v1", f"docker://{host}/{repo}:v2s2", "--format", "v2s2")
    raw = run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{host}/{repo}:v2s2")
    manifest = json.loads(raw)
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    client = RegistryClient(live.url)
    response = client.request(
        "GET", f"/v2/{repo}/manifests/v2s2", headers={"Accept": manifest["mediaType"]}
    )
    assert response.data == raw.encode()
    pulled = tmp_path / "pulled-v2s2"
    skopeo_copy(f"docker://{host}/{repo}:v2s2", f"dir:{pulled}")
    for layer in manifest["layers"]:
        assert sha256((pulled / layer["digest"].split(":")[1]).read_bytes()) == layer["digest"]


def test_oras_chunked_push_and_pull(live: LiveStack, tmp_path: Path, repo: str) -> None:
    import oras.client

    host = live.url.removeprefix("http://")
    artifact = tmp_path / "artifact.bin"
    artifact.write_bytes(os.urandom(5 * 1024 * 1024 + 17))
    client = oras.client.OrasClient(hostname=host, insecure=True)
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        response = client.push(
            target=f"{host}/{repo}:artifact",
            files=["artifact.bin"],
            do_chunked=True,
            chunk_size=1024 * 1024,
        )
        assert response.status_code == 201
        out = tmp_path / "out"
        files = client.pull(target=f"{host}/{repo}:artifact", outdir=str(out))
    finally:
        os.chdir(cwd)
    assert [Path(name).name for name in files] == ["artifact.bin"]
    assert (out / "artifact.bin").read_bytes() == artifact.read_bytes()
