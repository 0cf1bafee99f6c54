"""Layer ingestion: what the `ingest` worker does to a layer blob after a manifest push.

Today it classifies the blob's compression, checks that the tar inside is readable and
records the result; the layer stays intact. The record is durable in S3
(`layers/<alg>/<hex>`, JSON) and indexed in Redis.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from dataclasses import asdict, dataclass
from typing import BinaryIO

from pipelines.blobs import BlobInfo, BlobStore
from pipelines.codecs import SNIFF_BYTES, CorruptBlobError, Sniff, open_decompressed, sniff
from pipelines.codecs import _IterReader as ChunkReader
from pipelines.index import Index
from pipelines.storage import ObjectStore

QUEUED, INTACT = "queued", "intact"


@dataclass
class LayerRecord:
    digest: str
    state: str
    size: int = 0
    compression: str = ""
    producer_hint: str = ""
    tar_readable: bool = False
    tar_members: int = 0
    tar_bytes: int = 0
    reason: str = ""
    updated: float = 0.0

    def as_fields(self) -> dict[str, str]:
        return {key: str(value) for key, value in asdict(self).items()}


def layer_record_key(digest: str) -> str:
    algorithm, hex_part = digest.split(":", 1)
    return f"layers/{algorithm}/{hex_part}"


def open_blob(blobs: BlobStore, info: BlobInfo) -> BinaryIO:
    return io.BufferedReader(ChunkReader(blobs.read(info)), 1 << 20)


def mark_queued(store: ObjectStore, index: Index, digest: str) -> bool:
    """Record that a layer awaits ingestion; False if it was queued or ingested before."""
    if index.layer(digest).get("state"):
        return False
    save_record(store, index, LayerRecord(digest, QUEUED, updated=time.time()))
    return True


def save_record(store: ObjectStore, index: Index, record: LayerRecord) -> None:
    fields = record.as_fields()
    store.put_bytes(layer_record_key(record.digest), json.dumps(fields).encode())
    index.put_layer(record.digest, fields)


def inspect_layer(blobs: BlobStore, digest: str) -> LayerRecord:
    """Classify the blob and walk its tar; the blob itself is left untouched."""
    info = blobs.info(digest)
    if info is None:
        return LayerRecord(digest, INTACT, reason="blob not found", updated=time.time())
    kind = sniff(b"".join(blobs.read(info, 0, min(SNIFF_BYTES, info.size))))
    record = LayerRecord(
        digest,
        INTACT,
        size=info.size,
        compression=kind.kind,
        producer_hint=kind.producer_hint or "",
        updated=time.time(),
    )
    if kind.kind == "other":
        record.reason = f"not a tar layer ({kind.detail or 'unknown format'})"
        return record
    _walk_tar(open_blob(blobs, info), kind, record)
    return record


def _walk_tar(blob: BinaryIO, kind: Sniff, record: LayerRecord) -> None:
    stream = open_decompressed(kind.kind, blob)
    counter = _CountingReader(stream)
    try:
        with tarfile.open(fileobj=counter, mode="r|") as archive:  # type: ignore[call-overload]
            for _member in archive:
                record.tar_members += 1
        for _rest in iter(lambda: counter.read(1 << 20), b""):
            pass
    except (tarfile.TarError, CorruptBlobError, OSError, EOFError) as error:
        record.reason = f"unreadable: {error}"
        return
    record.tar_readable = True
    record.tar_bytes = counter.count
    record.reason = "deduplication not run"


class _CountingReader:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data
