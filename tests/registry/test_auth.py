"""Authentication and authorization, against real API processes (the production gunicorn
command, on the live stack's Redis and S3) started with auth on: htpasswd Basic auth,
bearer tokens from the built-in endpoint and from an external issuer, the policy's
per-repository permissions, anonymous pull, the admin API, secrets kept out of the access
log, TLS through gunicorn, real clients (skopeo, podman) logging in, pushing and pulling,
and the conformance expectations with auth on.

Every user's rights are written down once (EXPECTED) and checked for every verb and
repository, through Basic credentials and through tokens.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import io
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from deploy import services
from deploy.stack import REPO_ROOT, VENV_BIN, free_port, wait_until
from pipelines.registry.auth import (
    Htpasswd,
    Permissions,
    Policy,
    ReloadingFile,
    load_policy,
    parse_policy,
)
from pipelines.registry.globs import glob_regex
from pipelines.registry.tokens import (
    BUILTIN_ISSUER,
    InvalidCredentials,
    TokenIssuer,
    TokenVerifier,
    load_private_key,
    load_public_keys,
    parse_scope,
)
from tests.client import OCI_CONFIG, OCI_MANIFEST, RegistryClient, image_manifest, sha256
from tests.clients.conformance import (
    build_data,
    run_discovery,
    run_management,
    run_pull,
    run_push,
)
from tests.conftest import LiveStack
from tests.real_clients import Podman, private_podman

Response = urllib3.BaseHTTPResponse

PASSWORDS = {
    "alice": "alice-Pa55!word",
    "bob": "bob-hunter2-secret",
    "carol": "carol:has a colon",
    "dave": "dave-s3cr3t-pw",
    "conformance": "conformance-pw-77",
}
POLICY = """
groups:
  ops: [alice]
  devs: [bob, erin]
admins:
  groups: [ops]
rules:
  - repositories: ["team/*"]
    groups: [devs]
    actions: [pull, push]
  - repositories: ["team/*"]
    users: [dave]
    actions: [pull]
  - repositories: ["**"]
    groups: [ops]
    actions: ["*"]
  - repositories: ["carol/**"]
    users: [carol]
    actions: [pull, push, delete]
  - repositories: ["test/**", "conformance-*"]
    users: [conformance]
    actions: [pull, push, delete]
