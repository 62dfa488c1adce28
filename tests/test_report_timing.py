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
