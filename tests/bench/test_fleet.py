"""The fleet model's mechanics (bench/fleet.py): exact FIFO queueing, shared restores,
monotonicity in cores, and a validation that compares the same GETs. No stack."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from api.replay.content import RATIO as TAR_PER_BLOB
from bench import fleet
from bench.fleet import Costs, Fleet, Get, Serving, simulate
from pipelines.serve.checkpoints import FIRST_SEGMENT_TAR_BYTES

MB = fleet.MB


def costs(**changes: float) -> Costs:
    """One segment per layer (spacing and first segment larger than any tar), 1 s of CPU
    per MB of tar, no fetch, setup or network cost, stored and Distribution GETs free:
    latencies are queueing and CPU alone."""
    values: dict[str, object] = {
        "encode_cpu_s_per_tar_mb": 1.0,
        "rebuild_cpu_s_per_tar_mb": 0.0,
        "extra_cpu_s_per_tar_mb": 0.0,
        "restore_setup_s": 0.0,
        "s3_rtt_s": 0.0,
        "s3_mb_per_s": 1e12,
        "stored_per_tar": 0.0,
        "net_rtt_s": 0.0,
        "net_mb_per_s": 1e12,
        "other_cpu_share": 0.0,
        "stored": Serving(0.0, 1e12),
        "distribution": Serving(0.0, 1e12),
        "spacing_bytes": 1 << 40,
        "first_segment_bytes": 1 << 40,
    }
    values.update(changes)
    return Costs(**values)  # type: ignore[arg-type]


def layer(at: float, name: str, tar_mb: float, restore: bool = True) -> Get:
    """A GET whose restore takes `tar_mb` seconds of CPU under costs()."""
    return Get(at, f"sha256:{name}", int(tar_mb * MB / TAR_PER_BLOB), restore)


def latencies(gets: list[Get], cores: int, c: Costs | None = None) -> list[float]:
    served = simulate(gets, Fleet(cores, cores, "host"), c or costs())
    return [round(s.seconds, 6) for s in sorted(served, key=lambda s: s.get.at)]


def test_one_core_queues_restores_first_come_first_served() -> None:
    gets = [layer(0.0, "aa", 2.0), layer(0.5, "bb", 1.0), layer(1.0, "cc", 3.0)]
    # a runs 0-2; b waits for it, runs 2-3 (latency 2.5); c runs 3-6 (latency 5)
    assert latencies(gets, 1) == pytest.approx([2.0, 2.5, 5.0], abs=1e-3)


def test_two_cores_serve_two_restores_at_once() -> None:
    gets = [layer(0.0, "aa", 2.0), layer(0.5, "bb", 1.0), layer(1.0, "cc", 3.0)]
    # a on core 1 (0-2), b on core 2 (0.5-1.5), c on core 2 (1.5-4.5)
    assert latencies(gets, 2) == pytest.approx([2.0, 1.0, 3.5], abs=1e-3)


def test_concurrent_gets_of_a_layer_share_one_restore() -> None:
    gets = [layer(0.0, "aa", 2.0), layer(1.0, "aa", 2.0), layer(3.0, "aa", 2.0)]
    served = simulate(gets, Fleet(1, 1, "host"), costs())
    assert [s.source for s in served] == ["restore", "joined", "restore"]
    assert [round(s.seconds, 3) for s in served] == [2.0, 1.0, 2.0]


def test_segments_of_one_layer_spread_over_the_cores() -> None:
    c = costs(spacing_bytes=1 * MB)  # 4 segments of 1 MB of tar
    assert latencies([layer(0.0, "aa", 4.0)], 1, c) == pytest.approx([4.0], abs=1e-3)
    assert latencies([layer(0.0, "aa", 4.0)], 4, c) == pytest.approx([1.0], abs=1e-3)


def test_segments_on_the_serving_host_only_when_spread_is_host() -> None:
    c = costs(spacing_bytes=1 * MB, net_rtt_s=0.25)
    gets = [layer(0.0, "aa", 4.0)]
    anywhere = simulate(gets, Fleet(4, 2, "fleet"), c)[0].seconds
    at_home = simulate(gets, Fleet(4, 2, "host"), c)[0].seconds
    assert at_home == pytest.approx(2.0, abs=1e-3)  # 4 segments on its host's 2 cores
    assert anywhere == pytest.approx(1.25, abs=1e-3)  # remote segments pay the round trip


def test_stored_gets_do_not_take_restore_cores() -> None:
    gets = [layer(0.0, "aa", 2.0), layer(0.1, "bb", 5.0, restore=False)]
    assert latencies(gets, 1) == pytest.approx([2.0, 0.0], abs=1e-3)


def test_more_cores_never_increase_any_latency() -> None:
    """Every layer distinct (no shared restores): a FIFO queue with one more core starts
    no job later, so no GET takes longer."""
    rng = random.Random(5)
    gets = [layer(rng.uniform(0, 20), f"{n:04x}", rng.uniform(0.5, 30)) for n in range(60)]
    c = costs(spacing_bytes=4 * MB, restore_setup_s=0.01, s3_rtt_s=0.002)
    previous = latencies(gets, 1, c)
    for cores in (2, 3, 4, 8, 16, 64):
        current = latencies(gets, cores, c)
        assert all(now <= before + 1e-9 for now, before in zip(current, previous, strict=True))
        assert sum(current) < sum(previous) or cores > 16
        previous = current


RIDE_LOST = 1.05


def frozen_restore() -> dict[str, Any]:
    """bench-restore's results at commit c9365d4, kept here: the model's properties are
    tested on fixed inputs, so that a new bench-restore record (whose CPU figures move by
    10% between runs) does not decide whether the suite passes."""
    return dict(json.loads(Path(__file__).with_name("fleet_restore.json").read_text()))


def test_more_cores_never_raise_the_replays_quantiles() -> None:
    """With shared restores one GET can lose its ride (a restore done sooner is not there
    to follow): a quantile may rise by that much (5% at most on the replay; p50 by 5 ms
    from 16 to 32 cores on 2026-12-06's run), never more, as cores are added."""
    predict = fleet.load("predict")
    gets = fleet.replay_gets(fleet.layer_rows(predict["runs"][fleet.OURS], predict["get_columns"]))
    c = fleet.calibrate(predict, frozen_restore(), fleet.LOOPBACK, 0)
    previous = None
    for cores in (2, 4, 8, 16, 32, 64, 128):
        served = simulate(gets, Fleet(cores, 8, "fleet"), c)
        now = fleet.quantiles(s.seconds for s in served)
        if previous is not None:
            assert all(now[q] <= previous[q] * RIDE_LOST for q in fleet.QUANTILES), (cores, now)
        previous = now


def test_segment_sizes_cover_the_tar_exactly() -> None:
    for tar in (1, 1 << 20, (1 << 20) + 1, 5 << 20, 37_000_001, 100 << 20):
        sizes = fleet.segment_sizes(tar)
        assert sum(sizes) == tar and all(size > 0 for size in sizes)
        assert sizes[0] <= FIRST_SEGMENT_TAR_BYTES  # short, as the registry places it
    assert fleet.segment_sizes(8 << 20, 1 << 20) == [1 << 20] * 8
    assert fleet.segment_sizes(9 << 20, 4 << 20) == [1 << 20, 4 << 20, 4 << 20]
    assert fleet.segment_sizes(10 << 20, 4 << 20) == [1 << 20, 4 << 20, 4 << 20, 1 << 20]
    assert fleet.segment_sizes(10 << 20, 4 << 20, 1 << 40) == [4 << 20, 4 << 20, 2 << 20]


def test_validation_compares_the_same_gets_and_paths() -> None:
    """The validation replays the measured run's own GETs: each GET marked restoring is one
    the run served by a restore, and the counts of both sides are equal."""
    predict = fleet.load("predict")
    rows = fleet.layer_rows(predict["runs"][fleet.OURS], predict["get_columns"])
    gets = fleet.replay_gets(rows)
    assert [g.digest for g in gets] == [row["digest"] for row in rows]
    assert [g.restore for g in gets] == [row["source"] in ("restore", "inflight") for row in rows]
    result = fleet.validate(
        predict, fleet.calibrate(predict, frozen_restore(), fleet.LOOPBACK, 2), 1
    )
    assert result["gets"] == len(rows)
    assert result["restoring_gets"] == sum(g.restore for g in gets)
    table = result["table"]
    assert set(table) == {"duphunter", "duphunter restoring GETs", "distribution"}


def test_fit_recovers_a_line() -> None:
    rows = [{"bytes": mb * MB, "seconds": 0.01 + mb / 200} for mb in (1, 2, 5, 9)]
    serving = fleet.fit(rows)
    assert serving.fixed_s == pytest.approx(0.01)
    assert serving.mb_per_s == pytest.approx(200)


def test_the_tails_headline_names_only_what_reached_distribution() -> None:
    """The headline said "p90 and p99 reach 1.0x only at p99 32 cores" when p90 never did."""
    assert fleet.tails_headline({"p90": [], "p99": [64, 32]}) == (
        "**p99 reaches 1.0x from 32 cores; p90 never does.**"
    )
    assert fleet.tails_headline({"p90": [128], "p99": [32]}) == (
        "**p90 reaches 1.0x from 128 cores; p99 reaches 1.0x from 32 cores.**"
    )
    assert "never reach" in fleet.tails_headline({"p90": [], "p99": []})


def test_the_validation_text_says_what_its_figures_show() -> None:
    """Read off the figures, not written for one run: within 10%, or short at the tail."""

    def validation(ratios: dict[str, float]) -> dict[str, Any]:
        entry = {"model / measured": ratios}
        return {"table": {"duphunter": entry, "duphunter restoring GETs": entry}}

    close = fleet.validation_text(validation({"p50": 0.95, "p90": 1.02, "p99": 1.08}))
    assert "0.95/1.02/1.08" in close and "within 10%" in close
    short = fleet.validation_text(validation({"p50": 0.94, "p90": 0.73, "p99": 0.54}))
    assert "0.94/0.73/0.54" in short and "short at p90, p99" in short
    assert "within 10%" not in short
