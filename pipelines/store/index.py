"""The Redis index: fast lookups over what S3 holds durably, rebuildable from S3.

Every write goes to S3 first and to this index second, so a lost or stale index is
repaired by `rebuild`, never the other way round. Key schema (prefix `dh:`):

    blob:<digest>              descriptor JSON of a stored blob
    repos                      zset of repository names (lexical order, score 0)
    repo:<name>:layers         set of blob digests linked into the repository
    repo:<name>:manifests      hash manifest digest -> revision JSON (mediaType, size, ...)
    repo:<name>:tags           hash tag -> manifest digest
    referrers:<name>:<digest>  hash referrer digest -> descriptor JSON
    manifest:<digest>          manifest bytes (a cache)
    upload:<uuid>              upload state JSON (a cache of the S3 state object)
    stats                      hash of byte counters
    layer:<digest>             hash: ingest result of a layer; layers: digest -> state
    files                      hash file sha256 -> "<pack> <offset> <length>"
    filerefs                   hash file sha256 -> layers referencing it
    claim:<sha256>             a worker storing this new file now (token, with a lease)
    index:ready                set once a rebuild finished: the index is complete
    index:rebuild-requested    a lookup found the index incomplete and asked for a rebuild
    job:<id>                   a job's record (kept through a rebuild)

Garbage collection never deletes on this index's word (pipelines/registry/gc.py, docs/deletion.md).
The buffer, the access history and popularity keep their own keys (see their modules).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis

from pipelines.store.leases import Lease

PREFIX = "dh:"
FILES_KEY = PREFIX + "files"  # file digest (hex) -> its location in a pack
READY_KEY = PREFIX + "index:ready"
REBUILDING_KEY = PREFIX + "index:rebuilding"
# The index is complete only if the rebuild that filled it saw no loss of keys on the way.
_MARK_READY_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], '1')
redis.call('DEL', KEYS[1])
return 1
"""


def _mapping(fields: dict[str, str]) -> dict[str | bytes, bytes | float | int | str]:
    return {key: value for key, value in fields.items()}


