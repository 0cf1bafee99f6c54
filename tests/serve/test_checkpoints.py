"""Checkpoints: found in real producers' blobs, proven segment by segment, joined bit by
bit, and a parallel restore that equals the serial one (on a live stack too).

No mocks: blobs come from the producers' own code (Python's gzip/zlib, the Go helpers'
gzip mode, pgzip), segments are re-encoded by the encoders that restores use.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import itertools
import os
import random
import subprocess
import sysconfig
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zstandard

from deploy.stack import wait_until
from pipelines.encoders.base import FEED_CHUNK, Encoder, thread_cpu_seconds
from pipelines.encoders.gzip_families import GoStdlibEncoder, PgzipEncoder, encode_gzip_params
from pipelines.encoders.libz import zlib_segment
from pipelines.encoders.table import lookup_encoder
from pipelines.formats import Buffer, Pieces
from pipelines.formats.recipe import Recipe
from pipelines.formats.verify import FIRST_SEGMENT_BYTES
from pipelines.serve import restore
from pipelines.serve.checkpoints import (
    AVOID_MARGIN,
    CHECKPOINT_SPACING,
    CUTS_PER_FILE,
    FIRST_SEGMENT_TAR_BYTES,
    KEPT_WHOLE_BYTES,
    MAX_CUT_FILE_BYTES,
    MIN_CHECKPOINT_SPACING,
    Checkpoint,
    CheckpointError,
    Checkpoints,
    Segment,
    SegmentError,
    boundaries,
    checkpoint_spacing,
    checkpoints_key,
    choose_candidates,
    choose_candidates_avoiding,
    edge_masked,
    encode_segment,
    find_and_prove,
    find_candidates,
    gzip_payload,
    join_segments,
    prove,
    segment_input,
)
from pipelines.serve.cores import BACKGROUND_DEFER_SECONDS, HostCores, Turn, turn_now
from pipelines.serve.rebuild import RestoreError
from pipelines.serve.restore import (
    SegmentRunner,
    load_checkpoints,
    local_runner,
    restore_blob,
    segment_cuts,
)
from pipelines.store.filestore import FileStore
from tests.client import RegistryClient
from tests.conftest import LiveStack, PausePoints
from tests.layers import make_tar, push_layers, wait_for_layers, wait_until_retired
from tests.serve.test_cores import Hold, hold_every_core_elsewhere, inversions
from workers.app import make_celery
from workers.jobs import restore_workers_runner
from workers.tasks import encode_segment as encode_segment_task

SPACING = 256 << 10  # small layers, many checkpoints
PGZIP = "gzip/pgzip-deb-1.2.5-2+compress-deb-1.15.12+ds1-3"


# --------------------------------------------------------------------------- inputs


def mixed_random_tar(seed: int, size: int = 3_000_000) -> bytes:
    """Random bytes, zeros and repeated text in random-sized files: stored, fixed and
    dynamic blocks, long and short matches."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    total = 0
    while total < size:
        n = rng.randint(1_000, 150_000)
        kind = rng.random()
        if kind < 0.3:
            content = rng.randbytes(n)
        elif kind < 0.45:
            content = bytes(n)
        else:
            words = [
                rng.choice([b"usr", b"lib", b"share", b"doc", b"0644", b"\n"]) for _ in range(50)
            ]
            content = (b" ".join(words) * (n // 200 + 1))[:n]
        files[f"f/{len(files):05d}"] = content
        total += n
    return make_tar(files)


def real_tar(size: int = 3_000_000) -> bytes:
    """Real files: Python's standard library sources and its compiled extension modules
    (text and machine code), as GNU tar writes them."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["platstdlib"]) / "lib-dynload"]
    picked: list[str] = []
    total = 0
    candidates = sorted(roots[1].glob("*.so"))[:12] + sorted(roots[0].glob("*.py"))
    for path in candidates:
        picked.append(str(path))
        total += path.stat().st_size
        if total >= size:
            break
    return subprocess.run(
        ["tar", "-cf", "-", "--absolute-names", *picked], capture_output=True, check=True
    ).stdout


@pytest.fixture(scope="module", params=["random", "real"])
def tar(request: pytest.FixtureRequest) -> bytes:
    return mixed_random_tar(7) if request.param == "random" else real_tar()


def python_gzip(level: int) -> Callable[[bytes], bytes]:
    def produce(data: bytes) -> bytes:
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0) as gz:
            for start in range(0, len(data), 10_000):
                gz.write(data[start : start + 10_000])
        return out.getvalue()

    return produce


def helper_gzip(helper_dir: Path, name: str, *args: str) -> Callable[[bytes], bytes]:
    if not (helper_dir / name).exists():
        pytest.skip(f"{name} was not built")

    def produce(data: bytes) -> bytes:
        argv = [str(helper_dir / name), "-mode", "gzip", *args]
        return subprocess.run(argv, input=data, capture_output=True, check=True).stdout

    return produce


def producer(helper_dir: Path, encoder_id: str) -> Callable[[bytes], bytes]:
    """The producer of `encoder_id`'s layers, sharing no code with segment encoding."""
    family, _, level = encoder_id.rpartition("/")
    if family.startswith("gzip/zlib"):
        return python_gzip(int(level))
    if family.startswith("gzip/go"):
        return helper_gzip(helper_dir, f"gzip-{family[5:]}", "-level", level)
    block = family.rpartition("/b")[2]
    return helper_gzip(helper_dir, "gzip-pgzip-deb", "-blocksize", block, "-level", level)


def gzip_params(blob: bytes) -> bytes:
    header_len = 10  # these producers write no name, comment or extra field
    return encode_gzip_params(blob[:header_len], blob[-8:])


def ranged(blob: bytes) -> Callable[[int, int], Iterator[bytes]]:
    return lambda offset, length: iter([blob[offset : offset + length]])


def joined(encoder: Encoder, plan: Checkpoints, tar: bytes, threads: int) -> bytes:
    """A parallel re-encode of the body from `plan`, on `threads` threads."""
    segments = plan.segments()

    def one(segment: Segment) -> memoryview:
        return encode_segment(encoder, segment, slice_of(tar), len(tar))

    with ThreadPoolExecutor(threads) as pool:
        bits = list(pool.map(one, segments))
    return b"".join(join_segments(zip(bits, segments, strict=True)))


# --------------------------------------------------------------------------- every encoder

# Proven in full (every candidate) on these inputs; the others are shown exact anyway.
RESUMABLE = [
    *(f"gzip/zlib-1.2.13/{level}" for level in (4, 5, 6, 7, 8, 9)),  # Python gzip, Java, Jib
    *(f"gzip/go1.26/{level}" for level in (-2, 0, 4, 5, 6, 7, 8, 9)),  # docker, BuildKit
    *(f"gzip/go1.27/{level}" for level in (-2, 0, 2, 3, 5, 6)),
    f"{PGZIP}/b1048576/5",  # skopeo, podman, buildah
    f"{PGZIP}/b1048576/9",
    f"{PGZIP}/b262144/5",  # umoci
]
# Resumed only where their state happens to be rebuilt; measured rates in the report.
PARTLY = [
    *(f"gzip/zlib-1.2.13/{level}" for level in (1, 2, 3)),  # skip hashing inside matches
    "gzip/go1.26/1",  # crane, ko, kaniko: table rebuilt from three chunks
    "gzip/go1.27/1",
    "gzip/go1.26/2",  # skip hashing inside matches
    "gzip/go1.26/3",
    "gzip/go1.27/4",  # its tables are not rebuilt by three chunks of history
]


@pytest.mark.parametrize("encoder_id", RESUMABLE + PARTLY)
def test_checkpoints_are_proven_and_the_parallel_restore_is_exact(
    helper_dir: Path, tar: bytes, encoder_id: str
) -> None:
    blob = producer(helper_dir, encoder_id)(tar)
    encoder = lookup_encoder(encoder_id)
    payload = gzip_payload(ranged(blob), len(blob), gzip_params(blob))
    body = blob[10:-8]
    with ThreadPoolExecutor(4) as pool:
        proof = find_and_prove(
            encoder, "sha256:" + sha256(blob), len(tar), payload, slice_of(tar), pool, SPACING
        )
    plan = proof.checkpoints
    assert plan is not None, "segment 0 is the serial encoder: it must reproduce the blob"
    assert plan.candidates >= (2 if "/b1048576/" in encoder_id else 5)
    if encoder_id in RESUMABLE:
        assert len(plan.points) == plan.candidates
        byte_aligned = encoder_id.startswith(PGZIP) or encoder_id.endswith("/0")  # stored
        assert any(point.bit_offset % 8 for point in plan.points) != byte_aligned
    for threads in (1, 2, 4):
        assert joined(encoder, plan, tar, threads) == body
    serial = b"".join(encoder.body([tar], b""))
    assert serial == body


def slice_of(tar: bytes, piece: int = 100_003) -> Callable[[int, int], list[bytes]]:
    """Tar bytes [start, end) in pieces as a rebuild yields them: cut at every multiple
    of `piece` (an odd size, so no piece's edge falls on a segment's)."""

    def read(start: int, end: int) -> list[bytes]:
        edges = [start, *range((start // piece + 1) * piece, end, piece), end]
        return [tar[a:b] for a, b in itertools.pairwise(edges)]

    return read


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("encoder_id", ["gzip/zlib-1.2.13/6", "gzip/go1.26/6"])
def test_a_checkpoint_that_fails_its_proof_is_dropped(
    helper_dir: Path, tar: bytes, encoder_id: str
) -> None:
    """A candidate one byte off its block boundary resumes with the wrong state: its
    segment differs from the pushed bits, it is dropped (its segment joins the one before),
    the others stand, and the restore is exact."""
    blob = producer(helper_dir, encoder_id)(tar)
    encoder = lookup_encoder(encoder_id)
    body = blob[10:-8]
    candidates = choose_candidates(boundaries([body]), len(tar), encoder.resumable_at, SPACING)
    bad = replace(candidates[2], tar_offset=candidates[2].tar_offset + 1)
    candidates[2] = bad
    plan = Checkpoints("sha256:x", encoder_id, len(tar), len(body) * 8, tuple(candidates))

    def encoded(segment: Segment) -> memoryview | None:
        return encode_segment(encoder, segment, slice_of(tar), len(tar))

    with ThreadPoolExecutor(2) as pool:
        proof = prove(
            plan, encoded, lambda s: edge_masked(bytearray(body[s.bit_start // 8 :]), s), pool
        )
    assert proof.checkpoints is not None and proof.rounds == 2
    assert bad not in proof.checkpoints.points
    assert len(proof.checkpoints.points) == len(candidates) - 1
    assert joined(encoder, proof.checkpoints, tar, 2) == body


@pytest.mark.parametrize(
    "encoder_id",
    [
        "gzip/zlib-1.2.13/0",  # stored blocks follow the caller's buffers
        *(f"gzip/go1.27/{level}" for level in (7, 8, 9)),  # literal-cost estimates
    ],
)
def test_encoders_without_checkpoints_offer_none(
    helper_dir: Path, tar: bytes, encoder_id: str
) -> None:
    blob = producer(helper_dir, encoder_id)(tar)
    encoder = lookup_encoder(encoder_id)
    payload = gzip_payload(ranged(blob), len(blob), gzip_params(blob))
    assert not find_candidates(encoder, "sha256:x", len(tar), payload, SPACING).points


def test_a_wrong_encoder_is_refused() -> None:
    """Segment 0 is the serial encoder: a blob that zlib 6 did not make is not proven."""
    data = mixed_random_tar(3, 1_500_000)
    blob = python_gzip(9)(data)
    with ThreadPoolExecutor(2) as pool:
        proof = find_and_prove(
            lookup_encoder("gzip/zlib-1.2.13/1"),
            "sha256:x",
            len(data),
            gzip_payload(ranged(blob), len(blob), gzip_params(blob)),
            slice_of(data),
            pool,
            SPACING,
        )
    assert proof.checkpoints is None


# --------------------------------------------------------------------------- bits and format


def cut(stream: bytes, bit_offsets: list[int]) -> list[tuple[memoryview, Segment]]:
    """Segments of `stream` at these bit offsets, each as its encoder would give it: the
    bytes it touches, starting `offset % 8` bits into the first (as after deflatePrime)."""
    edges = [0, *bit_offsets, len(stream) * 8]
    parts = []
    for index, (start, end) in enumerate(itertools.pairwise(edges)):
        segment = Segment(index, index, index + 1, start, end, end == edges[-1])
        junk = bytes([0xA5]) * 3  # what an encoder writes after the segment's end
        data = edge_masked(
            bytearray(stream[start // 8 :]) + (b"" if segment.final else junk), segment
        )
        assert data is not None
        parts.append((data, segment))
    return parts


def test_join_at_odd_bit_offsets() -> None:
    rng = random.Random(11)
    stream = rng.randbytes(5000)
    offsets = sorted(rng.sample(range(1, len(stream) * 8), 300))
    assert sum(o % 8 != 0 for o in offsets) > 200
    assert b"".join(join_segments(cut(stream, offsets))) == stream


def test_join_of_segments_within_one_byte() -> None:
    stream = bytes([0b10110110, 0b01101101, 0xFF])
    assert b"".join(join_segments(cut(stream, [1, 2, 3, 5, 9, 10, 15, 16]))) == stream


def test_join_refuses_a_gap() -> None:
    parts = cut(bytes(range(40)), [13, 77])
    with pytest.raises(SegmentError):
        b"".join(join_segments([parts[0], parts[2]]))


@pytest.mark.parametrize("level", range(1, 10))
def test_a_zlib_segment_deflated_in_one_call_is_the_stream_fed_in_pieces(
    tar: bytes, level: int
) -> None:
    """A zlib segment is deflated in one call; the whole-stream encoder, and the producers
    it stands for, feed 64 KiB at a time (or 10,000 bytes: python_gzip). At levels 1-9 the
    output is the same: on this tar, on random, zero and repetitive bytes, with and
    without a dictionary, sync-flushed and finished."""
    rng = random.Random(level)
    inputs = [tar[:3_000_000], rng.randbytes(300_000), bytes(300_000), b"layer" * 60_000]
    for data in inputs:
        for history, final in ((b"", True), (data[:32_768], False), (data[:32_768], True)):
            rest = data[len(history) :]
            for feed in (FEED_CHUNK, 10_000):
                compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 8, 0, zdict=history)
                pieces = [
                    compressor.compress(rest[a : a + feed]) for a in range(0, len(rest), feed)
                ]
                pieces.append(compressor.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH))
                whole = zlib_segment(level, [history], [rest[:-4096]], [rest[-4096:]], final, 0)
                assert bytes(whole) == b"".join(pieces)


def test_edge_masking() -> None:
    segment = Segment(1, 0, 1, 13, 13 + 14, False)  # bits 5..18 of its bytes
    assert edge_masked(bytearray([0xFF] * 4), segment) == memoryview(bytes([0xE0, 0xFF, 0x07]))
    assert edge_masked(bytearray([0xFF] * 2), segment) is None
    final = Segment(1, 0, 1, 13, 24, True)
    assert edge_masked(bytearray([0xFF, 0xFF, 0x00]), final) == memoryview(bytes([0xE0, 0xFF]))
    assert edge_masked(bytearray([0xFF, 0xFF, 0x01]), final) is None


def plan_example() -> Checkpoints:
    points = (Checkpoint(5_000_000, 9_999_999), Checkpoint(9_000_000, 20_000_003))
    return Checkpoints("sha256:" + "ab" * 32, "gzip/go1.26/6", 12_345_678, 30_000_000, points, 5)


@pytest.mark.parametrize("encoder_id", ["gzip/zlib-1.2.13/6", "gzip/go1.27/6"])
def test_segments_are_cut_from_one_pass_over_the_tar(encoder_id: str) -> None:
    """Each segment's input, history and lookahead included, as the tar holds it,
    whatever the sizes of the chunks the tar comes in; a short tar is an error."""
    encoder = lookup_encoder(encoder_id)
    plan = plan_example()
    tar = random.Random(7).randbytes(plan.tar_size)
    rng = random.Random(8)
    cuts = [0, *sorted(rng.sample(range(1, len(tar)), 300)), len(tar)]
    chunks = [tar[a:b] for a, b in itertools.pairwise(cuts)]
    segments = plan.segments()
    got = list(segment_cuts(encoder, segments, iter(chunks), len(tar)))
    assert [segment for segment, _, _ in got] == segments
    for segment, start, window in got:
        expected_start, end = segment_input(encoder, segment, len(tar))
        assert start == expected_start and b"".join(window) == tar[start:end]
    with pytest.raises(RestoreError, match="ends before"):
        list(segment_cuts(encoder, segments, iter([tar[:9_500_000]]), len(tar)))


def test_format_round_trip() -> None:
    plan = plan_example()
    encoded = plan.encode()
    assert encoded.startswith(b"DHCk\x01")
    assert Checkpoints.decode(encoded) == plan
    assert len(encoded) < 200
    assert [s.tar_end - s.tar_start for s in plan.segments()] == [5_000_000, 4_000_000, 3_345_678]
    assert checkpoints_key(plan.blob_digest) == "checkpoints/sha256/" + "ab" * 32


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],
        lambda b: b"DHCx" + b[4:],
        lambda b: b[:4] + b"\x02" + b[5:],
        lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:],
        lambda b: b"",
    ],
)
def test_damaged_objects_are_refused(damage: Callable[[bytes], bytes]) -> None:
    with pytest.raises(CheckpointError):
        Checkpoints.decode(damage(plan_example().encode()))


def test_checkpoints_must_lie_inside_the_stream() -> None:
    with pytest.raises(CheckpointError):
        replace(plan_example(), points=(Checkpoint(13_000_000, 1),))


# --------------------------------------------------------------------------- live


def layer_tar(megabytes: int, unique: bool = False) -> bytes:
    """Real files of several kinds, repeated with a varying prefix so that the layer is
    large but its files are few; `unique`: prefixes no other layer has."""
    base = real_tar(2_000_000)
    salt = os.urandom(16) if unique else b""
    files = {f"copy{n}/stdlib.tar": salt + (b"%d" % n) + base for n in range(megabytes // 2)}
    return make_tar(files)


@pytest.fixture(scope="module")
def go_layer(helper_dir: Path) -> tuple[bytes, bytes]:
    """A docker-style layer (Go <= 1.26, level 6) of ~14 MB of tar: a few segments."""
    data = layer_tar(14)
    return data, helper_gzip(helper_dir, "gzip-go1.26", "-level", "6")(data)


def deduplicated_recipe(
    live: LiveStack, client: RegistryClient, repo: str, blob: bytes
) -> tuple[str, Recipe]:
    (digest,) = push_layers(client, repo, [blob])
    assert wait_for_layers(live, [digest])[digest]["state"] == "deduplicated"
    wait_until_retired(live, digest)
    info = live.registry.blobs.stored_info(digest)
    assert info is not None and info.recipe is not None
    return digest, Recipe.decode(live.registry.store.get_bytes(info.recipe))


def test_live_layer_restores_in_parallel_byte_exact(
    live: LiveStack, client: RegistryClient, repo: str, go_layer: tuple[bytes, bytes]
) -> None:
    blob = go_layer[1]
    digest, recipe = deduplicated_recipe(live, client, repo, blob)
    plan = load_checkpoints(recipe, live.registry.store)
    assert plan is not None and len(plan.points) >= 2, "a layer of a few segments has checkpoints"
    first = plan.points[0].tar_offset  # a short first segment: the first bytes leave early
    assert FIRST_SEGMENT_TAR_BYTES <= first < checkpoint_spacing(len(go_layer[0]))
    assert recipe.segments is not None and recipe.segments.ends[0] == FIRST_SEGMENT_BYTES
    stored = live.registry.store.size(checkpoints_key(digest))
    assert stored is not None and stored < len(blob) // 100
    for threads in (1, 2, 4):
        assert b"".join(release_through(recipe, live, local_runner(threads))) == blob
    assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == blob
    start = len(blob) // 2 + 3
    headers = {"Range": f"bytes={start}-{start + 99_999}"}
    response = client.request("GET", f"/v2/{repo}/blobs/{digest}", headers=headers)
    assert response.status == 206 and response.data == blob[start : start + 100_000]


def test_live_small_layer_gets_segments_too(
    live: LiveStack, client: RegistryClient, repo: str
) -> None:
    """A layer of ~4 MB of tar, under two large-layer spacings, is cut into segments of
    about a MiB, so that its restore runs on every core; the restore stays exact."""
    data = layer_tar(4)
    assert 2 * MIN_CHECKPOINT_SPACING < len(data) < 2 * CHECKPOINT_SPACING
    blob = python_gzip(6)(data)
    digest, recipe = deduplicated_recipe(live, client, repo, blob)
    plan = load_checkpoints(recipe, live.registry.store)
    assert plan is not None and len(plan.points) >= 2
    assert all(
        segment.tar_end - segment.tar_start <= checkpoint_spacing(len(data)) * 2
        for segment in plan.segments()
    )
    assert b"".join(release_through(recipe, live, local_runner(2))) == blob
    assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == blob


def test_live_layer_with_a_file_too_large_for_one_segment_restores_in_parallel(
    live: LiveStack, client: RegistryClient, repo: str
) -> None:
    """A 40 MB file between small ones: checkpoints inside it are proven at ingest, and the
    layer restores in parallel (on this host's threads and on restore workers), exact."""
    base = real_tar(2_000_000)
    big = b"".join((b"%d" % n) + base for n in range(20))
    files = {"small/a": base[:300_000], "big.bin": big, "small/b": base[300_000:900_000]}
    data = make_tar(files)
    blob = python_gzip(6)(data)
    digest, recipe = deduplicated_recipe(live, client, repo, blob)
    plan = load_checkpoints(recipe, live.registry.store)
    assert plan is not None, "no checkpoint: the layer would restore serially"
    start = data.index(big[:4096])
    inside = [p for p in plan.points if start <= p.tar_offset < start + len(big)]
    assert CUTS_PER_FILE - 1 <= len(inside) <= CUTS_PER_FILE, inside  # 40 MB: every 5 MB
    assert b"".join(release_through(recipe, live, local_runner(2))) == blob
    runner = restore_workers_runner(make_celery(live.settings), remote_slots=2)
    assert b"".join(release_through(recipe, live, runner)) == blob
    middle = len(blob) // 2
    headers = {"Range": f"bytes={middle}-{middle + 99_999}"}
    response = client.request("GET", f"/v2/{repo}/blobs/{digest}", headers=headers)
    assert response.status == 206 and response.data == blob[middle : middle + 100_000]


@pytest.mark.parametrize("runner", ["local", "pooled"])
def test_a_parallel_restore_counts_its_segment_threads_cpu_as_its_own(
    live: LiveStack, client: RegistryClient, repo: str, runner: str
) -> None:
    """The restore CPU a registry reports is what the restoring thread measures: the
    encoding its segment threads did for it is counted there, not lost."""
    blob = python_gzip(6)(layer_tar(4))
    _, recipe = deduplicated_recipe(live, client, repo, blob)
    runners = {
        "local": local_runner(2),
        "pooled": restore.pooled_runner([restore.encode_stored_segment] * 2),
    }
    process_started, thread_started = time.process_time(), thread_cpu_seconds()
    assert b"".join(release_through(recipe, live, runners[runner])) == blob
    counted = thread_cpu_seconds() - thread_started
    spent = time.process_time() - process_started
    assert counted >= 0.8 * spent, f"counted {counted:.3f} s of the {spent:.3f} s spent"


def _a_layer_of_segments(
    live: LiveStack, client: RegistryClient, repo: str
) -> tuple[Recipe, Checkpoints, FileStore, list[Buffer]]:
    """A deduplicated layer of at least 3 checkpointed segments: its recipe, plan, file
    store and the bits of its segments."""
    blob = python_gzip(6)(layer_tar(4))
    _, recipe = deduplicated_recipe(live, client, repo, blob)
    plan = load_checkpoints(recipe, live.registry.store)
    assert plan is not None and len(plan.segments()) >= 3
    files = live.registry.files
    return recipe, plan, files, list(local_runner(1)(recipe, files, plan))


@pytest.mark.parametrize("runner", ["local", "pooled"])
def test_concurrent_restores_share_the_processs_cores(
    live: LiveStack, client: RegistryClient, repo: str, runner: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Three layers restoring at once in one process, each on more threads than there
    are cores, encode at most RESTORE_THREADS segments at a time between them (the cores
    are not oversubscribed), and that many do run at once (they are not left idle); each
    restore stays exact."""
    recipe, plan, files, expected = _a_layer_of_segments(live, client, repo)
    running, most, lock = 0, 0, threading.Lock()

    def counted(*args: Any) -> memoryview:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(0.05)  # long enough for the other restores' segments to pile up
            return encode_segment(*args)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(restore, "encode_segment", counted)
    threads = 2 * restore.RESTORE_THREADS
    runners = {
        "local": local_runner(threads),
        "pooled": restore.pooled_runner([restore.encode_stored_segment] * threads),
    }

    def restored(_: int) -> list[Buffer]:
        return list(runners[runner](recipe, files, plan))

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(restored, range(3))) == [expected] * 3
    assert most == restore.RESTORE_THREADS


class _RecordingCores(HostCores):
    """The host's cores, noting each piece of work's turn and when it asked for a core
    and was granted one: a core taken, or one its thread kept from its last piece (no
    older turn waiting)."""

    def __init__(self, cores: HostCores) -> None:
        super().__init__(cores.directory, cores.count)
        self.holds: list[Hold] = []
        self.taken: list[Turn] = []  # the turns of the cores taken, not kept

    @contextlib.contextmanager
    def held(self, turn: Turn | None = None) -> Iterator[None]:
        turn = turn or turn_now()
        asked = time.monotonic()
        with super().held(turn):
            self.holds.append(Hold(turn, asked, time.monotonic(), 0.0))
            self.taken.append(turn)
            yield

    def older_waiting(self, turn: Turn) -> bool:
        older = super().older_waiting(turn)
        if not older:  # the core is kept for `turn`
            now = time.monotonic()
            self.holds.append(Hold(turn, now, now, 0.0))
        return older


@pytest.mark.parametrize("runner", ["local", "pooled"])
def test_concurrent_restores_take_the_cores_oldest_first(
    live: LiveStack, client: RegistryClient, repo: str, runner: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Three restores of a layer begun one after the other, each segment held 0.2 s on
    its core: every segment asks in its restore's turn (the restore's start, its index),
    and no segment of an older restore that waited waits longer than one of a younger
    restore granted meanwhile (the restores take turns; each stays exact)."""
    recipe, plan, files, expected = _a_layer_of_segments(live, client, repo)
    cores = _RecordingCores(restore._segment_cores)
    monkeypatch.setattr(restore, "_segment_cores", cores)

    def slow(*args: Any) -> memoryview:
        time.sleep(0.2)
        return encode_segment(*args)

    monkeypatch.setattr(restore, "encode_segment", slow)
    runners = {
        "local": local_runner(2),
        "pooled": restore.pooled_runner([restore.encode_stored_segment] * 2),
    }

    def restored(number: int) -> list[Buffer]:
        time.sleep(0.05 * number)
        return list(runners[runner](recipe, files, plan))

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(restored, range(3))) == [expected] * 3
    began = sorted({hold.turn[0] for hold in cores.holds})
    indexes = list(range(len(plan.segments())))
    assert len(began) == 3
    for start in began:
        assert sorted(hold.turn[1] for hold in cores.holds if hold.turn[0] == start) == indexes
    assert inversions(cores.holds) == []


def _segment_0_ends_first(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Segments encoded slowly, segment 0 first and alone; the indexes as they begin."""
    begun: list[int] = []

    def slow(encoder: Encoder, segment: Segment, *args: Any) -> memoryview:
        begun.append(segment.index)
        time.sleep(0.3 if segment.index == 0 else 1.0)
        return encode_segment(encoder, segment, *args)

    monkeypatch.setattr(restore, "encode_segment", slow)
    return begun


def _asked_while_segment_0_ends(
    cores: _RecordingCores, points: PausePoints, restoring: Callable[[], list[Buffer]],
    turn_of: Callable[[int], Turn], hold_seconds: float,
) -> tuple[list[Buffer], list[float]]:  # fmt: skip
    """A restore's segment 0 is stopped once encoded, its core still held (pause point
    `restore.segment_encoded`), while another turn (`turn_of` the restore's start) asks
    for a core and waits: the restore's bits, and when that other turn was granted."""
    points.hold("restore.segment_encoded", "0")
    granted: list[float] = []

    def ask_once(began: int) -> None:
        with cores.held(turn_of(began)):
            granted.append(time.monotonic())
            time.sleep(hold_seconds)

    with ThreadPoolExecutor(2) as pool:
        restored = pool.submit(restoring)
        try:
            points.wait_reached("restore.segment_encoded")
            began = min(hold.turn[0] for hold in cores.holds)
            asker = pool.submit(ask_once, began)
            wait_until(lambda: cores.waiting() >= 1, "the other turn waiting", interval=0.01)
        finally:
            points.release_all()
        asker.result()
        return restored.result(), granted


def test_a_restore_keeps_its_cores_from_a_younger_waiter_between_its_segments(
    live: LiveStack, client: RegistryClient, repo: str, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The thread that encoded a restore's segment 0 keeps its core for segment 2 while
    a younger turn (another restore, an ingest's proof) waits: segment 2 begins before
    the younger is granted, which waits for the restore's segments to end, and its core
    was never let go (a thread that lets it go and asks again can wait milliseconds for
    the GIL in between, and the younger takes it)."""
    recipe, plan, files, expected = _a_layer_of_segments(live, client, repo)
    points = PausePoints(tmp_path / "pauses")
    monkeypatch.setenv(*points.environment().popitem())
    cores = _RecordingCores(HostCores(None, restore.RESTORE_THREADS))
    monkeypatch.setattr(restore, "_segment_cores", cores)
    begun = _segment_0_ends_first(monkeypatch)
    bits, granted = _asked_while_segment_0_ends(
        cores, points, lambda: list(local_runner()(recipe, files, plan)),
        lambda began: turn_now(), hold_seconds=0,
    )  # fmt: skip
    assert bits == expected
    assert begun[:3] in ([0, 1, 2], [1, 0, 2])
    kept = [hold for hold in cores.holds if hold.turn[1] == 2]
    assert len(kept) == 1 and kept[0].granted < granted[0], "segment 2 before the younger"
    assert kept[0].turn not in cores.taken, "segment 2's core let go and taken again"


def test_a_restore_gives_its_core_back_to_an_older_waiter_between_its_segments(
    live: LiveStack, client: RegistryClient, repo: str, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:  # fmt: skip
    """An older turn waiting when segment 0 ends (a restore begun earlier) gets the
    core before segment 2: a thread keeps its core only while no older turn waits."""
    recipe, plan, files, expected = _a_layer_of_segments(live, client, repo)
    points = PausePoints(tmp_path / "pauses")
    monkeypatch.setenv(*points.environment().popitem())
    cores = _RecordingCores(HostCores(None, restore.RESTORE_THREADS))
    monkeypatch.setattr(restore, "_segment_cores", cores)
    _segment_0_ends_first(monkeypatch)

    bits, granted = _asked_while_segment_0_ends(
        cores, points, lambda: list(local_runner()(recipe, files, plan)),
        lambda began: (began - 1, 0), hold_seconds=0.5,
    )  # fmt: skip
    assert bits == expected
    segment_2 = [hold for hold in cores.holds if hold.turn[1] == 2]
    assert len(segment_2) == 1 and segment_2[0].granted > granted[0] + 0.4


def test_the_apis_processes_encode_segments_on_the_hosts_cores(
    live: LiveStack, client: RegistryClient, repo: str
) -> None:
    """The API's processes take a core of the host for each segment, shared with every
    other process of the host (its spool directory's `cores`): while another process
    holds them all, a cold GET waits; once that process is killed -9, its cores are free
    and the GET is served exact (a layer no other test pushed: none is in the buffer)."""
    blob = python_gzip(6)(layer_tar(4, unique=True))
    digest, recipe = deduplicated_recipe(live, client, repo, blob)
    assert load_checkpoints(recipe, live.registry.store) is not None
    restores = live.registry.index.counters().get("restores", 0)
    holder = hold_every_core_elsewhere(live.settings.spool_dir / "cores")
    served: list[bytes] = []
    getter = threading.Thread(
        target=lambda: served.append(client.request("GET", f"/v2/{repo}/blobs/{digest}").data)
    )
    getter.start()
    try:
        getter.join(1.5)
        assert not served, "a segment was encoded on a core another process holds"
    finally:
        holder.kill()
    getter.join(60)
    assert served == [blob]
    assert live.registry.index.counters().get("restores", 0) > restores


def _tickets_of_background_work(waiting: Path) -> list[str]:
    """The tickets in the host's queue whose turn lies over half a minute ahead: only
    background work (an ingest's proof) asks for a core in such a turn."""
    ahead = time.time_ns() + BACKGROUND_DEFER_SECONDS * 1e9 / 2
    names = [name for name in os.listdir(waiting) if not name.startswith(".")]
    return [name for name in names if int(name.split("-")[0]) > ahead]


def test_an_ingests_proof_encodes_on_the_hosts_cores_in_a_background_turn(
    live: LiveStack, client: RegistryClient, repo: str
) -> None:
    """The ingest worker proves a pushed layer's checkpoints segment by segment on the
    host's cores, in a background turn (behind the restores of the next minute): while
    another process holds every core, the proof waits in the queue with such a ticket
    and the layer is not deduplicated yet; once that process is killed -9, the proof
    runs, and the layer is deduplicated with checkpoints and GETs exact."""
    blob = python_gzip(6)(layer_tar(4, unique=True))
    waiting = live.settings.spool_dir / "cores" / "waiting"
    holder = hold_every_core_elsewhere(live.settings.spool_dir / "cores")
    try:
        (digest,) = push_layers(client, repo, [blob])
        wait_until(lambda: bool(_tickets_of_background_work(waiting)), "the proof's ticket", 120)
        assert live.registry.index.layer(digest).get("state") != "deduplicated"
    finally:
        holder.kill()
    assert wait_for_layers(live, [digest])[digest]["state"] == "deduplicated"
    info = live.registry.blobs.stored_info(digest)
    assert info is not None and info.recipe is not None
    recipe = Recipe.decode(live.registry.store.get_bytes(info.recipe))
    assert load_checkpoints(recipe, live.registry.store) is not None
    assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == blob


def test_live_segment_that_fails_to_encode_stops_the_restore_in_its_place(
    live: LiveStack, client: RegistryClient, repo: str, go_layer: tuple[bytes, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """On this host's threads, a segment whose encoding fails ends the restore with that
    error where the segment belongs: no later segment is sent in its place."""
    _, recipe = deduplicated_recipe(live, client, repo, go_layer[1])
    plan = load_checkpoints(recipe, live.registry.store)
    assert plan is not None and len(plan.segments()) >= 3
    first = restore.encode_stored_segment(recipe, live.registry.files, plan, 0)
    refused_at = plan.segments()[1].tar_start
    encode = GoStdlibEncoder.encode_segment

    def refuse_second(self: GoStdlibEncoder, *args: Pieces, **kwargs: Any) -> memoryview:
        if kwargs["offset"] == refused_at:
            raise SegmentError("refused for the test")
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(GoStdlibEncoder, "encode_segment", refuse_second)
    # Room ahead for two segments' input: the failed second one is taken while the
    # third is cut already.
    encoder = lookup_encoder(recipe.encoder_id)
    inputs = [segment_input(encoder, segment, recipe.tar_size) for segment in plan.segments()]
    monkeypatch.setattr(restore, "SEGMENTS_AHEAD_BYTES", sum(b - a for a, b in inputs[:2]))
    bits = local_runner(2)(recipe, live.registry.files, plan)
    assert next(bits) == first
    with pytest.raises(RestoreError, match="refused for the test"):
        next(bits)


def test_live_pgzip_layer_restores_from_its_checkpoints_here(
    live: LiveStack, client: RegistryClient, repo: str, helper_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """pgzip layers restore segment by segment on this host's threads, as Go's do (they
    restored as one stream until segments went to served helpers): every segment is
    encoded once, and the blob is exact."""
    blob = producer(helper_dir, f"{PGZIP}/b1048576/5")(layer_tar(14))
    _, recipe = deduplicated_recipe(live, client, repo, blob)
    plan = load_checkpoints(recipe, live.registry.store)
    assert plan is not None
    encoded: list[int] = []
    encode = PgzipEncoder.encode_segment

    def counted(self: PgzipEncoder, *args: Pieces, **kwargs: Any) -> memoryview:
        encoded.append(int(kwargs["offset"]))
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(PgzipEncoder, "encode_segment", counted)
    assert b"".join(restore_blob(recipe, live.registry.files)) == blob
    assert sorted(encoded) == [segment.tar_start for segment in plan.segments()]


def release_through(recipe: Recipe, live: LiveStack, runner: SegmentRunner) -> Iterator[Buffer]:
    """restore_blob with `runner` standing in for the hosts that encode segments."""
    restore.use_restore_workers(runner, 0)
    try:
        yield from restore_blob(recipe, live.registry.files)
    finally:
        restore.use_restore_workers(None)


def test_live_segments_on_restore_workers(
    live: LiveStack, client: RegistryClient, repo: str, go_layer: tuple[bytes, bytes]
) -> None:
    blob = go_layer[1]
    digest, recipe = deduplicated_recipe(live, client, repo, blob)
    plan = load_checkpoints(recipe, live.registry.store)
    assert plan is not None
    app = make_celery(live.settings)
    local = restore.encode_stored_segment(recipe, live.registry.files, plan, 1)
    remote = app.send_task(encode_segment_task.name, args=(digest, 1)).get(timeout=120)
    assert base64.b64decode(remote) == local
    runner = restore_workers_runner(app, remote_slots=2)
    assert b"".join(release_through(recipe, live, runner)) == blob


def test_live_segments_are_encoded_here_while_no_restore_worker_runs(
    live: LiveStack, client: RegistryClient, repo: str, go_layer: tuple[bytes, bytes]
) -> None:
    """With the restore workers stopped, the remote slots encode their segments here at
    once: nothing is queued for nobody to take (each would wait 20 s)."""
    blob = go_layer[1]
    _digest, recipe = deduplicated_recipe(live, client, repo, blob)
    app = make_celery(live.settings)
    live.stack.stop_service("worker-restore")
    try:
        runner = restore_workers_runner(app, remote_slots=2)
        assert b"".join(release_through(recipe, live, runner)) == blob
        assert live.registry.index.queue_length("restore") == 0
    finally:
        live.stack.respawn("worker-restore")


def test_live_unreadable_checkpoints_fall_back_to_serial(
    live: LiveStack, client: RegistryClient, repo: str, go_layer: tuple[bytes, bytes]
) -> None:
    blob = go_layer[1]
    digest, recipe = deduplicated_recipe(live, client, repo, blob)
    key = checkpoints_key(digest)
    original = live.registry.store.get_bytes(key)
    live.registry.store.put_bytes(key, original[:-5] + b"junk!")
    try:
        assert load_checkpoints(recipe, live.registry.store) is None
        assert b"".join(restore_blob(recipe, live.registry.files)) == blob
        assert client.request("GET", f"/v2/{repo}/blobs/{digest}").data == blob
    finally:
        live.registry.store.put_bytes(key, original)


# --------------------------------------------------------------------------- zstd


def zstd_block_starts(frame: bytes) -> dict[int, int]:
    """tar offset -> frame offset of every block of a single zstd frame."""
    descriptor = frame[4]
    single = (descriptor >> 5) & 1
    header = 5 + (0 if single else 1) + [0, 1, 2, 4][descriptor & 3]
    header += [1 if single else 0, 2, 4, 8][descriptor >> 6]
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    decompressor.decompress(frame[:header])
    starts, position, produced = {}, header, 0
    while True:
        word = int.from_bytes(frame[position : position + 3], "little")
        size = 3 + (1 if (word >> 1) & 3 == 1 else word >> 3)
        starts[produced] = position
        produced += len(decompressor.decompress(frame[position : position + size]))
        position += size
        if word & 1:
            starts[produced] = position
            return starts


@pytest.mark.parametrize("threads", [2, 0])
def test_zstd_blocks_cannot_be_resumed_through_the_api(threads: int) -> None:
    """Evidence, not a wish: libzstd's jobs (threads) are independent by design, each a
    fresh context primed with the input before it, but re-encoding one alone needs what
    python-zstandard's API does not reach (ZSTD_compressBegin_advanced_internal loading the
    overlap as a prefix with forceMaxWindow, ZSTD_invalidateRepCodes, contiguous input);
    a single-threaded frame carries entropy tables and repeat offsets across blocks. The
    nearest the API gets (the window before the boundary as a raw-content dictionary,
    forceMaxWindow, no frame fields) gives other blocks, so zstd layers restore serially."""
    data = real_tar(5_000_000)
    level = 1
    stream = zstandard.ZstdCompressor(level=level, threads=threads).compressobj(size=len(data))
    frame = stream.compress(data) + stream.flush()
    starts = zstd_block_starts(frame)
    params = zstandard.ZstdCompressionParameters.from_level(level, source_size=len(data))
    job = 1 << max(20, params.window_log + 2)  # ZSTDMT's job size without long matching
    cut = job if threads else min(t for t in starts if t >= job)
    end = min(t for t in starts if t >= cut + job // 2)
    overlap = (1 << params.window_log) >> (3 if threads else 0)
    resumed_params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(data), force_max_window=1, write_checksum=0,
        write_content_size=0, write_dict_id=0,
    )  # fmt: skip
    prefix = zstandard.ZstdCompressionDict(
        data[cut - overlap : cut], dict_type=zstandard.DICT_TYPE_RAWCONTENT
    )
    compressor = zstandard.ZstdCompressor(compression_params=resumed_params, dict_data=prefix)
    resumed = compressor.compressobj(size=end - cut)
    again = resumed.compress(data[cut:end]) + resumed.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    pushed = frame[starts[cut] : starts[end]]
    assert cut in starts and again[-len(pushed) :] != pushed
    assert zstandard.ZstdDecompressor().decompress(frame) == data


def test_checkpoints_keep_away_from_large_files_one_segment_can_hold() -> None:
    """A segment touching a large file fetches all of it: one up to KEPT_WHOLE_BYTES is left
    to one segment; a larger one is cut into at most CUTS_PER_FILE + 1 segments, or its
    segment would be the restore's critical path or too long to hold; one beyond
    MAX_CUT_FILE_BYTES is kept whole (its segments would cost too many fetches of it)."""
    size = 300_000_000
    found = [Checkpoint(offset, offset * 3) for offset in range(100_000, size, 100_000)]
    whole, cut, huge = (
        (10_000_000, 16_000_000),
        (30_000_000, 75_000_000),
        (100_000_000, 240_000_000),
    )
    assert whole[1] - whole[0] <= KEPT_WHOLE_BYTES < cut[1] - cut[0] <= MAX_CUT_FILE_BYTES
    assert huge[1] - huge[0] > MAX_CUT_FILE_BYTES
    chosen = choose_candidates_avoiding(found, size, lambda _: True, [whole, cut, huge])
    offsets = [c.tar_offset for c in chosen]

    def within(span: tuple[int, int], margin: int = 0) -> list[int]:
        return [o for o in offsets if span[0] - margin <= o < span[1] + margin]

    assert not within(whole, AVOID_MARGIN) and not within(huge, AVOID_MARGIN)
    step = (cut[1] - cut[0]) // CUTS_PER_FILE  # 45 MB: a cut every 5.6 MB, 7 or 8 of them
    assert step > CHECKPOINT_SPACING
    inside = within(cut)
    assert CUTS_PER_FILE - 1 <= len(inside) <= CUTS_PER_FILE, inside
    assert all(step <= b - a < step + 100_000 for a, b in itertools.pairwise(inside))
    gaps = [b - a for a, b in zip([0, *offsets], [*offsets, size], strict=True)]
    assert FIRST_SEGMENT_TAR_BYTES <= gaps[0] < FIRST_SEGMENT_TAR_BYTES + 100_000
    assert all(gap >= CHECKPOINT_SPACING for gap in gaps[1:-1])
    assert any(o < whole[0] for o in offsets) and any(o > huge[1] for o in offsets)
    everywhere = choose_candidates(found, size, lambda _: True)
    assert len(everywhere) > len(chosen)
    first, *rest = [c.tar_offset for c in everywhere]
    assert FIRST_SEGMENT_TAR_BYTES <= first < FIRST_SEGMENT_TAR_BYTES + 100_000
    assert all(b - a >= CHECKPOINT_SPACING for a, b in itertools.pairwise([first, *rest]))


def test_the_first_segment_is_short_so_the_first_bytes_leave_early() -> None:
    """A restore sends the blob's first bytes once its first segment is encoded and
    verified: the first checkpoint comes after FIRST_SEGMENT_TAR_BYTES of tar, the next
    ones at the layer's spacing; a small layer's spacing is already no longer."""
    found = [Checkpoint(offset, offset * 3) for offset in range(50_000, 60_000_000, 50_000)]
    offsets = [c.tar_offset for c in choose_candidates(found, 60_000_000, lambda _: True)]
    assert FIRST_SEGMENT_TAR_BYTES < CHECKPOINT_SPACING
    assert FIRST_SEGMENT_TAR_BYTES <= offsets[0] < FIRST_SEGMENT_TAR_BYTES + 50_000
    assert CHECKPOINT_SPACING <= offsets[1] - offsets[0] < CHECKPOINT_SPACING + 50_000
    small = choose_candidates(found, 5_000_000, lambda _: True, MIN_CHECKPOINT_SPACING)
    assert MIN_CHECKPOINT_SPACING <= small[0].tar_offset < MIN_CHECKPOINT_SPACING + 50_000
