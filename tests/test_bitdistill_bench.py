"""The BitDistill benchmark's stage-2 sharing: which variants may start stage 3 from one
stage-2 checkpoint (benchmarks/bitdistill.py, loaded from its path: not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qdistill.recipes.bitdistill import BitDistillConfig

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bitdistill.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_bitdistill", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _key(bench, name, per_seed=True, seed=0, **over):
    spec = {"pretrain_tokens": 30_000, "seed": seed, **bench.VARIANTS[name], **over}
    return bench.stage2_key(BitDistillConfig(**spec), per_seed=per_seed)


def test_stage_3_ablations_share_bitdistills_stage_2_and_nothing_else_does(bench):
    full = _key(bench, "bitdistill")
    assert _key(bench, "bitdistill-no-logits-kd") == full
    assert _key(bench, "bitdistill-no-attention") == full
    others = {
        _key(bench, "bitdistill-no-subln"),
        _key(bench, "bitdistill-subln-plain"),
        _key(bench, "bitdistill", seed=1),
        _key(bench, "bitdistill", pretrain_tokens=3_000),
        _key(bench, "bitdistill", pretrain_lr=5e-4),
        full,
    }
    assert len(others) == 6  # each changes what stage 2 computes: its own checkpoint
    assert _key(bench, "bitdistill-no-stage2") is None
    assert _key(bench, "bitnet-sft") is None


def test_shared_stage_2_drops_only_the_seed(bench):
    shared = _key(bench, "bitdistill", per_seed=False)
    assert shared == _key(bench, "bitdistill", per_seed=False, seed=2)
    assert shared != _key(bench, "bitdistill-no-subln", per_seed=False)
    assert shared != _key(bench, "bitdistill", per_seed=True)
