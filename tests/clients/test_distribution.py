"""The OCI Distribution API v1.1, category by category as the conformance suite groups it
(pull, push, content discovery, content management), against the live stack."""

from __future__ import annotations

import json
import os
import time

from tests.client import (
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    RegistryClient,
    descriptor,
    error_codes,
    image_manifest,
    sha256,
)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
UNKNOWN_DIGEST = "sha256:" + "0" * 64


# pull
def test_base_endpoint(client: RegistryClient) -> None:
    response = client.request("GET", "/v2/")
    assert response.status == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_pull_manifest_by_tag_and_digest(client: RegistryClient, repo: str) -> None:
    digest, manifest = client.push_image(repo, "latest", [os.urandom(3000)])
    for reference in ("latest", digest):
        head = client.request(
            "HEAD", f"/v2/{repo}/manifests/{reference}", headers={"Accept": OCI_MANIFEST}
        )
        assert head.status == 200 and head.data == b""
        assert head.headers["Docker-Content-Digest"] == digest
        assert int(head.headers["Content-Length"]) == len(json.dumps(manifest))
        get = client.request(
            "GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": OCI_MANIFEST}
        )
        assert get.status == 200
        assert get.headers["Content-Type"] == OCI_MANIFEST
        assert sha256(get.data) == digest


def test_pull_unknown_manifest_and_blob(client: RegistryClient, repo: str) -> None:
    client.push_image(repo, "v1", [b"x"])
    for method in ("GET", "HEAD"):
        assert client.request(method, f"/v2/{repo}/manifests/nope").status == 404
        assert client.request(method, f"/v2/{repo}/manifests/{UNKNOWN_DIGEST}").status == 404
        assert client.request(method, f"/v2/{repo}/blobs/{UNKNOWN_DIGEST}").status == 404
    response = client.request("GET", f"/v2/{repo}/blobs/{UNKNOWN_DIGEST}")
    assert error_codes(response) == ["BLOB_UNKNOWN"]
    response = client.request("GET", f"/v2/{repo}/manifests/nope")
    assert error_codes(response) == ["MANIFEST_UNKNOWN"]


def test_pull_blob_with_ranges(client: RegistryClient, repo: str) -> None:
    data = os.urandom(100_000)
    digest = client.push_blob(repo, data)
    head = client.request("HEAD", f"/v2/{repo}/blobs/{digest}")
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(data)
    assert head.headers["Docker-Content-Digest"] == digest
    full = client.request("GET", f"/v2/{repo}/blobs/{digest}")
    assert full.status == 200 and full.data == data
    for header, expected in (
        ("bytes=10-19", data[10:20]),
        ("bytes=99990-", data[99990:]),
        ("bytes=-5", data[-5:]),
        ("bytes=0-999999", data),
    ):
        part = client.request("GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": header})
        assert part.status == 206, header
        assert part.data == expected, header
    bad = client.request("GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=200000-"})
    assert bad.status == 416
    assert bad.headers["Content-Range"] == f"bytes */{len(data)}"


def test_blob_is_scoped_to_its_repository(client: RegistryClient, repo: str) -> None:
    digest = client.push_blob(repo, os.urandom(100))
    assert client.request("HEAD", f"/v2/{repo}-other/blobs/{digest}").status == 404


# push
def test_push_post_then_put(client: RegistryClient, repo: str) -> None:
    data = os.urandom(5000)
    start = client.request("POST", f"/v2/{repo}/blobs/uploads/")
    assert start.status == 202
    location = start.headers["Location"]
    assert start.headers["Docker-Upload-UUID"] in location
    status = client.request("GET", location)
    assert status.status == 204 and status.headers["Range"] == "0-0"
    done = client.request(
        "PUT", location, data, {"Content-Type": "application/octet-stream"}, digest=sha256(data)
    )
    assert done.status == 201
    assert done.headers["Location"] == f"/v2/{repo}/blobs/{sha256(data)}"
    assert client.request("GET", done.headers["Location"]).data == data


