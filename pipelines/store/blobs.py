"""Blobs and their uploads.

A blob is stored as a descriptor `blobs/<alg>/<hex>` (JSON) naming the data objects that
hold its bytes in order. An upload writes each chunk straight into a data object
`data/<upload-id>/<n>`; committing the upload only writes the descriptor, so no byte is
copied at commit time. Upload state (offset, data objects, saved SHA-256 state) is kept
in S3 and cached in Redis, so any API process can take the next chunk.

Garbage collection reads these objects (pipelines/registry/gc.py): a data object is named by its
upload's state until its descriptor names it (the descriptor is written first, the state
deleted after), and one nothing names is left alone for an upload's longest life
(DUPHUNTER_UPLOAD_TTL_SECONDS) plus the grace; a link written within the grace window
keeps a blob alive. An upload or a mount of a blob that exists relies on it only after
linking it and finding no notice that GC is deleting it (pipelines.store.deletion).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from pipelines.errors import RegistryError, unknown
from pipelines.formats.digests import Digest, ResumableSha256, digest_key
from pipelines.store.deletion import Notices
from pipelines.store.index import Index
from pipelines.store.storage import ObjectNotFound, ObjectStore

DESCRIPTOR_FORMAT = 1
NOTICE_WAIT_SECONDS = 30.0  # how long a relier waits for GC to finish with a blob


class BodyError(Exception):
    """The request body ended early or ran past its limit."""


@dataclass
class Segment:
    key: str
    size: int


def _segments_json(segments: list[Segment]) -> list[dict[str, Any]]:
    return [{"key": segment.key, "size": segment.size} for segment in segments]


def _segments_from_json(data: list[dict[str, Any]]) -> list[Segment]:
    return [Segment(item["key"], int(item["size"])) for item in data]


@dataclass
class BlobInfo:
    """Where a blob's bytes are: intact in data objects, or rebuilt from a recipe."""

    digest: str
    size: int
    segments: list[Segment]
    recipe: str | None = None  # S3 key of the layer recipe once deduplicated
    encoder: str = ""
    retired: list[Segment] = field(default_factory=list)  # intact copy awaiting deletion

    # A deduplicated blob may keep `segments` too: the intact replica of a hot layer.

    @property
    def deduplicated(self) -> bool:
        return self.recipe is not None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": DESCRIPTOR_FORMAT,
            "size": self.size,
            "segments": _segments_json(self.segments),
        }
        if self.recipe is not None:
            data["recipe"] = self.recipe
            data["encoder"] = self.encoder
            data["retired"] = _segments_json(self.retired)
        return data

    @classmethod
    def from_json(cls, digest: str, data: dict[str, Any]) -> BlobInfo:
        return cls(
            digest,
            int(data["size"]),
            _segments_from_json(data["segments"]),
            data.get("recipe"),
            data.get("encoder", ""),
            _segments_from_json(data.get("retired", [])),
        )


@dataclass
class UploadState:
    upload_id: str
    repo: str
    offset: int = 0
    segments: list[Segment] = field(default_factory=list)
    sha256_state: str = ""
    started: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "offset": self.offset,
            "segments": _segments_json(self.segments),
            "sha256_state": self.sha256_state,
            "started": self.started,
        }

    @classmethod
    def from_json(cls, upload_id: str, data: dict[str, Any]) -> UploadState:
        return cls(
            upload_id,
            data["repo"],
            int(data["offset"]),
            _segments_from_json(data["segments"]),
            data["sha256_state"],
            float(data["started"]),
        )


class _HashingReader:
    """Reads a request body into S3 while hashing it and holding it to its limits."""

    def __init__(self, body: IO[bytes], hasher: ResumableSha256, exact: int | None, limit: int):
        self.body = body
        self.hasher = hasher
        self.exact = exact
        self.limit = limit
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        want = 1 << 20 if size is None or size < 0 else size
        if self.exact is not None:
            want = min(want, self.exact - self.count)
            if want == 0:
                return b""
        data = self.body.read(want)
        if not data and self.exact is not None and self.count < self.exact:
            raise BodyError(f"body ended after {self.count} of {self.exact} bytes")
        self.count += len(data)
        if self.count > self.limit:
            raise BodyError(f"body exceeds the {self.limit}-byte limit")
        self.hasher.update(data)
        return data


def _check_offset(state: UploadState, start: int | None) -> None:
    if start is not None and start != state.offset:
        raise RegistryError(
            "BLOB_UPLOAD_INVALID",
            "chunk out of order",
            {"expected_offset": state.offset, "got": start},
            status=416,
        )


def blob_key(digest: str) -> str:
    return digest_key("blobs", digest)


def layer_link_key(repo: str, digest: str) -> str:
    return digest_key(f"repositories/{repo}/_layers", digest)


