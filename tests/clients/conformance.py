"""The OCI distribution-spec conformance suite as data and runners (its request shapes
and accepted status sets), replayed by tests/clients/test_conformance.py and, behind
authentication, by tests/registry/test_auth.py."""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import string
import tarfile
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import urllib3

from tests.client import OCI_INDEX, OCI_MANIFEST, RegistryClient, sha256

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCTET = "application/octet-stream"
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
DUMMY_DIGEST = sha256(b"hello world")  # the suite's dummyDigest
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"  # the suite's nonexistentManifest
TEST_TAG = "tagtest0"
EMPTY_LAYER_TAG = "emptylayer"
ANNOTATION_KEY = "org.opencontainers.conformance.test"
ARTIFACT_TYPE_A = "application/vnd.nhl.peanut.butter.bagel"
ARTIFACT_TYPE_B = "application/vnd.nba.strawberry.jam.croissant"
ARTIFACT_TYPE_INDEX = "application/vnd.food.stand"
# setup.go errorCodes: a 400 body must carry one of these as errors[0].code
SUITE_ERROR_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_UNVERIFIED",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
}

SUCCESS = frozenset(range(200, 300))
SUCCESS_OR_405 = SUCCESS | {405}
SUCCESS_404_405 = SUCCESS | {404, 405}

Response = urllib3.BaseHTTPResponse


# test data, shaped like setup.go builds it (Go MarshalIndent with tabs, struct field order)
@dataclass(frozen=True)
class Blob:
    content: bytes

    @property
    def digest(self) -> str:
        return sha256(self.content)

    @property
    def length(self) -> str:
        return str(len(self.content))


def go_json(value: dict[str, Any]) -> Blob:
    return Blob(json.dumps(value, indent="\t").encode())


def go_descriptor(media_type: str, blob: Blob, **extra: Any) -> dict[str, Any]:
    """Go's descriptor: unknown `newUnspecifiedField` always present (null unless set)."""
    out: dict[str, Any] = {
        "mediaType": media_type,
        "digest": blob.digest,
        "size": len(blob.content),
    }
    out.update(extra)
    out.setdefault("newUnspecifiedField", None)
    return out


def go_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def random_blob(size: int, rng: random.Random) -> Blob:
    return Blob(bytes(rng.getrandbits(8) for _ in range(size)))


def layer_tarball() -> Blob:
    """A one-file tar.gz like the suite's layerBase64String (test.txt, one line)."""
    payload = b"you bothered to find out what was in here. Congratulations!\n"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        info = tarfile.TarInfo("test.txt")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return Blob(gzip.compress(raw.getvalue(), mtime=0))


