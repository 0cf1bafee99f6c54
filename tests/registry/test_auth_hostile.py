"""Authentication under attack, and the open endpoints kept cheap: passwords over bcrypt's
72 bytes as `htpasswd -B` takes them, a missing htpasswd file, tokens of removed users,
the failed-login throttle (per client address, per user, 429 with Retry-After), a flood
of wrong logins while an honest user pushes and pulls, metric labels from closed sets and
a readiness answer that does not broadcast to the workers per call.

Client addresses are real: loopback has all of 127.0.0.0/8, and each client binds its own.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import urllib3

from bench.auth_flood import login_from
from deploy.stack import Stack, free_port
from pipelines.registry.auth import ChecksBusy, CheckSlots, Htpasswd, load_htpasswd
from pipelines.registry.throttle import Backoff, LoginThrottle, TooManyAttempts, client_key
from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack
from tests.registry.test_auth import (
    SERVICE,
    Api,
    auth_api,
    error_code,
    push_real_image,
    write_htpasswd,
)

Response = urllib3.BaseHTTPResponse
LONG = "p" * 72 + "-and-what-bcrypt-never-reads"
USERS = {
    "alice": "alice-Pa55!word",
    "bob": "bob-hunter2-secret",
    "carol": "carol-correct-horse",
    "dave": "dave-battery-staple",
    "long": LONG,
}
FREE = 3


def htpasswd_accepts(path: Path, user: str, password: str) -> bool:
    """What Apache's own `htpasswd -v` says of a password."""
    done = subprocess.run(["htpasswd", "-vbB", str(path), user, password], capture_output=True)
    return done.returncode == 0


def credentials(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --------------------------------------------------------------------------- htpasswd
@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    write_htpasswd(path, USERS)
    return path


def test_long_passwords_count_their_first_72_bytes_as_apache_does(users_file: Path) -> None:
    users = Htpasswd(users_file)
    candidates = [LONG, LONG[:72], LONG[:72] + "x", LONG[:71], "é" * 40, LONG + "é"]
    for candidate in candidates:
        expected = htpasswd_accepts(users_file, "long", candidate)
        assert users.verify("long", candidate) is expected, candidate
    assert htpasswd_accepts(users_file, "long", LONG[:72] + "x")  # Apache's own verdict
    assert not users.verify("long", LONG[:71])


def test_a_missing_htpasswd_file_denies_everyone(users_file: Path) -> None:
    users = Htpasswd(users_file)
    assert users.verify("alice", USERS["alice"])
    saved = users_file.read_bytes()
    users_file.unlink()
    assert not users.remembered("alice", USERS["alice"])
    assert not users.verify("alice", USERS["alice"])
    users_file.write_bytes(saved)
    assert users.verify("alice", USERS["alice"])


def test_a_malformed_bcrypt_entry_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text("u:$2y$05$too-short\n")
    with pytest.raises(ValueError, match="bcrypt"):
        load_htpasswd(path)


# --------------------------------------------------------------------------- throttle
@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis[bytes]]:
    with Stack(tmp_path_factory.mktemp("redis")) as stack:
        yield redis.Redis.from_url(stack.start_redis(free_port()))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def fail(throttle: LoginThrottle, address: str, user: str) -> int | None:
    """One wrong password: None if it was checked, else the Retry-After it got."""
    try:
        throttle.charge(address, user)
    except TooManyAttempts as refused:
        return refused.retry_after
    return None


def test_backoff_per_client_and_per_user(own_redis: redis.Redis[bytes]) -> None:
    own_redis.flushdb()
    clock = Clock()
    throttle = LoginThrottle(own_redis, Backoff(free_failures=FREE, max_seconds=60), clock)
    checked = [fail(throttle, "10.0.0.1", f"nobody{n}") for n in range(FREE + 1)]
    assert checked == [None] * (FREE + 1)  # the last one starts the backoff
    assert fail(throttle, "10.0.0.1", "someone-else") == 4  # the client waits, whoever it names
    throttle.charge("10.0.0.2", "someone-else")  # another client does not
    for n in range(FREE + 1):
        throttle.charge(f"10.1.0.{n}", "bob")  # one user guessed from many addresses
    with pytest.raises(TooManyAttempts) as refused:
        throttle.charge("10.9.9.9", "bob")
    assert refused.value.retry_after == 4
    clock.now += 4
    assert fail(throttle, "10.0.0.1", "x") is None  # the wait is over; the next doubles it
    assert fail(throttle, "10.0.0.1", "y") == 8
    clock.now += 8
    assert fail(throttle, "10.0.0.1", "z") is None and fail(throttle, "10.0.0.1", "w") == 16


