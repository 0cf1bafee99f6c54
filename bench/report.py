"""What every benchmark reports with its figures: the machine, and its own section of
docs/benchmarks.md, replaced in place on each run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
RESULTS = REPO_ROOT / "build" / "bench"


def sh(args: list[str], cwd: Path | None = None) -> str:
    """Run a command; its stderr goes to ours and a failure stops the benchmark."""
    done = subprocess.run(args, cwd=cwd, check=False, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"command failed ({done.returncode}): {' '.join(args)}")
    return done.stdout


def machine() -> str:
    model = next(
        (ln for ln in sh(["lscpu"]).splitlines() if ln.startswith("Model name")), "Model name: ?"
    )
    return f"$ nproc\n{sh(['nproc']).strip()}\n$ free -g\n{sh(['free', '-g']).rstrip()}\n" + (
        f"$ lscpu | grep 'Model name'\n{model}"
    )


def write_section(heading: str, body: str, machine_text: str) -> None:
    """Put `heading` + `body` into docs/benchmarks.md, replacing that section if present."""
    text = DOCS.read_text() if DOCS.exists() else ""
    if not text.strip():
        text = f"# Benchmarks\n\n## Machine\n\n```\n{machine_text}\n```\n"
    section = f"{heading}\n\n{body.strip()}\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        rest = "" if end < 0 else text[end + 1 :]
        text = text[:start] + section + ("\n" + rest if rest else "")
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def save_json(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
