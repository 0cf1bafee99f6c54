"""Real programs the tests run (gzip, pigz, zstd, ...): a skip where one is not
installed, and bytes piped through one."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def run_tool(argv: list[str], data: bytes) -> bytes:
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout
