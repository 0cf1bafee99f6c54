"""`duphunter replay`: the IBM trace parser, the synthetic generator's parameters, the
layers it builds, and a short replay against the live stack with every layer verified."""

from __future__ import annotations

import dataclasses
import gzip
import io
import itertools
import json
import statistics
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from api import cli
from api.replay.content import LayerCache, write_layer
from api.replay.report import SOURCES, UNKNOWN, hit_ratio, latency
from api.replay.synthetic import SyntheticSpec, generate
from api.replay.trace import (
    TraceError,
    TraceOptions,
    load_trace,
    parse_record,
    read_records,
    workload_from_records,
)
from api.replay.transport import Get
from api.replay.workload import Fetch, Pull, Tag, Workload
from deploy.stack import REPO_ROOT
from tests.conftest import LiveStack

SAMPLES = REPO_ROOT.parent / "shared" / "data" / "ibm-registry-trace-samples.json"


def record(at: str, client: str, uri: str, written: Any = 100, **extra: Any) -> dict[str, Any]:
    return {
        "timestamp": f"2017-06-20T00:{at}Z",
        "http.request.method": extra.pop("method", "GET"),
        "http.request.uri": uri,
        "http.request.remoteaddr": client,
        "http.response.status": extra.pop("status", 200),
        "http.response.written": written,
        **extra,
    }


def write_trace(tmp_path: Path, records: list[Any], name: str = "trace.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


# --- the IBM trace format -------------------------------------------------------------------


@pytest.fixture
def samples() -> Path:
    if not SAMPLES.exists():
        pytest.skip(f"the shared trace samples are not at {SAMPLES}")
    return SAMPLES


def test_parses_the_shared_ibm_samples(samples: Path) -> None:
    records, bad = read_records([samples])
    assert bad == 0 and len(records) == 7
    assert [r.at for r in records] == sorted(r.at for r in records)
    kinds = Counter((r.method, r.kind) for r in records)
    assert kinds == {("GET", "manifests"): 3, ("PUT", "manifests"): 2, ("GET", "blobs"): 2}
    first = records[0]
    assert (first.repository, first.reference, first.client) == (
        "a9cb77c4/37773f3b",
        "406251de",
        "6d01dffe",
    )
    assert first.written == 2631 and first.status == 200
    assert first.at == pytest.approx(1497916802.814)


def test_samples_become_pulls_and_lone_fetches(samples: Path) -> None:
    workload = load_trace([samples], TraceOptions(size_scale=10))
    pulls = [e for e in workload.events if isinstance(e, Pull)]
    fetches = [e for e in workload.events if isinstance(e, Fetch)]
    assert [(p.client, p.repository, p.tag) for p in pulls] == [
        ("6d01dffe", "a9cb77c4/37773f3b", "406251de"),
        ("4fdf6ce6", "ca64f105/36adcbc6", "817c8a39"),
        ("5fb803ae", "47cbd874/a83fa527", "817c8a39"),
    ]
    # neither blob GET follows a manifest GET of its client: both are replayed alone
    assert {(f.client, f.layer) for f in fetches} == {
        ("9ca2770d", "b2867db9"),
        ("0ee76ffa", "93054319"),
    }
    assert workload.layers["b2867db9"].target_bytes == 15180  # 1518 bytes written x 10
    assert workload.layers["93054319"].target_bytes == 95760
    assert any("PUT manifests 201" in note for note in workload.notes)
    assert workload.events[0].at == 0.0


def test_blob_gets_after_a_manifest_get_are_that_images_layers(tmp_path: Path) -> None:
    trace = [
        record("00:00.000", "c1", "v2/ns/app/manifests/t1"),
        record("00:01.000", "c1", "v2/ns/app/blobs/l1", 5000),
        record("00:02.000", "c1", "v2/ns/app/blobs/l2", 7000),
        record("00:03.000", "c2", "v2/ns/app/manifests/t1"),
        record("00:04.000", "c2", "v2/ns/app/blobs/l3", 3000),
        record("00:05.000", "c3", "v2/ns/app/blobs/l1", 6000),  # no manifest GET: alone
        record("05:00.000", "c1", "v2/ns/app/blobs/l4", 1000),  # session over: alone
        record("05:01.000", "c1", "v2/ns/app/manifests/gone", status=404),
        record("05:02.000", "c1", "v2/_catalog"),
    ]
    records, _ = read_records([write_trace(tmp_path, trace)])
    workload = workload_from_records(records, TraceOptions(session_s=60))
    assert workload.images[("ns/app", "t1")].layers == ("l1", "l2", "l3")
    assert [type(e).__name__ for e in workload.events] == ["Pull", "Pull", "Fetch", "Fetch"]
    assert workload.layers["l1"].target_bytes == 6000  # the largest of its GETs
    assert len(workload.notes) == 2  # the 404 and the catalog GET, counted and skipped
    windowed = workload_from_records(records, TraceOptions(start_s=2.5, duration_s=3))
    assert [(type(e).__name__, e.at) for e in windowed.events] == [("Pull", 0.0), ("Fetch", 2.0)]


def test_trace_files_may_be_json_lines_and_gzipped(tmp_path: Path) -> None:
    lines = "\n".join(json.dumps(r) for r in [record("00:00.000", "c", "v2/a/b/manifests/x")])
    path = tmp_path / "trace.jsonl.gz"
    path.write_bytes(gzip.compress(lines.encode()))
    records, _ = read_records([path])
    assert [(r.repository, r.reference) for r in records] == [("a/b", "x")]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ([1, 2], "expected a JSON object"),
        ({"timestamp": "2017-06-20T00:00:00Z"}, "missing http.request.method"),
        (
            record("00:00.000", "c", "v2/a/b/manifests/x") | {"timestamp": "yesterday"},
            "Invalid isoformat",
        ),
        (record("00:00.000", "c", "v2/a/b/blobs/x", written="big"), "is not a number"),
        (record("00:00.000", "", "v2/a/b/blobs/x"), "must be strings"),
    ],
)
def test_bad_records_give_a_clear_error(tmp_path: Path, bad: Any, reason: str) -> None:
    good = record("00:00.000", "c", "v2/a/b/manifests/x")
    path = write_trace(tmp_path, [good, bad])
    with pytest.raises(TraceError, match=rf"trace.json: record 1: .*{reason}"):
        read_records([path])
    records, skipped = read_records([path], lenient=True)
    assert (len(records), skipped) == (1, 1)


