"""The hit-ratio bound bench-predict reports beside its runs, and its offline simulation
of the predictors, on hand-made workloads."""

from __future__ import annotations

from api.replay.workload import Event, FileSpec, ImageSpec, LayerSpec, Pull, Workload
from bench.predict import demand_cache_bound, tag_put_bound
from bench.predict_offline import (
    PeriodicSpec,
    SimParams,
    Simulation,
    periods_found,
    simulate,
    with_periodic_clients,
)

A, B, C = "sha256:a", "sha256:b", "sha256:c"


def trace(*digests: str, gap: float = 100.0, size: int = 10) -> list[tuple[float, str, int]]:
    return [(n * gap, digest, size) for n, digest in enumerate(digests)]


def test_the_cache_keeps_the_layer_needed_soonest() -> None:
    # Room for one layer: A is kept (needed again before B), B is restored twice.
    assert demand_cache_bound(trace(A, B, A, B), capacity=10, spool_s=0) == 1 / 4
    # Room for both: every repeat is served.
    assert demand_cache_bound(trace(A, B, A, B), capacity=20, spool_s=0) == 2 / 4


def test_a_layer_never_needed_again_is_not_kept() -> None:
    # C would push A out, but C is not needed again: A stays.
    assert demand_cache_bound(trace(A, C, A), capacity=10, spool_s=0) == 1 / 3


def test_the_spool_serves_gets_soon_after_a_restore() -> None:
    assert demand_cache_bound(trace(A, A, gap=10), capacity=0, spool_s=30) == 1 / 2
    assert demand_cache_bound(trace(A, A, gap=40), capacity=0, spool_s=30) == 0
    assert demand_cache_bound([], capacity=10, spool_s=30) == 0


def test_tag_puts_leave_only_first_gets_of_layers_tagged_at_start() -> None:
    gets = [(0.0, "old", 1), (1.0, "new", 1), (2.0, "old", 1), (3.0, "new", 1)]
    assert tag_put_bound(gets, {"old"}) == 0.75
    assert tag_put_bound(gets, {"old", "new"}) == 0.5
    assert tag_put_bound([], {"old"}) == 0.0


# --- the offline simulation (bench/predict_offline.py) -----------------------------------


def two_ci_runners(period: float = 600.0, pulls: int = 6) -> Workload:
    """Two runners pulling from an empty store every `period`, half a period apart, one an
    image of one 40 MB layer, the other of two: with room for two layers, each evicts
    the other's between pulls."""
    layers = {key: LayerSpec(key, (FileSpec(1, 1),), 40_000_000) for key in ("a", "b", "c")}
    images = {
        ("ra", "v1"): ImageSpec("ra", "v1", ("a",)),
        ("rb", "v1"): ImageSpec("rb", "v1", ("b", "c")),
    }
    events: list[Event] = []
    for n in range(pulls):
        events.append(Pull(n * period, "ci-a", "ra", "v1", fresh=True))
        events.append(Pull(n * period + period / 2, "ci-b", "rb", "v1", fresh=True))
    return Workload("synthetic", layers, images, events)


def test_only_the_period_predictor_rebuilds_ahead_of_a_scheduled_pull() -> None:
    results = simulate(two_ci_runners(), SimParams(buffer_share=2 / 3))
    # from a manifest GET, a 2-second rebuild cannot beat a GET 50 ms later
    assert results["history"]["hits"] == 0 and results["history"]["late"] >= 12
    assert results["history"]["hit_ratio"] == results["none"]["hit_ratio"]
    # from the 4th pull on, a runner's period is known: its pulls 5 and 6 find the layers
    period = results["period"]
    assert period["hits"] >= 2 and period["lead_p50_s"] > 0
    assert period["hit_ratio"] > results["none"]["hit_ratio"] + 0.1  # 2 of 18 GETs more


def test_a_runner_that_stops_is_not_predicted_for_long() -> None:
    """ci-a pulls 5 times (the last at 2400 s), ci-b goes on: ci-a's layer is rebuilt for
    its 5th pull, then for the two it missed (3000 s, 3600 s), never after."""
    workload = two_ci_runners(pulls=10)
    workload.events = [e for e in workload.events if e.client == "ci-b" or e.at < 2500]
    simulation = Simulation(workload, "period", SimParams(buffer_share=2 / 3))
    simulation.run()
    planned = [
        r.expected_from for r in simulation.rebuilds if r.digest == "a" and r.origin == "period"
    ]
    assert [round(at / 600) for at in planned] == [4, 5, 6]
    used = [r for r in simulation.rebuilds if r.digest == "a" and r.origin == "period" and r.done]
    assert len(used) == 3 and used[0].admitted


def test_periodic_clients_are_added_to_a_workload() -> None:
    base = two_ci_runners(pulls=1)
    spec = PeriodicSpec(ci_runners=2, ci_period_s=(60.0, 60.0), nodes=1, node_period_s=60.0)
    base.events.append(Pull(900.0, "late", "ra", "v1"))  # the workload lasts 900 s
    periodic = with_periodic_clients(base, spec)
    runners = [e for e in periodic.events if isinstance(e, Pull) and e.client.startswith("ci-r")]
    assert runners and all(e.fresh for e in runners)
    assert 13 <= sum(e.client == "ci-runner00" for e in runners) <= 16
    assert periods_found(periodic)["with_a_period"] >= 3
