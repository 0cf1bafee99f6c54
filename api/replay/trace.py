"""IBM Cloud Container Registry traces (Anwar et al., FAST 2018) as replay workloads.

A record is one request to the registry (every id hashed to 8 hex characters)::

    {"timestamp": "2017-06-20T00:00:02.814Z", "http.request.method": "GET",
     "http.request.uri": "v2/a9cb77c4/37773f3b/manifests/406251de",
     "http.request.remoteaddr": "6d01dffe", "http.response.status": 200,
     "http.response.written": 2631, ...}

`v2/<a>/<b>` is the repository, `http.request.remoteaddr` the client; a URI ending in
`/manifests/<reference>` is a manifest request, `/blobs/<digest>` a blob (layer) request.
Files are JSON arrays of records (as the published traces are) or JSON lines, optionally
gzip-compressed.

The trace does not say which layers a manifest lists. The blob GETs a client makes in the
same repository within `session_s` after its manifest GET are taken as that image's layers
(the union over every client that pulled the image); a blob GET that follows no manifest
GET becomes a lone `Fetch`. Layer sizes are the bytes the registry wrote for the blob
(the largest over its successful GETs), times `size_scale`.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from api.replay.content import plan_files
from api.replay.workload import Event, Fetch, ImageSpec, LayerSpec, Pull, Workload, knob

URI = re.compile(r"/?v2/(?P<repo>[^/]+/[^/]+)/(?P<kind>manifests|blobs)/(?P<ref>[^/?]+)/?(?:\?.*)?")
REQUIRED = ("timestamp", "http.request.method", "http.request.uri", "http.request.remoteaddr")
ORPHANS_TAG = "replay-lone-blobs"
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class TraceError(ValueError):
    """A trace record that cannot be read; says which file, which record, and why."""


@dataclass(frozen=True)
class Record:
    at: float  # seconds since the epoch
    method: str
    repository: str
    kind: str  # "manifests", "blobs" or "other"
    reference: str
    client: str
    status: int
    written: int


@dataclass(frozen=True)
class TraceOptions:
    start_s: float = knob(0.0, "replay the trace from this many seconds after its first record")
    duration_s: float | None = knob(None, "seconds of the trace replayed (default: all)")
    session_s: float = knob(60.0, "blob GETs this soon after a manifest GET are its layers")
    size_scale: float = knob(1.0, "multiplies the layer sizes of the trace")
    min_layer_bytes: int = knob(1024, "smallest layer (after scaling)")
    max_layer_bytes: int = knob(256 << 20, "largest layer (after scaling)")
    files_per_layer: int = knob(4, "files in a layer")
    seed: int = knob(1, "layer contents derive from it")


def _timestamp(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"timestamp {value!r} is not a string")
    parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def _integer(record: dict[str, Any], key: str, default: int) -> int:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} {value!r} is not a number")
    return int(value)


def parse_record(record: Any) -> Record:
    """One record; ValueError (with the reason) if it is not a trace record."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    uri, client = record["http.request.uri"], record["http.request.remoteaddr"]
    if not isinstance(uri, str) or not isinstance(client, str) or not client:
        raise ValueError("http.request.uri and http.request.remoteaddr must be strings")
    method = record["http.request.method"]
    if not isinstance(method, str):
        raise ValueError(f"http.request.method {method!r} is not a string")
    match = URI.fullmatch(uri)
    repository, kind, reference = (
        (match["repo"], match["kind"], match["ref"]) if match else ("", "other", "")
    )
    return Record(
        _timestamp(record["timestamp"]),
        method.upper(),
        repository.lower(),
        kind,
        as_tag(reference) if kind == "manifests" else reference,
        client,
        _integer(record, "http.response.status", 200),
        _integer(record, "http.response.written", 0),
    )


def _documents(path: Path) -> list[Any]:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    text = raw.decode()
    if text.lstrip().startswith("["):
        loaded = json.loads(text)
        return list(loaded)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_records(paths: Iterable[Path], lenient: bool = False) -> tuple[list[Record], int]:
    """Every record of the files, in time order, and how many bad ones were skipped
    (only with `lenient`; otherwise the first bad record raises TraceError)."""
    records, bad = [], 0
    for path in paths:
        try:
            documents = _documents(path)
        except (OSError, ValueError, EOFError, zlib.error) as error:
            raise TraceError(
                f"{path}: not a trace file (JSON array or JSON lines): {error}"
            ) from error
        for number, document in enumerate(documents):
            try:
                records.append(parse_record(document))
            except ValueError as error:
                if not lenient:
                    raise TraceError(f"{path}: record {number}: {error}") from error
                bad += 1
    records.sort(key=lambda record: record.at)
    return records, bad