@dataclass
class SuiteData:
    configs: list[Blob]
    layer: Blob
    manifests: list[Blob]
    empty_layer_manifest: Blob
    blob_a: Blob
    blob_b: Blob
    chunk1: bytes
    chunk2: bytes
    empty_json: Blob
    ref_blob_a: Blob
    ref_blob_b: Blob
    refs: dict[str, Blob] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def chunk1_range(self) -> str:
        return f"0-{len(self.chunk1) - 1}"

    @property
    def chunk2_range(self) -> str:
        return f"{len(self.chunk1)}-{len(self.blob_b.content) - 1}"

    def rechunk(self, size: int, rng: random.Random) -> None:
        """setupChunkedBlob: first chunk is size/2 + 1 bytes."""
        self.blob_b = random_blob(size, rng)
        self.chunk1 = self.blob_b.content[: size // 2 + 1]
        self.chunk2 = self.blob_b.content[size // 2 + 1 :]


def build_data(seed: int | None = None) -> SuiteData:
    rng = random.Random(seed)
    letters = string.ascii_letters + string.digits + "-"
    configs = []
    for _ in range(5):
        author = "".join(rng.choice(letters) for _ in range(16))
        configs.append(
            go_json(
                {
                    "author": author,
                    "architecture": "amd64",
                    "os": "linux",
                    "rootfs": {"type": "layers", "diff_ids": []},
                }
            )
        )
    layer = layer_tarball()

    def config_descriptor(config: Blob) -> dict[str, Any]:
        return go_descriptor(
            OCI_CONFIG,
            config,
            data=go_b64(config.content),
            newUnspecifiedField=go_b64(b"hello world"),
        )

    manifests = [
        go_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config_descriptor(config),
                "layers": [go_descriptor(OCI_LAYER_GZIP, layer)],
            }
        )
        for config in configs
    ]
    # no mediaType field, empty layers list: the push test's "manifest with no layers"
    empty_layer_manifest = go_json(
        {"schemaVersion": 2, "config": config_descriptor(configs[1]), "layers": []}
    )
    data = SuiteData(
        configs=configs,
        layer=layer,
        manifests=manifests,
        empty_layer_manifest=empty_layer_manifest,
        blob_a=random_blob(42, rng),
        blob_b=Blob(b""),
        chunk1=b"",
        chunk2=b"",
        empty_json=Blob(b"{}"),
        ref_blob_a=Blob(b"NHL Peanut Butter on my NHL bagel"),
        ref_blob_b=Blob(b"NBA Strawberry Jam on my NBA croissant"),
    )
    data.rechunk(42, rng)
    subject = go_descriptor(OCI_MANIFEST, manifests[4])
    missing_subject = go_descriptor(OCI_MANIFEST, manifests[3])
    empty = go_descriptor(OCI_EMPTY, data.empty_json)

    def artifact(
        name: str,
        annotation: str | None,
        config: dict[str, Any],
        layers: list[dict[str, Any]],
        subject_descriptor: dict[str, Any],
        artifact_type: str | None = None,
    ) -> None:
        body: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
        if artifact_type:
            body["artifactType"] = artifact_type
        body.update(config=config, layers=layers, subject=subject_descriptor)
        if annotation:
            body["annotations"] = {ANNOTATION_KEY: annotation}
        blob = go_json(body)
        data.refs[name] = blob
        if annotation:
            data.annotations[blob.digest] = annotation

    artifact(
        "a_config",
        "test config a",
        go_descriptor(ARTIFACT_TYPE_A, data.ref_blob_a),
        [empty],
        subject,
    )
    artifact(
        "b_config",
        "test config b",
        go_descriptor(ARTIFACT_TYPE_B, data.ref_blob_b),
        [empty],
        subject,
    )
    artifact(
        "a_layer",
        "test layer a",
        empty,
        [go_descriptor(ARTIFACT_TYPE_A, data.ref_blob_a)],
        subject,
        ARTIFACT_TYPE_A,
    )
    artifact(
        "b_layer",
        "test layer b",
        empty,
        [go_descriptor(ARTIFACT_TYPE_B, data.ref_blob_b)],
        subject,
        ARTIFACT_TYPE_B,
    )
    artifact(
        "c_layer",
        None,
        empty,
        [go_descriptor(ARTIFACT_TYPE_B, data.ref_blob_b)],
        missing_subject,
        ARTIFACT_TYPE_B,
    )
    index = go_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "artifactType": ARTIFACT_TYPE_INDEX,
            "manifests": [
                go_descriptor(OCI_MANIFEST, data.refs["a_config"]),
                go_descriptor(OCI_MANIFEST, data.refs["a_layer"]),
            ],
            "subject": subject,
            "annotations": {ANNOTATION_KEY: "test index"},
        }
    )
    data.refs["index"] = index
    data.annotations[index.digest] = "test index"
    return data


# request helpers
def expect(response: Response, allowed: Collection[int], what: str) -> Response:
    extra = sorted(set(allowed) - SUCCESS)
    wanted = f"2xx or {extra}" if set(allowed) >= SUCCESS else str(sorted(allowed))
    assert response.status in allowed, (
        f"{what}: expected {wanted}, got {response.status} {response.data[:300]!r}"
    )
    return response


