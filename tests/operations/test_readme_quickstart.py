"""The README's quick start, run verbatim: the fenced shell block after the
`<!-- quickstart -->` marker, with bash, against the test stack (REGISTRY points at it).
A command of the quick start that breaks, or an image that does not come back byte for
byte, fails this test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from urllib.parse import urlsplit

import pytest

from deploy.stack import REPO_ROOT
from tests.conftest import LiveStack

MARKER = "<!-- quickstart"
QUICKSTART_SECONDS = 120  # a guard against a hang; it takes ~15 s


def quickstart_script(readme: str) -> str:
    """The first ```sh block after the marker, exactly as the README shows it."""
    after = readme.split(MARKER, 1)
    assert len(after) == 2, "README.md has no quickstart marker"
    found = re.search(r"```sh\n(.*?)```", after[1], re.DOTALL)
    assert found is not None, "no shell block after the quickstart marker"
    return found.group(1)


@pytest.mark.skipif(
    not (shutil.which("umoci") and shutil.which("skopeo")),
    reason="the quick start needs umoci and skopeo (make test installs them)",
)
def test_the_readme_quick_start_runs_verbatim(live: LiveStack) -> None:
    script = quickstart_script((REPO_ROOT / "README.md").read_text())
    env = {**os.environ, "REGISTRY": urlsplit(live.url).netloc}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=QUICKSTART_SECONDS,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "demo/app:v2 came back byte for byte" in done.stdout, output
    assert "deduplicated" in done.stdout, output  # `duphunter stats` showed the dedup
