"""The binary layer recipe: exact round trip, loud rejection of damaged bytes, small size."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import itertools
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.formats import recipe as recipe_module
from pipelines.formats.recipe import (
    MAGIC,
    RESUME_EVERY,
    VERSION,
    FileRef,
    Raw,
    Recipe,
    RecipeBuilder,
    RecipeError,
    build_recipe,
    encode_varint,
)
from pipelines.formats.tarsplit import HashingReader, Payload, join_tar, split_tar
from pipelines.formats.verify import SegmentDigests
from tests.formats.test_tarsplit import damaged_tars

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)

entries_strategy = st.lists(
    st.builds(Raw, st.binary(min_size=1, max_size=2000))
    | st.builds(FileRef, st.binary(min_size=32, max_size=32), st.integers(0, 2**63)),
    max_size=30,
)
metadata_strategy = st.fixed_dictionaries(
    {
        "blob_digest": st.text(max_size=80),
        "blob_size": st.integers(0, 2**63),
        "tar_sha256": st.binary(min_size=32, max_size=32),
        "encoder_id": st.text(max_size=40),
        "encoder_params": st.binary(max_size=40),
    }
)
EXAMPLE_METADATA: dict[str, object] = {
    "blob_digest": "sha256:" + "ab" * 32,
    "blob_size": 1234,
    "tar_sha256": bytes(range(32)),
    "encoder_id": "gzip/go1.26/level6",
    "encoder_params": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff",
}


def example_recipe() -> Recipe:
    entries = [
        Raw(bytes(512) * 3),
        FileRef(b"\x01" * 32, 10),
        Raw(b"pad"),
        FileRef(b"\x01" * 32, 10),
    ]
    return build_recipe(entries, **EXAMPLE_METADATA)  # type: ignore[arg-type]


def resigned(unsigned: bytes) -> bytes:
    """Encoded recipe bytes with a valid checksum, to test checks beyond the checksum."""
    return unsigned + hashlib.sha256(unsigned).digest()


@PROPERTY_SETTINGS
@given(entries=entries_strategy, metadata=metadata_strategy)
def test_round_trip(entries: list[Raw | FileRef], metadata: dict[str, object]) -> None:
    recipe = build_recipe(entries, **metadata)  # type: ignore[arg-type]
    decoded = Recipe.decode(recipe.encode())
    assert decoded == recipe
    assert list(decoded.entries()) == entries
    assert decoded.tar_size == sum(
        e.size if isinstance(e, FileRef) else len(e.data) for e in entries
    )
    assert decoded.file_refs() == {e.digest: e.size for e in entries if isinstance(e, FileRef)}
    counts = collections.Counter(e.digest for e in entries if isinstance(e, FileRef))
    repeated = {digest: count for digest, count in counts.items() if count > 1}
    assert decoded.repeated_files() == repeated  # found by the decoding walk
    assert recipe.repeated_files() == repeated  # and by a walk of its own, once, if built
    for name, value in metadata.items():
        assert getattr(decoded, name) == value


def test_repeats_are_counted_for_a_bounded_number_of_distinct_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The decoding walk's counts take bounded memory whatever the layer: a file first
    seen once COUNTED_FILES others were is not counted (its repeats are fetched again)."""
    a, b, c = (bytes([n]) * 32 for n in (1, 2, 3))
    entries: list[Raw | FileRef] = [FileRef(d, 5) for d in (a, b, c, a, c, b, a)]
    encoded = build_recipe(entries, **EXAMPLE_METADATA).encode()  # type: ignore[arg-type]
    assert Recipe.decode(encoded).repeated_files() == {a: 3, b: 2, c: 2}
    monkeypatch.setattr(recipe_module, "COUNTED_FILES", 2)
    assert Recipe.decode(encoded).repeated_files() == {a: 3, b: 2}


def test_layout_starts_with_magic_and_version() -> None:
    encoded = example_recipe().encode()
    assert encoded[:4] == MAGIC == b"DHRc"
    assert encoded[4] == VERSION == 3


