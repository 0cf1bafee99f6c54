"""Retention policies: which tags to delete, per repository pattern.

The policy (DUPHUNTER_RETENTION_POLICY names a JSON file) is a list of rules; the first
rule whose pattern matches a repository applies to it, other repositories keep all tags:

    {"rules": [
        {"repositories": "team/*", "keep_last": 10, "keep_newer_than_days": 30},
        {"repositories": "ci/**", "keep_last": 3}
    ]}

Patterns follow the auth policy's rules (`pipelines.registry.globs`): `*` and `?` stay within one
path component, `**` crosses them (`team/*` matches `team/app`, not `team/app/sub`;
`ci/**` matches both `ci/app` and `ci/app/sub`).

A tag is kept if it is among the `keep_last` most recently pushed, or was pushed within
`keep_newer_than_days` (either condition keeps it; a rule with neither keeps nothing).
A tag's time is when its tag object was last written in S3. Deleting a tag leaves its
manifest untagged; garbage collection (with DUPHUNTER_GC_UNTAGGED) frees what only it
held.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.registry.globs import glob_regex


class PolicyError(ValueError):
    """The policy file is not what the module docstring describes."""


@dataclass(frozen=True)
class Rule:
    pattern: str
    keep_last: int | None
    keep_newer_than_days: float | None

    def matches(self, repository: str) -> bool:
        return glob_regex(self.pattern).fullmatch(repository) is not None

    def doomed(self, tags: dict[str, float], now: float) -> list[str]:
        """The tags (name -> push time) this rule does not keep."""
        newest_first = sorted(tags, key=lambda tag: (-tags[tag], tag))
        kept = set(newest_first[: self.keep_last or 0])
        if self.keep_newer_than_days is not None:
            horizon = now - self.keep_newer_than_days * 86400
            kept |= {tag for tag, pushed in tags.items() if pushed >= horizon}
        return sorted(set(tags) - kept)


def load_policy(path: str) -> list[Rule]:
    if not path:
        return []
    try:
        document = json.loads(Path(path).read_text())
        return [_rule(item) for item in document["rules"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PolicyError(f"retention policy {path}: {error}") from error


def _rule(item: dict[str, Any]) -> Rule:
    keep_last = item.get("keep_last")
    newer = item.get("keep_newer_than_days")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 0):
        raise ValueError("keep_last must be a whole number >= 0")
    if newer is not None and (not isinstance(newer, int | float) or newer < 0):
        raise ValueError("keep_newer_than_days must be a number >= 0")
    return Rule(str(item["repositories"]), keep_last, None if newer is None else float(newer))


def rule_for(rules: list[Rule], repository: str) -> Rule | None:
    return next((rule for rule in rules if rule.matches(repository)), None)


def plan(
    rules: list[Rule], tags_by_repository: dict[str, dict[str, float]]
) -> dict[str, list[str]]:
    """Per repository, the tags the policy deletes."""
    now = time.time()
    doomed = {}
    for repository, tags in sorted(tags_by_repository.items()):
        rule = rule_for(rules, repository)
        if rule is not None and (found := rule.doomed(tags, now)):
            doomed[repository] = found
    return doomed
