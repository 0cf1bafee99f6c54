"""Who may do what: htpasswd users, groups and per-repository permissions from a policy
file, and Docker/OCI bearer tokens (JWTs with the token spec's `access` claim) issued by
the registry's own key or by an external issuer verified with its public key (the tokens
themselves: pipelines.registry.tokens). `Authority` is what the API asks.

No HTTP here: `api/auth.py` turns requests into `Identity`s and `Access`es and renders
the verdicts (401 with a challenge, 403).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Generic, TypeVar

import bcrypt
import redis
import yaml

from pipelines.config import AuthSettings
from pipelines.registry.globs import glob_regex
from pipelines.registry.names import valid_name
from pipelines.registry.throttle import Backoff, LoginThrottle, TooManyAttempts
from pipelines.registry.tokens import (
    BUILTIN_ISSUER,
    Access,
    Identity,
    InvalidCredentials,
    IssuedToken,
    TokenIssuer,
    TokenVerifier,
    load_private_key,
    load_public_keys,
    token_allows,
)

MODES = ("none", "htpasswd", "token")
REPOSITORY_ACTIONS = ("pull", "push", "delete")
ANY_USER = "*"  # in a policy's user lists: every authenticated user
CATALOG = ("registry", "catalog", "*")
ADMIN = ("registry", "admin", "*")
CREDENTIAL_CACHE_SECONDS = 300.0
CREDENTIAL_CACHE_ENTRIES = 4096
CHECK_SLOTS = 2  # bcrypt checks at once per process (DUPHUNTER_AUTH_CHECKS)
log = logging.getLogger(__name__)
T = TypeVar("T")


class Verdict(Enum):
    ALLOW = "allow"
    CHALLENGE = "challenge"  # 401: no credentials, or a token lacking this access
    DENY = "deny"  # 403: a known identity the rules do not allow


class ReloadingFile(Generic[T]):
    """A file re-read when it changes, so users and rules change without a restart. A
    broken file fails at start; a later broken edit keeps the last good content, logged,
    rather than locking everyone out or letting anyone in. A file that disappears keeps
    its last content too, unless `when_missing` says what it then means."""

    def __init__(
        self, path: Path, load: Callable[[Path], T], when_missing: Callable[[], T] | None = None
    ) -> None:
        self.path = path
        self._load = load
        self._when_missing = when_missing
        self._lock = threading.Lock()
        self._value: T = load(path)
        self._stamp = self._current_stamp()

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def get(self) -> T:
        stamp = self._current_stamp()
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                self._reload(missing=stamp is None)
            return self._value

    def _reload(self, missing: bool) -> None:
        if missing and self._when_missing is not None:
            log.error("%s is missing: %s", self.path, "taking it as empty")
            self._value = self._when_missing()
            return
        try:
            self._value = self._load(self.path)
        except (OSError, ValueError, yaml.YAMLError) as error:
            log.error("%s: %s; keeping its last good content", self.path, error)


# htpasswd
_BCRYPT_ENTRY = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# bcrypt reads only the first 72 bytes of a password; `htpasswd -B` takes longer ones and
# Apache checks them by those 72 bytes, so they are cut here as well (not refused).
BCRYPT_PASSWORD_BYTES = 72


@functools.cache
def _dummy_hash(cost: int) -> bytes:
    """Checked when the user is unknown, so a wrong name costs as long as a wrong password."""
    return bcrypt.hashpw(b"duphunter-no-such-user", bcrypt.gensalt(rounds=cost))


def _cost(users: dict[str, bytes]) -> int:
    for hashed in users.values():
        return int(hashed[4:6])
    return 10


def bcrypt_password(password: str) -> bytes:
    return password.encode("utf-8", "surrogatepass")[:BCRYPT_PASSWORD_BYTES]


def load_htpasswd(path: Path) -> dict[str, bytes]:
    """user -> bcrypt hash, as `htpasswd -B` writes them; other hash kinds are refused."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ValueError(f"{path}:{number}: not a user:hash line")
        if not _BCRYPT_ENTRY.fullmatch(hashed):
            raise ValueError(f"{path}:{number}: only bcrypt entries (htpasswd -B) are accepted")
        users[user] = hashed.encode()
    return users


