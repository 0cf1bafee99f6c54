"""Encoder canaries: each encoder id, a known input and the sha256 it must produce.

An encoder id promises one exact output for a given input forever: recipes name it, and a
layer whose intact copy is gone can only be served if the encoder still writes what it
wrote at ingest. A helper rebuilt with another toolchain, a library upgrade or a binary
swapped on a host breaks that promise silently. `encoder_canaries.json` (package data)
records, for every encoder id, the sha256 of what it makes of `canary_input()`; the check
runs each encoder on it and compares.

Results go to the Redis hash `dh:canaries` (encoder id -> "ok" / "failed"; the reasons in
`dh:canaries:reasons`): readiness turns red while any is failed, and an intact copy is not
retired while the canary of its layer's encoder is failed or missing (`retirement_blocker`).
Checked at worker start and by `duphunter verify --encoders` (POST /api/v1/encoders/verify).

`python -m pipelines.encoders.canaries --write` records the canaries of the encoders this host runs
(for a new encoder id, once its output is known to be the producer's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from pipelines.encoders.base import EncoderUnavailableError
from pipelines.encoders.gzip_families import GZIP_TRAILER_LEN, encode_gzip_params, golden_input
from pipelines.encoders.table import all_encoders, encode, lookup_encoder, vouching_encoder_id
from pipelines.encoders.zstd_families import KlauspostOptions, ZstdOptions
from pipelines.pauses import pause

CANARY_KEY = "dh:canaries"
REASONS_KEY = "dh:canaries:reasons"
STARTS_KEY = "dh:canaries:starts"  # host -> when its workers last checked at start
CANARY_FILE = Path(__file__).with_name("encoder_canaries.json")
CANARY_INPUT_NAME = "golden_input+reversed/v1"
START_LOCK_SECONDS = 120  # one check per host when its workers start together
CHECK_THREADS = 4
OK, FAILED = "ok", "failed"
logger = logging.getLogger(__name__)


class CheckAbandoned(Exception):
    """The check stopped before every encoder ran (its worker is shutting down)."""


@dataclass(frozen=True)
class Canary:
    encoder_id: str
    params: bytes
    sha256: str


def canary_input() -> bytes:
    """`golden_input()` and its reverse: 260,000 bytes, several deflate blocks, two pigz
    blocks of 128 KiB and a short third, zstd blocks of every kind."""
    golden = golden_input()
    return golden + golden[::-1]


def canary_tar() -> bytes:
    """The canary input as a tar (for encoders that read tar entries: zstd:chunked), in
    the fixed ustar layout, so that no Python release changes its bytes."""
    data = canary_input()
    header = bytearray(512)
    fields = ((0, b"canary.bin"), (100, b"0000644\0"), (108, b"0000000\0"), (116, b"0000000\0"),
              (124, b"%011o\0" % len(data)), (136, b"00000000000\0"), (156, b"0"),
              (257, b"ustar\x0000"))  # fmt: skip
    for offset, value in fields:
        header[offset : offset + len(value)] = value
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    padding = bytes(-len(data) % 512)
    return bytes(header) + data + padding + bytes(1024)


def input_for(encoder_id: str) -> bytes:
    return canary_tar() if encoder_id.startswith("zstd/chunked-") else canary_input()


def default_params(encoder_id: str) -> bytes:
    """The params a new canary is recorded with: a plain 10-byte gzip header (the body is
    what is checked), klauspost's as containers/image writes, none for zstd:chunked, or a
    libzstd frame with checksum and content size."""
    if encoder_id.startswith("gzip/"):
        header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
        return encode_gzip_params(header, bytes(GZIP_TRAILER_LEN))
    if encoder_id.startswith("zstd/klauspost-"):
        return KlauspostOptions(checksum=True, first_write=8).encode()
    if encoder_id.startswith("zstd/chunked-"):
        return b""
    return ZstdOptions(True, True, len(canary_input())).encode()


def registered_ids() -> list[str]:
    """Every encoder id this build registers (an id whose program is missing included)."""
    return [encoder.encoder_id for encoder in all_encoders()]


def load_canaries(path: Path = CANARY_FILE) -> dict[str, Canary]:
    data = json.loads(path.read_text())
    if data.get("input") != CANARY_INPUT_NAME:
        found = data.get("input")
        raise ValueError(f"{path}: canaries of input {found!r}, not {CANARY_INPUT_NAME}")
    return {
        encoder_id: Canary(encoder_id, bytes.fromhex(entry["params"]), entry["sha256"])
        for encoder_id, entry in data["canaries"].items()
    }


def produce(encoder_id: str, params: bytes) -> str:
    """sha256 of what the encoder makes of the canary input (raises if it cannot run)."""
    data = input_for(encoder_id)
    chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))
    digest = hashlib.sha256()
    for chunk in encode(encoder_id, params, chunks):
        digest.update(chunk)
    return digest.hexdigest()


def check_one(canary: Canary) -> str:
    """ "" if the encoder still writes its canary's bytes, else why not."""
    try:
        lookup_encoder(canary.encoder_id)  # a clear reason when it is missing
        produced = produce(canary.encoder_id, canary.params)
    except EncoderUnavailableError as error:
        return f"missing: {error}"
    except Exception as error:
        return f"failed to run: {type(error).__name__}: {error}"
    if produced != canary.sha256:
        return f"drifted: produced sha256 {produced}, its canary expects {canary.sha256}"
    return ""


