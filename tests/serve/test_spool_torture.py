"""The restore spool tortured: many seeds of random reads of a few layers by several real
processes sharing one spool directory (as the API's processes of a host do), each read at
a random offset and length, through `RestoreHub.read`. A read that claims its layer runs
the producer its schedule drew: one that restores the layer, paced or not; one that fails
midway (after yielding an exact prefix of the layer, as `produce` only ever yields
verified bytes: a damaged file, a full disk, S3 unreachable, or a stream that just ends
short); one stopped at a chosen pause point (holding its claim before the link, before a
chunk, after marking its outcome, after releasing its flock) and then SIGKILLed with its
whole process or let go. Meanwhile readers dawdle holding their file while the short keep
time unlinks it, processes are killed at random moments, new ones start with `sweep()`,
and others sweep.

What must hold (pipelines/serve/restore.py, docs/architecture.md, "Never an unverified
byte"):
1. every read yields exactly layer[offset:offset+length], or an exact prefix of it and
   then RestoreError (or ConnectionError: the transient error a failed producer of the
   same process raised, per `RestoreHub.read`), never anything else, within READ_SECONDS;
   and a layer that no producer failed or died on is always read whole;
2. after a failure or a death, once no producer of the layer is left, a read of the layer
   restores it again (unless it is there, verified) and gets its bytes;
3. once every process stopped and a `sweep()` ran past the keep time, the spool directory
   holds no file: no spool file, no claimant's scratch file.

DUPHUNTER_SPOOL_TORTURE_SEEDS sets how many seeds run (default 5, about 6 s each) and
DUPHUNTER_SPOOL_TORTURE_FIRST_SEED the first (default 0). random.Random(seed) draws the
layers and the whole schedule up front: which read comes when, in which process, with
which producer, stopped where and for how long, which process dies when.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

import pytest

from pipelines.pauses import pause
from pipelines.serve.rebuild import RestoreError
from pipelines.serve.restore import MODE_VERIFIED, RESTORE_FAILED, DamagedFileError, RestoreHub
from tests import agents

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

    from tests.conftest import PausePoints

SEEDS = int(os.environ.get("DUPHUNTER_SPOOL_TORTURE_SEEDS", "5"))
FIRST_SEED = int(os.environ.get("DUPHUNTER_SPOOL_TORTURE_FIRST_SEED", "0"))
SPOOL_VARIABLE = "DUPHUNTER_SPOOL_TORTURE_DIR"
KEEP_VARIABLE = "DUPHUNTER_SPOOL_TORTURE_KEEP"
AGENTS = 3
LAYERS = 3
STEPS = 36
READ_SECONDS = 20.0
SLOW_PRODUCER_SECONDS = 0.5  # a paced producer's whole restore
AGENT_ENTRY = "from tests.serve.test_spool_torture import serve_commands; serve_commands()"


# The schedule's vocabulary: shared by the driver and the agents


@dataclass(frozen=True)
class Plan:
    """What a read's producer does, if the read is the one that claims the layer."""

    chunk: int  # bytes a yield
    pace: float = 0.0  # seconds after each yield
    error: str = ""  # "damaged" | "disk" | "unreachable" | "short" (ends early, no error)
    fail_at: int = 0  # the chunk it gives up before (with `error`)
    stop: str = ""  # the pause point held: claimed | chunk-N | marked | unlocked
    fate: str = ""  # "kill" (the whole process) | "hold" (let go after `linger`)
    linger: float = 0.0  # seconds stopped at `stop`


def layer_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# The agents: processes that read through a RestoreHub as the driver commands


_thread_roles = threading.local()  # the read this thread serves, or whose layer it produces
_real_flock = fcntl.flock
_output_lock = threading.Lock()


def _flock_with_pause_points(descriptor: FileDescriptorLike, operation: int) -> None:
    """fcntl.flock, with the pause points the produce callable cannot reach: a claimant
    holding its scratch file before the link, and a producer that marked its outcome, before
    and after it releases its flock (then it removes a failed file)."""
    producing = getattr(_thread_roles, "producing", None)
    if operation == fcntl.LOCK_UN and producing is not None:
        emit({"id": producing, "event": "marked", "at": time.time()})  # the outcome is set
        pause(f"r{producing}.marked")
        _real_flock(descriptor, operation)
        pause(f"r{producing}.unlocked")
        return
    _real_flock(descriptor, operation)
    reading = getattr(_thread_roles, "reading", "")
    if operation == fcntl.LOCK_EX and reading:
        pause(f"{reading}.claimed")


