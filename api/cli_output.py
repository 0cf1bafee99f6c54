"""What `duphunter` prints for people: every problem the JSON holds, in words.

Each `show_*` takes the JSON a command answers (the same that --json prints) and writes
text to stdout; `human_bytes` is shared with `duphunter replay`.
"""

from __future__ import annotations

import json
from typing import Any


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return str(count)


def human_seconds(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(rows: list[tuple[Any, Any]], indent: str = "  ") -> None:
    width = max((len(str(key)) for key, _value in rows), default=0)
    for key, value in rows:
        print(f"{indent}{key!s:{width}}  {value}")


def show_fields(body: dict[str, Any]) -> None:
    table([(key, json.dumps(value) if isinstance(value, dict | list) else value)
           for key, value in body.items()])  # fmt: skip


# stats


def show_stats(stats: dict[str, Any]) -> None:
    storage = stats.get("storage", {})
    print("storage")
    table(_storage_rows(stats, storage))
    for title in ("layers", "layers_by_encoder", "intact_layers_by_reason", "queues"):
        if stats.get(title):
            print(f"\n{title.replace('_', ' ')}")
            table(sorted(stats[title].items(), key=lambda item: -int(item[1])))
    _show_problems(stats)
    _show_buffer(stats.get("buffer") or {})
    _show_gc(stats.get("gc"))
    restores = stats.get("restores", {})
    if restores:
        print("\nrestores")
        table(sorted(restores.items()))


def _storage_rows(stats: dict[str, Any], storage: dict[str, Any]) -> list[tuple[str, Any]]:
    parts = storage.get("bucket_parts", {})
    of_intact = storage.get("intact_copies_of_which", {})
    rows: list[tuple[str, Any]] = [("mode", storage.get("mode", "?"))]
    if "bucket_bytes" in storage:
        rows += [
            ("in the bucket", f"{human_bytes(storage['bucket_bytes'])} in "
                              f"{storage['bucket_objects']} objects "
                              f"(listed {storage.get('bucket_measured_at')})"),
            ("  packs (files, once each)", human_bytes(parts.get("packs", 0))),
            ("  recipes + checkpoints",
             human_bytes(parts.get("recipes", 0) + parts.get("checkpoints", 0))),
            ("  intact copies", human_bytes(parts.get("intact_copies", 0))),
            ("    of which replicas", human_bytes(of_intact.get("replicas", 0))),
            ("    of which awaiting deletion", human_bytes(of_intact.get("awaiting_deletion", 0))),
            ("  layer buffer", human_bytes(parts.get("layer_buffer", 0))),
            ("  manifests", human_bytes(parts.get("manifests", 0))),
            ("  metadata", human_bytes(parts.get("metadata", 0))),
        ]  # fmt: skip
    rows += [
        ("pushed (logical)", human_bytes(stats["logical_bytes"])),
        ("stored (buffer, metadata not counted)", human_bytes(stats["stored_bytes"])),
        ("dedup ratio (pushed / stored)", _ratio(stats.get("dedup_ratio"))),
        ("  once copies awaiting deletion go", _ratio(stats.get("dedup_ratio_once_deleted"))),
    ]
    if "bucket_bytes" in storage:
        rows.append(("pushed / bucket", _ratio(storage.get("pushed_per_bucket_byte"))))
    rows += [
        ("unique files", stats.get("unique_files", 0)),
        ("repositories", stats.get("repositories", 0)),
    ]
    return rows


def _show_problems(stats: dict[str, Any]) -> None:
    verification = stats.get("verification") or {}
    failing = verification.get("failing_layers") or {}
    print(f"\nverification: {verification.get('reads', 0)} reads, "
          f"{verification.get('failures', 0)} failures")  # fmt: skip
    if failing:
        print(f"  FAILING LAYERS ({len(failing)}): run `duphunter verify --all`")
        table(sorted(failing.items()), indent="    ")
    kept = stats.get("intact_copies_kept_for_canaries") or {}
    if kept:
        print(f"\nlayers kept intact for failing encoder canaries ({len(kept)})")
        table(sorted(kept.items()), indent="    ")
    garbage = stats.get("pack_garbage") or {}
    audit = garbage.get("last_audit") or {}
    print(f"\npack garbage: {human_bytes(garbage.get('lost_race_bytes', 0))} from lost races")
    if audit:
        details = ", ".join(f"{k} {v:g}" for k, v in audit.items() if isinstance(v, int | float))
        print(f"  last audit {audit.get('at', '?')}: {details}")
    else:
        print("  no audit yet")


def _show_buffer(buffer: dict[str, Any]) -> None:
    if not buffer:
        return
    used, capacity = (
        human_bytes(buffer.get("used_bytes", 0)),
        human_bytes(buffer.get("capacity_bytes", 0)),
    )
    print(f"\nlayer buffer: {used} of {capacity}, {buffer.get('entries', 0)} entries")
    keys = ("hits", "misses", "fills", "evictions", "evicted_unused", "refused_full",
            "wasted_preconstructions", "fills_failed", "fills_lost")  # fmt: skip
    table([(key.replace("_", " "), buffer.get(key, 0)) for key in keys], indent="    ")


def _show_gc(report: dict[str, Any] | None) -> None:
    print("\ngarbage collection")
    if not report:
        print("  never run")
        return
    print(f"  last run {report.get('started')} ({report.get('seconds', 0):g} s)")
    for line in gc_summary(report):
        print(f"  {line}")


# jobs


def gc_summary(report: dict[str, Any]) -> list[str]:
    """What a GC run freed (or would), and why nothing, when nothing."""
    if report.get("refused"):
        return [f"REFUSED: {report['refused']}"]
    verb = "would free" if report.get("dry_run") else "freed"
    freed = int(report.get("freed_total_bytes", 0))
    lines = [
        f"{verb} {human_bytes(freed)}: {report.get('manifests', 0)} manifests, "
        f"{report.get('blobs', 0)} blobs, {report.get('files', 0)} files, "
        f"{report.get('packs_deleted', 0)} packs deleted, "
        f"{report.get('packs_compacted', 0)} compacted, {report.get('orphans', 0)} orphans"
    ]
    if freed == 0:
        grace = human_seconds(float(report.get("grace_seconds", 0)))
        lines.append(
            f"nothing unreferenced older than the {grace} grace; what was deleted or pushed "
            "within it goes at a later run (see DUPHUNTER_GC_GRACE_SECONDS)"
        )
    return lines


def show_gc(status: dict[str, Any]) -> None:
    report = status.get("result")
    if not isinstance(report, dict):
        print(f"garbage collection {status.get('state')}: {status.get('error', '')}")
        return
    for line in gc_summary(report):
        print(line)


def show_retention(status: dict[str, Any]) -> None:
    doomed = status.get("result")
    if not isinstance(doomed, dict):
        print(f"retention {status.get('state')}: {status.get('error', '')}")
        return
    dry = bool(status.get("dry_run"))
    count = sum(len(tags) for tags in doomed.values())
    if count == 0:
        print("retention: every tag is kept; nothing to delete")
        return
    print(
        f"would delete {count} tags (dry run: nothing deleted)" if dry else f"deleted {count} tags"
    )
    for repo, tags in sorted(doomed.items()):
        print(f"  {repo}: {', '.join(tags)}")


def show_status(ready: dict[str, Any]) -> None:
    for name, check in ready["checks"].items():
        mark = "ok  " if check["ok"] else "FAIL"
        print(f"{mark} {name:10} {check.get('error', '')}")
    print("ready" if ready["ok"] else "NOT READY")


def show_canaries(report: dict[str, Any]) -> None:
    failed = report.get("failed", {})
    print(f"{report['checked'] - len(failed)} of {report['checked']} encoders passed their canary")
    table(sorted(failed.items()))
    if failed:
        print("FAILED: do not roll this build out; intact copies of their layers are kept")


def show_verification(status: dict[str, Any]) -> None:
    outcomes = status.get("layers", {})
    broken = status.get("broken", {})
    failed = {layer: outcome for layer, outcome in outcomes.items() if outcome != "verified"}
    proven = len(outcomes) - len(failed)
    print(f"{proven} of {len(outcomes)} layers verified from their packs (or data objects)")
    for layer in sorted(failed):
        why = broken.get(layer) or {"reason": failed[layer], "problems": []}
        print(f"  {layer}  BROKEN: {why['reason']}")
        for problem in why["problems"]:
            print(f"      {problem}")


def show_encoders_and_layers(both: dict[str, Any]) -> None:
    show_canaries(both["encoders"])
    show_verification(both["layers"])


def show_jobs(jobs: list[dict[str, Any]]) -> None:
    table([(job.get("digest", job["id"]), job["state"]) for job in jobs])
