"""The predictors on hand-made histories: what the paper's rule and the history rule
choose to rebuild after a manifest GET, and which platform of an index; the pull-period
predictor's estimates and plans, then its plans in Redis and the registry acting on them
(on the live stack)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from deploy.stack import wait_until
from pipelines.config import Settings
from pipelines.registry.facade import Registry
from pipelines.serve.predict import (
    PAPER_THRESHOLD,
    PERIOD,
    PERIOD_MARGIN_SECONDS,
    PERIOD_MAX_PER_SCAN,
    PERIOD_MIN_INTERVALS,
    PERIOD_MISSED,
    PREDICTORS,
    RESTORE_BYTES_PER_SECOND,
    SAME_PULL_SECONDS,
    ClientHistory,
    LayerPulls,
    PeriodPlan,
    Prediction,
    PullPeriod,
    PullPeriods,
    choose_platform,
    distinct_pulls,
    estimate_period,
    fleet_rule,
    history_rule,
    lead_seconds,
    paper_rule,
    plan_next,
    predict,
    restore_bytes_ahead,
)
from tests.client import OCI_MANIFEST, RegistryClient, sha256
from tests.conftest import LiveStack, own_live_stack
from tests.layers import deduplicated_layer, make_tar, wait_for_layers, wait_until_retired
from tests.serve.test_buffer import empty_redis_db
from workers.app import make_celery

LAYERS = ["sha256:base", "sha256:libs", "sha256:app"]
SIZES = {"sha256:base": 30 << 20, "sha256:libs": 80 << 20, "sha256:app": 5 << 20}


def holding(*digests: str, count: int = 1) -> ClientHistory:
    return ClientHistory(layers={d: LayerPulls(count, 1.0) for d in digests})


def chosen(predictions: list[Prediction]) -> list[str]:
    return [p.digest for p in predictions]


def test_paper_rule_takes_what_the_client_lacks() -> None:
    history = holding("sha256:base")
    assert chosen(paper_rule(LAYERS, history)) == ["sha256:libs", "sha256:app"]


def test_paper_rule_adds_layers_pulled_more_than_the_threshold() -> None:
    history = holding("sha256:base", "sha256:libs", count=PAPER_THRESHOLD + 1)
    history.layers["sha256:app"] = LayerPulls(PAPER_THRESHOLD, 1.0)  # not more than it
    assert chosen(paper_rule(LAYERS, history)) == ["sha256:base", "sha256:libs"]


def test_paper_rule_for_a_new_client_takes_everything_once() -> None:
    assert chosen(paper_rule([*LAYERS, "sha256:base"], ClientHistory())) == LAYERS


def test_history_rule_for_a_new_client_takes_everything_largest_first() -> None:
    assert chosen(history_rule(LAYERS, ClientHistory(), SIZES)) == [
        "sha256:libs",
        "sha256:base",
        "sha256:app",
    ]


def test_history_rule_skips_held_layers_of_a_client_that_never_repulls() -> None:
    history = holding("sha256:base", "sha256:libs")
    history.held, history.repulled = 40.0, 0.0  # 40 chances to repull, none taken
    history.lacked, history.fetched_lacking = 10.0, 10.0
    assert chosen(history_rule(LAYERS, history, SIZES)) == ["sha256:app"]


def test_history_rule_keeps_held_layers_of_an_always_pull_client() -> None:
    history = holding("sha256:base", "sha256:libs", "sha256:app")
    history.held, history.repulled = 30.0, 28.0
    assert set(chosen(history_rule(LAYERS, history, SIZES))) == set(LAYERS)


def test_history_rule_skips_missing_layers_of_a_client_that_does_not_follow() -> None:
    """A client that GETs manifests but rarely the layers (a scanner, a tag watcher)."""
    history = ClientHistory(lacked=50.0, fetched_lacking=1.0)
    assert history_rule(LAYERS, history, SIZES) == []


def test_probabilities_are_smoothed_for_a_new_client() -> None:
    fresh = ClientHistory()
    assert fresh.follow_probability() == 0.5 and fresh.repull_probability() == 0.5


def test_none_predicts_nothing() -> None:
    assert predict("none", LAYERS, ClientHistory(), SIZES) == []


def test_fleet_rule_takes_the_layers_never_pulled_through_the_repository() -> None:
    assert fleet_rule(["base", "top", "top"], {"base", "old-top"}) == [Prediction("top", 1.0)]
    assert fleet_rule(["base"], {"base"}) == []
    assert [p.digest for p in fleet_rule(["a", "b"], set())] == ["a", "b"]


def test_platform_choice_follows_the_client_habit() -> None:
    platforms = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    assert choose_platform(platforms, ClientHistory()) == 0
    arm = ClientHistory(platforms={"linux/arm64": 5, "linux/amd64": 1})
    assert choose_platform(platforms, arm) == 1
    assert choose_platform([], arm) == -1


# --- the pull-period predictor -------------------------------------------------------------

PERIOD_S = 600.0


def pulls_every(*intervals: float, start: float = 1_000_000.0) -> list[float]:
    times = [start]
    for interval in intervals:
        times.append(times[-1] + interval)
    return times


def test_a_regular_client_has_its_period() -> None:
    estimate = estimate_period(pulls_every(*[PERIOD_S] * 5))
    assert estimate == PullPeriod(PERIOD_S, 0.0, 1_000_000.0 + 5 * PERIOD_S)


def test_a_jittered_client_has_the_median_period_and_its_spread() -> None:
    estimate = estimate_period(pulls_every(560, 650, 600, 610, 540, 630))
    assert estimate is not None
    assert estimate.period == 605 and estimate.spread == 65  # |540 - 605|


def test_an_irregular_client_has_no_period() -> None:
    assert estimate_period(pulls_every(30, 900, 120, 2400, 45, 600)) is None
    # most intervals regular, but the latest is not: its habit changed
    assert estimate_period(pulls_every(600, 600, 600, 600, 100)) is None


def test_a_period_needs_enough_regular_intervals() -> None:
    assert estimate_period(pulls_every(*[PERIOD_S] * (PERIOD_MIN_INTERVALS - 1))) is None
    assert estimate_period(pulls_every(*[PERIOD_S] * PERIOD_MIN_INTERVALS)) is not None
    assert estimate_period(pulls_every(1, 1, 1, 1, 1)) is None  # one pull, six GETs


def test_manifest_gets_of_one_pull_count_once() -> None:
    times = pulls_every(PERIOD_S, PERIOD_S, PERIOD_S)
    doubled = sorted(times + [at + SAME_PULL_SECONDS / 2 for at in times])  # index + child
    assert distinct_pulls(doubled) == times
    assert estimate_period(doubled) == estimate_period(times)


def test_the_plan_starts_the_rebuilds_a_lead_time_before_the_window_opens() -> None:
    period = PullPeriod(PERIOD_S, 30.0, last=0.0)
    small = plan_next(period, 0, not_before=0.0, scan_seconds=5.0)
    large = plan_next(period, 400_000_000, not_before=0.0, scan_seconds=5.0)
    assert small is not None and large is not None
    assert small.n == 1 and small.ready_by == PERIOD_S - 30
    assert small.expires == PERIOD_S + 30 + PERIOD_MARGIN_SECONDS
    assert small.fire_at == small.ready_by - lead_seconds(0, 5.0)
    assert lead_seconds(0, 5.0) == PERIOD_MARGIN_SECONDS + 5.0
    # 400 MB to rebuild: RESTORE_BYTES_PER_SECOND more lead, 20 s at 20 MB/s
    assert small.fire_at - large.fire_at == 400_000_000 / RESTORE_BYTES_PER_SECOND
    # more to rebuild than the period allows: at once
    assert plan_next(period, 10**13, not_before=5.0, scan_seconds=5.0) == PeriodPlan(
        5.0, PERIOD_S - 30, PERIOD_S + 30 + PERIOD_MARGIN_SECONDS, 1
    )


def test_a_client_that_stops_pulling_stops_being_predicted() -> None:
    period = PullPeriod(PERIOD_S, 30.0, last=0.0)
    missed_one = plan_next(period, 0, not_before=PERIOD_S + 41, scan_seconds=5.0)
    assert missed_one is not None and missed_one.n == 2
    assert missed_one.ready_by == 2 * PERIOD_S - 60  # the spread adds up
    assert PERIOD_MISSED == 2
    assert plan_next(period, 0, not_before=2 * PERIOD_S + 71, scan_seconds=5.0) is None


def test_the_lead_covers_at_least_the_largest_layer() -> None:
    assert restore_bytes_ahead([], SIZES) == 80 << 20
    both = [Prediction("sha256:libs", 1.0), Prediction("sha256:base", 1.0)]
    assert restore_bytes_ahead(both, SIZES) == 110 << 20
    assert restore_bytes_ahead([], {}) == 0


def test_period_predicts_at_a_manifest_get_as_history_does() -> None:
    history = holding("sha256:base")
    assert predict("period", LAYERS, history, SIZES) == history_rule(LAYERS, history, SIZES)
    assert "period" in PREDICTORS


def test_the_scan_is_scheduled_only_for_the_period_predictor() -> None:
    periodic = make_celery(dataclasses.replace(Settings(), predictor="period"))
    assert "predict-periodic-pulls" in periodic.conf.beat_schedule
    plain = make_celery(dataclasses.replace(Settings(), predictor="history"))
    assert "predict-periodic-pulls" not in plain.conf.beat_schedule


# --- its plans in Redis, and the registry acting on them (live stack) -------------------


def periods_on_empty_db(live: LiveStack) -> PullPeriods:
    return PullPeriods(empty_redis_db(live, 7), scan_seconds=5.0)


def test_a_due_plan_is_claimed_once_then_the_next_pull_is_planned(live: LiveStack) -> None:
    periods = periods_on_empty_db(live)
    times = pulls_every(*[PERIOD_S] * 3, start=0.0)
    plans = [periods.record_pull("ci-1", "app", "latest", at, 0) for at in times]
    assert plans[:-1] == [None, None, None]  # three pulls: two intervals, too few
    first = plans[-1]
    assert first is not None and first.n == 1 and first.ready_by == 4 * PERIOD_S
    assert periods.claim_due(first.fire_at - 1) == []
    (due,) = periods.claim_due(first.fire_at)
    assert (due.client, due.repository, due.reference, due.plan) == ("ci-1", "app", "latest", first)
    assert periods.claim_due(first.fire_at) == []  # claimed once
    # the pull did not come: the one after is planned, then nothing (the client stopped)
    assert periods.claim_due(5 * PERIOD_S - lead_seconds(0, 5.0) - 1) == []
    (second,) = periods.claim_due(5 * PERIOD_S - lead_seconds(0, 5.0))
    assert second.plan.n == 2 and second.plan.ready_by == 5 * PERIOD_S
    assert periods.claim_due(10 * PERIOD_S) == []
    assert periods.redis.zcard(PullPeriods.DUE) == 0


def test_a_pull_replaces_the_plan_made_before_it(live: LiveStack) -> None:
    periods = periods_on_empty_db(live)
    for at in pulls_every(*[PERIOD_S] * 3, start=0.0):
        periods.record_pull("node-1", "app", "stable", at, 0)
    later = periods.record_pull("node-1", "app", "stable", 4 * PERIOD_S - 20, 0)
    assert later is not None and later.ready_by > 5 * PERIOD_S - 100
    assert periods.claim_due(4 * PERIOD_S + 60) == []  # the old plan is gone


def test_a_scan_claims_at_most_its_bound(live: LiveStack) -> None:
    periods = periods_on_empty_db(live)
    for n in range(PERIOD_MAX_PER_SCAN + 4):
        for at in pulls_every(*[PERIOD_S] * 3, start=0.0):
            periods.record_pull(f"node-{n}", "app", "stable", at, 0)
    assert len(periods.claim_due(4 * PERIOD_S)) == PERIOD_MAX_PER_SCAN
    assert len(periods.claim_due(4 * PERIOD_S)) == 4
    assert len(periods.claim_due(4 * PERIOD_S)) == 0


def period_registry(live: LiveStack) -> Registry:
    """The stack's registry, with the `period` predictor (the stack's workers keep
    `history` and no scan: this test's calls alone act)."""
    return Registry.connect(dataclasses.replace(live.settings, predictor="period"))


