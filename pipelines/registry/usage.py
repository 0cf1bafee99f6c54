"""What the S3 bucket really holds, measured by listing it: the total, and its named
parts (the packs of deduplicated files, intact copies with the replicas among them, the
layer buffer, metadata), next to the "stored" bytes the dedup ratio counts.

Listing a large bucket takes a while, so a measurement is kept in Redis and reused for
MAX_AGE_SECONDS unless a fresh one is asked for (`duphunter stats` asks).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from pipelines.store.storage import ObjectStore

MAX_AGE_SECONDS = 60.0
CACHE_KEY = "dh:usage:bucket"
# top-level prefix -> the part of the bucket it is
PARTS = {
    "packs": "packs",  # deduplicated files, each stored once
    "recipes": "recipes",  # how to rebuild each deduplicated layer from its files
    "checkpoints": "checkpoints",  # resumption points inside deduplicated layers
    "data": "intact_copies",  # pushed blobs as pushed: configs, intact layers, replicas
    "buffer": "layer_buffer",  # rebuilt layers kept for GETs (a cache)
    "manifests": "manifests",
}
METADATA = "metadata"  # descriptors, layer records, repository links, uploads, GC state


def measure(store: ObjectStore) -> dict[str, Any]:
    """The bucket listed now: bytes and objects in all, and bytes by part."""
    parts = dict.fromkeys([*PARTS.values(), METADATA], 0)
    total = objects = 0
    for key, size in store.list(""):
        parts[PARTS.get(key.split("/", 1)[0], METADATA)] += size
        total += size
        objects += 1
    return {"bytes": total, "objects": objects, "parts": parts, "measured_at": time.time()}


def bucket_usage(store: ObjectStore, client: redis.Redis[bytes], fresh: bool) -> dict[str, Any]:
    """A measurement at most MAX_AGE_SECONDS old (a new one when `fresh`)."""
    if not fresh:
        cached = client.get(CACHE_KEY)
        if cached is not None:
            return dict(json.loads(cached))
    measured = measure(store)
    client.set(CACHE_KEY, json.dumps(measured), px=int(MAX_AGE_SECONDS * 1000))
    return measured


def storage_report(
    measured: dict[str, Any], counters: dict[str, int], logical: int, stored: int
) -> dict[str, Any]:
    """The bucket's bytes with their named parts; the replicas and the intact copies
    awaiting deletion are parts of the intact copies (as the index counts them), and the
    ratio of pushed bytes to everything in the bucket stands next to the dedup ratio
    (pushed / stored: the buffer and the metadata are not in "stored")."""
    total = int(measured["bytes"])
    return {
        "bucket_bytes": total,
        "bucket_objects": measured["objects"],
        "bucket_measured_at": measured["measured_at"],
        "bucket_parts": measured["parts"],
        "intact_copies_of_which": {
            "replicas": counters.get("replica_bytes", 0),
            "awaiting_deletion": counters.get("retiring_bytes", 0),
        },
        "pushed_per_bucket_byte": round(logical / total, 4) if total else None,
        "stored_bytes_counts": "packs, recipes, checkpoints, intact copies (replicas and "
        "those awaiting deletion included) and manifests; not the layer buffer nor metadata",
        "stored_bytes": stored,
    }
