"""Every legal zstd stream: several frames, skippable frames, large windows. Frames are
found from their headers, decoded within a window cap, and a multi-frame layer is
rebuilt frame by frame, byte-exact, from the real producers' output (pzstd, the zstd
CLI, python-zstandard)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import zstandard

from pipelines.encoders.base import Match, NoMatch
from pipelines.encoders.detect import prove, shortlist
from pipelines.encoders.detect_frames import (
    MAX_SKIPPABLE_BYTES,
    frames_shortlist,
    frames_to_rebuild,
)
from pipelines.encoders.table import encode, vouching_encoder_id
from pipelines.encoders.zstd_frames import (
    FRAMES_PREFIX,
    DataFrame,
    FrameEntry,
    decode_params,
    encode_params,
)
from pipelines.formats.codecs import (
    CorruptBlobError,
    UnsupportedBlobError,
    open_decompressed,
    scan_zstd_frames,
    sniff,
)
from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack, served_from_dedup
from tests.layers import assert_pulled_exactly, oci_config, wait_for_layers, wait_until_restorable
from tests.programs import need, run_tool

PZSTD_FRAME_TAR = 8 << 20  # pzstd -3 makes a frame of 4 windows (2 MiB each) of input


def text_tar(size: int, seed: int) -> bytes:
    """A tar of files of words and random bytes (zstd compresses it 3-4x), about `size`."""
    rng = random.Random(seed)
    words = [b"usr", b"lib", b"share", b"doc", b"copyright", b"0644", b"\n", b"layer"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        index = 0
        while buffer.tell() < size:
            text = b" ".join(rng.choice(words) for _ in range(20_000))
            data = text * 8 + rng.randbytes(60_000)
            info = tarfile.TarInfo(f"dir/file-{index}")
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
            index += 1
    return buffer.getvalue()


def skippable(payload: bytes, nibble: int = 0) -> bytes:
    return struct.pack("<II", 0x184D2A50 + nibble, len(payload)) + payload


def pzstd(tar: bytes, tmp_path: Path) -> bytes:
    need("pzstd")
    source = tmp_path / "layer.tar"
    source.write_bytes(tar)
    subprocess.run(["pzstd", "-q", "-f", "-p", "2", str(source)], check=True)
    return (tmp_path / "layer.tar.zst").read_bytes()


def reader_of(blob: bytes) -> Callable[[int, int], Iterable[bytes]]:
    return lambda offset, length: [blob[offset : offset + length]]


def find(blob: bytes, max_window: int = 128 << 20) -> Match | NoMatch:
    """What ingest finds for a zstd layer: frames scanned, then either encoder path."""
    frames = frames_to_rebuild(reader_of(blob), len(blob), max_window)

    def open_tar() -> io.BufferedReader:
        return open_decompressed("zstd", io.BytesIO(blob), max_window)  # type: ignore[return-value]

    if frames is not None:
        found = frames_shortlist(frames, reader_of(blob), max_window)
    else:
        found = shortlist(lambda: io.BytesIO(blob), open_tar, sniff(blob[:65536]))
    if isinstance(found, NoMatch):
        return found
    return prove(found, open_tar, hashlib.sha256(blob).hexdigest())


def assert_rebuilt(blob: bytes, tar: bytes, match: Match | NoMatch) -> Match:
    assert isinstance(match, Match), match
    pieces = (tar[i : i + 100_000] for i in range(0, len(tar), 100_000))
    assert b"".join(encode(match.encoder_id, match.encoder_params, pieces)) == blob
    return match


@pytest.fixture(scope="module")
def tar() -> bytes:
    return text_tar(600_000, seed=1)


# --------------------------------------------------------------------------- scan, decode


def test_scan_finds_frames_and_skippable_frames(tar: bytes) -> None:
    compressor = zstandard.ZstdCompressor(level=3)
    first, second = compressor.compress(tar[:1000]), compressor.compress(tar[1000:])
    blob = skippable(b"abc", 5) + first + skippable(b"") + second + skippable(b"end", 15)
    frames = scan_zstd_frames([blob[i : i + 333] for i in range(0, len(blob), 333)])
    assert [(f.offset, f.length, f.skippable) for f in frames] == [
        (0, 11, True),
        (11, len(first), False),
        (11 + len(first), 8, True),
        (19 + len(first), len(second), False),
        (19 + len(first) + len(second), 11, True),
    ]
    assert sniff(blob).kind == "zstd" and sniff(blob).zstd is not None
    assert open_decompressed("zstd", io.BytesIO(blob)).read() == tar


@pytest.mark.parametrize(
    ("cut", "error"),
    [(-5, CorruptBlobError), (None, CorruptBlobError), (3, CorruptBlobError)],
)
def test_scan_refuses_malformed_streams(
    tar: bytes, cut: int | None, error: type[Exception]
) -> None:
    frame = zstandard.ZstdCompressor(level=1).compress(tar)
    blob = frame + b"junk after the frame" if cut is None else frame[:cut]
    with pytest.raises(error):
        scan_zstd_frames([blob])


def test_frame_count_is_capped(tar: bytes) -> None:
    frame = zstandard.ZstdCompressor(level=1).compress(b"x")
    with pytest.raises(UnsupportedBlobError, match="more than 10 frames"):
        scan_zstd_frames([frame * 11], max_frames=10)
    assert len(scan_zstd_frames([frame * 10], max_frames=10)) == 10


def test_a_1_gib_window_is_above_the_cap_and_below_a_raised_one(tar: bytes) -> None:
    """`zstd --long=30` from a pipe declares a 1 GiB window whatever the input's size."""
    need("zstd")
    blob = run_tool(["zstd", "-q", "-c", "--long=30", "-"], tar)
    header = sniff(blob).zstd
    assert header is not None and header.window_size == 1 << 30
    with pytest.raises(UnsupportedBlobError, match="DUPHUNTER_ZSTD_MAX_WINDOW"):
        scan_zstd_frames([blob])
    with pytest.raises(CorruptBlobError):  # the decoder refuses it too, as our own error
        open_decompressed("zstd", io.BytesIO(blob)).read()
    assert len(scan_zstd_frames([blob], max_window=1 << 30)) == 1
    assert open_decompressed("zstd", io.BytesIO(blob), max_window=1 << 30).read() == tar