def serve_commands() -> None:
    """An agent process: one JSON command a line on stdin; one JSON line for each answer
    and each production's start and end, in any order."""
    fcntl.flock = _flock_with_pause_points
    hub = RestoreHub(Path(os.environ[SPOOL_VARIABLE]), float(os.environ[KEEP_VARIABLE]))
    emit({"ready": True})
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "sweep":
            hub.sweep()
            emit({"id": command["id"], "outcome": "swept"})
        else:
            threading.Thread(target=answer_read, args=(hub, command)).start()


def emit(message: dict[str, Any]) -> None:
    with _output_lock:
        print(json.dumps(message), flush=True)


def answer_read(hub: RestoreHub, command: dict[str, Any]) -> None:
    emit(read_layer(hub, command))


def read_layer(hub: RestoreHub, command: dict[str, Any]) -> dict[str, Any]:
    data = layer_bytes(command["seed"], command["size"])
    produced = threading.Event()
    produce = producer(data, Plan(**command["plan"]), command["id"], produced)
    _thread_roles.reading = f"r{command['id']}"
    received = bytearray()
    outcome, error = "done", ""
    started, started_at = time.monotonic(), time.time()
    try:
        chunks = hub.read(digest_of(data), len(data), produce, command["offset"], command["length"])
        for chunk in chunks:
            if not received:
                time.sleep(command["dawdle"])  # holding the file open: its keep time may end
            received += chunk
    except (RestoreError, ConnectionError) as failure:
        outcome, error = "error", f"{type(failure).__name__}: {failure}"
    except Exception:
        outcome, error = "unexpected", traceback.format_exc()
    return {
        "id": command["id"], "outcome": outcome, "error": error, "received": len(received),
        "sha256": hashlib.sha256(received).hexdigest(), "produced": produced.is_set(),
        "seconds": time.monotonic() - started, "started_at": started_at,
        "finished_at": time.time(),
    }  # fmt: skip


def producer(
    data: bytes, plan: Plan, read_id: int, produced: threading.Event
) -> Callable[[], Iterator[bytes]]:
    """The read's `produce`: exact bytes of the layer, chunk by chunk, as its plan says."""

    def produce() -> Iterator[bytes]:
        produced.set()
        _thread_roles.producing = read_id
        emit({"id": read_id, "event": "producing", "at": time.time()})
        starts = range(0, len(data), plan.chunk)
        for index, start in enumerate([*starts, len(data)]):
            pause(f"r{read_id}.chunk-{index}")
            if plan.error and index == plan.fail_at:
                give_up(plan.error)
                return
            if start < len(data):
                yield data[start : start + plan.chunk]
                time.sleep(plan.pace)

    return produce


def give_up(error: str) -> None:
    if error == "damaged":
        raise DamagedFileError("layer torture: file sha256:00 (etc/passwd) is damaged")
    if error == "disk":
        raise OSError(28, "No space left on device")
    if error == "unreachable":
        raise ConnectionError("S3 unreachable")


# The schedule, drawn from the seed before anything runs


@dataclass(frozen=True)
class Layer:
    seed: int
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def digest(self) -> str:
        return digest_of(self.data)


@dataclass(frozen=True)
class Read:
    number: int
    layer: int
    offset: int
    length: int | None
    agent: int
    plan: Plan
    dawdle: float = 0.0  # seconds the reader holds its file after its first bytes
    recheck: bool = False  # invariant 2: must succeed
    must_restore: bool = False  # ... and restore the layer itself (it is not there, verified)
    followers: tuple[Read, ...] = ()  # sent once its producer reached its stop

    @property
    def disturbs(self) -> bool:
        return bool(self.plan.error) or self.plan.fate == "kill"


@dataclass(frozen=True)
class Recheck:
    number: int
    layer: int
    agent: int


@dataclass(frozen=True)
class Sweep:
    agent: int


