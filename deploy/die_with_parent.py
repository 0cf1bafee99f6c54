"""`python -m deploy.die_with_parent COMMAND...`: run COMMAND so that it gets SIGTERM when
the process that started it dies, however it dies (SIGKILL included).

`make run` (deploy/local.py) starts supervisord this way and supervisord starts every
program through this module: if the launcher is killed, supervisord stops its programs;
if supervisord is killed, each program gets SIGTERM and shuts down as on a normal stop.
Standard library only: it runs before every program start.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1
# Set by the launcher in supervisord's environment, hence in every program's and their
# children's: the workdir of the stack they belong to (deploy/leftovers.py finds them by it).
WORKDIR_MARK = "DUPHUNTER_LOCAL_WORKDIR"


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies; exit at once if `parent` (the pid
    expected as parent) is already gone, since the kernel would then never send it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(1)


def _supervisord_pid() -> int:
    pidfile = Path(os.environ[WORKDIR_MARK]) / "supervisord.pid"
    try:
        return int(pidfile.read_text())
    except (OSError, ValueError):
        return -1


def main() -> None:
    command = sys.argv[1:]
    if not command:
        raise SystemExit("usage: python -m deploy.die_with_parent COMMAND [ARG...]")
    die_with_parent(_supervisord_pid())
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
