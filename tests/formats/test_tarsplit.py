"""split_tar + join_tar must rebuild any input byte-exact and dedupe regular-file payloads."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.formats.tarsplit import (
    CHUNK_SIZE,
    FileRef,
    HashingReader,
    Payload,
    Raw,
    TarSplitError,
    join_tar,
    split_tar,
)

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class ChunkyReader:
    """A non-seekable stream whose reads return at most the next of `sizes` bytes."""

    def __init__(self, data: bytes, sizes: Sequence[int]) -> None:
        self._stream = io.BytesIO(data)
        self._sizes = list(sizes) or [len(data) + 1]
        self._calls = 0

    def read(self, size: int = -1, /) -> bytes:
        limit = self._sizes[self._calls % len(self._sizes)]
        self._calls += 1
        return self._stream.read(limit if size < 0 else min(size, limit))


@dataclass
class SplitResult:
    entries: list[Raw | FileRef] = field(default_factory=list)
    store: dict[bytes, bytes] = field(default_factory=dict)
    payloads: list[bytes] = field(default_factory=list)

    def join(self) -> bytes:
        return b"".join(join_tar(self.entries, lambda ref: [self.store[ref.digest]]))


def split(stream: io.BytesIO | ChunkyReader | HashingReader) -> SplitResult:
    """Split like the ingest pipeline: store each payload under its sha256."""
    result = SplitResult()
    for segment in split_tar(stream):
        if isinstance(segment, Raw):
            assert 0 < len(segment.data) <= CHUNK_SIZE
            result.entries.append(segment)
            continue
        data = b"".join(segment.chunks())
        assert len(data) == segment.bytes_read
        digest = hashlib.sha256(data).digest()
        result.store[digest] = data
        result.payloads.append(data)
        result.entries.append(FileRef(digest, segment.bytes_read))
    return result


def assert_round_trip(data: bytes, read_sizes: Sequence[int] = ()) -> SplitResult:
    result = split(ChunkyReader(data, read_sizes))
    assert result.join() == data
    return result


# --- tars generated with Python's tarfile ------------------------------------------

KINDS = ["file", "file", "file", "empty", "contig", "dir", "symlink", "hardlink"]
KINDS += ["chr", "blk", "fifo"]
SHARED_CONTENTS = [b"shared\n", bytes(1000), b"x" * 511, b"y" * 512, b"z" * 513]
TYPE_BY_KIND = {
    "file": tarfile.REGTYPE,
    "empty": tarfile.REGTYPE,
    "contig": tarfile.CONTTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


@dataclass
class GeneratedTar:
    data: bytes
    end_of_members: int  # offset where the end-of-archive blocks start
    file_contents: list[bytes]  # contents of non-empty regular files, in order


@st.composite
def generated_tars(draw: st.DrawFn) -> GeneratedTar:
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    is_ustar = fmt == tarfile.USTAR_FORMAT
    names = (
        st.text("ab/-.", min_size=1, max_size=90)
        if is_ustar
        else st.text("ab/é-", min_size=1, max_size=20)
        | st.text("ab/é-", min_size=101, max_size=160)
    )
    numbers = st.sampled_from([0, 1000, 2**20] if is_ustar else [0, 1000, 2**34])
    global_pax = draw(st.dictionaries(st.sampled_from(["comment", "uname"]), names, max_size=2))
    buffer = io.BytesIO()
    contents: list[bytes] = []
    with tarfile.open(
        fileobj=buffer, mode="w", format=fmt, pax_headers=global_pax or None
    ) as archive:
        for _ in range(draw(st.integers(0, 8))):
            kind = draw(st.sampled_from(KINDS))
            info = tarfile.TarInfo(draw(names))
            info.type = TYPE_BY_KIND[kind]
            info.mtime = draw(numbers)
            info.uid = draw(numbers)
            info.mode = 0o644
            content = b""
            if kind in ("file", "contig"):
                content = draw(st.binary(max_size=3000) | st.sampled_from(SHARED_CONTENTS))
            if kind in ("symlink", "hardlink"):
                info.linkname = draw(names)
            if kind in ("chr", "blk"):
                info.devmajor, info.devminor = draw(st.integers(0, 255)), draw(st.integers(0, 255))
            if fmt == tarfile.PAX_FORMAT:
                xattrs = draw(st.dictionaries(st.sampled_from(["user.a", "user.b"]), names))
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content) if content else None)
            if content:
                contents.append(content)
        end_of_members = archive.offset
    return GeneratedTar(buffer.getvalue(), end_of_members, contents)


@st.composite
def damaged_tars(draw: st.DrawFn) -> bytes:
    """Valid tars with a damaged or extended tail, or corrupted bytes."""
    tar = draw(generated_tars())
    data = tar.data
    damage = draw(st.sampled_from(["zeros", "junk", "no_eoa", "truncate", "corrupt"]))
    if damage == "zeros":
        return data + bytes(512 * draw(st.integers(1, 5)))
    if damage == "junk":
        return data + draw(st.binary(min_size=1, max_size=3000))
    if damage == "no_eoa":
        return data[: tar.end_of_members]
    if damage == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    corrupted = bytearray(data)
    for _ in range(draw(st.integers(1, 5))):
        corrupted[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(corrupted)


read_sizes = st.lists(st.integers(1, 4000), max_size=8)


@PROPERTY_SETTINGS
@given(tar=generated_tars(), sizes=read_sizes)
def test_generated_tars_round_trip_and_payloads_are_the_regular_files(
    tar: GeneratedTar, sizes: list[int]
) -> None:
    result = assert_round_trip(tar.data, sizes)
    assert result.payloads == tar.file_contents


@PROPERTY_SETTINGS
@given(tar=generated_tars())
def test_payloads_without_end_of_archive_or_with_trailing_zeros(tar: GeneratedTar) -> None:
    assert assert_round_trip(tar.data[: tar.end_of_members]).payloads == tar.file_contents
    with_zeros = tar.data + bytes(512 * 7)
    assert assert_round_trip(with_zeros).payloads == tar.file_contents


@PROPERTY_SETTINGS
@given(data=damaged_tars(), sizes=read_sizes)
def test_damaged_tars_round_trip(data: bytes, sizes: list[int]) -> None:
    assert_round_trip(data, sizes)


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=5000), sizes=read_sizes)
def test_arbitrary_bytes_round_trip(data: bytes, sizes: list[int]) -> None:
    assert_round_trip(data, sizes)


@PROPERTY_SETTINGS
@given(tar=generated_tars(), read_mask=st.lists(st.booleans(), min_size=1, max_size=4))
def test_unread_payloads_are_skipped(tar: GeneratedTar, read_mask: list[bool]) -> None:
    def wanted(index: int) -> bool:
        return read_mask[index % len(read_mask)]

    payloads = [s for s in split_tar(io.BytesIO(tar.data)) if isinstance(s, Payload)]
    assert len(payloads) == len(tar.file_contents)
    seen: list[bytes] = []
    for segment in split_tar(io.BytesIO(tar.data)):
        if isinstance(segment, Payload) and wanted(len(seen)):
            seen.append(segment.read_all())
        elif isinstance(segment, Payload):
            seen.append(b"<unread>")
    expected = [c if wanted(i) else b"<unread>" for i, c in enumerate(tar.file_contents)]
    assert seen == expected


# --- hand-made headers --------------------------------------------------------------


def set_header_field(data: bytearray, header_offset: int, start: int, value: bytes) -> None:
    """Overwrite a header field and fix the header checksum."""
    header = header_offset
    data[header + start : header + start + len(value)] = value
    data[header + 148 : header + 156] = b" " * 8
    checksum = sum(data[header : header + 512])
    data[header + 148 : header + 156] = b"%06o\0 " % checksum


def single_file_tar(content: bytes, fmt: int, pax_headers: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        info = tarfile.TarInfo("file")
        info.size = len(content)
        info.pax_headers = pax_headers or {}
        archive.addfile(info, io.BytesIO(content))
        after = tarfile.TarInfo("after")
        after.size = 5
        archive.addfile(after, io.BytesIO(b"after"))
    return buffer.getvalue()


def tarfile_sizes(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [member.size for member in archive]


def test_base256_size_field() -> None:
    content = b"base-256 sized\n" * 50
    data = bytearray(single_file_tar(content, tarfile.GNU_FORMAT))
    set_header_field(data, 0, 124, b"\x80" + len(content).to_bytes(11, "big"))
    assert tarfile_sizes(bytes(data)) == [len(content), 5]
    assert assert_round_trip(bytes(data)).payloads == [content, b"after"]


def test_pax_size_overrides_the_ustar_size_field() -> None:
    content = b"pax sized\n" * 100
    data = bytearray(single_file_tar(content, tarfile.PAX_FORMAT, {"size": str(len(content))}))
    member_header = 1024  # after the 'x' header block and its one block of records
    assert data[member_header + 156 : member_header + 157] == b"0"
    set_header_field(data, member_header, 124, b"%011o\0" % 0)
    assert tarfile_sizes(bytes(data)) == [len(content), 5]
    assert assert_round_trip(bytes(data)).payloads == [content, b"after"]


def test_signed_checksum_and_v7_header_without_magic() -> None:
    content = b"v7\n" * 10
    data = bytearray(single_file_tar(content, tarfile.USTAR_FORMAT))
    data[100] = 0xE9  # a high byte in the mode field: signed and unsigned sums differ
    set_header_field(data, 0, 257, bytes(8))  # no "ustar" magic
    signed = sum(b - 256 if b > 127 else b for b in data[:148] + b" " * 8 + data[156:512])
    data[148:156] = b"%06o\0 " % signed
    assert assert_round_trip(bytes(data)).payloads == [content, b"after"]


def test_garbage_between_members_is_raw_and_the_next_member_is_found() -> None:
    content = b"before garbage\n"
    data = single_file_tar(content, tarfile.GNU_FORMAT)
    garbage = os.urandom(1024)
    first_member_end = 1024
    mixed = data[:first_member_end] + garbage + data[first_member_end:]
    assert assert_round_trip(mixed).payloads == [content, b"after"]


# --- payloads bigger than one chunk are streamed ------------------------------------

BIG_CONTENT = os.urandom(3 * CHUNK_SIZE + 123)


def big_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, content in (("big", BIG_CONTENT), ("small", b"small\n")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_big_payload_is_streamed_in_bounded_chunks() -> None:
    payload_chunks: list[int] = []
    for segment in split_tar(ChunkyReader(big_tar(), [CHUNK_SIZE // 3, 7000])):
        if isinstance(segment, Payload):
            payload_chunks.extend(len(chunk) for chunk in segment.chunks())
    assert max(payload_chunks) <= CHUNK_SIZE
    assert sum(payload_chunks) == len(BIG_CONTENT) + len(b"small\n")
    result = assert_round_trip(big_tar(), [CHUNK_SIZE // 3, 7000])
    assert result.payloads == [BIG_CONTENT, b"small\n"]


@pytest.mark.parametrize("read_chunks", [0, 1, 2])
def test_partly_read_big_payload_is_skipped(read_chunks: int) -> None:
    payloads: list[Payload] = []
    small = b""
    for segment in split_tar(io.BytesIO(big_tar())):
        if isinstance(segment, Payload) and segment.size == len(BIG_CONTENT):
            chunks = segment.chunks()
            for _ in range(read_chunks):
                next(chunks)
            payloads.append(segment)
        elif isinstance(segment, Payload):
            small = segment.read_all()
    assert small == b"small\n"
    with pytest.raises(TarSplitError):
        next(payloads[0].chunks())


@pytest.mark.parametrize("cut", [600, CHUNK_SIZE, 2 * CHUNK_SIZE + 5, len(BIG_CONTENT) + 511])
def test_archive_truncated_inside_big_payload(cut: int) -> None:
    data = big_tar()[:cut]
    result = assert_round_trip(data)
    assert b"".join(result.payloads) == BIG_CONTENT[: max(0, min(cut - 512, len(BIG_CONTENT)))]


def test_join_rejects_a_stored_file_of_the_wrong_length() -> None:
    entries: list[Raw | FileRef] = [Raw(b"head"), FileRef(bytes(32), 5)]
    with pytest.raises(TarSplitError):
        b"".join(join_tar(entries, lambda ref: [b"four"]))


def test_hashing_reader_sees_every_byte() -> None:
    data = big_tar()
    reader = HashingReader(io.BytesIO(data))
    assert split(reader).join() == data
    assert (reader.size, reader.sha256()) == (len(data), hashlib.sha256(data).digest())


# --- tars made by GNU tar and bsdtar, including real sparse files ----------------------


def decoy_member() -> bytes:
    """A tar header + data block: a parser that lost its place would emit a decoy payload."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("decoy")
        info.size = 14
        archive.addfile(info, io.BytesIO(b"decoy payload\n"))
    return buffer.getvalue()[:1024]


