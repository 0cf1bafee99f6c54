"""Repository names (OCI Distribution spec): what the API, authorization and mounts
accept, in one module that imports nothing of the registry."""

from __future__ import annotations

import re

from pipelines.errors import RegistryError

NAME_PATTERN = re.compile(
    r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$"
)
MAX_NAME_LENGTH = 255


def valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and bool(NAME_PATTERN.match(name))


def check_name(name: str) -> None:
    if not valid_name(name):
        raise RegistryError("NAME_INVALID", "invalid repository name", {"name": name})
