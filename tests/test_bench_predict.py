"""The hit-ratio bound bench-predict reports beside its runs, on hand-made traces."""

from __future__ import annotations

from bench.predict import demand_cache_bound, tag_put_bound

A, B, C = "sha256:a", "sha256:b", "sha256:c"


def trace(*digests: str, gap: float = 100.0, size: int = 10) -> list[tuple[float, str, int]]:
    return [(n * gap, digest, size) for n, digest in enumerate(digests)]


def test_the_cache_keeps_the_layer_needed_soonest() -> None:
    # Room for one layer: A is kept (needed again before B), B is restored twice.
    assert demand_cache_bound(trace(A, B, A, B), capacity=10, spool_s=0) == 1 / 4
    # Room for both: every repeat is served.
    assert demand_cache_bound(trace(A, B, A, B), capacity=20, spool_s=0) == 2 / 4


def test_a_layer_never_needed_again_is_not_kept() -> None:
    # C would push A out, but C is not needed again: A stays.
    assert demand_cache_bound(trace(A, C, A), capacity=10, spool_s=0) == 1 / 3


def test_the_spool_serves_gets_soon_after_a_restore() -> None:
    assert demand_cache_bound(trace(A, A, gap=10), capacity=0, spool_s=30) == 1 / 2
    assert demand_cache_bound(trace(A, A, gap=40), capacity=0, spool_s=30) == 0
    assert demand_cache_bound([], capacity=10, spool_s=30) == 0


def test_tag_puts_leave_only_first_gets_of_layers_tagged_at_start() -> None:
    gets = [(0.0, "old", 1), (1.0, "new", 1), (2.0, "old", 1), (3.0, "new", 1)]
    assert tag_put_bound(gets, {"old"}) == 0.75
    assert tag_put_bound(gets, {"old", "new"}) == 0.5
    assert tag_put_bound([], {"old"}) == 0.0
