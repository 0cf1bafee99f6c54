"""The host's cores shared among processes (`pipelines.serve.cores`): never more holders
than cores, every core used while work waits, and a core held by a killed process free
again. Real processes, real flocks."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from deploy.stack import wait_until
from pipelines.serve import cores as cores_module
from pipelines.serve.cores import (
    ABANDONED_FORM_SECONDS,
    BACKGROUND_DEFER_SECONDS,
    CoreThreads,
    HostCores,
    Turn,
    background_turn,
    turn_key,
)
from tests.conftest import PausePoints

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


def enter_every_core(cores: HostCores) -> list[AbstractContextManager[None]]:
    """Every core of `cores`, taken one after the other: the holds, for their exits."""
    holds: list[AbstractContextManager[None]] = [cores.held() for _ in range(cores.count)]
    for hold in holds:
        hold.__enter__()
    return holds


def _hold_every_core(directory: str, ready: Connection) -> None:
    holds = enter_every_core(HostCores(Path(directory), COUNT))
    ready.send("held")
    time.sleep(600)
    del holds  # kept to here: a collected hold lets its core go


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
        holds = enter_every_core(cores)
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


# Turns: the interleavings of the queue, each driven deterministically (the test holds
# the cores and frees one at a time, so exactly one waiter can take it):
#   1. waiters of several processes, arrived in a shuffled order: cores go in turn order;
#   2. the same for the threads of one process (no host directory);
#   3. a waiter killed while it polls as the head, and one killed in the middle of the
#      queue: the ones behind still take the cores, in order, and the dead tickets go;
#   4. an older turn arriving while the head polls: the head stops polling and waits
#      behind it (pause point `cores.head`);
#   5. an older turn arriving between the head's look and its take of a free core: the
#      head gives the core back (pause point `cores.taken`);
#   6. a thread of `CoreThreads` ending a piece with its next one queued, while another
#      process waits: it keeps its core if that waiter's turn is younger, and gives it
#      back to an older one;
# and a torture over seeds: processes and threads with random turns, some of them kept
# from piece to piece, one process killed.


def _wait_for_a_core(directory: str, turn: Turn, conn: Connection) -> None:
    """Take a core in `turn`, say so, and hold it until told to let go."""
    with HostCores(Path(directory), COUNT).held(turn):
        conn.send(turn)
        conn.recv()


class _Queue:
    """Waiter processes queued on the host's cores, which this test process holds."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cores = HostCores(directory, COUNT)
        self.holds = enter_every_core(self.cores)
        self.waiters: dict[Turn, tuple[multiprocessing.process.BaseProcess, Connection]] = {}

    def add(self, turn: Turn) -> None:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        waiter = context.Process(target=_wait_for_a_core, args=(str(self.directory), turn, theirs))
        waiter.start()
        self.waiters[turn] = (waiter, ours)
        expected = len(self.waiters)
        wait_until(lambda: self.cores.waiting() == expected, f"the ticket of {turn}", timeout=60,
                   interval=0.01)  # fmt: skip

    def kill(self, turn: Turn) -> None:
        waiter, _ = self.waiters.pop(turn)
        assert waiter.pid is not None
        os.kill(waiter.pid, signal.SIGKILL)
        waiter.join()

    def free_one(self) -> None:
        self.holds.pop().__exit__(None, None, None)

    def grants(self, free_one: bool = True) -> list[Turn]:
        """Free one of the held cores (unless one is free already), then pass it from
        waiter to waiter: the turns in the order they took it."""
        if free_one:
            self.free_one()
        order: list[Turn] = []
        by_connection = {conn: turn for turn, (_, conn) in self.waiters.items()}
        while len(order) < len(self.waiters):
            ready = multiprocessing.connection.wait(list(by_connection), timeout=30)
            assert len(ready) == 1, f"{len(ready)} waiters took one core (after {order})"
            conn = ready[0]
            assert isinstance(conn, Connection)
            order.append(conn.recv())
            conn.send("let go")
            del by_connection[conn]
        return order

    def close(self) -> None:
        for waiter, _ in self.waiters.values():
            waiter.kill()
            waiter.join()
        for hold in self.holds:
            hold.__exit__(None, None, None)


def test_waiters_of_several_processes_take_the_cores_oldest_turn_first(tmp_path: Path) -> None:
    """Six processes queue in a shuffled order (restores begun at 1..3 s, two segments
    each); the cores go to them in turn order (queued at random, 1 chance in 720)."""
    turns = [(began, index) for began in (1, 2, 3) for index in (0, 1)]
    arrivals = random.Random(7).sample(turns, len(turns))
    queue = _Queue(tmp_path)
    try:
        for turn in arrivals:
            queue.add(turn)
        assert queue.grants() == turns
        assert queue.cores.waiting() == 0
    finally:
        queue.close()


