"""bench-pull's pieces: the layers' files, the cold-pull check, and both clients pulling
from the live registry into throwaway places (the bench itself: `make bench-pull`)."""

from __future__ import annotations

import gzip
import sys
import tarfile
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from bench import core
from bench.pull import (
    PULLERS,
    ImageSpec,
    check_cold,
    make_tar,
    metric_samples,
    plan_layers,
    take_files,
)
from bench.restore import write_layout
from deploy.stack import Stack
from pipelines import metrics
from tests.conftest import LiveStack


def test_layers_take_disjoint_files_near_their_size() -> None:
    pool = [(f"/f{number}", size) for number, size in enumerate([300, 5000, 40, 900] * 50)]
    specs = (ImageSpec("a", "docker", (0.02, 0.005)), ImageSpec("b", "pgzip", (0.01, 0.001)))
    sizes = dict(pool)
    plan = plan_layers(pool, specs, scale=1.0)
    layers = [files for image in plan.values() for files in image]
    names = [name for files in layers for name in files]
    assert len(names) == len(set(names)), "a file in two layers"
    for files, mb in zip(layers, (0.02, 0.005, 0.01, 0.001), strict=True):
        target = mb * 1_000_000
        assert target * 0.9 <= sum(sizes[name] for name in files) <= target * 1.1 + 4096
    assert not set(names) & {name for name, _size in pool}, "chosen files left in the pool"
    with pytest.raises(RuntimeError, match="no files left"):
        take_files([(name, 10**9) for name, _size in pool], 1000)


def test_a_layer_tar_names_its_files_relative_to_the_root(tmp_path: Path) -> None:
    files = []
    for number in range(3):
        file = tmp_path / "tree" / f"file-{number}"
        file.parent.mkdir(exist_ok=True)
        file.write_bytes(bytes([number]) * 1000)
        files.append(str(file))
    data = make_tar(files, tmp_path / "layer.tar")
    with tarfile.open(tmp_path / "layer.tar") as tar:
        assert tar.getnames() == [name.lstrip("/") for name in files]
    assert len(data) == (tmp_path / "layer.tar").stat().st_size


def test_the_api_metrics_say_what_served_the_gets() -> None:
    before = metric_samples(generate_latest(REGISTRY).decode())
    metrics.BLOB_GETS.labels("restore").inc(3)
    metrics.BLOB_GETS.labels("spool").inc()
    metrics.RESTORE_SECONDS.labels("on-demand").observe(1.5)
    metrics.RESTORE_SECONDS.labels("warm").observe(0.5)
    after = metric_samples(generate_latest(REGISTRY).decode())
    assert after["gets_restore"] - before.get("gets_restore", 0) == 3
    assert after["gets_spool"] - before.get("gets_spool", 0) == 1
    assert after["restore_wall_sum"] - before.get("restore_wall_sum", 0) == 2.0
    assert after["restore_wall_count"] - before.get("restore_wall_count", 0) == 2


def test_a_pull_is_cold_only_if_every_layer_restored() -> None:
    image = core.Image("i", Path("."), "t", "sha256:m", "sha256:c", ["sha256:1", "sha256:2"], 0)
    check_cold(image, {"gets_restore": 2, "gets_intact": 1, "gets_spool": 0})
    with pytest.raises(RuntimeError, match="not a cold pull"):
        check_cold(image, {"gets_restore": 1, "gets_spool": 1})
    with pytest.raises(RuntimeError, match="not a cold pull"):
        check_cold(image, {"gets_restore": 2, "gets_buffer": 1})


@pytest.mark.parametrize("client", sorted(PULLERS))
def test_each_client_pulls_the_pushed_image_and_leaves_nothing(
    live: LiveStack, tmp_path: Path, client: str
) -> None:
    files = []
    for number in range(2):
        file = tmp_path / "tree" / f"layer-{number}.txt"
        file.parent.mkdir(exist_ok=True)
        file.write_text(f"layer {number}\n" * 1000)
        files.append(str(file))
    tars = [make_tar([name], tmp_path / f"layer-{n}.tar") for n, name in enumerate(files)]
    write_layout(tmp_path / "layout", [gzip.compress(tar, mtime=0) for tar in tars])
    image = core.load_image("smoke", tmp_path / "layout")
    ours = core.Registry("duphunter", live.url.removeprefix("http://"))
    repo = f"bench/pull-smoke-{client}"
    core.push(image, ours, repo, tmp_path)
    homes_before = set(Path("/tmp").glob("dh-pull-*"))

    pulled = PULLERS[client](image, ours, repo)
    assert pulled.seconds > 0 and pulled.cpu_seconds > 0
    other = core.Image(**{**image.__dict__, "manifest": "sha256:" + "0" * 64})
    with pytest.raises(RuntimeError, match=r"pulled|returned"):
        PULLERS[client](other, ours, repo)
    assert set(Path("/tmp").glob("dh-pull-*")) == homes_before, "a podman home was left"


SPIN = """import time
end = time.process_time() + 0.5
while time.process_time() < end:
    pass
"""


def test_the_stacks_cpu_is_split_by_service_and_by_the_helpers_they_ran(tmp_path: Path) -> None:
    """What bench-pull reports of each service: a spinning service's CPU on its own name,
    a sleeping one's near nothing, a helper it ran and waited for on "<name> helpers"."""
    run_helper = f"import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', {SPIN!r}])"
    with Stack(tmp_path) as stack:
        stack.spawn("spinner", [sys.executable, "-c", SPIN + "time.sleep(60)"])
        stack.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
        stack.spawn("parent", [sys.executable, "-c", run_helper + "\ntime.sleep(60)"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            split = core.stack_cpu_split(stack)
            if split.get("parent helpers", 0) >= 0.5 and split["spinner"] >= 0.5:
                break
            time.sleep(0.1)
    assert split["spinner"] >= 0.5 and split["parent helpers"] >= 0.5
    assert split["sleeper"] < 0.3 and split["parent"] < 0.3
    assert "spinner helpers" not in split and "sleeper helpers" not in split


def test_a_services_served_helpers_count_as_its_helpers(tmp_path: Path, helper_dir: Path) -> None:
    """A served segment helper stays up (it is not waited for): its CPU is still the
    service's helpers', not the service's own."""
    serve = (
        "import os, time\n"
        "from pipelines.encoders.segment_helpers import run_segment_helper\n"
        f"argv = [{str(helper_dir / 'gzip-go1.26')!r}, '-mode', 'segment', '-level', '9']\n"
        "data = os.urandom(1 << 20) * 8\n"
        "end = time.monotonic() + 2\n"
        "while time.monotonic() < end:\n"
        "    run_segment_helper(argv, [data])\n"
        "time.sleep(60)\n"
    )  # fmt: skip
    with Stack(tmp_path) as stack:
        stack.spawn("server", [sys.executable, "-c", serve])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            split = core.stack_cpu_split(stack)
            if split.get("server helpers", 0) >= 1.0:
                break
            time.sleep(0.1)
    assert split["server helpers"] >= 1.0
    assert split["server"] < 0.5 * split["server helpers"]
