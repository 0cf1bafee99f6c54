"""Bad input gets the spec's error and changes nothing stored."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.client import OCI_MANIFEST, RegistryClient, error_codes, image_manifest, sha256
from tests.conftest import LiveStack
from workers.app import QUEUES

STORED_PREFIXES = ("blobs/", "data/", "manifests/", "uploads/")


def stored_keys(live: LiveStack, repo: str) -> set[str]:
    keys = {key for prefix in STORED_PREFIXES for key, _ in live.registry.store.list(prefix)}
    return keys | {key for key, _ in live.registry.store.list(f"repositories/{repo}/")}


def byte_counters(live: LiveStack) -> dict[str, int]:
    counters = live.registry.index.counters()
    return {name: counters.get(name, 0) for name in ("logical_bytes", "stored_bytes")}


def wait_quiet(live: LiveStack, timeout: float = 120) -> None:
    """Until no job waits in any queue and no layer waits for ingestion: the work earlier
    tests left (ingests, retirements, rebuilds) would move the counters too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = any(live.registry.index.queue_length(q) for q in QUEUES)
        ingesting = "queued" in live.registry.index.layer_states().values()
        if not queued and not ingesting:
            time.sleep(1.5)  # the last job may still be running
            return
        time.sleep(0.3)


@contextmanager
def nothing_stored(live: LiveStack, repo: str) -> Iterator[None]:
    """Assert that the block adds no object and moves no byte counter."""
    wait_quiet(live)
    keys, counters = stored_keys(live, repo), byte_counters(live)
    yield
    added = stored_keys(live, repo) - keys
    assert not added, f"bad input stored {sorted(added)}"
    assert byte_counters(live) == counters