def _no_users() -> dict[str, bytes]:
    return {}


class ChecksBusy(TooManyAttempts):
    """Every bcrypt slot of this process is taken: the login is refused unchecked."""

    def __init__(self) -> None:
        super().__init__(1, "too many logins being checked; retry in a second")


class CheckSlots:
    """At most `running` bcrypt checks at a time in this process, in threads of lower CPU
    priority, and at most `running` more waiting for one. A check that finds them all
    taken is refused at once (ChecksBusy): a flood of guesses holds a bounded number of
    the server's threads, and requests with verified credentials or tokens keep the rest
    and the CPU. Logins from an address where their user logged in before (`known`) have
    `running` places of their own, which guesses from elsewhere cannot take."""

    def __init__(self, running: int, nice: int = 10) -> None:
        self._admitted = threading.BoundedSemaphore(2 * running)
        self._reserved = threading.BoundedSemaphore(running)
        self._pool = ThreadPoolExecutor(
            running, "bcrypt", initializer=_lower_priority, initargs=(nice,)
        )

    def check(
        self,
        password: bytes,
        hashed: bytes,
        admitted: Callable[[], None] = lambda: None,
        known: Callable[[], bool] = lambda: False,
    ) -> bool:
        """bcrypt in a slot; `admitted` runs once a place is had, before the check (a
        refusal costs nothing more than the semaphore: not even the throttle's Redis)."""
        place = self._place(known)
        try:
            admitted()
            return self._pool.submit(bcrypt.checkpw, password, hashed).result()
        finally:
            place.release()

    def _place(self, known: Callable[[], bool]) -> threading.BoundedSemaphore:
        if self._admitted.acquire(blocking=False):
            return self._admitted
        if known() and self._reserved.acquire(blocking=False):
            return self._reserved
        raise ChecksBusy()


def _lower_priority(nice: int) -> None:
    """On Linux a nice value is per thread."""
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, max(os.getpriority(os.PRIO_PROCESS, thread), nice))
    except OSError as error:  # not permitted in some sandboxes: checks still run, at par
        log.warning("bcrypt threads keep their priority: %s", error)


class Htpasswd:
    """Verifies passwords against an htpasswd file (a missing file: no users). A
    successful check is remembered for a few minutes under an HMAC of the credentials and
    the stored hash (bcrypt on every request of a push would cost more than the push), and
    forgotten when the entry changes or goes."""

    def __init__(self, path: Path, slots: CheckSlots | None = None) -> None:
        self.file = ReloadingFile(path, load_htpasswd, when_missing=_no_users)
        self.slots = slots or CheckSlots(CHECK_SLOTS)
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def verify(self, user: str, password: str) -> bool:
        return self.remembered(user, password) or self.check(user, password)

    def remembered(self, user: str, password: str) -> bool:
        """Whether these credentials were verified lately (no bcrypt: an HMAC)."""
        users = self.file.get()
        if user not in users:
            return False
        fingerprint = self._fingerprint(user, password, users)
        with self._lock:
            return self._verified.get(fingerprint, 0.0) > time.monotonic()

    def check(
        self,
        user: str,
        password: str,
        admitted: Callable[[], None] = lambda: None,
        known: Callable[[], bool] = lambda: False,
    ) -> bool:
        """bcrypt, in a slot of this process (ChecksBusy when there is none); `admitted`
        runs when it has one, before the check; `known`: CheckSlots'."""
        users = self.file.get()
        hashed = users.get(user)
        expected = hashed or _dummy_hash(_cost(users))
        matched = self.slots.check(bcrypt_password(password), expected, admitted, known)
        if not (matched and hashed is not None):
            return False
        self._remember(self._fingerprint(user, password, users))
        return True

    def has_user(self, user: str) -> bool:
        return user in self.file.get()

    def _remember(self, fingerprint: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._verified) >= CREDENTIAL_CACHE_ENTRIES:
                self._verified = {k: v for k, v in self._verified.items() if v > now}
            if len(self._verified) < CREDENTIAL_CACHE_ENTRIES:
                self._verified[fingerprint] = now + CREDENTIAL_CACHE_SECONDS

    def _fingerprint(self, user: str, password: str, users: dict[str, bytes]) -> bytes:
        """Keyed by the stored hash too: a changed password forgets the old one at once."""
        material = b"\0".join(
            (user.encode("utf-8", "surrogatepass"), password.encode("utf-8", "surrogatepass"),
             users.get(user, b""))
        )  # fmt: skip
        return hmac.new(self._cache_key, material, hashlib.sha256).digest()


