"""The registry as the API sees it: one object holding blobs, manifests and accounting."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from minio.error import S3Error

from pipelines.blobs import BlobInfo, BlobStore
from pipelines.config import Settings
from pipelines.digests import Digest
from pipelines.errors import RegistryError
from pipelines.filestore import FileStore, read_pack_table
from pipelines.index import Index
from pipelines.ingest import DEDUPLICATED, INTACT, QUEUED, Ingestor
from pipelines.manifests import ManifestStore
from pipelines.recipe import Recipe
from pipelines.restore import RestoreError, RestoreHub, restore_blob
from pipelines.storage import ObjectNotFound, ObjectStore, S3Store

NAME_PATTERN = re.compile(
    r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$"
)
MAX_NAME_LENGTH = 255


def _count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def check_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH or not NAME_PATTERN.match(name):
        raise RegistryError("NAME_INVALID", "invalid repository name", {"name": name})


def paginate(items: list[str], count: int | None, last: str | None) -> tuple[list[str], bool]:
    """Items after `last`, at most `count` of them, and whether more remain."""
    if last:
        items = [item for item in items if item > last]
    if count is None:
        return items, False
    return items[:count], len(items) > count


def parse_count(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise RegistryError(
            "PAGINATION_NUMBER_INVALID", "invalid number of results requested", {"n": raw}
        )
    return int(raw)


@dataclass
class Registry:
    settings: Settings
    store: ObjectStore
    index: Index
    blobs: BlobStore
    manifests: ManifestStore
    files: FileStore
    ingestor: Ingestor
    restores: RestoreHub

    @classmethod
    def connect(cls, settings: Settings | None = None) -> Registry:
        settings = settings or Settings()
        store = S3Store(settings)
        index = Index.from_url(settings.redis_url)
        blobs = BlobStore(store, index, settings.max_blob_bytes, settings.upload_ttl_seconds)
        files = FileStore(store, index)
        return cls(
            settings,
            store,
            index,
            blobs,
            ManifestStore(store, index, blobs),
            files,
            Ingestor(store, index, blobs, files),
            RestoreHub(settings.spool_dir, settings.restore_keep_seconds),
        )

    def read_blob(
        self, info: BlobInfo, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """The blob's bytes [offset, offset+length): intact, or restored and verified.
        The first bytes are produced before this returns, so that a blob that cannot be
        served gets an error status instead of a cut-off body."""
        end = info.size if length is None else offset + length
        if info.deduplicated:
            chunks = self._read_restored(info, offset, end)
        else:
            chunks = self._read_intact(info, offset, end)
        try:
            first = next(chunks, b"")
        except (RestoreError, ObjectNotFound) as error:
            message = f"blob {info.digest} cannot be served: {error}"
            raise RegistryError("UNKNOWN", message) from error
        return itertools.chain([first], chunks)

    def _read_restored(self, info: BlobInfo, offset: int, end: int) -> Iterator[bytes]:
        return self.restores.read(
            info.digest, info.size, lambda: self._restore(info), offset, end - offset
        )

    def _read_intact(self, info: BlobInfo, offset: int, end: int) -> Iterator[bytes]:
        """An intact blob. If its data objects go away mid-read (the layer was deduplicated
        and its intact copy retired), the read goes on from a restore at the same offset."""
        position = offset
        try:
            for chunk in self.blobs.read(info, offset, end - offset):
                position += len(chunk)
                yield chunk
        except (ObjectNotFound, S3Error, urllib3.exceptions.HTTPError):
            current = self.blobs.stored_info(info.digest)
            if current is None or not current.deduplicated:
                raise
            self.index.count("intact_reads_resumed_from_restore")
            yield from self._read_restored(current, position, end)

    def _restore(self, info: BlobInfo) -> Iterator[bytes]:
        self.index.count("restores")
        recipe = Recipe.decode(self.store.get_bytes(info.recipe or ""))
        if recipe.blob_digest != info.digest or recipe.blob_size != info.size:
            raise RestoreError(f"recipe {info.recipe} is for {recipe.blob_digest}")
        return restore_blob(recipe, self.files)

    def verify_blob(self, digest: str) -> dict[str, Any]:
        """Read a blob as a pull would (restoring it if deduplicated) and check its digest;
        a deduplicated layer's outcome is kept in its record, failures in the stats."""
        info = self.blobs.info(digest)
        if info is None:
            return {"digest": digest, "ok": False, "reason": "blob not found"}
        hasher = hashlib.sha256()
        try:
            for chunk in self.read_blob(info):
                hasher.update(chunk)
            actual = "sha256:" + hasher.hexdigest()
            reason = "" if actual == digest else f"read back as {actual}"
        except (RegistryError, RestoreError) as error:
            reason = str(error)
        result = {"digest": digest, "ok": not reason, "reason": reason, "checked": time.time()}
        if info.deduplicated:
            self.ingestor.record_verification(digest, reason)
        return result

    def mount(self, repo: str, digest: str, source_repo: str) -> bool:
        """Cross-repository mount; False (so the client uploads instead) when `source_repo`
        cannot lend the blob, including when its name or the digest is malformed."""
        if len(source_repo) > MAX_NAME_LENGTH or not NAME_PATTERN.match(source_repo):
            return False
        try:
            Digest.parse(digest)
        except RegistryError:
            return False
        return self.blobs.mount(repo, digest, source_repo)

    def catalog(self, count: int | None, last: str | None) -> tuple[list[str], bool]:
        names = self.index.repositories(last or "", None if count is None else count + 1)
        if count is None:
            return names, False
        return names[:count], len(names) > count

    def stats(self) -> dict[str, Any]:
        counters = self.index.counters()
        logical = counters.get("logical_bytes", 0)
        stored = counters.get("stored_bytes", 0)
        layers = list(self.index.layer_summaries().values())
        files = self.index.file_count()
        return {
            "logical_bytes": logical,
            "stored_bytes": stored,
            "dedup_ratio": round(logical / stored, 4) if stored else None,
            "repositories": len(self.index.repositories()),
            "unique_files": files,
            "unreferenced_files": files - self.index.referenced_file_count(),
            "layers": _count(layer["state"] for layer in layers),
            "layers_by_encoder": _count(
                layer["encoder"] for layer in layers if layer["state"] == DEDUPLICATED
            ),
            "intact_layers_by_reason": _count(
                layer["reason"] for layer in layers if layer["state"] == INTACT
            ),
            "verification": self._verification_stats(counters),
        }

    def _verification_stats(self, counters: dict[str, int]) -> dict[str, Any]:
        records = self.index.layer_summaries(("verify_error",))
        return {
            "reads": counters.get("verifications", 0),
            "failures": counters.get("verification_failures", 0),
            "failing_layers": {
                digest: fields["verify_error"]
                for digest, fields in records.items()
                if fields["verify_error"]
            },
        }

    def layers_by_last_verification(self) -> list[str]:
        """Deduplicated layers in the order they should be verified: those never verified
        first, the most recently deduplicated of them first (a problem in new code shows
        early), then those verified longest ago."""
        records = self.index.layer_summaries(("state", "verified", "updated"))
        order = {
            digest: (float(fields["verified"] or 0), -float(fields["updated"] or 0))
            for digest, fields in records.items()
            if fields["state"] == DEDUPLICATED
        }
        return sorted(order, key=lambda digest: order[digest])

    def unfinished_ingests(self, older_than: float) -> list[str]:
        """Layers whose ingest did not finish: still queued since before `older_than`, or
        recorded as failed while S3 holds a committed descriptor (a half-done commit)."""
        records = self.index.layer_summaries(("state", "reason", "updated"))
        stale = []
        for digest, fields in records.items():
            if fields["state"] == QUEUED and float(fields["updated"] or 0) < older_than:
                stale.append(digest)
            elif fields["state"] == INTACT and fields["reason"].startswith("ingest failed"):
                info = self.blobs.stored_info(digest)
                if info is not None and info.deduplicated:
                    stale.append(digest)
        return stale

    def ensure_index(self) -> None:
        """Rebuild the index from S3 if it is empty; one process does it, the others wait."""
        if self.index.is_ready():
            return
        with self.index.lock("rebuild-index", timeout=3600, blocking_timeout=3600):
            if not self.index.is_ready():
                self.rebuild_index()

    def rebuild_index(self) -> dict[str, int]:
        """Recreate every Redis index entry from what S3 holds."""
        self.index.clear()
        counts: dict[str, int] = {}
        logical = stored = 0
        recipes_in_use: list[str] = []
        for key, size in self.store.list(""):
            kind = key.split("/", 1)[0]
            if kind in ("data", "manifests", "packs", "recipes", "checkpoints"):
                stored += size
            logical += size if kind == "manifests" else 0
            if kind == "blobs":
                info = self._reindex_blob(key)
                logical += info.size
                if info.recipe is not None:
                    recipes_in_use.append(info.recipe)
            else:
                kind = self._reindex_object(key, size)
            counts[kind] = counts.get(kind, 0) + 1
        for key in recipes_in_use:
            recipe = Recipe.decode(self.store.get_bytes(key))
            self.index.add_file_references([digest.hex() for digest in recipe.file_refs()])
        self.index.add_bytes(logical=logical, stored=stored)
        self.index.mark_ready()
        return counts

    def _reindex_blob(self, key: str) -> BlobInfo:
        _, algorithm, hex_digest = key.split("/")
        digest = f"{algorithm}:{hex_digest}"
        data = json.loads(self.store.get_bytes(key))
        self.index.put_blob(digest, data)
        return BlobInfo.from_json(digest, data)

    def _reindex_object(self, key: str, size: int) -> str:
        parts = key.split("/")
        if parts[0] == "uploads":
            data = json.loads(self.store.get_bytes(key))
            self.index.put_upload(parts[1], data, self.settings.upload_ttl_seconds)
        elif parts[0] == "layers":
            self.index.put_layer(f"{parts[1]}:{parts[2]}", json.loads(self.store.get_bytes(key)))
        elif parts[0] == "packs":
            for digest, location in read_pack_table(self.store, key, size):
                self.index.add_file(digest.hex(), location.encode())
        elif parts[0] == "repositories":
            return self._reindex_repository_object(key)
        return parts[0]

    def _reindex_repository_object(self, key: str) -> str:
        head, _, tail = key.partition("/_")
        repo = head.removeprefix("repositories/")
        pieces = tail.split("/")
        if pieces[0] == "layers":
            self.index.link_layer(repo, f"{pieces[1]}:{pieces[2]}")
            return "links"
        if pieces[:2] == ["manifests", "revisions"]:
            digest = f"{pieces[2]}:{pieces[3]}"
            revision = json.loads(self.store.get_bytes(key))
            self.index.put_revision(repo, digest, revision)
            if revision.get("subject"):
                self.index.add_referrer(repo, revision["subject"], digest, revision["referrer"])
            return "manifests_linked"
        if pieces[:2] == ["manifests", "tags"]:
            self.index.set_tag(repo, pieces[2], self.store.get_bytes(key).decode())
            return "tags"
        return "other"