@dataclass(frozen=True)
class Crash:
    agent: int


@dataclass(frozen=True)
class Wait:
    seconds: float


Step = Read | Recheck | Sweep | Crash | Wait


def draw_layers(rng: random.Random) -> list[Layer]:
    layers = []
    for _n in range(LAYERS):
        seed = rng.randrange(1 << 62)
        size = rng.choice([rng.randrange(1, 300), rng.randrange(1, 160 << 10)])
        layers.append(Layer(seed, layer_bytes(seed, size)))
    return layers


def draw_keep_seconds(rng: random.Random) -> float:
    return rng.uniform(0.05, 0.3)


def draw_schedule(rng: random.Random, layers: list[Layer], keep: float) -> list[Step]:
    steps: list[Step] = []
    later: list[tuple[int, Step]] = []  # (at which step, what): the rechecks
    layer = 0
    for index in range(STEPS):
        steps += [step for at, step in later if at <= index]
        later = [(at, step) for at, step in later if at > index]
        kind = rng.choices(["read", "sweep", "crash"], [24, 2, 1])[0]
        agent = rng.randrange(AGENTS)
        if kind == "read":
            layer = rng.choice([layer, rng.randrange(len(layers))])  # followers, often
            read = draw_read(rng, index, layer, layers[layer], agent, keep)
            steps.append(read)
            if read.disturbs and rng.random() < 0.8:
                recheck = Recheck(1000 + index, layer, rng.randrange(AGENTS))
                later.append((index + rng.randrange(1, 5), recheck))
        elif kind == "sweep":
            steps.append(Sweep(agent))
        else:
            steps.append(Crash(agent))
        steps.append(Wait(rng.choice([0.0, 0.0, rng.uniform(0, 0.08)])))  # bursts, too
    return steps + [step for _at, step in later]


def draw_read(
    rng: random.Random, number: int, index: int, layer: Layer, agent: int, keep: float
) -> Read:
    """Read `number`, of layer `index`; a stopped one with its followers."""
    offset = rng.randrange(layer.size)
    length = rng.choice([None, rng.randrange(1, layer.size - offset + 1)])
    dawdle = rng.choice([0.0, 0.0, 0.0, rng.uniform(0, 2 * keep)])
    plan = draw_plan(rng, layer, stoppable=number < 1000)
    followers = [
        draw_read(rng, 2000 + 4 * number + n, index, layer, rng.randrange(AGENTS), keep)
        for n in range(rng.randrange(3) if plan.stop else 0)
    ]
    return Read(number, index, offset, length, agent, plan, dawdle, followers=tuple(followers))


