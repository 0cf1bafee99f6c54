"""A replay of the OCI distribution-spec conformance suite (github.com/opencontainers/
distribution-spec, `conformance/`, v1.1 line: 01_pull, 02_push, 03_discovery,
04_management with setup.go) against the live stack, since the Go suite cannot be built here.

Each category is one order-dependent test function, as the suite runs them: setup pushes,
then the checks, then the teardown deletes. The request shapes copy the suite's (methods,
headers, bodies as Go's net/http sends them: a body-less POST/PUT/PATCH goes out with
`Content-Length: 0`), and the accepted status sets are the suite's own, which are often
wider than what we send. Where we go beyond the suite (Docker-Content-Digest on every
response that names content, exact bodies, spec MUSTs it does not test) the assertion
says so. Defaults mirror an unconfigured run: OCI_DELETE_MANIFEST_BEFORE_BLOBS=true,
OCI_AUTOMATIC_CROSSMOUNT unset (its "disabled" variant is replayed as a check of ours),
OCI_SKIP_EMPTY_LAYER_PUSH_TEST unset (the empty-layer manifest must be accepted), no
OCI-Chunk-Min-Length (42-byte chunked blob split 22 + 20).

"""

from __future__ import annotations

import json
import os

import pytest

from tests.client import OCI_INDEX, OCI_MANIFEST, RegistryClient, sha256
from tests.clients.conformance import (
    ARTIFACT_TYPE_A,
    ARTIFACT_TYPE_B,
    NONEXISTENT_MANIFEST,
    OCTET,
    SUCCESS,
    TEST_TAG,
    Blob,
    SuiteData,
    assert_digest_header,
    blob_push,
    build_data,
    expect,
    go_descriptor,
    go_json,
    header,
    location,
    manifest_put,
    mount_url,
    run_discovery,
    run_management,
    run_pull,
    run_push,
    tags_of,
)


@pytest.fixture
def data() -> SuiteData:
    return build_data()


@pytest.mark.parametrize("delete_manifest_before_blobs", [True, False], ids=["mfirst", "bfirst"])
def test_pull_flow(
    client: RegistryClient, repo: str, data: SuiteData, delete_manifest_before_blobs: bool
) -> None:
    run_pull(client, repo, data, delete_manifest_before_blobs)


def test_nonexistent_manifest_is_404(client: RegistryClient, repo: str, data: SuiteData) -> None:
    blob_push(client, repo, data.configs[0], "setup config")
    blob_push(client, repo, data.layer, "setup layer")
    expect(manifest_put(client, repo, TEST_TAG, data.manifests[0]), SUCCESS, "setup manifest")
    for method in ("HEAD", "GET"):
        response = client.request(method, f"/v2/{repo}/manifests/{NONEXISTENT_MANIFEST}")
        expect(response, {404}, f"{method} nonexistent manifest")


def test_push_flow(client: RegistryClient, repo: str, data: SuiteData) -> None:
    run_push(client, repo, data)


@pytest.mark.parametrize("with_range", [True, False], ids=["content-range", "no-content-range"])
def test_push_chunked_final_put_with_body(
    client: RegistryClient, repo: str, data: SuiteData, with_range: bool
) -> None:
    """Pre-1.1 suite: 'PUT request with final chunk should return 201' (final chunk in PUT)."""
    start = client.request("POST", f"/v2/{repo}/blobs/uploads/", b"", {"Content-Length": "0"})
    first = client.request(
        "PATCH",
        location(start, "POST"),
        data.chunk1,
        {
            "Content-Type": OCTET,
            "Content-Length": str(len(data.chunk1)),
            "Content-Range": data.chunk1_range,
        },
    )
    expect(first, {202}, "chunk 1")
    headers = {"Content-Type": OCTET, "Content-Length": str(len(data.chunk2))}
    if with_range:
        headers["Content-Range"] = data.chunk2_range
    done = client.request(
        "PUT", location(first, "chunk 1"), data.chunk2, headers, digest=data.blob_b.digest
    )
    expect(done, {201}, "PUT with final chunk")
    assert location(done, "PUT") == f"/v2/{repo}/blobs/{data.blob_b.digest}"
    assert_digest_header(done, data.blob_b.digest, "PUT with final chunk")
    got = client.request("GET", f"/v2/{repo}/blobs/{data.blob_b.digest}")
    assert got.data == data.blob_b.content


def test_push_streamed_then_ranged_patch(client: RegistryClient, repo: str) -> None:
    """A PATCH without Content-Range followed by one with it continues at the right offset."""
    blob = Blob(os.urandom(5000))
    start = client.request("POST", f"/v2/{repo}/blobs/uploads/", b"")
    first = client.request(
        "PATCH", location(start, "POST"), blob.content[:3000], {"Content-Type": OCTET}
    )
    expect(first, {202}, "streamed PATCH")
    assert header(first, "Range") == "0-2999"
    second = client.request(
        "PATCH",
        location(first, "PATCH"),
        blob.content[3000:],
        {"Content-Type": OCTET, "Content-Range": "3000-4999", "Content-Length": "2000"},
    )
    expect(second, {202}, "ranged PATCH after streamed")
    assert header(second, "Range") == "0-4999"
    done = client.request("PUT", location(second, "PATCH"), b"", digest=blob.digest)
    expect(done, {201}, "closing PUT")
    assert client.request("GET", f"/v2/{repo}/blobs/{blob.digest}").data == blob.content


