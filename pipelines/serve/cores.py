"""The host's cores, shared by the segment encoders of every process on it, oldest
restore first.

A restore re-encodes segments on one core each. The API runs several processes (and a
restore worker may run beside them), each with as many segment threads as there are
cores: left to themselves, two processes restoring at once would run twice as many
encoders as the host has cores. `HostCores` hands out one core per encoder across
every process that names the same directory: a core is an exclusive `flock` on one file
of that directory, so the kernel takes it back from a process that dies holding it
(kill -9 included); nothing has to notice the death.

Cores go in turn order: a segment's turn is (when its restore began, its index), so
concurrent restores take turns, the oldest first, instead of sharing the cores and all
ending late together (a layer GET waits for its whole restore). An ingest's proof, which
re-encodes a pushed layer segment by segment too, takes the same cores in a later turn
(`background_turn`): behind the restores of the next minute. Within a process,
waiters queue on a heap. Across processes, each waiter holds the flock of a ticket in
`waiting/`, named by its turn: it sleeps in the kernel on the flock of the ticket just
ahead of it (blocking flock), which is released when that waiter takes a core or dies;
only the waiter with no ticket ahead polls the core files, every POLL_SECONDS (or,
while its own process holds every core, wakes when that process frees one), and
looks again for an older ticket each time (a restore older than its own may have
arrived), and once more after taking a free core: between a look and the take, a
busy process can be descheduled for milliseconds, and an older ticket that appeared
meanwhile gets the core back. A ticket whose flock is free is its dead waiter's: the
one behind removes it.

`CoreThreads` runs a restore's segments: each thread keeps its core from one segment to
the next while another is queued and no older turn waits, so a restore goes on where its
last segment ended, with neither a younger waiter nor a handoff to another thread
between two of its segments.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import heapq
import itertools
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Generic, TypeVar

from pipelines.config import HOST_CORES
from pipelines.pauses import pause

POLL_SECONDS = 0.002
HELD_HERE_WAIT_SECONDS = 0.05  # the longest a head sleeps while its own process holds
# every core: a release here wakes it at once; this bounds only what nothing else does
ABANDONED_FORM_SECONDS = 60.0  # a ticket file its waiter died forming, before naming it
BACKGROUND_DEFER_SECONDS = 60.0  # background work (an ingest's proof) takes its turn as
# if it had begun this much later: a client waits on a restore, nobody on an ingest. It
# still goes before restores that begin after that, so a stream of them cannot starve it.

# (when the work's restore began, ns since the epoch; the work's index in it): a lower
# turn takes a core first. Comparable across the processes of a host.
Turn = tuple[int, int]


def turn_now() -> Turn:
    """The turn of work that begins now."""
    return time.time_ns(), 0


def background_turn(began: int, index: int) -> Turn:
    """The turn of background work that `began` (ns since the epoch): behind the restores
    that begin within BACKGROUND_DEFER_SECONDS of it."""
    return began + int(BACKGROUND_DEFER_SECONDS * 1e9), index


def turn_key(turn: Turn) -> str:
    """The key a test holds pause points `cores.head` or `cores.taken` for, to stop one
    waiter there."""
    began, index = turn
    return f"{began}-{index}"


class HostCores:
    """At most `count` holders at a time: among this process's threads, and, given a
    `directory`, among every process of the host that uses it; lower turns first."""

    def __init__(self, directory: Path | None = None, count: int = HOST_CORES) -> None:
        self.directory = directory
        self.count = count
        self._local = _TurnGate(count)
        self._released = threading.Condition()  # a core of the directory freed here
        self._held_here = 0  # cores of the directory held by this process's threads
        if directory is not None:
            (directory / "waiting").mkdir(parents=True, exist_ok=True)
            _remove_abandoned_forms(directory / "waiting")

    @contextlib.contextmanager
    def held(self, turn: Turn | None = None) -> Iterator[None]:
        """One core, held for the block; `turn` by default: now."""
        turn = turn or turn_now()
        if self.directory is None:
            with self._local.held(turn):
                yield
            return
        descriptor = self._take(self.directory, turn)
        try:
            yield
        finally:
            with self._released:
                os.close(descriptor)  # and with it the flock
                self._held_here -= 1
                self._released.notify_all()

    def waiting(self) -> int:
        """How many wait for a core: of this process, or of the host's directory."""
        if self.directory is None:
            return self._local.waiting()
        return sum(not name.startswith(".") for name in os.listdir(self.directory / "waiting"))

    def older_waiting(self, turn: Turn) -> bool:
        """Whether work of a turn older than `turn` waits for a core."""
        if self.directory is None:
            return self._local.older_waiting(turn)
        bound = _turn_prefix(turn)  # below every ticket of this turn or a younger one
        return any(
            not name.startswith(".") and name < bound
            for name in os.listdir(self.directory / "waiting")
        )

    def _take(self, directory: Path, turn: Turn) -> int:
        waiting = directory / "waiting"
        with _ticket(waiting, turn) as name:
            while True:
                ahead = _nearest_ahead(waiting, name)
                if ahead is not None:
                    _wait_for_waiter(waiting / ahead)
                    continue
                pause("cores.head", turn_key(turn))  # a test holds one waiter here
                descriptor = self._free_core(directory)
                if descriptor is None:
                    self._wait_for_a_release()
                    continue
                pause("cores.taken", turn_key(turn))  # between the take and the look
                if _nearest_ahead(waiting, name) is None:
                    with self._released:
                        self._held_here += 1
                    return descriptor
                os.close(descriptor)  # an older turn arrived since the look: its core

    def _wait_for_a_release(self) -> None:
        """The head's pause between two looks at the cores: POLL_SECONDS while another
        process may free one; while this process holds them all, until it frees one
        (a restore runs a segment thread more than the cores: its head would otherwise
        poll all the time, and cost the restore about a tenth of its wall time)."""
        with self._released:
            if self._held_here >= self.count:
                self._released.wait(HELD_HERE_WAIT_SECONDS)
            else:
                self._released.wait(POLL_SECONDS)

    def _free_core(self, directory: Path) -> int | None:
        for number in range(self.count):
            descriptor = _try_lock(directory / f"core-{number}")
            if descriptor is not None:
                return descriptor
        return None