class BlobStore:
    def __init__(self, store: ObjectStore, index: Index, max_blob_bytes: int, upload_ttl: int):
        self.store = store
        self.index = index
        self.max_blob_bytes = max_blob_bytes
        self.upload_ttl = upload_ttl
        self.notices = Notices(store)

    # reading
    def info(self, digest: str) -> BlobInfo | None:
        cached = self.index.blob(digest)
        if cached is not None:
            return BlobInfo.from_json(digest, cached)
        return self.stored_info(digest)

    def stored_info(self, digest: str) -> BlobInfo | None:
        """The descriptor as S3 holds it (the truth), refreshing the index's copy."""
        try:
            data = json.loads(self.store.get_bytes(blob_key(digest)))
        except ObjectNotFound:
            return None
        self.index.put_blob(digest, data)
        return BlobInfo.from_json(digest, data)

    def replace_descriptor(self, info: BlobInfo) -> None:
        """Switch a stored blob to a new descriptor: S3 first, then the index."""
        data = info.to_json()
        self.store.put_bytes(blob_key(info.digest), json.dumps(data).encode())
        self.index.put_blob(info.digest, data)

    def linked_info(self, repo: str, digest: str) -> BlobInfo:
        """The blob as seen from `repo`: BLOB_UNKNOWN unless linked there (or while
        garbage collection deletes it); IndexIncomplete while the index may not know it."""
        Digest.parse(digest)
        info = self.info(digest) if self.index.is_layer_linked(repo, digest) else None
        if info is None:
            detail = {"digest": digest}
            raise unknown("BLOB_UNKNOWN", "blob unknown to registry", detail, self.index.is_ready())
        return info

    def read(self, info: BlobInfo, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Stream `length` bytes of an intact blob from `offset`, across its data objects.
        A deduplicated blob is read through `Registry.read_blob`, which restores it."""
        if info.deduplicated and not info.segments:
            raise ValueError(f"{info.digest} is deduplicated: it has no data objects to read")
        end = info.size if length is None else offset + length
        position = 0
        for segment in info.segments:
            seg_start, seg_end = position, position + segment.size
            position = seg_end
            if seg_end <= offset or seg_start >= end:
                continue
            start_in = max(offset, seg_start) - seg_start
            stop_in = min(end, seg_end) - seg_start
            yield from self.store.iter_range(segment.key, start_in, stop_in - start_in)

    # linking
    def link(self, repo: str, digest: str) -> None:
        self.store.put_bytes(layer_link_key(repo, digest), b"")
        self.index.link_layer(repo, digest)

    def unlink(self, repo: str, digest: str) -> None:
        Digest.parse(digest)
        if not self.index.is_layer_linked(repo, digest):
            raise RegistryError("BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest})
        self.store.delete([layer_link_key(repo, digest)])
        self.index.unlink_layer(repo, digest)

    def mount(self, repo: str, digest: str, source_repo: str) -> bool:
        """Link a blob that `source_repo` already has; False when it has not (or GC took
        it meanwhile): the client uploads it instead."""
        if not self.index.is_layer_linked(source_repo, digest) or self.info(digest) is None:
            return False
        self.link(repo, digest)
        if self.still_stored(digest):
            return True
        self.unlink(repo, digest)
        return False

    def still_stored(self, digest: str) -> bool:
        """After the caller made its reliance on a blob visible to GC (a link, a revision):
        whether the blob may be relied on. Waits while a GC run is deleting it; UNAVAILABLE
        if that takes longer than NOTICE_WAIT_SECONDS."""
        if self.notices.wait_until_clear(NOTICE_WAIT_SECONDS, blobs=[digest]):
            raise RegistryError("UNAVAILABLE", "the blob is being garbage-collected")
        return self.store.size(blob_key(digest)) is not None

    # uploads
    def start_upload(self, repo: str) -> UploadState:
        state = UploadState(uuid.uuid4().hex, repo, sha256_state=ResumableSha256().state().hex())
        self._save_upload(state)
        return state

    def upload(self, repo: str, upload_id: str) -> UploadState:
        data = self.index.upload(upload_id)
        if data is None:
            try:
                data = json.loads(self.store.get_bytes(f"uploads/{upload_id}"))
            except (ObjectNotFound, ValueError):
                data = None
        if data is None or data["repo"] != repo:
            raise RegistryError(
                "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry", {"uuid": upload_id}
            )
        return UploadState.from_json(upload_id, data)

    def append(
        self, repo: str, upload_id: str, body: IO[bytes], length: int | None, start: int | None
    ) -> UploadState:
        """Add one chunk. `start` is the Content-Range start the client claimed, if any."""
        with self._upload_lock(upload_id):
            state = self.upload(repo, upload_id)
            _check_offset(state, start)
            self._write_chunk(state, body, length)
            self._save_upload(state)
            return state

    def commit(
        self,
        repo: str,
        upload_id: str,
        digest: str,
        body: IO[bytes],
        length: int | None,
        start: int | None = None,
    ) -> BlobInfo:
        """Take an optional last chunk (starting at `start` if the client said so), verify
        the digest, and make the blob visible."""
        Digest.parse(digest)
        with self._upload_lock(upload_id):
            state = self.upload(repo, upload_id)
            _check_offset(state, start)
            return self._finish(state, digest, body, length)

    def put_monolithic(
        self, repo: str, digest: str, body: IO[bytes], length: int | None
    ) -> BlobInfo:
        """A whole blob in one request: no upload state is ever saved."""
        Digest.parse(digest)
        state = UploadState(uuid.uuid4().hex, repo, sha256_state=ResumableSha256().state().hex())
        return self._finish(state, digest, body, length)

    def _finish(
        self, state: UploadState, digest: str, body: IO[bytes], length: int | None
    ) -> BlobInfo:
        if length != 0:
            self._write_chunk(state, body, length)
        actual = self._digest_of(state, digest.split(":", 1)[0])
        if actual != digest:
            self._forget_upload(state)
            self._discard(state.segments)
            raise RegistryError(
                "DIGEST_INVALID",
                "provided digest did not match uploaded content",
                {"expected": digest, "actual": actual},
            )
        info = self._store_descriptor(state.repo, BlobInfo(digest, state.offset, state.segments))
        self._forget_upload(state)  # the descriptor names the data objects now (or dropped them)
        return info

    def cancel(self, repo: str, upload_id: str) -> None:
        with self._upload_lock(upload_id):
            state = self.upload(repo, upload_id)
            self._forget_upload(state)
            self._discard(state.segments)

    def purge_stale_uploads(self, older_than: float) -> int:
        """Cancel uploads started before `older_than` (epoch seconds); returns how many."""
        purged = 0
        for key, _size in list(self.store.list("uploads/")):
            upload_id = key.rsplit("/", 1)[-1]
            try:
                data = json.loads(self.store.get_bytes(key))
            except (ObjectNotFound, ValueError):
                continue
            if float(data.get("started", 0)) < older_than:
                self.cancel(data["repo"], upload_id)
                purged += 1
        return purged

    def _write_chunk(self, state: UploadState, body: IO[bytes], length: int | None) -> None:
        if length is not None and state.offset + length > self.max_blob_bytes:
            raise RegistryError("SIZE_INVALID", "blob exceeds the size limit", status=413)
        hasher = ResumableSha256(bytes.fromhex(state.sha256_state))
        reader = _HashingReader(body, hasher, length, self.max_blob_bytes - state.offset)
        key = f"data/{state.upload_id}/{len(state.segments):06d}"
        try:
            self.store.put_stream(key, reader, length)
        except BodyError as error:
            self.store.delete([key])
            raise RegistryError("SIZE_INVALID", str(error), status=400) from error
        if reader.count == 0:
            self.store.delete([key])
            return
        state.segments.append(Segment(key, reader.count))
        state.offset += reader.count
        state.sha256_state = hasher.state().hex()
        self.index.add_bytes(stored=reader.count)

    def _digest_of(self, state: UploadState, algorithm: str) -> str:
        if algorithm == "sha256":
            return "sha256:" + ResumableSha256(bytes.fromhex(state.sha256_state)).hexdigest()
        hasher = hashlib.new(algorithm)
        for chunk in self.read(BlobInfo("", state.offset, state.segments)):
            hasher.update(chunk)
        return f"{algorithm}:{hasher.hexdigest()}"

    def _store_descriptor(self, repo: str, info: BlobInfo) -> BlobInfo:
        """Record the blob and link it into `repo`. If S3 holds the blob already, the new
        copy is dropped, but only once the existing one may be relied on; if GC deleted it
        meanwhile, the new copy takes its place."""
        with self.index.lock(f"blob:{info.digest}"):
            known = self.index.blob(info.digest) is not None or not self.index.is_ready()
            existing = self.stored_info(info.digest) if known else None
            if existing is not None:
                self.link(repo, info.digest)
                if self.still_stored(info.digest):
                    self._discard(info.segments)
                    return existing
            descriptor = info.to_json()
            self.store.put_bytes(blob_key(info.digest), json.dumps(descriptor).encode())
            self.index.put_blob(info.digest, descriptor)
            self.index.add_bytes(logical=info.size)
            self.link(repo, info.digest)
            return info

    def _discard(self, segments: list[Segment]) -> None:
        self.store.delete([s.key for s in segments])
        self.index.add_bytes(stored=-sum(s.size for s in segments))

    def _save_upload(self, state: UploadState) -> None:
        data = state.to_json()
        self.store.put_bytes(f"uploads/{state.upload_id}", json.dumps(data).encode())
        self.index.put_upload(state.upload_id, data, self.upload_ttl)

    def _forget_upload(self, state: UploadState) -> None:
        self.store.delete([f"uploads/{state.upload_id}"])
        self.index.drop_upload(state.upload_id)

    def _upload_lock(self, upload_id: str) -> Any:
        return self.index.lock(f"upload:{upload_id}", blocking_timeout=10)
