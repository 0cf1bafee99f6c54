"""The layer buffer: restored layers kept for GETs, in S3 so that every API process on
every host serves from it, bounded in bytes (DUPHUNTER_BUFFER_BYTES).

An entry is the verified bytes of one layer, as parts of PART_BYTES under
`buffer/<alg>/<hex>/<fill>/<n>`, written in order by one filler (a preconstruction on a
restore worker) while GETs already read the parts written so far: a GET that arrives while
its layer is being rebuilt follows that rebuild ("inflight") instead of starting another.
`<fill>` is the filler's claim token, kept in its entry: the parts of two fills of a layer
never share a key, so deleting one fill's parts (a drop, a sweep) cannot touch another's.
Redis holds the entries (`dh:buf:e:<digest>`: size, state, parts written, hits), the
filler's lease (`dh:buf:fill:<digest>`, renewed per part: a reader whose filler died
stops with BufferMiss and restores on its own), the bytes reserved and the eviction rank.

Byte bound: a filler reserves the layer's whole size before writing its first part, and
the reservation succeeds only while reserved bytes, entries being deleted included, stay
within the bound; so S3 never holds more buffer bytes than the bound, even with many
concurrent fills, but for one case: a filler that lost its claim (frozen past its lease,
or dropped under it) between checking the claim and uploading a part lands that part
after its entry's parts were deleted. Nothing counts it; `sweep` deletes such parts
(maintenance, `sweep_buffer`, hourly). Eviction (only complete entries) deletes the
lowest-ranked entry first. The rank is exponentially decayed access frequency (LRFU):
every fill and every GET served adds one access, older accesses count exp(-age/tau); the
rank key
K = log(sum exp(t_i/tau)) orders entries by that decayed frequency at any time without
rewriting them. An entry that predictions expect GETs for is pinned (ranked above every
unpinned one) until those GETs came or its pin expired. A prediction made from a manifest
GET at time `since` pins nothing if the layer was fetched, by any path, or its entry
filled after `since`: its GET came already (predictions run after the client's GETs more
often than not), and a pin waiting for it would hold bytes for nothing. Pinned entries
hold at most PIN_SHARE of the bound, so that on-demand restores always find room: a
preconstruction beyond it is refused (admitted unpinned, it would be evicted before its
GET, a rebuild wasted), and a prediction for a buffered entry leaves it unpinned.
docs/benchmarks.md compares this policy with LRU and ARC on replayed workloads.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis

from pipelines.formats import Buffer
from pipelines.formats.digests import digest_key
from pipelines.formats.verify import SEGMENT_BYTES
from pipelines.pauses import pause
from pipelines.store.leases import RENEWALS_PER_LEASE
from pipelines.store.storage import ObjectNotFound, ObjectStore

PART_BYTES = SEGMENT_BYTES
LEASE_MS = 10_000  # a filler's claim, renewed RENEWALS_PER_LEASE times a lease (as a
# store.leases.Lease is) by a thread of its process while its restore writes
STALL_SECONDS = 60.0  # a filler that wrote nothing this long is taken for stuck
DROP_MS = 60_000  # a dropper that died by then is replaced
SWEEP_AFTER_SECONDS = 600  # a part this old that nothing counts is past any fill's upload
POLL_SECONDS = 0.02
PIN_BONUS = 1e12  # added to the rank of a pinned entry: above any unpinned one
PIN_SHARE = 0.5  # of the bound, at most, held by pinned entries
PREDICTED = "predicted"  # the origin of a prediction from a manifest GET
PREFIX = "dh:buf:"
USED_KEY = PREFIX + "used"
RANK_KEY = PREFIX + "rank"
STATS_KEY = PREFIX + "stats"
GOT_SECONDS = 900  # how long a layer's last GET is remembered: longer than any prediction


class BufferMiss(Exception):
    """The buffer cannot serve the layer from `offset` on: never filled, evicted, or its
    filler died. The caller restores from that offset instead."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"buffer miss at offset {offset}")
        self.offset = offset


