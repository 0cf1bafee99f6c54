"""Named pause points: how a test drives two pieces of the real code through one chosen
interleaving (a GC against an ingest, an upload, a restore or a reindex), across processes.

Off unless DUPHUNTER_PAUSE_DIR names a directory. Then a process that reaches point
`name` while the file `<dir>/<name>` exists creates `<dir>/<name>.reached` and waits until
the test removes `<dir>/<name>` (or MAX_PAUSE_SECONDS pass, so that a forgotten pause
cannot hang a process for ever). A point held for a key (the file holds it, e.g. a layer's
digest) stops only the process that passes that key: other layers' jobs go by. Files
rather than Redis: a test may empty Redis while a process waits at a point.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_DIR_VARIABLE = "DUPHUNTER_PAUSE_DIR"
MAX_PAUSE_SECONDS = 300.0
POLL_SECONDS = 0.01


def pause(name: str, key: str = "") -> None:
    """Wait here while the test holds point `name` (for `key`, if it named one); nothing
    at all when none is armed."""
    directory = os.environ.get(PAUSE_DIR_VARIABLE)
    if not directory:
        return
    armed = Path(directory, name)
    try:
        held_for = armed.read_text()
    except FileNotFoundError:
        return
    if held_for and held_for != key:
        return
    Path(directory, f"{name}.reached").touch()
    deadline = time.monotonic() + MAX_PAUSE_SECONDS
    while armed.exists() and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
