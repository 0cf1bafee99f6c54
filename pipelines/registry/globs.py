"""Repository-name patterns, as the auth policy and the retention policy write them."""

from __future__ import annotations

import re


def glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` and `?` stay within one path component, `**` crosses them."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wild = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wild.get(part, re.escape(part)) for part in parts))
