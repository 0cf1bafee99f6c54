"""Real layers for a workload: a tar of generated files, gzip-compressed with zlib level 6
(an encoder DupHunter reproduces, so every layer gets deduplicated), built once and cached.

File bytes are text-like (short phrases drawn from a per-file vocabulary): they compress
about 3.6:1, as real layers do (2.5-4:1), so a restore costs about what a real one costs
per byte.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from api.replay.workload import FileSpec, LayerSpec

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

GENERATOR_VERSION = 1  # bump when the bytes a FileSpec gives change
LEVEL = 6
BLOCK = 64 << 10
RATIO = 3.6  # tar bytes per gzip byte for these files (measured on 20 MiB: 3.66)
VOCABULARY = 1500  # words of a file
PHRASES = 4096  # phrases of a file, 3 words each
MTIME = 1_700_000_000


def plan_files(seed: int, target_bytes: int, count: int) -> tuple[FileSpec, ...]:
    """`count` files (at least one) whose layer compresses to about `target_bytes`."""
    rng = random.Random(seed)
    payload = max(1, int(target_bytes * RATIO) - 1024 * count)
    count = max(1, min(count, payload // 4096 or 1))
    weights = [rng.uniform(0.5, 1.5) for _ in range(count)]
    sizes = [max(1, int(payload * weight / sum(weights))) for weight in weights]
    return tuple(FileSpec(rng.getrandbits(62), size) for size in sizes)


def _phrases(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(1, 5)).hex().encode() for _ in range(VOCABULARY)]
    return [b" ".join(rng.choices(words, k=3)) + b" " for _ in range(PHRASES)]


def file_chunks(spec: FileSpec) -> Iterator[bytes]:
    """The bytes of a file, block by block; each block depends only on (seed, index)."""
    phrases = _phrases(spec.seed)
    per_block = BLOCK * len(phrases) // sum(map(len, phrases)) + 64
    left, index = spec.size, 0
    while left > 0:
        rng = random.Random(f"{spec.seed}:{index}")
        block = b"".join(rng.choices(phrases, k=per_block))[: min(BLOCK, left)]
        left -= len(block)
        index += 1
        yield block


class _ChunkReader:
    """A file-like view of an iterator of chunks, for tarfile.addfile."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.pending = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.pending) < size:
            chunk = next(self.chunks, b"")
            if not chunk:
                break
            self.pending += chunk
        cut = len(self.pending) if size < 0 else size
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out


class _HashingWriter:
    """Passes writes on to `sink`, hashing and counting them (the blob's digest)."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: ReadableBuffer) -> int:
        self.hash.update(data)
        written = self.sink.write(data)
        self.size += written
        return written

    def flush(self) -> None:
        self.sink.flush()


class _TarSink(gzip.GzipFile):
    """The gzip stream of a layer, hashing the tar written into it (the diff_id)."""

    def __init__(self, out: _HashingWriter) -> None:
        super().__init__(fileobj=out, mode="wb", compresslevel=LEVEL, mtime=0)
        self.tar_hash = hashlib.sha256()

    def write(self, data: ReadableBuffer) -> int:
        self.tar_hash.update(data)
        return super().write(data)


@dataclass(frozen=True)
class BuiltLayer:
    key: str
    digest: str  # sha256 of the gzip blob: what the registry stores and serves
    size: int
    diff_id: str  # sha256 of the tar
    path: Path


def spec_id(spec: LayerSpec) -> str:
    text = json.dumps([GENERATOR_VERSION, LEVEL, [asdict(f) for f in spec.files]])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def write_layer(spec: LayerSpec, out: BinaryIO) -> tuple[str, int, str]:
    """Write the gzip blob of `spec` to `out`: (digest, size, diff_id)."""
    blob = _HashingWriter(out)
    folder = f"replay/{spec_id(spec)[:12]}"
    with (
        _TarSink(blob) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as archive,
    ):
        for number, file in enumerate(spec.files):
            info = tarfile.TarInfo(f"{folder}/{number}-{file.seed:x}.txt")
            info.size, info.mtime, info.mode = file.size, MTIME, 0o644
            archive.addfile(info, _ChunkReader(file_chunks(file)))
    digest = "sha256:" + blob.hash.hexdigest()
    return digest, blob.size, "sha256:" + gz.tar_hash.hexdigest()


class LayerCache:
    """Built layers on disk, keyed by their specification."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def build(self, spec: LayerSpec) -> BuiltLayer:
        base = self.directory / spec_id(spec)
        meta = base.with_suffix(".json")
        blob = base.with_suffix(".tar.gz")
        if meta.exists() and blob.exists():
            known = json.loads(meta.read_text())
            if blob.stat().st_size == known["size"]:
                return BuiltLayer(spec.key, known["digest"], known["size"], known["diff_id"], blob)
        partial = base.with_suffix(f".{os.getpid()}.partial")
        with open(partial, "wb") as out:
            digest, size, diff_id = write_layer(spec, out)
        partial.rename(blob)
        # renamed into place: another process building the same layer never reads half
        partial.write_text(json.dumps({"digest": digest, "size": size, "diff_id": diff_id}))
        partial.rename(meta)
        return BuiltLayer(spec.key, digest, size, diff_id, blob)
