"""The layer buffer tortured: many seeds of random fills by several real processes (some
finish, some abort, some are killed with SIGKILL or frozen with SIGSTOP at a chosen step of
their fill and continued after their claim lapsed), mixed with drops from other processes
(an eviction's, GC's), `enforce_bound` (also after the bound was lowered), GETs and
predictions that pin entries, readers following entries at random ranges, and sweeps that
take every part as old enough while fills write, drop and take over beside them.

What must hold (pipelines/serve/buffer.py, docs/architecture.md, "Layer buffer"):
1. a read yields exactly the layer's bytes for the range asked, or stops with BufferMiss
   after exactly the bytes before its offset, and ends within a bounded time;
2. at every observation the bytes reserved stay within the bound, and pinned entries
   within PIN_SHARE of it (a lowered bound holds only once `enforce_bound` ran with no
   fill in flight: until then the bound is the highest one in force);
3. once every filler ended and the claims of dead ones lapsed and their layers were taken
   over (the only cleanup the design has for a dead filler's entry: the next claimant of
   the layer drops it), and the sweep ran (it deletes the parts fillers uploaded after
   losing their claim: frozen between the check and the upload, or dropped under), no
   claim and no dropping entry is left, every entry is complete and ranked, the bytes
   reserved are the sum of the entries' sizes, and S3 holds exactly the parts of those
   entries: no part that no entry counts;
4. every complete entry reads back byte-exact, whole and in a range.

Parts are PART_BYTES_HERE and a lease LEASE_MS_HERE in every process of the test (module
constants of buffer.py, read at each use): production values are unchanged.
DUPHUNTER_BUFFER_TORTURE_SEEDS sets how many seeds run (default 3, about 10 s each) and
DUPHUNTER_BUFFER_TORTURE_FIRST_SEED the first (default 0), so that a longer run explores
seeds CI does not. random.Random(seed) draws the layers and the whole schedule: which
action comes when, which filler is killed or frozen at which step.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis

from pipelines.config import Settings
from pipelines.pauses import pause
from pipelines.serve import buffer as buffer_module
from pipelines.serve.buffer import (
    PIN_BONUS,
    PIN_SHARE,
    PREFIX,
    RANK_KEY,
    BufferMiss,
    LayerBuffer,
    entry_key,
    part_key,
)
from pipelines.store.storage import S3Store
from tests import agents

if TYPE_CHECKING:
    from tests.conftest import LiveStack, PausePoints

SEEDS = int(os.environ.get("DUPHUNTER_BUFFER_TORTURE_SEEDS", "3"))
FIRST_SEED = int(os.environ.get("DUPHUNTER_BUFFER_TORTURE_FIRST_SEED", "0"))
PART_BYTES_HERE = 64 << 10  # many parts per layer, few bytes through S3
LEASE_MS_HERE = 1500
LEASE_SECONDS = LEASE_MS_HERE / 1000
REDIS_DB = 12  # the buffer's own database in the stack's Redis
REDIS_URL_VARIABLE = "DUPHUNTER_BUFFER_TORTURE_REDIS_URL"
LAYERS = 6
INITIAL_CAPACITY = 12 * PART_BYTES_HERE
STEPS = 40
AGENTS = 5
TAU_SECONDS = 60.0
PIN_SECONDS = 3.0  # pins expire within a seed, some of them
READ_SECONDS = 20.0  # a read follows a fill, or a dead filler's claim lapsing: no longer
AGENT_ENTRY = "from tests.serve.test_buffer_torture import serve_commands; serve_commands()"


# The agents: processes that run the driver's commands against the buffer


class PausingStore(S3Store):
    """S3, with a pause point before and after each part's upload of the current fill:
    before is after the filler checked its claim, after is before it counts the part."""

    fill_name = ""

    def put_bytes(self, key: str, data: bytes) -> None:
        number = int(key.rsplit("/", 1)[1])
        pause(f"{self.fill_name}.before-part-{number}")
        super().put_bytes(key, data)
        pause(f"{self.fill_name}.after-part-{number}")


def serve_commands() -> None:
    """An agent process: one JSON command a line on stdin, one JSON answer a line."""
    buffer_module.PART_BYTES = PART_BYTES_HERE
    buffer_module.LEASE_MS = LEASE_MS_HERE
    store = PausingStore(Settings())
    client: redis.Redis[bytes] = redis.Redis.from_url(os.environ[REDIS_URL_VARIABLE])
    print(json.dumps({"done": "ready"}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer: dict[str, Any] = {"done": run_command(store, client, command)}
        except Exception:
            answer = {"error": f"{command}: {traceback.format_exc()}"}
        print(json.dumps(answer), flush=True)


def run_command(store: PausingStore, client: redis.Redis[bytes], command: dict[str, Any]) -> Any:
    buffer = LayerBuffer(store, client, command["capacity"], TAU_SECONDS, PIN_SECONDS)
    operation, digest = command["op"], command.get("digest", "")
    if operation == "fill":
        return fill_layer(buffer, store, command)
    if operation == "drop":
        buffer.drop(digest)
    elif operation == "enforce":
        return buffer.enforce_bound()
    elif operation == "expect":
        buffer.expect(digest, command["gets"], time.time() - command["age"], command["origin"])
    elif operation == "get" and buffer.record_get(digest) is not None:
        buffer.record_hit(digest)  # a GET its entry served
    return operation


def fill_layer(buffer: LayerBuffer, store: PausingStore, command: dict[str, Any]) -> str:
    data = layer_bytes(command["seed"], command["size"])
    name, expected = command["name"], command["expected"]
    store.fill_name = name
    since = time.time() if expected else 0
    filler = buffer.start_fill(command["digest"], len(data), command["origin"], expected, since)
    if filler is None:
        return "refused"
    pause(f"{name}.claimed")
    chunk = PART_BYTES_HERE // 4 + 1
    for start in range(0, len(data), chunk):
        filler.write(data[start : start + chunk])
        time.sleep(command["pace"])
    pause(f"{name}.finishing")
    filler.finish() if command["ending"] == "finish" else filler.abort()
    return "lost" if filler.lost else command["ending"]


def layer_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# The schedule, drawn from the seed before anything runs


@dataclass(frozen=True)
class Layer:
    seed: int
    size: int
    data: bytes
    digest: str

    @property
    def parts(self) -> int:
        return -(-self.size // PART_BYTES_HERE)


@dataclass(frozen=True)
class Fill:
    number: int
    layer: int
    ending: str  # "finish" | "abort"
    stop: str = ""  # the pause point where it is killed or frozen
    fate: str = ""  # "kill" | "freeze"
    expected: int = 0  # predicted GETs: a pinned fill
    pace: float = 0.0  # seconds between writes
    takeover: bool = False  # of a killed or frozen filler's layer: once its claim lapsed


@dataclass(frozen=True)
class Drop:
    layer: int


@dataclass(frozen=True)
class Enforce:
    pass


@dataclass(frozen=True)
class Lower:
    capacity: int


@dataclass(frozen=True)
class Expect:
    layer: int
    gets: int
    age: float
    origin: str


@dataclass(frozen=True)
class Get:
    layer: int


@dataclass(frozen=True)
class Read:
    layer: int
    offset: int
    end: int


@dataclass(frozen=True)
class Sweep:
    pass


@dataclass(frozen=True)
class Thaw:
    pass


@dataclass(frozen=True)
class Wait:
    seconds: float


Step = Fill | Drop | Enforce | Lower | Expect | Get | Read | Sweep | Thaw | Wait


def draw_layers(rng: random.Random) -> list[Layer]:
    layers = []
    for _n in range(LAYERS):
        seed = rng.randrange(1 << 62)
        any_size = rng.randrange(1, 4 * PART_BYTES_HERE)
        whole_parts = rng.randrange(1, 4) * PART_BYTES_HERE
        size = rng.choice([any_size, whole_parts])
        data = layer_bytes(seed, size)
        layers.append(Layer(seed, size, data, "sha256:" + hashlib.sha256(data).hexdigest()))
    return layers


def draw_schedule(rng: random.Random, layers: list[Layer]) -> list[Step]:
    steps: list[Step] = []
    later: list[tuple[int, Step]] = []  # (at which step, what): thaws and takeovers
    lowered, last_filled = False, 0
    for index in range(STEPS):
        steps += [step for at, step in later if at <= index]
        later = [(at, step) for at, step in later if at > index]
        kind = rng.choices(["fill", "read", "drop", "enforce", "expect", "get", "lower", "sweep"],
                           [10, 8, 4, 2, 2, 2, 1, 2])[0]  # fmt: skip
        layer = rng.randrange(len(layers))
        if kind == "lower" and not lowered:
            lowered = True
            steps.append(Lower(rng.randrange(7, 11) * PART_BYTES_HERE))
        elif kind in ("fill", "lower"):
            fill = draw_fill(rng, index, layer, layers[layer])
            later += stopped_fill_sequels(rng, index, fill, layers[layer])
            steps.append(fill)
            last_filled = layer
        elif kind == "read":
            steps.append(draw_read(rng, layer, layers[layer]))
        elif kind == "drop":  # half of them at a layer likely being filled (as GC's may be)
            steps.append(Drop(rng.choice([layer, last_filled])))
        elif kind == "enforce":
            steps.append(Enforce())
        elif kind == "sweep":
            steps.append(Sweep())
        elif kind == "expect":
            origin = rng.choice(["predicted", "pushed"])
            steps.append(Expect(layer, rng.randrange(1, 3), rng.uniform(0, 2), origin))
        else:
            steps.append(Get(layer))
        steps.append(Wait(rng.uniform(0, 0.08)))
    return steps + [step for _at, step in later]


def draw_fill(
    rng: random.Random, number: int, index: int, layer: Layer, takeover: bool = False
) -> Fill:
    ending = rng.choices(["finish", "abort"], [3 if takeover else 5, 2 if takeover else 1])[0]
    fate = "" if takeover else rng.choices(["", "kill", "freeze"], [6, 2, 2])[0]
    stops = ["claimed", "finishing"] + [
        f"{where}-part-{n}" for n in range(layer.parts) for where in ("before", "after")
    ]
    stop = rng.choice(stops) if fate else ""
    expected = rng.choice([0, 0, 0, 1, 2])
    return Fill(number, index, ending, stop, fate, expected, rng.uniform(0, 0.03), takeover)


def stopped_fill_sequels(
    rng: random.Random, index: int, fill: Fill, layer: Layer
) -> list[tuple[int, Step]]:
    """A killed or frozen filler's layer is often asked for again (its GETs restore and
    fill it), once its claim lapsed; a frozen filler is continued some steps later."""
    sequels: list[tuple[int, Step]] = []
    if fill.fate and rng.random() < 0.7:
        takeover = draw_fill(rng, 1000 + index, fill.layer, layer, takeover=True)
        sequels.append((index + rng.randrange(1, 4), takeover))
    if fill.fate == "freeze":
        sequels.append((index + rng.randrange(1, 8), Thaw()))
    return sequels


def draw_read(rng: random.Random, index: int, layer: Layer) -> Read:
    offset = rng.randrange(layer.size)
    return Read(index, offset, rng.randrange(offset + 1, layer.size + 1))


# The driver's side of the agents


class Agent:
    """One agent process; `pending` counts the commands it has not answered yet."""

    def __init__(self, env: dict[str, str], answers: list[dict[str, Any]]) -> None:
        self.pending = 1  # its "ready"
        self.lock = threading.Lock()
        self.answers = answers
        self.process = agents.Agent(AGENT_ENTRY, env, self._answered)

    def _answered(self, answer: dict[str, Any]) -> None:
        with self.lock:
            self.pending -= 1
        self.answers.append(answer)

    @property
    def idle(self) -> bool:
        with self.lock:
            return self.pending == 0 and self.process.alive

    def send(self, command: dict[str, Any]) -> None:
        with self.lock:
            self.pending += 1
        self.process.send(command)

    def signal(self, number: int) -> None:
        self.process.signal(number)

    def stop(self) -> None:
        self.process.kill()


@dataclass
class Frozen:
    agent: Agent
    point: str
    at: float


@dataclass
class Run:
    """One seed's run: the buffer as the driver sees it, the agents, what went wrong."""

    seed: int
    layers: list[Layer]
    buffer: LayerBuffer
    points: PausePoints
    env: dict[str, str]
    capacity: int = INITIAL_CAPACITY
    answers: list[dict[str, Any]] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    frozen: list[Frozen] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def idle_agent(self) -> Agent:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for agent in self.agents:
                if agent.idle:
                    return agent
            time.sleep(0.005)
        raise AssertionError(f"seed {self.seed}: no agent free for 30 s: {self.log[-8:]}")

    def command(self, operation: str, **fields: Any) -> Agent:
        agent = self.idle_agent()
        agent.send({"op": operation, "capacity": self.capacity, **fields})
        return agent

    def replace(self, agent: Agent) -> None:
        agent.stop()
        self.agents[self.agents.index(agent)] = Agent(self.env, self.answers)

    def fail(self, message: str) -> None:
        self.failures.append(message)