def test_a_file_that_is_not_a_trace_is_refused_by_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not JSON")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--url", "http://127.0.0.1:9", "replay", "trace", str(path)])
    assert stopped.value.code == 2
    assert "notes.txt: not a trace file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="missing"):
        parse_record({})


# --- the synthetic generator ------------------------------------------------------------------


def long_spec(**changes: Any) -> SyntheticSpec:
    base = SyntheticSpec(
        seed=7, duration_s=3600, clients=40, repositories=8, new_tag_interval_s=600
    )
    return dataclasses.replace(base, **changes)


def pulls(workload: Workload) -> list[Pull]:
    return [event for event in workload.events if isinstance(event, Pull)]


def test_the_same_seed_gives_the_same_workload() -> None:
    assert generate(long_spec()) == generate(long_spec())
    assert generate(long_spec()).events != generate(long_spec(seed=8)).events


def test_repull_probability_is_the_share_of_pulls_from_an_empty_store() -> None:
    for probability in (0.0, 0.3, 1.0):
        workload = generate(long_spec(pull_once_share=0.0, repull=(probability, probability)))
        fresh = [pull.fresh for pull in pulls(workload)]
        assert len(fresh) > 1000
        assert sum(fresh) / len(fresh) == pytest.approx(probability, abs=0.04)


def test_pull_once_clients_pull_each_tag_once_and_never_repull() -> None:
    workload = generate(long_spec(pull_once_share=1.0, repull=(1.0, 1.0)))
    seen = Counter((pull.client, pull.repository, pull.tag) for pull in pulls(workload))
    assert seen and max(seen.values()) == 1
    assert not any(pull.fresh for pull in pulls(workload))
    mixed = generate(long_spec(pull_once_share=0.5))
    plans = mixed.parameters["client_plans"]
    assert sum(plan["pull_once"] for plan in plans) == 20


def test_sharing_decides_whether_repositories_share_base_layers() -> None:
    def shared_layers(workload: Workload) -> int:
        return sum(1 for repos in workload.layer_repositories().values() if len(repos) > 1)

    assert shared_layers(generate(long_spec(sharing=0.0))) == 0
    everything = generate(long_spec(sharing=1.0, base_images=2, base_layers=2))
    for image in everything.images.values():
        assert all(key.startswith("base") for key in image.layers[:2])
    assert shared_layers(everything) == 4  # two bases of two layers, each in several repos


def test_new_tags_change_only_their_top_layers_and_keep_some_files() -> None:
    def kept_files(workload: Workload) -> list[float]:
        shares = []
        for (repository, tag), image in workload.images.items():
            if tag == "v1":
                continue
            previous = workload.images[(repository, f"v{int(tag[1:]) - 1}")]
            assert image.layers[:-1] == previous.layers[:-1]
            new, old = workload.layers[image.layers[-1]], workload.layers[previous.layers[-1]]
            assert new.key != old.key
            shares.append(len(set(new.files) & set(old.files)) / len(old.files))
        return shares

    workload = generate(long_spec(changed_layers=1, file_overlap=0.5))
    tags = Counter(repository for repository, _tag in workload.images)
    assert min(tags.values()) >= 2  # a new tag every 600 s over an hour
    assert 0.3 <= statistics.mean(kept_files(workload)) <= 0.7
    assert not any(kept_files(generate(long_spec(file_overlap=0.0))))
    assert {tag for _repo, tag in generate(long_spec(new_tag_interval_s=0)).images} == {"v1"}