"""
ALL = frozenset({"pull", "push", "delete"})
# (user, top-level namespace) -> what the policy lets them do; anything absent: nothing
EXPECTED: dict[tuple[str, str], frozenset[str]] = {
    ("alice", "team"): ALL,
    ("alice", "carol"): ALL,
    ("alice", "other"): ALL,
    ("bob", "team"): frozenset({"pull", "push"}),
    ("dave", "team"): frozenset({"pull"}),
    ("carol", "carol"): ALL,
}
USERS = ("alice", "bob", "carol", "dave")
NAMESPACES = ("team", "carol", "other")
SERVICE = "duphunter"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
EXTERNAL_ISSUER = "external-issuer"


def basic(user: str, password: str | None = None) -> str:
    secret = PASSWORDS[user] if password is None else password
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


def challenge_fields(response: Response) -> tuple[str, dict[str, str]]:
    header = str(response.headers.get("WWW-Authenticate") or "")
    scheme, _, rest = header.partition(" ")
    return scheme, dict(re.findall(r'(\w+)="([^"]*)"', rest))


def error_code(response: Response) -> str:
    return str(json.loads(response.data)["errors"][0]["code"])


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def granted(token: str) -> set[tuple[str, str, str]]:
    return {
        (entry["type"], entry["name"], action)
        for entry in claims_of(token)["access"]
        for action in entry["actions"]
    }


TERMINAL = ("intact", "deduplicated")


@pytest.fixture(scope="module", autouse=True)
def settled(live: LiveStack) -> Iterator[None]:
    """Leave no ingest or retirement of this module's layers running: a module run after
    it may assert that byte counters stand still (tests/ingest/test_bad_input.py)."""
    yield
    wait_until(lambda: quiet(live), "this module's ingests and retirements", timeout=300)


def quiet(live: LiveStack) -> bool:
    def snapshot() -> tuple[dict[str, int], dict[str, dict[str, str]]]:
        return live.registry.index.counters(), live.registry.index.layer_summaries(("state",))

    before = snapshot()
    counters, layers = before
    if counters.get("retiring_bytes", 0) or any(
        layer["state"] not in TERMINAL for layer in layers.values()
    ):
        return False
    time.sleep(2)
    return snapshot() == before


# the secrets: users, policy, keys
@dataclass(frozen=True)
class AuthFiles:
    directory: Path
    htpasswd: Path
    policy: Path
    token_key: Path  # the built-in issuer's Ed25519 key
    external_key: rsa.RSAPrivateKey  # the external issuer's (its public half is trusted)
    external_public: Path
    stranger_key: ed25519.Ed25519PrivateKey  # trusted by nobody


def write_htpasswd(path: Path, passwords: dict[str, str]) -> None:
    """Real `htpasswd -B` entries (Debian's apache2-utils)."""
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd is installed by `make test` (deploy/system-deps.sh: apache2-utils)")
    for number, (user, password) in enumerate(passwords.items()):
        flags = "-cBi" if number == 0 else "-Bi"
        subprocess.run(
            ["htpasswd", flags, str(path), user],
            input=password,
            text=True,
            check=True,
            capture_output=True,
        )


def pem_private(
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> AuthFiles:
    directory = tmp_path_factory.mktemp("auth")
    htpasswd = directory / "htpasswd"
    write_htpasswd(htpasswd, PASSWORDS)
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    token_key = directory / "token.pem"
    token_key.write_bytes(pem_private(ed25519.Ed25519PrivateKey.generate()))
    external = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    external_public = directory / "external.pub.pem"
    external_public.write_bytes(
        external.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return AuthFiles(
        directory,
        htpasswd,
        policy,
        token_key,
        external,
        external_public,
        ed25519.Ed25519PrivateKey.generate(),
    )


# API processes with auth on
@dataclass
class Api:
    url: str
    log: Path
    client: RegistryClient

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1]

    def call(
        self,
        method: str,
        path: str,
        authorization: str | None = None,
        body: bytes | None = None,
        /,
        **fields: str,
    ) -> Response:
        headers = {"Authorization": authorization} if authorization else {}
        return self.client.request(method, path, body, headers, **fields)

    def token(self, user: str | None, *scopes: str) -> str:
        response = self.call(
            "GET",
            "/auth/token",
            basic(user) if user else None,
            service=SERVICE,
            **({"scope": " ".join(scopes)} if scopes else {}),
        )
        assert response.status == 200, response.data
        return str(json.loads(response.data)["token"])


@contextlib.contextmanager
def auth_api(
    live: LiveStack, env: dict[str, str], scheme: str = "http", ca: Path | None = None
) -> Iterator[Api]:
    """The production API command (deploy/services.py) with these settings; "{url}" in
    a value stands for the API's own URL."""
    listen = f"127.0.0.1:{free_port()}"
    url = f"{scheme}://{listen}"
    log = live.workdir / f"api-auth-{listen.replace(':', '-')}.log"
    settings = {key: value.replace("{url}", url) for key, value in env.items()}
    with log.open("ab") as output:
        process = subprocess.Popen(
            services.api_command(VENV_BIN, listen, 1, 8),
            cwd=REPO_ROOT,
            env={
                **live.stack.env,
                "DUPHUNTER_SPOOL_DIR": str(live.workdir / f"spool-{listen}"),
                **settings,
            },
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        client = RegistryClient(url)
        if ca is not None:
            client.http = urllib3.PoolManager(
                retries=False, timeout=urllib3.Timeout(total=120), ca_certs=str(ca)
            )
        wait_until(lambda: client.request("GET", "/api/v1/health").status == 200, "auth API")
        yield Api(url, log, client)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def basic_env(files: AuthFiles, anonymous_pull: bool = False) -> dict[str, str]:
    return {
        "DUPHUNTER_AUTH": "htpasswd",
        "DUPHUNTER_HTPASSWD": str(files.htpasswd),
        "DUPHUNTER_AUTH_POLICY": str(files.policy),
        "DUPHUNTER_ANONYMOUS_PULL": "true" if anonymous_pull else "false",
        # These tests send wrong credentials on purpose, all from 127.0.0.1; the throttle
        # has tests of its own (tests/registry/test_auth_hostile.py).
        "DUPHUNTER_AUTH_FREE_FAILURES": "1000000",
    }


def token_env(files: AuthFiles, anonymous_pull: bool = False) -> dict[str, str]:
    return {
        **basic_env(files, anonymous_pull),
        "DUPHUNTER_AUTH": "token",
        "DUPHUNTER_TOKEN_KEY": str(files.token_key),
    }


@pytest.fixture(scope="module")
def basic_api(live: LiveStack, files: AuthFiles) -> Iterator[Api]:
    with auth_api(live, basic_env(files)) as api:
        yield api


@pytest.fixture(scope="module")
def public_api(live: LiveStack, files: AuthFiles) -> Iterator[Api]:
    """htpasswd, anonymous pull on."""
    with auth_api(live, basic_env(files, anonymous_pull=True)) as api:
        yield api


@pytest.fixture(scope="module")
def token_api(live: LiveStack, files: AuthFiles) -> Iterator[Api]:
    """Tokens from the built-in endpoint and from the external issuer; no anonymous pull."""
    env = {
        **token_env(files),
        "DUPHUNTER_TOKEN_ISSUER": EXTERNAL_ISSUER,
        "DUPHUNTER_TOKEN_PUBLIC_KEY": str(files.external_public),
        "DUPHUNTER_TOKEN_REALM": "{url}/auth/token",
    }
    with auth_api(live, env) as api:
        yield api


@pytest.fixture(scope="module")
def public_token_api(live: LiveStack, files: AuthFiles) -> Iterator[Api]:
    """Built-in tokens, anonymous pull on, the realm derived from the request, and
    loopback as a trusted proxy."""
    env = {**token_env(files, anonymous_pull=True), "DUPHUNTER_TRUSTED_PROXIES": "127.0.0.1/32"}
    with auth_api(live, env) as api:
        yield api


# content: one image per namespace (two for carol), pushed by alice
def layer_tar_gz(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzipped tar layer and its diff_id (the tar's digest), as podman checks them."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for path, content in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(content), 0o644, 1700000000
            archive.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0), sha256(raw.getvalue())


def push_real_image(client: RegistryClient, repo: str, tag: str = "v1") -> str:
    layer, diff_id = layer_tar_gz({"app/data.bin": os.urandom(50_000), "etc/motd": b"hi\n"})
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    manifest = image_manifest(
        client.push_blob(repo, config), len(config), [(client.push_blob(repo, layer), len(layer))]
    )
    manifest["config"]["mediaType"] = OCI_CONFIG
    response = client.push_manifest(repo, tag, manifest)
    assert response.status == 201, response.data
    return str(response.headers["Docker-Content-Digest"])


@pytest.fixture(scope="module")
def repos(basic_api: Api) -> dict[str, str]:
    """namespace -> a repository holding an image tagged v1 ("carol2": carol's second)."""
    alice = RegistryClient(basic_api.url, basic("alice"))
    suffix = uuid.uuid4().hex[:10]
    names = {space: f"{space}/app-{suffix}" for space in NAMESPACES}
    names["carol2"] = f"carol/second-{suffix}"
    for name in names.values():
        push_real_image(alice, name)
    return names


def namespace(repo: str) -> str:
    return repo.split("/", 1)[0]


# one request per verb; what "allowed" answers
def attempt(api: Api, verb: str, repo: str, authorization: str | None) -> Response:
    if verb == "pull":
        return api.call("GET", f"/v2/{repo}/manifests/v1", authorization)
    if verb == "push":
        return api.call("POST", f"/v2/{repo}/blobs/uploads/", authorization, b"")
    missing = sha256(os.urandom(16))  # allowed: 404, and nothing is deleted
    return api.call("DELETE", f"/v2/{repo}/manifests/{missing}", authorization)


ALLOWED_STATUS = {"pull": 200, "push": 202, "delete": 404}


def outcome(response: Response, verb: str) -> str:
    if response.status == ALLOWED_STATUS[verb]:
        return "allowed"
    if response.status == 403 and error_code(response) == "DENIED":
        return "denied"
    if response.status == 401 and error_code(response) == "UNAUTHORIZED":
        return "challenged"
    return f"unexpected {response.status} {response.data[:200]!r}"


def mismatches(
    api: Api,
    repos: dict[str, str],
    authorization: Callable[[str, str], str | None],
    refused: str,
) -> list[str]:
    """Every verb on every namespace against EXPECTED; `authorization(repo)` is the header
    a user sends there, `refused` what they get where they may not."""
    wrong = []
    for user in USERS:
        for space in NAMESPACES:
            repo = repos[space]
            for verb in sorted(ALL):
                want = "allowed" if verb in EXPECTED.get((user, space), ()) else refused
                got = outcome(attempt(api, verb, repo, authorization(user, repo)), verb)
                if got != want:
                    wrong.append(f"{user} {verb} {repo}: {got}, expected {want}")
    return wrong


# --------------------------------------------------------------------------- domain rules


def test_globs_stay_within_a_component_unless_doubled() -> None:
    assert glob_regex("team/*").fullmatch("team/app")
    assert not glob_regex("team/*").fullmatch("team/app/sub")
    assert glob_regex("team/**").fullmatch("team/app/sub")
    assert not glob_regex("team/*").fullmatch("teams/app")
    assert glob_regex("a.b/?x").fullmatch("a.b/yx") and not glob_regex("a.b/?x").fullmatch("aXb/yx")


def test_policy_grants_add_up_and_deny_the_rest() -> None:
    import yaml

    policy = parse_policy(yaml.safe_load(POLICY))
    permissions = Permissions(lambda: policy, anonymous_pull=False)
    for user in USERS:
        for space in NAMESPACES:
            repo = f"{space}/x"
            allowed = {a for a in ALL if permissions.may(user, ("repository", repo, a))}
            assert allowed == EXPECTED.get((user, space), frozenset()), (user, repo)
    assert permissions.may("erin", ("repository", "team/x", "push"))  # by group alone
    assert not permissions.may("bob", ("repository", "team/x/deep", "pull"))
    assert policy.is_admin("alice") and not policy.is_admin("bob")
    assert not permissions.may(None, ("repository", "team/x", "pull"))
    anonymous = Permissions(lambda: policy, anonymous_pull=True)
    assert anonymous.may(None, ("repository", "team/x", "pull"))
    assert not anonymous.may(None, ("repository", "team/x", "push"))
    asked = parse_scope("repository:team/x:pull,push,delete") + parse_scope("registry:admin:*")
    assert permissions.grant("bob", asked) == [
        ("repository", "team/x", "pull"),
        ("repository", "team/x", "push"),
    ]


def test_open_policy_when_no_file_trusts_every_known_user() -> None:
    permissions = Permissions(Policy.open, anonymous_pull=False)
    assert permissions.may("anyone", ("repository", "a/b/c", "delete"))
    assert permissions.may("anyone", ("registry", "admin", "*"))
    assert not permissions.may(None, ("repository", "a/b", "pull"))


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ({"rules": [{"repositories": ["a/*"], "users": ["x"], "actions": ["pul"]}]}, "actions"),
        (
            {"rules": [{"repositories": ["a/*"], "groups": ["nope"], "actions": ["pull"]}]},
            "undefined",
        ),
        ({"rules": [{"repository": ["a/*"], "actions": ["pull"]}]}, "unknown keys"),
        ({"admins": {"user": ["x"]}}, "unknown keys"),
        ({"rules": [{"users": ["x"], "actions": ["pull"]}]}, "at least one pattern"),
        ({"groups": {"g": "alice"}}, "list of names"),
    ],
)
def test_policy_mistakes_are_refused_by_name(document: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_policy(document)


def test_htpasswd_follows_the_file(tmp_path: Path) -> None:
    """A changed password takes effect at once, though successful checks are remembered."""
    path = tmp_path / "htpasswd"
    write_htpasswd(path, {"u": "first-password"})
    users = Htpasswd(path)
    assert users.verify("u", "first-password")
    assert users.verify("u", "first-password")  # remembered
    assert not users.verify("u", "wrong") and not users.verify("nobody", "first-password")
    write_htpasswd(path, {"u": "second-password"})
    stamp = time.time_ns() + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))
    assert not users.verify("u", "first-password")
    assert users.verify("u", "second-password")


def test_a_broken_edit_keeps_the_last_good_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    rule = {"repositories": ["a/*"], "users": ["u"], "actions": ["pull"]}
    path.write_text(json.dumps({"rules": [rule]}))
    policy = ReloadingFile(path, load_policy)
    assert policy.get().actions("u", "a/b") == {"pull"}
    path.write_text(json.dumps({"rules": [{**rule, "actions": ["pull", "pussh"]}]}))
    assert policy.get().actions("u", "a/b") == {"pull"}
    path.write_text(json.dumps({"rules": [{**rule, "actions": ["pull", "push"]}]}))
    stamp = time.time_ns() + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))
    assert policy.get().actions("u", "a/b") == {"pull", "push"}
    path.unlink()
    assert policy.get().actions("u", "a/b") == {"pull", "push"}


