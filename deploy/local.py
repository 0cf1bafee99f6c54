"""`make run`: the whole stack on this machine, under supervisord.

supervisord (a well-kept process manager) runs every service as a program: a crashed
worker, API or Flower is restarted (with growing delays while it keeps failing at start)
and the restart is logged in var/supervisord.log. This launcher decides what to run,
writes var/supervisord.conf, starts supervisord and prints what the operator needs.

Stopping, whatever happens to the launcher's terminal or output: Ctrl-C, SIGTERM, a
terminal hang-up (SIGHUP) and a closed output (the reader of a pipe gone: `| head`, a
killed `tee`) make the launcher ask supervisord to stop every program (in parallel, the
workers finishing their task, then Redis and S3). supervisord and the programs never
write to the launcher's output, only to files under the workdir, so a dead terminal cannot
kill them half-way. If the launcher is killed (SIGKILL), the kernel sends supervisord
SIGTERM; if supervisord is killed, each program gets SIGTERM (deploy/die_with_parent.py).
A start finds what a dead stack of the same workdir left running and stops it first
(deploy/leftovers.py); `--stop` (`make stop`) stops a stack from another terminal.

Redis and S3: `DUPHUNTER_REDIS_URL` and `DUPHUNTER_S3_ENDPOINT` name ones to use; without
them, a Redis of its own (loopback, port DUPHUNTER_LOCAL_REDIS_PORT, default 6390, data in
var/redis) and SeaweedFS (port DUPHUNTER_LOCAL_S3_PORT, default 8333, data in var/s3) are
started. A Redis that merely answers somewhere is never used unless DUPHUNTER_REDIS_URL
says so.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import os
import pwd
import secrets
import select
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from deploy import leftovers, services
from deploy.die_with_parent import WORKDIR_MARK, die_with_parent
from deploy.stack import REPO_ROOT, VENV_BIN, grpc_safe_ports, port_is_free
from pipelines.config import AuthSettings

LOCAL_S3_PORT = 8333
DEFAULT_WORKDIR = REPO_ROOT / "var"
STARTUP_TIMEOUT = 180.0
STOP_NOTICE = "takes up to ~30 s"  # the workers' warm shutdown (20 s at most), then Redis and S3
BACKENDS = ("redis", "s3")


@dataclass
class Plan:
    """The programs to run and what to tell the operator about them."""

    programs: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan(workdir: Path, env: dict[str, str], api_processes: int, flower_port: int) -> Plan:
    """What `make run` starts, given the environment; SystemExit if a port is taken."""
    result = Plan(
        env={
            **services.PROCESS_ENV,
            **env,
            "PYTHONPATH": str(REPO_ROOT),
            WORKDIR_MARK: str(workdir),
        }
    )
    _plan_redis(result, workdir, env)
    _plan_s3(result, workdir, env)
    listen = env.get("DUPHUNTER_LISTEN", f"127.0.0.1:{services.API_PORT}")
    _require_free(listen, "the API", "DUPHUNTER_LISTEN")
    _require_free(f"127.0.0.1:{flower_port}", "Flower", "DUPHUNTER_LOCAL_FLOWER_PORT")
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
    result.notes.append(authentication_note(listen))
    return result


def authentication_note(listen: str) -> str:
    """Whether the registry asks who is there, and how to make it ask."""
    settings = AuthSettings()
    if settings.auth == "none":
        return (
            f"authentication OFF: anyone who reaches {listen} may push, pull and delete; "
            "turn it on with DUPHUNTER_AUTH=htpasswd DUPHUNTER_HTPASSWD=<file> "
            "(README: Authentication)"
        )
    users = f", users in {settings.htpasswd}" if settings.auth == "htpasswd" else ""
    anonymous = ", anonymous pulls allowed" if settings.anonymous_pull else ""
    return f"authentication ON ({settings.auth}{users}{anonymous})"


def _plan_redis(result: Plan, workdir: Path, env: dict[str, str]) -> None:
    if "DUPHUNTER_REDIS_URL" in env:
        result.notes.append(
            f"Redis {env['DUPHUNTER_REDIS_URL']} (DUPHUNTER_REDIS_URL; not started here)"
        )
        return
    port = int(env.get("DUPHUNTER_LOCAL_REDIS_PORT", "6390"))
    _require_free(f"127.0.0.1:{port}", "its Redis", "DUPHUNTER_LOCAL_REDIS_PORT")
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
    setting = "DUPHUNTER_LOCAL_S3_PORT (SeaweedFS takes that port and the port + 10000)"
    for taken in (port, port + 10000):
        _require_free(f"127.0.0.1:{taken}", "its S3 server (SeaweedFS)", setting)
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


def _require_free(address: str, what: str, setting: str) -> None:
    host, _, port = address.rpartition(":")
    if port_is_free(int(port), host or "127.0.0.1"):
        return
    holder = leftovers.holder_of_port(int(port))
    if holder is None:
        by = "by a process this user cannot see"
    elif holder.workdir:
        by = f"by DupHunter started from {holder.workdir} ({holder}); stop it with: "
        by += stop_command(Path(holder.workdir))
    else:
        by = f"by {holder}, which is not one of DupHunter's (left alone)"
    raise SystemExit(
        f"cannot start {what}: {address} is in use {by}\n  or choose another port with {setting}"
    )


def stop_command(workdir: Path) -> str:
    """What an operator types to stop the stack of `workdir`."""
    if workdir == DEFAULT_WORKDIR.resolve():
        return f"make -C {shlex.quote(str(REPO_ROOT))} stop"
    python = shlex.quote(str(VENV_BIN / "python"))
    return (
        f"cd {shlex.quote(str(REPO_ROOT))} && {python} -m deploy.local --stop "
        f"--workdir {shlex.quote(str(workdir))}"
    )


def supervisor_name(program: str) -> str:
    """The program's name for supervisorctl: backends and the rest are two groups, each
    stopped as a whole (in parallel), the rest first."""
    return f"{'backends' if program in BACKENDS else 'duphunter'}:{program}"


def supervisor_conf(workdir: Path, programs: dict[str, list[str]]) -> str:
    """No CRIT lines at start: the user is named and the control socket has a password
    (the file is the operator's only, supervisorctl reads it from here)."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    user = pwd.getpwuid(os.getuid()).pw_name
    password = secrets.token_urlsafe(16)
    sections = [
        f"[supervisord]\nnodaemon=true\nsilent=true\nuser={user}\n"
        f"logfile={workdir}/supervisord.log\n"
        f"pidfile={workdir}/supervisord.pid\nchildlogdir={logs}\n",
        f"[unix_http_server]\nfile={workdir}/supervisor.sock\nchmod=0700\n"
        f"username={user}\npassword={password}\n",
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        f"[supervisorctl]\nserverurl=unix://{workdir}/supervisor.sock\n"
        f"username={user}\npassword={password}\n",
    ]
    for group, priority in (("backends", 10), ("duphunter", 20)):
        members = [name for name in programs if supervisor_name(name).startswith(f"{group}:")]
        if members:
            sections.append(f"[group:{group}]\nprograms={','.join(members)}\npriority={priority}\n")
    guard = [str(VENV_BIN / "python"), "-m", "deploy.die_with_parent"]
    for name, command in programs.items():
        sections.append(
            f"[program:{name}]\n"
            f"command={shlex.join(guard + command).replace('%', '%%')}\n"
            f"directory={REPO_ROOT}\n"
            "autorestart=true\nstartsecs=3\nstartretries=20\n"
            "stopasgroup=true\nkillasgroup=true\nstopwaitsecs=20\n"
            f"stdout_logfile={logs}/{name}.log\nredirect_stderr=true\n"
        )
    return "\n".join(sections)


class Output:
    """The launcher's stdout and stderr: a terminal, a pipe or a file, any of which may go
    away (a closed pipe, a hung-up terminal). Once gone, both point at /dev/null, so no later
    write fails, and the stack is stopped."""

    def __init__(self) -> None:
        self.closed = False

    def say(self, text: str, stream: TextIO | None = None) -> None:
        if self.closed:
            return
        try:
            print(text, file=stream or sys.stdout, flush=True)
        except OSError:  # EPIPE, or EIO from a hung-up terminal
            self._close()

    def gone(self) -> bool:
        if not self.closed and any(_hung_up(fd) for fd in (1, 2)):
            self._close()
        return self.closed

    def _close(self) -> None:
        self.closed = True
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(null, fd)
        os.close(null)


def _hung_up(fd: int) -> bool:
    """A pipe whose reader is gone reports POLLERR, a hung-up terminal POLLHUP."""
    poller = select.poll()
    poller.register(fd, 0)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


@dataclass
class StopRequest:
    """Set from signal handlers (which only record and forward); announced by the loop."""

    supervisor: subprocess.Popen[bytes]
    reasons: list[str] = field(default_factory=list)
    announced: int = 0

    def request(self, reason: str) -> None:
        if not self.reasons:
            with contextlib.suppress(ProcessLookupError):
                self.supervisor.send_signal(signal.SIGTERM)
        self.reasons.append(reason)

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.request(signal.Signals(signum).name)

    def announce(self, output: Output) -> None:
        if self.announced == len(self.reasons):
            return
        if self.announced == 0:
            output.say(f"{self.reasons[0]}: stopping DupHunter ({STOP_NOTICE})…")
        else:
            output.say(f"still stopping ({STOP_NOTICE}; the workers end their task first)…")
        self.announced = len(self.reasons)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the DupHunter stack locally")
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    parser.add_argument(
        "--flower-port",
        type=int,
        default=int(os.environ.get("DUPHUNTER_LOCAL_FLOWER_PORT", services.FLOWER_PORT)),
    )
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument("--stop", action="store_true", help="stop the stack of --workdir")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    output = Output()
    if args.stop:
        raise SystemExit(stop_stack(workdir, output))
    with _single_instance(workdir):
        _stop_leftovers(workdir, output)
        raise SystemExit(_run(workdir, args.api_processes, args.flower_port, output))


@contextlib.contextmanager
def _single_instance(workdir: Path) -> Iterator[None]:
    """One launcher per workdir: it holds run.lock (the kernel lets go when it dies,
    however it dies) and writes its pid to run.pid."""
    with open(workdir / "run.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(
                f"DupHunter is already running from {workdir} (pid {_launcher_pid(workdir)}); "
                f"Ctrl-C in its terminal stops it, or: {stop_command(workdir)}"
            ) from None
        (workdir / "run.pid").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (workdir / "run.pid").unlink(missing_ok=True)


def _launcher_pid(workdir: Path) -> int | None:
    """The running launcher of `workdir`, if its pid file names one (checked by command)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((workdir / "run.pid").read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"deploy.local" in command:
            return pid
    return None


def _locked(workdir: Path) -> bool:
    with open(workdir / "run.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def _stop_leftovers(workdir: Path, output: Output) -> bool:
    """Stop what a dead stack of this workdir left running; whether there was any."""
    found = leftovers.of_stack(workdir)
    if not found:
        return False
    output.say(
        f"a previous run from {workdir} left {len(found)} processes running "
        f"(pids {' '.join(str(p.pid) for p in found)}): stopping them first ({STOP_NOTICE})…"
    )
    leftovers.stop(found, output.say)
    return True


def stop_stack(workdir: Path, output: Output) -> int:
    """`--stop`: ask the running launcher to stop (and wait for it), or stop what a dead
    one left behind."""
    launcher = _launcher_pid(workdir) if _locked(workdir) else None
    if launcher is not None:
        output.say(f"stopping DupHunter (pid {launcher}, from {workdir}; {STOP_NOTICE})…")
        os.kill(launcher, signal.SIGTERM)
        deadline = time.monotonic() + 3 * leftovers.STOP_SECONDS
        while _locked(workdir) and time.monotonic() < deadline:
            time.sleep(0.2)
    stopped = _stop_leftovers(workdir, output)
    if launcher is None and not stopped:
        output.say(f"nothing of DupHunter runs from {workdir}")
    elif not leftovers.of_stack(workdir):
        output.say("DupHunter stopped")
    return 0 if not leftovers.of_stack(workdir) else 1


def _run(workdir: Path, api_processes: int, flower_port: int, output: Output) -> int:
    chosen = plan(workdir, dict(os.environ), api_processes, flower_port)
    conf = workdir / "supervisord.conf"
    conf.touch(mode=0o600)
    conf.chmod(0o600)
    conf.write_text(supervisor_conf(workdir, chosen.programs))
    console = workdir / "logs" / "supervisord.out"
    with open(console, "wb") as console_file:
        supervisor = subprocess.Popen(
            [str(VENV_BIN / "supervisord"), "-n", "-c", str(conf)],
            env=chosen.env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=console_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's Ctrl-C and hang-up reach the launcher only
            preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )
    stop = StopRequest(supervisor)
    _handle_stop_signals(stop)
    _supervise(supervisor, chosen, workdir, output, stop)
    code = supervisor.wait()
    if code != 0 and not stop.reasons:
        output.say(f"supervisord exited ({code}): {_tail(console)}", sys.stderr)
    output.say("DupHunter stopped")
    return code


def _handle_stop_signals(stop: StopRequest) -> None:
    """SIGINT, SIGTERM and SIGHUP stop the stack; one that was ignored when the launcher
    started (`nohup`, a background job of a script) stays ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, stop.on_signal)


