"""What every benchmark reports with its figures: the machine, and its own section of
docs/benchmarks.md, replaced in place on each run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
RESULTS = REPO_ROOT / "docs" / "bench"  # raw results, committed beside the docs


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


def git_state() -> str:
    """The commit the figures were measured at (and whether the tree had changes)."""
    head = sh(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]).strip()
    dirty = sh(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", ":!docs"]).strip()
    return f"commit {head}" + (" plus uncommitted changes" if dirty else "")


def save_json(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def bar_chart(
    path: Path,
    title: str,
    groups: dict[str, dict[str, float]],
    ylabel: str,
    target: float | None = None,
    log: bool = False,
) -> Path:
    """A grouped bar chart (PNG): one group per key of `groups`, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys(name for bars in groups.values() for name in bars))
    width = 0.8 / max(len(series), 1)
    figure, axes = plt.subplots(figsize=(min(11.0, max(6.0, 0.8 * len(groups) * len(series))), 4.0))
    for number, name in enumerate(series):
        positions = [index + number * width for index in range(len(groups))]
        values = [bars.get(name, 0.0) for bars in groups.values()]
        axes.bar(positions, values, width, label=name)
    axes.set_xticks([index + width * (len(series) - 1) / 2 for index in range(len(groups))])
    axes.set_xticklabels(list(groups), rotation=20, ha="right", fontsize=8)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    if log:
        axes.set_yscale("log")
    if target is not None:
        axes.axhline(target, color="black", linestyle="--", linewidth=0.8, label=f"target {target}")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