def test_push_chunked_with_out_of_order_chunk(client: RegistryClient, repo: str) -> None:
    data = os.urandom(3 * 70_000 + 123)
    location = client.request("POST", f"/v2/{repo}/blobs/uploads/").headers["Location"]
    chunks = [data[i : i + 70_000] for i in range(0, len(data), 70_000)]
    offset = 0
    for number, chunk in enumerate(chunks[:-1]):
        response = client.request(
            "PATCH",
            location,
            chunk,
            {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                "Content-Length": str(len(chunk)),
            },
        )
        assert response.status == 202, response.data
        offset += len(chunk)
        assert response.headers["Range"] == f"0-{offset - 1}"
        location = response.headers["Location"]
        if number == 0:
            stale = client.request(
                "PATCH",
                location,
                chunk,
                {"Content-Range": f"0-{len(chunk) - 1}", "Content-Length": str(len(chunk))},
            )
            assert stale.status == 416
    status = client.request("GET", location)
    assert status.status == 204 and status.headers["Range"] == f"0-{offset - 1}"
    done = client.request(
        "PUT",
        location,
        chunks[-1],
        {"Content-Range": f"{offset}-{len(data) - 1}", "Content-Length": str(len(chunks[-1]))},
        digest=sha256(data),
    )
    assert done.status == 201, done.data
    assert client.request("GET", f"/v2/{repo}/blobs/{sha256(data)}").data == data


def test_push_chunked_streamed_without_length(client: RegistryClient, repo: str) -> None:
    """Docker and skopeo stream one PATCH with chunked transfer encoding."""
    data = os.urandom(300_000)
    location = client.request("POST", f"/v2/{repo}/blobs/uploads/").headers["Location"]
    response = client.request(
        "PATCH", location, (data[i : i + 65536] for i in range(0, len(data), 65536))
    )
    assert response.status == 202 and response.headers["Range"] == f"0-{len(data) - 1}"
    done = client.request("PUT", response.headers["Location"], b"", digest=sha256(data))
    assert done.status == 201
    assert client.request("GET", f"/v2/{repo}/blobs/{sha256(data)}").data == data


def test_upload_resumes_on_any_api_process(client: RegistryClient, repo: str) -> None:
    """Many small chunks, each on a fresh connection, so gunicorn spreads them over processes."""
    data = os.urandom(40 * 1000)
    location = client.request("POST", f"/v2/{repo}/blobs/uploads/").headers["Location"]
    for offset in range(0, len(data), 1000):
        fresh = RegistryClient(client.url)
        response = fresh.request(
            "PATCH",
            location,
            data[offset : offset + 1000],
            {"Content-Range": f"{offset}-{offset + 999}", "Content-Length": "1000"},
        )
        assert response.status == 202
    assert client.request("PUT", location, b"", digest=sha256(data)).status == 201


def test_push_sha512_blob(client: RegistryClient, repo: str) -> None:
    import hashlib

    data = os.urandom(2000)
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    location = client.request("POST", f"/v2/{repo}/blobs/uploads/").headers["Location"]
    client.request("PATCH", location, data[:1000], {"Content-Range": "0-999"})
    response = client.request("PUT", location, data[1000:], digest=digest)
    assert response.status == 201, response.data
    assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == data


def test_cancel_upload(client: RegistryClient, repo: str) -> None:
    location = client.request("POST", f"/v2/{repo}/blobs/uploads/").headers["Location"]
    client.request("PATCH", location, b"abc")
    assert client.request("DELETE", location).status == 204
    gone = client.request("GET", location)
    assert gone.status == 404 and error_codes(gone) == ["BLOB_UPLOAD_UNKNOWN"]


def test_cross_repository_mount(client: RegistryClient, repo: str) -> None:
    digest = client.push_blob(repo, os.urandom(1000))
    target = f"{repo}-mounted"
    response = client.request("POST", f"/v2/{target}/blobs/uploads/?from={repo}", mount=digest)
    assert response.status == 201
    assert response.headers["Location"] == f"/v2/{target}/blobs/{digest}"
    assert client.request("HEAD", f"/v2/{target}/blobs/{digest}").status == 200
    fallback = client.request(
        "POST", f"/v2/{target}/blobs/uploads/?from={repo}", mount=UNKNOWN_DIGEST
    )
    assert fallback.status == 202 and "Location" in fallback.headers


def test_push_manifest_without_layers_and_docker_types(client: RegistryClient, repo: str) -> None:
    config = b"{}"
    manifest = image_manifest(client.push_blob(repo, config), len(config), [])
    assert client.push_manifest(repo, "empty", manifest).status == 201
    docker = dict(manifest, mediaType=DOCKER_MANIFEST)
    docker["config"] = dict(
        manifest["config"], mediaType="application/vnd.docker.container.image.v1+json"
    )
    response = client.push_manifest(repo, "docker", docker, DOCKER_MANIFEST)
    assert response.status == 201
    get = client.request(
        "GET",
        f"/v2/{repo}/manifests/docker",
        headers={"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"},
    )
    assert get.headers["Content-Type"] == DOCKER_MANIFEST
    refused = client.request(
        "GET", f"/v2/{repo}/manifests/docker", headers={"Accept": OCI_MANIFEST}
    )
    assert refused.status == 404