@PROPERTY_SETTINGS
@given(
    lengths=st.lists(st.integers(1, 2**40), min_size=1, max_size=20),
    seed=st.binary(min_size=1, max_size=8),
)
def test_segment_digests_round_trip(lengths: list[int], seed: bytes) -> None:
    ends = tuple(sum(lengths[: n + 1]) for n in range(len(lengths)))
    digests = tuple(hashlib.sha256(seed + bytes([n % 256])).digest() for n in range(len(ends)))
    segments = SegmentDigests(ends, digests)
    metadata = dict(EXAMPLE_METADATA, blob_size=ends[-1])
    recipe = build_recipe([Raw(b"x")], segments=segments, **metadata)  # type: ignore[arg-type]
    assert Recipe.decode(recipe.encode()).segments == segments


def test_segments_must_cover_the_blob() -> None:
    segments = SegmentDigests((10, 20), (bytes(32), bytes(32)))
    recipe = build_recipe([Raw(b"x")], segments=segments, **EXAMPLE_METADATA)  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="cover 20 bytes"):
        Recipe.decode(recipe.encode())


def one_frame(recipe: Recipe) -> Recipe:
    """The same recipe as version 2 wrote it: its body one zstd frame, no frame table."""
    body = b"".join(
        bytes([0]) + encode_varint(len(e.data)) + e.data
        if isinstance(e, Raw)
        else bytes([1]) + e.digest + encode_varint(e.size)
        for e in recipe.entries()
    )
    compressed = zstandard.ZstdCompressor().compress(body)
    return dataclasses.replace(recipe, body=compressed, frame_entries=0, frames=())


def test_version_2_recipes_still_decode() -> None:
    recipe = one_frame(example_recipe())
    encoded = recipe.encode()
    assert encoded[4] == 2
    decoded = Recipe.decode(encoded)
    assert decoded == recipe and list(decoded.entries()) == list(example_recipe().entries())


def test_version_1_recipes_still_decode_without_segments() -> None:
    """Recipes written before segment digests existed: the version-2 layout minus the
    segment count, which a recipe without segments encodes as one zero byte."""
    recipe = one_frame(example_recipe())
    encoded = recipe.encode()[:-32]
    params_end = encoded.index(EXAMPLE_METADATA["encoder_params"]) + len(  # type: ignore[arg-type]
        EXAMPLE_METADATA["encoder_params"]  # type: ignore[arg-type]
    )
    assert encoded[params_end] == 0  # segment_count
    version_1 = resigned(encoded[:4] + b"\x01" + encoded[5:params_end] + encoded[params_end + 1 :])
    decoded = Recipe.decode(version_1)
    assert decoded == recipe and decoded.segments is None


def test_file_refs_are_unique_digests_with_sizes() -> None:
    assert example_recipe().file_refs() == {b"\x01" * 32: 10}


@PROPERTY_SETTINGS
@given(position=st.integers(0, 10**6), flip=st.integers(1, 255))
def test_any_flipped_byte_is_rejected(position: int, flip: int) -> None:
    encoded = bytearray(example_recipe().encode())
    encoded[position % len(encoded)] ^= flip
    with pytest.raises(RecipeError):
        Recipe.decode(bytes(encoded))


def test_every_truncation_is_rejected() -> None:
    encoded = example_recipe().encode()
    for length in range(len(encoded)):
        with pytest.raises(RecipeError):
            Recipe.decode(encoded[:length])
    with pytest.raises(RecipeError):
        Recipe.decode(encoded + b"\0")


def test_wrong_magic_and_unknown_version_are_rejected() -> None:
    encoded = example_recipe().encode()
    with pytest.raises(RecipeError, match="magic"):
        Recipe.decode(b"XXXX" + encoded[4:])
    with pytest.raises(RecipeError, match="version 4"):
        Recipe.decode(resigned(encoded[:4] + bytes([4]) + encoded[5:-32]))


