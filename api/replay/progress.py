"""One status line on stderr: redrawn in place on a terminal; elsewhere (a log file, CI)
printed at most every 10 seconds, so that logs stay short."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Status:
    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = 0.0

    def update(self, text: str) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < (0.25 if self.tty else 10.0):
            return
        self.last = now
        self.stream.write(f"\r{text}\x1b[K" if self.tty else f"{text}\n")
        self.stream.flush()

    def done(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"\r{text}\x1b[K\n" if self.tty else f"{text}\n")
            self.stream.flush()
            self.last = 0.0


def bar(done: int, total: int, width: int = 30) -> str:
    share = done / total if total else 1.0
    return "[" + "#" * int(share * width) + "." * (width - int(share * width)) + "]"