def test_background_work_takes_its_turn_behind_the_next_minutes_restores(
    tmp_path: Path,
) -> None:
    """An ingest's proof (background work) that began at T waits behind a restore that
    began after it, at T + 1 s, but not behind one that began after the deferral, at
    T + BACKGROUND_DEFER_SECONDS + 1 s: a stream of restores cannot starve it."""
    began = time.time_ns()
    second = 1_000_000_000
    background = background_turn(began, 0)
    soon = (began + second, 0)
    later = (began + int(BACKGROUND_DEFER_SECONDS * second) + second, 0)
    queue = _Queue(tmp_path)
    try:
        for turn in (later, background, soon):
            queue.add(turn)
        assert queue.grants() == [soon, background, later]
    finally:
        queue.close()


def test_a_head_whose_process_holds_every_core_waits_for_it_without_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head of the queue (a restore's extra segment thread) whose own process holds
    every core does not poll the core files: it looks once, sleeps until its process
    frees a core, and takes that one (the long wait made 10 s here: only the release
    can wake it in time)."""
    monkeypatch.setattr(cores_module, "HELD_HERE_WAIT_SECONDS", 10.0)
    cores = HostCores(tmp_path, COUNT)
    holds = enter_every_core(cores)
    looks = 0
    free_core = cores._free_core

    def counted(directory: Path) -> int | None:
        nonlocal looks
        looks += 1
        return free_core(directory)

    monkeypatch.setattr(cores, "_free_core", counted)
    taken = threading.Event()

    def wait() -> None:
        with cores.held():
            taken.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: cores.waiting() == 1, "the waiter's ticket", interval=0.01)
    time.sleep(0.3)  # polling, it would look about 150 times
    assert looks == 1
    holds.pop().__exit__(None, None, None)
    assert taken.wait(5)
    waiter.join()
    holds.pop().__exit__(None, None, None)


def test_threads_of_one_process_take_the_cores_oldest_turn_first() -> None:
    """Without a host directory the process's own threads queue in turn order too."""
    cores = HostCores(None, COUNT)
    holds = enter_every_core(cores)
    order: list[Turn] = []
    let_go = threading.Semaphore(0)

    def wait(turn: Turn) -> None:
        with cores.held(turn):
            order.append(turn)
            let_go.acquire()

    turns = [(began, 0) for began in range(1, 7)]
    threads = []
    for turn in random.Random(7).sample(turns, len(turns)):
        threads.append(threading.Thread(target=wait, args=(turn,)))
        threads[-1].start()
        wait_until(lambda: cores.waiting() == len(threads), "queued", interval=0.01)
    holds.pop().__exit__(None, None, None)
    for granted in range(1, len(turns) + 1):
        wait_until(lambda: len(order) == granted, "a grant", interval=0.01)  # noqa: B023
        time.sleep(0.05)  # a second grant would show here: one core is free at a time
        assert len(order) == granted
        let_go.release()
    for thread in threads:
        thread.join()
    holds.pop().__exit__(None, None, None)
    assert order == turns


def test_a_killed_waiter_does_not_hold_up_the_ones_behind_it(tmp_path: Path) -> None:
    """Killed -9: the head (it polls the cores) and a waiter in the middle (it sleeps
    on the flock of the ticket ahead). The others take the cores in turn order and no
    ticket is left behind."""
    queue = _Queue(tmp_path)
    try:
        for began in (1, 2, 3, 4, 5):
            queue.add((began, 0))
        queue.kill((1, 0))
        queue.kill((3, 0))
        assert queue.grants() == [(2, 0), (4, 0), (5, 0)]
        assert queue.cores.waiting() == 0
    finally:
        queue.close()


def test_a_polling_head_waits_behind_an_older_turn_that_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter polling as the head (turn 5) is stopped at `cores.head`; an older turn
    (1) arrives. Let go, the head looks again, finds the older ticket and sleeps on it:
    it does not reach `cores.head` again until turn 1 has taken the core freed."""
    points = PausePoints(tmp_path / "pauses")
    monkeypatch.setenv(*points.environment().popitem())
    queue = _Queue(tmp_path / "cores")
    try:
        points.hold("cores.head", turn_key((5, 0)))
        queue.add((5, 0))
        points.wait_reached("cores.head")
        queue.add((1, 0))
        points.release("cores.head")
        time.sleep(0.1)  # out of the pause's loop (it looks every 10 ms)
        points.hold("cores.head", turn_key((5, 0)))  # reached again only if it polls
        time.sleep(0.3)  # as the head, it would look 150 times
        assert not (points.directory / "cores.head.reached").exists()
        points.release("cores.head")
        assert queue.grants() == [(1, 0), (5, 0)]
    finally:
        points.release_all()
        queue.close()


def test_a_head_that_took_a_core_as_an_older_turn_arrived_gives_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One core free: the head (turn 5) takes it and is stopped at `cores.taken`, before
    its second look; an older turn (1) arrives meanwhile. Let go, the head gives the core
    back and waits behind turn 1, which takes it first (a busy process can stop that
    long between a look and a take)."""
    points = PausePoints(tmp_path / "pauses")
    monkeypatch.setenv(*points.environment().popitem())
    queue = _Queue(tmp_path / "cores")
    try:
        queue.free_one()
        points.hold("cores.taken", turn_key((5, 0)))
        queue.add((5, 0))
        points.wait_reached("cores.taken")
        queue.add((1, 0))
        points.release("cores.taken")
        assert queue.grants(free_one=False) == [(1, 0), (5, 0)]
    finally:
        points.release_all()
        queue.close()


class _TakingCores(HostCores):
    """The host's cores, noting the turn of every core taken (not of one kept)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, COUNT)
        self.taken: list[Turn] = []

    @contextlib.contextmanager
    def held(self, turn: Turn | None = None) -> Iterator[None]:
        with super().held(turn):
            self.taken.append(turn or (0, 0))
            yield


class _Piece:
    """Work for `CoreThreads` that says when it began and runs until told to end."""

    def __init__(self) -> None:
        self.began, self.ends = threading.Event(), threading.Event()

    def __call__(self) -> None:
        self.began.set()
        assert self.ends.wait(30)


@pytest.mark.parametrize("other", ["younger", "older"])
def test_a_thread_keeps_its_core_for_its_next_piece_unless_an_older_turn_waits(
    tmp_path: Path, other: str
) -> None:
    """One core free; a thread of `CoreThreads` takes it for piece (10, 0), its piece
    (10, 1) queued behind, while a waiter process asks in turn (20, 0) or (5, 0). The
    first piece ends: a younger waiter waits on while (10, 1) runs on the kept core, and
    gets the core once nothing is queued; an older one gets it first. Kept means never let
    go: a core let go and asked for again could go to the younger in between (a thread
    can wait milliseconds for the GIL before it asks)."""
    queue = _Queue(tmp_path)
    cores = _TakingCores(tmp_path)
    threads: CoreThreads[None] = CoreThreads(1, cores)
    first, second = _Piece(), _Piece()
    waiter_turn = (20, 0) if other == "younger" else (5, 0)
    try:
        queue.free_one()
        threads.submit((10, 0), first)
        assert first.began.wait(10)
        queue.add(waiter_turn)
        second_done = threads.submit((10, 1), second)
        first.ends.set()
        _, waiter = queue.waiters[waiter_turn]
        if other == "younger":
            assert second.began.wait(10) and not waiter.poll(0.3)
            assert cores.taken == [(10, 0)]
            second.ends.set()
            assert waiter.poll(10) and waiter.recv() == waiter_turn
        else:
            assert waiter.poll(10) and waiter.recv() == waiter_turn
            assert not second.began.wait(0.3)
            waiter.send("let go")
            assert second.began.wait(10)
            assert cores.taken == [(10, 0), (10, 1)]
            second.ends.set()
        second_done.result(10)
    finally:
        first.ends.set()
        second.ends.set()
        threads.shutdown()
        queue.close()


def test_only_a_dead_waiters_old_forming_ticket_is_removed(tmp_path: Path) -> None:
    """Opening the cores removes a ticket file a waiter died forming (no flock on it,
    older than ABANDONED_FORM_SECONDS), and leaves one whose waiter lives (its flock
    held, however old) and a young one (its waiter may be between open and flock)."""
    waiting = tmp_path / "waiting"
    waiting.mkdir()
    long_ago = time.time() - ABANDONED_FORM_SECONDS - 1
    dead, live, young = (waiting / f".forming-{name}" for name in ("dead", "live", "young"))
    for path in (dead, live, young):
        path.touch()
    os.utime(dead, (long_ago, long_ago))
    os.utime(live, (long_ago, long_ago))
    holder = os.open(live, os.O_RDWR)  # another open file: its flock conflicts
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        HostCores(tmp_path, COUNT)
        assert sorted(path.name for path in waiting.iterdir()) == [live.name, young.name]
    finally:
        os.close(holder)


# The torture: DUPHUNTER_CORES_TORTURE_SEEDS seeds (default 5, about 2 s each) from
# DUPHUNTER_CORES_TORTURE_FIRST_SEED (default 0).
TORTURE_SEEDS = int(os.environ.get("DUPHUNTER_CORES_TORTURE_SEEDS", "5"))
TORTURE_FIRST_SEED = int(os.environ.get("DUPHUNTER_CORES_TORTURE_FIRST_SEED", "0"))
# Asking to having a ticket takes microseconds, unless descheduled; two cores freed at
# once are taken within microseconds, and either taker may read the clock first.
ASKED_SLACK_SECONDS = 0.1
GRANTED_SLACK_SECONDS = 0.005


@dataclass(frozen=True)
class Hold:
    turn: Turn
    asked: float  # the host's monotonic clock
    granted: float
    released: float


def _hold_in_random_turns(directory: str, seed: int, log: str) -> None:
    """Three threads, each running eight pieces of work in random turns (a restore begun
    up to 2 s ago, one of its first 8 segments) on `CoreThreads`, each piece held 1-20 ms:
    half of the pieces queued while the one before runs (its core kept for them, unless
    an older turn waits). Each piece a line of `log`, written once it ends (a process
    killed mid-piece leaves no line)."""
    cores = HostCores(Path(directory), COUNT)
    lock = threading.Lock()
    Path(f"{log}.started").touch()

    def work(thread: int) -> None:
        chooser = random.Random(seed * 10 + thread)
        pieces: CoreThreads[None] = CoreThreads(1, cores)
        began, last = threading.Event(), Future[None]()
        began.set()
        last.set_result(None)
        for _ in range(8):
            turn = (time.time_ns() - chooser.randrange(2_000_000_000), chooser.randrange(8))
            if chooser.random() < 0.5:  # queued while the last piece runs: its core kept
                began.wait()
            else:  # after it ended: its core given back
                last.result()
                time.sleep(chooser.uniform(0, 0.01))
            began = threading.Event()
            seconds = chooser.uniform(0.001, 0.02)
            asked = time.monotonic()
            last = pieces.submit(turn, functools.partial(piece, turn, seconds, asked, began))
        last.result()
        pieces.shutdown()

    def piece(turn: Turn, seconds: float, asked: float, began: threading.Event) -> None:
        granted = time.monotonic()
        began.set()
        time.sleep(seconds)
        released = time.monotonic()
        with lock, open(log, "a") as lines:
            lines.write(f"{turn[0]} {turn[1]} {asked} {granted} {released}\n")

    workers = [threading.Thread(target=work, args=(number,)) for number in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _read_holds(log: Path) -> list[Hold]:
    holds = []
    for line in log.read_text().splitlines() if log.exists() else []:
        began, index, asked, granted, released = line.split()
        holds.append(Hold((int(began), int(index)), float(asked), float(granted), float(released)))
    return holds


def inversions(holds: list[Hold]) -> list[tuple[Hold, Hold]]:
    """Pairs (first, later): `later` was waiting, with an older turn, well before
    `first` took its core, and took one well after it."""
    return [
        (first, later)
        for first in holds
        for later in holds
        if later.turn < first.turn
        and later.asked < first.granted - ASKED_SLACK_SECONDS
        and later.granted > first.granted + GRANTED_SLACK_SECONDS
    ]


@pytest.mark.parametrize("seed", range(TORTURE_FIRST_SEED, TORTURE_FIRST_SEED + TORTURE_SEEDS))
def test_torture_cores_in_turn_order_through_kills(tmp_path: Path, seed: int) -> None:
    """Four processes of three threads take cores in random turns; one, chosen by the
    seed, is killed -9 at a random moment (waiting, forming a ticket, or holding). The
    others all finish (nothing waits for ever on a dead waiter), never more than COUNT
    hold at once, no waiter is passed by a younger turn, and once a last waiter has
    gone through, no ticket is left."""
    chooser = random.Random(seed)
    context = multiprocessing.get_context("spawn")
    logs = [tmp_path / f"holds-{number}" for number in range(4)]
    processes = [
        context.Process(target=_hold_in_random_turns, args=(str(tmp_path), seed * 4 + n, str(log)))
        for n, log in enumerate(logs)
    ]
    for process in processes:
        process.start()
    victim = chooser.randrange(len(processes))
    wait_until(lambda: all(Path(f"{log}.started").exists() for log in logs), "started",
               timeout=60, interval=0.01)  # fmt: skip
    time.sleep(chooser.uniform(0, 1))  # the work takes about 1.5 s
    processes[victim].kill()
    for process in processes:
        process.join(60)
        assert not process.is_alive(), "a waiter never took its cores"
    survivors = [n for n in range(len(processes)) if n != victim]
    assert all(processes[n].exitcode == 0 for n in survivors)
    by_process = [_read_holds(log) for log in logs]
    holds = [hold for process_holds in by_process for hold in process_holds]
    assert sum(len(by_process[n]) for n in survivors) == len(survivors) * 3 * 8
    assert _most_at_once([(hold.granted, hold.released) for hold in holds]) <= COUNT
    assert inversions(holds) == []
    cores = HostCores(tmp_path, COUNT)
    with cores.held():
        pass
    assert cores.waiting() == 0