def test_push_index_and_manifest_list(client: RegistryClient, repo: str) -> None:
    child_digest, child = client.push_image(repo, "amd64", [os.urandom(64)])
    size = len(json.dumps(child))
    for media_type in (OCI_INDEX, DOCKER_LIST):
        index = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                descriptor(
                    OCI_MANIFEST,
                    child_digest,
                    size,
                    platform={"architecture": "amd64", "os": "linux"},
                )
            ],
        }
        response = client.push_manifest(repo, "multi", index, media_type)
        assert response.status == 201, response.data
        get = client.request("GET", f"/v2/{repo}/manifests/multi", headers={"Accept": media_type})
        assert get.headers["Content-Type"] == media_type
    missing = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [descriptor(OCI_MANIFEST, UNKNOWN_DIGEST, 10)],
    }
    response = client.push_manifest(repo, "broken", missing, OCI_INDEX)
    assert response.status == 400 and error_codes(response) == ["MANIFEST_BLOB_UNKNOWN"]


def test_push_manifest_by_digest(client: RegistryClient, repo: str) -> None:
    config = b'{"a":1}'
    manifest = image_manifest(client.push_blob(repo, config), len(config), [])
    body = json.dumps(manifest).encode()
    response = client.request(
        "PUT", f"/v2/{repo}/manifests/{sha256(body)}", body, {"Content-Type": OCI_MANIFEST}
    )
    assert response.status == 201
    assert response.headers["Location"] == f"/v2/{repo}/manifests/{sha256(body)}"


# content discovery
def test_tags_list_pagination(client: RegistryClient, repo: str) -> None:
    config = b"{}"
    manifest = image_manifest(client.push_blob(repo, config), len(config), [])
    tags = ["a", "b", "c", "d", "e"]
    for tag in reversed(tags):
        assert client.push_manifest(repo, tag, manifest).status == 201
    everything = json.loads(client.request("GET", f"/v2/{repo}/tags/list").data)
    assert everything == {"name": repo, "tags": tags}
    page = client.request("GET", f"/v2/{repo}/tags/list", n="2")
    assert json.loads(page.data)["tags"] == ["a", "b"]
    assert page.headers["Link"] == f'</v2/{repo}/tags/list?n=2&last=b>; rel="next"'
    page = client.request("GET", f"/v2/{repo}/tags/list", n="2", last="b")
    assert json.loads(page.data)["tags"] == ["c", "d"]
    last = client.request("GET", f"/v2/{repo}/tags/list", n="5", last="c")
    assert json.loads(last.data)["tags"] == ["d", "e"] and "Link" not in last.headers
    assert json.loads(client.request("GET", f"/v2/{repo}/tags/list", n="0").data)["tags"] == []
    unknown = client.request("GET", f"/v2/{repo}-nothing/tags/list")
    assert unknown.status == 404 and error_codes(unknown) == ["NAME_UNKNOWN"]


def test_catalog_pagination(client: RegistryClient, repo: str) -> None:
    names = [f"{repo}/{letter}" for letter in "abc"]
    for name in names:
        client.push_blob(name, b"catalog")
    listed = json.loads(client.request("GET", "/v2/_catalog").data)["repositories"]
    assert [name for name in listed if name.startswith(repo + "/")] == names
    page = client.request("GET", "/v2/_catalog", n="1", last=names[0])
    assert json.loads(page.data)["repositories"] == [names[1]]
    assert "Link" in page.headers


def test_referrers(client: RegistryClient, repo: str) -> None:
    subject_digest, subject = client.push_image(repo, "app", [os.urandom(100)])
    subject_descriptor = descriptor(OCI_MANIFEST, subject_digest, len(json.dumps(subject)))
    empty = b"{}"
    empty_digest = client.push_blob(repo, empty)
    digests = {}
    for artifact_type in ("application/vnd.example.sbom", "application/vnd.example.sig"):
        referrer = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": descriptor("application/vnd.oci.empty.v1+json", empty_digest, 2),
            "layers": [descriptor("application/vnd.oci.empty.v1+json", empty_digest, 2)],
            "subject": subject_descriptor,
            "annotations": {"org.example": artifact_type},
        }
        body = json.dumps(referrer).encode()
        response = client.request(
            "PUT", f"/v2/{repo}/manifests/{sha256(body)}", body, {"Content-Type": OCI_MANIFEST}
        )
        assert response.status == 201
        assert response.headers["OCI-Subject"] == subject_digest
        digests[artifact_type] = sha256(body)
    listing = client.request("GET", f"/v2/{repo}/referrers/{subject_digest}")
    assert listing.status == 200 and listing.headers["Content-Type"] == OCI_INDEX
    found = json.loads(listing.data)["manifests"]
    assert {d["digest"] for d in found} == set(digests.values())
    assert all(d["annotations"]["org.example"] == d["artifactType"] for d in found)
    filtered = client.request(
        "GET", f"/v2/{repo}/referrers/{subject_digest}", artifactType="application/vnd.example.sig"
    )
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert [d["digest"] for d in json.loads(filtered.data)["manifests"]] == [
        digests["application/vnd.example.sig"]
    ]
    none = client.request("GET", f"/v2/{repo}/referrers/{UNKNOWN_DIGEST}")
    assert none.status == 200 and json.loads(none.data)["manifests"] == []
    client.request("DELETE", f"/v2/{repo}/manifests/{digests['application/vnd.example.sig']}")
    remaining = json.loads(client.request("GET", f"/v2/{repo}/referrers/{subject_digest}").data)
    assert [d["digest"] for d in remaining["manifests"]] == [
        digests["application/vnd.example.sbom"]
    ]


