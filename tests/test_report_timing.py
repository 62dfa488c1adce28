"""The A/B timing helper of the kernel benchmarks (qdistill.report.runtime.interleaved_best_us)."""

from __future__ import annotations

import pytest

from qdistill.report import runtime


def test_interleaved_best_us_keeps_each_callables_fastest_round(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    costs = {"a": [3e-6, 1e-6, 2e-6], "b": [5e-6, 6e-6, 4e-6]}  # seconds a call, by round
    calls: list[str] = []

    def make(name: str):
        def fn() -> None:
            rnd = sum(c == name for c in calls) // 4  # 4 calls a round
            calls.append(name)
            clock[0] += costs[name][rnd]

        return fn

    best = runtime.interleaved_best_us([make("a"), make("b")], rounds=3, reps=4, order=[1, 0])
    assert best == pytest.approx([1.0, 4.0])  # microseconds: the cheapest round of each
    assert calls[:8] == ["b"] * 4 + ["a"] * 4  # the given order, reps calls in a row
    assert len(calls) == 3 * 2 * 4


def test_cache_state_medians_primes_flushes_and_sleeps_per_mode(monkeypatch):
    """Each mode prepares its timed call as documented (warm: the same call untimed first;
    flush: a sum over the big tensor; flush+sleep: that and a sleep), and the medians are of
    the timed calls only: a fake clock charges a call by what happened just before it."""
    clock = [0.0]
    events: list[str] = []
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(runtime.time, "sleep", lambda s: events.append(f"sleep {s}"))

    class FakeBuffer:
        def sum(self) -> None:
            events.append("flush")

    monkeypatch.setattr(runtime.torch, "ones", lambda n: FakeBuffer())
    after = {"flush": 3e-6, "sleep 0.5": 5e-6}  # seconds a call costs after that event

    def make(name: str):
        def fn() -> None:
            prev = events[-1] if events else ""
            clock[0] += 1e-6 if prev == name else after.get(prev, 9e-6)
            events.append(name)

        return fn

    med = runtime.cache_state_medians(
        [make("a"), make("b")], runtime.CACHE_MODES, reps=3, flush_mb=1, sleep_s=0.5
    )
    assert med == pytest.approx(
        {("warm", 0): 1.0, ("warm", 1): 1.0, ("flush", 0): 3.0, ("flush", 1): 3.0,
         ("flush+sleep", 0): 5.0, ("flush+sleep", 1): 5.0}
    )  # fmt: skip
    one_rep = ["a", "a", "b", "b", "flush", "a", "flush", "b",
               "flush", "sleep 0.5", "a", "flush", "sleep 0.5", "b"]  # fmt: skip
    assert events == one_rep * 3
