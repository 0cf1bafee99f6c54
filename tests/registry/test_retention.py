"""Retention rules on their own (no stack): which repositories a pattern takes, which rule
applies, and which tags a rule keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.registry.retention import PolicyError, Rule, load_policy, plan, rule_for

DAY = 86400.0
NOW = 1_700_000_000.0


def rule(pattern: str, keep_last: int | None = None, newer: float | None = None) -> Rule:
    return Rule(pattern, keep_last, newer)


def test_a_single_star_stays_within_one_path_component() -> None:
    assert rule("team/*").matches("team/app")
    assert not rule("team/*").matches("team/a/b")
    assert not rule("team/*").matches("teams/app")


def test_a_double_star_crosses_path_components() -> None:
    assert rule("team/**").matches("team/a/b")
    assert rule("team/**").matches("team/app")
    assert rule("**").matches("any/depth/at/all")


def test_a_question_mark_is_one_character_but_never_a_slash() -> None:
    assert rule("team/ap?").matches("team/app")
    assert not rule("team?app").matches("team/app")
    assert not rule("team/ap?").matches("team/ap")


def test_other_characters_match_themselves() -> None:
    assert rule("a.b/app").matches("a.b/app")
    assert not rule("a.b/app").matches("aXb/app")


def test_the_first_matching_rule_wins() -> None:
    rules = [rule("team/special", keep_last=50), rule("team/**", keep_last=1), rule("**")]
    assert rule_for(rules, "team/special") is rules[0]
    assert rule_for(rules, "team/special/sub") is rules[1]
    assert rule_for(rules, "other/app") is rules[2]
    assert rule_for(rules[:2], "other/app") is None


def test_keep_last_keeps_the_most_recently_pushed() -> None:
    tags = {"t1": NOW - 3, "t2": NOW - 2, "t3": NOW - 1}
    assert rule("r", keep_last=2).doomed(tags, NOW) == ["t1"]
    assert rule("r", keep_last=0).doomed(tags, NOW) == ["t1", "t2", "t3"]
    assert rule("r", keep_last=5).doomed(tags, NOW) == []


def test_keep_newer_than_days_keeps_what_was_pushed_within_them() -> None:
    tags = {"old": NOW - 10 * DAY, "edge": NOW - 3 * DAY, "new": NOW - DAY}
    assert rule("r", newer=3).doomed(tags, NOW) == ["old"]


def test_either_condition_keeps_a_tag() -> None:
    tags = {"old1": NOW - 30 * DAY, "old2": NOW - 20 * DAY, "new": NOW - DAY}
    assert rule("r", keep_last=1, newer=7).doomed(tags, NOW) == ["old1", "old2"]
    assert rule("r", keep_last=2, newer=7).doomed(tags, NOW) == ["old1"]


def test_a_rule_with_neither_condition_keeps_nothing() -> None:
    assert rule("r").doomed({"a": NOW, "b": NOW - DAY}, NOW) == ["a", "b"]


def test_plan_applies_each_repository_its_first_rule_and_spares_the_rest() -> None:
    rules = [rule("team/*", keep_last=1), rule("team/**", keep_last=2)]
    pushed = {"t1": 1.0, "t2": 2.0, "t3": 3.0}
    doomed = plan(rules, {"team/app": pushed, "team/app/sub": pushed, "other/app": pushed})
    assert doomed == {"team/app": ["t1", "t2"], "team/app/sub": ["t1"]}


def test_a_policy_file_is_read_in_order(tmp_path: Path) -> None:
    path = tmp_path / "retention.json"
    path.write_text(json.dumps({"rules": [
        {"repositories": "ci/**", "keep_last": 3},
        {"repositories": "team/*", "keep_last": 10, "keep_newer_than_days": 30},
    ]}))  # fmt: skip
    assert load_policy(str(path)) == [rule("ci/**", keep_last=3), rule("team/*", 10, 30.0)]
    assert load_policy("") == []


@pytest.mark.parametrize(
    "item",
    [{"keep_last": 3}, {"repositories": "r", "keep_last": -1},
     {"repositories": "r", "keep_newer_than_days": "soon"}],
)  # fmt: skip
def test_a_malformed_rule_is_refused(tmp_path: Path, item: dict[str, object]) -> None:
    path = tmp_path / "retention.json"
    path.write_text(json.dumps({"rules": [item]}))
    with pytest.raises(PolicyError):
        load_policy(str(path))