def raw_request(url: str, head: str, body: bytes) -> tuple[int, bytes]:
    """Send a request whose body may be shorter than it claims, then half-close."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line = reply.split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), reply


def test_wrong_digest_monolithic(client: RegistryClient, repo: str, live: LiveStack) -> None:
    client.push_blob(repo, b"seed")  # the repository exists, so only the blob is new
    with nothing_stored(live, repo):
        response = client.request(
            "POST", f"/v2/{repo}/blobs/uploads/", os.urandom(4000), digest=sha256(b"something else")
        )
        assert response.status == 400 and error_codes(response) == ["DIGEST_INVALID"]


def test_wrong_digest_after_chunks(client: RegistryClient, repo: str, live: LiveStack) -> None:
    client.push_blob(repo, b"seed")
    with nothing_stored(live, repo):
        location = client.request("POST", f"/v2/{repo}/blobs/uploads/").headers["Location"]
        client.request("PATCH", location, os.urandom(10_000))
        response = client.request("PUT", location, b"tail", digest=sha256(b"not it"))
        assert response.status == 400 and error_codes(response) == ["DIGEST_INVALID"]


def test_malformed_digests(client: RegistryClient, repo: str, live: LiveStack) -> None:
    client.push_blob(repo, b"seed")
    with nothing_stored(live, repo):
        for digest in ("sha256:xyz", "md5:" + "0" * 32, "sha256:" + "A" * 64, "nocolon", ""):
            response = client.request("POST", f"/v2/{repo}/blobs/uploads/", b"data", digest=digest)
            assert response.status == 400, digest
            assert error_codes(response) == ["DIGEST_INVALID"], digest
            get = client.request("GET", f"/v2/{repo}/blobs/{digest or 'x'}")
            assert get.status in (400, 404) and get.status != 500


def test_truncated_chunk_changes_nothing(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    location = client.request("POST", f"/v2/{repo}/blobs/uploads/").headers["Location"]
    client.request("PATCH", location, b"x" * 1000, {"Content-Range": "0-999"})
    with nothing_stored(live, repo):
        head = (
            f"PATCH {location} HTTP/1.1\r\nHost: registry\r\nContent-Length: 100000\r\n"
            "Content-Range: 1000-100999\r\nContent-Type: application/octet-stream\r\n"
        )
        status, _reply = raw_request(client.url, head, b"y" * 5000)
        assert status == 400
        state = client.request("GET", location)
        assert state.status == 204 and state.headers["Range"] == "0-999"
    data = b"x" * 1000 + b"z" * 10
    response = client.request("PUT", location, b"z" * 10, digest=sha256(data))
    assert response.status == 201
    assert client.request("GET", f"/v2/{repo}/blobs/{sha256(data)}").data == data


def test_huge_content_length(client: RegistryClient, repo: str, live: LiveStack) -> None:
    client.push_blob(repo, b"seed")
    with nothing_stored(live, repo):
        head = (
            f"POST /v2/{repo}/blobs/uploads/?digest={sha256(b'tiny')} HTTP/1.1\r\n"
            f"Host: registry\r\nContent-Length: {10**15}\r\n"
        )
        status, reply = raw_request(client.url, head, b"tiny")
        assert status == 413 and b"SIZE_INVALID" in reply
        head = (
            f"PUT /v2/{repo}/manifests/v1 HTTP/1.1\r\nHost: registry\r\n"
            f"Content-Type: {OCI_MANIFEST}\r\nContent-Length: {10**9}\r\n"
        )
        status, reply = raw_request(client.url, head, b"{}")
        assert status == 413 and b"SIZE_INVALID" in reply


def test_bad_manifests(client: RegistryClient, repo: str, live: LiveStack) -> None:
    config = b"{}"
    config_digest = client.push_blob(repo, config)
    good = image_manifest(config_digest, len(config), [])
    cases: list[tuple[bytes, str, str]] = [
        (b"{not json", OCI_MANIFEST, "MANIFEST_INVALID"),
        (b"[]", OCI_MANIFEST, "MANIFEST_INVALID"),
        (json.dumps(dict(good, schemaVersion=1)).encode(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (
            json.dumps(good).encode(),
            "application/vnd.docker.distribution.manifest.v2+json",
            "MANIFEST_INVALID",
        ),
        (
            json.dumps(dict(good, config={"digest": "sha256:bad"})).encode(),
            OCI_MANIFEST,
            "MANIFEST_INVALID",
        ),
        (json.dumps(dict(good, layers="nope")).encode(), OCI_MANIFEST, "MANIFEST_INVALID"),
        (
            json.dumps(image_manifest(config_digest, 2, [("sha256:" + "1" * 64, 5)])).encode(),
            OCI_MANIFEST,
            "MANIFEST_BLOB_UNKNOWN",
        ),
        (
            json.dumps(image_manifest("sha256:" + "2" * 64, 2, [])).encode(),
            OCI_MANIFEST,
            "MANIFEST_BLOB_UNKNOWN",
        ),
    ]
    with nothing_stored(live, repo):
        for body, content_type, code in cases:
            response = client.request(
                "PUT", f"/v2/{repo}/manifests/v1", body, {"Content-Type": content_type}
            )
            assert response.status in (400, 404), body
            assert error_codes(response) == [code], body
        wrong = client.request(
            "PUT",
            f"/v2/{repo}/manifests/{sha256(b'other')}",
            json.dumps(good).encode(),
            {"Content-Type": OCI_MANIFEST},
        )
        assert error_codes(wrong) == ["DIGEST_INVALID"]
        bad_tag = client.request(
            "PUT",
            f"/v2/{repo}/manifests/.hidden",
            json.dumps(good).encode(),
            {"Content-Type": OCI_MANIFEST},
        )
        assert error_codes(bad_tag) == ["TAG_INVALID"]
    unknown = client.request(
        "PUT",
        f"/v2/{repo}/manifests/v1",
        json.dumps(image_manifest(config_digest, 2, [("sha256:" + "1" * 64, 5)])).encode(),
        {"Content-Type": OCI_MANIFEST},
    )
    assert json.loads(unknown.data)["errors"][0]["detail"] == {"digest": "sha256:" + "1" * 64}


def test_invalid_names(client: RegistryClient) -> None:
    for name in ("UPPER/case", "a//b", "-lead", "trail-", "a" * 300, "x__-y", "a_.b"):
        response = client.request("GET", f"/v2/{name}/tags/list")
        assert response.status == 400, name
        assert error_codes(response) == ["NAME_INVALID"], name
        post = client.request("POST", f"/v2/{name}/blobs/uploads/")
        assert error_codes(post) == ["NAME_INVALID"], name


def test_bad_pagination_and_ranges(client: RegistryClient, repo: str) -> None:
    digest = client.push_blob(repo, b"0123456789")
    response = client.request("GET", "/v2/_catalog", n="-1")
    assert error_codes(response) == ["PAGINATION_NUMBER_INVALID"]
    odd = client.request("GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": "pages=1-2"})
    assert odd.status == 200 and odd.data == b"0123456789"
    unknown_upload = client.request("PATCH", f"/v2/{repo}/blobs/uploads/nope", b"x")
    assert error_codes(unknown_upload) == ["BLOB_UPLOAD_UNKNOWN"]
    other_repo = client.request("POST", f"/v2/{repo}/blobs/uploads/")
    stolen = other_repo.headers["Location"].replace(repo, repo + "x")
    assert error_codes(client.request("GET", stolen)) == ["BLOB_UPLOAD_UNKNOWN"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "schemaVersion",
                    "mediaType",
                    "config",
                    "layers",
                    "manifests",
                    "subject",
                    "digest",
                    "size",
                    "annotations",
                    "artifactType",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=15,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=JSON, content_type=st.sampled_from([OCI_MANIFEST, "text/plain", ""]))
def test_random_manifests_never_500(
    client: RegistryClient, body: object, content_type: str
) -> None:
    response = client.request(
        "PUT",
        "/v2/fuzz/manifests/latest",
        json.dumps(body).encode(),
        {"Content-Type": content_type},
    )
    assert response.status in (400, 404, 413), response.data
    assert error_codes(response)
