"""How a blob GET is served, and how layers are rebuilt ahead of GETs.

A GET takes the first of these that can serve the layer, and says which (its source):

    intact    an intact copy (a layer not deduplicated, or a hot one that kept a replica)
    buffer    the shared layer buffer holds the whole restored layer
    inflight  a rebuild of the layer is running (a preconstruction filling the buffer, on
              any host, or an on-demand restore on this host): the GET follows it
    spool     this host restored the layer moments ago (its restore spool)
    restore   nothing had it: this GET starts an on-demand restore, which also fills the
              buffer when the buffer admits the layer

Whichever serves it, if the bytes go away mid-read (an intact copy retired, a buffer
entry evicted, a filler that died), the read goes on from a restore at the same offset.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

import urllib3
from minio.error import S3Error

from pipelines import metrics
from pipelines.encoders.base import thread_cpu_seconds
from pipelines.formats import Buffer
from pipelines.formats.codecs import ChunkReader
from pipelines.formats.recipe import Recipe
from pipelines.pauses import pause
from pipelines.serve.buffer import BufferMiss, Filler, LayerBuffer
from pipelines.serve.rebuild import RestoreError
from pipelines.serve.restore import RestoreHub, restore_blob
from pipelines.store.blobs import BlobInfo, BlobStore, Segment
from pipelines.store.filestore import FileStore
from pipelines.store.index import Index
from pipelines.store.storage import ObjectNotFound, ObjectStore

SOURCES = ("intact", "buffer", "inflight", "spool", "restore")
logger = logging.getLogger(__name__)


@dataclass
class BlobRead:
    source: str
    chunks: Iterator[bytes]


class BlobServer:
    def __init__(
        self,
        store: ObjectStore,
        index: Index,
        blobs: BlobStore,
        files: FileStore,
        hub: RestoreHub,
        buffer: LayerBuffer,
    ) -> None:
        self.store = store
        self.index = index
        self.blobs = blobs
        self.files = files
        self.hub = hub
        self.buffer = buffer

    def read(self, info: BlobInfo, offset: int, end: int) -> BlobRead:
        if info.segments or not info.deduplicated:
            return BlobRead("intact", self._intact(info, offset, end))
        entry = self.buffer.record_get(info.digest)
        if entry is not None and (entry.complete or self.buffer.filling_alive(info.digest)):
            source = "buffer" if entry.complete else "inflight"
            self.buffer.record_hit(info.digest)
            return BlobRead(source, self._buffered(info, offset, end))
        local = self.hub.state(info.digest)
        source = {"restoring": "inflight", "complete": "spool"}.get(local or "", "restore")
        return BlobRead(source, self._restored(info, offset, end))

    def _intact(self, info: BlobInfo, offset: int, end: int) -> Iterator[bytes]:
        position = offset
        pause("serve.intact", info.digest)
        try:
            for chunk in self.blobs.read(info, offset, end - offset):
                position += len(chunk)
                yield chunk
        except (ObjectNotFound, S3Error, urllib3.exceptions.HTTPError):
            current = self.blobs.stored_info(info.digest)
            if current is None or not current.deduplicated:
                raise
            self.index.count("intact_reads_resumed_from_restore")
            yield from self._restored(replace(current, segments=[]), position, end)

    def _buffered(self, info: BlobInfo, offset: int, end: int) -> Iterator[bytes]:
        position = offset
        try:
            for chunk in self.buffer.read(info.digest, offset, end):
                position += len(chunk)
                yield chunk
        except BufferMiss as miss:
            self.index.count("buffer_reads_resumed_from_restore")
            yield from self._restored(info, miss.offset, end)

    def _restored(self, info: BlobInfo, offset: int, end: int) -> Iterator[bytes]:
        return self.hub.read(
            info.digest, info.size, lambda: self._restore_and_fill(info), offset, end - offset
        )

    def _restore_and_fill(self, info: BlobInfo) -> Iterator[Buffer]:
        """An on-demand restore; it fills the buffer too if the buffer admits the layer,
        so that GETs on other hosts and later ones find it there."""
        filler = self.buffer.start_fill(info.digest, info.size, "miss")
        return self.restore(info, filler, "on-demand")

    def restore(
        self, info: BlobInfo, filler: Filler | None = None, origin: str = "on-demand"
    ) -> Iterator[Buffer]:
        """The verified bytes of a deduplicated layer, written to `filler` as they come."""
        self.index.count("restores")
        started = thread_cpu_seconds()
        wall = time.perf_counter()
        try:
            recipe = Recipe.decode(self.store.get_bytes(info.recipe or ""))
            if recipe.blob_digest != info.digest or recipe.blob_size != info.size:
                raise RestoreError(f"recipe {info.recipe} is for {recipe.blob_digest}")
            for chunk in restore_blob(recipe, self.files):
                if filler is not None:
                    filler.write(chunk)
                yield chunk
            if filler is not None:
                filler.finish()
            metrics.RESTORE_SECONDS.labels(origin).observe(time.perf_counter() - wall)
        except BaseException as error:
            metrics.RESTORE_FAILURES.labels(type(error).__name__).inc()
            if filler is not None:
                filler.abort()
            raise
        finally:  # the CPU of this thread, its encoder helpers and segment threads
            spent = thread_cpu_seconds() - started
            self.index.count("restore_cpu_ms", int(spent * 1000))

    # ahead of GETs
    def preconstruct(
        self, digest: str, origin: str, expected_gets: int, since: float | None = None
    ) -> str:
        """Rebuild a deduplicated layer into the buffer, unless something serves it already
        (then only pin it for the expected GETs, predicted at `since`, by default now),
        or the layer was fetched after the prediction was made: that GET was the predicted
        one, or its restore fills the spool and buffer that serve the predicted one.
        Returns what was done."""
        if since is not None and self.buffer.fetched_since(digest, since):
            self.index.count("preconstructions_too_late")
            return "fetched already"
        since = time.time() if since is None else since
        info = self.blobs.info(digest)
        if info is None:
            return "unknown"
        if info.segments or not info.deduplicated:
            return "intact"
        if self.buffer.entry(digest) is not None:
            self.buffer.expect(digest, expected_gets, since, origin)
            return "buffered"
        filler = self.buffer.start_fill(digest, info.size, origin, expected_gets, since)
        if filler is None:
            return "not admitted"
        self.index.count("preconstructions")
        if info.retired:  # its intact copy awaits deletion: copy it, no restore needed
            self._fill_from_intact(replace(info, segments=info.retired), filler)
            return "filled from intact"
        for _chunk in self.restore(info, filler, origin):
            pass
        return "filled"

    def _fill_from_intact(self, info: BlobInfo, filler: Filler) -> None:
        try:
            for chunk in self.blobs.read(info):
                filler.write(chunk)
            filler.finish()
        except BaseException:
            filler.abort()
            raise

    def materialize_intact(self, digest: str) -> int:
        """Give a deduplicated layer an intact replica again (a hot layer in S-mode), from
        the buffer if it holds the layer, else from a verified restore. The bytes added."""
        info = self.blobs.stored_info(digest)
        if info is None or not info.deduplicated or info.segments:
            return 0
        key = f"data/{uuid.uuid4().hex}/000000"  # GC leaves it an upload's life to be named
        read = self.read(info, 0, info.size)
        self.store.put_stream(key, ChunkReader(read.chunks), info.size)
        self.blobs.replace_descriptor(replace(info, segments=[Segment(key, info.size)]))
        self.index.add_bytes(stored=info.size)
        self.index.count("replica_bytes", info.size)
        return info.size