# --------------------------------------------------------------------------- params


def test_frames_params_round_trip() -> None:
    entries: list[FrameEntry] = [skippable(b"\x01\x02"), DataFrame(8 << 20, b"Z1" + bytes(9)), b""]
    entries += [DataFrame(0, b"")]
    encoded = encode_params(entries)
    assert encoded[:3] == b"ZF\x01"
    assert decode_params(encoded) == entries
    for broken in (encoded[:-1], encoded + b"\0", b"ZF\x02" + encoded[3:], b"XX\x01\x00"):
        with pytest.raises(ValueError):
            decode_params(broken)


# --------------------------------------------------------------------------- producers


def test_pzstd_layer_is_rebuilt_frame_by_frame(tmp_path: Path) -> None:
    """pzstd: a skippable frame with each frame's size, frames of 8 MiB of tar made as
    `zstd --single-thread -3` makes them."""
    tar = text_tar(PZSTD_FRAME_TAR + 600_000, seed=2)
    blob = pzstd(tar, tmp_path)
    frames = scan_zstd_frames([blob])
    assert [frame.skippable for frame in frames] == [True, False, True, False]
    match = assert_rebuilt(blob, tar, find(blob))
    assert match.encoder_id == FRAMES_PREFIX + "zstd/cli-1.5.4/level3-single"
    assert vouching_encoder_id(match.encoder_id) == "zstd/cli-1.5.4/level3-single"
    data = [e for e in decode_params(match.encoder_params) if isinstance(e, DataFrame)]
    assert [e.tar_length for e in data] == [PZSTD_FRAME_TAR, len(tar) - PZSTD_FRAME_TAR]


def test_concatenated_cli_frames_with_skippable_frames(tar: bytes, tmp_path: Path) -> None:
    """`cat a.zst b.zst` of two files the zstd CLI compressed, a skippable frame between."""
    need("zstd")
    halves = tmp_path / "a", tmp_path / "b"
    halves[0].write_bytes(tar[:200_000])
    halves[1].write_bytes(tar[200_000:])
    frames = [run_tool(["zstd", "-q", "-c", str(path)], b"") for path in halves]
    blob = frames[0] + skippable(b"metadata", 3) + frames[1]
    match = assert_rebuilt(blob, tar, find(blob))
    assert match.encoder_id == FRAMES_PREFIX + "zstd/cli-1.5.4/level3"


def test_python_zstandard_frames(tar: bytes) -> None:
    compressor = zstandard.ZstdCompressor(level=3)
    blob = b"".join(compressor.compress(tar[i : i + 250_000]) for i in range(0, len(tar), 250_000))
    match = assert_rebuilt(blob, tar, find(blob))
    assert match.encoder_id.startswith(FRAMES_PREFIX + "zstd/")


def test_frames_of_different_encoders_are_kept_intact(tar: bytes) -> None:
    first = zstandard.ZstdCompressor(level=3).compress(tar[:300_000])
    second = zstandard.ZstdCompressor(level=19).compress(tar[300_000:])
    found = find(first + second)
    assert isinstance(found, NoMatch) and "different encoders" in found.reason


def test_large_skippable_frames_are_kept_intact(tar: bytes) -> None:
    frame = zstandard.ZstdCompressor(level=3).compress(tar)
    found = find(skippable(os.urandom(MAX_SKIPPABLE_BYTES)) + frame)
    assert isinstance(found, NoMatch) and "skippable" in found.reason


def test_a_single_frame_takes_the_one_frame_path(tar: bytes) -> None:
    need("zstd")
    blob = run_tool(["zstd", "-q", "-c", "-"], tar)
    assert frames_to_rebuild(reader_of(blob), len(blob), 128 << 20) is None
    assert assert_rebuilt(blob, tar, find(blob)).encoder_id == "zstd/cli-1.5.4/level3"


# --------------------------------------------------------------------------- the registry


def test_legal_zstd_layers_through_the_registry(
    live: LiveStack, client: RegistryClient, repo: str, tmp_path: Path
) -> None:
    """Each legal zstd stream pushed ends its ingest job deduplicated or intact with the
    reason, and every one is pulled back byte-exact (the deduplicated ones rebuilt from
    their recipe once their intact copy is gone)."""
    need("zstd")
    tars = [text_tar(PZSTD_FRAME_TAR + 300_000, seed=3)] + [
        text_tar(400_000, seed) for seed in (4, 5, 6)
    ]
    cli_frames = [
        run_tool(["zstd", "-q", "-c", "-"], tars[1][:150_000]),
        run_tool(["zstd", "-q", "-c", "-"], tars[1][150_000:]),
    ]
    compressor = zstandard.ZstdCompressor(level=3)
    layers = {  # blob, expected encoder (None: kept intact, for the reason below)
        "pzstd": (pzstd(tars[0], tmp_path), FRAMES_PREFIX + "zstd/cli-1.5.4/level3-single"),
        "cat with skippable frames": (
            skippable(b"head")
            + cli_frames[0]
            + skippable(b"", 7)
            + cli_frames[1]
            + skippable(b"tail"),
            FRAMES_PREFIX + "zstd/cli-1.5.4/level3",
        ),
        "python-zstandard frames": (
            compressor.compress(tars[2][:200_000]) + compressor.compress(tars[2][200_000:]),
            FRAMES_PREFIX,
        ),
        "1 GiB window": (run_tool(["zstd", "-q", "-c", "--long=30", "-"], tars[3]), None),
        "truncated frame": (cli_frames[0][:-7], None),
    }
    reasons = {"1 GiB window": "DUPHUNTER_ZSTD_MAX_WINDOW", "truncated frame": "unreadable"}
    blobs = [blob for blob, _expected in layers.values()]
    client.push_image(repo, "v1", blobs, config=oci_config(tars))
    digests = {name: sha256(blob) for name, (blob, _expected) in layers.items()}
    records = wait_for_layers(live, list(digests.values()), timeout=300)
    for name, (_blob, expected) in layers.items():
        record = records[digests[name]]
        if expected is None:
            assert record["state"] == "intact", (name, record)
            assert reasons[name] in record["reason"], (name, record)
        else:
            assert record["state"] == "deduplicated", (name, record)
            assert record["encoder"].startswith(expected), (name, record)
    deduplicated = [digests[name] for name, (_blob, expected) in layers.items() if expected]
    restores_before = wait_until_restorable(live, deduplicated)
    for name, (blob, _expected) in layers.items():
        assert_pulled_exactly(client, repo, digests[name], blob)
    assert served_from_dedup(live) >= restores_before + len(deduplicated)
