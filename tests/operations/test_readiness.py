"""Readiness answered from a cached state must not hide a backend that hangs: a Redis
that accepts connections and never answers (frozen with SIGSTOP, as a hung host) makes
the refresh of the cached answer hang, and within a few refresh intervals the answer
turns not-ready with "readiness check stale" (here: the test process's Redis client has
no timeout), and the API's answer turns 503 within a bound."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator

import yaml

from deploy.stack import REPO_ROOT, wait_until
from tests.client import RegistryClient
from tests.conftest import LiveStack
from workers.jobs import READY_MAX_AGE_SECONDS, READY_STALE_AFTER_SECONDS, STALE, CachedReadiness

QUICK_AGE, QUICK_STALE = 0.2, 1.0  # the in-process cache's intervals, shortened


@contextlib.contextmanager
def redis_frozen(live: LiveStack) -> Iterator[None]:
    live.stack.signal_service("redis", signal.SIGSTOP)
    try:
        yield
    finally:
        live.stack.signal_service("redis", signal.SIGCONT)


def stale(checks: dict[str, dict[str, object]]) -> bool:
    fresh = checks.get("fresh", {})
    return fresh.get("ok") is False and str(fresh.get("error", "")).startswith(STALE)


def test_a_refresh_that_hangs_turns_the_cached_answer_not_ready(live: LiveStack) -> None:
    answered = CachedReadiness(live.registry, QUICK_AGE, stale_after=QUICK_STALE)
    assert all(check["ok"] for check in answered.get("backends").values())
    with redis_frozen(live):
        started = time.monotonic()
        wait_until(lambda: stale(answered.get("backends")), "the stale answer", 10, 0.05)
        assert time.monotonic() - started < QUICK_AGE + QUICK_STALE + 5
        checks = answered.get("backends")
        assert not all(check["ok"] for check in checks.values())
        assert checks["redis"]["ok"] is True  # the last answer is still shown, with `fresh`
        first = CachedReadiness(live.registry, QUICK_AGE, stale_after=QUICK_STALE)
        waited = time.monotonic()
        assert stale(first.get("all"))  # a first answer is waited for, not for ever
        assert time.monotonic() - waited < QUICK_STALE + 5
    wait_until(lambda: all(c["ok"] for c in answered.get("backends").values()), "ready again")


def test_the_api_turns_not_ready_within_a_bound_while_redis_hangs(
    live: LiveStack, client: RegistryClient
) -> None:
    """Through the API, whichever comes first: the Redis check's own timeout, or the
    refresh found hanging ("readiness check stale"). Never the last good answer."""

    def backends() -> tuple[int, dict[str, dict[str, object]]]:
        response = client.request("GET", "/api/v1/ready", scope="backends")
        return response.status, json.loads(response.data)["checks"]

    def hung(checks: dict[str, dict[str, object]]) -> bool:
        return stale(checks) or checks["redis"]["ok"] is False

    wait_until(lambda: backends()[0] == 200, "ready before", timeout=60)
    bound = READY_MAX_AGE_SECONDS + READY_STALE_AFTER_SECONDS + 30
    with redis_frozen(live):
        wait_until(lambda: hung(backends()[1]), "not ready", timeout=bound)
        status, checks = backends()
        assert status == 503 and hung(checks), checks
        assert client.request("GET", "/api/v1/health").status == 200
    wait_until(lambda: backends()[0] == 200, "ready after", timeout=60)


def test_compose_and_kubernetes_probe_readiness_the_documented_way() -> None:
    probe = "/api/v1/ready?scope=backends"
    documents = yaml.safe_load_all((REPO_ROOT / "deploy" / "k8s" / "api.yaml").read_text())
    deployment = next(document for document in documents if document["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == probe
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "compose.yaml").read_text())
    healthcheck = " ".join(compose["services"]["api"]["healthcheck"]["test"])
    assert f"http://127.0.0.1:5000{probe}" in healthcheck
    assert f"| readiness | `{probe}` |" in (REPO_ROOT / "docs" / "operations.md").read_text()
    assert f"`{probe}`" in (REPO_ROOT / "deploy" / "k8s" / "README.md").read_text()