def check_all(
    canaries: dict[str, Canary] | None = None, stop: threading.Event | None = None
) -> dict[str, str]:
    """Every encoder id (recorded or registered here): "" if it passed, else why not.
    Once `stop` is set, the encoders not yet begun are skipped and CheckAbandoned is
    raised: a stopping worker waits for its in-flight checks only (its interpreter joins
    the pool's threads, which would otherwise run all ~160 checks first)."""
    canaries = load_canaries() if canaries is None else canaries

    def check_unless_stopped(canary: Canary) -> str:
        pause("canaries.check")
        if stop is not None and stop.is_set():
            raise CheckAbandoned(f"stopped before {canary.encoder_id} was checked")
        return check_one(canary)

    results = {
        encoder_id: "no canary recorded for this encoder id "
        "(pipelines/encoders/encoder_canaries.json)"
        for encoder_id in registered_ids()
        if encoder_id not in canaries
    }
    with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="canary") as pool:
        outcomes = pool.map(check_unless_stopped, canaries.values())
        checked = dict(zip(canaries, outcomes, strict=True))
    return {**checked, **results}


def record(client: redis.Redis[bytes], results: dict[str, str]) -> None:
    """Replace the stored results with these (one transaction: readers never see half)."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(CANARY_KEY, REASONS_KEY)
    if results:
        pipe.hset(CANARY_KEY, mapping={k: FAILED if v else OK for k, v in results.items()})
    failing: dict[str | bytes, str] = {k: v for k, v in results.items() if v}
    if failing:
        pipe.hset(REASONS_KEY, mapping={**failing})
    pipe.execute()
    for encoder_id, reason in sorted((str(k), v) for k, v in failing.items()):
        logger.error("encoder canary failed: %s: %s", encoder_id, reason)


def check_and_record(
    client: redis.Redis[bytes], stop: threading.Event | None = None
) -> dict[str, str]:
    results = check_all(stop=stop)
    record(client, results)
    return results


def check_at_start(
    client: redis.Redis[bytes], stop: threading.Event | None = None
) -> dict[str, str] | None:
    """The check when a worker starts; None if another worker of this host just ran it.
    One abandoned (CheckAbandoned) records nothing and leaves the next start to check."""
    host = socket.gethostname()
    lock = f"{CANARY_KEY}:started:{host}"
    if not client.set(lock, "1", nx=True, ex=START_LOCK_SECONDS):
        return None
    try:
        results = check_and_record(client, stop)
    except CheckAbandoned:
        client.delete(lock)
        raise
    client.hset(STARTS_KEY, host, str(time.time()))
    return results


def stored_reasons(client: redis.Redis[bytes]) -> dict[str, str]:
    raw = client.hgetall(REASONS_KEY)
    return {key.decode(): value.decode() for key, value in raw.items()}


def retirement_blocker(client: redis.Redis[bytes], encoder_id: str) -> str | None:
    """Why the intact copy of a layer made by `encoder_id` must be kept, or None: its
    canary failed, or none was checked (a layer is only as safe as its encoder). When no
    result is recorded at all (Redis lost them), the canaries are checked here first."""
    if not client.exists(CANARY_KEY):
        check_and_record(client)
    encoder_id = vouching_encoder_id(encoder_id)
    state = client.hget(CANARY_KEY, encoder_id)
    if state == OK.encode():
        return None
    if state is None:
        return f"encoder {encoder_id} has no passed canary (never checked here, or missing)"
    reason = client.hget(REASONS_KEY, encoder_id)
    detail = f": {reason.decode()}" if reason else ""
    return f"encoder {encoder_id} failed its canary{detail}"


def report(results: dict[str, str]) -> dict[str, Any]:
    """The answer of `verify --encoders`: whether all passed, and each failure's reason."""
    failed = {encoder_id: reason for encoder_id, reason in sorted(results.items()) if reason}
    return {"ok": not failed, "checked": len(results), "failed": failed}


def write_canaries(encoder_ids: Iterable[str], path: Path = CANARY_FILE) -> dict[str, str]:
    """Record the canaries of these ids as the encoders here write them (keeping those
    already recorded unchanged: a recorded canary is never rewritten)."""
    existing = load_canaries(path) if path.exists() else {}
    entries = {
        canary.encoder_id: {"params": canary.params.hex(), "sha256": canary.sha256}
        for canary in existing.values()
    }
    added: dict[str, str] = {}
    for encoder_id in encoder_ids:
        if encoder_id in entries:
            continue
        params = default_params(encoder_id)
        digest = produce(encoder_id, params)
        entries[encoder_id] = {"params": params.hex(), "sha256": digest}
        added[encoder_id] = digest
    document = {"input": CANARY_INPUT_NAME, "canaries": dict(sorted(entries.items()))}
    path.write_text(json.dumps(document, indent=1) + "\n")
    return added


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="record missing canaries")
    args = parser.parse_args(argv)
    if args.write:
        for encoder_id, digest in write_canaries(registered_ids()).items():
            print(f"recorded {encoder_id} {digest}")
        return
    failed = report(check_all())["failed"]
    for encoder_id, reason in failed.items():
        print(f"FAILED {encoder_id}: {reason}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