# > 4 + 21 entries: old GNU sparse needs 2 extension blocks. The decoys sit where a
# parser that mis-sized the sparse header or data would look for the next header.
SPARSE_ISLANDS = [os.urandom(4096) for _ in range(40)]
SPARSE_ISLANDS[0] = decoy_member() + os.urandom(3072)
SPARSE_ISLANDS[-1] = os.urandom(3072) + decoy_member()
AFTER_SPARSE = b"a regular file after the sparse one\n" * 20
LONG_NAME = "long-" + "n" * 120 + ".txt"
LONG_NAME_CONTENT = b"long name content\n"


def make_source_tree(root: Path) -> list[str]:
    """Files to archive, in archive order: sparse, regular, long names, links, fifo, dir."""
    with open(root / "sparse.bin", "wb") as sparse:
        for index, island in enumerate(SPARSE_ISLANDS):
            sparse.seek(index * 50 * 4096)  # block-aligned: islands stay 4 KiB
            sparse.write(island)
        sparse.truncate(9_000_000)
    (root / "after.txt").write_bytes(AFTER_SPARSE)
    (root / LONG_NAME).write_bytes(LONG_NAME_CONTENT)
    (root / "empty").write_bytes(b"")
    os.symlink("t" * 150, root / "long-symlink")
    os.link(root / "after.txt", root / "hardlink")
    os.mkfifo(root / "fifo")
    (root / "dir").mkdir()
    with contextlib.suppress(OSError):  # no user xattrs here: the archive just has none
        os.setxattr(root / "after.txt", "user.checksum", b"1234")
    return [
        "sparse.bin",
        "after.txt",
        LONG_NAME,
        "empty",
        "long-symlink",
        "hardlink",
        "fifo",
        "dir",
    ]


