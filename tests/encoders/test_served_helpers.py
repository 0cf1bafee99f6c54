"""Served segment helpers (`pipelines.encoders.segment_helpers.ServedHelpers`): one Go
process encodes segment after segment. Each must give exactly the bits the helper
started for that one segment gives; a helper killed idle is replaced, one killed under a
segment fails that segment and no other; an error leaves the helper serving; a forked
child never talks to its parent's helpers; and none outlives its bounds or its parent."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.core import is_helper_process
from deploy.stack import REPO_ROOT, wait_until
from pipelines.encoders import segment_helpers
from pipelines.encoders.base import HelperFailedError, thread_cpu_seconds
from pipelines.encoders.segment_helpers import SERVED, run_segment_helper, segment_helper_env
from pipelines.pauses import PAUSE_DIR_VARIABLE
from tests.conftest import PausePoints
from tests.serve.test_checkpoints import layer_tar

GO_126 = "gzip-go1.26"


@pytest.fixture(scope="module")
def tar() -> bytes:
    return layer_tar(12)


@pytest.fixture
def served(helper_dir: Path) -> Iterator[None]:
    SERVED.forget()
    yield
    SERVED.forget()


def go_argv(helper_dir: Path, name: str, **flags: object) -> list[str]:
    argv = [str(helper_dir / name), "-mode", "segment"]
    for flag, value in flags.items():
        argv += [f"-{flag}"] if value is True else [f"-{flag}", str(value)]
    return argv


def started_once(argv: list[str], data: bytes) -> bytes:
    """What the helper started for this one segment writes (the path before serving)."""
    done = subprocess.run(
        [*argv, "-size", str(len(data))], input=data, capture_output=True,
        env=segment_helper_env(), check=True,
    )  # fmt: skip
    return done.stdout


def helper_exists(pid: int) -> bool:
    """Whether the process still holds its files (a killed Go helper's main thread is a
    zombie before its other threads have let go of its socket)."""
    try:
        return bool(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_served_segments_are_the_bits_of_a_helper_started_for_each(
    helper_dir: Path, served: None, tar: bytes
) -> None:
    """Random segments of three helpers (Go <= 1.26, Go >= 1.27, pgzip), with history,
    alignment, offsets, final or not, one helper serving them all in turn."""
    rng = random.Random(20)
    for _ in range(12):
        start = rng.randrange(1 << 16, 6 << 20)
        history, length = rng.choice([0, 1 << 15, 1 << 16]), rng.randrange(1, 3 << 20)
        argvs = [
            go_argv(helper_dir, GO_126, level=rng.choice([1, 6, 9]), history=history,
                    align=rng.randrange(8), offset=start, final=rng.random() < 0.5),
            go_argv(helper_dir, "gzip-go1.27", level=6, history=history, offset=start),
            go_argv(helper_dir, "gzip-pgzip-deb", level=5, blocksize=1 << 20,
                    history=min(history, 16384), final=rng.random() < 0.5),
        ]  # fmt: skip
        for argv in argvs:
            before = min(history, 16384) if "pgzip" in argv[0] else history
            data = tar[start - before : start + length]
            assert bytes(run_segment_helper(argv, [data])) == started_once(argv, data), argv
    assert len(SERVED.processes()) == 3  # one per program, each served every segment


def test_a_helper_killed_idle_is_replaced(helper_dir: Path, served: None, tar: bytes) -> None:
    argv = go_argv(helper_dir, GO_126, level=6, final=True)
    expected = bytes(run_segment_helper(argv, [tar[:500_000]]))
    (killed,) = SERVED.processes()
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: not helper_exists(killed), "the helper's death")
    assert bytes(run_segment_helper(argv, [tar[:500_000]])) == expected
    assert SERVED.processes() != [killed]


def test_a_helper_killed_under_a_segment_is_replaced_and_the_bits_are_exact(
    helper_dir: Path, served: None, tar: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while it writes a long segment's output: the segment is asked again of a
    new helper, into the same output file, emptied (the dead one's bytes never stay)."""
    argv = go_argv(helper_dir, GO_126, level=9, final=True)
    expected = started_once(argv, tar)
    points = PausePoints(tmp_path / "pauses")
    monkeypatch.setenv(PAUSE_DIR_VARIABLE, str(points.directory))
    points.hold("segment-helper-asked")
    results: list[bytes | BaseException] = []
    asking = threading.Thread(target=lambda: results.append(encode_or_error(argv, tar)))
    asking.start()
    points.wait_reached("segment-helper-asked")
    (first,) = helpers_at_work(helper_dir)
    time.sleep(0.3)  # into its output
    os.kill(first, signal.SIGKILL)
    points.release("segment-helper-asked")
    asking.join(timeout=60)
    assert results == [expected]
    assert not helper_exists(first) and first not in SERVED.processes()


