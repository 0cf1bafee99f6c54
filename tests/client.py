"""A small OCI Distribution protocol client for the tests, on urllib3."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

import urllib3

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# gunicorn closes a connection idle for 2 s; a GET sent on it as it closes gets no answer
# at all, and is sent again once, as docker's and skopeo's HTTP clients do
IDLE_CLOSE_RETRY = urllib3.Retry(
    total=1, connect=0, read=1, redirect=0, status=0, other=0,
    allowed_methods=frozenset({"GET", "HEAD"}), raise_on_redirect=False, raise_on_status=False,
)  # fmt: skip


class RegistryClient:
    """A protocol client; with `authorization`, it sends that header with every request,
    and with `source_address`, it connects from that loopback address (a client of its own
    for the server's per-address limits)."""

    def __init__(
        self, url: str, authorization: str | None = None, source_address: str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        source = None if source_address is None else (source_address, 0)
        self.http = urllib3.PoolManager(
            retries=IDLE_CLOSE_RETRY, timeout=urllib3.Timeout(total=120), source_address=source
        )
        self.authorization = authorization

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        **fields: str,
    ) -> urllib3.BaseHTTPResponse:
        url = path if path.startswith("http") else self.url + path
        if self.authorization:
            headers = {"Authorization": self.authorization, **(headers or {})}
        if fields:
            url += ("&" if "?" in url else "?") + urlencode(fields)
        return self.http.request(
            method, url, body=body, headers=headers, redirect=False, preload_content=True
        )

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        response = self.request("POST", f"/v2/{repo}/blobs/uploads/", data, digest=digest)
        assert response.status == 201, response.data
        return digest

    def push_blob_chunked(self, repo: str, data: bytes, chunk: int) -> str:
        """POST, one PATCH per `chunk` bytes (each its own data object), then PUT."""
        started = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert started.status == 202, started.data
        location = started.headers["Location"]
        for start in range(0, len(data), chunk):
            piece = data[start : start + chunk]
            end = start + len(piece) - 1
            patched = self.request("PATCH", location, piece, {"Content-Range": f"{start}-{end}"})
            assert patched.status == 202, patched.data
            location = patched.headers["Location"]
        digest = sha256(data)
        done = self.request("PUT", location, b"", digest=digest)
        assert done.status == 201, done.data
        return digest

    def push_manifest(
        self, repo: str, reference: str, manifest: dict[str, Any], media_type: str = OCI_MANIFEST
    ) -> urllib3.BaseHTTPResponse:
        return self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            json.dumps(manifest).encode(),
            {"Content-Type": media_type},
        )

    def push_image(
        self,
        repo: str,
        tag: str,
        layers: list[bytes],
        config: bytes = b'{"architecture":"amd64","os":"linux"}',
    ) -> tuple[str, dict[str, Any]]:
        manifest = image_manifest(
            self.push_blob(repo, config),
            len(config),
            [(self.push_blob(repo, layer), len(layer)) for layer in layers],
        )
        response = self.push_manifest(repo, tag, manifest)
        assert response.status == 201, response.data
        return response.headers["Docker-Content-Digest"], manifest


def descriptor(media_type: str, digest: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def image_manifest(
    config_digest: str, config_size: int, layers: list[tuple[str, int]], **extra: Any
) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config_digest, config_size),
        "layers": [descriptor(OCI_LAYER, digest, size) for digest, size in layers],
        **extra,
    }


def error_codes(response: urllib3.BaseHTTPResponse) -> list[str]:
    return [error["code"] for error in json.loads(response.data)["errors"]]
