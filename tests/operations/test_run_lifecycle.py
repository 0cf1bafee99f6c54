"""`make run` (deploy/local.py) stops cleanly whatever happens to its terminal or output,
and a start after a dead one cleans up (issue 19).

Each test starts a whole stack, on free ports in a temporary workdir, and checks that no
process of it is left: this module's own search, wider than the launcher's, counts every
process whose environment, command line or current directory names the workdir.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.local import supervisor_name
from deploy.services import QUEUES
from deploy.stack import REPO_ROOT, VENV_BIN, free_port, port_is_free, wait_until

STOP_SECONDS = 60  # stopping takes up to ~30 s; a bound, not a speed
UP_SECONDS = 180


@dataclass
class LocalStack:
    """A `python -m deploy.local` (what `make run` runs) and what it was started with."""

    url: str
    workdir: Path
    process: subprocess.Popen[str]
    env: dict[str, str]
    ports: list[int]
    banner: list[str]

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(VENV_BIN / "supervisorctl"), "-c", str(self.workdir / "supervisord.conf")]
        return subprocess.run([*command, *args], capture_output=True, text=True, timeout=30)

    def pid_of(self, program: str) -> int:
        return int(self.supervisorctl("pid", supervisor_name(program)).stdout.strip())

    def all_running(self) -> bool:
        lines = [line for line in self.supervisorctl("status").stdout.splitlines() if line]
        return bool(lines) and all(" RUNNING " in line for line in lines)

    def supervisor_log(self) -> str:
        return (self.workdir / "supervisord.log").read_text()


def local_env(ports: list[int]) -> dict[str, str]:
    api, redis_port, s3, flower = ports
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("DUPHUNTER_")},
        "DUPHUNTER_LISTEN": f"127.0.0.1:{api}",
        "DUPHUNTER_LOCAL_REDIS_PORT": str(redis_port),
        "DUPHUNTER_LOCAL_S3_PORT": str(s3),
        "DUPHUNTER_LOCAL_FLOWER_PORT": str(flower),
        "DUPHUNTER_RETIRE_GRACE_SECONDS": "1",
        "DUPHUNTER_VISIBILITY_TIMEOUT_SECONDS": "10",
        # an ingest message lost with a killed worker is queued again by resume_ingests:
        # every 30 s here, not 600 s, within the 300 s the crash test waits
        "DUPHUNTER_RESUME_INTERVAL_SECONDS": "30",
    }


def free_ports() -> list[int]:
    """The API's, Redis's, S3's (with its port + 10000) and Flower's."""
    return [free_port(), free_port(), free_port(10000), free_port()]


def launcher_command(workdir: Path) -> list[str]:
    return [str(VENV_BIN / "python"), "-m", "deploy.local", "--workdir", str(workdir)]


def launch(
    workdir: Path,
    ports: list[int],
    output: int = subprocess.PIPE,
    preexec: Callable[[], None] | None = None,
) -> subprocess.Popen[str]:
    """The launcher in a session of its own (as a terminal's foreground job), its stdout
    and stderr to `output`."""
    return subprocess.Popen(
        launcher_command(workdir), cwd=REPO_ROOT, env=local_env(ports), stdin=subprocess.DEVNULL,
        stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=preexec,
    )  # fmt: skip


def read_banner(lines: Iterator[str]) -> list[str]:
    """The lines up to the end of the banner (the one that says how to stop)."""
    banner: list[str] = []
    for line in lines:
        banner.append(line.rstrip())
        if line.lstrip().startswith("stop:"):
            return banner
    pytest.fail(f"the launcher ended before it was up: {banner}")


def wait_workers_ready(workdir: Path) -> None:
    """Each Celery worker past its start (a worker stopped while it starts ends as it can,
    which is not what the graceful stops here are about)."""

    def ready() -> bool:
        logs = {queue: (workdir / "logs" / f"worker-{queue}.log").read_text() for queue in QUEUES}
        return all(f"{queue}@" in log and " ready." in log for queue, log in logs.items())

    wait_until(ready, "the workers ready", UP_SECONDS)


def start(workdir: Path, ports: list[int] | None = None) -> LocalStack:
    """A stack whose output is a pipe read by this process, once it is up."""
    ports = ports or free_ports()
    process = launch(workdir, ports)
    assert process.stdout is not None
    banner = read_banner(iter(process.stdout.readline, ""))
    wait_workers_ready(workdir)
    return LocalStack(f"http://127.0.0.1:{ports[0]}", workdir, process, local_env(ports),
                      ports, banner)  # fmt: skip


def drain(stack: LocalStack) -> None:
    """Keep reading the launcher's output (a reader that stays, unlike `head`)."""
    threading.Thread(target=lambda: stack.process.stdout and stack.process.stdout.read(),
                     daemon=True).start()  # fmt: skip


@contextlib.contextmanager
def temporary_workdir() -> Iterator[Path]:
    """Short (supervisord's socket path must fit in 108 bytes), removed afterwards; any
    process still running from it is killed, so that a failing test leaves nothing."""
    path = Path(tempfile.mkdtemp(prefix="dh-run-"))
    try:
        yield path
    finally:
        for pid, _ in processes_of(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    with temporary_workdir() as path:
        yield path


def processes_of(workdir: Path) -> list[tuple[int, str]]:
    """Every process (but this one) whose environment, command line or current directory
    names the workdir: pids and command lines."""
    found = []
    needle = str(workdir).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            command = Path(f"/proc/{name}/cmdline").read_bytes()
            environ = Path(f"/proc/{name}/environ").read_bytes()
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        if needle in command or needle in environ or cwd.startswith(str(workdir)):
            found.append((int(name), command.replace(b"\0", b" ").decode(errors="replace")))
    return found


def assert_nothing_left(stack: LocalStack, launcher_code: int | None = 0) -> None:
    """The launcher ends (with `launcher_code`, if given), then no process of the stack
    remains and every port it had is free again, within STOP_SECONDS."""
    code = stack.process.wait(timeout=STOP_SECONDS)
    if launcher_code is not None:
        assert code == launcher_code
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not processes_of(stack.workdir), "the stack gone", STOP_SECONDS)
    assert processes_of(stack.workdir) == []
    assert all(port_is_free(port) for port in stack.ports), stack.ports


def assert_stopped_gracefully(stack: LocalStack) -> None:
    """supervisord stopped each program (none killed after its stop timeout)."""
    log = stack.supervisor_log()
    for program in ("redis", "s3", "api", "beat", "flower", *(f"worker-{q}" for q in QUEUES)):
        assert f"stopped: {program} (exit status 0)" in log, log[-2000:]
    assert "SIGKILL" not in log, log[-2000:]


def tls_probe(url: str) -> None:
    """What docker and podman do first: a TLS handshake, here on the plain-HTTP port."""
    host, port = url.removeprefix("http://").split(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        pytest.raises(OSError),  # the API answers 400, in plain HTTP
    ):
        context.wrap_socket(raw, server_hostname=host)


def test_a_closed_output_stops_everything_and_the_start_is_quiet(workdir: Path) -> None:
    """`make run | head -1`: the reader goes, the stack stops (nothing killed half-way).
    The same start: the banner says authentication is off and how to stop; supervisord
    says nothing on the launcher's output and logs no CRIT line; TLS probes on the
    plain-HTTP port give one hint per API process, not a warning each."""
    stack = start(workdir)
    text = "\n".join(stack.banner)
    assert "authentication OFF" in text and "DUPHUNTER_AUTH=htpasswd" in text, text
    assert "Ctrl-C (takes up to ~30 s)" in text and "--stop" in text, text
    assert not [line for line in stack.banner if re.match(r"\d{4}-\d\d-\d\d ", line)], text
    for _ in range(6):
        tls_probe(stack.url)
    assert stack.process.stdout is not None
    stack.process.stdout.close()
    assert_nothing_left(stack)
    assert "CRIT" not in stack.supervisor_log()
    api_log = (workdir / "logs" / "api.log").read_text()
    assert "Invalid request" not in api_log, api_log
    assert 1 <= api_log.count("a client spoke TLS (HTTPS) to this plain-HTTP port") <= 2
    assert_stopped_gracefully(stack)


def test_a_hung_up_terminal_stops_everything(workdir: Path) -> None:
    """The launcher's controlling terminal goes away (a closed window, a dropped ssh):
    SIGHUP, and every later write to the terminal fails."""
    master, terminal = pty.openpty()

    def take_terminal() -> None:  # runs in the new session, stdout already the terminal
        fcntl.ioctl(1, termios.TIOCSCTTY, 0)

    ports = free_ports()
    process = launch(workdir, ports, output=terminal, preexec=take_terminal)
    os.close(terminal)
    with os.fdopen(master, "r", errors="replace", closefd=False) as screen:
        banner = read_banner(iter(screen.readline, ""))
    wait_workers_ready(workdir)
    stack = LocalStack("", workdir, process, {}, ports, banner)
    os.close(master)  # the hang-up
    assert_nothing_left(stack)
    assert_stopped_gracefully(stack)


def test_ctrl_c_with_tee_killed_stops_everything(workdir: Path) -> None:
    """`make run 2>&1 | tee run.log`, then Ctrl-C: SIGINT to the foreground job, tee gone
    with it; a second Ctrl-C while stopping does not cut the workers' warm shutdown."""
    stack = start(workdir)
    os.killpg(stack.process.pid, signal.SIGINT)
    assert stack.process.stdout is not None
    stack.process.stdout.close()
    time.sleep(1)
    os.killpg(stack.process.pid, signal.SIGINT)
    assert_nothing_left(stack)
    assert_stopped_gracefully(stack)


def test_sigkill_of_the_launcher_stops_everything(workdir: Path) -> None:
    """Nothing can be done in the launcher: supervisord hears of its death from the
    kernel and stops its programs."""
    stack = start(workdir)
    drain(stack)
    os.kill(stack.process.pid, signal.SIGKILL)
    assert_nothing_left(stack, launcher_code=-signal.SIGKILL)
    assert_stopped_gracefully(stack)


def test_a_start_after_a_dead_stack_stops_what_it_left(workdir: Path) -> None:
    """The launcher killed while supervisord hangs (frozen): every program still runs and
    holds its port. The next start stops them (and nothing else: neither a process in the
    workdir nor one of another stack), then comes up on the same ports; a third start
    refuses and gives the stop command, which then stops the second."""
    ports = free_ports()
    first = start(workdir, ports)
    drain(first)
    left = {pid for pid, _ in processes_of(workdir)} - {first.process.pid}
    os.kill(int((workdir / "supervisord.pid").read_text()), signal.SIGSTOP)
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(timeout=30)
    assert not port_is_free(ports[1]), "Redis is still there"
    in_the_workdir = _sleeper(workdir / "logs", {})
    of_another_stack = _sleeper(REPO_ROOT, {"DUPHUNTER_LOCAL_WORKDIR": "/elsewhere"})
    bystanders = [in_the_workdir, of_another_stack]
    try:
        second = start(workdir, ports)
        drain(second)
        text = "\n".join(second.banner)
        assert f"a previous run from {workdir} left" in text, text
        assert not any(_exists(pid) for pid in left)
        assert all(bystander.poll() is None for bystander in bystanders)
        # supervisord calls a program RUNNING once it stayed up `startsecs` (3 s): the
        # stack can be up and serving before that, on a fast machine
        wait_until(second.all_running, "every program RUNNING", 30)
    finally:
        for bystander in bystanders:
            bystander.kill()
            bystander.wait()
    third = subprocess.run(launcher_command(workdir), cwd=REPO_ROOT, env=second.env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert third.returncode != 0 and "already running" in third.stderr, third.stderr
    stop_command = third.stderr.rpartition("or: ")[2].strip()
    stopped = subprocess.run(stop_command, shell=True, capture_output=True, text=True,
                             timeout=2 * STOP_SECONDS)  # fmt: skip
    assert stopped.returncode == 0 and "DupHunter stopped" in stopped.stdout, stopped
    assert_nothing_left(second)
    assert_stopped_gracefully(second)


def test_a_program_ends_when_supervisord_is_killed(workdir: Path) -> None:
    """deploy.die_with_parent: the program gets SIGTERM when its parent dies by SIGKILL,
    and does not even start under a parent that is not the workdir's supervisord."""
    pidfile = workdir / "supervisord.pid"
    guarded = [str(VENV_BIN / "python"), "-m", "deploy.die_with_parent", "sleep", "600"]
    parent_code = (
        "import os, subprocess, sys, time\n"
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        f"print(subprocess.Popen({guarded!r}).pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "DUPHUNTER_LOCAL_WORKDIR": str(workdir), "PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen([str(VENV_BIN / "python"), "-c", parent_code], env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    wait_until(lambda: b"sleep" in Path(f"/proc/{child}/cmdline").read_bytes(), "exec", 30)
    parent.kill()
    parent.wait()
    wait_until(lambda: not _exists(child), "the program gone", 30)
    pidfile.write_text("1")  # another parent than the one it runs under
    orphan = subprocess.run(guarded, env=env, cwd=REPO_ROOT, timeout=30)
    assert orphan.returncode == 1


def test_a_port_taken_by_another_program_is_named_with_its_setting(workdir: Path) -> None:
    """Nothing of the stack starts, the holder (this test) is left alone, and the message
    names the port and the setting that moves it."""
    ports = free_ports()
    for taken, setting in ((ports[1], "DUPHUNTER_LOCAL_REDIS_PORT"),
                           (ports[2] + 10000, "DUPHUNTER_LOCAL_S3_PORT")):  # fmt: skip
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", taken))
            holder.listen()
            done = subprocess.run(launcher_command(workdir), cwd=REPO_ROOT,
                                  env=local_env(ports), capture_output=True, text=True,
                                  timeout=60)  # fmt: skip
        assert done.returncode != 0, done.stdout
        assert f"127.0.0.1:{taken} is in use by pid {os.getpid()}" in done.stderr, done.stderr
        assert "not one of DupHunter's" in done.stderr and setting in done.stderr
        assert processes_of(workdir) == []


def _sleeper(cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "600"], cwd=cwd, env={**os.environ, **env})


def _exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"
