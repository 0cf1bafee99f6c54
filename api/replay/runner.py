"""Replaying a workload at real time: each event starts at its time from the start of the
replay (never earlier; later only when the client is still busy with its previous pull or
every client slot is taken, which is recorded as lag).

A client pulls as docker does: GET the manifest, then GET the config and the layers it
does not hold, `downloads` at a time, hashing every byte. Its local store is the set of
digests it has fetched and verified; a `fresh` pull empties it first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from api.replay.progress import Status, bar
from api.replay.push import Pushed, image_documents
from api.replay.transport import Connection, Get, PushError, client_address, is_loopback
from api.replay.workload import Event, Fetch, Pull, Tag, Workload


@dataclass
class ReplayOptions:
    max_clients: int = 16  # clients replaying at once
    downloads: int = 3  # concurrent blob GETs per pull (docker's default)
    oracle: bool = False  # ask the registry to preconstruct exactly what will be fetched
    progress: bool = True
    own_addresses: bool = True  # one loopback source address per client


@dataclass
class PullRecord:
    kind: str  # "pull", "fetch" or "tag"
    at: float  # when it was due, seconds from the start
    client: str
    repository: str
    tag: str
    fresh: bool
    lag_s: float  # started this late
    seconds: float = 0.0
    fetched: int = 0  # blobs GET
    error: str = ""


@dataclass
class ClientState:
    name: str
    connection: Connection
    held: set[str] = field(default_factory=set)
    pending: deque[Event] = field(default_factory=deque)
    active: bool = False


@dataclass
class ReplayResult:
    gets: list[Get]
    pulls: list[PullRecord]
    oracle_requests: int
    oracle_errors: list[str]
    wall_s: float


class Replayer:
    def __init__(
        self, url: str, workload: Workload, pushed: Pushed, options: ReplayOptions
    ) -> None:
        self.url, self.workload, self.pushed, self.options = url, workload, pushed, options
        self.lock = threading.Lock()
        self.gets: list[Get] = []
        self.pulls: list[PullRecord] = []
        self.oracle_requests = 0
        self.oracle_errors: list[str] = []
        self.api = Connection(url)
        self.oracle_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="oracle")
        own = options.own_addresses and is_loopback(url)
        self.clients = {
            name: ClientState(name, Connection(url, client_address(n) if own else None))
            for n, name in enumerate(workload.clients())
        }
        self.start = 0.0
        self.status = Status(options.progress)

    def run(self) -> ReplayResult:
        events = sorted(self.workload.events, key=lambda event: event.at)
        self.start = time.monotonic()
        with ThreadPoolExecutor(self.options.max_clients, thread_name_prefix="client") as pool:
            for event in events:
                self._wait_until(self.start + event.at)
                self._dispatch(event, pool)
            while not self._idle():
                self._wait_until(time.monotonic() + 0.5)
        self.oracle_pool.shutdown(wait=True)
        self.status.done(self._line())
        return ReplayResult(
            self.gets,
            self.pulls,
            self.oracle_requests,
            self.oracle_errors,
            time.monotonic() - self.start,
        )

    def _line(self) -> str:
        with self.lock:
            done, gets = len(self.pulls), len(self.gets)
            errors = sum(1 for get in self.gets if get.error)
        total = len(self.workload.events)
        return (
            f"{bar(done, total)} {done}/{total} pulls  "
            f"{time.monotonic() - self.start:4.0f}/{self.workload.duration():.0f} s  "
            f"{gets} GETs  {errors} errors"
        )

    def _idle(self) -> bool:
        with self.lock:
            return not any(client.active for client in self.clients.values())

    def _wait_until(self, moment: float) -> None:
        while (left := moment - time.monotonic()) > 0:
            time.sleep(min(left, 0.25))
            self.status.update(self._line())

    def _dispatch(self, event: Event, pool: ThreadPoolExecutor) -> None:
        client = self.clients[event.client]
        with self.lock:
            client.pending.append(event)
            if client.active:
                return
            client.active = True
        pool.submit(self._drain, client)

    def _drain(self, client: ClientState) -> None:
        """Run the client's events one after the other until none is pending, then drop
        its idle connections (a trace may have many thousands of clients)."""
        while True:
            with self.lock:
                if not client.pending:
                    client.connection.close()
                    client.active = False
                    return
                event = client.pending.popleft()
            try:
                record = self._play(client, event)
            except Exception as error:  # a bug must not hang the replay; it is reported
                record = self._record(event)
                record.error = f"replayer: {type(error).__name__}: {error}"
            with self.lock:
                self.pulls.append(record)

    def _record(self, event: Event) -> PullRecord:
        lag = time.monotonic() - (self.start + event.at)
        if isinstance(event, Pull):
            return PullRecord(
                "pull", event.at, event.client, event.repository, event.tag, event.fresh, lag
            )
        if isinstance(event, Tag):
            return PullRecord(
                "tag", event.at, event.client, event.repository, event.tag, False, lag
            )
        return PullRecord(
            "fetch", event.at, event.client, event.repository, event.layer, False, lag
        )

    def _play(self, client: ClientState, event: Event) -> PullRecord:
        record = self._record(event)
        started = time.monotonic()
        if isinstance(event, Pull):
            self._pull(client, event, record)
        elif isinstance(event, Tag):
            self._publish(client, event, record)
        else:
            self._fetch(client, event, record)
        record.seconds = time.monotonic() - started
        return record

    def _new_get(self, kind: str, client: ClientState, repository: str, digest: str) -> Get:
        return Get(kind, client.name, repository, digest, at=time.monotonic() - self.start)

    def _pull(self, client: ClientState, event: Pull, record: PullRecord) -> None:
        if event.fresh:
            client.held.clear()
        image = self.workload.images[(event.repository, event.tag)]
        if self.options.oracle:
            self._oracle(client, event, [self.pushed.layers[key].digest for key in image.layers])
        get = self._new_get("manifest", client, event.repository, event.tag)
        manifest = client.connection.manifest(get)
        self._keep(get)
        if manifest is None:
            record.error = get.error
            return
        wanted = self._missing(client, manifest)
        with ThreadPoolExecutor(self.options.downloads) as downloads:
            fetched = list(
                downloads.map(lambda blob: self._blob(client, event.repository, *blob), wanted)
            )
        record.fetched = len(fetched)
        record.error = next((get.error for get in fetched if get.error), "")

    def _missing(self, client: ClientState, manifest: dict[str, Any]) -> list[tuple[str, str, int]]:
        """(kind, digest, size) of the blobs a docker client would GET: those it lacks."""
        blobs = [("config", manifest["config"])] + [
            ("layer", layer) for layer in manifest["layers"]
        ]
        wanted: dict[str, tuple[str, str, int]] = {}
        for kind, descriptor in blobs:
            digest = str(descriptor["digest"])
            if digest not in client.held and digest not in wanted:
                wanted[digest] = (kind, digest, int(descriptor["size"]))
        return list(wanted.values())

    def _oracle(self, client: ClientState, event: Pull, layers: list[str]) -> None:
        """Knows the future: the layers this client is about to GET."""
        missing = [digest for digest in dict.fromkeys(layers) if digest not in client.held]
        if not missing:
            return

        def ask() -> None:
            error = self.api.preconstruct(event.repository, event.tag, missing)
            with self.lock:
                self.oracle_requests += 1
                if error:
                    self.oracle_errors.append(error)

        self.oracle_pool.submit(ask)

    def _publish(self, client: ClientState, event: Tag, record: PullRecord) -> None:
        image = self.workload.images[(event.repository, event.tag)]
        _config, manifest = image_documents(image, self.pushed.layers)
        try:
            client.connection.push_manifest(event.repository, event.tag, manifest)
        except PushError as error:
            record.error = str(error)

    def _fetch(self, client: ClientState, event: Fetch, record: PullRecord) -> None:
        layer = self.pushed.layers[event.layer]  # no manifest GET: nothing for the oracle
        get = self._blob(client, event.repository, "layer", layer.digest, layer.size)
        record.fetched, record.error = 1, get.error

    def _blob(self, client: ClientState, repository: str, kind: str, digest: str, size: int) -> Get:
        get = self._new_get(kind, client, repository, digest)
        client.connection.blob(get, size)
        if get.verified:
            with self.lock:
                client.held.add(digest)
        self._keep(get)
        return get

    def _keep(self, get: Get) -> None:
        with self.lock:
            self.gets.append(get)
