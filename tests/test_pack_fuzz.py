"""Mutation fuzzing of the packed-file loader (issue 12): a few hundred seeded edits of small
valid files, run in a worker subprocess (a crash or hang is recorded per case, not fatal to the
run); every case must load and compute, or raise FileFormatError. Longer runs:
``python tests/fuzz_packed.py --cases 5000`` or ``make fuzz`` (atheris)."""

from __future__ import annotations

from fuzz_packed import make_seeds, run_cases, summarise

CASES = 300


def test_every_mutated_file_loads_or_raises_file_format_error(tmp_path):
    make_seeds(tmp_path)
    counts = run_cases(tmp_path / "manifest.json", CASES, tmp_path / "log.jsonl")
    summary = summarise(counts)
    bad = {k: n for k, n in counts.items() if k.startswith(("other", "crash"))}
    assert summary["cases"] == CASES
    assert not bad, f"cases that neither loaded nor raised FileFormatError: {bad}"
    # the mutations reach the validation: most edits must be refused, not loaded
    assert summary["clean"] > CASES // 2
