"""Processes of a `make run` stack that outlived it, and who holds a port.

A process belongs to the stack of a workdir when its environment says so
(`DUPHUNTER_LOCAL_WORKDIR=<workdir>`, set by the launcher and inherited by supervisord,
every program and their children). Nothing else counts as proof: a shell whose current
directory is in the workdir, or a program of another workdir, is never stopped from here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from deploy.die_with_parent import WORKDIR_MARK

STOP_SECONDS = 30.0  # a Celery worker's warm shutdown ends its task; supervisord waits 20 s
BACKENDS = ("redis-server", "weed")  # stopped last: the others flush their work into them
LISTEN = "0A"  # the TCP state in /proc/net/tcp


@dataclass(frozen=True)
class Process:
    pid: int
    command: str
    workdir: str | None  # the stack it belongs to, if any

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command[:80]})"

    @property
    def is_backend(self) -> bool:
        return any(name in self.command.split(" ", 1)[0] for name in BACKENDS)


def read_process(pid: int) -> Process | None:
    """The process, if it exists and this user may read its environment."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{WORKDIR_MARK}=".encode()
    marks = [entry[len(prefix) :] for entry in environ if entry.startswith(prefix)]
    workdir = os.fsdecode(marks[0]) if marks else None
    return Process(pid, command.decode(errors="replace"), workdir)


def of_stack(workdir: Path) -> list[Process]:
    """Every process of the stack started from `workdir`, this one excepted."""
    found = (read_process(pid) for pid in _pids() if pid != os.getpid())
    return [process for process in found if process and process.workdir == str(workdir)]


def stop(processes: list[Process], say: Callable[[str], None]) -> None:
    """All thawed (SIGCONT), should any be frozen; then SIGTERM to supervisord first (it
    stops its own programs in order), then to the other programs, then to Redis and S3,
    each batch given STOP_SECONDS; whatever still runs then gets SIGKILL."""
    for process in processes:
        _signal(process, signal.SIGCONT)
    supervisors = [p for p in processes if "supervisord" in p.command]
    backends = [p for p in processes if p.is_backend]
    programs = [p for p in processes if p not in supervisors and p not in backends]
    for batch in (supervisors, programs, backends):
        _terminate(batch)
    stubborn = [p for p in processes if _exists(p)]
    if stubborn:
        say(f"killing {len(stubborn)} that did not stop within {STOP_SECONDS:.0f} s")
        for process in stubborn:
            _signal(process, signal.SIGKILL)
        _wait_gone(stubborn, 5)


def holder_of_port(port: int) -> Process | None:
    """Who listens on this TCP port (None if nobody, or somebody this user cannot see)."""
    inodes = set(_listening_inodes(port))
    if not inodes:
        return None
    for pid in _pids():
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if links & {f"socket:[{inode}]" for inode in inodes}:
            return read_process(pid)
    return None


def _terminate(batch: list[Process]) -> None:
    for process in batch:
        _signal(process, signal.SIGTERM)
    _wait_gone(batch, STOP_SECONDS)


def _wait_gone(batch: Iterable[Process], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(_exists(p) for p in batch) and time.monotonic() < deadline:
        time.sleep(0.2)


def _exists(process: Process) -> bool:
    """Still running as the same process (a pid reused since then does not count)."""
    again = read_process(process.pid)  # a zombie's environment reads empty
    return again is not None and again.workdir == process.workdir


def _signal(process: Process, signum: int) -> None:
    if _exists(process):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _listening_inodes(port: int) -> Iterable[str]:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == LISTEN and int(fields[1].rpartition(":")[2], 16) == port:
                yield fields[9]