def _supervise(
    supervisor: subprocess.Popen[bytes],
    chosen: Plan,
    workdir: Path,
    output: Output,
    stop: StopRequest,
) -> None:
    """Until supervisord exits: the banner once the API answers, and a stop when asked
    or when the output is gone."""
    tls = bool(chosen.env.get("DUPHUNTER_TLS_CERT"))
    api_up = _health_check(chosen.env["DUPHUNTER_LISTEN"], tls)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    waiting = True
    while supervisor.poll() is None:
        if output.gone() and not stop.reasons:
            stop.request("the output was closed")
        stop.announce(output)
        if waiting and not stop.reasons and api_up():
            _banner(chosen, workdir, output)
            waiting = False
        elif waiting and time.monotonic() > deadline:
            output.say(f"the API did not answer: see {workdir}/logs/api.log", sys.stderr)
            waiting = False
        with contextlib.suppress(subprocess.TimeoutExpired):
            supervisor.wait(timeout=0.5)


def _banner(chosen: Plan, workdir: Path, output: Output) -> None:
    output.say("\n  ".join(["DupHunter is up:", *chosen.notes, f"logs in {workdir}/logs/"]))
    output.say(f"  stop: Ctrl-C ({STOP_NOTICE}), or from another terminal: {stop_command(workdir)}")


def _health_check(listen: str, tls: bool) -> Callable[[], bool]:
    """Whether the API answers its liveness check (open whatever the auth settings), over
    TLS when it serves TLS (its certificate may be self-signed: only liveness is read)."""
    url = f"{'https' if tls else 'http'}://{listen}/api/v1/health"
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

    def answers() -> bool:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=2, context=context) as response,
        ):
            return int(response.status) == 200
        return False

    return answers


def _tail(path: Path, lines: int = 10) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return f"(no {path})"


if __name__ == "__main__":
    main()
