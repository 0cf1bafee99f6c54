"""The real OCI tools the tests drive, each on state of its own: umoci builds an image,
skopeo copies one, a private podman; and an OCI layout written by hand for them to read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PODMAN_TIMEOUT = 180.0

needs_umoci_and_skopeo = pytest.mark.skipif(
    not (shutil.which("skopeo") and shutil.which("umoci")),
    reason="skopeo and umoci are installed by `make test` (deploy/system-deps.sh)",
)


def run(*args: str | Path) -> str:
    return subprocess.run(
        [str(arg) for arg in args], check=True, capture_output=True, text=True
    ).stdout


def build_image(layout: Path, tag: str, layers: list[dict[str, bytes]]) -> None:
    """An OCI image made by umoci, one layer per dict of path -> content."""
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:{tag}")
    for number, files in enumerate(layers):
        bundle = layout.parent / f"bundle-{tag}-{number}"
        run("umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", bundle)
        for path, content in files.items():
            target = bundle / "rootfs" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        run("umoci", "repack", "--image", f"{layout}:{tag}", bundle)
        shutil.rmtree(bundle)


def layout_manifest(layout: Path) -> tuple[str, dict[str, object]]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    return digest, json.loads((layout / "blobs" / digest.replace(":", "/")).read_bytes())


def skopeo_copy(source: str, destination: str, *extra: str) -> None:
    run(
        "skopeo",
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        *extra,
        source,
        destination,
    )


def write_oci_layout(root: Path, layer: bytes) -> None:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layer_ref = put(layer)
    config = {"architecture": "amd64", "os": "linux", "config": {}}
    config["rootfs"] = {"type": "layers", "diff_ids": [layer_ref["digest"]]}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **put(json.dumps(config).encode()),
        },
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer_ref}],
    }
    manifest_ref = put(json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest_ref,
                "annotations": {"org.opencontainers.image.ref.name": "t"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


@dataclass(frozen=True)
class Podman:
    """The podman CLI with a storage and configuration of its own: it reads none of the
    host's containers.conf, registries, storage, signature policy or credentials."""

    home: Path

    @property
    def policy(self) -> Path:
        return self.home / "policy.json"

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            CONTAINERS_CONF=str(self.home / "containers.conf"),
            CONTAINERS_REGISTRIES_CONF=str(self.home / "registries.conf"),
            CONTAINERS_STORAGE_CONF=str(self.home / "storage.conf"),
            REGISTRY_AUTH_FILE=str(self.home / "auth.json"),
            TMPDIR=str(self.home / "tmp"),
            XDG_RUNTIME_DIR=str(self.home / "xdg-runtime"),
            XDG_CONFIG_HOME=str(self.home / "xdg-config"),
            XDG_DATA_HOME=str(self.home / "xdg-data"),
        )

    def argv(self, *args: str | Path) -> list[str]:
        storage = self.home / "storage"
        return [
            "podman",
            "--root", str(storage / "root"),
            "--runroot", str(storage / "run"),
            "--tmpdir", str(storage / "libpod"),
            "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            *(str(arg) for arg in args),
        ]  # fmt: skip

    def attempt(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), env=self.env(), capture_output=True, text=True,
            timeout=PODMAN_TIMEOUT, check=False,
        )  # fmt: skip

    def run(self, *args: str | Path) -> str:
        done = self.attempt(*args)
        assert done.returncode == 0, (
            f"{' '.join(done.args)} failed ({done.returncode})\n"
            f"stdout: {done.stdout}\nstderr: {done.stderr}"
        )
        return done.stdout

    def inspect(self, image: str) -> dict[str, Any]:
        (info,) = json.loads(self.run("image", "inspect", image))
        assert isinstance(info, dict)
        return info


def write_podman_config(home: Path) -> None:
    storage = home / "storage"
    for directory in ("tmp", "xdg-runtime", "xdg-config", "xdg-data"):
        (home / directory).mkdir(parents=True)
    (home / "containers.conf").write_text(
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        f'events_logfile_path = "{home / "events.log"}"\n'
    )
    (home / "registries.conf").write_text("unqualified-search-registries = []\n")
    (home / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{storage / "root"}"\n'
        f'runroot = "{storage / "run"}"\n'
    )
    (home / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    (home / "auth.json").write_text('{"auths": {}}')


def private_podman(home: Path) -> Podman:
    """A podman of its own under home, or a skip that says why podman cannot run here."""
    if shutil.which("podman") is None:
        pytest.skip("podman is installed by `make test` (deploy/system-deps.sh)")
    write_podman_config(home)
    podman = Podman(home)
    probe = podman.attempt("info")
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run here (`podman info` exited {probe.returncode}):\n"
                    f"{probe.stderr}")  # fmt: skip
    return podman
