"""Content digests: parsing OCI digest strings and hashing that can pause between requests.

An upload arrives in chunks that may land on different API processes, so the SHA-256
state must be saved between chunks. OpenSSL's SHA256_CTX is a plain struct: copying its
bytes out and back in resumes the hash at OpenSSL speed (~1.3 GB/s here, against
~0.17 GB/s for the pure-C `resumablesha256` package).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import re
from dataclasses import dataclass

from pipelines.errors import RegistryError

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST_SHAPE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse `alg:hex`; anything else is DIGEST_INVALID."""
        if not _DIGEST_SHAPE.match(text or ""):
            raise RegistryError("DIGEST_INVALID", "invalid digest", {"digest": text})
        algorithm, hex_part = text.split(":", 1)
        expected = _HEX_LENGTH.get(algorithm)
        if expected is None:
            raise RegistryError("DIGEST_INVALID", "unsupported digest algorithm", {"digest": text})
        if len(hex_part) != expected or not re.fullmatch(r"[0-9a-f]+", hex_part):
            raise RegistryError("DIGEST_INVALID", "invalid digest", {"digest": text})
        return cls(algorithm, hex_part)

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def digest_key(prefix: str, digest: str) -> str:
    """The object key `<prefix>/<alg>/<hex>` under which something about `digest` lives."""
    algorithm, hex_part = digest.split(":", 1)
    return f"{prefix}/{algorithm}/{hex_part}"


def _load_libcrypto() -> ctypes.CDLL:
    name = ctypes.util.find_library("crypto")
    if name is None:
        raise RuntimeError("libcrypto (OpenSSL) not found")
    lib = ctypes.CDLL(name)
    lib.SHA256_Init.argtypes = [ctypes.c_void_p]
    lib.SHA256_Update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.SHA256_Final.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    return lib


_LIBCRYPTO = _load_libcrypto()
_SHA256_CTX_SIZE = 112  # sizeof(SHA256_CTX): h[8], Nl, Nh, data[16], num, md_len


class ResumableSha256:
    """SHA-256 whose running state can be saved as bytes and resumed elsewhere."""

    def __init__(self, state: bytes | None = None) -> None:
        if state is None:
            self._ctx = ctypes.create_string_buffer(_SHA256_CTX_SIZE)
            _LIBCRYPTO.SHA256_Init(self._ctx)
        else:
            if len(state) != _SHA256_CTX_SIZE:
                raise ValueError("not a saved SHA-256 state")
            self._ctx = ctypes.create_string_buffer(state, _SHA256_CTX_SIZE)

    def update(self, data: bytes) -> None:
        _LIBCRYPTO.SHA256_Update(self._ctx, data, len(data))

    def state(self) -> bytes:
        return self._ctx.raw

    def hexdigest(self) -> str:
        out = ctypes.create_string_buffer(32)
        copy = ctypes.create_string_buffer(self._ctx.raw, _SHA256_CTX_SIZE)
        _LIBCRYPTO.SHA256_Final(out, copy)
        return out.raw.hex()