def test_successes_do_not_count(own_redis: redis.Redis[bytes]) -> None:
    own_redis.flushdb()
    throttle = LoginThrottle(own_redis, Backoff(free_failures=FREE, max_seconds=60), Clock())
    for _ in range(3 * FREE):
        throttle.charge("10.0.0.1", "alice")
        throttle.succeeded("10.0.0.1", "alice")
    left = sorted(key.decode().split(":")[3] for key in own_redis.keys("dh:auth:*"))
    assert left == ["known"]  # no count: only the mark that alice logs in from there


def test_a_guessed_user_still_logs_in_where_they_did_before(
    own_redis: redis.Redis[bytes],
) -> None:
    own_redis.flushdb()
    throttle = LoginThrottle(own_redis, Backoff(free_failures=FREE, max_seconds=60), Clock())
    throttle.charge("10.0.0.1", "carol")
    throttle.succeeded("10.0.0.1", "carol")  # carol works from 10.0.0.1
    for n in range(FREE + 1):
        throttle.charge(f"10.2.0.{n}", "carol")  # guesses at her name from elsewhere
    with pytest.raises(TooManyAttempts):
        throttle.charge("10.3.0.1", "carol")  # a new address waits
    throttle.charge("10.0.0.1", "carol")  # hers does not
    throttle.succeeded("10.0.0.1", "carol")
    for n in range(FREE + 1):
        assert fail(throttle, "10.0.0.1", f"other{n}") is None
    assert fail(throttle, "10.0.0.1", "carol") == 4  # her address's own count still holds


def test_concurrent_guesses_reach_bcrypt_at_most_free_plus_one(
    own_redis: redis.Redis[bytes],
) -> None:
    own_redis.flushdb()
    throttle = LoginThrottle(own_redis, Backoff(free_failures=5, max_seconds=60), Clock())
    with ThreadPoolExecutor(64) as pool:
        outcomes = list(pool.map(lambda n: fail(throttle, "10.0.0.7", f"u{n}"), range(64)))
    assert outcomes.count(None) == 5 + 1


def test_ipv6_clients_count_by_their_64() -> None:
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"


# ------------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hostile")
    write_htpasswd(directory / "htpasswd", USERS)
    (directory / "token.pem").write_bytes(
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "ed25519"], capture_output=True, check=True
        ).stdout
    )
    return directory


@contextmanager
def api_on_own_users(
    live: LiveStack, hostile: Path, tmp_path: Path, env: dict[str, str]
) -> Iterator[tuple[Api, Path]]:
    """An API with `env` on its own copy of the users, its throttle counts emptied."""
    users = tmp_path / "htpasswd"
    shutil.copy(hostile / "htpasswd", users)
    env = {**env, "DUPHUNTER_HTPASSWD": str(users), "DUPHUNTER_AUTH_FREE_FAILURES": str(FREE)}
    for key in live.registry.index.redis.scan_iter("dh:auth:failures:*"):
        live.registry.index.redis.delete(key)
    with auth_api(live, env) as started:
        yield started, users


@pytest.fixture
def api(live: LiveStack, hostile: Path, tmp_path: Path) -> Iterator[tuple[Api, Path]]:
    env = {"DUPHUNTER_AUTH": "token", "DUPHUNTER_TOKEN_KEY": str(hostile / "token.pem")}
    with api_on_own_users(live, hostile, tmp_path, env) as started:
        yield started


@pytest.fixture
def basic_api(live: LiveStack, hostile: Path, tmp_path: Path) -> Iterator[tuple[Api, Path]]:
    with api_on_own_users(live, hostile, tmp_path, {"DUPHUNTER_AUTH": "htpasswd"}) as started:
        yield started


def token_for(api: Api, authorization: str | None, address: str = "127.0.0.1") -> Response:
    client = RegistryClient(api.url, authorization, address)
    return client.request("GET", "/auth/token", service=SERVICE, scope="repository:x/y:pull")


def test_long_password_logs_in_at_v2_and_at_the_token_endpoint(
    basic_api: tuple[Api, Path], api: tuple[Api, Path]
) -> None:
    basic_server, _ = basic_api
    for password in (LONG, LONG[:72] + "anything"):
        assert basic_server.call("GET", "/v2/", credentials("long", password)).status == 200
        assert token_for(api[0], credentials("long", password)).status == 200
    assert basic_server.call("GET", "/v2/", credentials("long", LONG[:71])).status == 401
    assert token_for(api[0], credentials("long", LONG[:71])).status == 401


