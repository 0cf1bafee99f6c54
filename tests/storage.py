"""Behind a live stack's API: the packs that hold a layer's files, a pack changed behind
the registry's back, and a layer buffer entry filled by hand."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pipelines.formats.recipe import Recipe
from pipelines.serve.buffer import LayerBuffer
from tests.client import sha256
from tests.conftest import LiveStack


def hexes(files: dict[str, bytes]) -> set[str]:
    return {sha256(content).removeprefix("sha256:") for content in files.values()}


def files_by_pack(live: LiveStack, digest: str) -> dict[str, set[str]]:
    """The packs holding a deduplicated layer's files, and which of them each holds."""
    info = live.registry.blobs.stored_info(digest)
    assert info is not None and info.recipe is not None
    refs = list(Recipe.decode(live.registry.store.get_bytes(info.recipe)).file_refs())
    by_pack: dict[str, set[str]] = {}
    for ref, location in zip(refs, live.registry.files.locate(refs), strict=True):
        assert location is not None
        by_pack.setdefault(location.pack, set()).add(ref.hex())
    return by_pack


@contextlib.contextmanager
def pack_changed(live: LiveStack, pack: str, content: bytes | None) -> Iterator[bytes]:
    """Behind the registry's back: the pack deleted (`content` None) or rewritten, and
    put back as it was afterwards. Yields its original bytes."""
    store = live.registry.store
    original = store.get_bytes(pack)
    if content is None:
        store.delete([pack])
    else:
        store.put_bytes(pack, content)
    try:
        yield original
    finally:
        store.put_bytes(pack, original)


def fill_whole(buffer: LayerBuffer, digest: str, data: bytes) -> None:
    filler = buffer.start_fill(digest, len(data), "miss")
    assert filler is not None
    filler.write(data)
    filler.finish()