def header(response: Response, name: str) -> str:
    return str(response.headers.get(name) or "")


def location(response: Response, what: str) -> str:
    value = header(response, "Location")
    assert value, f"{what}: no Location header"
    return value


def blob_push(client: RegistryClient, name: str, blob: Blob, what: str) -> Response:
    """The suite's setup push: POST for a session, then PUT the whole blob to it."""
    start = client.request("POST", f"/v2/{name}/blobs/uploads/", b"")
    done = client.request(
        "PUT",
        location(start, what),
        blob.content,
        {"Content-Type": OCTET, "Content-Length": blob.length},
        digest=blob.digest,
    )
    return expect(done, SUCCESS, what)


def manifest_put(
    client: RegistryClient, name: str, reference: str, blob: Blob, media_type: str = OCI_MANIFEST
) -> Response:
    return client.request(
        "PUT", f"/v2/{name}/manifests/{reference}", blob.content, {"Content-Type": media_type}
    )


def mount_url(name: str, digest: str, source: str) -> str:
    return f"/v2/{name}/blobs/uploads/?" + urlencode({"mount": digest, "from": source})


def tags_of(response: Response) -> list[str]:
    return [str(tag) for tag in json.loads(response.data).get("tags") or []]


def assert_digest_header(response: Response, digest: str, what: str) -> None:
    """Stricter than the suite (which checks only when present): we always send it."""
    assert header(response, "Docker-Content-Digest") == digest, f"{what}: Docker-Content-Digest"


# 01 pull
def run_pull(
    client: RegistryClient, repo: str, data: SuiteData, delete_manifest_before_blobs: bool = True
) -> None:
    # Setup: configs[0], configs[1], layer by POST+PUT; manifests[0] by tag, [1] by digest
    for blob in (data.configs[0], data.configs[1], data.layer):
        blob_push(client, repo, blob, "setup blob")
    m0, m1 = data.manifests[0], data.manifests[1]
    expect(manifest_put(client, repo, TEST_TAG, m0), SUCCESS, "setup manifest[0] by tag")
    expect(manifest_put(client, repo, m1.digest, m1), SUCCESS, "setup manifest[1] by digest")

    # Pull blobs
    blobs = f"/v2/{repo}/blobs"
    expect(client.request("HEAD", f"{blobs}/{DUMMY_DIGEST}"), {404}, "HEAD nonexistent blob")
    config = data.configs[0]
    head = expect(client.request("HEAD", f"{blobs}/{config.digest}"), {200}, "HEAD blob")
    assert_digest_header(head, config.digest, "HEAD blob")
    assert header(head, "Content-Length") == config.length and head.data == b""
    expect(client.request("GET", f"{blobs}/{DUMMY_DIGEST}"), {404}, "GET nonexistent blob")
    get = expect(client.request("GET", f"{blobs}/{config.digest}"), {200}, "GET blob")
    assert get.data == config.content
    assert_digest_header(get, config.digest, "GET blob")

    # Pull manifests (the nonexistent-reference checks are test_nonexistent_manifest_is_404)
    accept = {"Accept": OCI_MANIFEST}
    path = f"/v2/{repo}/manifests"
    for reference, manifest in ((m0.digest, m0), (m1.digest, m1), (TEST_TAG, m0)):
        head = expect(
            client.request("HEAD", f"{path}/{reference}", headers=accept), {200}, "HEAD manifest"
        )
        assert_digest_header(head, manifest.digest, f"HEAD manifest {reference}")
        assert header(head, "Content-Length") == manifest.length and head.data == b""
        get = expect(
            client.request("GET", f"{path}/{reference}", headers=accept), {200}, "GET manifest"
        )
        assert get.data == manifest.content, "the manifest must come back byte for byte"
        assert header(get, "Content-Type") == OCI_MANIFEST
        assert_digest_header(get, manifest.digest, f"GET manifest {reference}")

    # Error codes: v1.1 sends GET (older suites PUT) to sha256:totallywrong with a junk body
    for method in ("GET", "PUT"):
        response = expect(
            client.request(
                method,
                f"{path}/sha256:totallywrong",
                b"blablabla",
                {"Content-Type": OCI_MANIFEST},
            ),
            {400, 404},
            f"{method} manifest sha256:totallywrong",
        )
        if response.status == 400:
            errors = json.loads(response.data)["errors"]
            assert errors and errors[0]["code"] in SUITE_ERROR_CODES

    # Teardown
    def delete_manifests() -> None:
        for manifest in (m0, m1):
            response = client.request("DELETE", f"{path}/{manifest.digest}")
            expect(response, SUCCESS_OR_405, "teardown manifest delete")

    if delete_manifest_before_blobs:
        delete_manifests()
    for blob in (data.configs[0], data.configs[1], data.layer):
        response = client.request("DELETE", f"{blobs}/{blob.digest}")
        expect(response, SUCCESS_404_405, "teardown blob delete")
    if not delete_manifest_before_blobs:
        delete_manifests()


