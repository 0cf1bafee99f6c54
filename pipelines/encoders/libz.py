"""The system zlib through ctypes, for what Python's zlib module does not offer: inflate
stopping at block boundaries (Z_BLOCK), and deflate primed with a dictionary and with
bits (deflatePrime). It is the runtime Python's zlib module uses (`stock_zlib_problem`
in pipelines.encoders.gzip_families checks that it writes what stock zlib writes)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from collections.abc import Iterable, Iterator

from pipelines.formats import Pieces


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


Z_OK, Z_STREAM_END, Z_BUF_ERROR, Z_BLOCK = 0, 1, -5, 5
_INFLATE_OUT = 1 << 20


@functools.cache
def _libz() -> ctypes.CDLL:
    name = ctypes.util.find_library("z")
    if name is None:
        raise OSError("libz not found")
    lib = ctypes.CDLL(name)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int, ctypes.c_char_p,
                                  ctypes.c_int]  # fmt: skip
    lib.inflate.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int]
    lib.inflateEnd.argtypes = [ctypes.POINTER(_ZStream)]
    stream = ctypes.POINTER(_ZStream)
    lib.deflateInit2_.argtypes = [stream, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_char_p, ctypes.c_int]  # fmt: skip
    lib.deflateSetDictionary.argtypes = [stream, ctypes.c_char_p, ctypes.c_uint]
    lib.deflatePrime.argtypes = [stream, ctypes.c_int, ctypes.c_int]
    lib.deflate.argtypes = [stream, ctypes.c_int]
    lib.deflateEnd.argtypes = [stream]
    lib.deflateBound.argtypes = [stream, ctypes.c_ulong]
    lib.deflateBound.restype = ctypes.c_ulong
    return lib


Z_NO_FLUSH, Z_SYNC_FLUSH, Z_FINISH = 0, 2, 4


def zlib_segment(
    level: int, history: Pieces, data: Pieces, lookahead: Pieces, final: bool, align: int
) -> memoryview:
    """Raw deflate of `data` + `lookahead` by the system zlib (the runtime that Python's
    zlib module uses), primed with `history` (deflateSetDictionary) and with `align`
    zero bits (deflatePrime): a stored block's padding depends on the bit position in
    the stream, so the segment starts at the same bit in its byte as in the pushed one.
    Sync-flushed, or finished if `final`.

    Fed in one call, which releases the GIL once for the whole segment (in 64 KiB pieces
    a segment thread waited for the GIL after each piece, its core idle meanwhile). The
    output is the same as the whole-stream encoder's, fed 64 KiB at a time: at levels
    1-9 deflate's output does not depend on how its input comes (tested); only level 0's
    stored blocks do, and it has no segments."""
    if level == 0:
        raise ValueError("zlib level 0 has no segments: its stored blocks follow the feeding")
    lib = _libz()
    stream = _ZStream()
    ref = ctypes.byref(stream)
    version = lib.zlibVersion()
    if lib.deflateInit2_(ref, level, 8, -15, 8, 0, version, ctypes.sizeof(_ZStream)) != Z_OK:
        raise OSError("deflateInit2 failed")
    try:
        dictionary = b"".join(history)
        if dictionary and lib.deflateSetDictionary(ref, dictionary, len(dictionary)) != Z_OK:
            raise OSError("deflateSetDictionary failed")
        if align and lib.deflatePrime(ref, align, 0) != Z_OK:
            raise OSError("deflatePrime failed")
        source = bytearray().join([*data, *lookahead])
        out = mmap.mmap(-1, lib.deflateBound(ref, len(source)) + 64)  # only used pages touched
        _deflate_into(lib, stream, source, out, Z_FINISH if final else Z_SYNC_FLUSH)
        return memoryview(out)[: len(out) - stream.avail_out]
    finally:
        lib.deflateEnd(ref)


def _deflate_into(
    lib: ctypes.CDLL, stream: _ZStream, source: bytearray, out: mmap.mmap, flush: int
) -> None:
    """Deflate `source` into `out`, then flush: zlib reads and writes the two buffers in
    place (no copy of either)."""
    source_view = (ctypes.c_char * len(source)).from_buffer(source)
    out_view = (ctypes.c_char * len(out)).from_buffer(out)
    stream.next_out, stream.avail_out = ctypes.addressof(out_view), len(out)
    stream.next_in, stream.avail_in = ctypes.addressof(source_view), len(source)
    _deflate(lib, stream, Z_NO_FLUSH)
    _deflate(lib, stream, flush)


def _deflate(lib: ctypes.CDLL, stream: _ZStream, flush: int) -> None:
    status = lib.deflate(ctypes.byref(stream), flush)
    expected = Z_STREAM_END if flush == Z_FINISH else Z_OK
    if status != expected or stream.avail_in:
        raise OSError(f"deflate returned {status} with {stream.avail_in} bytes unread")


def deflate_boundaries(body: Iterable[bytes]) -> Iterator[tuple[int, int]]:
    """The block boundaries of a raw deflate body, as zran.c finds them: inflate with
    Z_BLOCK stops after each end-of-block code; `data_type` then holds the unused bits
    of the last byte read (and 64 while in the last block, after which none is given).
    Yields (bytes of output so far, bit offset in the body) at each boundary."""
    lib = _libz()
    stream = _ZStream()
    version = lib.zlibVersion()
    if lib.inflateInit2_(ctypes.byref(stream), -15, version, ctypes.sizeof(_ZStream)) != Z_OK:
        raise OSError("inflateInit2 failed")
    out = ctypes.create_string_buffer(_INFLATE_OUT)
    chunks = iter(body)
    held = b""  # keeps the input buffer alive while zlib reads it
    last_bit = -1
    try:
        while True:
            if stream.avail_in == 0:
                held = next(chunks, b"")
                if not held:
                    return
                stream.next_in = ctypes.cast(ctypes.c_char_p(held), ctypes.c_void_p)
                stream.avail_in = len(held)
            if stream.avail_out == 0 or stream.next_out is None:
                stream.next_out = ctypes.cast(out, ctypes.c_void_p)
                stream.avail_out = _INFLATE_OUT
            status = lib.inflate(ctypes.byref(stream), Z_BLOCK)
            if status == Z_STREAM_END:
                return
            if status not in (Z_OK, Z_BUF_ERROR):
                raise ValueError(f"not a deflate body (inflate returned {status})")
            if stream.data_type & 128 and not stream.data_type & 64:
                bit = stream.total_in * 8 - (stream.data_type & 7)
                if bit != last_bit:
                    last_bit = bit
                    yield stream.total_out, bit
    finally:
        lib.inflateEnd(ctypes.byref(stream))
        del held
