"""Before a replay: build the workload's layers, push every image, wait for ingestion."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from api.cli_output import human_bytes
from api.replay.content import BuiltLayer, LayerCache
from api.replay.progress import Status, bar
from api.replay.transport import Connection, image_config, image_manifest
from api.replay.workload import ImageSpec, Workload


@dataclass
class Pushed:
    layers: dict[str, BuiltLayer]  # LayerSpec key -> blob
    seconds: float
    layer_bytes: int  # layer bytes pushed or mounted, summed over repositories


def build_layers(workload: Workload, cache: LayerCache, status: Status) -> dict[str, BuiltLayer]:
    built: dict[str, BuiltLayer] = {}
    started = time.monotonic()
    for number, (key, spec) in enumerate(sorted(workload.layers.items()), 1):
        built[key] = cache.build(spec)
        seconds = time.monotonic() - started
        status.update(
            f"{bar(number, len(workload.layers))} layers built: {number} ({seconds:.0f} s)"
        )
    status.done(f"layers: {len(built)} built or cached in {time.monotonic() - started:.0f} s")
    return built


def image_documents(image: ImageSpec, layers: dict[str, BuiltLayer]) -> tuple[bytes, bytes]:
    """The image's config and manifest: the same bytes whenever they are made."""
    blobs = [layers[layer] for layer in image.layers]
    config = image_config(image.repository, image.tag, blobs)
    return config, image_manifest(config, blobs)


def push_workload(
    connection: Connection, workload: Workload, layers: dict[str, BuiltLayer], status: Status
) -> Pushed:
    """Push every image of the workload (shared layers are mounted from the repository
    that got them first), in a stable order. An image whose tag appears during the replay
    (a Tag event) is pushed by digest: its tag is put then."""
    started, sent = time.monotonic(), 0
    holder: dict[str, str] = {}  # digest -> a repository that has it
    later = workload.tagged_later()
    images = sorted(workload.images.values(), key=lambda image: (image.repository, image.tag))
    for number, image in enumerate(images, 1):
        blobs = [layers[layer] for layer in image.layers]
        config, manifest = image_documents(image, layers)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        connection.push_blob(image.repository, config_digest, config, None)
        for blob in blobs:
            with open(blob.path, "rb") as body:
                source = holder.get(blob.digest)
                connection.push_blob(image.repository, blob.digest, body, source)
            holder.setdefault(blob.digest, image.repository)
            sent += blob.size
        reference = image.tag
        if (image.repository, image.tag) in later:
            reference = "sha256:" + hashlib.sha256(manifest).hexdigest()
        connection.push_manifest(image.repository, reference, manifest)
        status.update(f"{bar(number, len(images))} images pushed: {number}")
    seconds = time.monotonic() - started
    status.done(f"pushed {len(images)} images ({human_bytes(sent)} of layers) in {seconds:.0f} s")
    return Pushed(layers, seconds, sent)


def ingest_pending(stats: dict[str, Any]) -> bool:
    """Whether DupHunter reports layers waiting for ingestion or jobs in its queues."""
    layers = stats.get("layers")
    queued = int(layers.get("queued", 0)) if isinstance(layers, dict) else 0
    queues = stats.get("queues")
    waiting = any(int(v) for v in queues.values()) if isinstance(queues, dict) else False
    return queued > 0 or waiting


def wait_for_quiet(connection: Connection, timeout: float, status: Status) -> float:
    """Wait until the registry's background work is done (two quiet readings in a row);
    returns the seconds waited. A registry without the stats API is quiet at once."""
    started, calm, layers = time.monotonic(), 0, None
    while calm < 2:
        stats = connection.stats()
        if stats is None:
            return 0.0
        calm, layers = (0 if ingest_pending(stats) else calm + 1), stats.get("layers")
        waited = time.monotonic() - started
        if waited > timeout:
            raise TimeoutError(f"registry still busy after {timeout:.0f} s: {layers}")
        status.update(f"waiting for the registry's background work: {waited:.0f} s")
        time.sleep(1.0)
    waited = time.monotonic() - started
    status.done(f"registry idle after {waited:.0f} s (layers: {layers})")
    return waited
