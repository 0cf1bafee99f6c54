"""The predictors on hand-made histories, without a stack: what the paper's rule and the
history rule choose to rebuild after a manifest GET, and which platform of an index."""

from __future__ import annotations

from pipelines.predict import (
    PAPER_THRESHOLD,
    ClientHistory,
    LayerPulls,
    Prediction,
    choose_platform,
    fleet_rule,
    history_rule,
    paper_rule,
    predict,
)

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