TOOL_COMMANDS = {
    "gnu-sparse": ["tar", "--format=gnu", "--sparse"],
    "oldgnu-sparse": ["tar", "--format=oldgnu", "--sparse"],
    "pax-sparse-0.0": ["tar", "--format=posix", "--sparse", "--sparse-version=0.0"],
    "pax-sparse-0.1": ["tar", "--format=posix", "--sparse", "--sparse-version=0.1"],
    "pax-sparse-1.0": ["tar", "--format=posix", "--sparse", "--sparse-version=1.0"],
    "gnu-pax-xattrs": ["tar", "--format=posix", "--xattrs"],
    "gnu-ustar": ["tar", "--format=ustar"],
    "bsdtar-pax": ["bsdtar", "--format=pax"],
    "bsdtar-gnutar": ["bsdtar", "--format=gnutar"],
    "bsdtar-ustar": ["bsdtar", "--format=ustar"],
}
SPARSE_TOOLS = {name for name in TOOL_COMMANDS if "sparse" in name} | {"bsdtar-pax"}


@pytest.fixture(scope="module")
def tool_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("tree")
    names = make_source_tree(root)
    archives: dict[str, bytes] = {}
    for label, command in TOOL_COMMANDS.items():
        if shutil.which(command[0]) is None:
            continue
        if label == "gnu-ustar":  # ustar cannot hold the long symlink target
            members = [n for n in names if n not in ("long-symlink", LONG_NAME, "sparse.bin")]
        else:
            members = names
        completed = subprocess.run(
            [*command, "-cf", "-", "-C", str(root), *members], capture_output=True, check=True
        )
        archives[label] = completed.stdout
    return archives


