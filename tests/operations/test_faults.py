"""Recovery without a hand: a dead holder's lock is free within seconds, a job that keeps
failing is given up, a worker rides out a Redis restart and hands its messages back at
once, GETs during a backend outage answer exactly or 503; and the fault test (every
kind of process killed, Redis and S3 restarted, under load; queues drain, every program
is back, nothing is lost)."""

from __future__ import annotations

import functools
import gzip
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis.exceptions import LockError

from deploy.stack import REPO_ROOT, VENV_BIN, wait_until
from pipelines.registry.gc import GcStopped
from pipelines.registry.jobmarks import GIVE_UP_AFTER
from pipelines.store.leases import Lease
from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack, extra_api, own_live_stack
from tests.layers import make_tar, wait_for_layers, wait_until_retired
from workers.app import make_celery
from workers.tasks import RETIRE, _settling, queue_retirement

MiB = 1 << 20


# locks


TEST_LEASE_SECONDS = 6


def test_a_killed_holders_lock_is_taken_over_within_seconds(live: LiveStack) -> None:
    """A process takes a lock and is killed (-9) holding it: another takes it within a
    lease, not after the minutes the work it guarded may take; a live holder keeps it
    well past its lease. (A lease of TEST_LEASE_SECONDS, not the 20 s of production: the
    same code, and the test waits a third as long.)"""
    name = f"dh:lock:fault-test-{time.time_ns()}"
    holder = subprocess.Popen(
        [str(VENV_BIN / "python"), "-c",
         "import sys, time, redis; from pipelines.store.leases import Lease\n"
         f"lease = Lease(redis.Redis.from_url({live.settings.redis_url!r}), {name!r}, "
         f"seconds={TEST_LEASE_SECONDS})\n"
         "assert lease.acquire(); print('held', flush=True); time.sleep(600)"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        other = Lease(live.registry.index.redis, name, blocking_timeout=1,
                      seconds=TEST_LEASE_SECONDS)  # fmt: skip
        time.sleep(TEST_LEASE_SECONDS * 1.5)  # a live holder renews its lease
        assert not other.acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        killed = time.monotonic()
        other = Lease(live.registry.index.redis, name, blocking_timeout=TEST_LEASE_SECONDS + 10,
                      seconds=TEST_LEASE_SECONDS)  # fmt: skip
        assert other.acquire()
        assert time.monotonic() - killed <= TEST_LEASE_SECONDS + 1
        other.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_gc_retried_takes_back_its_own_lock_at_once(live: LiveStack) -> None:
    """A GC attempt that could not release its lock (Redis unreachable at its end): the
    retry in the same job and process, under the same token, goes ahead at once; a run
    under another token waits and stops."""
    failed_attempt = live.registry.index.lock("gc")
    assert failed_attempt.acquire("job-1/host/1")
    failed_attempt._stop.set()  # its process lost track of it; the lease stays for now
    asked = time.time()
    report = live.registry.collector().run(dry_run=True, token="job-1/host/1")
    # it started without waiting out the 20 s lease (the run itself may take longer)
    assert not report.refused and report.started - asked < 5
    blocker = live.registry.index.lock("gc")
    assert blocker.acquire("job-3/host/1")
    try:
        with pytest.raises(GcStopped):
            live.registry.collector().run(dry_run=True, token="job-4/host/1")
    finally:
        blocker.release()


def test_a_retirement_meeting_a_busy_lock_is_never_given_up(live: LiveStack) -> None:
    """Torture seed 0 found it: retirements that met a killed holder's lock 3 times were
    given up for a day, and their intact copies never retired. A busy lock or a backend
    away counts no failure; any other error does."""
    marks = live.registry.jobmarks
    for error, given_up in ((LockError("busy"), False), (ValueError("broken"), True)):
        digest = "sha256:" + os.urandom(32).hex()
        for _run in range(GIVE_UP_AFTER):
            assert marks.claim(RETIRE, digest)
            with pytest.raises(type(error)):
                _settling(RETIRE, digest, functools.partial(_raise, error))
        assert (digest in marks.given_up(RETIRE)) is given_up
        marks.succeeded(RETIRE, digest)


def _raise(error: Exception) -> None:
    raise error


def test_a_retirement_failing_again_and_again_is_given_up_with_why(live: LiveStack) -> None:
    """A schedule queues a layer's retirement once while one is queued, and not at all
    once it failed GIVE_UP_AFTER times in a row (its error kept); a success forgets."""
    marks = live.registry.jobmarks
    digest = "sha256:" + os.urandom(32).hex()
    assert marks.claim(RETIRE, digest) and not marks.claim(RETIRE, digest)
    time.sleep(0.2)  # a mark older than the job could take: its job was lost, taken over once
    assert marks.claim(RETIRE, digest, stale_after=0.1)
    assert not marks.claim(RETIRE, digest, stale_after=0.1)
    time.sleep(0.2)  # stale again: of many schedules taking it over at once, one gets it
    with ThreadPoolExecutor(8) as pool:
        takers = list(pool.map(lambda _n: marks.claim(RETIRE, digest, stale_after=0.1), range(8)))
    assert takers.count(True) == 1, takers
    assert live.registry.index.redis.ttl(f"dh:job-queued:{RETIRE}:{digest}") > 0
    for _run in range(GIVE_UP_AFTER):
        marks.failed(RETIRE, digest, TimeoutError("S3 said no"))
    assert digest in marks.given_up(RETIRE)
    assert "S3 said no" in marks.failures(RETIRE)[digest]["error"]
    assert not queue_retirement(digest, False)
    marks.succeeded(RETIRE, digest)
    assert digest not in marks.failures(RETIRE)


# the worker and its messages


def received(log: Path, task_id: str) -> int:
    return log.read_text(errors="replace").count(f"[{task_id}] received")


def test_a_live_worker_keeps_its_messages_past_the_visibility_timeout(live: LiveStack) -> None:
    """A job held three visibility timeouts (its ETA) by a live worker is not given to it
    again: the worker keeps it visible, so the timeout can be short."""
    celery = make_celery(live.settings)
    timeout = live.settings.visibility_timeout_seconds
    job = celery.send_task("workers.tasks.watch_index", countdown=3 * timeout)
    job.get(timeout=3 * timeout + 60)
    assert received(live.workdir / "worker-maintenance.log", job.id) == 1


@pytest.fixture(scope="module")
def long_visibility(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """A stack whose visibility timeout (an hour) outlasts the test: what comes back
    within it was handed back, not swept."""
    workdir = tmp_path_factory.mktemp("long-visibility")
    with own_live_stack(workdir, {"DUPHUNTER_VISIBILITY_TIMEOUT_SECONDS": "3600"}) as live:
        yield live


def test_a_worker_survives_redis_restarts_and_hands_its_messages_back(
    long_visibility: LiveStack,
) -> None:
    live = long_visibility
    celery = make_celery(live.settings)
    jobs = [celery.send_task("workers.tasks.watch_index", countdown=25) for _n in range(3)]
    redis = live.registry.index.redis
    wait_until(lambda: redis.hlen("unacked") >= 3, "the worker holding the jobs")
    for _restart in range(2):
        live.stack.stop_service("redis")
        time.sleep(1)
        live.stack.respawn("redis")
        wait_until(lambda: bool(redis.ping()), "Redis back")
        time.sleep(5)
    alive = {name: process.poll() is None for name, process in live.stack.processes}
    assert all(alive.values()), alive  # kombu's AttributeError no longer kills it
    for job in jobs:
        job.get(timeout=90)  # within the hour: handed back at once
    log = live.workdir / "worker-maintenance.log"
    assert "Unrecoverable error" not in log.read_text(errors="replace")
    wait_until(lambda: redis.hlen("unacked") == 0, "nothing left unacknowledged", 30)


# GETs while a backend is down


def layer(size: int) -> bytes:
    return gzip.compress(make_tar({"f.bin": os.urandom(size), "g.txt": b"x" * 1000}), mtime=0)


@pytest.mark.parametrize("service", ["s3", "redis"])
def test_gets_during_a_backend_outage_answer_exactly_or_503(
    live: LiveStack, client: RegistryClient, repo: str, service: str
) -> None:
    """Blobs intact, buffered, restored from packs, and one whose GET must evict another
    from a small buffer (a second API): with S3 or Redis down, each GET gets its exact
    bytes or a 503 with Retry-After, never a 500 or other bytes."""
    intact = os.urandom(300_000)  # not a tar: kept intact
    buffered, restored, evicting = layer(2 * MiB), layer(2 * MiB), layer(2 * MiB)
    blobs = [intact, buffered, restored, evicting]
    client.push_image(repo, "v1", blobs)
    wait_for_layers(live, [sha256(blob) for blob in blobs[1:]])
    for blob in blobs[1:]:
        wait_until_retired(live, sha256(blob))
    live.registry.server.preconstruct(sha256(buffered), "warm", 1)
    with extra_api(live, {"DUPHUNTER_BUFFER_BYTES": str(3 * MiB)}) as small:
        assert small.request("GET", f"/v2/{repo}/blobs/{sha256(restored)}").data == restored
        live.stack.stop_service(service)
        try:
            for api in (client, small):
                for blob in blobs:
                    assert_exact_or_503(api, repo, blob)
        finally:
            live.stack.respawn(service)
    for blob in blobs:  # 503 until Redis's index is rebuilt, then exact bytes
        wait_until(functools.partial(assert_exact_or_503, client, repo, blob), "served", 180)


def assert_exact_or_503(api: RegistryClient, repo: str, blob: bytes) -> bool:
    """Whether one GET gave the exact bytes (True) or a 503 with Retry-After (False);
    anything else fails."""
    response = api.request("GET", f"/v2/{repo}/blobs/{sha256(blob)}")
    if response.status == 200:
        assert response.data == blob, "other bytes with a 200"
        return True
    assert response.status == 503, (response.status, response.data[:300])
    assert response.headers.get("Retry-After"), response.headers
    return False


# the fault test: every kind of process killed, Redis and S3 restarted, under load

SEED = int(os.environ.get("DUPHUNTER_FAULT_SEED", "19"))
PROGRAMS = ("api", "worker-ingest", "worker-restore", "worker-predict", "worker-maintenance",
            "beat")  # fmt: skip
BACKENDS = ("redis", "s3")
BACK_WITHIN_SECONDS = 60


@dataclass
class Load:
    """Pushes, pulls, deletes and GC runs from threads, and what must still be there."""

    live: LiveStack
    rng: random.Random
    alive: dict[str, tuple[str, bytes, str]] = field(default_factory=dict)  # layer -> repo,
    # its bytes, the manifest naming it
    deleted: set[str] = field(default_factory=set)
    wrong_bytes: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    mutex: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._loop, args=(action, seed), daemon=True)
                   for seed, action in enumerate((self.push, self.push, self.pull, self.pull,
                                                  self.delete, self.collect))]  # fmt: skip
        for thread in threads:
            thread.start()
        return threads

    def _loop(self, action: Callable[[random.Random, RegistryClient], None], seed: int) -> None:
        rng = random.Random(SEED * 100 + seed)
        client = RegistryClient(self.live.url)
        while not self.stop.is_set():
            try:
                action(rng, client)
            except Exception as error:  # a fault cut it: allowed, logged
                self.log.append(f"{getattr(action, '__name__', '?')}: {error!r}"[:200])
                time.sleep(0.5)
            time.sleep(rng.uniform(0.1, 0.6))

    def push(self, rng: random.Random, client: RegistryClient) -> None:
        repo = f"faults/r{rng.randrange(4)}"
        files = {f"lib/{n}.so": SHARED[n] for n in rng.sample(range(len(SHARED)), 4)}
        files[f"own/{rng.random()}"] = rng.randbytes(rng.randrange(8, 64) * 1024)
        blob = gzip.compress(make_tar(files), mtime=0)
        manifest, _body = client.push_image(repo, f"t{rng.randrange(10**6)}", [blob])
        with self.mutex:  # its manifest PUT answered 201
            self.alive[sha256(blob)] = (repo, blob, manifest)

    def pull(self, rng: random.Random, client: RegistryClient) -> None:
        with self.mutex:
            if not self.alive:
                return
            digest = rng.choice(sorted(self.alive))
            repo, blob, _manifest = self.alive[digest]
        response = client.request("GET", f"/v2/{repo}/blobs/{digest}")
        if response.status == 200 and response.data != blob:
            self.wrong_bytes.append(digest)

    def delete(self, rng: random.Random, client: RegistryClient) -> None:
        time.sleep(2)
        with self.mutex:
            if len(self.alive) < 4:
                return
            digest = rng.choice(sorted(self.alive))
            repo, _blob, manifest = self.alive.pop(digest)  # from now on, not checked
            self.deleted.add(digest)
        client.request("DELETE", f"/v2/{repo}/manifests/{manifest}")

    def collect(self, rng: random.Random, client: RegistryClient) -> None:
        time.sleep(rng.uniform(3, 8))
        make_celery(self.live.settings).send_task("workers.tasks.collect_garbage", (False,))


SHARED = [random.Random(SEED).randbytes(16 * 1024) for _n in range(12)]


@pytest.fixture
def fault_stack(tmp_path: Path) -> Iterator[LiveStack]:
    settings = {
        "DUPHUNTER_GC_GRACE_SECONDS": "2",
        "DUPHUNTER_MODE": "b0",
        "DUPHUNTER_RETRY_SECONDS": "60",
        # A Redis restarted loses its last second of writes (appendfsync everysec): an
        # ingest queued then is lost, and resume_ingests queues it again; sooner than its
        # 10 minutes in production, so that the check below waits for it.
        "DUPHUNTER_RESUME_INTERVAL_SECONDS": "30",
    }
    with own_live_stack(tmp_path / "stack", settings) as live:
        yield live


def test_every_process_killed_and_backends_restarted_under_load(fault_stack: LiveStack) -> None:
    """In a fixed (seeded) order, each program is killed (-9) and Redis and S3 are
    restarted, a few seconds apart, while threads push, pull, delete and collect; each
    program is started again as supervisord would. Then: every program answers within a
    minute of the last fault, the queues drain with nothing left unacknowledged, no pull
    ever got other bytes, and every pushed and not deleted layer pulls byte-exact and
    proves from its packs."""
    live, rng = fault_stack, random.Random(SEED)
    load = Load(live, rng)
    threads = load.run()
    time.sleep(8)  # some images in before the first fault
    faults = [*PROGRAMS, *BACKENDS]
    rng.shuffle(faults)
    for name in faults:
        if name in BACKENDS:
            live.stack.stop_service(name)
        else:
            live.stack.kill(name)
        time.sleep(rng.uniform(0.5, 2.0))
        live.stack.respawn(name)
        time.sleep(rng.uniform(3, 6))
    last_fault = time.monotonic()
    wait_until(lambda: every_program_answers(live), "every program back",
               timeout=BACK_WITHIN_SECONDS)  # fmt: skip
    assert time.monotonic() - last_fault <= BACK_WITHIN_SECONDS
    time.sleep(5)
    load.stop.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not load.wrong_bytes, load.wrong_bytes
    assert load.alive, load.log
    wait_until(lambda: queues_drained(live), "the queues drained", timeout=240)
    check_nothing_lost(live, load)


def every_program_answers(live: LiveStack) -> bool:
    if RegistryClient(live.url).request("GET", "/v2/").status != 200:
        return False
    alive = {name for name, process in live.stack.processes if process.poll() is None}
    if not {*PROGRAMS, *BACKENDS} <= alive:
        return False
    replies = make_celery(live.settings).control.ping(timeout=2.0) or []
    workers = {name.split("@")[0] for reply in replies for name in reply}
    return {name for name in PROGRAMS if name.startswith("worker-")} <= workers


def queues_drained(live: LiveStack) -> bool:
    index = live.registry.index
    waiting = sum(index.queue_length(queue) for queue in ("ingest", "restore", "predict",
                                                          "maintenance"))  # fmt: skip
    return waiting == 0 and index.redis.hlen("unacked") == 0


def check_nothing_lost(live: LiveStack, load: Load) -> None:
    client = RegistryClient(live.url)
    wait_for_layers(live, sorted(load.alive))
    for digest, (repo, blob, _manifest) in sorted(load.alive.items()):
        response = client.request("GET", f"/v2/{repo}/blobs/{digest}")
        assert response.status == 200 and response.data == blob, (digest, load.log[-10:])
        proof = live.registry.verify_blob(digest)
        assert proof["ok"], (digest, proof)
