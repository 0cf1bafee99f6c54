"""A live stack for the tests: Redis, S3 (weed mini), the API under gunicorn and the
Celery workers, each on free loopback ports, started once per test session."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.stack import REPO_ROOT, VENV_BIN, Stack, free_port, wait_until
from pipelines.config import Settings
from pipelines.pauses import PAUSE_DIR_VARIABLE
from pipelines.registry.facade import Registry
from tests.client import RegistryClient


@dataclass
class LiveStack:
    url: str
    settings: Settings
    registry: Registry
    workdir: Path
    stack: Stack


TEST_SETTINGS = {
    "DUPHUNTER_MAX_BLOB_BYTES": str(1 << 30),
    "DUPHUNTER_RETIRE_GRACE_SECONDS": "1",
    "DUPHUNTER_RESTORE_KEEP_SECONDS": "1",
    "DUPHUNTER_VISIBILITY_TIMEOUT_SECONDS": "10",
    "DUPHUNTER_BUFFER_BYTES": str(512 << 20),
    "DUPHUNTER_CLAIM_LEASE_SECONDS": "5",
    "DUPHUNTER_INDEX_WAIT_SECONDS": "5",  # a job meeting an emptied index comes back sooner
    "DUPHUNTER_POPULARITY_TAU_SECONDS": "10",
    "DUPHUNTER_HOT_GETS_PER_HOUR": "3600",
    "DUPHUNTER_POPULARITY_INTERVAL_SECONDS": "3600",  # the tests run it
}


def start_live_stack(stack: Stack, workdir: Path, extra: dict[str, str]) -> LiveStack:
    """Redis, S3, the workers and the API on free ports, with the test settings (and
    `extra`); the returned registry talks to this stack whatever the environment says."""
    redis_url = stack.start_redis(free_port())
    access, secret, bucket = "duphunter", "duphunter-secret-key", "duphunter"
    endpoint = stack.start_s3(free_port(10000), access, secret, bucket)
    listen = f"127.0.0.1:{free_port()}"
    env = {
        "DUPHUNTER_REDIS_URL": redis_url,
        "DUPHUNTER_S3_ENDPOINT": endpoint,
        "DUPHUNTER_S3_ACCESS_KEY": access,
        "DUPHUNTER_S3_SECRET_KEY": secret,
        "DUPHUNTER_S3_BUCKET": bucket,
        "DUPHUNTER_LISTEN": listen,
        "DUPHUNTER_SPOOL_DIR": str(workdir / "spool"),
        **TEST_SETTINGS,
        **extra,
    }
    stack.env.update(env)
    stack.start_workers()
    stack.start_api(listen)
    with _environment(env):
        settings = Settings()
    return LiveStack(f"http://{listen}", settings, Registry.connect(settings), workdir, stack)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def own_live_stack(workdir: Path, extra: dict[str, str]) -> Iterator[LiveStack]:
    """A stack of a test's own, in `workdir`, with the test settings and `extra`."""
    with Stack(workdir) as stack:
        yield start_live_stack(stack, workdir, extra)


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    workdir = tmp_path_factory.mktemp("stack")
    pauses = PausePoints(workdir / "pauses").environment()  # armed by `live_points` only
    with own_live_stack(workdir, pauses) as stack_of_the_session:
        # code under test that reads settings from the environment uses this stack
        environment = stack_of_the_session.stack.env
        os.environ.update({k: v for k, v in environment.items() if k.startswith("DUPHUNTER_")})
        yield stack_of_the_session


def served_from_dedup(live: LiveStack) -> int:
    """How many times deduplicated layers were rebuilt or served from the layer buffer
    (a layer whose intact copy is gone is served by one or the other)."""
    restores = live.registry.index.counters().get("restores", 0)
    return restores + live.registry.buffer.stats_counters().get("hits", 0)


@contextlib.contextmanager
def extra_api(
    live: LiveStack,
    env: dict[str, str],
    preexec: Callable[[], None] | None = None,
    listen: str | None = None,
) -> Iterator[RegistryClient]:
    """A second API process on the stack's Redis and S3 (standing for another host: its
    own port and spool), with some settings changed; on `listen` (host:port) if given, so
    that one can be started again where a killed one was."""
    listen = listen or f"127.0.0.1:{free_port()}"
    spool = str(live.workdir / f"spool-{listen}")
    process = subprocess.Popen(
        [str(VENV_BIN / "gunicorn"), "--bind", listen, "--workers", "1",
         "--worker-class", "gthread", "--threads", "8", "api.app:app"],
        cwd=REPO_ROOT,
        env={**live.stack.env, "DUPHUNTER_SPOOL_DIR": spool, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=preexec,
        start_new_session=True,
    )  # fmt: skip
    try:
        client = RegistryClient(f"http://{listen}")
        wait_until(lambda: client.request("GET", "/v2/").status == 200, "second API")
        yield client
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def client(live: LiveStack) -> RegistryClient:
    return RegistryClient(live.url)


@pytest.fixture
def repo() -> str:
    """A repository name no other test uses."""
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def podman_home() -> Iterator[Path]:
    """A short private folder: podman refuses a runroot longer than 50 characters."""
    home = Path(tempfile.mkdtemp(prefix="dh-podman-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@functools.cache
def ensure_helpers() -> Path | str:
    """Build the Go helpers once (idempotent): their directory, or why the build failed."""
    directory = Path(os.environ.get("DUPHUNTER_HELPER_DIR") or REPO_ROOT / "build" / "helpers")
    build = REPO_ROOT / "pipelines" / "encoders" / "gohelpers" / "build.sh"
    done = subprocess.run(["bash", str(build), str(directory)], capture_output=True)
    if done.returncode != 0:
        return f"build.sh failed: {done.stderr.decode(errors='replace')[-2000:]}"
    return directory


@pytest.fixture(scope="session")
def helper_dir() -> Path:
    built = ensure_helpers()
    if isinstance(built, str):
        pytest.skip(built)
    return built


class PausePoints:
    """The test's side of `pipelines.pauses`: hold a named point, see a process reach it,
    let it go on. Every process of a stack started with `environment()` obeys."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def environment(self) -> dict[str, str]:
        return {PAUSE_DIR_VARIABLE: str(self.directory)}

    def hold(self, name: str, key: str = "") -> None:
        """Hold point `name` for every process, or only for the one that passes `key`."""
        (self.directory / f"{name}.reached").unlink(missing_ok=True)
        staged = self.directory / f".{name}.staged"  # renamed: never seen half written
        staged.write_text(key)
        staged.rename(self.directory / name)

    def wait_reached(self, name: str, timeout: float = 120) -> None:
        wait_until(lambda: (self.directory / f"{name}.reached").exists(), f"pause point {name}",
                   timeout=timeout, interval=0.01)  # fmt: skip

    def release(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)

    def release_all(self) -> None:
        for armed in self.directory.iterdir():
            if not armed.name.endswith(".reached"):
                armed.unlink(missing_ok=True)


@pytest.fixture
def live_points(live: LiveStack) -> Iterator[PausePoints]:
    """The pause points of the session's stack, each released when the test ends."""
    points = PausePoints(Path(live.stack.env[PAUSE_DIR_VARIABLE]))
    yield points
    points.release_all()
