"""Pure byte formats, no I/O but the streams given to them: compressed-stream sniffing
and decoding (codecs), digests, the tar split, recipes and segment verification.

May import only the shared modules (config, errors); nothing else of pipelines.
"""

from collections.abc import Sequence

# Bytes, or a slice of them taken without copying: the pieces of an encoder's input (views
# of the rebuilt tar's chunks) and a restore's output (each segment's bits, masked in
# place, and views of them). Copies of megabytes cost page faults as well as the copying.
Buffer = bytes | bytearray | memoryview
# Bytes laid end to end in pieces, not joined: a segment's input, cut from the rebuilt
# tar's chunks as they came.
Pieces = Sequence[Buffer]


def total_length(pieces: Pieces) -> int:
    """How many bytes the pieces hold together."""
    return sum(len(piece) for piece in pieces)
