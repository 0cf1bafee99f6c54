"""Docker/OCI bearer tokens: JWTs with the token spec's `access` claim, issued with the
registry's own key or by an external issuer verified with its public key; the scopes they
grant and the `Identity` a request's credentials stand for.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

BUILTIN_ISSUER = "duphunter"
CLOCK_LEEWAY_SECONDS = 10
Access = tuple[str, str, str]  # (type, name, action), as in a token scope


class InvalidCredentials(Exception):
    """Credentials were sent and are wrong: bad password, bad or expired token."""


@dataclass(frozen=True)
class Identity:
    """Who sent a request. `grants` is a token's access claim; None when the policy
    decides (an htpasswd user, or nobody at all)."""

    user: str | None
    grants: frozenset[Access] | None = None
    issuer: str = ""

    @property
    def authenticated(self) -> bool:
        return self.user is not None or self.grants is not None


ANONYMOUS = Identity(None)


# scopes: "repository:team/app:pull,push", "registry:catalog:*"
def parse_scope(scope: str) -> list[Access]:
    """The accesses a scope asks for; [] when it is malformed. Names may hold colons
    (a registry host with a port), so the actions are after the last one."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name or not actions:
        return []
    return [(kind, name, action) for action in actions.split(",") if action]


def format_scope(kind: str, name: str, actions: Iterable[str]) -> str:
    return f"{kind}:{name}:{','.join(actions)}"


def grants_from_claim(claim: Any) -> frozenset[Access]:
    """A token's `access` claim as a set; InvalidCredentials when it is malformed."""
    if claim is None:
        return frozenset()
    if not isinstance(claim, list):
        raise InvalidCredentials("malformed access claim")
    grants: set[Access] = set()
    for entry in claim:
        if not isinstance(entry, dict):
            raise InvalidCredentials("malformed access claim")
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
        if not (isinstance(kind, str) and isinstance(name, str) and isinstance(actions, list)):
            raise InvalidCredentials("malformed access claim")
        grants.update((kind, name, str(action)) for action in actions)
    return frozenset(grants)


def claim_from_grants(grants: Iterable[Access]) -> list[dict[str, Any]]:
    by_resource: dict[tuple[str, str], list[str]] = {}
    for kind, name, action in grants:
        actions = by_resource.setdefault((kind, name), [])
        if action not in actions:
            actions.append(action)
    return [
        {"type": kind, "name": name, "actions": actions}
        for (kind, name), actions in by_resource.items()
    ]


def token_allows(grants: frozenset[Access], access: Access) -> bool:
    kind, name, _action = access
    return access in grants or (kind, name, "*") in grants


# tokens
PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def algorithms_for(key: PublicKey | PrivateKey) -> list[str]:
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return ["EdDSA"]
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return ["RS256", "RS384", "RS512"]
    return [{256: "ES256", 384: "ES384", 521: "ES512"}[key.curve.key_size]]


def load_private_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(
        key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    ):
        raise ValueError(f"{path}: an Ed25519, RSA or EC private key is needed")
    return key


def load_public_keys(path: Path) -> list[PublicKey]:
    """A PEM public key, or certificates (a bundle, as Distribution's rootcertbundle)."""
    data = path.read_bytes()
    if b"BEGIN CERTIFICATE" in data:
        keys: list[Any] = [cert.public_key() for cert in x509.load_pem_x509_certificates(data)]
    else:
        keys = [serialization.load_pem_public_key(data)]
    for key in keys:
        if not isinstance(
            key, ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey
        ):
            raise ValueError(f"{path}: an Ed25519, RSA or EC public key is needed")
    return keys


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: float


class TokenIssuer:
    """Signs the built-in token endpoint's JWTs, as the Docker token spec shapes them."""

    def __init__(self, key: PrivateKey, service: str, ttl_seconds: int) -> None:
        self.key = key
        self.service = service
        self.ttl_seconds = ttl_seconds
        self.algorithm = algorithms_for(key)[0]

    def public_key(self) -> PublicKey:
        return self.key.public_key()

    def issue(self, user: str | None, grants: list[Access]) -> IssuedToken:
        now = int(time.time())
        claims = {
            "iss": BUILTIN_ISSUER,
            "sub": user or "",
            "aud": self.service,
            "iat": now,
            "nbf": now - CLOCK_LEEWAY_SECONDS,
            "exp": now + self.ttl_seconds,
            "jti": secrets.token_hex(16),
            "access": claim_from_grants(grants),
        }
        token = jwt.encode(claims, self.key, algorithm=self.algorithm)
        return IssuedToken(token, self.ttl_seconds, now)


class TokenVerifier:
    """Checks a bearer token: a trusted issuer's signature, our service as audience, the
    time window; its `access` claim becomes the identity's grants."""

    def __init__(self, issuers: dict[str, list[PublicKey]], service: str) -> None:
        self.issuers = issuers
        self.service = service

    def verify(self, token: str) -> Identity:
        try:
            issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError as error:
            raise InvalidCredentials("malformed token") from error
        keys = self.issuers.get(issuer) if isinstance(issuer, str) else None
        if not keys or not isinstance(issuer, str):
            raise InvalidCredentials("token from an untrusted issuer")
        for key in keys:
            try:
                claims = jwt.decode(
                    token, key, algorithms=algorithms_for(key), audience=self.service,
                    issuer=issuer, leeway=CLOCK_LEEWAY_SECONDS,
                    options={"require": ["exp", "iss", "aud"]},
                )  # fmt: skip
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as error:
                raise InvalidCredentials(f"token rejected: {type(error).__name__}") from error
            subject = claims.get("sub")
            return Identity(
                user=subject if isinstance(subject, str) and subject else None,
                grants=grants_from_claim(claims.get("access")),
                issuer=issuer,
            )
        raise InvalidCredentials("token signature does not verify")