def test_removing_the_file_or_a_user_locks_them_out(api: tuple[Api, Path]) -> None:
    server, users = api
    alice = credentials("alice", USERS["alice"])
    response = token_for(server, alice)
    assert response.status == 200
    token = json.loads(response.data)["token"]
    bearer = f"Bearer {token}"
    assert server.call("GET", "/v2/", bearer).status == 200
    saved = users.read_text()
    users.write_text("".join(line + "\n" for line in saved.splitlines() if "alice" not in line))
    assert server.call("GET", "/v2/", bearer).status == 401  # her token is revoked
    assert token_for(server, alice).status == 401
    users.write_text(saved)
    assert server.call("GET", "/v2/", bearer).status == 200
    users.unlink()
    assert token_for(server, alice).status == 401  # remembered credentials count no more
    assert server.call("GET", "/v2/", bearer).status == 401


def assert_too_many(response: Response) -> None:
    assert response.status == 429, (response.status, response.data)
    assert error_code(response) == "TOOMANYREQUESTS"
    assert int(response.headers["Retry-After"]) >= 1


def test_throttle_per_client_and_per_user_over_http(basic_api: tuple[Api, Path]) -> None:
    server, _ = basic_api
    alice = credentials("alice", USERS["alice"])
    cached = RegistryClient(server.url, alice, "127.0.3.1")
    assert cached.request("GET", "/v2/").status == 200  # alice logs in before the attack
    # one address, many names: the (FREE + 1)th wrong password starts its backoff
    guesser = RegistryClient(server.url, source_address="127.0.1.1")
    for n in range(FREE + 1):
        wrong = credentials(f"mallory{n}", "guess")
        assert guesser.request("GET", "/v2/", headers={"Authorization": wrong}).status == 401
    bob = credentials("bob", USERS["bob"])
    assert_too_many(guesser.request("GET", "/v2/", headers={"Authorization": bob}))
    assert RegistryClient(server.url, bob, "127.0.3.2").request("GET", "/v2/").status == 200
    # one name, many addresses: carol waits wherever she logs in from, dave does not
    for n in range(FREE + 1):
        elsewhere = RegistryClient(server.url, credentials("carol", "guess"), f"127.0.2.{n + 1}")
        assert elsewhere.request("GET", "/v2/").status == 401
    honest_carol = RegistryClient(server.url, credentials("carol", USERS["carol"]), "127.0.3.3")
    assert_too_many(honest_carol.request("GET", "/v2/"))
    dave = RegistryClient(server.url, credentials("dave", USERS["dave"]), "127.0.3.4")
    assert dave.request("GET", "/v2/").status == 200
    # credentials verified before the attack pass, from the guesser's address too
    assert cached.request("GET", "/v2/").status == 200
    assert guesser.request("GET", "/v2/", headers={"Authorization": alice}).status == 200