# 02 push
def run_push(client: RegistryClient, repo: str, data: SuiteData) -> None:
    uploads = f"/v2/{repo}/blobs/uploads/"
    blobs = f"/v2/{repo}/blobs"

    # Blob Upload Streamed: PATCH without Content-Range, then a body-less PUT
    start = client.request("POST", uploads, b"")
    patch = client.request(
        "PATCH", location(start, "POST"), data.blob_a.content, {"Content-Type": OCTET}
    )
    expect(patch, {202}, "streamed PATCH")
    assert header(patch, "Range") == f"0-{len(data.blob_a.content) - 1}"  # spec MUST, not suite
    done = client.request(
        "PUT",
        location(patch, "streamed PATCH"),
        b"",
        {"Content-Type": OCTET, "Content-Length": "0"},
        digest=data.blob_a.digest,
    )
    expect(done, {201}, "streamed closing PUT")
    assert location(done, "streamed PUT") == f"{blobs}/{data.blob_a.digest}"
    assert_digest_header(done, data.blob_a.digest, "streamed PUT 201")

    # Blob Upload Monolithic
    expect(client.request("GET", f"{blobs}/{DUMMY_DIGEST}"), {404}, "GET nonexistent blob")
    config = data.configs[1]
    headers = {"Content-Type": OCTET, "Content-Length": config.length}
    post = client.request("POST", uploads, config.content, headers, digest=config.digest)
    expect(post, {201, 202}, "POST with digest and blob")
    location(post, "POST with digest")
    if post.status == 201:
        assert_digest_header(post, config.digest, "POST with digest 201")
    get = client.request("GET", f"{blobs}/{config.digest}")
    expect(get, {200} if post.status == 201 else {404}, "GET blob after POST with digest")
    session = expect(client.request("POST", uploads, b""), {202}, "POST for a session ID")
    put = client.request(
        "PUT", location(session, "POST"), config.content, headers, digest=config.digest
    )
    expect(put, {201}, "PUT upload of a blob")
    location(put, "PUT upload")
    assert_digest_header(put, config.digest, "PUT upload 201")
    expect(client.request("GET", f"{blobs}/{config.digest}"), {200}, "GET existing blob")
    session = client.request("POST", uploads, b"")
    put = client.request(
        "PUT",
        location(session, "POST"),
        data.layer.content,
        {"Content-Type": OCTET, "Content-Length": data.layer.length},
        digest=data.layer.digest,
    )
    expect(put, {201}, "PUT upload of a layer blob")
    location(put, "PUT layer")
    expect(client.request("GET", f"{blobs}/{data.layer.digest}"), {200}, "GET existing layer")

    # Blob Upload Chunked
    first = client.request("POST", uploads, b"", {"Content-Length": "0"})
    min_length = header(first, "OCI-Chunk-Min-Length")
    if min_length and int(min_length) > len(data.chunk1):
        data.rechunk(int(min_length) * 2 - 2, random.Random())

    def chunk(url: str, body: bytes, content_range: str) -> Response:
        return client.request(
            "PATCH",
            url,
            body,
            {
                "Content-Type": OCTET,
                "Content-Length": str(len(body)),
                "Content-Range": content_range,
            },
        )

    out_of_order = chunk(location(first, "POST"), data.chunk2, data.chunk2_range)
    expect(out_of_order, {416}, "out-of-order PATCH")
    prev = client.request("POST", uploads, b"", {"Content-Length": "0"})
    prev_location = location(prev, "POST")
    first_chunk = expect(chunk(prev_location, data.chunk1, data.chunk1_range), {202}, "chunk 1")
    assert header(first_chunk, "Range") == data.chunk1_range
    retry = chunk(prev_location, data.chunk1, data.chunk1_range)
    expect(retry, {416}, "retry of chunk 1")
    status = expect(client.request("GET", prev_location), {204}, "GET stale upload")
    location(status, "GET upload status")
    assert header(status, "Range") == data.chunk1_range
    second = chunk(location(status, "GET status"), data.chunk2, data.chunk2_range)
    expect(second, {202}, "chunk 2")
    done = client.request(
        "PUT",
        location(second, "chunk 2"),
        b"",
        {"Content-Type": OCTET, "Content-Length": "0"},
        digest=data.blob_b.digest,
    )
    expect(done, {201}, "closing PUT with digest")
    location(done, "closing PUT")
    assert_digest_header(done, data.blob_b.digest, "closing PUT 201")
    assert client.request("GET", f"{blobs}/{data.blob_b.digest}").data == data.blob_b.content

    # Cross-Repository Blob Mount (crossmount namespace is conformance-<uuid> by default)
    other = f"conformance-{uuid.uuid4()}"
    no_from = client.request("POST", f"/v2/{other}/blobs/uploads/", b"", mount=DUMMY_DIGEST)
    expect(no_from, {202}, "mount without from")
    location(no_from, "mount without from")
    mount = client.request("POST", mount_url(other, data.blob_a.digest, repo), b"")
    expect(mount, {201, 202}, "mount with from")
    if mount.status == 201:
        assert location(mount, "mount") == f"/v2/{other}/blobs/{data.blob_a.digest}"
        assert_digest_header(mount, data.blob_a.digest, "mount 201")
        expect(client.request("GET", location(mount, "mount")), {200}, "GET mounted blob")
        # OCI_AUTOMATIC_CROSSMOUNT=false variant (skipped when unset): no `from` -> 202
        auto = client.request("POST", f"/v2/{other}/blobs/uploads/", b"", mount=data.blob_a.digest)
        expect(auto, {202}, "mount without from, automatic crossmount disabled")
    else:
        assert location(mount, "mount").startswith(f"/v2/{other}/blobs/uploads/")

    # Manifest Upload (nonexistent GET is test_nonexistent_manifest_is_404)
    manifest = data.manifests[1]
    for number in range(4):
        put = manifest_put(client, repo, f"test{number}", manifest)
        expect(put, {201}, f"PUT manifest test{number}")
        location(put, "PUT manifest")
        assert_digest_header(put, manifest.digest, "PUT manifest 201")
    empty_layer = manifest_put(client, repo, EMPTY_LAYER_TAG, data.empty_layer_manifest)
    expect(empty_layer, {201}, "manifest with no layers")  # suite warns; pre-1.1 requires 201
    location(empty_layer, "empty-layer manifest")
    get = client.request(
        "GET", f"/v2/{repo}/manifests/{manifest.digest}", headers={"Accept": OCI_MANIFEST}
    )
    expect(get, {200}, "GET manifest by digest")

    # Teardown (OCI_DELETE_MANIFEST_BEFORE_BLOBS default true)
    for digest in (manifest.digest, data.empty_layer_manifest.digest):
        deleted = client.request("DELETE", f"/v2/{repo}/manifests/{digest}")
        expect(deleted, SUCCESS_OR_405, "teardown manifest delete")
    for digest in (config.digest, data.layer.digest):
        deleted = client.request("DELETE", f"{blobs}/{digest}")
        expect(deleted, SUCCESS_404_405, "teardown blob delete")