def base_and_next(
    client: RegistryClient, repo: str, live: LiveStack
) -> tuple[str, str, str, dict[str, Any]]:
    """`repo:latest`, an image of one base layer, and `repo:next`, that base and a new top
    layer, both deduplicated: the base's and the top's digests, next's digest and manifest."""
    base, top = (
        gzip.compress(make_tar({name: os.urandom(1 << 20)}), mtime=0) for name in ("b", "t")
    )
    base_digest = deduplicated_layer(client, repo, live, base)
    next_digest, manifest = client.push_image(repo, "next", [base, top])
    top_digest = sha256(top)
    assert wait_for_layers(live, [top_digest])[top_digest]["state"] == "deduplicated"
    wait_until_retired(live, top_digest)
    return base_digest, top_digest, next_digest, manifest


def test_a_regular_pull_of_a_moved_tag_rebuilds_its_new_layer_ahead(
    client: RegistryClient, repo: str, live: LiveStack
) -> None:
    """A node pulls repo:latest every minute; the tag then moves to an image with a new
    top layer: the plan for its next pull rebuilds that layer (which it lacks), not the
    base it holds and never GETs again; a layer already buffered is not rebuilt."""
    base_digest, top_digest, new_digest, new_manifest = base_and_next(client, repo, live)
    registry = period_registry(live)
    node, minute, start = f"node-{os.urandom(3).hex()}", 60.0, time.time() - 180
    old_digest = registry.manifests.resolve(repo, "latest")
    for n in range(4):
        at = start + n * minute
        registry.on_manifest_get(node, repo, old_digest, at, "latest")
        if n == 0:
            registry.on_blob_get(node, repo, base_digest, at + 1)
    content = json.dumps(new_manifest).encode()
    registry.manifests.put(repo, "latest", content, OCI_MANIFEST)  # no event: no worker acts
    assert registry.manifests.resolve(repo, "latest") == new_digest
    lead = lead_seconds(0, registry.settings.period_scan_seconds)  # 1 MiB: ~0.05 s more
    assert registry.on_periods_due(start + 4 * minute - lead - 1) == []
    ((plan, predictions),) = registry.on_periods_due(start + 4 * minute - lead)
    assert plan.ready_by == start + 4 * minute
    assert [p.digest for p in predictions] == [top_digest]
    # the next plan (a missed pull), with the new layer buffered: nothing to rebuild
    assert registry.server.preconstruct(top_digest, "warm", 1) == "filled"
    ((_plan, predictions),) = registry.on_periods_due(start + 5 * minute)
    assert predictions == []


