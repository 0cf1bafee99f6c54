"""The HTTP side of authentication: credentials from the Authorization header, the
401 challenges clients expect (Basic, or Bearer with realm, service and scope), 403
`DENIED`, the built-in token endpoint, and the catalog filtered to what one may pull.
The rules themselves are `pipelines.registry.auth`'s.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import time
from typing import Any

import redis
from werkzeug.wrappers import Request, Response

from pipelines.config import AuthSettings, Settings
from pipelines.registry.auth import ADMIN, CATALOG, Authority, Verdict, authority_from_settings
from pipelines.registry.facade import Registry
from pipelines.registry.throttle import TooManyAttempts
from pipelines.registry.tokens import (
    ANONYMOUS,
    Access,
    Identity,
    InvalidCredentials,
    format_scope,
    parse_scope,
)

OPEN, LOGIN = "open", "login"
# What each handler needs. A handler not listed needs an admin: routes added later are
# closed until someone decides otherwise.
NEEDS: dict[str, str] = {
    "health": OPEN,
    "ready": OPEN,
    "metrics": OPEN,
    "token": OPEN,
    "base": LOGIN,
    "catalog": "catalog",
    "get_blob": "pull",
    "get_manifest": "pull",
    "list_tags": "pull",
    "list_referrers": "pull",
    "start_upload": "push",
    "upload_status": "push",
    "upload_chunk": "push",
    "finish_upload": "push",
    "cancel_upload": "push",
    "put_manifest": "push",
    "delete_blob": "delete",
    "delete_manifest": "delete",
}
BASIC_REALM = "DupHunter"
# A login refused unchecked (its sender or user is backing off, or every bcrypt slot is
# taken) gets 429 TOOMANYREQUESTS with Retry-After, at /v2/... and at /auth/token alike,
# never 401: a 401 says the credentials are wrong (docker login prints "incorrect username
# or password", and a client may drop credentials that are right), and invites an
# immediate retry. 429 is the distribution spec's code for this; docker and containerd
# print "toomanyrequests", and containers/image (skopeo, podman) retries a registry
# request's 429 after its Retry-After (docker_client.go, parseRetryAfter).
TOO_MANY_STATUS = 429
IDENTITY_KEY = "duphunter.identity"
CATALOG_BATCH = 1000


def _errors(code: str, message: str, detail: Any = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    return json.dumps({"errors": [error]}).encode()


def basic_credentials(value: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as error:
        raise InvalidCredentials("malformed basic credentials") from error
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        raise InvalidCredentials("malformed basic credentials")
    return user, password


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class AuthGate:
    """Decides, before a handler runs, whether the request may reach it."""

    def __init__(
        self, authority: Authority, settings: AuthSettings, trusted_proxies: tuple[str, ...] = ()
    ) -> None:
        self.authority = authority
        self.settings = settings
        self.trusted_proxies = trusted_proxies
        self.proxies = [ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies]

    @classmethod
    def from_env(cls, failures: redis.Redis[bytes] | None = None) -> AuthGate:
        """As configured; failed logins counted in `failures` (the registry's Redis)."""
        settings = AuthSettings()
        authority = authority_from_settings(settings, failures)
        return cls(authority, settings, Settings().trusted_proxies)

    @property
    def bearer_mode(self) -> bool:
        return self.authority.mode == "token"

    # checks
    def refuse(self, request: Request, handler: str, params: dict[str, str]) -> Response | None:
        """None when the request may go on, else the 401 or 403 to answer."""
        need = NEEDS.get(handler, "admin")
        if need == OPEN or not self.authority.enabled:
            return None
        access = self._access(need, params)
        try:
            identity = self.identify(request)
        except InvalidCredentials:
            return self.unauthorized(request, access, "invalid_token")
        except TooManyAttempts as refused:
            return too_many(refused)
        request.environ[IDENTITY_KEY] = identity
        if access is None:
            return None if identity.authenticated else self.unauthorized(request, None)
        verdict = self.authority.decide(identity, access)
        if verdict is Verdict.ALLOW:
            return None
        if verdict is Verdict.DENY:
            return self.denied(access)
        error = "insufficient_scope" if identity.grants is not None else None
        return self.unauthorized(request, access, error)

    def readable(self, repository: str | None, request: Request) -> str | None:
        """A mount's source repository, if this identity may pull from it (else the
        client uploads, as when the blob is not there: nothing is revealed)."""
        if not repository:
            return None
        identity = request.environ.get(IDENTITY_KEY, ANONYMOUS)
        access = ("repository", repository, "pull")
        return repository if self.authority.decide(identity, access) is Verdict.ALLOW else None

    def identify(self, request: Request) -> Identity:
        header = request.headers.get("Authorization", "")
        if not header:
            return ANONYMOUS
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return self.authority.bearer(value.strip())
        if scheme == "basic" and not self.bearer_mode:
            return self.authority.basic(*basic_credentials(value), self.client(request))
        raise InvalidCredentials(f"{scheme} credentials are not accepted here")

    def client(self, request: Request) -> str:
        remote, forwarded = request.remote_addr or "", request.headers.get("X-Forwarded-For", "")
        return client_identity(remote, forwarded, self.trusted_proxies)

    @staticmethod
    def _access(need: str, params: dict[str, str]) -> Access | None:
        if need == LOGIN:
            return None
        if need == "catalog":
            return CATALOG
        if need == "admin":
            return ADMIN
        return ("repository", params.get("name", ""), need)

    # responses
    def unauthorized(
        self, request: Request, access: Access | None, error: str | None = None
    ) -> Response:
        response = Response(
            _errors("UNAUTHORIZED", "authentication required", self._detail(access)),
            status=401,
            content_type="application/json",
        )
        response.headers["WWW-Authenticate"] = self.challenge(request, access, error)
        return response

    @staticmethod
    def denied(access: Access) -> Response:
        return Response(
            _errors("DENIED", "requested access to the resource is denied", _detail_of(access)),
            status=403,
            content_type="application/json",
        )

    def _detail(self, access: Access | None) -> Any:
        return None if access is None else _detail_of(access)

    def challenge(self, request: Request, access: Access | None, error: str | None) -> str:
        if not self.bearer_mode:
            return f'Basic realm={_quoted(BASIC_REALM)}, charset="UTF-8"'
        fields = {"realm": self.realm(request), "service": self.authority.service}
        if access is not None:
            kind, name, action = access
            # Pushes need pull too (clients check blobs first): ask for both at once.
            fields["scope"] = format_scope(
                kind, name, ["pull", "push"] if action == "push" else [action]
            )
        if error:
            fields["error"] = error
        return "Bearer " + ",".join(f"{key}={_quoted(value)}" for key, value in fields.items())

    def realm(self, request: Request) -> str:
        """DUPHUNTER_TOKEN_REALM, else this API's token endpoint as the client reached it:
        behind a trusted proxy, the scheme and host it forwarded."""
        if self.settings.token_realm:
            return self.settings.token_realm
        scheme, host = request.scheme, request.host
        if self._from_trusted_proxy(request.remote_addr or ""):
            scheme = _first(request.headers.get("X-Forwarded-Proto")) or scheme
            host = _first(request.headers.get("X-Forwarded-Host")) or host
        return f"{scheme}://{host}/auth/token"

    def _from_trusted_proxy(self, remote: str) -> bool:
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(address in network for network in self.proxies)

    # the built-in token endpoint (GET as the Docker token spec, POST as its OAuth2 form)
    def token(self, request: Request) -> Response:
        if self.authority.issuer is None:
            return Response(_errors("UNSUPPORTED", "no token endpoint here"), 404,
                            content_type="application/json")  # fmt: skip
        fields = request.form if request.method == "POST" else request.args
        service = fields.get("service")
        if service and service != self.authority.service:
            return Response(_errors("UNSUPPORTED", "unknown service", {"service": service}), 400,
                            content_type="application/json")  # fmt: skip
        try:
            identity = self._token_requester(request)
        except TooManyAttempts as refused:
            return too_many(refused)
        except InvalidCredentials:
            response = Response(_errors("UNAUTHORIZED", "bad user name or password"), 401,
                                content_type="application/json")  # fmt: skip
            response.headers["WWW-Authenticate"] = f"Basic realm={_quoted(BASIC_REALM)}"
            return response
        requested = [
            access
            for value in fields.getlist("scope")
            for scope in value.split()
            for access in parse_scope(scope)
        ]
        issued = self.authority.issue_token(identity, requested)
        issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued.issued_at))
        body = {
            "token": issued.token,
            "access_token": issued.token,
            "expires_in": issued.expires_in,
            "issued_at": issued_at,
        }
        return Response(json.dumps(body), 200, content_type="application/json",
                        headers={"Cache-Control": "no-store"})  # fmt: skip

    def _token_requester(self, request: Request) -> Identity:
        if request.method == "POST":
            if request.form.get("grant_type") != "password":
                raise InvalidCredentials("only the password grant is supported")
            return self.authority.basic(
                request.form.get("username", ""),
                request.form.get("password", ""),
                self.client(request),
            )
        header = request.headers.get("Authorization", "")
        if not header:
            return ANONYMOUS
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            raise InvalidCredentials("the token endpoint takes basic credentials")
        return self.authority.basic(*basic_credentials(value), self.client(request))

    # catalog
    def catalog_page(
        self, registry: Registry, request: Request, count: int | None, last: str | None
    ) -> tuple[list[str], bool]:
        """A page of the repositories this identity may pull, and whether more follow."""
        if not self.authority.enabled:
            return registry.catalog(count, last)
        identity = request.environ.get(IDENTITY_KEY, ANONYMOUS)
        visible: list[str] = []
        cursor = last
        while True:
            batch, more = registry.catalog(CATALOG_BATCH, cursor)
            visible += [name for name in batch if self.authority.may_see(identity, name)]
            if count is not None and len(visible) > count:
                return visible[:count], True
            if not more or not batch:
                return visible, False
            cursor = batch[-1]


def client_identity(remote: str, forwarded_for: str, trusted: tuple[str, ...]) -> str:
    """Who pulls: the remote address, or, when it is a trusted proxy, the nearest address
    in X-Forwarded-For that is not one (proxies append the address they saw)."""
    networks = [ipaddress.ip_network(cidr, strict=False) for cidr in trusted]

    def is_trusted(address: str) -> bool:
        try:
            return any(ipaddress.ip_address(address) in net for net in networks)
        except ValueError:
            return False

    if not is_trusted(remote):
        return remote
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else remote


def too_many(refused: TooManyAttempts) -> Response:
    response = Response(
        _errors("TOOMANYREQUESTS", str(refused), {"retry_after_seconds": refused.retry_after}),
        status=TOO_MANY_STATUS,
        content_type="application/json",
    )
    response.headers["Retry-After"] = str(refused.retry_after)
    return response


def _first(value: str | None) -> str:
    """The first of a comma-separated forwarded value (the proxy nearest the client)."""
    return (value or "").split(",")[0].strip()


def _detail_of(access: Access) -> list[dict[str, str]]:
    kind, name, action = access
    return [{"Type": kind, "Name": name, "Action": action}]