def run_step(run: Run, step: Step) -> None:
    run.log.append(repr(step))
    match step:
        case Fill():
            fill(run, step)
        case Drop(layer):
            run.command("drop", digest=run.layers[layer].digest)
        case Enforce():
            run.command("enforce")
        case Lower(capacity):
            run.capacity = capacity
            run.command("enforce")
        case Expect(layer, gets, age, origin):
            run.command("expect", digest=run.layers[layer].digest, gets=gets, age=age,
                        origin=origin)  # fmt: skip
        case Get(layer):
            run.command("get", digest=run.layers[layer].digest)
        case Read():
            reader = threading.Thread(target=read_and_check, args=(run, step), daemon=True)
            reader.start()
            run.readers.append(reader)
        case Sweep():  # every part taken as old enough: only the entries' and claims' word counts
            swept = run.buffer.sweep(time.time() + 1, [layer.digest for layer in run.layers])
            run.log.append(f"  swept {swept}")
        case Thaw():
            thaw(run)
        case Wait(seconds):
            time.sleep(seconds)


def fill(run: Run, step: Fill) -> None:
    layer = run.layers[step.layer]
    name = f"torture-{run.seed}-{step.number}"
    point = f"{name}.{step.stop}"
    if step.stop:
        run.points.hold(point)
    if step.takeover:
        wait_for(lambda: not run.buffer.filling_alive(layer.digest), LEASE_SECONDS * 2, run,
                 "the claim to lapse")  # fmt: skip
    origin = "predicted" if step.expected else "miss"
    agent = run.command("fill", name=name, digest=layer.digest, size=layer.size,
                        seed=layer.seed, origin=origin, expected=step.expected,
                        ending=step.ending, pace=step.pace)  # fmt: skip
    if not step.stop:
        return
    reached = run.points.directory / f"{point}.reached"
    deadline = time.monotonic() + 30
    while not reached.exists() and not agent.idle:  # refused, lost, or no such part
        assert time.monotonic() < deadline, f"seed {run.seed}: {point} never reached"
        time.sleep(0.005)
    if not reached.exists():
        run.points.release(point)
        run.log.append(f"  {point} not reached")
    elif step.fate == "kill":
        agent.signal(signal.SIGKILL)
        run.points.release(point)
        run.replace(agent)
        run.log.append(f"  killed at {point}")
    else:
        agent.signal(signal.SIGSTOP)
        run.frozen.append(Frozen(agent, point, time.monotonic()))
        run.log.append(f"  frozen at {point}")


def thaw(run: Run) -> None:
    """Continue the longest frozen filler, once its claim lapsed."""
    if not run.frozen:
        return
    frozen = run.frozen.pop(0)
    time.sleep(max(0.0, frozen.at + LEASE_SECONDS * 1.3 - time.monotonic()))
    run.points.release(frozen.point)
    frozen.agent.signal(signal.SIGCONT)
    run.log.append(f"  continued {frozen.point}")


def read_and_check(run: Run, step: Read) -> None:
    """Invariant 1: the layer's bytes for the range, or a miss after exactly its bytes."""
    layer = run.layers[step.layer]
    received = bytearray()
    started = time.monotonic()
    try:
        for chunk in run.buffer.read(layer.digest, step.offset, step.end):
            received += chunk
        stopped = step.end
    except BufferMiss as miss:
        stopped = miss.offset
    except Exception:
        run.fail(f"{step}: {traceback.format_exc()}")
        return
    elapsed = time.monotonic() - started
    if bytes(received) != layer.data[step.offset : stopped] or stopped < step.offset:
        run.fail(f"{step}: {len(received)} wrong bytes, stopped at {stopped}")
    if elapsed > READ_SECONDS:
        run.fail(f"{step}: took {elapsed:.1f} s")


# Invariant 2, watched while the schedule runs

_PINNED_BYTES = f"""
local total = 0
for _, digest in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')) do
  local key = '{PREFIX}e:' .. digest
  if tonumber(redis.call('HGET', key, 'pinned_until') or '0') >= tonumber(ARGV[2]) then
    total = total + tonumber(redis.call('HGET', key, 'size') or '0')
  end
end
return total
"""


def watch_bound(run: Run, done: threading.Event) -> None:
    """The bound in force is the highest any process may still reserve under: the first
    one (a lowered bound binds the fills that start after it, not the entries held)."""
    client = run.buffer.redis
    while not done.wait(0.01):
        used = run.buffer.used_bytes()
        pinned = int(client.eval(_PINNED_BYTES, 1, RANK_KEY, PIN_BONUS / 2, time.time()))  # type: ignore[no-untyped-call]
        if used > INITIAL_CAPACITY:
            run.fail(f"{used} bytes reserved, bound {INITIAL_CAPACITY}: {run.log[-6:]}")
        if pinned > INITIAL_CAPACITY * PIN_SHARE:
            run.fail(f"{pinned} bytes pinned, bound {INITIAL_CAPACITY}: {run.log[-6:]}")


# The end of a seed


def settle(run: Run) -> None:
    """Every frozen filler continued, every fill ended, every read ended; then the dead
    fillers' claims lapse and their layers are taken over by a claimant that gives up."""
    while run.frozen:
        thaw(run)
    wait_for(lambda: all(agent.idle for agent in run.agents), 60, run, "the fills to end")
    for reader in run.readers:
        reader.join(READ_SECONDS * 2)
        if reader.is_alive():
            run.fail(f"a read still runs after {READ_SECONDS * 2} s")
    client = run.buffer.redis
    wait_for(lambda: not client.keys(PREFIX + "fill:*"), LEASE_SECONDS * 3, run, "claims to lapse")
    for layer in run.layers:
        state = client.hget(entry_key(layer.digest), "state")
        if state is not None and state != b"complete":
            taking_over = run.buffer.start_fill(layer.digest, layer.size, "miss")
            if taking_over is None:
                run.fail(f"a dead filler's {state!r} entry of {layer.digest} cannot be taken over")
            else:
                taking_over.abort()
    run.buffer.enforce_bound()
    run.buffer.sweep(time.time() + 1, [layer.digest for layer in run.layers])


def wait_for(check: Callable[[], bool], seconds: float, run: Run, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"seed {run.seed}: waited {seconds} s for {what}: {run.log}")
        time.sleep(0.02)


def check_settled(run: Run) -> None:
    """Invariants 3 and 4."""
    buffer, client = run.buffer, run.buffer.redis
    assert not client.keys(PREFIX + "fill:*"), "a fill claim is left"
    held = {layer.digest: client.hgetall(entry_key(layer.digest)) for layer in run.layers}
    held = {digest: raw for digest, raw in held.items() if raw}
    for digest, raw in held.items():
        assert raw.get(b"state") == b"complete" and b"size" in raw, (digest, raw)
    sizes = {digest: int(raw[b"size"]) for digest, raw in held.items()}
    fills = {digest: raw[b"fill"].decode() for digest, raw in held.items()}
    assert buffer.used_bytes() == sum(sizes.values()), (buffer.used_bytes(), sizes)
    assert buffer.used_bytes() <= run.capacity
    ranked = {member.decode() for member in client.zrange(RANK_KEY, 0, -1)}
    assert ranked == set(held), (ranked, set(held))
    assert parts_in_s3(run) == expected_parts(sizes, fills), "S3 holds parts no entry counts"
    for layer in run.layers:
        if layer.digest in held:
            assert b"".join(buffer.read(layer.digest, 0, layer.size)) == layer.data
            offset = layer.size // 3
            ranged = b"".join(buffer.read(layer.digest, offset, layer.size - 1))
            assert ranged == layer.data[offset : layer.size - 1]