class _TurnGate:
    """The cores of one process alone: a heap of waiting turns."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._waiting: list[tuple[Turn, int]] = []
        self._arrivals = itertools.count()  # equal turns: first come first
        self._changed = threading.Condition()

    def waiting(self) -> int:
        with self._changed:
            return len(self._waiting)

    def older_waiting(self, turn: Turn) -> bool:
        with self._changed:
            return bool(self._waiting) and self._waiting[0][0] < turn

    @contextlib.contextmanager
    def held(self, turn: Turn) -> Iterator[None]:
        entry = (turn, next(self._arrivals))
        with self._changed:
            heapq.heappush(self._waiting, entry)
            try:
                while self._free == 0 or self._waiting[0] != entry:
                    self._changed.wait()
            except BaseException:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
                self._changed.notify_all()
                raise
            heapq.heappop(self._waiting)
            self._free -= 1
            self._changed.notify_all()  # the next turn, if a core is still free
        try:
            yield
        finally:
            with self._changed:
                self._free += 1
                self._changed.notify_all()


Result = TypeVar("Result")


class CoreThreads(Generic[Result]):
    """`threads` threads running the work submitted, in order, each piece on a core of
    `cores` in its turn. A thread keeps its core for its next piece while one is queued
    and no older turn waits; it gives the core back once nothing is queued."""

    def __init__(self, threads: int, cores: HostCores, name: str = "cores") -> None:
        self._cores = cores
        self._jobs: queue.SimpleQueue[_Job[Result] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, daemon=True, name=f"{name}-{number}")
            for number in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, turn: Turn, work: Callable[[], Result]) -> Future[Result]:
        future: Future[Result] = Future()
        self._jobs.put(_Job(turn, work, future))
        return future

    def shutdown(self) -> None:
        """Cancel what has not begun; the threads end once their pieces in hand do."""
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._jobs.get_nowait()
                if job is not None:
                    job.future.cancel()
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        core = _KeptCore(self._cores)
        try:
            job = self._jobs.get()
            while job is not None:
                if job.future.set_running_or_notify_cancel():
                    core.take(job.turn)
                    job.run()
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    core.give_back()  # nothing queued: the core would idle here
                    job = self._jobs.get()
        finally:
            core.give_back()


class _Job(Generic[Result]):
    def __init__(self, turn: Turn, work: Callable[[], Result], future: Future[Result]) -> None:
        self.turn, self.work, self.future = turn, work, future

    def run(self) -> None:
        try:
            result = self.work()
        except BaseException as error:  # handed to whoever waits on the future
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


class _KeptCore:
    """A thread's core, kept from one piece of its work to the next unless an older turn
    waits for one."""

    def __init__(self, cores: HostCores) -> None:
        self._cores = cores
        self._hold = contextlib.ExitStack()
        self._held = False

    def take(self, turn: Turn) -> None:
        if self._held and self._cores.older_waiting(turn):
            self.give_back()
        if not self._held:
            self._hold.enter_context(self._cores.held(turn))
            self._held = True

    def give_back(self) -> None:
        self._hold.close()
        self._held = False


def _ticket_name(turn: Turn) -> str:
    """Sorted as the turns are, unique by the uuid."""
    return f"{_turn_prefix(turn)}{uuid.uuid4().hex}"


def _turn_prefix(turn: Turn) -> str:
    """What every ticket of `turn` begins with: zero-padded, so names sort as turns do."""
    began, index = turn
    return f"{began:020d}-{index:08d}-"


@contextlib.contextmanager
def _ticket(waiting: Path, turn: Turn) -> Iterator[str]:
    """A ticket in `waiting` whose flock this waiter holds from before anyone can see
    it (formed under a dot name, then renamed) until it leaves: its name is unlinked
    before the flock goes, so a free flock on a listed ticket means a dead waiter."""
    forming = waiting / f".forming-{uuid.uuid4().hex}"
    descriptor = os.open(forming, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        name = _ticket_name(turn)
        os.rename(forming, waiting / name)
        try:
            yield name
        finally:
            os.unlink(waiting / name)
    finally:
        os.close(descriptor)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(forming)  # only if the rename never happened


def _nearest_ahead(waiting: Path, name: str) -> str | None:
    tickets = sorted(entry for entry in os.listdir(waiting) if not entry.startswith("."))
    position = bisect.bisect_left(tickets, name)
    return tickets[position - 1] if position else None


def _wait_for_waiter(ticket: Path) -> None:
    """Sleep until the waiter of `ticket` has taken a core (its ticket gone) or died (its
    ticket left behind, removed here)."""
    try:
        descriptor = os.open(ticket, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ticket)  # names are unique: this one can only be the dead waiter's
    finally:
        os.close(descriptor)


def _remove_abandoned_forms(waiting: Path) -> None:
    deadline = time.time() - ABANDONED_FORM_SECONDS
    for path in waiting.glob(".forming-*"):
        descriptor = _try_lock(path, create=False)
        if descriptor is None:
            continue
        try:
            if os.fstat(descriptor).st_mtime < deadline:
                path.unlink(missing_ok=True)
        finally:
            os.close(descriptor)


def _try_lock(path: Path, create: bool = True) -> int | None:
    """A descriptor of `path` holding its exclusive flock, or None if another holds it
    (or, unless `create`, it is gone). Each attempt opens the file anew: a flock belongs
    to an open file, and two threads of one process must not share a core through one
    descriptor."""
    try:
        descriptor = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor
