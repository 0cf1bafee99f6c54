"""Services as child processes, for the tests and the benchmarks: `Stack` starts them on
free ports, can kill, stop and respawn one (to test crashes and restarts), and stops them
all, in reverse order, on exit. `make run` runs the same commands under supervisord
(deploy/local.py)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import TracebackType

import redis
from minio import Minio

from deploy import services
from deploy.services import QUEUES

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


LISTEN_PORTS_FROM = 12000  # above the well-known ports of the services on a host


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen here (connections in TIME_WAIT do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(also_free_offset: int = 0) -> int:
    """A free loopback port; with an offset, one whose port+offset is free too. Drawn
    below the kernel's ephemeral range: a port there can be taken, between this check and
    the server's bind, as the source port of any outgoing connection."""
    highest = _ephemeral_low() - 1 - also_free_offset
    while True:
        port = random.randint(LISTEN_PORTS_FROM, highest)
        if port_is_free(port) and port_is_free(port + also_free_offset):
            return port


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def grpc_safe_ports(names: tuple[str, ...], taken: set[int]) -> dict[str, int]:
    """Free ports for SeaweedFS, which also listens on each port+10000 (gRPC) and refuses a
    port that is another one's gRPC port."""
    ports: dict[str, int] = {}
    used = {p for port in taken for p in (port, port + 10000)}
    for name in names:
        port = free_port(10000)
        while port in used or port + 10000 in used:
            port = free_port(10000)
        ports[name] = port
        used |= {port, port + 10000}
    return ports


S3_START_ATTEMPTS = 3


def wait_until(
    check: Callable[[], bool], what: str, timeout: float = 60, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} did not become ready within {timeout:.0f}s")


def _up_or_exited(process: subprocess.Popen[bytes], client: Minio, bucket: str) -> bool:
    return process.poll() is not None or client.bucket_exists(bucket)


class Stack:
    """Child processes started together and stopped together."""

    def __init__(self, workdir: Path, log_to_files: bool = True) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_to_files = log_to_files
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.commands: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        self.env = {**services.PROCESS_ENV, **os.environ}
        self.env["PYTHONPATH"] = str(REPO_ROOT)
        metrics = workdir / "metrics"  # every process's Prometheus samples (multiprocess mode)
        shutil.rmtree(metrics, ignore_errors=True)
        metrics.mkdir()
        self.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        output = open(self.workdir / f"{name}.log", "ab") if self.log_to_files else None  # noqa: SIM115
        process = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=env or self.env,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
        )
        self.processes.append((name, process))
        self.commands[name] = (args, env)

    def kill(self, name: str) -> None:
        """SIGKILL a service and all its children, as a crash would."""
        for entry in [entry for entry in self.processes if entry[0] == name]:
            os.killpg(entry[1].pid, signal.SIGKILL)
            entry[1].wait()
            self.processes.remove(entry)

    def respawn(self, name: str) -> None:
        args, env = self.commands[name]
        self.spawn(name, args, env)

    def signal_service(self, name: str, signum: int) -> None:
        """Send a signal to a service and its children (SIGSTOP freezes it, as a hung host)."""
        for entry in [entry for entry in self.processes if entry[0] == name]:
            os.killpg(entry[1].pid, signum)

    def stop_service(self, name: str, timeout: float = 30) -> None:
        """SIGTERM a service (a clean shutdown, as a restart does) and wait for it; one
        that was frozen is woken to hear it, and one still running after `timeout` is
        killed."""
        for entry in [entry for entry in self.processes if entry[0] == name]:
            os.killpg(entry[1].pid, signal.SIGTERM)
            os.killpg(entry[1].pid, signal.SIGCONT)
            try:
                entry[1].wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(entry[1].pid, signal.SIGKILL)
                entry[1].wait()
            self.processes.remove(entry)

    def wait_service(self, name: str, timeout: float) -> int:
        """Wait for a service told to stop (signal_service) to end; its exit status."""
        (entry,) = [entry for entry in self.processes if entry[0] == name]
        status = entry[1].wait(timeout=timeout)
        self.processes.remove(entry)
        return status

    def stop(self) -> None:
        for _name, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for _name, process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    # services
    def start_redis(self, port: int) -> str:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.spawn("redis", services.redis_command(server, port, self.workdir))
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: bool(redis.Redis.from_url(url).ping()), "redis")
        return url

    def start_s3(self, port: int, access_key: str, secret_key: str, bucket: str) -> str:
        """SeaweedFS `weed mini` as the local S3 server; its gRPC ports are port+10000.
        Its inner ports are picked free but may be taken before it binds them (by another
        stack, or a client's ephemeral port): if it exits, it starts again on new ones."""
        data = self.workdir / "s3"
        data.mkdir(exist_ok=True)
        env = dict(self.env, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
        endpoint = f"127.0.0.1:{port}"
        client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=False)
        for _attempt in range(S3_START_ATTEMPTS):
            ports = grpc_safe_ports(("master", "volume", "filer", "admin"), taken={port})
            self.spawn("s3", services.s3_command(VENV_BIN, port, data, ports, bucket), env=env)
            process = self.processes[-1][1]
            wait_until(partial(_up_or_exited, process, client, bucket), "S3 (weed mini)", 120)
            if process.poll() is None:
                return endpoint
            self.processes.pop()
        log = self.workdir / "s3.log"
        raise RuntimeError(f"S3 (weed mini) exited {S3_START_ATTEMPTS} times: see {log}")

    def start_api(self, listen: str, processes: int = 2, threads: int = 16) -> None:
        self.spawn("api", services.api_command(VENV_BIN, listen, processes, threads))
        wait_until(lambda: _http_ok(f"http://{listen}/v2/"), "API")

    def start_workers(self, queues: tuple[str, ...] = QUEUES, concurrency: int = 1) -> None:
        for queue in queues:
            self.start_worker(queue, f"worker-{queue}", concurrency)
        if "maintenance" in queues:
            schedule = self.workdir / "celerybeat-schedule"
            self.spawn("beat", services.beat_command(VENV_BIN, schedule))

    def start_worker(self, queue: str, name: str, concurrency: int = 1) -> None:
        """One Celery worker process (with `concurrency` children) consuming `queue`."""
        self.spawn(name, services.worker_command(VENV_BIN, queue, name, concurrency))

    def start_registry(
        self, settings: dict[str, str], queues: tuple[str, ...] = QUEUES, api_processes: int = 2
    ) -> str:
        """Redis, S3, the workers of `queues` and the API, with these DUPHUNTER_ settings
        (also exported to this process's environment); the API's address."""
        self.env["DUPHUNTER_REDIS_URL"] = self.start_redis(free_port())
        self.env["DUPHUNTER_S3_ENDPOINT"] = self.start_s3(
            free_port(10000), "duphunter", "duphunter-secret-key", "duphunter"
        )
        listen = f"127.0.0.1:{free_port()}"
        self.env.update(
            {"DUPHUNTER_LISTEN": listen, "DUPHUNTER_SPOOL_DIR": str(self.workdir / "spool")}
        )
        self.env.update(settings)
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("DUPHUNTER_")})
        self.start_workers(queues)
        self.start_api(listen, processes=api_processes)
        return listen

    def start_flower(self, port: int) -> None:
        self.spawn("flower", services.flower_command(VENV_BIN, "127.0.0.1", port))


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return int(response.status) == 200