def parts_in_s3(run: Run) -> dict[str, int]:
    ours = {layer.digest.split(":")[1] for layer in run.layers}
    listed = run.buffer.store.list("buffer/")
    return {key: size for key, size in listed if key.split("/")[2] in ours}


def expected_parts(sizes: dict[str, int], fills: dict[str, str]) -> dict[str, int]:
    parts = {}
    for digest, size in sizes.items():
        for number in range(-(-size // PART_BYTES_HERE)):
            key = part_key(digest, fills[digest], number)
            parts[key] = min(PART_BYTES_HERE, size - number * PART_BYTES_HERE)
    return parts


def forget(run: Run) -> None:
    """This seed's entries and parts gone, whatever state they were left in."""
    run.buffer.store.delete(list(parts_in_s3(run)))
    run.buffer.redis.flushdb()


# The test


@pytest.fixture(params=range(FIRST_SEED, FIRST_SEED + SEEDS), ids=lambda seed: f"seed{seed}")
def seed(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def run(
    seed: int, live: LiveStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Run]:
    from tests.conftest import PausePoints  # here: the agents need none of the stack's code

    monkeypatch.setattr(buffer_module, "PART_BYTES", PART_BYTES_HERE)
    monkeypatch.setattr(buffer_module, "LEASE_MS", LEASE_MS_HERE)
    url = live.settings.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    client: redis.Redis[bytes] = redis.Redis.from_url(url)
    client.flushdb()
    points = PausePoints(tmp_path / "pauses")
    env = {**live.stack.env, **points.environment(), REDIS_URL_VARIABLE: url}
    buffer = LayerBuffer(S3Store(live.settings), client, INITIAL_CAPACITY, TAU_SECONDS, PIN_SECONDS)
    run = Run(seed, draw_layers(random.Random(seed)), buffer, points, env)
    run.agents = [Agent(env, run.answers) for _n in range(AGENTS)]
    try:
        yield run
    finally:
        for frozen in run.frozen:
            frozen.agent.signal(signal.SIGCONT)
        points.release_all()
        for agent in run.agents:
            agent.stop()
        forget(run)


def test_buffer_torture(run: Run) -> None:
    rng = random.Random(run.seed)
    draw_layers(rng)  # the same draws as the run's layers: the schedule comes after them
    schedule = draw_schedule(rng, run.layers)
    done = threading.Event()
    watcher = threading.Thread(target=watch_bound, args=(run, done), daemon=True)
    watcher.start()
    try:
        for step in schedule:
            run_step(run, step)
        settle(run)
    finally:
        done.set()
        watcher.join()
    errors = [answer["error"] for answer in run.answers if "error" in answer]
    assert not errors, errors
    assert not run.failures, (run.failures, run.log)
    try:
        check_settled(run)
    except AssertionError as error:
        raise AssertionError(f"seed {run.seed}: {error}; schedule: {run.log}") from error