def draw_plan(rng: random.Random, layer: Layer, stoppable: bool) -> Plan:
    chunk = rng.randrange(layer.size // 40 + 1, layer.size // 3 + 2)
    chunks = -(-layer.size // chunk)
    pace = rng.choice([0.0, 0.0, rng.uniform(0, SLOW_PRODUCER_SECONDS / chunks)])
    error = rng.choices(["", "damaged", "disk", "unreachable", "short"], [8, 1, 1, 1, 1])[0]
    fail_at = rng.randrange(chunks + 1 if error != "short" else chunks)
    stop, fate = "", ""
    if stoppable and rng.random() < 0.5:
        stop = rng.choices(["claimed", "chunk", "marked", "unlocked"], [1, 3, 1, 1])[0]
        stop = f"chunk-{rng.randrange(chunks + 1)}" if stop == "chunk" else stop
        fate = rng.choice(["kill", "hold"])
    return Plan(chunk, pace, error, fail_at, stop, fate, rng.uniform(0, 0.3))


# The driver's side of the agents


class Agent:
    """One agent process; `pending` holds the reads it has not answered."""

    def __init__(
        self, env: dict[str, str], on_message: Callable[[dict[str, Any]], None], log: IO[str]
    ) -> None:
        self.pending: set[int] = set()
        self.producing: set[int] = set()  # reads whose producer runs here
        self.lock = threading.Lock()
        self.on_message = on_message
        self.process = agents.Agent(AGENT_ENTRY, env, self._received, stderr=log)

    def _received(self, message: dict[str, Any]) -> None:
        with self.lock:
            if message.get("event") == "producing":
                self.producing.add(message["id"])
            elif message.get("event") == "marked":
                self.producing.discard(message["id"])
            elif "outcome" in message:
                self.pending.discard(message["id"])
        self.on_message(message)

    def send(self, command: dict[str, Any]) -> None:
        with self.lock:
            self.pending.add(command["id"])
        self.process.send(command)

    def busy_with(self) -> set[int]:
        with self.lock:
            return self.pending | self.producing

    def kill(self) -> set[int]:
        """SIGKILL: the reads it had not answered and the productions it ran are lost."""
        self.process.kill()
        return self.busy_with()


@dataclass
class Disturbance:
    """A restore of `layer` that failed or died: readers that ran between `start` and `end`
    may fail with it."""

    layer: int
    start: float = float("-inf")  # a death: the restore may have started unseen
    end: float = float("inf")  # until known


@dataclass
class Stop:
    """A producer the driver stops at a pause point, then kills or lets go."""

    read: Read
    agent: Agent
    point: str
    reached_at: float | None = None


@dataclass
class Run:
    """One seed's run: the agents, the reads sent and answered, what went wrong."""

    seed: int
    layers: list[Layer]
    keep: float
    spool: Path
    points: PausePoints
    env: dict[str, str]
    agent_log: IO[str]  # the agents' stderr: the failed restores they log
    agents: list[Agent] = field(default_factory=list)
    sent: dict[int, Read] = field(default_factory=dict)
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)  # reads whose production ended
    started: dict[int, float] = field(default_factory=dict)  # reads' productions
    disturbances: list[Disturbance] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_id: int = 100_000  # the sweeps' ids: above every read's

    def start_agent(self) -> Agent:
        return Agent(self.env, self.receive, self.agent_log)

    def receive(self, message: dict[str, Any]) -> None:
        number = message.get("id", -1)  # none: the agent's "ready"
        with self.lock:
            if message.get("event") == "producing":
                self.started[number] = message["at"]
            elif message.get("event") == "marked":
                self.ended.add(number)
                read = self.sent[number]
                if read.plan.error:  # its outcome: failed
                    failure = Disturbance(read.layer, self.started[number], message["at"])
                    self.disturbances.append(failure)
            elif "outcome" in message and number in self.sent:
                self.answers[number] = message

    def send_read(self, read: Read) -> Agent:
        agent = self.agents[read.agent]
        layer = self.layers[read.layer]
        with self.lock:
            self.sent[read.number] = read
        agent.send({"op": "read", "id": read.number, "seed": layer.seed, "size": layer.size,
                    "offset": read.offset, "length": read.length, "dawdle": read.dawdle,
                    "plan": asdict(read.plan)})  # fmt: skip
        return agent

    def kill(self, slot: int, why: str) -> None:
        """Kill the agent in `slot` (its readers and producers die with it) and start
        another there, which sweeps as it starts."""
        agent = self.agents[slot]
        busy = agent.busy_with() & self.sent.keys()
        deaths = [Disturbance(layer) for layer in {self.sent[number].layer for number in busy}]
        with self.lock:
            self.disturbances += deaths
        self.lost |= agent.kill()
        for death in deaths:  # the readers of its restores could follow them until now
            death.end = time.time()
        self.agents[slot] = self.start_agent()
        self.log.append(f"  killed agent {slot}: {why}")

    def done(self, number: int) -> bool:
        """The read answered or died, and so did its producer, if it had one."""
        if number in self.lost:
            return True
        answer = self.answers.get(number)
        return answer is not None and (not answer["produced"] or number in self.ended)

    def over(self, number: int) -> bool:
        """Done, and not stopped: one stopped after it marked its outcome holds its flock."""
        return self.done(number) and all(stop.read.number != number for stop in self.stops)

    def fail(self, message: str) -> None:
        self.failures.append(f"seed {self.seed}: {message}")


def run_step(run: Run, step: Step) -> None:
    run.log.append(repr(step))
    match step:
        case Read():
            send_stoppable_read(run, step)
        case Recheck():
            recheck(run, step)
        case Sweep(slot):
            run.next_id += 1
            run.agents[slot].send({"op": "sweep", "id": run.next_id})
        case Crash(slot):
            run.kill(slot, "crash")
        case Wait(seconds):
            idle(run, seconds)


def send_stoppable_read(run: Run, read: Read) -> None:
    point = f"r{read.number}.{read.plan.stop}"
    if read.plan.stop:
        run.points.hold(point)
    agent = run.send_read(read)
    if read.plan.stop:
        run.stops.append(Stop(read, agent, point))


def idle(run: Run, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        resolve_stops(run)
        if time.monotonic() >= deadline:
            return
        time.sleep(min(0.005, deadline - time.monotonic()))


def resolve_stops(run: Run, force: bool = False) -> None:
    """Kill or let go each stopped producer once it lingered (at once if `force`); forget
    the stops their read's producer will never reach (it followed another, or is over)."""
    for stop in list(run.stops):
        reached = (run.points.directory / f"{stop.point}.reached").exists()
        if reached and stop.reached_at is None:
            stop.reached_at = time.monotonic()
            send_followers(run, stop.read)
        if stop.reached_at is None:
            if run.done(stop.read.number) or stop.agent not in run.agents:
                run.stops.remove(stop)
                run.points.release(stop.point)
                send_followers(run, stop.read)
            continue
        if force or time.monotonic() >= stop.reached_at + stop.read.plan.linger:
            run.stops.remove(stop)
            if stop.read.plan.fate == "kill" and stop.agent in run.agents:
                run.kill(run.agents.index(stop.agent), f"stopped at {stop.point}")
            else:
                run.log.append(f"  let go at {stop.point}")
            run.points.release(stop.point)


def send_followers(run: Run, read: Read) -> None:
    for follower in read.followers:
        run.send_read(follower)


def wait_until_over(run: Run, layer: int | None = None) -> None:
    """Wait, resolving every stop at once, until the reads of `layer` (default: all) and
    their producers are over, followers included; a failure after READ_SECONDS: a read or
    a producer hangs."""
    deadline = time.monotonic() + READ_SECONDS
    while running := [
        number
        for number, read in list(run.sent.items())
        if layer in (None, read.layer) and not run.over(number)
    ]:
        if time.monotonic() > deadline:
            hung = [run.sent[number] for number in running]
            fail_now(run, f"still running after {READ_SECONDS} s (read or producer): {hung}")
        resolve_stops(run, force=True)
        time.sleep(0.005)


def recheck(run: Run, step: Recheck) -> None:
    """Invariant 2: once every earlier read of the layer and its producer are over, a read
    with a sound producer restores it again (unless it is there, verified) and succeeds."""
    wait_until_over(run, step.layer)
    layer = run.layers[step.layer]
    must_restore = spool_mode(run.spool, layer.digest) != MODE_VERIFIED
    plan = Plan(chunk=layer.size // 7 + 1)
    read = Read(step.number, step.layer, 0, None, step.agent, plan, 0.0, True, must_restore)
    run.send_read(read)
    deadline = time.monotonic() + READ_SECONDS  # no stop resolved: none holds this layer
    while read.number not in run.answers and time.monotonic() < deadline:
        time.sleep(0.005)
    if read.number not in run.answers:
        fail_now(run, f"{read} still runs after {READ_SECONDS} s")


def spool_mode(spool: Path, digest: str) -> int | None:
    try:
        return os.stat(spool / (digest.replace(":", "-") + ".data")).st_mode & 0o777
    except FileNotFoundError:
        return None


# The checks


def check_answers(run: Run) -> None:
    """Invariants 1 and 2, over every read that was not lost with its process."""
    for number, answer in sorted(run.answers.items()):
        read = run.sent[number]
        problem = answer_problem(run.layers[read.layer], read, answer, excused(run, read, answer))
        if problem:
            run.fail(f"{read}: {problem}")


def excused(run: Run, read: Read, answer: dict[str, Any]) -> bool:
    """Whether a restore of the layer failed or died while the read ran."""
    return any(
        disturbance.layer == read.layer
        and disturbance.start < answer["finished_at"]
        and disturbance.end > answer["started_at"]
        for disturbance in run.disturbances
    )


EXCUSED_ERRORS = (
    f"RestoreError: {RESTORE_FAILED}",
    "RestoreError: the restoring process died",
    "ConnectionError: S3 unreachable",  # a failure of this process's restore, re-raised
)


def answer_problem(layer: Layer, read: Read, answer: dict[str, Any], excused: bool) -> str:
    asked = (layer.size if read.length is None else read.offset + read.length) - read.offset
    prefix = layer.data[read.offset : read.offset + answer["received"]]
    if answer["outcome"] == "unexpected":
        return f"raised {answer['error']}"
    if answer["received"] > asked or hashlib.sha256(prefix).hexdigest() != answer["sha256"]:
        return f"{answer['received']} bytes that are not the layer's"
    if answer["seconds"] > READ_SECONDS:
        return f"took {answer['seconds']:.1f} s"
    if answer["outcome"] == "done" and answer["received"] != asked:
        return f"ended after {answer['received']} of {asked} bytes without an error"
    if answer["outcome"] == "error" and read.recheck:
        return f"a read after a failure or death failed: {answer['error']}"
    if answer["outcome"] == "error" and not excused:
        return f"failed though no restore of the layer failed or died meanwhile: {answer['error']}"
    if answer["outcome"] == "error" and not answer["error"].startswith(EXCUSED_ERRORS):
        return f"failed with {answer['error']}"
    if read.must_restore and not answer["produced"]:
        return "the layer was not restored again after its producer failed or died"
    return ""


def settle(run: Run) -> None:
    """Every stopped producer resolved, every read and production over, every agent
    stopped; then, past the keep time, a sweep."""
    wait_until_over(run)
    for agent in run.agents:
        agent.kill()
    run.agents.clear()
    time.sleep(run.keep + 0.05)
    RestoreHub(run.spool, run.keep)  # sweeps


def check_spool_empty(run: Run) -> None:
    """Invariant 3."""
    left = sorted(path.name for path in run.spool.iterdir())
    if left:
        run.fail(f"the spool holds {left} after the sweep")


# The test


@pytest.fixture(params=range(FIRST_SEED, FIRST_SEED + SEEDS), ids=lambda seed: f"seed{seed}")
def seed(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def run(seed: int, tmp_path: Path) -> Iterator[Run]:
    from tests.conftest import PausePoints  # here: the agents need none of the stack's code

    rng = random.Random(seed)
    layers, keep = draw_layers(rng), draw_keep_seconds(rng)
    points = PausePoints(tmp_path / "pauses")
    spool = tmp_path / "spool"
    env = {**os.environ, **points.environment(), SPOOL_VARIABLE: str(spool),
           KEEP_VARIABLE: str(keep)}  # fmt: skip
    with open(tmp_path / "agents.log", "w") as agent_log:
        run = Run(seed, layers, keep, spool, points, env, agent_log)
        run.agents = [run.start_agent() for _n in range(AGENTS)]
        try:
            yield run
        finally:
            points.release_all()
            for agent in run.agents:
                agent.kill()


def test_spool_torture(run: Run) -> None:
    rng = random.Random(run.seed)
    draw_layers(rng)  # the run's draws: the schedule comes after them
    draw_keep_seconds(rng)
    for step in draw_schedule(rng, run.layers, run.keep):
        run_step(run, step)
    settle(run)
    check_answers(run)
    check_spool_empty(run)
    if run.failures:
        pytest.fail(report(run), False)


def fail_now(run: Run, message: str) -> NoReturn:
    """A hang: the seed stops here (its agents are killed)."""
    run.fail(message)
    pytest.fail(report(run), False)


def report(run: Run) -> str:
    return "\n".join([*run.failures, summary(run), "schedule:", *run.log])


def summary(run: Run) -> str:
    outcomes = [answer["outcome"] for answer in run.answers.values()]
    restores = sum(answer["produced"] for answer in run.answers.values())
    kills = sum(line.startswith("  killed") for line in run.log)
    lost = len(run.lost & run.sent.keys())
    done, errors = outcomes.count("done"), outcomes.count("error")
    reads = f"{len(run.sent)} reads: {done} done, {errors} errors, {lost} lost"
    return f"{reads}; {restores} restores, {kills} kills"