@pytest.mark.parametrize(
    ("body", "entry_count", "tar_size", "message"),
    [
        (b"not zstd at all", 1, 0, "zstd"),
        (b"\x07", 1, 0, "tag"),
        (b"\x00\x00", 1, 0, "empty raw"),
        (b"\x00\x05abc", 1, 5, "truncated"),
        (b"\x00\x03abc", 2, 3, "truncated"),
        (b"\x00\x03abc\x00", 1, 3, "after the last"),
        (b"\x00\x03abc", 1, 4, "add up"),
        (b"\x01" + b"d" * 32 + b"\xff" * 11, 1, 0, "varint"),
        (b"\x00\x83\x00abc", 1, 3, "shortest form"),  # 3 written in two bytes
    ],
)
def test_inconsistent_body_is_rejected_even_with_a_valid_checksum(
    body: bytes, entry_count: int, tar_size: int, message: str
) -> None:
    compressed = body if message == "zstd" else zstandard.ZstdCompressor().compress(body)
    recipe = Recipe(
        blob_digest="sha256:00",
        blob_size=1,
        tar_size=tar_size,
        tar_sha256=bytes(32),
        encoder_id="x",
        encoder_params=b"",
        entry_count=entry_count,
        body=compressed,
    )
    with pytest.raises(RecipeError, match=message):
        Recipe.decode(recipe.encode())


def test_entries_from_any_offset_are_those_a_whole_walk_finds() -> None:
    """Across resume points (a recipe of 2.5 of their spans), with entries of every
    encoded length, empty files and raw entries that straddle the offset."""
    sizes = [0, 1, 127, 128, 16_383, 16_384, 2_000_000]
    entries: list[Raw | FileRef] = []
    for number in range(RESUME_EVERY * 5 // 2):
        if number % 3:
            entries.append(FileRef(hashlib.sha256(b"%d" % number).digest(), sizes[number % 7]))
        else:
            entries.append(Raw(b"r" * (1 + number % 700)))
    built = build_recipe(entries, **EXAMPLE_METADATA)  # type: ignore[arg-type]
    decoded = Recipe.decode(built.encode())  # its resume points found by the decode's walk
    version_2 = Recipe.decode(one_frame(built).encode())  # one frame: resumes by skipping
    assert len(built.frames) == 3 and version_2.frames == ()
    starts, offset = [], 0
    for entry in entries:
        starts.append(offset)
        offset += len(entry.data) if isinstance(entry, Raw) else entry.size
    probes = {0, 1, offset - 1, offset}
    for resume in (RESUME_EVERY, 2 * RESUME_EVERY):
        for at in range(resume - 3, resume + 3):
            probes |= {starts[at] - 1, starts[at], starts[at] + 1}
    for tar_offset in sorted(probes):
        expected = [
            (start, entry)
            for start, entry in zip(starts, entries, strict=True)
            if start + (len(entry.data) if isinstance(entry, Raw) else entry.size) > tar_offset
        ]
        for recipe in (built, decoded, version_2):
            assert list(recipe.entries_from(tar_offset)) == expected, tar_offset


def many_entries(count: int) -> list[Raw | FileRef]:
    return [
        FileRef(hashlib.sha256(b"%d" % n).digest(), n % 9) if n % 2 else Raw(b"h" * (1 + n % 5))
        for n in range(count)
    ]


def in_frames_of_4(count: int) -> Recipe:
    """A recipe of `count` entries whose body has a frame per 4 of them."""
    return build_recipe(many_entries(count), frame_entries=4, **EXAMPLE_METADATA)  # type: ignore[arg-type]


def test_a_walk_from_an_offset_decompresses_only_the_frames_from_its_own() -> None:
    """Frame 0 of the body zeroed after the decode: a whole walk fails on it, a walk
    from an offset in a later frame never reads it."""
    recipe = Recipe.decode(in_frames_of_4(10).encode())
    assert recipe.frames and len(recipe.frames) == 3
    offsets = list(itertools.accumulate(
        len(e.data) if isinstance(e, Raw) else e.size for e in recipe.entries()))  # fmt: skip
    damaged = bytes(recipe.frames[0]) + recipe.body[recipe.frames[0] :]
    broken = dataclasses.replace(recipe, body=damaged)
    broken._resumes[:] = recipe._resumes
    with pytest.raises(RecipeError):
        list(broken.entries())
    tail = list(broken.entries_from(offsets[4]))
    assert [entry for _offset, entry in tail] == list(recipe.entries())[5:]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: {"frames": r.frames[:-1]}, "cannot hold"),
        (lambda r: {"frames": (*r.frames[:-1], r.frames[-1] + 1)}, "the body has"),
        (lambda r: {"frames": (r.frames[1], r.frames[0], *r.frames[2:])}, "not valid zstd"),
        (lambda r: {"frame_entries": 3}, "cannot hold"),
        (  # two frames of 4 entries read as one of 5: it holds 3 more
            lambda r: {"frame_entries": 5, "frames": (r.frames[0] + r.frames[1], r.frames[2])},
            "after the last recipe entry",
        ),
    ],
)
def test_a_frame_table_that_does_not_fit_the_body_is_rejected(
    change: Callable[[Recipe], dict[str, object]], message: str
) -> None:
    """Frames that cannot hold the entries, lengths that do not add up to the body, and
    frames that do not end where their entries do, each with a valid checksum."""
    recipe = in_frames_of_4(10)
    assert len(recipe.frames) == 3 and recipe.frames[0] != recipe.frames[1]
    with pytest.raises(RecipeError, match=message):
        Recipe.decode(dataclasses.replace(recipe, **change(recipe)).encode())  # type: ignore[arg-type]


