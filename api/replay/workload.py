"""What a replay does: images made of layers, and pulls of them by clients at given times.

Layers are specifications (files with seeds and sizes), turned into real gzip blobs by
`content`; the same specification always gives the same bytes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def knob(default: Any, meaning: str) -> Any:
    """A workload parameter with its meaning, shown by `duphunter replay … --help`."""
    return field(default=default, metadata={"help": meaning})


@dataclass(frozen=True)
class FileSpec:
    """A file of a layer: its bytes are a function of `seed` and `size`, so two layers
    holding the same FileSpec hold the same file (what file-level dedup finds)."""

    seed: int
    size: int


@dataclass(frozen=True)
class LayerSpec:
    key: str  # stable name of the layer within the workload
    files: tuple[FileSpec, ...]
    target_bytes: int  # the compressed size it should have (the trace's, or drawn)


@dataclass(frozen=True)
class ImageSpec:
    repository: str
    tag: str
    layers: tuple[str, ...]  # LayerSpec keys, bottom first


@dataclass(frozen=True)
class Pull:
    """A client pulls `repository:tag` like docker: manifest, then the layers it lacks.
    `fresh`: the client starts from an empty local store (a repull: a new node, a pruned
    cache), so it GETs every layer again."""

    at: float  # seconds from the start of the replay
    client: str
    repository: str
    tag: str
    fresh: bool = False


@dataclass(frozen=True)
class Fetch:
    """A lone layer GET (a trace's blob GET that follows no manifest GET of that client)."""

    at: float
    client: str
    repository: str
    layer: str  # LayerSpec key


@dataclass(frozen=True)
class Tag:
    """A publisher (a CI system) points `repository:tag` at its image: the tag appears
    then, not before. The image's blobs and manifest (by digest) were pushed ahead."""

    at: float
    client: str
    repository: str
    tag: str


Event = Pull | Fetch | Tag


@dataclass
class Workload:
    source: str  # "synthetic" or "trace"
    layers: dict[str, LayerSpec]
    images: dict[tuple[str, str], ImageSpec]
    events: list[Event]
    parameters: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def clients(self) -> list[str]:
        return sorted({event.client for event in self.events})

    def tagged_later(self) -> set[tuple[str, str]]:
        """The (repository, tag) that appear during the replay, by a Tag event."""
        return {(e.repository, e.tag) for e in self.events if isinstance(e, Tag)}

    def duration(self) -> float:
        return max((event.at for event in self.events), default=0.0)

    def layer_repositories(self) -> dict[str, set[str]]:
        """Which repositories each layer is pushed into."""
        found: dict[str, set[str]] = {}
        for image in self.images.values():
            for key in image.layers:
                found.setdefault(key, set()).add(image.repository)
        return found

    def summary(self) -> dict[str, Any]:
        kinds = Counter(type(event).__name__.lower() for event in self.events)
        return {
            "source": self.source,
            "parameters": self.parameters,
            "clients": len(self.clients()),
            "repositories": len({image.repository for image in self.images.values()}),
            "images": len(self.images),
            "layers": len(self.layers),
            "layer_target_bytes": sum(layer.target_bytes for layer in self.layers.values()),
            "events": len(self.events),
            "pulls": kinds.get("pull", 0),
            "fetches": kinds.get("fetch", 0),
            "tags": kinds.get("tag", 0),
            "fresh_pulls": sum(1 for e in self.events if isinstance(e, Pull) and e.fresh),
            "duration_s": round(self.duration(), 3),
            "notes": self.notes,
        }
