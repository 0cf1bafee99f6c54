"""The real Docker engine against the live registry: Debian's dockerd (started by hand,
no systemd, no network, vfs storage) builds a two-layer image from scratch, pushes it
(Docker gzips layers with Go's compress/gzip, which DupHunter must reproduce, so the
layers are deduplicated), and after the intact copies are retired pulls it back from
recipes: same manifest digest, same image, same layer bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack, served_from_dedup
from tests.layers import wait_for_layers, wait_until_retired

DOCKERD = "/usr/sbin/dockerd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
START_TIMEOUT = 60.0
COMMAND_TIMEOUT = 120.0


@dataclass
class Docker:
    """A private dockerd and the docker CLI pointed at it."""

    cli: str
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as error:
            return f"(no dockerd log: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def run(self, *args: str | Path, timeout: float = COMMAND_TIMEOUT) -> str:
        argv = [self.cli, *(str(arg) for arg in args)]
        try:
            done = subprocess.run(
                argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as error:
            raise AssertionError(
                f"{' '.join(argv)} timed out after {timeout}s\n"
                f"--- dockerd log ---\n{self.log_tail()}"
            ) from error
        if done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} failed ({done.returncode})\n"
                f"stdout: {done.stdout}\nstderr: {done.stderr}\n"
                f"--- dockerd log ---\n{self.log_tail()}"
            )
        return done.stdout

    def inspect(self, image: str) -> dict[str, Any]:
        (info,) = json.loads(self.run("image", "inspect", image))
        assert isinstance(info, dict)
        return info

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            print(f"--- dockerd log (tail) ---\n{self.log_tail()}")
            raise


def docker_cli() -> str | None:
    """Debian's client (same release as the daemon) when it is there, else any docker."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM dockerd (it stops its own containerd), then kill what is left of its group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # a containerd left behind, never ours to keep


def has_cgroups() -> bool:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    return any(line.split()[2] in ("cgroup", "cgroup2") for line in mounts)