# 03 content discovery
def run_discovery(client: RegistryClient, repo: str, data: SuiteData) -> None:
    path = f"/v2/{repo}/manifests"
    refs = data.refs
    subject = data.manifests[4].digest

    # Setup: tags test0..3 on manifests[2]
    blob_push(client, repo, data.configs[2], "setup config[2]")
    blob_push(client, repo, data.layer, "setup layer")
    for number in range(4):
        put = manifest_put(client, repo, f"test{number}", data.manifests[2])
        expect(put, SUCCESS, f"setup tag test{number}")

    # References setup: some referrers before their subject exists, some after
    assert data.empty_json.digest == EMPTY_JSON_DIGEST
    blob_push(client, repo, data.empty_json, "empty JSON blob")
    blob_push(client, repo, data.ref_blob_a, "ref blob A")

    def put_referrer(name: str, media_type: str, expected_subject: str) -> None:
        put = manifest_put(client, repo, refs[name].digest, refs[name], media_type)
        expect(put, SUCCESS, f"PUT referrer {name}")
        assert header(put, "OCI-Subject") == expected_subject, f"OCI-Subject of {name}"
        assert_digest_header(put, refs[name].digest, f"PUT referrer {name}")

    put_referrer("a_config", OCI_MANIFEST, subject)
    put_referrer("a_layer", OCI_MANIFEST, subject)
    put_referrer("index", OCI_INDEX, subject)
    blob_push(client, repo, data.configs[4], "setup config[4]")
    blob_push(client, repo, data.layer, "setup layer again")
    expect(manifest_put(client, repo, TEST_TAG, data.manifests[4]), SUCCESS, "subject manifest")
    blob_push(client, repo, data.ref_blob_b, "ref blob B")
    put_referrer("b_config", OCI_MANIFEST, subject)
    put_referrer("b_layer", OCI_MANIFEST, subject)
    put_referrer("c_layer", OCI_MANIFEST, data.manifests[3].digest)

    # Listing tags
    listing = expect(client.request("GET", f"/v2/{repo}/tags/list"), {200}, "tags list")
    tags = tags_of(listing)
    assert {"test0", "test1", "test2", "test3", TEST_TAG} <= set(tags)
    assert tags == sorted(tags), "tags are listed in lexical order"
    half = len(tags) // 2
    page = expect(client.request("GET", f"/v2/{repo}/tags/list", n=str(half)), {200}, "n")
    first_page = tags_of(page)
    assert len(first_page) == half
    last = first_page[half - 1]
    page = client.request("GET", f"/v2/{repo}/tags/list", n=str(half), last=last)
    expect(page, {200}, "n and last")
    assert len(tags_of(page)) <= half and last not in tags_of(page)
    assert tags_of(page) == tags[half : 2 * half]

    # Listing referrers
    def referrers(digest: str, **query: str) -> tuple[Response, list[dict[str, Any]]]:
        url = f"/v2/{repo}/referrers/{digest}"
        if query:
            url += "?" + urlencode(query)
        response = client.request("GET", url)
        expect(response, {200}, f"referrers of {digest}")
        assert header(response, "Content-Type") == OCI_INDEX
        body = json.loads(response.data)
        return response, list(body["manifests"])

    _, found = referrers(DUMMY_DIGEST)
    assert found == []
    _, found = referrers(subject)
    assert len(found) == 5
    assert found[0]["digest"] != found[1]["digest"]
    for descriptor in found:
        assert descriptor["annotations"] == {ANNOTATION_KEY: data.annotations[descriptor["digest"]]}
    response, found = referrers(subject, artifactType=ARTIFACT_TYPE_A)
    if header(response, "OCI-Filters-Applied"):
        assert header(response, "OCI-Filters-Applied") == "artifactType"
        assert {d["digest"] for d in found} == {refs["a_config"].digest, refs["a_layer"].digest}
    else:
        assert len(found) == 5
    for descriptor in found:
        assert descriptor["annotations"] == {ANNOTATION_KEY: data.annotations[descriptor["digest"]]}
    _, found = referrers(data.manifests[3].digest)
    assert [d["digest"] for d in found] == [refs["c_layer"].digest]

    # Teardown (manifests first): DELETE .../manifests/<ref> for digests and the tag name
    references = [
        refs["index"].digest,
        data.manifests[2].digest,
        subject,
        refs["a_config"].digest,
        refs["a_layer"].digest,
        TEST_TAG,
        refs["b_config"].digest,
        refs["b_layer"].digest,
        refs["c_layer"].digest,
    ]
    for reference in references:
        deleted = client.request("DELETE", f"{path}/{reference}")
        expect(deleted, SUCCESS_404_405, f"teardown delete {reference}")
    for blob in (data.configs[2], data.layer):
        deleted = client.request("DELETE", f"/v2/{repo}/blobs/{blob.digest}")
        expect(deleted, SUCCESS_OR_405, "teardown blob delete")  # 404 not accepted here
    for blob in (data.configs[4], data.ref_blob_a, data.ref_blob_b, data.empty_json):
        deleted = client.request("DELETE", f"/v2/{repo}/blobs/{blob.digest}")
        expect(deleted, SUCCESS_404_405, "references teardown blob delete")
    _, found = referrers(subject)
    assert found == [], "deleting the referrers empties the list"


