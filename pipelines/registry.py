"""The registry as the API sees it: one object holding blobs, manifests and accounting."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pipelines.blobs import BlobStore, blob_key
from pipelines.config import Settings
from pipelines.errors import RegistryError
from pipelines.index import Index
from pipelines.manifests import ManifestStore
from pipelines.storage import ObjectStore, S3Store

NAME_PATTERN = re.compile(
    r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$"
)
MAX_NAME_LENGTH = 255


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

    @classmethod
    def connect(cls, settings: Settings | None = None) -> Registry:
        settings = settings or Settings()
        store = S3Store(settings)
        index = Index.from_url(settings.redis_url)
        blobs = BlobStore(store, index, settings.max_blob_bytes, settings.upload_ttl_seconds)
        return cls(settings, store, index, blobs, ManifestStore(store, index, blobs))

    def catalog(self, count: int | None, last: str | None) -> tuple[list[str], bool]:
        names = self.index.repositories(last or "", None if count is None else count + 1)
        if count is None:
            return names, False
        return names[:count], len(names) > count

    def stats(self) -> dict[str, Any]:
        counters = self.index.byte_counters()
        logical = counters.get("logical_bytes", 0)
        stored = counters.get("stored_bytes", 0)
        states: dict[str, int] = {}
        for state in self.index.layer_states().values():
            states[state] = states.get(state, 0) + 1
        return {
            "logical_bytes": logical,
            "stored_bytes": stored,
            "dedup_ratio": round(logical / stored, 4) if stored else None,
            "repositories": len(self.index.repositories()),
            "layers": states,
        }

    def rebuild_index(self) -> dict[str, int]:
        """Recreate every Redis index entry from what S3 holds."""
        self.index.clear()
        counts = {"blobs": 0, "links": 0, "manifests": 0, "tags": 0, "uploads": 0}
        logical = stored = 0
        for key, size in self.store.list(""):
            kind = self._reindex_object(key)
            if kind in ("data", "manifests", "files", "recipes"):
                stored += size
            if kind == "manifests":
                logical += size
            elif kind == "blobs":
                logical += int(json.loads(self.store.get_bytes(key))["size"])
            if kind in counts:
                counts[kind] += 1
        self.index.add_bytes(logical=logical, stored=stored)
        self.index.mark_ready()
        return counts

    def _reindex_object(self, key: str) -> str:
        parts = key.split("/")
        if parts[0] == "blobs":
            digest = f"{parts[1]}:{parts[2]}"
            self.index.put_blob(digest, json.loads(self.store.get_bytes(blob_key(digest))))
            return "blobs"
        if parts[0] == "uploads":
            data = json.loads(self.store.get_bytes(key))
            self.index.put_upload(parts[1], data, self.settings.upload_ttl_seconds)
            return "uploads"
        if parts[0] == "layers":
            digest = f"{parts[1]}:{parts[2]}"
            self.index.put_layer(digest, json.loads(self.store.get_bytes(key)))
            return "layers"
        if parts[0] == "repositories":
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