def cannot_start(what_happened: str, engine: Docker) -> str:
    """The skip reason when dockerd does not come up, e.g. on a machine without cgroups."""
    cgroups = "" if has_cgroups() else " (no cgroup filesystem is mounted, dockerd needs one)"
    return (
        f"dockerd cannot start on this machine{cgroups}: {what_happened}. "
        "Go's stdlib compress/gzip, which dockerd pushes layers with, is still covered end "
        "to end by the independent producer in tests/clients/test_producers.py "
        "(tests/producers/containerd-gzip, Go 1.26 and 1.27).\n"
        f"--- dockerd log (tail) ---\n{engine.log_tail(30)}"
    )


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    cli = docker_cli()
    if not os.access(DOCKERD, os.X_OK) or cli is None:
        pytest.skip(
            "the Docker engine is installed by `make test` (docker.io, deploy/system-deps.sh)"
        )
    if os.geteuid() != 0:
        pytest.skip("dockerd is started by hand here, which needs root")
    # A short private folder: containerd's sockets live under exec-root (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="dh-docker-"))
    (root / "daemon.json").write_text("{}")  # never the host's /etc/docker/daemon.json
    (root / "client").mkdir()  # nor the user's ~/.docker (credential helpers, contexts)
    socket_path = root / "docker.sock"
    log = root / "dockerd.log"
    argv = [
        DOCKERD,
        "--config-file", str(root / "daemon.json"),
        "--storage-driver=vfs",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        "--data-root", str(root / "data"),
        "--exec-root", str(root / "exec"),
        "--pidfile", str(root / "docker.pid"),
        "-H", f"unix://{socket_path}",
    ]  # fmt: skip
    env = dict(
        os.environ,
        DOCKER_HOST=f"unix://{socket_path}",
        DOCKER_CONFIG=str(root / "client"),
        DOCKER_BUILDKIT="0",  # the classic builder: no BuildKit, no container runtime
    )
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    engine = Docker(cli, env, log, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.skip(cannot_start(f"it exited with {process.returncode}", engine))
            if socket_path.exists():
                probe = subprocess.run(
                    [cli, "version", "--format", "{{.Server.Version}}"],
                    env=env, capture_output=True, text=True, timeout=10, check=False,
                )  # fmt: skip
                if probe.returncode == 0 and probe.stdout.strip():
                    break
            if time.monotonic() > deadline:
                pytest.skip(cannot_start(f"it did not answer within {START_TIMEOUT}s", engine))
            time.sleep(0.3)
        yield engine
    finally:
        stop(process)
        shutil.rmtree(root, ignore_errors=True)


def go_generation(go_version: str) -> str:
    """The DupHunter encoder generation that reproduces this Go's compress/gzip output:
    every Go up to 1.26 writes the same deflate stream; 1.27 changed it."""
    match = re.fullmatch(r"go(\d+)\.(\d+)(?:\.\d+)?\S*", go_version.strip())
    assert match, f"unexpected Go version from dockerd: {go_version!r}"
    return "go1.26" if (int(match[1]), int(match[2])) <= (1, 26) else "go1.27"


def build_context(context: Path) -> bytes:
    """Real files (a slice of /usr/share/doc, symlinks included) plus fresh random bytes,
    in two COPY layers that share a file; returns the shared file's content."""
    shared = os.urandom(1_000_000)
    base, app = context / "base", context / "app"
    budget = 2_500_000
    for source in sorted(Path("/usr/share/doc").rglob("*")):
        if budget <= 0:
            break
        target = base / "doc" / source.relative_to("/usr/share/doc")
        if source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            budget -= source.stat().st_size
    (base / "lib").mkdir(parents=True)
    (base / "lib" / "shared.bin").write_bytes(shared)
    (app / "lib").mkdir(parents=True)
    (app / "lib" / "shared-copy.bin").write_bytes(shared)
    (app / "data.bin").write_bytes(os.urandom(700_000))
    (app / "notes.txt").write_bytes(b"".join(b"line %d\n" % n for n in range(20_000)))
    (context / "Dockerfile").write_text("FROM scratch\nCOPY base/ /base/\nCOPY app/ /app/\n")
    return shared


def saved_members(tar_path: Path) -> dict[str, str]:
    """name -> sha256 of every regular file in a `docker save` archive."""
    members: dict[str, str] = {}
    with tarfile.open(tar_path) as archive:
        for member in archive:
            if member.isfile():
                handle = archive.extractfile(member)
                assert handle is not None
                members[member.name] = hashlib.sha256(handle.read()).hexdigest()
    return members


def saved_layer_digests(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as archive:
        handle = archive.extractfile("manifest.json")
        assert handle is not None
        (entry,) = json.loads(handle.read())
        digests = []
        for name in entry["Layers"]:
            layer = archive.extractfile(name)
            assert layer is not None
            digests.append(sha256(layer.read()))
    return digests


def test_docker_push_dedup_pull(
    docker: Docker, live: LiveStack, client: RegistryClient, repo: str, tmp_path: Path
) -> None:
    with docker.logs_on_failure():
        go_version = docker.run("version", "--format", "{{.Server.GoVersion}}").strip()
        encoder_prefix = f"gzip/{go_generation(go_version)}/"
        host = live.url.removeprefix("http://")
        image = f"{host}/{repo}:v1"

        context = tmp_path / "context"
        shared = build_context(context)
        docker.run("build", "--quiet", "--tag", image, context)
        built = docker.inspect(image)
        assert len(built["RootFS"]["Layers"]) == 2, built["RootFS"]
        docker.run("save", "--output", tmp_path / "built.tar", image)

        # Push: plain HTTP to 127.0.0.1 (an insecure registry by default for Docker).
        pushed_output = docker.run("push", image)
        pushed = re.search(r"v1: digest: (sha256:[0-9a-f]{64}) size: (\d+)", pushed_output)
        assert pushed, f"no digest in docker push output:\n{pushed_output}"
        push_digest, push_size = pushed[1], int(pushed[2])
        assert docker.inspect(image)["RepoDigests"] == [f"{host}/{repo}@{push_digest}"]

        served = client.request(
            "GET", f"/v2/{repo}/manifests/v1", headers={"Accept": DOCKER_MANIFEST}
        )
        assert served.status == 200, served.data
        assert served.headers["Docker-Content-Digest"] == push_digest, served.headers
        assert sha256(served.data) == push_digest and len(served.data) == push_size
        manifest = json.loads(served.data)
        assert manifest["mediaType"] == DOCKER_MANIFEST  # Docker pushes schema2
        assert manifest["config"]["digest"] == built["Id"]
        assert [layer["mediaType"] for layer in manifest["layers"]] == [DOCKER_LAYER] * 2
        layers = [layer["digest"] for layer in manifest["layers"]]

        # Ingest: Go's gzip is reproduced, so both layers become recipes.
        records = wait_for_layers(live, layers, timeout=90)
        for digest in layers:
            record = records[digest]
            assert record["state"] == "deduplicated", (go_version, digest, record)
            assert record["encoder"] == encoder_prefix + "6", (go_version, digest, record)
        refs = live.registry.index.file_refcount(sha256(shared).split(":")[1])
        assert refs == 2, f"the file both layers hold should be stored once, refcount {refs}"
        # Earlier tests drift and restore the canaries of this shared stack, and leave the
        # maintenance queue busy: record them afresh (which queues the retirements they
        # blocked), and give retirement the time a loaded CI machine needs.
        verify = client.request("POST", "/api/v1/encoders/verify", b"{}")
        assert verify.status == 200 and json.loads(verify.data)["ok"], verify.data
        for digest in layers:
            wait_until_retired(live, digest, timeout=180)
        time.sleep(live.settings.restore_keep_seconds + 0.5)  # no spool copy left from ingest
        restores_before = served_from_dedup(live)

        # Forget the image locally, then pull it back from the recipes.
        docker.run("rmi", image)
        docker.run("image", "prune", "--all", "--force")
        left = docker.run("image", "ls", "--all", "--quiet").split()
        assert left == [], f"images left in dockerd after rmi and prune: {left}"
        pull_output = docker.run("pull", image)
        assert f"Digest: {push_digest}" in pull_output, pull_output
        restores = served_from_dedup(live) - restores_before
        assert restores >= len(layers), f"pull served {restores} rebuilt layers for {len(layers)}"

        pulled = docker.inspect(image)
        assert pulled["Id"] == built["Id"]
        assert pulled["RootFS"]["Layers"] == built["RootFS"]["Layers"]
        assert pulled["RepoDigests"] == [f"{host}/{repo}@{push_digest}"]
        docker.run("save", "--output", tmp_path / "pulled.tar", image)
        assert saved_members(tmp_path / "pulled.tar") == saved_members(tmp_path / "built.tar")
        assert saved_layer_digests(tmp_path / "pulled.tar") == built["RootFS"]["Layers"]

        # And the blobs themselves, as the registry serves them now, are the pushed bytes.
        for layer in manifest["layers"]:
            blob = client.request("GET", f"/v2/{repo}/blobs/{layer['digest']}")
            assert blob.status == 200, (layer, blob.status)
            assert sha256(blob.data) == layer["digest"] and len(blob.data) == layer["size"]