def test_throttle_at_the_token_endpoint(api: tuple[Api, Path]) -> None:
    server, _ = api
    for n in range(FREE + 1):
        assert token_for(server, credentials(f"eve{n}", "guess"), "127.0.4.1").status == 401
    assert_too_many(token_for(server, credentials("alice", USERS["alice"]), "127.0.4.1"))
    post = RegistryClient(server.url, source_address="127.0.4.1").request(
        "POST", "/auth/token", b"grant_type=password&username=alice&password=x&service=duphunter",
        {"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert_too_many(post)
    assert token_for(server, credentials("alice", USERS["alice"]), "127.0.4.2").status == 200


def flood(url: str, stop: threading.Event, seen: Counter[int], lock: threading.Lock) -> None:
    """Wrong passwords, each from a new address and connection, until `stop`: half against
    alice, half against names that do not exist."""
    rng = random.Random()
    while not stop.is_set():
        address = f"127.{rng.randrange(100, 200)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        user = "alice" if rng.random() < 0.5 else f"ghost{rng.randrange(10**6)}"
        status = login_from(url, address, {"Authorization": credentials(user, "guess")}, 30.0)
        with lock:
            seen[status] += 1


def test_an_honest_user_pushes_and_pulls_through_a_flood_of_wrong_logins(
    basic_api: tuple[Api, Path],
) -> None:
    server, _ = basic_api
    alice = RegistryClient(server.url, credentials("alice", USERS["alice"]), "127.0.5.1")
    assert alice.request("GET", "/v2/").status == 200
    stop, lock, seen = threading.Event(), threading.Lock(), Counter[int]()
    with ThreadPoolExecutor(64) as pool:
        flooders = [pool.submit(flood, server.url, stop, seen, lock) for _ in range(64)]
        try:
            while sum(seen.values()) < 200:
                time.sleep(0.05)
            for round_ in range(3):
                repo = f"flood/app-{uuid.uuid4().hex[:8]}"
                digest = push_real_image(alice, repo, f"v{round_}")
                manifest = alice.request(
                    "GET", f"/v2/{repo}/manifests/{digest}",
                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
                )  # fmt: skip
                assert manifest.status == 200 and sha256(manifest.data) == digest
                for layer in json.loads(manifest.data)["layers"]:
                    blob = alice.request("GET", f"/v2/{repo}/blobs/{layer['digest']}")
                    assert blob.status == 200 and sha256(blob.data) == layer["digest"]
        finally:
            stop.set()
            for flooder in flooders:
                flooder.result()
    assert set(seen) <= {401, 429}, seen  # never a 500, never let in, never dropped
    assert seen[429] > 0 and seen[401] > 0, seen


# ------------------------------------------------------------------ open endpoints
def http_series(client: RegistryClient) -> set[str]:
    """The duphunter_http_* series of /metrics, by name and labels (values dropped)."""
    text = client.request("GET", "/metrics").data.decode()
    return {
        line.rsplit(" ", 1)[0]
        for line in text.splitlines()
        if line.startswith("duphunter_http_") and "{" in line
    }


def test_invented_methods_add_no_series(client: RegistryClient) -> None:
    for path in ("/v2/", "/no/such/route"):
        assert client.request("BREW", path).status in (404, 405)
    http_series(client)  # /metrics' own series appear from its second answer on
    before = http_series(client)
    assert any('method="other"' in series for series in before), before
    for n in range(300):
        response = client.request(f"X{n:03d}METHOD", "/v2/" if n % 2 else "/no/such/route")
        assert response.status in (404, 405)
    after = http_series(client)
    assert after == before, sorted(after - before)[:5]


class PidboxPublishes:
    """Counts the broadcasts to the workers' control mailboxes (Redis MONITOR)."""

    def __init__(self, client: redis.Redis[bytes]) -> None:
        self.client = client
        self.count = 0
        self.marker = f"end-of-watch-{uuid.uuid4().hex}"
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        with self.client.monitor() as monitor:
            self.started.set()
            for command in monitor.listen():
                text = str(command.get("command", ""))
                if self.marker in text:
                    return
                if text.upper().startswith("PUBLISH") and "pidbox" in text:
                    self.count += 1

    def __enter__(self) -> PidboxPublishes:
        self.thread.start()
        self.started.wait(10)
        time.sleep(0.2)
        return self

    def __exit__(self, *_: object) -> None:
        self.client.echo(self.marker)
        self.thread.join(30)


def test_readiness_answers_without_a_broadcast_per_call(
    live: LiveStack, client: RegistryClient
) -> None:
    first = json.loads(client.request("GET", "/api/v1/ready").data)
    assert "queues" in first["checks"]
    backends = json.loads(client.request("GET", "/api/v1/ready", scope="backends").data)
    assert set(backends["checks"]) == {"redis", "s3", "encoders"}
    with PidboxPublishes(live.registry.index.redis) as broadcasts:
        for _ in range(40):
            response = client.request("GET", "/api/v1/ready")
            assert response.status in (200, 503)
            assert "queues" in json.loads(response.data)["checks"]
    assert broadcasts.count <= 4, broadcasts.count  # the API's 2 processes, a refresh or two


def test_bcrypt_slots_refuse_rather_than_queue(users_file: Path) -> None:
    """One check running and one waiting take every place: the next is refused at once,
    unless it comes from where its user logged in before (places of its own)."""
    slots = CheckSlots(1)
    users = Htpasswd(users_file, slots)
    taken = [slots._admitted.acquire(blocking=False) for _ in range(2)]
    assert taken == [True, True]
    with pytest.raises(ChecksBusy):
        users.check("alice", USERS["alice"])
    assert users.check("alice", USERS["alice"], known=lambda: True)
    assert slots._reserved.acquire(blocking=False)
    with pytest.raises(ChecksBusy):
        users.check("alice", USERS["alice"], known=lambda: True)
    slots._reserved.release()
    for _ in taken:
        slots._admitted.release()
    assert users.check("alice", USERS["alice"])
