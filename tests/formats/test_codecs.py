"""Blob classification and streaming decompression on real producers' output."""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.formats.codecs import (
    ChunkReader,
    CorruptBlobError,
    Sniff,
    gzip_header_length,
    looks_like_tar,
    open_decompressed,
    sniff,
)
from tests.layers import real_files_tar
from tests.programs import need, run_tool


@pytest.fixture(scope="module")
def small_tar() -> bytes:
    return real_files_tar(600_000)


def test_plain_tar_is_tar(small_tar: bytes) -> None:
    assert sniff(small_tar[:65536]) == Sniff(kind="tar")


def test_random_bytes_are_other() -> None:
    assert sniff(os.urandom(65536)).kind == "other"


def test_empty_tar_is_tar() -> None:
    assert sniff(bytes(1024)).kind == "tar"


def test_v7_tar_header_detected_by_checksum(small_tar: bytes) -> None:
    header = bytearray(small_tar[:512])
    header[257:265] = bytes(8)  # drop the ustar magic and version
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    assert looks_like_tar(bytes(header) + bytes(512))
    header[0] ^= 0xFF
    assert not looks_like_tar(bytes(header) + bytes(512))


def test_python_gzip_header(small_tar: bytes) -> None:
    blob = gzip.compress(small_tar, compresslevel=9, mtime=1234)
    result = sniff(blob[:65536])
    assert (result.kind, result.mtime, result.xfl, result.os) == ("gzip", 1234, 2, 255)
    assert (result.header_len, result.producer_hint) == (10, "zlib/python")


def test_zlib_gzip_wrapper_header(small_tar: bytes) -> None:
    result = sniff(zlib.compress(small_tar, 1, wbits=31))
    assert (result.mtime, result.xfl, result.os, result.producer_hint) == (0, 4, 3, "zlib")


def test_gnu_gzip_header_with_name(small_tar: bytes, tmp_path: Path) -> None:
    need("gzip")
    path = tmp_path / "layer.tar"
    path.write_bytes(small_tar)
    result = sniff(run_tool(["gzip", "-c", str(path)], b""))
    assert result.kind == "gzip" and result.flags == 0x08 and result.os == 3
    assert result.header_len == 10 + len(b"layer.tar\x00")
    assert result.producer_hint == "gnu-gzip"


def test_pigz_header(small_tar: bytes, tmp_path: Path) -> None:
    need("pigz")
    path = tmp_path / "layer.tar"
    path.write_bytes(small_tar)
    result = sniff(run_tool(["pigz", "-c", str(path)], b""))
    assert (result.kind, result.os, result.producer_hint) == ("gzip", 3, "gnu-gzip")


def test_all_optional_gzip_header_fields_counted() -> None:
    extra = b"AB\x03\x00xyz"
    header = b"\x1f\x8b\x08" + bytes([0x04 | 0x08 | 0x10 | 0x02]) + bytes(4) + b"\x00\xff"
    header += struct.pack("<H", len(extra)) + extra + b"name\x00" + b"comment\x00" + b"\x12\x34"
    blob = header + zlib.compress(b"", 6, -15)
    assert gzip_header_length(blob) == len(header)
    assert sniff(blob).header_len == len(header)


def test_truncated_gzip_header_is_other() -> None:
    assert sniff(b"\x1f\x8b\x08\x08\x00\x00\x00\x00\x00\x03unterminated").kind == "other"


def test_zstd_cli_frame_header(small_tar: bytes, tmp_path: Path) -> None:
    need("zstd")
    path = tmp_path / "layer.tar"
    path.write_bytes(small_tar)
    result = sniff(run_tool(["zstd", "-q", "-c", str(path)], b""))
    assert result.kind == "zstd" and result.zstd is not None
    assert result.zstd.checksum and result.zstd.content_size == len(small_tar)


def test_zstd_streaming_frame_header_has_window_not_size(small_tar: bytes) -> None:
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    frame = sniff(compressor.compress(small_tar) + compressor.flush()).zstd
    assert frame is not None
    assert frame.content_size is None and frame.window_size is not None
    assert not frame.checksum and frame.dict_id == 0