def test_trailing_bytes_after_body_are_rejected() -> None:
    encoded = example_recipe().encode()
    with pytest.raises(RecipeError, match="after the recipe body"):
        Recipe.decode(resigned(encoded[:-32] + b"\0"))


def test_non_utf8_text_field_is_rejected() -> None:
    encoded = example_recipe().encode()
    digest_length = encoded[5]
    broken = encoded[:6] + b"\xff" + encoded[7:-32]
    assert digest_length == len(str(EXAMPLE_METADATA["blob_digest"]))
    with pytest.raises(RecipeError, match="UTF-8"):
        Recipe.decode(resigned(broken))


def test_builder_misuse() -> None:
    builder = RecipeBuilder()
    with pytest.raises(ValueError):
        builder.add_file(b"short", 1)
    builder.add_raw(b"")  # adds nothing
    recipe = builder.finish(**EXAMPLE_METADATA)  # type: ignore[arg-type]
    assert recipe.entry_count == 0
    with pytest.raises(RecipeError):
        builder.add_raw(b"late")
    with pytest.raises(RecipeError):
        builder.finish(**EXAMPLE_METADATA)  # type: ignore[arg-type]


# --- the ingest path: split once, build the recipe, restore ----------------------------


def ingest(stream: io.BytesIO) -> tuple[Recipe, dict[bytes, bytes], int]:
    """Split a tar into a recipe and a content store, as the ingest pipeline does."""
    reader = HashingReader(stream)
    builder = RecipeBuilder()
    store: dict[bytes, bytes] = {}
    for segment in split_tar(reader):
        if isinstance(segment, Payload):
            sha = hashlib.sha256()
            chunks = []
            for chunk in segment.chunks():
                sha.update(chunk)
                chunks.append(chunk)
            store[sha.digest()] = b"".join(chunks)
            builder.add_file(sha.digest(), segment.bytes_read)
        else:
            builder.add_raw(segment.data)
    recipe = builder.finish(
        blob_digest="sha256:" + "0" * 64,
        blob_size=0,
        tar_sha256=reader.sha256(),
        encoder_id="identity",
        encoder_params=b"",
    )
    return recipe, store, reader.size


def restore(encoded: bytes, store: dict[bytes, bytes]) -> bytes:
    recipe = Recipe.decode(encoded)
    return b"".join(join_tar(recipe.entries(), lambda ref: [store[ref.digest]]))


@settings(max_examples=100, deadline=None)
@given(data=damaged_tars())
def test_ingest_then_restore_is_byte_exact(data: bytes) -> None:
    recipe, store, size = ingest(io.BytesIO(data))
    assert (recipe.tar_size, recipe.tar_sha256) == (size, hashlib.sha256(data).digest())
    assert restore(recipe.encode(), store) == data


def test_recipe_size_for_a_real_tar(tmp_path: Path) -> None:
    source = Path("/usr/share/doc")
    if not source.is_dir():
        pytest.skip("no /usr/share/doc to archive")
    data = subprocess.run(
        ["tar", "-cf", "-", "-C", str(source.parent), source.name], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = sum(1 for _ in archive)
    recipe, store, _ = ingest(io.BytesIO(data))
    encoded = recipe.encode()
    assert restore(encoded, store) == data
    per_member = len(encoded) / members
    print(
        f"\n{members} members, {len(data)} tar bytes, {len(store)} unique files: "
        f"recipe {len(encoded)} bytes = {per_member:.1f} bytes/member"
    )
    assert per_member < 120
