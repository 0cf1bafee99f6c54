"""The replayer's HTTP side: push images, fetch manifests and verified blobs, read stats.

Each replayed client talks from its own loopback address (127.10.x.y) when the registry is
on loopback, so the registry sees as many clients as the workload has, as it would in
production, without trusting any forwarded-for header.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import urllib3

from api.replay.content import BuiltLayer

SOURCE_HEADER = "X-DupHunter-Source"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
CHUNK = 1 << 20
REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class Get:
    """One GET as the client saw it. `seconds` runs from sending the request to the last
    byte; `source` is the registry's X-DupHunter-Source ("unknown" if it sent none)."""

    kind: str  # "manifest", "config" or "layer"
    client: str
    repository: str
    digest: str  # for a manifest: the tag
    at: float = 0.0  # start, seconds from the start of the replay
    status: int = 0
    bytes: int = 0
    seconds: float = 0.0
    ttfb_s: float = 0.0
    source: str = "unknown"
    verified: bool = False
    error: str = ""


def client_address(number: int) -> str:
    """The loopback source address of client `number` (up to 62,500 distinct)."""
    return f"127.10.{number // 250 % 250}.{number % 250 + 1}"


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "localhost" or host.startswith("127.")


class Connection:
    """HTTP to one registry from one source address, with keep-alive."""

    def __init__(self, url: str, source: str | None = None, timeout: float = 900) -> None:
        self.url = url.rstrip("/")
        extra: dict[str, Any] = {"source_address": (source, 0)} if source else {}
        self.pool = urllib3.PoolManager(
            maxsize=8, retries=False, timeout=urllib3.Timeout(connect=10, read=timeout), **extra
        )

    def absolute(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.url + path

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> urllib3.BaseHTTPResponse:
        return self.pool.request(
            method, self.absolute(path), body=body, headers=headers, redirect=False
        )

    def stream(self, path: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        return self.pool.request(
            "GET", self.absolute(path), headers=headers, redirect=False, preload_content=False
        )

    def close(self) -> None:
        self.pool.clear()

    # --- pulling ----------------------------------------------------------------------

    def manifest(self, get: Get) -> dict[str, Any] | None:
        """GET a manifest by tag; fills `get`, returns the parsed manifest (None on error)."""
        started = time.perf_counter()
        try:
            response = self.request(
                "GET", f"/v2/{get.repository}/manifests/{get.digest}", headers={"Accept": ACCEPT}
            )
            get.status, get.bytes = response.status, len(response.data)
            get.seconds = get.ttfb_s = time.perf_counter() - started
            if response.status != 200:
                get.error = f"manifest GET {response.status}: {response.data[:200]!r}"
                return None
            parsed = json.loads(response.data)
            get.verified = isinstance(parsed, dict) and isinstance(parsed.get("layers"), list)
            if not get.verified:
                get.error = "manifest has no layers list"
                return None
            return dict(parsed)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
            get.seconds = time.perf_counter() - started
            get.error = f"manifest GET: {type(error).__name__}: {error}"
            return None

    def blob(self, get: Get, size: int) -> None:
        """GET a blob, following redirects, hashing every byte; fills `get`. `verified`
        only if the body has exactly `size` bytes and hashes to the digest."""
        started = time.perf_counter()
        try:
            self._download(get, size, started)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            get.error = f"{type(error).__name__}: {error}"
        get.seconds = time.perf_counter() - started

    def _download(self, get: Get, size: int, started: float) -> None:
        path = f"/v2/{get.repository}/blobs/{get.digest}"
        response = self.stream(path, {})
        get.source = response.headers.get(SOURCE_HEADER, "unknown")
        for _hop in range(5):
            if response.status not in REDIRECTS:
                break
            location = response.headers.get("Location", "")
            response.release_conn()
            response = self.stream(location, {})
        get.status = response.status
        if response.status != 200:
            get.error = f"blob GET {response.status}: {response.read()[:200]!r}"
            response.release_conn()
            return
        hasher = hashlib.sha256()
        for chunk in response.stream(CHUNK):
            if not get.bytes:
                get.ttfb_s = time.perf_counter() - started
            hasher.update(chunk)
            get.bytes += len(chunk)
        response.release_conn()
        actual = "sha256:" + hasher.hexdigest()
        get.verified = get.bytes == size and actual == get.digest
        if not get.verified:
            get.error = f"got {get.bytes} bytes hashing to {actual}, expected {size} bytes"

    # --- pushing ----------------------------------------------------------------------

    def has_blob(self, repository: str, digest: str) -> bool:
        return self.request("HEAD", f"/v2/{repository}/blobs/{digest}").status == 200

    def push_blob(self, repository: str, digest: str, body: Any, mount_from: str | None) -> None:
        """Upload a blob (bytes or a binary file) unless the repository has it: a
        cross-repository mount when another repository has it, else POST then one PUT."""
        if self.has_blob(repository, digest):
            return
        query = f"?mount={digest}&from={mount_from}" if mount_from else ""
        started = self.request("POST", f"/v2/{repository}/blobs/uploads/{query}")
        if started.status == 201:
            return
        if started.status != 202:
            raise PushError(f"POST upload to {repository}: {started.status} {started.data[:200]!r}")
        location = started.headers["Location"]
        separator = "&" if "?" in location else "?"
        done = self.request(
            "PUT",
            f"{location}{separator}digest={digest}",
            body=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        if done.status != 201:
            raise PushError(f"PUT {digest} to {repository}: {done.status} {done.data[:200]!r}")

    def push_manifest(self, repository: str, tag: str, manifest: bytes) -> str:
        done = self.request(
            "PUT",
            f"/v2/{repository}/manifests/{tag}",
            body=manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        if done.status != 201:
            raise PushError(f"manifest {repository}:{tag}: {done.status} {done.data[:300]!r}")
        return str(done.headers.get("Docker-Content-Digest", ""))

    # --- the DupHunter API ---------------------------------------------------------------

    def stats(self) -> dict[str, Any] | None:
        """GET /api/v1/stats, or None if the registry has no such API (Distribution)."""
        try:
            response = self.request("GET", "/api/v1/stats")
            if response.status != 200:
                return None
            parsed = json.loads(response.data)
        except (urllib3.exceptions.HTTPError, OSError, ValueError):
            return None
        return parsed if isinstance(parsed, dict) else None

    def preconstruct(self, repository: str, reference: str, layers: list[str]) -> str:
        """Ask the registry to rebuild these layers ahead of their GETs; '' or the error."""
        body = json.dumps({"repository": repository, "reference": reference, "layers": layers})
        try:
            response = self.request(
                "POST",
                "/api/v1/jobs/preconstruct",
                body=body.encode(),
                headers={"Content-Type": "application/json"},
            )
        except (urllib3.exceptions.HTTPError, OSError) as error:
            return f"{type(error).__name__}: {error}"
        if response.status >= 300:
            return f"preconstruct {response.status}: {response.data[:200]!r}"
        return ""


class PushError(RuntimeError):
    pass


def image_config(repository: str, tag: str, layers: list[BuiltLayer]) -> bytes:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"org.duphunter.replay": f"{repository}:{tag}"}},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    return json.dumps(config, sort_keys=True).encode()


def image_manifest(config: bytes, layers: list[BuiltLayer]) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "size": len(config),
        },
        "layers": [
            {"mediaType": OCI_LAYER, "digest": layer.digest, "size": layer.size} for layer in layers
        ],
    }
    return json.dumps(manifest, indent=1).encode()