# 04 content management
def run_management(client: RegistryClient, repo: str, data: SuiteData) -> None:
    config, manifest = data.configs[3], data.manifests[3]
    blob_push(client, repo, config, "setup config[3]")
    blob_push(client, repo, data.layer, "setup layer")
    expect(manifest_put(client, repo, TEST_TAG, manifest), SUCCESS, "setup tag")
    listing = expect(client.request("GET", f"/v2/{repo}/tags/list"), {200}, "tags before")
    count = len(tags_of(listing))

    # Manifest delete
    deleted = client.request("DELETE", f"/v2/{repo}/manifests/{TEST_TAG}")
    expect(deleted, {400, 202, 405}, "DELETE tag")
    if deleted.status == 400:
        assert json.loads(deleted.data)["errors"][0]["code"] == "UNSUPPORTED"
    # beyond the suite: a tag delete leaves the manifest reachable by digest
    still = client.request("HEAD", f"/v2/{repo}/manifests/{manifest.digest}")
    expect(still, {200}, "manifest after its tag was deleted")
    deleted = client.request("DELETE", f"/v2/{repo}/manifests/{manifest.digest}")
    expect(deleted, {202, 404}, "DELETE manifest by digest")
    gone = client.request("GET", f"/v2/{repo}/manifests/{manifest.digest}")
    expect(gone, {404, 200}, "GET deleted manifest")
    assert gone.status == 404, "ours deletes, so it must be gone"
    listing = expect(client.request("GET", f"/v2/{repo}/tags/list"), {200}, "tags after")
    assert len(tags_of(listing)) < count

    # Blob delete
    for blob in (config, data.layer):
        deleted = client.request("DELETE", f"/v2/{repo}/blobs/{blob.digest}")
        expect(deleted, {202, 404, 405}, "DELETE blob")
    expect(client.request("GET", f"/v2/{repo}/blobs/{config.digest}"), {404}, "GET deleted blob")