# policy
@dataclass(frozen=True)
class Rule:
    patterns: tuple[re.Pattern[str], ...]
    users: frozenset[str]
    groups: frozenset[str]
    actions: frozenset[str]

    def matches(self, repository: str) -> bool:
        return any(pattern.fullmatch(repository) for pattern in self.patterns)

    def names(self, user: str, groups: frozenset[str]) -> bool:
        return user in self.users or ANY_USER in self.users or bool(groups & self.groups)


@dataclass(frozen=True)
class Policy:
    """Groups, admins and rules (repository patterns -> users and groups -> actions).
    Rules add up; what no rule grants is denied. `Policy.open()`, used when no policy
    file is configured, lets every authenticated user do everything."""

    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    admin_users: frozenset[str] = frozenset()
    admin_groups: frozenset[str] = frozenset()

    @classmethod
    def open(cls) -> Policy:
        everything = Rule((re.compile(".*"),), frozenset({ANY_USER}), frozenset(),
                          frozenset(REPOSITORY_ACTIONS))  # fmt: skip
        return cls(rules=(everything,), admin_users=frozenset({ANY_USER}))

    def groups_of(self, user: str) -> frozenset[str]:
        return frozenset(name for name, members in self.groups.items() if user in members)

    def actions(self, user: str, repository: str) -> frozenset[str]:
        groups = self.groups_of(user)
        allowed: set[str] = set()
        for rule in self.rules:
            if rule.names(user, groups) and rule.matches(repository):
                allowed |= rule.actions
        return frozenset(allowed)

    def is_admin(self, user: str) -> bool:
        return bool(
            user in self.admin_users
            or ANY_USER in self.admin_users
            or self.groups_of(user) & self.admin_groups
        )