def test_a_segment_fails_when_its_second_helper_dies_too(
    helper_dir: Path, served: None, tar: bytes
) -> None:
    """Every helper of the program killed as soon as it starts: the segment fails with
    the helper's exit, and the next one (the killing over) is right."""
    argv = go_argv(helper_dir, GO_126, level=9, final=True)
    stop = threading.Event()

    def kill_every_helper() -> None:
        while not stop.is_set():
            for pid in helpers_at_work(helper_dir):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)

    killer = threading.Thread(target=kill_every_helper)
    killer.start()
    try:
        result = encode_or_error(argv, tar)
    finally:
        stop.set()
        killer.join()
    assert isinstance(result, HelperFailedError) and "exited with -9" in str(result), result
    assert SERVED.processes() == []
    assert bytes(run_segment_helper(argv, [tar[:300_000]])) == started_once(argv, tar[:300_000])


def encode_or_error(argv: list[str], data: bytes) -> bytes | BaseException:
    try:
        return bytes(run_segment_helper(argv, [data]))
    except BaseException as exc:  # handed to the test's thread
        return exc


def helpers_at_work(helper_dir: Path) -> list[int]:
    """This process's live helper children (those at work: not kept idle)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in SERVED.processes():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            mine = int(fields[1]) == os.getpid() and fields[0] != "Z"
            if mine and is_helper_process(entry, helper_dir.resolve()):
                pids.append(int(entry.name))
    return pids


def test_an_error_is_that_segments_and_the_helper_serves_on(
    helper_dir: Path, served: None, tar: bytes
) -> None:
    argv = go_argv(helper_dir, GO_126, level=6, final=True)
    expected = bytes(run_segment_helper(argv, [tar[:100_000]]))
    (helper,) = SERVED.processes()
    with pytest.raises(HelperFailedError, match="history of 200000 bytes, input of 100000"):
        run_segment_helper([*argv, "-history", "200000"], [tar[:100_000]])
    with pytest.raises(HelperFailedError, match="flag provided but not defined"):
        run_segment_helper([*argv, "-no-such-flag"], [tar[:100_000]])
    assert bytes(run_segment_helper(argv, [tar[:100_000]])) == expected
    assert SERVED.processes() == [helper]


def test_a_forked_child_starts_its_own_helpers(helper_dir: Path, served: None, tar: bytes) -> None:
    argv = go_argv(helper_dir, GO_126, level=6, final=True)
    expected = bytes(run_segment_helper(argv, [tar[:300_000]]))
    parents = SERVED.processes()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        ok = not SERVED.processes() and bytes(run_segment_helper(argv, [tar[:300_000]])) == expected
        ok = ok and SERVED.processes() != parents
        SERVED.forget()
        os._exit(0 if ok else 1)
    _pid, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert SERVED.processes() == parents
    assert bytes(run_segment_helper(argv, [tar[:300_000]])) == expected


def test_idle_helpers_stay_within_their_bounds(
    helper_dir: Path, served: None, tar: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six segments at once start six helpers; `keep` stay, the others are reaped. One
    idle longer than IDLE_SECONDS is let go the next time the pool is touched."""
    argv = go_argv(helper_dir, GO_126, level=1, final=True)
    cuts = [tar[start : start + 2_000_000] for start in range(0, 6 << 20, 1 << 20)]
    alone = [started_once(argv, cut) for cut in cuts]
    started: set[int] = set()

    def encode(cut: bytes) -> bytes:
        out = bytes(run_segment_helper(argv, [cut]))
        started.update(SERVED.processes())
        return out

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(encode, cuts * 2)) == alone * 2
    kept = SERVED.processes()
    assert 0 < len(kept) <= SERVED.keep
    assert not [pid for pid in started - set(kept) if helper_exists(pid)]
    monkeypatch.setattr(segment_helpers, "IDLE_SECONDS", 0.0)
    run_segment_helper(argv, [cuts[0]])
    assert len(SERVED.processes()) == 1
    assert not [pid for pid in kept if pid not in SERVED.processes() and helper_exists(pid)]


def test_a_helper_exits_with_the_process_it_serves(helper_dir: Path) -> None:
    """The process that started it is killed: its socket closes and the helper exits."""
    script = (
        "import os, signal, sys\n"
        "from pipelines.encoders.segment_helpers import SERVED, run_segment_helper\n"
        f"run_segment_helper([{str(helper_dir / GO_126)!r}, '-mode', 'segment'], [b'x' * 1000])\n"
        "print(*SERVED.processes(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True)
    (helper,) = [int(word) for word in done.stdout.split()]
    wait_until(lambda: not helper_exists(helper), "the orphaned helper's exit", timeout=10)


def test_the_helpers_cpu_is_charged_to_the_thread_that_asked(
    helper_dir: Path, served: None, tar: bytes
) -> None:
    argv = go_argv(helper_dir, GO_126, level=9, final=True)
    run_segment_helper(argv, [tar[:100_000]])
    (helper,) = SERVED.processes()
    before_helper, before_thread = process_cpu(helper), thread_cpu_seconds()
    own_before = time.thread_time()
    for start in range(0, 8 << 20, 1 << 20):
        run_segment_helper(argv, [tar[start : start + (1 << 20)]])
    charged = thread_cpu_seconds() - before_thread - (time.thread_time() - own_before)
    spent = process_cpu(helper) - before_helper
    assert spent > 0.1
    assert abs(charged - spent) <= 0.1 * spent + 0.03, (charged, spent)


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