@pytest.mark.parametrize(
    "make_key",
    [
        ed25519.Ed25519PrivateKey.generate,
        lambda: rsa.generate_private_key(65537, 2048),
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
    ids=["ed25519", "rsa", "p256", "p384"],
)
def test_tokens_for_every_key_kind(make_key: Callable[[], Any], tmp_path: Path) -> None:
    key = make_key()
    (tmp_path / "key.pem").write_bytes(pem_private(key))
    issuer = TokenIssuer(load_private_key(tmp_path / "key.pem"), SERVICE, 60)
    token = issuer.issue("u", [("repository", "a/b", "pull")]).token
    verifier = TokenVerifier({BUILTIN_ISSUER: [key.public_key()]}, SERVICE)
    assert verifier.verify(token).grants == frozenset({("repository", "a/b", "pull")})
    stranger = TokenVerifier({BUILTIN_ISSUER: [make_key().public_key()]}, SERVICE)
    with pytest.raises(InvalidCredentials):
        stranger.verify(token)


def test_an_issuer_certificate_bundle_is_trusted(tmp_path: Path) -> None:
    """DUPHUNTER_TOKEN_PUBLIC_KEY may be certificates, as Distribution's rootcertbundle."""
    cert, key_path = self_signed(tmp_path)
    other_cert, _ = self_signed(tmp_path / "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other_cert.read_bytes() + cert.read_bytes())
    issuer = TokenIssuer(load_private_key(key_path), SERVICE, 60)
    verifier = TokenVerifier({BUILTIN_ISSUER: load_public_keys(bundle)}, SERVICE)
    assert verifier.verify(issuer.issue(None, []).token).user is None


def test_htpasswd_refuses_entries_other_than_bcrypt(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text("u:$apr1$abc$def\n")  # htpasswd -m (MD5)
    with pytest.raises(ValueError, match="bcrypt"):
        Htpasswd(path)


# --------------------------------------------------------------------------- basic auth


def test_basic_auth_every_user_verb_and_repository(basic_api: Api, repos: dict[str, str]) -> None:
    wrong = mismatches(basic_api, repos, lambda user, _repo: basic(user), refused="denied")
    assert wrong == []


def test_basic_auth_challenges_without_or_with_bad_credentials(
    basic_api: Api, repos: dict[str, str]
) -> None:
    repo = repos["team"]
    for authorization in (
        None,
        basic("alice", "wrong"),
        basic("mallory", "x"),
        "Basic !!!",
        "Digest abc",
        "Bearer not-a-token",
    ):
        for verb in sorted(ALL):
            response = attempt(basic_api, verb, repo, authorization)
            assert outcome(response, verb) == "challenged", (authorization, verb)
            scheme, fields = challenge_fields(response)
            assert scheme == "Basic" and fields["realm"], response.headers
            assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    base = basic_api.call("GET", "/v2/")
    assert base.status == 401 and challenge_fields(base)[0] == "Basic"
    assert basic_api.call("GET", "/v2/", basic("dave")).status == 200


def test_anonymous_pull_when_on_and_only_pull(public_api: Api, repos: dict[str, str]) -> None:
    for space in NAMESPACES:
        repo = repos[space]
        assert outcome(attempt(public_api, "pull", repo, None), "pull") == "allowed"
        tags = public_api.call("GET", f"/v2/{repo}/tags/list")
        assert tags.status == 200 and json.loads(tags.data)["tags"] == ["v1"]
        for verb in ("push", "delete"):
            response = attempt(public_api, verb, repo, None)
            assert outcome(response, verb) == "challenged", (verb, repo)
    # wrong credentials are not taken for no credentials
    assert attempt(public_api, "pull", repos["team"], basic("bob", "wrong")).status == 401
    # a known user keeps the policy's limits
    assert outcome(attempt(public_api, "push", repos["other"], basic("bob")), "push") == "denied"
    catalog = json.loads(public_api.call("GET", "/v2/_catalog").data)["repositories"]
    assert set(repos.values()) <= set(catalog)


def catalog(api: Api, authorization: str | None, **query: str) -> Response:
    return api.call("GET", "/v2/_catalog", authorization, **query)


def test_catalog_lists_only_what_the_user_may_pull(basic_api: Api, repos: dict[str, str]) -> None:
    def names(user: str) -> set[str]:
        response = catalog(basic_api, basic(user))
        assert response.status == 200, response.data
        return set(json.loads(response.data)["repositories"])

    assert set(repos.values()) <= names("alice")
    carol = names("carol")
    assert {repos["carol"], repos["carol2"]} <= carol
    assert all(name.startswith("carol/") for name in carol), carol
    bob = names("bob")
    assert repos["team"] in bob and all(re.fullmatch(r"team/[^/]+", n) for n in bob), bob
    assert catalog(basic_api, None).status == 401
    # pages count visible repositories only
    first = catalog(basic_api, basic("carol"), n="1")
    page = json.loads(first.data)["repositories"]
    assert len(page) == 1 and page[0].startswith("carol/")
    assert 'rel="next"' in str(first.headers.get("Link"))
    rest = catalog(basic_api, basic("carol"), n="1000", last=page[0])
    following = json.loads(rest.data)["repositories"]
    assert following and all(n.startswith("carol/") and n > page[0] for n in following)


def test_mount_needs_pull_on_the_source(basic_api: Api, repos: dict[str, str]) -> None:
    """Without pull on `from`, a mount is an ordinary upload: nothing of the source shows."""
    alice = RegistryClient(basic_api.url, basic("alice"))
    secret_blob = alice.push_blob(repos["other"], os.urandom(1000))
    target = f"team/mount-{uuid.uuid4().hex[:8]}"
    query = urlencode({"mount": secret_blob, "from": repos["other"]})
    by_bob = basic_api.call("POST", f"/v2/{target}/blobs/uploads/?{query}", basic("bob"), b"")
    assert by_bob.status == 202, by_bob.data
    assert basic_api.call("HEAD", f"/v2/{target}/blobs/{secret_blob}", basic("alice")).status == 404
    by_alice = basic_api.call("POST", f"/v2/{target}/blobs/uploads/?{query}", basic("alice"), b"")
    assert by_alice.status == 201


def test_admin_api_needs_an_admin(basic_api: Api) -> None:
    for path in ("/api/v1/stats", "/api/v1/jobs/no-such-job"):
        anonymous = basic_api.call("GET", path)
        assert anonymous.status == 401 and challenge_fields(anonymous)[0] == "Basic"
        assert basic_api.call("GET", path, basic("bob")).status == 403
        assert basic_api.call("GET", path, basic("alice", "wrong")).status == 401
    assert basic_api.call("GET", "/api/v1/stats", basic("alice")).status == 200
    assert basic_api.call("GET", "/api/v1/jobs/no-such-job", basic("alice")).status == 404
    body = json.dumps({"repository": "team/x", "digest": sha256(b"x")}).encode()
    assert basic_api.call("POST", "/api/v1/jobs/ingest", basic("dave"), body).status == 403
    assert basic_api.call("POST", "/api/v1/jobs/reindex", None, b"{}").status == 401
    # liveness, readiness and metrics stay open (probes and scrapers carry no credentials)
    assert basic_api.call("GET", "/api/v1/health").status == 200
    assert basic_api.call("GET", "/api/v1/ready").status in (200, 503)
    assert basic_api.call("GET", "/metrics").status == 200


# --------------------------------------------------------------------------- tokens


def test_token_challenges_name_realm_service_and_scope(
    token_api: Api, repos: dict[str, str]
) -> None:
    repo = repos["team"]
    realm = f"{token_api.url}/auth/token"
    base = token_api.call("GET", "/v2/")
    assert base.status == 401
    assert challenge_fields(base) == ("Bearer", {"realm": realm, "service": SERVICE})
    scopes = {
        "pull": f"repository:{repo}:pull",
        "push": f"repository:{repo}:pull,push",
        "delete": f"repository:{repo}:delete",
    }
    for verb, scope in scopes.items():
        response = attempt(token_api, verb, repo, None)
        assert outcome(response, verb) == "challenged"
        assert challenge_fields(response) == (
            "Bearer",
            {"realm": realm, "service": SERVICE, "scope": scope},
        )
    admin = token_api.call("GET", "/api/v1/stats")
    assert challenge_fields(admin)[1]["scope"] == "registry:admin:*"
    listing = token_api.call("GET", "/v2/_catalog")
    assert challenge_fields(listing)[1]["scope"] == "registry:catalog:*"
    # Basic credentials are for the token endpoint only
    refused = token_api.call("GET", "/v2/", basic("alice"))
    assert refused.status == 401
    assert challenge_fields(refused)[1].get("error") == "invalid_token"


def test_token_endpoint_grants_what_the_policy_allows(
    token_api: Api, repos: dict[str, str]
) -> None:
    scopes = [f"repository:{repos[space]}:pull,push,delete" for space in NAMESPACES]
    for user in USERS:
        token = token_api.token(user, *scopes, "registry:catalog:*", "registry:admin:*")
        expected = {
            ("repository", repos[space], action)
            for space in NAMESPACES
            for action in EXPECTED.get((user, space), ())
        }
        expected.add(("registry", "catalog", "*"))
        if user == "alice":
            expected.add(("registry", "admin", "*"))
        assert granted(token) == expected, user
        claims = claims_of(token)
        assert claims["sub"] == user and claims["iss"] == BUILTIN_ISSUER
        assert claims["aud"] == SERVICE and claims["exp"] > time.time()
    assert granted(token_api.token(None, *scopes)) == set()  # anonymous pull is off here


def test_token_endpoint_answers(token_api: Api, repos: dict[str, str]) -> None:
    bad = token_api.call("GET", "/auth/token", basic("bob", "wrong"), service=SERVICE)
    assert bad.status == 401 and challenge_fields(bad)[0] == "Basic"
    assert token_api.call("GET", "/auth/token", basic("nobody", "x")).status == 401
    assert token_api.call("GET", "/auth/token", basic("bob"), service="other").status == 400
    response = token_api.call(
        "GET",
        "/auth/token",
        basic("bob"),
        service=SERVICE,
        scope=f"repository:{repos['team']}:pull",
    )
    body = json.loads(response.data)
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    issued = datetime.datetime.strptime(body["issued_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(issued.replace(tzinfo=datetime.UTC).timestamp() - time.time()) < 60
    assert response.headers["Cache-Control"] == "no-store"
    # several scope parameters, as Docker sends them; and OAuth2's password grant (containerd)
    two = token_api.client.request(
        "GET",
        "/auth/token?"
        + urlencode(
            [
                ("service", SERVICE),
                ("scope", f"repository:{repos['team']}:pull"),
                ("scope", f"repository:{repos['carol']}:pull"),
            ]
        ),
        headers={"Authorization": basic("alice")},
    )
    assert {name for _kind, name, _a in granted(json.loads(two.data)["token"])} == {
        repos["team"],
        repos["carol"],
    }
    form = urlencode(
        {
            "grant_type": "password",
            "username": "carol",
            "password": PASSWORDS["carol"],
            "service": SERVICE,
            "scope": f"repository:{repos['carol']}:push",
        }
    )
    posted = token_api.client.request(
        "POST", "/auth/token", form.encode(), {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert posted.status == 200, posted.data
    assert granted(json.loads(posted.data)["access_token"]) == {
        ("repository", repos["carol"], "push")
    }
    wrong_form = form.replace("colon", "semicolon")
    denied = token_api.client.request(
        "POST",
        "/auth/token",
        wrong_form.encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert denied.status == 401


def test_tokens_every_user_verb_and_repository(token_api: Api, repos: dict[str, str]) -> None:
    """Each user asks for everything on the repository; the token carries what they may
    do; beyond it the built-in issuer's subject gets 403, as the policy denies it."""

    def token_for(user: str, repo: str) -> str:
        return "Bearer " + token_api.token(user, f"repository:{repo}:pull,push,delete")

    assert mismatches(token_api, repos, token_for, refused="denied") == []


def test_token_for_another_repository_or_action(token_api: Api, repos: dict[str, str]) -> None:
    team, other = repos["team"], repos["other"]
    bob_pull = "Bearer " + token_api.token("bob", f"repository:{team}:pull")
    assert attempt(token_api, "pull", team, bob_pull).status == 200
    # bob may push here, but this token does not say so: get another one
    push = attempt(token_api, "push", team, bob_pull)
    assert push.status == 401
    assert challenge_fields(push)[1] == {
        "realm": f"{token_api.url}/auth/token",
        "service": SERVICE,
        "scope": f"repository:{team}:pull,push",
        "error": "insufficient_scope",
    }
    # another repository bob may pull: another token; one he may not: 403
    sibling = f"team/other-{uuid.uuid4().hex[:6]}"
    assert attempt(token_api, "pull", sibling, bob_pull).status == 401
    assert outcome(attempt(token_api, "pull", other, bob_pull), "pull") == "denied"
    assert outcome(attempt(token_api, "delete", team, bob_pull), "delete") == "denied"
    # anonymous tokens grant nothing here (anonymous pull off) and are never denied: 401
    anonymous = "Bearer " + token_api.token(None, f"repository:{team}:pull")
    assert attempt(token_api, "pull", team, anonymous).status == 401
    assert token_api.call("GET", "/v2/", anonymous).status == 200  # a valid token


def forged(key: Any, algorithm: str, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": BUILTIN_ISSUER,
        "sub": "alice",
        "aud": SERVICE,
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
        "access": [{"type": "repository", "name": "team/x", "actions": ["pull", "push", "delete"]}],
    }
    claims.update(overrides)
    return "Bearer " + jwt.encode(
        {k: v for k, v in claims.items() if v is not None}, key, algorithm=algorithm
    )


def test_bad_tokens_are_refused(token_api: Api, files: AuthFiles) -> None:
    own = serialization.load_pem_private_key(files.token_key.read_bytes(), None)
    good = forged(own, "EdDSA")
    assert token_api.call("GET", "/v2/team/x/tags/list", good).status == 404  # the control
    bad = {
        "expired": forged(own, "EdDSA", exp=int(time.time()) - 120, iat=int(time.time()) - 500),
        "not yet valid": forged(own, "EdDSA", nbf=int(time.time()) + 600),
        "another key": forged(files.stranger_key, "EdDSA"),
        "another service": forged(own, "EdDSA", aud="other-registry"),
        "unknown issuer": forged(own, "EdDSA", iss="someone-else"),
        "no expiry": forged(own, "EdDSA", exp=None),
        "external key, our name": forged(files.external_key, "RS256"),
        "unsigned": "Bearer "
        + jwt.encode(
            {"iss": BUILTIN_ISSUER, "aud": SERVICE, "exp": int(time.time()) + 60},
            "",
            algorithm="none",
        ),
        "malformed access": forged(own, "EdDSA", access={"team/x": "pull"}),
        "garbage": "Bearer abc.def.ghi",
    }
    for why, token in bad.items():
        response = token_api.call("GET", "/v2/team/x/tags/list", token)
        assert response.status == 401, why
        assert challenge_fields(response)[1].get("error") == "invalid_token", why


def test_external_issuer_tokens(token_api: Api, files: AuthFiles, repos: dict[str, str]) -> None:
    """The issuer's access claim is the authority: what it lacks is a 401 (ask it again)."""
    team = repos["team"]
    token = forged(
        files.external_key,
        "RS256",
        iss=EXTERNAL_ISSUER,
        sub="someone",
        access=[
            {"type": "repository", "name": team, "actions": ["pull"]},
            {"type": "registry", "name": "catalog", "actions": ["*"]},
        ],
    )
    assert attempt(token_api, "pull", team, token).status == 200
    for verb in ("push", "delete"):
        response = attempt(token_api, verb, team, token)
        assert response.status == 401 and challenge_fields(response)[1]["error"] == (
            "insufficient_scope"
        )
    assert attempt(token_api, "pull", repos["other"], token).status == 401
    listing = catalog(token_api, token)
    assert set(repos.values()) <= set(json.loads(listing.data)["repositories"])
    assert token_api.call("GET", "/api/v1/stats", token).status == 401
    admin = forged(
        files.external_key,
        "RS256",
        iss=EXTERNAL_ISSUER,
        sub="ops-bot",
        access=[{"type": "registry", "name": "admin", "actions": ["*"]}],
    )
    assert token_api.call("GET", "/api/v1/stats", admin).status == 200


def test_admin_api_with_tokens(token_api: Api) -> None:
    alice = "Bearer " + token_api.token("alice", "registry:admin:*")
    bob = "Bearer " + token_api.token("bob", "registry:admin:*")
    assert token_api.call("GET", "/api/v1/stats", alice).status == 200
    refused = token_api.call("GET", "/api/v1/stats", bob)
    assert refused.status == 403 and error_code(refused) == "DENIED"
    assert token_api.call("GET", "/api/v1/health").status == 200


def test_anonymous_tokens_pull_when_anonymous_pull_is_on(
    public_token_api: Api, repos: dict[str, str]
) -> None:
    team = repos["team"]
    token = public_token_api.token(None, f"repository:{team}:pull,push,delete")
    assert granted(token) == {("repository", team, "pull")}
    assert claims_of(token)["sub"] == ""
    assert attempt(public_token_api, "pull", team, "Bearer " + token).status == 200
    assert attempt(public_token_api, "pull", team, None).status == 200  # no token at all
    push = attempt(public_token_api, "push", team, "Bearer " + token)
    assert push.status == 401 and challenge_fields(push)[1]["error"] == "insufficient_scope"
    listing = catalog(
        public_token_api, "Bearer " + public_token_api.token(None, "registry:catalog:*")
    )
    assert set(repos.values()) <= set(json.loads(listing.data)["repositories"])


def test_realm_follows_a_trusted_proxy(public_token_api: Api) -> None:
    """Behind a TLS-terminating proxy listed in DUPHUNTER_TRUSTED_PROXIES, the challenge
    names the address clients used."""
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "registry.example.test"}
    response = public_token_api.client.request("GET", "/v2/", headers=forwarded)
    assert challenge_fields(response)[1]["realm"] == "https://registry.example.test/auth/token"
    plain = public_token_api.call("GET", "/v2/")
    assert challenge_fields(plain)[1]["realm"] == f"{public_token_api.url}/auth/token"


# --------------------------------------------------------------------------- operations


def run_cli(
    api: Api, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("DUPHUNTER_USER", "DUPHUNTER_PASSWORD")
    }
    return subprocess.run(
        [sys.executable, "-m", "api.cli", "--url", api.url, *args],
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("mode", ["basic_api", "token_api"])
def test_cli_sends_credentials_when_asked(mode: str, request: pytest.FixtureRequest) -> None:
    api: Api = request.getfixturevalue(mode)
    done = run_cli(
        api,
        "stats",
        "--json",
        env={"DUPHUNTER_USER": "alice", "DUPHUNTER_PASSWORD": PASSWORDS["alice"]},
    )
    assert done.returncode == 0, done.stderr
    assert "logical_bytes" in json.loads(done.stdout)
    flagged = run_cli(
        api, "--user", "alice", "stats", env={"DUPHUNTER_PASSWORD": PASSWORDS["alice"]}
    )
    assert flagged.returncode == 0, flagged.stderr
    nobody = run_cli(api, "stats")
    assert nobody.returncode == 1 and "DUPHUNTER_USER" in nobody.stderr
    bob = run_cli(
        api, "stats", env={"DUPHUNTER_USER": "bob", "DUPHUNTER_PASSWORD": PASSWORDS["bob"]}
    )
    assert bob.returncode == 1 and "403" in bob.stderr
    wrong = run_cli(api, "stats", env={"DUPHUNTER_USER": "alice", "DUPHUNTER_PASSWORD": "nope"})
    assert wrong.returncode == 1 and "401" in wrong.stderr
    for run in (done, flagged, nobody, bob, wrong):
        for secret in (PASSWORDS["alice"], PASSWORDS["bob"], "nope"):
            assert secret not in run.stdout + run.stderr


def test_access_log_keeps_no_secrets(basic_api: Api, token_api: Api, repos: dict[str, str]) -> None:
    """gunicorn logs each request with the Basic user name, never the password, the
    Authorization header or a token."""
    team = repos["team"]
    tokens = []
    for user in USERS:
        assert attempt(basic_api, "pull", team, basic(user)).status in (200, 403)
        token = token_api.token(user, f"repository:{team}:pull")
        tokens.append(token)
        assert attempt(token_api, "pull", team, "Bearer " + token).status in (200, 403)
    time.sleep(0.5)
    for api in (basic_api, token_api):
        log = api.log.read_text(errors="replace")
        assert f"/v2/{team}/manifests/v1" in log, "the access log is being written"
        assert "Authorization" not in log and "Bearer" not in log
        for user, password in PASSWORDS.items():
            assert password not in log
            assert basic(user).split()[1] not in log
        for token in tokens:
            assert token not in log and token.split(".")[2] not in log
    assert re.search(rf"alice .*GET /v2/{re.escape(team)}/manifests/v1", basic_api.log.read_text())


HTPASSWD_IN = {"DUPHUNTER_AUTH": "htpasswd", "DUPHUNTER_HTPASSWD": "{dir}/htpasswd"}


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"DUPHUNTER_AUTH": "htpasswd"}, "DUPHUNTER_HTPASSWD"),
        ({"DUPHUNTER_AUTH": "passwords"}, "choose one of"),
        ({"DUPHUNTER_AUTH": "token"}, "DUPHUNTER_TOKEN_KEY"),
        ({"DUPHUNTER_AUTH": "token", "DUPHUNTER_TOKEN_ISSUER": "x"}, "DUPHUNTER_TOKEN_PUBLIC_KEY"),
        ({**HTPASSWD_IN, "DUPHUNTER_AUTH_POLICY": "{dir}/bad-policy.yaml"}, "rules[1].actions"),
        ({**HTPASSWD_IN, "DUPHUNTER_HTPASSWD": "{dir}/missing"}, "No such file"),
        ({"DUPHUNTER_TLS_CERT": "{dir}/cert.pem"}, "go together"),
    ],
)
def test_a_broken_configuration_stops_the_api_at_start(
    live: LiveStack, files: AuthFiles, env: dict[str, str], complaint: str
) -> None:
    (files.directory / "bad-policy.yaml").write_text("rules:\n  - repositories: [x]\n")
    settings = {k: v.replace("{dir}", str(files.directory)) for k, v in env.items()}
    listen = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        services.api_command(VENV_BIN, listen, 1, 2),
        cwd=REPO_ROOT,
        env={**live.stack.env, **settings},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert complaint in done.stdout + done.stderr, done.stderr[-2000:]


# --------------------------------------------------------------------------- TLS


def self_signed(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "duphunter test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert, private = directory / "tls.crt", directory / "tls.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(pem_private(key))
    private.chmod(0o600)
    return cert, private


def test_tls_through_gunicorn(
    live: LiveStack, files: AuthFiles, repos: dict[str, str], tmp_path: Path
) -> None:
    """DUPHUNTER_TLS_CERT/KEY: gunicorn serves HTTPS (the production command unchanged),
    the token realm says https, and a client that checks the certificate logs in."""
    cert, key = self_signed(tmp_path)
    env = {**token_env(files), "DUPHUNTER_TLS_CERT": str(cert), "DUPHUNTER_TLS_KEY": str(key)}
    with auth_api(live, env, scheme="https", ca=cert) as api:
        base = api.call("GET", "/v2/")
        assert base.status == 401
        assert challenge_fields(base)[1]["realm"] == f"{api.url}/auth/token"
        spoofed = api.client.request("GET", "/v2/", headers={"X-Forwarded-Host": "evil.test"})
        assert challenge_fields(spoofed)[1]["realm"] == f"{api.url}/auth/token"  # not trusted
        token = api.token("dave", f"repository:{repos['team']}:pull")
        assert attempt(api, "pull", repos["team"], "Bearer " + token).status == 200
        with pytest.raises(urllib3.exceptions.HTTPError):
            urllib3.PoolManager(retries=False).request("GET", api.url + "/v2/")  # unknown CA
        with pytest.raises(urllib3.exceptions.HTTPError):  # no plain HTTP on this port
            urllib3.PoolManager(retries=False, timeout=5).request("GET", f"http://{api.host}/v2/")
        if shutil.which("skopeo"):
            certs = tmp_path / "certs"
            certs.mkdir()
            shutil.copy(cert, certs / "ca.crt")
            authfile = tmp_path / "auth.json"
            done = skopeo_login(api, "dave", authfile, "--cert-dir", str(certs))
            assert done.returncode == 0, done.stderr
            unverified = skopeo_login(api, "dave", tmp_path / "other.json", "--tls-verify=true")
            assert unverified.returncode != 0 and "certificate" in unverified.stderr


# --------------------------------------------------------------------------- real clients


def skopeo_login(
    api: Api, user: str, authfile: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    verify = (
        []
        if any(o.startswith(("--cert-dir", "--tls-verify")) for o in options)
        else ["--tls-verify=false"]
    )
    return subprocess.run(
        [
            "skopeo",
            "login",
            *verify,
            *options,
            "--authfile",
            str(authfile),
            "--username",
            user,
            "--password-stdin",
            api.host,
        ],
        input=PASSWORDS[user],
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )


def token_requests_in(api: Api) -> int:
    """How many token requests the API's access log holds."""
    return api.log.read_text(errors="replace").count("GET /auth/token")


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["skopeo", *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize("mode", ["basic_api", "token_api"])
def test_skopeo_login_push_pull(
    mode: str, request: pytest.FixtureRequest, repos: dict[str, str], tmp_path: Path
) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is installed by `make test` (deploy/system-deps.sh)")
    api: Api = request.getfixturevalue(mode)
    token_requests = token_requests_in(api)
    authfile = tmp_path / "auth.json"
    failed = subprocess.run(
        [
            "skopeo",
            "login",
            "--tls-verify=false",
            "--authfile",
            str(authfile),
            "--username",
            "carol",
            "--password-stdin",
            api.host,
        ],
        input="not-her-password",
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert failed.returncode != 0
    done = skopeo_login(api, "carol", authfile)
    assert done.returncode == 0, done.stderr
    assert PASSWORDS["carol"] not in done.stdout + done.stderr
    source = f"docker://{api.host}/{repos['carol']}:v1"
    layout = tmp_path / "pulled"
    tls = ["--src-tls-verify=false", "--dest-tls-verify=false"]
    pulled = skopeo("copy", *tls, "--authfile", str(authfile), source, f"oci:{layout}:v1")
    assert pulled.returncode == 0, pulled.stderr
    target = f"{repos['carol']}-{mode.split('_')[0]}"
    pushed = skopeo(
        "copy",
        *tls,
        "--preserve-digests",
        "--authfile",
        str(authfile),
        f"oci:{layout}:v1",
        f"docker://{api.host}/{target}:v1",
    )
    assert pushed.returncode == 0, pushed.stderr
    alice = RegistryClient(request.getfixturevalue("basic_api").url, basic("alice"))
    original = alice.request("GET", f"/v2/{repos['carol']}/manifests/v1")
    copy = alice.request("GET", f"/v2/{target}/manifests/v1")
    assert copy.status == 200 and copy.data == original.data
    # in token mode skopeo went through the token endpoint; with Basic it never does
    assert (token_requests_in(api) > token_requests) == (mode == "token_api")
    # carol may not push to team/: denied, with the error the registry sent
    refused = skopeo(
        "copy",
        *tls,
        "--authfile",
        str(authfile),
        f"oci:{layout}:v1",
        f"docker://{api.host}/{repos['team']}-carol:v1",
    )
    # (its first request, a blob HEAD, has no body to carry DENIED: the status says it)
    assert refused.returncode != 0 and "403 (Forbidden)" in refused.stderr, refused.stderr
    empty = tmp_path / "empty-auth.json"
    empty.write_text('{"auths": {}}')
    anonymous = skopeo(
        "copy", *tls, "--authfile", str(empty), source, f"oci:{tmp_path / 'anon'}:v1"
    )
    assert anonymous.returncode != 0 and "unauthorized" in anonymous.stderr.lower()


def podman_login(
    podman: Podman, api: Api, user: str, password: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        podman.argv(
            "login",
            "--tls-verify=false",
            "--authfile",
            podman.home / "auth.json",
            "--username",
            user,
            "--password-stdin",
            api.host,
        ),
        env=podman.env(),
        input=password,
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("mode", ["basic_api", "token_api"])
def test_podman_login_push_pull(
    mode: str, request: pytest.FixtureRequest, repos: dict[str, str], podman_home: Path
) -> None:
    api: Api = request.getfixturevalue(mode)
    podman = private_podman(podman_home)
    token_requests = token_requests_in(api)
    assert podman_login(podman, api, "carol", "wrong").returncode != 0
    done = podman_login(podman, api, "carol", PASSWORDS["carol"])
    assert done.returncode == 0, done.stderr
    source = f"{api.host}/{repos['carol2']}:v1"
    podman.run("pull", "--tls-verify=false", "--signature-policy", podman.policy, source)
    target = f"{api.host}/{repos['carol2']}-podman-{mode.split('_')[0]}:v1"
    podman.run("tag", source, target)
    digest_file = podman_home / "digest"
    podman.run(
        "push",
        "--tls-verify=false",
        "--signature-policy",
        podman.policy,
        "--digestfile",
        digest_file,
        target,
    )
    alice = RegistryClient(request.getfixturevalue("basic_api").url, basic("alice"))
    name = target.split("/", 1)[1].rsplit(":", 1)[0]
    pushed = alice.request(
        "GET",
        f"/v2/{name}/manifests/{digest_file.read_text().strip()}",
        headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
    )
    assert pushed.status == 200, pushed.data
    original = json.loads(alice.request("GET", f"/v2/{repos['carol2']}/manifests/v1").data)
    layers = json.loads(pushed.data)["layers"]
    assert len(layers) == len(original["layers"])
    assert (token_requests_in(api) > token_requests) == (mode == "token_api")
    denied = subprocess.run(
        podman.argv(
            "push",
            "--tls-verify=false",
            "--signature-policy",
            podman.policy,
            target,
            f"docker://{api.host}/other/podman-{uuid.uuid4().hex[:6]}:v1",
        ),
        env=podman.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert denied.returncode != 0 and "403 (Forbidden)" in denied.stderr, denied.stderr


# --------------------------------------------------------------------------- conformance


def parse_challenge(response: Response) -> dict[str, str]:
    scheme, fields = challenge_fields(response)
    assert scheme == "Bearer" and {"realm", "service"} <= set(fields), response.headers
    return fields


class TokenClient(RegistryClient):
    """What Docker clients do: on a 401 with a Bearer challenge, ask its realm (with
    Basic credentials) for a token covering every scope asked so far, and send again."""

    def __init__(self, url: str, user: str) -> None:
        super().__init__(url)
        self.user = user
        self.scopes: list[str] = []
        self.token = ""
        self.fetched = 0

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        **fields: str,
    ) -> Response:
        response = self._send(method, path, body, headers, fields)
        if response.status != 401:
            return response
        challenge = parse_challenge(response)
        if challenge.get("scope") and challenge["scope"] not in self.scopes:
            self.scopes.append(challenge["scope"])
        self._fetch(challenge)
        return self._send(method, path, body, headers, fields)

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str] | None,
        fields: dict[str, str],
    ) -> Response:
        merged = {
            **(headers or {}),
            **({"Authorization": f"Bearer {self.token}"} if self.token else {}),
        }
        return super().request(method, path, body, merged, **fields)

    def _fetch(self, challenge: dict[str, str]) -> None:
        query = urlencode([("service", challenge["service"])] + [("scope", s) for s in self.scopes])
        response = self.http.request(
            "GET", f"{challenge['realm']}?{query}", headers={"Authorization": basic(self.user)}
        )
        assert response.status == 200, response.data
        self.token = json.loads(response.data)["token"]
        self.fetched += 1


def run_suite(client: RegistryClient, repo: str) -> None:
    """tests/clients/test_conformance.py's whole run in one namespace, as its last test does."""
    data = build_data()
    run_pull(client, repo, data)
    run_push(client, repo, data)
    run_discovery(client, repo, data)
    run_management(client, repo, data)
    run_pull(client, f"{repo}-bfirst", build_data(), delete_manifest_before_blobs=False)


def test_conformance_with_basic_auth(basic_api: Api, repo: str) -> None:
    run_suite(RegistryClient(basic_api.url, basic("conformance")), repo)


def test_conformance_with_tokens(token_api: Api, repo: str) -> None:
    client = TokenClient(token_api.url, "conformance")
    run_suite(client, repo)
    assert client.fetched >= 3, "pull, push and delete scopes each needed a token"


def test_conformance_user_is_held_to_its_repositories(
    basic_api: Api, repos: dict[str, str]
) -> None:
    """The control for the two above: the same client outside its rule is refused."""
    client = RegistryClient(basic_api.url, basic("conformance"))
    assert client.request("POST", f"/v2/{repos['team']}/blobs/uploads/", b"").status == 403
    assert client.request("GET", f"/v2/{repos['team']}/manifests/v1").status == 403


def test_default_is_open(live: LiveStack, client: RegistryClient, repo: str) -> None:
    """DUPHUNTER_AUTH unset: no credentials needed anywhere, as before."""
    assert "DUPHUNTER_AUTH" not in live.stack.env or live.stack.env["DUPHUNTER_AUTH"] == "none"
    assert client.request("GET", "/v2/").status == 200
    client.push_blob(repo, b"open")
    assert client.request("GET", "/api/v1/stats").status == 200
    assert client.request("GET", "/auth/token").status == 404
