"""The deletion protocol: how garbage collection and whoever starts to rely on an object
exclude each other, without trusting Redis (docs/deletion.md holds the argument).

GC *publishes a notice* in S3 naming what it is about to delete, then marks again from
S3, and deletes only what is still unmarked. Whoever relies on an object (a manifest PUT
on the blobs it names, an upload or a mount on a blob that exists, an ingest on files
stored before) first makes that reliance visible in S3, as an object the marking reads (a
revision, a link, a recipe), and only then reads the notices. S3 orders writes and
reads, so one of the two sees the other: GC's second marking sees the reliance, or the
relier sees the notice and does not rely (it waits, refuses, or stores its own copy). A
notice is withdrawn only once its deletions are done, so a relier that finds no notice
and then finds the object present may rely on it.

A notice belongs to a run that holds a lease (`gc/runs/<run>`, renewed while it runs). A
run deletes only while its lease has more than CLOCK_MARGIN_SECONDS to go; a relier
ignores the notices of a run whose lease ran out more than CLOCK_MARGIN_SECONDS ago (the
run died or stopped) and checks that the object exists instead. Clocks of the hosts that
collect and that serve are assumed to agree within the margin.

Notice format (version 1): b"DHN" + version byte, a u32 length and a JSON header (run,
blob and manifest digests), then the raw sha256 digests of the files, 32 bytes each.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipelines.store.storage import ObjectNotFound, ObjectStore

NOTICE_PREFIX = "gc/notices/"
LEASE_PREFIX = "gc/runs/"
FORMAT_VERSION = 1
NOTICE_MAGIC = b"DHN" + bytes((FORMAT_VERSION,))
CLOCK_MARGIN_SECONDS = 30.0
WAIT_POLL_SECONDS = 0.2
_HEADER_LENGTH = struct.Struct(">I")
FILE_DIGEST_BYTES = 32


class NoticeError(ValueError):
    """A notice object is not in the format above."""


@dataclass(frozen=True)
class Notice:
    """What one run of GC is about to delete."""

    run: str
    blobs: frozenset[str] = frozenset()
    manifests: frozenset[str] = frozenset()
    files: frozenset[bytes] = frozenset()

    @property
    def kind(self) -> str:
        """ "files" for a notice naming files only, else "registry" (blobs, manifests): a
        relier that asks about one kind does not read the other's notices."""
        return "registry" if self.blobs or self.manifests else "files"

    def encode(self) -> bytes:
        header = json.dumps(
            {"run": self.run, "blobs": sorted(self.blobs), "manifests": sorted(self.manifests)}
        ).encode()
        return b"".join(
            [NOTICE_MAGIC, _HEADER_LENGTH.pack(len(header)), header, *sorted(self.files)]
        )

    @classmethod
    def decode(cls, data: bytes) -> Notice:
        if data[:4] != NOTICE_MAGIC:
            raise NoticeError("not a deletion notice of format version 1")
        (length,) = _HEADER_LENGTH.unpack_from(data, 4)
        start = 4 + _HEADER_LENGTH.size
        header = json.loads(data[start : start + length])
        body = data[start + length :]
        if len(body) % FILE_DIGEST_BYTES:
            raise NoticeError("the file digests of a notice are cut short")
        files = {body[i : i + FILE_DIGEST_BYTES] for i in range(0, len(body), FILE_DIGEST_BYTES)}
        return cls(
            str(header["run"]),
            frozenset(header["blobs"]),
            frozenset(header["manifests"]),
            frozenset(files),
        )


@dataclass(frozen=True)
class Condemned:
    """Of the objects a relier asked about, those a live run is deleting."""

    blobs: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    files: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.blobs or self.manifests or self.files)

    def describe(self) -> str:
        named = [*self.blobs, *self.manifests, *(f"sha256:{d.hex()}" for d in self.files)]
        more = f" and {len(named) - 3} more" if len(named) > 3 else ""
        return f"being garbage-collected: {', '.join(named[:3])}{more}"