def test_go_and_pgzip_fingerprints(small_tar: bytes, helper_dir: Path) -> None:
    go = sniff(run_tool([str(helper_dir / "gzip-go1.26"), "-mode", "gzip"], small_tar))
    assert (go.mtime, go.os, go.producer_hint) == (0, 255, "go-stdlib")
    fastest = sniff(
        run_tool([str(helper_dir / "gzip-go1.27"), "-mode", "gzip", "-level", "1"], small_tar)
    )
    assert fastest.xfl == 4
    pgzip = sniff(run_tool([str(helper_dir / "gzip-pgzip-deb"), "-mode", "gzip"], small_tar))
    assert pgzip.producer_hint == "pgzip"
    assert pgzip.mtime is not None and struct.pack("<I", pgzip.mtime) == b"\x00\x09\x6e\x88"


def roundtrip(blob: bytes) -> bytes:
    result = sniff(blob[:65536])
    return open_decompressed(result.kind, io.BytesIO(blob)).read()


def test_gzip_multi_member_stream(small_tar: bytes) -> None:
    third = len(small_tar) // 3
    blob = b"".join(
        gzip.compress(small_tar[i : i + third]) for i in range(0, len(small_tar), third)
    )
    assert roundtrip(blob) == small_tar


def test_zstd_multi_frame_stream(small_tar: bytes) -> None:
    compressor = zstandard.ZstdCompressor(level=1)
    half = len(small_tar) // 2
    blob = compressor.compress(small_tar[:half]) + compressor.compress(small_tar[half:])
    assert roundtrip(blob) == small_tar


def test_plain_tar_passes_through(small_tar: bytes) -> None:
    assert roundtrip(small_tar) == small_tar


def test_decompressed_tar_is_readable(small_tar: bytes) -> None:
    blob = gzip.compress(small_tar)
    with tarfile.open(fileobj=open_decompressed("gzip", io.BytesIO(blob)), mode="r|") as tar:
        assert sum(1 for _ in tar) > 10


def test_gzip_trailing_garbage_is_an_error(small_tar: bytes) -> None:
    with pytest.raises(CorruptBlobError):
        open_decompressed("gzip", io.BytesIO(gzip.compress(small_tar) + b"junk")).read()


def test_truncated_gzip_is_an_error(small_tar: bytes) -> None:
    blob = gzip.compress(small_tar)
    with pytest.raises(CorruptBlobError):
        open_decompressed("gzip", io.BytesIO(blob[: len(blob) // 2])).read()


def test_highly_compressible_gzip_streams_in_bounded_chunks() -> None:
    blob = gzip.compress(bytes(50 * 1024 * 1024), compresslevel=1)
    stream = open_decompressed("gzip", io.BytesIO(blob))
    total = 0
    while chunk := stream.read(1 << 20):
        total += len(chunk)
    assert total == 50 * 1024 * 1024


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2048))
def test_sniff_never_raises(data: bytes) -> None:
    assert sniff(data).kind in {"gzip", "zstd", "tar", "other"}
    assert sniff(b"\x1f\x8b" + data).kind in {"gzip", "other"}
    assert sniff(b"\x28\xb5\x2f\xfd" + data).kind in {"zstd", "other"}


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=300_000), st.integers(min_value=1, max_value=5))
def test_gzip_members_roundtrip(data: bytes, members: int) -> None:
    size = len(data) // members + 1
    blob = b"".join(gzip.compress(data[i : i + size]) for i in range(0, len(data), size))
    blob = blob or gzip.compress(b"")
    assert open_decompressed("gzip", io.BytesIO(blob)).read() == data


@given(
    st.lists(st.binary(max_size=40), max_size=30),
    st.lists(st.integers(min_value=-1, max_value=100), max_size=20),
)
def test_chunk_reader_answers_each_read_in_full(chunks: list[bytes], sizes: list[int]) -> None:
    """A read gathers across chunks (empty ones too): short only at the end of them."""
    data, position = b"".join(chunks), 0
    reader = ChunkReader(iter(chunks))
    for size in sizes:
        expected = data[position:] if size < 0 else data[position : position + size]
        assert reader.read(size) == expected
        position += len(expected)
