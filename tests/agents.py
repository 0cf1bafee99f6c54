"""Real processes a test drives, for the torture tests (tests/serve/test_*_torture.py):
a Python entry point of the test's own, commanded by JSON lines on its stdin and answering
by JSON lines on its stdout, which the test can SIGKILL or freeze as a crash or a stalled
host would."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

Message = dict[str, Any]
REPO_ROOT = Path(__file__).parents[1]  # not deploy.stack's: an agent imports little


class Agent:
    """One process running `entry` (Python source); each line it prints goes, parsed, to
    `on_message`, on a thread of the test's."""

    def __init__(
        self,
        entry: str,
        env: dict[str, str],
        on_message: Callable[[Message], None],
        stderr: IO[str] | None = None,
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", entry], cwd=REPO_ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
        self.on_message = on_message
        self.listener = threading.Thread(target=self._listen, daemon=True)
        self.listener.start()

    def _listen(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.on_message(json.loads(line))

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, command: Message) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def signal(self, number: int) -> None:
        os.kill(self.process.pid, number)

    def kill(self) -> None:
        """SIGKILL; what it printed before it died is still passed on."""
        self.process.kill()
        self.process.wait()
        self.listener.join(5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):  # a pipe to a killed process
                    stream.close()