class Index:
    def __init__(self, client: redis.Redis[bytes]) -> None:
        self.redis = client

    @classmethod
    def from_url(cls, url: str) -> Index:
        return cls(redis.Redis.from_url(url))

    # blobs
    def blob(self, digest: str) -> dict[str, Any] | None:
        raw = self.redis.get(f"{PREFIX}blob:{digest}")
        return None if raw is None else dict(json.loads(raw))

    def put_blob(self, digest: str, descriptor: dict[str, Any]) -> None:
        self.redis.set(f"{PREFIX}blob:{digest}", json.dumps(descriptor))

    def drop_blob(self, digest: str) -> None:
        self.redis.delete(f"{PREFIX}blob:{digest}")

    def link_layer(self, repo: str, digest: str) -> None:
        pipe = self.redis.pipeline()
        pipe.sadd(f"{PREFIX}repo:{repo}:layers", digest)
        pipe.zadd(f"{PREFIX}repos", {repo: 0})
        pipe.execute()

    def unlink_layer(self, repo: str, digest: str) -> bool:
        return bool(self.redis.srem(f"{PREFIX}repo:{repo}:layers", digest))

    def is_layer_linked(self, repo: str, digest: str) -> bool:
        return bool(self.redis.sismember(f"{PREFIX}repo:{repo}:layers", digest))

    def repositories(self, last: str = "", count: int | None = None) -> list[str]:
        start = f"({last}" if last else "-"
        args: dict[str, int] = {} if count is None else {"start": 0, "num": count}
        names = self.redis.zrangebylex(f"{PREFIX}repos", start, "+", **args)
        return [name.decode() for name in names]

    def repository_exists(self, repo: str) -> bool:
        return self.redis.zscore(f"{PREFIX}repos", repo) is not None

    def revision(self, repo: str, digest: str) -> dict[str, Any] | None:
        raw = self.redis.hget(f"{PREFIX}repo:{repo}:manifests", digest)
        return None if raw is None else dict(json.loads(raw))

    def put_revision(self, repo: str, digest: str, revision: dict[str, Any]) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(f"{PREFIX}repo:{repo}:manifests", digest, json.dumps(revision))
        pipe.zadd(f"{PREFIX}repos", {repo: 0})
        pipe.execute()

    def drop_repository(self, repo: str) -> None:
        keys = [f"{PREFIX}repo:{repo}:{part}" for part in ("layers", "manifests", "tags")]
        keys += [key.decode() for key in self.redis.scan_iter(match=f"{PREFIX}referrers:{repo}:*")]
        pipe = self.redis.pipeline()
        pipe.delete(*keys)
        pipe.zrem(f"{PREFIX}repos", repo)
        pipe.execute()

    def drop_revision(self, repo: str, digest: str) -> None:
        self.redis.hdel(f"{PREFIX}repo:{repo}:manifests", digest)

    def manifest_bytes(self, digest: str) -> bytes | None:
        value = self.redis.get(f"{PREFIX}manifest:{digest}")
        return None if value is None else bytes(value)

    def cache_manifest_bytes(self, digest: str, content: bytes) -> None:
        self.redis.set(f"{PREFIX}manifest:{digest}", content)

    def drop_manifest_bytes(self, digests: list[str]) -> None:
        if digests:
            self.redis.delete(*[f"{PREFIX}manifest:{digest}" for digest in digests])

    def tag(self, repo: str, tag: str) -> str | None:
        value = self.redis.hget(f"{PREFIX}repo:{repo}:tags", tag)
        return None if value is None else value.decode()

    def tags(self, repo: str) -> dict[str, str]:
        raw = self.redis.hgetall(f"{PREFIX}repo:{repo}:tags")
        return {key.decode(): value.decode() for key, value in raw.items()}

    def set_tag(self, repo: str, tag: str, digest: str) -> None:
        self.redis.hset(f"{PREFIX}repo:{repo}:tags", tag, digest)

    def drop_tag(self, repo: str, tag: str) -> None:
        self.redis.hdel(f"{PREFIX}repo:{repo}:tags", tag)

    def referrers(self, repo: str, subject: str) -> list[dict[str, Any]]:
        raw = self.redis.hvals(f"{PREFIX}referrers:{repo}:{subject}")
        return [dict(json.loads(value)) for value in raw]

    def add_referrer(
        self, repo: str, subject: str, digest: str, descriptor: dict[str, Any]
    ) -> None:
        self.redis.hset(f"{PREFIX}referrers:{repo}:{subject}", digest, json.dumps(descriptor))

    def drop_referrer(self, repo: str, subject: str, digest: str) -> None:
        self.redis.hdel(f"{PREFIX}referrers:{repo}:{subject}", digest)

    # uploads
    def upload(self, upload_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(f"{PREFIX}upload:{upload_id}")
        return None if raw is None else dict(json.loads(raw))

    def put_upload(self, upload_id: str, state: dict[str, Any], ttl: int) -> None:
        self.redis.set(f"{PREFIX}upload:{upload_id}", json.dumps(state), ex=ttl)

    def drop_upload(self, upload_id: str) -> None:
        self.redis.delete(f"{PREFIX}upload:{upload_id}")

    # counters and layer states
    def add_bytes(self, logical: int = 0, stored: int = 0) -> None:
        pipe = self.redis.pipeline()
        if logical:
            pipe.hincrby(f"{PREFIX}stats", "logical_bytes", logical)
        if stored:
            pipe.hincrby(f"{PREFIX}stats", "stored_bytes", stored)
        pipe.execute()

    def count(self, name: str, amount: int = 1) -> None:
        self.redis.hincrby(f"{PREFIX}stats", name, amount)

    def counters(self) -> dict[str, int]:
        raw = self.redis.hgetall(f"{PREFIX}stats")
        return {key.decode(): int(value) for key, value in raw.items()}

    def layer(self, digest: str) -> dict[str, str]:
        raw = self.redis.hgetall(f"{PREFIX}layer:{digest}")
        return {key.decode(): value.decode() for key, value in raw.items()}

    def put_layer(self, digest: str, fields: dict[str, str]) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(f"{PREFIX}layer:{digest}", mapping=_mapping(fields))
        if "state" in fields:
            pipe.hset(f"{PREFIX}layers", digest, fields["state"])
        pipe.execute()

    def drop_layer(self, digest: str) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(f"{PREFIX}layer:{digest}")
        pipe.hdel(f"{PREFIX}layers", digest)
        pipe.execute()

    def layer_summaries(
        self, fields: tuple[str, ...] = ("state", "encoder", "reason")
    ) -> dict[str, dict[str, str]]:
        """Some fields of every known layer's record, by layer digest."""
        digests = list(self.layer_states())
        pipe = self.redis.pipeline()
        for digest in digests:
            pipe.hmget(f"{PREFIX}layer:{digest}", list(fields))
        return {
            digest: {key: (raw or b"").decode() for key, raw in zip(fields, values, strict=True)}
            for digest, values in zip(digests, pipe.execute(), strict=True)
        }

    def layer_states(self) -> dict[str, str]:
        raw = self.redis.hgetall(f"{PREFIX}layers")
        return {key.decode(): value.decode() for key, value in raw.items()}

    def lock(self, name: str, blocking_timeout: float = 30) -> Lease:
        """A lock on a short lease its holder renews while it works (pipelines.store.leases):
        one whose holder died is free again within seconds."""
        return Lease(self.redis, f"{PREFIX}lock:{name}", blocking_timeout)

    def is_ready(self) -> bool:
        return bool(self.redis.exists(READY_KEY))

    def begin_rebuild(self, token: str) -> None:
        """Mark the (cleared) index as being filled by the rebuild `token`."""
        self.redis.set(REBUILDING_KEY, token)

    def mark_ready(self, token: str) -> bool:
        """Declare the index complete, unless Redis lost keys while rebuild `token` filled
        it (its mark is gone): then it stays incomplete and must be rebuilt again."""
        script = self.redis.register_script(_MARK_READY_LUA)
        return bool(script(keys=[REBUILDING_KEY, READY_KEY], args=[token]))

    def clear(self) -> None:
        """Drop every index entry; locks (a rebuild runs under one) and job records (a
        rebuild is a job, followed through its record) are kept."""
        kept = (f"{PREFIX}lock:".encode(), f"{PREFIX}job:".encode())
        for key in self.redis.scan_iter(match=PREFIX + "*", count=1000):
            if not key.startswith(kept):
                self.redis.delete(key)

    # jobs
    def put_job(self, job_id: str, fields: dict[str, str], ttl: int = 7 * 24 * 3600) -> None:
        key = f"{PREFIX}job:{job_id}"
        self.redis.hset(key, mapping=_mapping(fields))
        self.redis.expire(key, ttl)

    def job(self, job_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(f"{PREFIX}job:{job_id}")
        return {key.decode(): value.decode() for key, value in raw.items()}

    def queue_length(self, queue: str) -> int:
        """Jobs waiting in a Celery queue: its list and its priority lists (`queue:1`...)."""
        pipe = self.redis.pipeline()
        pipe.llen(queue)
        for step in range(1, 10):
            pipe.llen(f"{queue}:{step}")
        return sum(int(length) for length in pipe.execute())

    # the content store of unique files
    def file_locations(self, hex_digests: list[str]) -> list[str | None]:
        """Where each file is stored (`<pack> <offset> <length>`), None if not stored."""
        if not hex_digests:
            return []
        values = self.redis.hmget(FILES_KEY, hex_digests)
        return [None if value is None else value.decode() for value in values]

    def add_file(self, hex_digest: str, location: str) -> bool:
        """Record where a file is stored; False if it was recorded already."""
        return bool(self.redis.hsetnx(FILES_KEY, hex_digest, location))

    def add_files(self, locations: dict[str, str]) -> list[bool]:
        """Record where files are stored, in one round trip; per file, False if it was
        recorded already (then the new copy is garbage)."""
        pipe = self.redis.pipeline()
        for hex_digest, location in locations.items():
            pipe.hsetnx(FILES_KEY, hex_digest, location)
        return [bool(added) for added in pipe.execute()]

    # claims: a worker about to store a new file claims it, so that no other stores it too
    def claim_files(self, hex_digests: list[str], token: str, lease_ms: int) -> list[bool]:
        """Claim files for storing; per file, whether this token got the claim."""
        pipe = self.redis.pipeline()
        for hex_digest in hex_digests:
            pipe.set(f"{PREFIX}claim:{hex_digest}", token, nx=True, px=lease_ms)
        return [bool(granted) for granted in pipe.execute()]

    def renew_claims(self, hex_digests: list[str], token: str, lease_ms: int) -> None:
        if hex_digests:
            keys = [f"{PREFIX}claim:{h}" for h in hex_digests]
            self._renew_script(keys=keys, args=[token, lease_ms])

    def release_claims(self, hex_digests: list[str], token: str) -> None:
        if hex_digests:
            keys = [f"{PREFIX}claim:{h}" for h in hex_digests]
            self._release_script(keys=keys, args=[token])

    def claimed(self, hex_digests: list[str]) -> list[bool]:
        """Whether someone holds a live claim on each file."""
        pipe = self.redis.pipeline()
        for hex_digest in hex_digests:
            pipe.exists(f"{PREFIX}claim:{hex_digest}")
        return [bool(held) for held in pipe.execute()]

    @property
    def _renew_script(self) -> Any:
        return self.redis.register_script(_RENEW_CLAIMS_LUA)

    @property
    def _release_script(self) -> Any:
        return self.redis.register_script(_RELEASE_CLAIMS_LUA)

    def replace_files(self, changes: Mapping[str, tuple[str | None, str]]) -> int:
        """Point files at new places (a compacted pack, a copy chosen for a lost entry),
        each only if its entry is still what the caller saw (None: absent); how many."""
        return self._compare_and_set(
            {hexdigest: (old or "", new) for hexdigest, (old, new) in changes.items()}
        )

    def forget_files(self, places: dict[str, str]) -> int:
        """Drop file entries, each only if it still points where the caller saw it (a file
        no recipe names; an entry whose pack is gone); how many."""
        return self._compare_and_set({digest: (old, "") for digest, old in places.items()})

    def forget_file_references(self, hex_digests: list[str]) -> None:
        if hex_digests:
            self.redis.hdel(f"{PREFIX}filerefs", *hex_digests)

    def _compare_and_set(self, changes: dict[str, tuple[str, str]]) -> int:
        if not changes:
            return 0
        args = [part for hexdigest, (old, new) in changes.items() for part in (hexdigest, old, new)]
        return int(self._compare_and_set_script(keys=[FILES_KEY], args=args))

    @property
    def _compare_and_set_script(self) -> Any:
        return self.redis.register_script(_COMPARE_AND_SET_FILES_LUA)

    def file_count(self) -> int:
        return int(self.redis.hlen(FILES_KEY))

    def referenced_file_count(self) -> int:
        return int(self.redis.hlen(f"{PREFIX}filerefs"))

    def add_file_references(self, file_hexes: list[str]) -> None:
        pipe = self.redis.pipeline()
        for hex_digest in file_hexes:
            pipe.hincrby(f"{PREFIX}filerefs", hex_digest, 1)
        pipe.execute()

    def file_refcount(self, hex_digest: str) -> int:
        return int(self.redis.hget(f"{PREFIX}filerefs", hex_digest) or 0)

    def commit_deduplication(
        self, digest: str, file_hexes: list[str], fields: dict[str, str], retiring_bytes: int
    ) -> bool:
        """Count one more reference to each file, mark the layer deduplicated and count its
        intact copy as waiting for deletion, at once and only once per layer; False if the
        layer was already marked."""
        return bool(
            self._commit_script(
                keys=[
                    f"{PREFIX}layer:{digest}",
                    f"{PREFIX}layers",
                    f"{PREFIX}filerefs",
                    f"{PREFIX}stats",
                ],
                args=[digest, json.dumps(fields), retiring_bytes, *file_hexes],
            )
        )

    @property
    def _commit_script(self) -> Any:
        return self.redis.register_script(_COMMIT_DEDUP_LUA)


# ARGV: triples (file, expected entry or "" for none, new entry or "" to delete).
_COMPARE_AND_SET_FILES_LUA = """
local changed = 0
for i = 1, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i]) or ''
  if current == ARGV[i + 1] then
    if ARGV[i + 2] == '' then
      redis.call('HDEL', KEYS[1], ARGV[i])
    else
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    end
    changed = changed + 1
  end
end
return changed
"""

_RENEW_CLAIMS_LUA = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]) end
end
return 1
"""

_RELEASE_CLAIMS_LUA = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 1
"""

_COMMIT_DEDUP_LUA = """
if redis.call('HGET', KEYS[1], 'state') == 'deduplicated' then return 0 end
for i = 4, #ARGV do redis.call('HINCRBY', KEYS[3], ARGV[i], 1) end
redis.call('HINCRBY', KEYS[4], 'retiring_bytes', ARGV[3])
local fields = cjson.decode(ARGV[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'state', 'deduplicated')
redis.call('HSET', KEYS[2], ARGV[1], 'deduplicated')
return 1
"""