@dataclass(frozen=True)
class Entry:
    digest: str
    size: int
    state: str  # "filling" | "complete" (an entry being dropped is not an Entry)
    parts: int  # parts written so far
    hits: int
    origin: str  # why it was filled: "predicted", "pushed", "warm", "miss", "retired"
    fill: str  # the claim token its parts are keyed by ("": an entry of an older release)

    @property
    def complete(self) -> bool:
        return self.state == "complete"


def part_key(digest: str, fill: str, number: int) -> str:
    """Part `number` of the fill `fill` of a layer; an older release's parts had no fill."""
    folder = digest_key("buffer", digest)
    return f"{folder}/{fill}/{number:06d}" if fill else f"{folder}/{number:06d}"


def parse_part_key(key: str) -> tuple[str, str, int]:
    """(digest, fill, number) of a part's key."""
    _buffer, algorithm, hex_part, *fill, number = key.split("/")
    return f"{algorithm}:{hex_part}", "".join(fill), int(number)


def part_count(size: int) -> int:
    """How many parts hold a layer of `size` bytes."""
    return -(-size // PART_BYTES)


def entry_key(digest: str) -> str:
    return f"{PREFIX}e:{digest}"


def fill_key(digest: str) -> str:
    return f"{PREFIX}fill:{digest}"


def got_key(digest: str) -> str:
    """When the layer was last fetched, by any path."""
    return f"{PREFIX}got:{digest}"


class LayerBuffer:
    def __init__(self, store: ObjectStore, client: redis.Redis[bytes], capacity: int,
                 tau_seconds: float, pin_seconds: float,
                 prediction_pin_seconds: float | None = None) -> None:  # fmt: skip
        self.store = store
        self.redis = client
        self.capacity = capacity
        self.tau = tau_seconds
        self.pin_seconds = pin_seconds
        self.prediction_pin_seconds = (
            pin_seconds if prediction_pin_seconds is None else prediction_pin_seconds
        )
        self._reserve = client.register_script(_RESERVE_LUA)
        self._touch = client.register_script(_TOUCH_LUA)
        self._begin_drop = client.register_script(_BEGIN_DROP_LUA)
        self._end_drop = client.register_script(_END_DROP_LUA)
        self.fill_step = client.register_script(_FILL_STEP_LUA)

    def _pin_seconds(self, origin: str) -> float:
        """How long a pin waits for its GETs: a layer predicted from a manifest GET is
        fetched by that client's pull within seconds or not at all; the pullers of a tag
        just put, of a layer just pushed or warmed come at their next pulls."""
        return self.prediction_pin_seconds if origin == PREDICTED else self.pin_seconds

    # looking up and reading
    def entry(self, digest: str) -> Entry | None:
        return _parse_entry(digest, self.redis.hgetall(entry_key(digest)))

    def record_get(self, digest: str) -> Entry | None:
        """A GET of the layer, served by any path (predictions made before it pin nothing);
        returns its entry as it stands, looked up in the same round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(got_key(digest), repr(time.time()), ex=GOT_SECONDS)
        pipe.hgetall(entry_key(digest))
        _recorded, raw = pipe.execute()
        return _parse_entry(digest, raw)

    def filling_alive(self, digest: str) -> bool:
        return bool(self.redis.exists(fill_key(digest)))

    def read(self, digest: str, offset: int, end: int) -> Iterator[bytes]:
        """Bytes [offset, end) of a buffered layer, following its filler if it is still
        being written. Raises BufferMiss(position) where it cannot go on."""
        position = offset
        while position < end:
            entry = self.entry(digest)
            number = position // PART_BYTES
            if entry is None:
                raise BufferMiss(position)
            if number < entry.parts:
                stop = min(end, (number + 1) * PART_BYTES)
                yield from self._read_part(part_key(digest, entry.fill, number), position, stop)
                position = stop
            elif entry.complete or not self.filling_alive(digest):
                raise BufferMiss(position)
            else:
                time.sleep(POLL_SECONDS)

    def _read_part(self, key: str, position: int, stop: int) -> Iterator[bytes]:
        start_in_part = position % PART_BYTES
        try:
            for chunk in self.store.iter_range(key, start_in_part, stop - position):
                position += len(chunk)
                yield chunk
        except ObjectNotFound:
            raise BufferMiss(position) from None
        if position != stop:
            raise BufferMiss(position)

    def fetched_since(self, digest: str, since: float) -> bool:
        raw = self.redis.get(got_key(digest))
        return raw is not None and float(raw) > since

    def record_hit(self, digest: str) -> None:
        """A GET served from the entry: one more access, and one expected GET fewer."""
        now = time.time()
        self._touch(
            keys=[entry_key(digest), RANK_KEY, STATS_KEY, got_key(digest)],
            args=[digest, now / self.tau, PIN_BONUS, 1, 0, now, now, now, self._pin_room()],
        )

    def expect(self, digest: str, gets: int, since: float, origin: str = PREDICTED) -> None:
        """A prediction made at `since` expects `gets` more GETs of a buffered layer: pin
        it for its origin's pin time from `since`, unless it was read or filled after."""
        now = time.time()
        self._touch(
            keys=[entry_key(digest), RANK_KEY, STATS_KEY, got_key(digest)],
            args=[digest, now / self.tau, PIN_BONUS, 0, gets,
                  since + self._pin_seconds(origin), now, since, self._pin_room()],
        )  # fmt: skip

    def _pin_room(self) -> int:
        return int(self.capacity * PIN_SHARE)

    # filling
    def start_fill(
        self, digest: str, size: int, origin: str, expected_gets: int = 0, since: float = 0
    ) -> Filler | None:
        """Claim the filling of a layer and reserve its bytes, evicting as needed; None if
        it is buffered or being filled already, or cannot be admitted. A fill for
        `expected_gets` predicted at `since` is pinned for its origin's pin time."""
        owner = uuid.uuid4().hex
        if self.used_bytes() > self.capacity:  # the bound was lowered since those fills
            self.enforce_bound()
        while True:
            now = time.time()
            verdict, *victims = self._reserve(
                keys=[entry_key(digest), fill_key(digest), USED_KEY, RANK_KEY, STATS_KEY,
                      got_key(digest)],
                args=[digest, size, self.capacity, owner, LEASE_MS, origin, expected_gets,
                      now / self.tau, PIN_BONUS, (since or now) + self._pin_seconds(origin), now,
                      since or now, self._pin_room()],
            )  # fmt: skip
            if verdict == b"granted":
                return Filler(self, digest, size, owner)
            if verdict != b"evict":
                return None
            for victim in victims:
                self.drop(victim.decode())

    def drop(self, digest: str) -> None:
        """Delete an entry's parts (it was chosen for eviction, or its fill failed), then
        give its bytes back. The entry is first marked dropping, atomically, so that of two
        processes dropping it at once (a failed fill, and a claimant that found its filler
        gone, or two evictions when a GET's hit ranked it again) only one gives its bytes
        back: given back twice, S3 would hold more than the bound."""
        token, now = uuid.uuid4().hex, time.time()
        raw_size, raw_fill = self._begin_drop(
            keys=[entry_key(digest), RANK_KEY], args=[digest, token, now, now + DROP_MS / 1000]
        )
        size, fill = int(raw_size), raw_fill.decode()
        if size < 0:
            return  # gone already, or another process is dropping it
        self.store.delete([part_key(digest, fill, n) for n in range(part_count(size))])
        self._end_drop(keys=[entry_key(digest), USED_KEY, RANK_KEY], args=[token, size, digest])

    def enforce_bound(self) -> int:
        """Evict complete entries, lowest ranked (pinned last) first, until the bytes held
        are within the bound: after a restart with a lower DUPHUNTER_BUFFER_BYTES, the
        entries filled under the old bound would otherwise stay. Entries being filled are
        left to finish. How many entries were evicted."""
        evicted = 0
        while self.used_bytes() > self.capacity:
            ranked = [member.decode() for member in self.redis.zrange(RANK_KEY, 0, 63)]
            complete = [digest for digest in ranked if self._is_complete(digest)]
            if not complete:
                break
            for digest in complete:
                if self.used_bytes() <= self.capacity:
                    break
                self.drop(digest)
                evicted += 1
        if evicted:
            self.redis.hincrby(STATS_KEY, "evictions", evicted)
            self.redis.hincrby(STATS_KEY, "evicted_to_lowered_bound", evicted)
        return evicted

    def sweep(self, written_before: float, digests: list[str] | None = None) -> int:
        """Delete the parts written before `written_before` that no entry counts (of these
        layers; default every layer): parts that fillers uploaded after losing their
        claim, which no drop will delete, and every part once Redis lost the entries. A
        part is kept while its fill's entry (being filled, complete or being dropped) or
        its fill's claim lives. How many were deleted. A fill that starts after the
        listing writes keys of its own, which this sweep never deletes."""
        prefixes = [digest_key("buffer", d) + "/" for d in digests] if digests else ["buffer/"]
        kept: dict[str, set[str]] = {}  # the fills each layer's entry or claim holds
        orphans = []
        for prefix in prefixes:
            for item in self.store.listing(prefix):
                if item.modified >= written_before:
                    continue
                digest, fill, _number = parse_part_key(item.key)
                if digest not in kept:  # one lookup per layer, not per part
                    kept[digest] = self._fills_held(digest)
                if fill not in kept[digest]:
                    orphans.append(item.key)
        pause("buffer.sweep")
        self.store.delete(orphans)
        if orphans:
            self.redis.hincrby(STATS_KEY, "orphan_parts_swept", len(orphans))
        return len(orphans)

    def _fills_held(self, digest: str) -> set[str]:
        """The fills whose parts a layer's entry or live claim holds."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(entry_key(digest), ["size", "fill"])
        pipe.get(fill_key(digest))
        (size, fill), claim = pipe.execute()
        held = {claim.decode()} if claim is not None else set()
        if size is not None:
            held.add((fill or b"").decode())
        return held

    def _is_complete(self, digest: str) -> bool:
        entry = self.entry(digest)
        return entry is not None and entry.complete

    # accounting
    def used_bytes(self) -> int:
        return int(self.redis.get(USED_KEY) or 0)

    def stats_counters(self) -> dict[str, int]:
        raw = self.redis.hgetall(STATS_KEY)
        return {key.decode(): int(float(value)) for key, value in raw.items()}

    def stats(self) -> dict[str, Any]:
        """Counters (hits, fills, evictions, wasted preconstructions: entries filled ahead
        of GETs and evicted before any came), and the entries held now by origin, with
        how many of them no GET used yet."""
        counters = self.stats_counters()
        digests = [member.decode() for member in self.redis.zrange(RANK_KEY, 0, -1)]
        pipe = self.redis.pipeline()
        for digest in digests:
            pipe.hmget(entry_key(digest), ["origin", "hits"])
        held: dict[str, int] = {}
        unused: dict[str, int] = {}
        for origin, hits in pipe.execute():
            name = (origin or b"?").decode()
            held[name] = held.get(name, 0) + 1
            if int(hits or 0) == 0:
                unused[name] = unused.get(name, 0) + 1
        counters.setdefault("wasted_preconstructions", 0)
        return {
            "capacity_bytes": self.capacity,
            "used_bytes": self.used_bytes(),
            "entries": len(digests),
            "entries_by_origin": held,
            "unused_entries_by_origin": unused,
            "unused_preconstructed_entries": sum(
                count for origin, count in unused.items() if origin != "miss"
            ),
            **counters,
        }


def _parse_entry(digest: str, raw: dict[bytes, bytes]) -> Entry | None:
    if not raw:
        return None
    fields = {key.decode(): value.decode() for key, value in raw.items()}
    if fields.get("state") == "dropping" or "size" not in fields:
        return None  # its parts are being deleted (or it is the remnant of a dead filler)
    return Entry(
        digest,
        int(fields["size"]),
        fields["state"],
        int(fields.get("parts", 0)),
        int(fields.get("hits", 0)),
        fields.get("origin", ""),
        fields.get("fill", ""),
    )


class Filler:
    """Writes one entry's parts as verified bytes arrive, uploading on a thread of its own
    so that the restore does not wait for S3 (at most MAX_PENDING parts in memory);
    `finish` marks the entry complete, `abort` gives its bytes back. Each step checks that
    the filler still holds the fill claim: a filler whose lease expired and whose layer
    another process took over stops writing (the GET it streams to goes on)."""

    MAX_PENDING = 2

    def __init__(self, buffer: LayerBuffer, digest: str, size: int, owner: str) -> None:
        self.buffer = buffer
        self.digest = digest
        self.size = size
        self.owner = owner
        self.pending = bytearray()
        self.parts = 0
        self.written = 0
        self.uploads: deque[Future[None]] = deque()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"fill-{digest[7:19]}")
        self.lost = False  # another process took the fill over: the rest is not written
        self.last_write = time.monotonic()
        self.ended = threading.Event()
        threading.Thread(target=self._renew, name=f"fill-lease-{digest[7:19]}", daemon=True).start()

    def _renew(self) -> None:
        """Keep the claim while this process lives and its restore writes: the GETs that
        follow a filler killed with its host take the layer over within LEASE_MS, not
        after the STALL_SECONDS that a slow restore is allowed between two writes."""
        while not self.ended.wait(LEASE_MS / 1000 / RENEWALS_PER_LEASE):
            if self.lost or time.monotonic() - self.last_write > STALL_SECONDS:
                return
            with contextlib.suppress(redis.RedisError):  # tried again at the next beat
                if not self._owned("lease"):
                    self.lost = True

    def write(self, chunk: Buffer) -> None:
        if self.lost:
            return
        self.last_write = time.monotonic()
        self.pending += chunk
        while len(self.pending) >= PART_BYTES:
            self._put(bytes(self.pending[:PART_BYTES]))
            del self.pending[:PART_BYTES]

    def finish(self) -> None:
        try:
            if self.pending and not self.lost:
                self._put(bytes(self.pending))
                self.pending.clear()
            self._wait(0)
            self.pool.shutdown()
            if not self.lost and self.written != self.size:
                raise ValueError(f"filled {self.written} of {self.size} bytes")
            if self.lost or not self._owned("finish"):
                self.buffer.redis.hincrby(STATS_KEY, "fills_lost", 1)
        finally:
            self.ended.set()

    def abort(self) -> None:
        try:
            with contextlib.suppress(Exception):
                self._wait(0)
            self.pool.shutdown(cancel_futures=True)
            self.buffer.redis.hincrby(STATS_KEY, "fills_failed", 1)
            if not self.lost and self._owned("abort"):
                self.buffer.drop(self.digest)  # else the entry is another filler's now
        finally:
            self.ended.set()

    def _owned(self, step: str, parts: int = 0) -> bool:
        """Do `step` if this filler still holds the layer's fill claim; False if its lease
        expired and another process took the layer over (or dropped it)."""
        keys = [entry_key(self.digest), fill_key(self.digest), STATS_KEY]
        return bool(self.buffer.fill_step(keys=keys, args=[self.owner, step, parts, LEASE_MS]))

    def _put(self, data: bytes) -> None:
        self._wait(self.MAX_PENDING - 1)
        number = self.parts
        self.parts += 1
        self.written += len(data)
        self.uploads.append(self.pool.submit(self._upload, number, data))

    def _upload(self, number: int, data: bytes) -> None:
        """Write a part, unless the fill was taken over: its parts are another filler's
        now, and one written after that filler's drop would be bytes nobody counts."""
        if self.lost or not self._owned("lease"):
            self.lost = True
            return
        pause("buffer.upload", self.digest)  # the claim may lapse here: see `sweep`
        self.buffer.store.put_bytes(part_key(self.digest, self.owner, number), data)
        if not self._owned("part", number + 1):
            self.lost = True

    def _wait(self, keep: int) -> None:
        """Wait until at most `keep` uploads are pending; an upload's error is raised."""
        while len(self.uploads) > keep:
            self.uploads.popleft().result()


# Bytes of the entries pinned now (rank key, pin bonus, now); a pin that expired counts
# nothing.
_PINNED_BYTES_LUA = """
local function pinned_bytes(rank_key, bonus, now)
  local total = 0
  for _, digest in ipairs(redis.call('ZRANGEBYSCORE', rank_key, bonus / 2, '+inf')) do
    local key = 'dh:buf:e:' .. digest
    if tonumber(redis.call('HGET', key, 'pinned_until') or '0') >= now then
      total = total + tonumber(redis.call('HGET', key, 'size') or '0')
    end
  end
  return total
end
"""

# Whether an entry's parts are being deleted by a dropper alive at `now` (entry key, now).
_BEING_DROPPED_LUA = """
local function being_dropped(key, now)
  local dropping_until = tonumber(redis.call('HGET', key, 'dropping_until') or '0')
  return redis.call('HGET', key, 'state') == 'dropping' and dropping_until >= now
end
"""

# KEYS: entry, fill claim, used, rank, stats, last GET. ARGV: digest, size, capacity,
# owner, lease ms, origin, expected GETs, now/tau, pin bonus, pinned until, now,
# predicted at, bytes pins may hold.
# Returns {"granted"} | {"evict", victim...} | {"refused"}.
_RESERVE_LUA = (
    _PINNED_BYTES_LUA
    + _BEING_DROPPED_LUA
    + """
local size, capacity = tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'state') == 'complete' or redis.call('EXISTS', KEYS[2]) == 1 then
    return {'refused'}
  end
  if being_dropped(KEYS[1], tonumber(ARGV[11])) then return {'refused'} end
  return {'evict', ARGV[1]}  -- a dead filler's (or dropper's) entry: delete it, claim afresh
end
if size > capacity then return {'refused'} end
local expected = tonumber(ARGV[7])
local got = tonumber(redis.call('GET', KEYS[6]) or '0')
local pin = expected > 0 and tonumber(ARGV[10]) > tonumber(ARGV[11]) and got <= tonumber(ARGV[12])
local pin_room = tonumber(ARGV[13])
if pin and pinned_bytes(KEYS[4], tonumber(ARGV[9]), tonumber(ARGV[11])) + size > pin_room then
  redis.call('HINCRBY', KEYS[5], 'pins_refused', 1)  -- a prediction the pins' share cannot hold
  return {'refused'}
end
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if used + size > capacity then
  local now = tonumber(ARGV[11])
  local victims = {}
  local freed = 0
  local candidates = redis.call('ZRANGE', KEYS[4], 0, 63, 'WITHSCORES')
  for i = 1, #candidates, 2 do
    local digest, score = candidates[i], tonumber(candidates[i + 1])
    local key = 'dh:buf:e:' .. digest
    local pinned = score >= tonumber(ARGV[9]) / 2
    if pinned and tonumber(redis.call('HGET', key, 'pinned_until') or '0') < now then
      redis.call('ZADD', KEYS[4], score - tonumber(ARGV[9]), digest)  -- pin expired
      pinned = false
    end
    if not pinned and redis.call('HGET', key, 'state') == 'complete' then
      table.insert(victims, digest)
      if tonumber(redis.call('HGET', key, 'hits') or '0') == 0 then
        redis.call('HINCRBY', KEYS[5], 'evicted_unused', 1)
        if redis.call('HGET', key, 'origin') ~= 'miss' then
          redis.call('HINCRBY', KEYS[5], 'wasted_preconstructions', 1)
        end
      end
      redis.call('HINCRBY', KEYS[5], 'evictions', 1)
      redis.call('ZREM', KEYS[4], digest)
      freed = freed + tonumber(redis.call('HGET', key, 'size') or '0')
      if used - freed + size <= capacity then break end
    end
  end
  if #victims == 0 then
    redis.call('HINCRBY', KEYS[5], 'refused_full', 1)
    return {'refused'}
  end
  return {'evict', unpack(victims)}
end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('INCRBY', KEYS[3], size)
local rank = tonumber(ARGV[8])
local pinned_until = 0
if pin then
  rank = rank + tonumber(ARGV[9])
  pinned_until = tonumber(ARGV[10])
else
  expected = 0
end
redis.call('HSET', KEYS[1], 'size', size, 'state', 'filling', 'parts', 0, 'hits', 0,
           'origin', ARGV[6], 'expected', expected, 'pinned_until', pinned_until,
           'k', ARGV[8], 'at', ARGV[11], 'fill', ARGV[4])
redis.call('ZADD', KEYS[4], rank, ARGV[1])
return {'granted'}
"""
)

# KEYS: entry, fill claim, stats. ARGV: filler's owner token, step, parts written, lease
# ms. A filler's step, done only while it holds the claim and its entry is still being
# filled; returns 1 if done, else 0.
_FILL_STEP_LUA = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'filling' then
  -- dropped under its filler (GC's drop of a deleted blob): a step would make a remnant
  -- without size, complete at its finish, that no fill of the layer could replace
  redis.call('DEL', KEYS[2])
  return 0
end
if ARGV[2] == 'lease' then
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
elseif ARGV[2] == 'part' then
  redis.call('HSET', KEYS[1], 'parts', ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
elseif ARGV[2] == 'finish' then
  redis.call('HSET', KEYS[1], 'state', 'complete')
  redis.call('DEL', KEYS[2])
  redis.call('HINCRBY', KEYS[3], 'fills', 1)
else  -- abort: the claim given up, the caller drops the entry
  redis.call('DEL', KEYS[2])
end
return 1
"""

# KEYS: entry, rank. ARGV: digest, dropper's token, now, dropping until (a dropper that
# died by then is replaced). Returns the entry's size and fill, or -1: no entry, or another
# process is dropping it.
_BEGIN_DROP_LUA = (
    _BEING_DROPPED_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 or being_dropped(KEYS[1], tonumber(ARGV[3])) then
  return {-1, ''}
end
redis.call('HSET', KEYS[1], 'state', 'dropping', 'dropper', ARGV[2], 'dropping_until', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
local size, fill = unpack(redis.call('HMGET', KEYS[1], 'size', 'fill'))
return {tonumber(size or '0'), fill or ''}
"""
)

# KEYS: entry, used, rank. ARGV: dropper's token, size, digest. The entry's bytes given
# back, once.
_END_DROP_LUA = """
if redis.call('HGET', KEYS[1], 'dropper') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('DECRBY', KEYS[2], ARGV[2])
return 1
"""

# KEYS: entry, rank, stats, last GET. ARGV: digest, now/tau, pin bonus, hits to add,
# expected GETs to add, pinned until, now, predicted at (expected GETs are not added to
# an entry filled, or a layer fetched, since), bytes pins may hold.
_TOUCH_LUA = (
    _PINNED_BYTES_LUA
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'dropping' then return 0 end  -- ranked again, it could be evicted twice
local k = tonumber(redis.call('HGET', KEYS[1], 'k'))
local t = tonumber(ARGV[2])
local high, low = math.max(k, t), math.min(k, t)
k = high + math.log(1 + math.exp(low - high))
local hits = tonumber(ARGV[4])
local adding = tonumber(ARGV[5])
local touched = math.max(tonumber(redis.call('HGET', KEYS[1], 'at') or '0'),
                         tonumber(redis.call('GET', KEYS[4]) or '0'))
if touched > tonumber(ARGV[8]) or tonumber(ARGV[6]) <= tonumber(ARGV[7]) then adding = 0 end
local expected = tonumber(redis.call('HGET', KEYS[1], 'expected') or '0')
if tonumber(redis.call('HGET', KEYS[1], 'pinned_until') or '0') < tonumber(ARGV[7]) then
  expected = 0  -- the pin expired
end
if adding > 0 and expected == 0 then  -- a new pin: only within the pins' share
  local size = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
  if pinned_bytes(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[7])) + size > tonumber(ARGV[9]) then
    redis.call('HINCRBY', KEYS[3], 'pins_refused', 1)
    adding = 0
  end
end
expected = math.max(0, expected - hits + adding)
if adding > 0 then redis.call('HSET', KEYS[1], 'pinned_until', ARGV[6]) end
redis.call('HSET', KEYS[1], 'k', k, 'expected', expected)
redis.call('HINCRBY', KEYS[1], 'hits', hits)
if hits > 0 then
  redis.call('HSET', KEYS[1], 'at', ARGV[7])
  redis.call('HINCRBY', KEYS[3], 'hits', hits)
end
local rank = k
if expected > 0 then rank = rank + tonumber(ARGV[3]) end
redis.call('ZADD', KEYS[2], rank, ARGV[1])
return 1
"""
)