def as_tag(reference: str) -> str:
    """The trace's reference if it is a valid tag, else a tag derived from it (a digest)."""
    if TAG.fullmatch(reference):
        return reference
    return "ref-" + hashlib.sha256(reference.encode()).hexdigest()[:16]


def _window(records: list[Record], options: TraceOptions) -> list[Record]:
    if not records:
        return []
    start = records[0].at + options.start_s
    end = float("inf") if options.duration_s is None else start + options.duration_s
    return [record for record in records if start <= record.at < end]


class _Sessions:
    """Assigns each blob GET to the manifest GET it follows (same client and repository,
    within `session_s`), collecting the layers of each image."""

    def __init__(self, session_s: float) -> None:
        self.session_s = session_s
        self.open: dict[tuple[str, str], tuple[float, str]] = {}  # (client, repo) -> (t, tag)
        self.layers: dict[tuple[str, str], list[str]] = {}  # (repo, tag) -> blob ids

    def manifest(self, record: Record) -> None:
        self.open[(record.client, record.repository)] = (record.at, record.reference)
        self.layers.setdefault((record.repository, record.reference), [])

    def blob(self, record: Record) -> bool:
        """Whether the blob GET belongs to an open pull."""
        opened = self.open.get((record.client, record.repository))
        if opened is None or record.at - opened[0] > self.session_s:
            return False
        layers = self.layers[(record.repository, opened[1])]
        if record.reference not in layers:
            layers.append(record.reference)
        return True


def _layer_specs(sizes: dict[str, int], options: TraceOptions) -> dict[str, LayerSpec]:
    specs = {}
    for blob, written in sizes.items():
        target = int(
            min(max(written * options.size_scale, options.min_layer_bytes), options.max_layer_bytes)
        )
        seed = zlib.crc32(f"{options.seed}:{blob}".encode())
        specs[blob] = LayerSpec(blob, plan_files(seed, target, options.files_per_layer), target)
    return specs


def workload_from_records(records: list[Record], options: TraceOptions) -> Workload:
    window = _window(records, options)
    if not window:
        raise TraceError("no records in the chosen window of the trace")
    origin, sessions = window[0].at, _Sessions(options.session_s)
    events: list[Event] = []
    sizes: dict[str, int] = {}
    lone: dict[str, list[str]] = {}
    skipped: Counter[str] = Counter()
    for record in window:
        if record.method != "GET" or record.kind == "other" or not 200 <= record.status < 300:
            skipped[f"{record.method} {record.kind} {record.status}"] += 1
            continue
        if record.kind == "manifests":
            sessions.manifest(record)
            events.append(
                Pull(record.at - origin, record.client, record.repository, record.reference)
            )
            continue
        sizes[record.reference] = max(sizes.get(record.reference, 0), record.written)
        if not sessions.blob(record):
            lone.setdefault(record.repository, []).append(record.reference)
            events.append(
                Fetch(record.at - origin, record.client, record.repository, record.reference)
            )
    images = {
        key: ImageSpec(key[0], key[1], tuple(layers)) for key, layers in sessions.layers.items()
    }
    for repository, blobs in lone.items():  # pushed under a tag of their own, never pulled
        images[(repository, ORPHANS_TAG)] = ImageSpec(
            repository, ORPHANS_TAG, tuple(dict.fromkeys(blobs))
        )
    workload = Workload("trace", _layer_specs(sizes, options), images, events, asdict(options))
    workload.notes += [
        f"skipped {count} records: {kind}" for kind, count in sorted(skipped.items())
    ]
    return workload


def load_trace(paths: list[Path], options: TraceOptions, lenient: bool = False) -> Workload:
    records, bad = read_records(paths, lenient)
    workload = workload_from_records(records, options)
    workload.parameters["files"] = [str(path) for path in paths]
    if bad:
        workload.notes.append(f"skipped {bad} malformed records (--lenient)")
    return workload