def _names(value: Any, where: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{where} must be a list of names")
    return frozenset(value)


def _checked_keys(value: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping")
    unknown = set(value) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    return value


def parse_policy(document: Any) -> Policy:
    """A policy from its YAML/JSON document; ValueError naming what is wrong, so a typo
    denies nobody silently and grants nothing by accident."""
    top = _checked_keys(document, {"groups", "admins", "rules"}, "policy")
    groups_raw = _checked_keys(top.get("groups") or {}, set(top.get("groups") or {}), "groups")
    groups = {str(name): _names(members, f"groups.{name}") for name, members in groups_raw.items()}
    admins = _checked_keys(top.get("admins") or {}, {"users", "groups"}, "admins")
    rules = []
    for number, raw in enumerate(top.get("rules") or [], 1):
        where = f"rules[{number}]"
        entry = _checked_keys(raw, {"repositories", "users", "groups", "actions"}, where)
        actions = _names(entry.get("actions"), f"{where}.actions")
        if "*" in actions:
            actions = frozenset(REPOSITORY_ACTIONS)
        if not actions or not actions <= set(REPOSITORY_ACTIONS):
            raise ValueError(f"{where}.actions: choose from {', '.join(REPOSITORY_ACTIONS)}")
        patterns = _names(entry.get("repositories"), f"{where}.repositories")
        if not patterns:
            raise ValueError(f"{where}.repositories: at least one pattern")
        rule_groups = _names(entry.get("groups"), f"{where}.groups")
        if rule_groups - set(groups):
            raise ValueError(f"{where}.groups: undefined {sorted(rule_groups - set(groups))}")
        users = _names(entry.get("users"), f"{where}.users")
        regexes = tuple(glob_regex(pattern) for pattern in sorted(patterns))
        rules.append(Rule(regexes, users, rule_groups, actions))
    return Policy(
        groups=groups,
        rules=tuple(rules),
        admin_users=_names(admins.get("users"), "admins.users"),
        admin_groups=_names(admins.get("groups"), "admins.groups"),
    )


def load_policy(path: Path) -> Policy:
    text = path.read_text()
    document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return parse_policy(document)


class Permissions:
    """What a user (None: anonymous) may do, by the policy and the anonymous-pull switch."""

    def __init__(self, policy: Callable[[], Policy], anonymous_pull: bool) -> None:
        self.policy = policy
        self.anonymous_pull = anonymous_pull

    def may(self, user: str | None, access: Access) -> bool:
        kind, name, action = access
        if user is None:
            return self.anonymous_pull and (
                access == CATALOG or (kind == "repository" and action == "pull")
            )
        if access == CATALOG:
            return True
        if access == ADMIN:
            return self.policy().is_admin(user)
        return kind == "repository" and action in self.policy().actions(user, name)

    def grant(self, user: str | None, requested: Iterable[Access]) -> list[Access]:
        """The part of a token request this user may have ("*" asks for every action)."""
        granted: list[Access] = []
        for kind, name, action in requested:
            wanted = [action]
            if kind == "repository":
                if not valid_repository(name):
                    continue
                wanted = list(REPOSITORY_ACTIONS) if action == "*" else [action]
            granted += [(kind, name, a) for a in wanted if self.may(user, (kind, name, a))]
        return list(dict.fromkeys(granted))


def valid_repository(name: str) -> bool:
    return valid_name(name)


# the facade the HTTP side uses
class Authority:
    """Authentication and authorization as configured (`DUPHUNTER_AUTH` and friends)."""

    def __init__(
        self,
        mode: str,
        permissions: Permissions,
        htpasswd: Htpasswd | None = None,
        issuer: TokenIssuer | None = None,
        verifier: TokenVerifier | None = None,
        service: str = BUILTIN_ISSUER,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.mode = mode
        self.permissions = permissions
        self.htpasswd = htpasswd
        self.issuer = issuer
        self.verifier = verifier
        self.service = service
        self.throttle = throttle

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def basic(self, user: str, password: str, client: str = "") -> Identity:
        """The user, if the password is theirs; InvalidCredentials if not, TooManyAttempts
        (unchecked) while `client` or `user` is backing off or every bcrypt slot is taken.
        Credentials verified lately pass at once, whatever the throttle says."""
        if self.htpasswd is None:
            raise InvalidCredentials("bad user name or password")
        if not self.htpasswd.remembered(user, password):
            self._check_password(user, password, client)
        return Identity(user, issuer="htpasswd")

    def _check_password(self, user: str, password: str, client: str) -> None:
        assert self.htpasswd is not None
        throttle = self.throttle
        if throttle is None:
            matched = self.htpasswd.check(user, password)
        else:
            matched = self.htpasswd.check(
                user,
                password,
                admitted=lambda: throttle.charge(client, user),
                known=lambda: throttle.known(client, user),
            )
        if not matched:
            raise InvalidCredentials("bad user name or password")
        if throttle is not None:
            throttle.succeeded(client, user)

    def bearer(self, token: str) -> Identity:
        """A token's identity. A built-in token of a user no longer in the htpasswd file is
        refused: removing a user revokes their tokens at once (a changed password does not;
        they expire within DUPHUNTER_TOKEN_TTL_SECONDS)."""
        if self.verifier is None:
            raise InvalidCredentials("bearer tokens are not accepted")
        identity = self.verifier.verify(token)
        removed = (
            identity.issuer == BUILTIN_ISSUER
            and identity.user is not None
            and self.htpasswd is not None
            and not self.htpasswd.has_user(identity.user)
        )
        if removed:
            raise InvalidCredentials("the token's user is no longer known")
        return identity

    def decide(self, identity: Identity, access: Access) -> Verdict:
        if not self.enabled:
            return Verdict.ALLOW
        if identity.grants is None:
            if self.permissions.may(identity.user, access):
                return Verdict.ALLOW
            return Verdict.DENY if identity.user is not None else Verdict.CHALLENGE
        if token_allows(identity.grants, access):
            return Verdict.ALLOW
        # Our own token: the policy tells "ask for another token" from "never"; an
        # external issuer's is its own authority, so the client is sent back to it.
        builtin = identity.issuer == BUILTIN_ISSUER and identity.user is not None
        if builtin and not self.permissions.may(identity.user, access):
            return Verdict.DENY
        return Verdict.CHALLENGE

    def may_see(self, identity: Identity, repository: str) -> bool:
        """Whether a catalog listing shows this repository."""
        if not self.enabled:
            return True
        if identity.grants is not None and identity.issuer != BUILTIN_ISSUER:
            return True  # an external issuer granted the catalog: it knows no finer rule
        return self.permissions.may(identity.user, ("repository", repository, "pull"))

    def issue_token(self, identity: Identity, requested: list[Access]) -> IssuedToken:
        if self.issuer is None:
            raise RuntimeError("no token key configured")
        return self.issuer.issue(identity.user, self.permissions.grant(identity.user, requested))


def authority_from_settings(
    settings: AuthSettings, failures: redis.Redis[bytes] | None = None
) -> Authority:
    """ValueError naming the setting when the configuration cannot work. `failures`: the
    Redis that counts failed logins (none: no throttle, as when only checking settings)."""
    mode = settings.auth
    if mode not in MODES:
        raise ValueError(f"DUPHUNTER_AUTH={mode!r}: choose one of {', '.join(MODES)}")
    policy: Callable[[], Policy] = Policy.open
    if settings.auth_policy is not None:
        policy = ReloadingFile(settings.auth_policy, load_policy).get
    permissions = Permissions(policy, settings.anonymous_pull)
    if settings.auth_checks < 1 or settings.auth_free_failures < 0:
        raise ValueError("DUPHUNTER_AUTH_CHECKS >= 1 and DUPHUNTER_AUTH_FREE_FAILURES >= 0")
    if settings.auth_backoff_max_seconds < 1:
        raise ValueError("DUPHUNTER_AUTH_BACKOFF_MAX_SECONDS must be at least 1")
    htpasswd = None
    if settings.htpasswd is not None:
        htpasswd = Htpasswd(settings.htpasswd, CheckSlots(settings.auth_checks))
    if mode == "htpasswd" and htpasswd is None:
        raise ValueError("DUPHUNTER_AUTH=htpasswd needs DUPHUNTER_HTPASSWD")
    throttle = None
    if failures is not None:
        backoff = Backoff(settings.auth_free_failures, settings.auth_backoff_max_seconds)
        throttle = LoginThrottle(failures, backoff)
    if mode != "token":
        return Authority(mode, permissions, htpasswd, throttle=throttle)
    issuer, trusted = None, {}
    if settings.token_key is not None:
        issuer = TokenIssuer(load_private_key(settings.token_key), settings.token_service,
                             settings.token_ttl_seconds)  # fmt: skip
        trusted[BUILTIN_ISSUER] = [issuer.public_key()]
    if settings.token_public_key is not None or settings.token_issuer:
        if not (settings.token_public_key and settings.token_issuer and settings.token_realm):
            raise ValueError(
                "an external token issuer needs DUPHUNTER_TOKEN_ISSUER, "
                "DUPHUNTER_TOKEN_PUBLIC_KEY and DUPHUNTER_TOKEN_REALM"
            )
        if settings.token_issuer == BUILTIN_ISSUER and issuer is not None:
            raise ValueError(f"DUPHUNTER_TOKEN_ISSUER={BUILTIN_ISSUER!r} is the built-in issuer")
        trusted[settings.token_issuer] = load_public_keys(settings.token_public_key)
    if not trusted:
        raise ValueError("DUPHUNTER_AUTH=token needs DUPHUNTER_TOKEN_KEY or an external issuer")
    verifier = TokenVerifier(trusted, settings.token_service)
    return Authority(
        mode, permissions, htpasswd, issuer, verifier, settings.token_service, throttle
    )