def test_push_empty_blob(client: RegistryClient, repo: str) -> None:
    """A zero-byte blob, monolithic and via an empty session; HEAD says Content-Length: 0."""
    empty = Blob(b"")
    post = client.request(
        "POST",
        f"/v2/{repo}/blobs/uploads/",
        b"",
        {"Content-Type": OCTET, "Content-Length": "0"},
        digest=empty.digest,
    )
    expect(post, {201}, "monolithic POST of the empty blob")
    assert_digest_header(post, empty.digest, "POST empty blob")
    session = client.request("POST", f"/v2/{repo}/blobs/uploads/", b"")
    put = client.request("PUT", location(session, "POST"), b"", digest=empty.digest)
    expect(put, {201}, "body-less PUT of the empty blob")
    head = expect(client.request("HEAD", f"/v2/{repo}/blobs/{empty.digest}"), {200}, "HEAD")
    assert header(head, "Content-Length") == "0"
    assert_digest_header(head, empty.digest, "HEAD empty blob")
    get = expect(client.request("GET", f"/v2/{repo}/blobs/{empty.digest}"), {200}, "GET")
    assert get.data == b""


# beyond the suite: spec v1.1 push rules it does not exercise
def test_closing_put_rejects_out_of_order_final_chunk(client: RegistryClient, repo: str) -> None:
    start = client.request("POST", f"/v2/{repo}/blobs/uploads/", b"")
    first = client.request(
        "PATCH", location(start, "POST"), b"abc", {"Content-Range": "0-2", "Content-Length": "3"}
    )
    expect(first, {202}, "chunk 0-2")
    done = client.request(
        "PUT",
        location(first, "PATCH"),
        b"def",
        {"Content-Type": OCTET, "Content-Range": "10-12", "Content-Length": "3"},
        digest=sha256(b"abcdef"),
    )
    expect(done, {416}, "closing PUT whose final chunk starts at 10, not 3")


def test_mount_from_invalid_name_falls_back_to_upload(
    client: RegistryClient, repo: str, data: SuiteData
) -> None:
    blob_push(client, repo, data.blob_a, "source blob")
    url = mount_url(f"{repo}-target", data.blob_a.digest, "Not_A_Valid_Name")
    response = client.request("POST", url, b"")
    expect(response, {202}, "mount from an invalid repository name")
    assert location(response, "mount fallback").startswith(f"/v2/{repo}-target/blobs/uploads/")


def test_discovery_flow(client: RegistryClient, repo: str, data: SuiteData) -> None:
    run_discovery(client, repo, data)


def test_referrers_descriptor_fields(client: RegistryClient, repo: str, data: SuiteData) -> None:
    """Spec MUSTs on the referrers list the suite does not check: artifactType is the
    manifest's artifactType, else config.mediaType; an index without one has none;
    an invalid digest is 400."""
    for blob in (data.ref_blob_a, data.empty_json, data.ref_blob_b):
        blob_push(client, repo, blob, "setup blob")
    refs = data.refs
    for name in ("a_config", "a_layer", "b_layer"):
        expect(manifest_put(client, repo, refs[name].digest, refs[name]), SUCCESS, name)
    plain_index = go_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [go_descriptor(OCI_MANIFEST, refs["b_layer"])],
            "subject": go_descriptor(OCI_MANIFEST, data.manifests[4]),
        }
    )
    put = manifest_put(client, repo, plain_index.digest, plain_index, OCI_INDEX)
    expect(put, SUCCESS, "index without artifactType")
    response = client.request("GET", f"/v2/{repo}/referrers/{data.manifests[4].digest}")
    found = {d["digest"]: d for d in json.loads(response.data)["manifests"]}
    assert found[refs["a_config"].digest]["artifactType"] == ARTIFACT_TYPE_A
    assert found[refs["a_config"].digest]["mediaType"] == OCI_MANIFEST
    assert found[refs["a_config"].digest]["size"] == len(refs["a_config"].content)
    assert found[refs["a_layer"].digest]["artifactType"] == ARTIFACT_TYPE_A
    assert found[refs["b_layer"].digest]["artifactType"] == ARTIFACT_TYPE_B
    assert "artifactType" not in found[plain_index.digest]
    assert found[plain_index.digest]["mediaType"] == OCI_INDEX
    bad = client.request("GET", f"/v2/{repo}/referrers/sha256:totallywrong")
    expect(bad, {400}, "referrers of an invalid digest")


def test_tags_list_last_forms(client: RegistryClient, repo: str, data: SuiteData) -> None:
    """`last` without `n`, `last` past the end, `last` not itself a tag, `n` past the end."""
    blob_push(client, repo, data.configs[0], "config")
    blob_push(client, repo, data.layer, "layer")
    for tag in ("b", "d", "f"):
        expect(manifest_put(client, repo, tag, data.manifests[0]), SUCCESS, f"tag {tag}")
    url = f"/v2/{repo}/tags/list"
    assert tags_of(client.request("GET", url, last="b")) == ["d", "f"]
    assert tags_of(client.request("GET", url, last="c")) == ["d", "f"]
    assert tags_of(client.request("GET", url, last="z")) == []
    everything = client.request("GET", url, n="10")
    assert tags_of(everything) == ["b", "d", "f"] and "Link" not in everything.headers
    page = client.request("GET", url, n="1", last="b")
    assert tags_of(page) == ["d"]
    assert header(page, "Link") == f'<{url}?n=1&last=d>; rel="next"'


def test_management_flow(client: RegistryClient, repo: str, data: SuiteData) -> None:
    run_management(client, repo, data)


def test_whole_suite_in_one_namespace(client: RegistryClient, repo: str) -> None:
    """The real run: one OCI_NAMESPACE, the four categories in order, state carried over."""
    data = build_data()
    run_pull(client, repo, data)
    run_push(client, repo, data)
    run_discovery(client, repo, data)
    run_management(client, repo, data)