def test_each_new_tag_appears_at_its_time_before_any_pull_of_it() -> None:
    workload = generate(long_spec())
    published = {(e.repository, e.tag): e.at for e in workload.events if isinstance(e, Tag)}
    assert set(published) == {key for key in workload.images if key[1] != "v1"}
    assert workload.tagged_later() == set(published)
    for pull in pulls(workload):
        assert pull.at >= published.get((pull.repository, pull.tag), 0.0)
    assert workload.summary()["tags"] == len(published) > 0


def test_bursty_arrivals_are_burstier_than_poisson() -> None:
    def variation(arrivals: str) -> float:
        workload = generate(long_spec(pull_once_share=0.0, arrivals=arrivals))
        gaps: list[float] = []
        for client in workload.clients():
            times = [p.at for p in pulls(workload) if p.client == client]
            gaps += [b - a for a, b in itertools.pairwise(times)]
        return statistics.stdev(gaps) / statistics.mean(gaps)

    assert variation("poisson") == pytest.approx(1.0, abs=0.15)
    assert variation("bursty") > 1.5


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        generate(long_spec(repull=(0.5, 0.2)))
    with pytest.raises(ValueError, match="arrivals"):
        generate(long_spec(arrivals="sometimes"))


# --- layers -----------------------------------------------------------------------------------


def test_layers_are_real_gzip_tars_of_about_the_asked_size(tmp_path: Path) -> None:
    workload = generate(SyntheticSpec(seed=3, layer_mb=0.3, repositories=1, clients=1))
    spec = next(iter(workload.layers.values()))
    built = LayerCache(tmp_path).build(spec)
    data = built.path.read_bytes()
    assert built.size == len(data)
    assert built.size == pytest.approx(spec.target_bytes, rel=0.15)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as archive:
        sizes = [member.size for member in archive.getmembers()]
    assert sizes == [file.size for file in spec.files]
    again = io.BytesIO()
    assert write_layer(spec, again)[0] == built.digest  # the same spec, the same bytes
    assert LayerCache(tmp_path).build(spec) == built


# --- reporting ----------------------------------------------------------------------------


def test_hit_ratio_counts_only_named_paths() -> None:
    gets = [Get("layer", "c", "r", "d", source=s) for s in ["buffer", "restore", "intact"]]
    gets += [Get("layer", "c", "r", "d", source=UNKNOWN), Get("config", "c", "r", "d")]
    assert hit_ratio(gets) == {"ratio": 0.6667, "hits": 2, "restores": 1, "unnamed": 1}
    assert hit_ratio(gets[3:])["ratio"] is None
    summary = latency([0.4, 0.1, 0.2, 0.3])
    assert (summary["p50"], summary["max"], summary["count"]) == (0.25, 0.4, 4)


# --- against the live stack -------------------------------------------------------------------


def test_short_replay_verifies_every_layer_and_reports_latency_by_path(
    live: LiveStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, plot = tmp_path / "result.json", tmp_path / "latency.png"
    arguments = ["--seed", "3", "--duration-s", "10", "--clients", "4", "--repositories", "2"]
    arguments += ["--layers-per-image", "2", "--layer-mb", "0.05", "--layer-sigma", "0.3"]
    arguments += ["--mean-interval-s", "3", "--new-tag-interval-s", "5", "--repull", "0.3", "0.3"]
    arguments += ["--cache", str(tmp_path / "layers"), "--out", str(out), "--plot", str(plot)]
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--url", live.url, "replay", "synthetic", *arguments, "--quiet"])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert stopped.value.code == 0, result["errors"]
    layers = result["layer_gets"]
    assert layers["count"] > 0 and layers["errors"] == 0
    assert layers["verified"] == layers["count"]
    assert set(layers["by_source"]) <= {*SOURCES, UNKNOWN}
    assert sum(part["count"] for part in layers["by_source"].values()) == layers["count"]
    lat = layers["latency"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    requests = result["manifest_gets"]["count"] + result["config_gets"]["count"] + layers["count"]
    assert 15 <= requests <= 60
    assert_docker_like(result["gets"], result["workload"])
    assert result["tags_published"] == result["workload"]["tags"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "layer GETs" in printed and "p99 ms" in printed


def assert_docker_like(gets: list[dict[str, Any]], workload: dict[str, Any]) -> None:
    """A client GETs a layer again only after a pull from an empty store."""
    fresh_pulls = workload["fresh_pulls"]
    fetched = Counter((get["client"], get["digest"]) for get in gets if get["kind"] == "layer")
    repeats = sum(count - 1 for count in fetched.values())
    assert repeats <= fresh_pulls * 2  # two layers per image
    if fresh_pulls == 0:
        assert repeats == 0