class Notices:
    """The reliers' side: which of the objects they rely on a live GC run is deleting.
    Notices never change once written, so each is read once per process."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._read: dict[str, Notice] = {}

    def condemned(
        self,
        blobs: Iterable[str] = (),
        manifests: Iterable[str] = (),
        files: Iterable[bytes] = (),
    ) -> Condemned:
        listed = [key for key, _size in self.store.list(NOTICE_PREFIX)]
        if not listed:
            return Condemned()
        self._read = {key: notice for key, notice in self._read.items() if key in listed}
        wanted_blobs, wanted_manifests, wanted_files = set(blobs), set(manifests), set(files)
        kinds = {"registry"} if wanted_blobs or wanted_manifests else set()
        kinds |= {"files"} if wanted_files else set()
        found = Condemned()
        for key in [key for key in listed if key.rsplit("/", 1)[-1].split("-")[0] in kinds]:
            notice = self._notice(key)
            if notice is None:
                continue
            hits = Condemned(
                sorted(notice.blobs & wanted_blobs),
                sorted(notice.manifests & wanted_manifests),
                sorted(notice.files & wanted_files),
            )
            if hits and run_is_alive(self.store, notice.run):
                found.blobs.extend(hits.blobs)
                found.manifests.extend(hits.manifests)
                found.files.extend(hits.files)
        return found

    def wait_until_clear(
        self, timeout: float, blobs: Iterable[str] = (), manifests: Iterable[str] = ()
    ) -> Condemned:
        """Wait while a live run is deleting any of these (its notice for blobs and
        manifests is withdrawn within seconds); what is still condemned at `timeout`."""
        blobs, manifests = list(blobs), list(manifests)
        deadline = time.monotonic() + timeout
        while (found := self.condemned(blobs, manifests)) and time.monotonic() < deadline:
            time.sleep(WAIT_POLL_SECONDS)
        return found

    def _notice(self, key: str) -> Notice | None:
        if key not in self._read:
            try:
                self._read[key] = Notice.decode(self.store.get_bytes(key))
            except ObjectNotFound:  # withdrawn since the listing
                return None
        return self._read[key]


def run_is_alive(store: ObjectStore, run: str) -> bool:
    """Whether a run may still be deleting: its lease has not run out for longer than the
    clock margin. A run whose lease is gone has ended, or was found dead."""
    try:
        lease = json.loads(store.get_bytes(LEASE_PREFIX + run))
    except ObjectNotFound:
        return False
    return time.time() < float(lease["expires"]) + CLOCK_MARGIN_SECONDS


class RunLease:
    """GC's side: one run's lease, the notices it publishes, and whether it may still
    delete (only while its lease has more than the clock margin to go)."""

    def __init__(self, store: ObjectStore, seconds: float) -> None:
        self.store = store
        self.seconds = seconds
        self.run = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
        self.expires = 0.0
        self.notices: list[str] = []

    def start(self) -> None:
        self.clear_dead_runs()
        self.renew()

    def renew(self) -> None:
        """Extend the lease; if writing it fails, the old expiry stands (and the run stops
        deleting before it)."""
        expires = time.time() + self.seconds
        record = {"format": FORMAT_VERSION, "run": self.run, "expires": expires,
                  "host": socket.gethostname()}  # fmt: skip
        self.store.put_bytes(LEASE_PREFIX + self.run, json.dumps(record).encode())
        self.expires = expires

    def may_delete(self) -> bool:
        return time.time() < self.expires - CLOCK_MARGIN_SECONDS

    def publish(self, notice: Notice) -> None:
        key = f"{NOTICE_PREFIX}{self.run}/{notice.kind}-{len(self.notices)}"
        self.store.put_bytes(key, notice.encode())
        self.notices.append(key)

    def withdraw(self) -> None:
        """Withdraw this run's notices: its deletions so far are done."""
        self.store.delete(self.notices)
        self.notices = []

    def end(self) -> None:
        self.withdraw()
        self.store.delete([LEASE_PREFIX + self.run])

    def clear_dead_runs(self) -> None:
        """Notices and leases of runs that died (their lease ran out beyond the margin):
        nobody deletes for them any more, so reliers need not wait on them."""
        runs = {key.removeprefix(LEASE_PREFIX) for key, _size in self.store.list(LEASE_PREFIX)}
        noticed = {key.removeprefix(NOTICE_PREFIX).split("/", 1)[0]: key
                   for key, _size in self.store.list(NOTICE_PREFIX)}  # fmt: skip
        for run in (runs | set(noticed)) - {self.run}:
            if not run_is_alive(self.store, run):
                stale = [key for key, _s in self.store.list(f"{NOTICE_PREFIX}{run}/")]
                self.store.delete([*stale, LEASE_PREFIX + run])