def tool_archive(archives: dict[str, bytes], label: str) -> bytes:
    if label not in archives:
        pytest.skip(f"{TOOL_COMMANDS[label][0]} is not installed")
    return archives[label]


def regular_dense_contents(data: bytes) -> list[bytes]:
    """Oracle: non-empty, non-sparse regular files as tarfile reads them."""
    contents = []
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive:
            if member.isreg() and member.sparse is None and member.size > 0:
                extracted = archive.extractfile(member)
                assert extracted is not None
                contents.append(extracted.read())
    return contents


def has_sparse_member(data: bytes) -> bool:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return any(member.sparse is not None for member in archive)


@pytest.mark.parametrize("label", sorted(TOOL_COMMANDS))
def test_tool_archives_round_trip(tool_archives: dict[str, bytes], label: str) -> None:
    data = tool_archive(tool_archives, label)
    result = assert_round_trip(data, [65536, 1000])
    assert result.payloads == regular_dense_contents(data)
    assert AFTER_SPARSE in result.payloads
    if label in SPARSE_TOOLS:
        assert has_sparse_member(data)
        assert not any(
            island in payload for payload in result.payloads for island in SPARSE_ISLANDS
        )
    elif not label.endswith("ustar"):  # ustar cannot hold the 126-byte name
        assert LONG_NAME_CONTENT in result.payloads


@pytest.mark.parametrize("label", sorted(SPARSE_TOOLS))
def test_truncated_sparse_archives_round_trip(tool_archives: dict[str, bytes], label: str) -> None:
    data = tool_archive(tool_archives, label)
    for cut in (100, 512, 1500, len(data) // 2, len(data) - 700):
        assert_round_trip(data[:cut])


def test_tar_of_real_files_payloads_match_tarfile(tmp_path: Path) -> None:
    source = Path("/usr/lib/python3.11/json")
    if not source.is_dir():
        pytest.skip("no real files to archive")
    data = subprocess.run(
        ["tar", "-cf", "-", "-C", str(source.parent), source.name], capture_output=True, check=True
    ).stdout
    result = assert_round_trip(data)
    assert result.payloads == regular_dense_contents(data)
