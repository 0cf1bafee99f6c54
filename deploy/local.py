"""`make run`: the whole stack on this machine, under supervisord.

supervisord (a well-kept process manager) runs every service as a program: a crashed
worker, API or Flower is restarted (with growing delays while it keeps failing at start)
and the restart is logged in var/supervisord.log. This launcher only decides what to run,
writes var/supervisord.conf, starts supervisord, and stops it on SIGINT, SIGTERM or SIGHUP,
which stops every program it started; if the launcher itself is killed, supervisord gets
SIGTERM from the kernel (PR_SET_PDEATHSIG), so nothing is left behind.

Redis and S3: `DUPHUNTER_REDIS_URL` and `DUPHUNTER_S3_ENDPOINT` name ones to use; without
them, a Redis of its own (loopback, port DUPHUNTER_LOCAL_REDIS_PORT, default 6390, data in
var/redis) and SeaweedFS (port DUPHUNTER_LOCAL_S3_PORT, default 8333, data in var/s3) are
started. A Redis that merely
answers somewhere is never used unless DUPHUNTER_REDIS_URL says so.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deploy import services
from deploy.stack import REPO_ROOT, VENV_BIN, grpc_safe_ports, port_is_free

PR_SET_PDEATHSIG = 1
LOCAL_S3_PORT = 8333
STARTUP_TIMEOUT = 180.0


@dataclass
class Plan:
    """The programs to run and what to tell the operator about them."""

    programs: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan(workdir: Path, env: dict[str, str], api_processes: int, flower_port: int) -> Plan:
    """What `make run` starts, given the environment; SystemExit if a port is taken."""
    result = Plan(env={**services.PROCESS_ENV, **env, "PYTHONPATH": str(REPO_ROOT)})
    _plan_redis(result, workdir, env)
    _plan_s3(result, workdir, env)
    listen = env.get("DUPHUNTER_LISTEN", f"127.0.0.1:{services.API_PORT}")
    _require_free(listen, "the API (DUPHUNTER_LISTEN)")
    _require_free(f"127.0.0.1:{flower_port}", "Flower (--flower-port)")
    metrics_dir = workdir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    result.env.update({"DUPHUNTER_LISTEN": listen, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    result.programs["api"] = services.api_command(VENV_BIN, listen, api_processes)
    for queue in services.QUEUES:
        result.programs[f"worker-{queue}"] = services.worker_command(VENV_BIN, queue, queue)
    result.programs["beat"] = services.beat_command(VENV_BIN, workdir / "celerybeat-schedule")
    result.programs["flower"] = services.flower_command(VENV_BIN, "127.0.0.1", flower_port)
    scheme = "https" if env.get("DUPHUNTER_TLS_CERT") else "http"
    result.notes.append(
        f"registry {scheme}://{listen}/v2/   Flower http://127.0.0.1:{flower_port}/"
    )
    return result


def _plan_redis(result: Plan, workdir: Path, env: dict[str, str]) -> None:
    if "DUPHUNTER_REDIS_URL" in env:
        result.notes.append(
            f"Redis {env['DUPHUNTER_REDIS_URL']} (DUPHUNTER_REDIS_URL; not started here)"
        )
        return
    port = int(env.get("DUPHUNTER_LOCAL_REDIS_PORT", "6390"))
    _require_free(f"127.0.0.1:{port}", "its Redis (DUPHUNTER_LOCAL_REDIS_PORT)")
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit(
            "redis-server is not installed: run `make system-deps` (or set DUPHUNTER_REDIS_URL)"
        )
    data = workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    result.programs["redis"] = services.redis_command(server, port, data)
    result.env["DUPHUNTER_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    result.notes.append(f"Redis redis://127.0.0.1:{port}/0 (started here, data in {data})")


def _plan_s3(result: Plan, workdir: Path, env: dict[str, str]) -> None:
    if "DUPHUNTER_S3_ENDPOINT" in env:
        result.notes.append(
            f"S3 {env['DUPHUNTER_S3_ENDPOINT']} (DUPHUNTER_S3_ENDPOINT; not started here)"
        )
        return
    port = int(env.get("DUPHUNTER_LOCAL_S3_PORT", str(LOCAL_S3_PORT)))
    for taken in (port, port + 10000):
        _require_free(f"127.0.0.1:{taken}", "its S3 server (SeaweedFS)")
    data = workdir / "s3"
    data.mkdir(parents=True, exist_ok=True)
    bucket = env.get("DUPHUNTER_S3_BUCKET", "duphunter")
    ports = grpc_safe_ports(("master", "volume", "filer", "admin"), taken={port})
    result.programs["s3"] = services.s3_command(VENV_BIN, port, data, ports, bucket)
    result.env.update(
        {
            "DUPHUNTER_S3_ENDPOINT": f"127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": env.get("DUPHUNTER_S3_ACCESS_KEY", "duphunter"),
            "AWS_SECRET_ACCESS_KEY": env.get("DUPHUNTER_S3_SECRET_KEY", "duphunter-secret-key"),
        }
    )
    result.notes.append(
        f"S3 http://127.0.0.1:{port} bucket {bucket} (SeaweedFS started here, data in {data})"
    )


def _require_free(address: str, what: str) -> None:
    host, _, port = address.rpartition(":")
    if not port_is_free(int(port), host or "127.0.0.1"):
        raise SystemExit(
            f"cannot start {what}: {address} is in use (is DupHunter running already?)"
        )


def supervisor_conf(workdir: Path, programs: dict[str, list[str]]) -> str:
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sections = [
        f"[supervisord]\nnodaemon=true\nlogfile={workdir}/supervisord.log\n"
        f"pidfile={workdir}/supervisord.pid\nchildlogdir={logs}\n",
        f"[unix_http_server]\nfile={workdir}/supervisor.sock\n",
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        f"[supervisorctl]\nserverurl=unix://{workdir}/supervisor.sock\n",
    ]
    for name, command in programs.items():
        backend = name in ("redis", "s3")
        sections.append(
            f"[program:{name}]\n"
            f"command={shlex.join(command).replace('%', '%%')}\n"
            f"directory={REPO_ROOT}\n"
            f"priority={10 if backend else 20}\n"
            "autorestart=true\nstartsecs=3\nstartretries=20\n"
            "stopasgroup=true\nkillasgroup=true\nstopwaitsecs=20\n"
            f"stdout_logfile={logs}/{name}.log\nredirect_stderr=true\n"
        )
    return "\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the DupHunter stack locally")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "var"))
    parser.add_argument("--flower-port", type=int, default=services.FLOWER_PORT)
    parser.add_argument("--api-processes", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with _single_instance(workdir):
        raise SystemExit(_run(workdir, args.api_processes, args.flower_port))


@contextlib.contextmanager
def _single_instance(workdir: Path) -> Iterator[None]:
    pidfile = workdir / "run.pid"
    if pidfile.exists() and _alive(int(pidfile.read_text() or 0)):
        raise SystemExit(f"DupHunter is already running from {workdir} (pid {pidfile.read_text()})")
    pidfile.write_text(str(os.getpid()))
    try:
        yield
    finally:
        pidfile.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, ValueError):
        return False
    return pid > 0


def _run(workdir: Path, api_processes: int, flower_port: int) -> int:
    chosen = plan(workdir, dict(os.environ), api_processes, flower_port)
    conf = workdir / "supervisord.conf"
    conf.write_text(supervisor_conf(workdir, chosen.programs))
    supervisor = subprocess.Popen(
        [str(VENV_BIN / "supervisord"), "-n", "-c", str(conf)],
        env=chosen.env,
        cwd=REPO_ROOT,
        preexec_fn=_die_with_parent,
    )
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: supervisor.send_signal(signal.SIGTERM))
    tls = bool(chosen.env.get("DUPHUNTER_TLS_CERT"))
    if _wait_for_api(chosen.env["DUPHUNTER_LISTEN"], supervisor, tls):
        print("DupHunter is up:", *chosen.notes, f"logs in {workdir}/logs/", sep="\n  ", flush=True)
        print("  (Ctrl-C, SIGTERM or SIGHUP stop everything)", flush=True)
    code = supervisor.wait()
    print("DupHunter stopped", flush=True)
    return code


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_for_api(listen: str, supervisor: subprocess.Popen[bytes], tls: bool) -> bool:
    """Until the API answers its liveness check (open whatever the auth settings), over
    TLS when it serves TLS (its certificate may be self-signed: only liveness is read)."""
    url = f"{'https' if tls else 'http'}://{listen}/api/v1/health"
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and supervisor.poll() is None:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=2, context=context) as response,
        ):
            if response.status == 200:
                return True
        time.sleep(0.5)
    print(f"the API did not answer on {listen}: see the logs", file=sys.stderr)
    return False


if __name__ == "__main__":
    main()