@pytest.fixture(scope="module")
def periodic_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """A stack of its own with the `period` predictor, its scan every second."""
    workdir = tmp_path_factory.mktemp("periodic-stack")
    extra = {"DUPHUNTER_PREDICTOR": "period", "DUPHUNTER_PERIOD_SCAN_SECONDS": "1"}
    with own_live_stack(workdir, extra) as live:
        yield live


def test_the_scan_rebuilds_ahead_of_a_regular_pull(periodic_stack: LiveStack) -> None:
    """The workers' beat-driven scan acts on a due plan by itself: the new layer of the
    tag a node pulls every 10 s is rebuilt into the buffer (origin `period`) before its
    next pull, the base it holds is not."""
    live, repo = periodic_stack, f"test/{os.urandom(6).hex()}"
    client = RegistryClient(live.url)
    base_digest, top_digest, _digest, moved = base_and_next(client, repo, live)
    old_digest = live.registry.manifests.resolve(repo, "latest")
    live.registry.manifests.put(repo, "latest", json.dumps(moved).encode(), OCI_MANIFEST)
    node, now = "10.20.30.40", time.time()
    for n in range(4):  # pulls 10 s apart, the last one now: the next is due in 10 s
        live.registry.on_manifest_get(node, repo, old_digest, now - 30 + 10 * n, "latest")
        if n == 0:
            live.registry.on_blob_get(node, repo, base_digest, now - 29)
    filled = lambda: (e := live.registry.buffer.entry(top_digest)) is not None and e.complete  # noqa: E731
    wait_until(filled, "the rebuild of the moved tag's new layer", timeout=60)
    entry = live.registry.buffer.entry(top_digest)
    assert entry is not None and entry.origin == PERIOD
    assert live.registry.buffer.entry(base_digest) is None