# content management
def test_delete_tag_manifest_and_blob(client: RegistryClient, repo: str) -> None:
    layer = os.urandom(500)
    digest, _ = client.push_image(repo, "one", [layer])
    client.push_manifest(
        repo, "two", json.loads(client.request("GET", f"/v2/{repo}/manifests/one").data)
    )
    assert client.request("DELETE", f"/v2/{repo}/manifests/two").status == 202
    assert client.request("GET", f"/v2/{repo}/manifests/two").status == 404
    assert client.request("GET", f"/v2/{repo}/manifests/one").status == 200
    assert client.request("DELETE", f"/v2/{repo}/manifests/{digest}").status == 202
    assert client.request("GET", f"/v2/{repo}/manifests/{digest}").status == 404
    assert client.request("GET", f"/v2/{repo}/manifests/one").status == 404
    assert json.loads(client.request("GET", f"/v2/{repo}/tags/list").data)["tags"] == []
    assert client.request("DELETE", f"/v2/{repo}/blobs/{sha256(layer)}").status == 202
    assert client.request("GET", f"/v2/{repo}/blobs/{sha256(layer)}").status == 404
    again = client.request("DELETE", f"/v2/{repo}/blobs/{sha256(layer)}")
    assert again.status == 404 and error_codes(again) == ["BLOB_UNKNOWN"]


def test_index_survives_redis_loss(client: RegistryClient, repo: str, live: object) -> None:
    """S3 is the source of truth: wiping the Redis index and rebuilding loses nothing."""
    from tests.conftest import LiveStack

    assert isinstance(live, LiveStack)
    layer = os.urandom(2048)
    digest, _ = client.push_image(repo, "keep", [layer])
    before = live.registry.stats()
    live.registry.rebuild_index()
    after = live.registry.stats()
    assert (after["logical_bytes"], after["stored_bytes"]) == (
        before["logical_bytes"],
        before["stored_bytes"],
    )
    assert (
        client.request("GET", f"/v2/{repo}/manifests/keep").headers["Docker-Content-Digest"]
        == digest
    )
    assert client.request("GET", f"/v2/{repo}/blobs/{sha256(layer)}").data == layer


def test_ingest_job_records_layer(client: RegistryClient, repo: str, live: object) -> None:
    import gzip
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("hello.txt")
        payload = os.urandom(1000)
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    layer = gzip.compress(buffer.getvalue(), mtime=0)
    client.push_image(repo, "ingest", [layer])
    submitted = client.request(
        "POST",
        "/api/v1/jobs/ingest",
        json.dumps({"repository": repo, "digest": sha256(layer)}).encode(),
    )
    assert submitted.status == 202
    job_id = json.loads(submitted.data)["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = json.loads(client.request("GET", f"/api/v1/jobs/{job_id}").data)
        if job["state"] in ("success", "failure"):
            break
        time.sleep(0.2)
    assert job["state"] == "success", job
    assert job["result"]["compression"] == "gzip"
    assert job["result"]["state"] == "deduplicated"
    assert job["result"]["encoder"].startswith("gzip/zlib")
    assert job["result"]["files"] == 1
    assert client.request("GET", "/api/v1/jobs/not-a-job").status == 404
    stats = json.loads(client.request("GET", "/api/v1/stats").data)
    assert stats["logical_bytes"] > 0 and stats["stored_bytes"] > 0
    assert set(stats["queues"]) == {"ingest", "restore", "predict", "maintenance"}
    assert OCI_LAYER  # the layer media type the pushes above used
