"""The host's cores shared among processes (`pipelines.serve.cores`): never more holders
than cores, every core used while work waits, and a core held by a killed process free
again. Real processes, real flocks."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from pipelines.serve.cores import HostCores

COUNT = 2


def _hold_repeatedly(
    directory: str | None, threads: int, holds: int, seconds: float
) -> list[tuple[float, float]]:
    """Each of `threads` threads takes a core `holds` times for `seconds` (of the host's
    directory, or of this process alone): the (start, end) of every hold, on the host's
    monotonic clock."""
    cores = HostCores(Path(directory) if directory else None, COUNT)
    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(holds):
            with cores.held():
                start = time.monotonic()
                time.sleep(seconds)
                end = time.monotonic()
            with lock:
                intervals.append((start, end))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return intervals


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, change in events:  # an end sorts before a start at the same instant
        running += change
        most = max(most, running)
    return most


def test_processes_of_a_host_never_hold_more_cores_than_it_has_and_use_them_all(
    tmp_path: Path,
) -> None:
    """Three processes of three threads each, every thread wanting a core over and over:
    at no instant do more than COUNT hold one (each process alone would allow COUNT), and
    COUNT do hold one at once (the cores are not left idle while work waits)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        runs = pool.starmap(_hold_repeatedly, [(str(tmp_path), 3, 4, 0.03)] * 3)
    intervals = [interval for run in runs for interval in run]
    assert len(intervals) == 3 * 3 * 4
    assert _most_at_once(intervals) == COUNT


def test_one_process_alone_holds_at_most_count(tmp_path: Path) -> None:
    """The threads of one process queue on it too, with or without a host directory."""
    for directory in (str(tmp_path), None):
        assert _most_at_once(_hold_repeatedly(directory, 5, 3, 0.02)) == COUNT


def _hold_every_core(directory: str, ready: Connection) -> None:
    cores = HostCores(Path(directory), COUNT)
    holds = [cores.held() for _ in range(COUNT)]
    for hold in holds:
        hold.__enter__()
    ready.send("held")
    time.sleep(600)


def hold_every_core_elsewhere(directory: Path) -> multiprocessing.process.BaseProcess:
    """A process of the host holding all of its cores until it is killed."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    holder = context.Process(target=_hold_every_core, args=(str(directory), theirs), daemon=True)
    holder.start()
    assert ours.poll(60) and ours.recv() == "held"
    return holder


def test_a_core_held_by_a_killed_process_is_free_again(tmp_path: Path) -> None:
    """While another process holds every core, this one waits; once that process is
    killed (-9: no code of its own runs), every core can be taken."""
    holder = hold_every_core_elsewhere(tmp_path)
    cores = HostCores(tmp_path, COUNT)
    taken = threading.Event()
    release = threading.Event()

    def take_all() -> None:
        holds = [cores.held() for _ in range(COUNT)]
        for hold in holds:
            hold.__enter__()
        taken.set()
        release.wait()
        for hold in holds:
            hold.__exit__(None, None, None)

    taker = threading.Thread(target=take_all)
    taker.start()
    try:
        assert not taken.wait(0.5), "took a core another process holds"
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        assert taken.wait(10), "the killed process's cores were not freed"
    finally:
        release.set()
        holder.kill()
        taker.join()
