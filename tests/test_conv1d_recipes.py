"""GPT-2's ``Conv1D`` in the recipes that enumerate compute layers (MQAT, learned points, mixed
precision): listed like Linear layers, sized and rounded in Linear orientation ``[out, in]``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qdistill.formats import IntFormat, fake_quantize
from qdistill.quant.learned import DiffQuantMixin
from qdistill.quant.mixed_precision import layer_bytes, layer_sensitivity, quantizable_layers
from qdistill.quant.modules import QuantLinear, conv1d_as_linear, is_hf_conv1d
from qdistill.recipes.learned import differentiable_quantization
from qdistill.recipes.mqat import mqat
from qdistill.recipes.qat import TrainSettings

transformers = pytest.importorskip("transformers")
VOCAB = 16


class NextToken(nn.Module):
    """GPT-2 as a classifier of the next token: ids ``[B, T]`` -> logits ``[B, V]``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16
        )
        self.gpt2 = transformers.GPT2LMHeadModel(cfg).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=x).logits[:, -1]


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (32, 6), generator=g)
    return DataLoader(TensorDataset(x, x[:, 0]), batch_size=8)


def conv1d_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_hf_conv1d(m)]


def test_conv1d_layers_are_listed_with_the_linear_ones():
    model = NextToken()
    conv = conv1d_names(model)
    assert len(conv) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    linear = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert linear == ["gpt2.lm_head"]
    assert sorted(n for n, _ in quantizable_layers(model)) == sorted(conv + linear)


def test_layer_bytes_counts_a_conv1d_as_its_linear():
    c_attn = NextToken().gpt2.transformer.h[0].attn.c_attn  # weight stored [in 32, out 96]
    per_row = IntFormat(8, axis=0)  # one scale per output channel
    expected = 96 * 32 + 96 * 4 + 96 * 4  # int8 codes, 96 float scales, 96 float biases
    assert (
        layer_bytes(c_attn, per_row) == layer_bytes(conv1d_as_linear(c_attn), per_row) == expected
    )


def test_sensitivity_of_a_conv1d_rounds_it_as_a_linear():
    model = NextToken().eval()  # (layer_sensitivity restores the mode it found: no dropout)
    batches = [x for x, _ in data()]
    fmt = IntFormat(2, axis=0)
    name = "gpt2.transformer.h.1.mlp.c_fc"
    before = model.get_submodule(name).weight.detach().clone()
    got = layer_sensitivity(model, {2: fmt}, batches, layers=[name], progress=False)[name][2]
    assert torch.equal(model.get_submodule(name).weight, before)  # restored

    # by hand: the layer as a Linear, rounded per output channel, KL of the outputs
    ref_model = copy.deepcopy(model)
    linear = conv1d_as_linear(ref_model.get_submodule(name))
    with torch.no_grad():
        linear.weight.copy_(fake_quantize(linear.weight, fmt))
    parent, _, child = name.rpartition(".")
    setattr(ref_model.get_submodule(parent), child, linear)
    with torch.no_grad():
        ref = F.log_softmax(torch.cat([model(x) for x in batches]), -1)
        out = F.log_softmax(torch.cat([ref_model(x) for x in batches]), -1)
    expected = float(F.kl_div(out, ref, log_target=True, reduction="batchmean"))
    assert expected > 1e-6 and got == pytest.approx(expected, rel=1e-4)


def test_mqat_quantizes_conv1d_patterns():
    teacher, student = NextToken(), NextToken()
    modules = {"gpt2.transformer.h.*.attn.c_attn": IntFormat(4, axis=0)}
    settings = TrainSettings(epochs=1, progress=False)
    student, result = mqat(teacher, student, modules, data(), data(), settings=settings)
    quantized = [n for n, m in student.named_modules() if isinstance(m, QuantLinear)]
    assert quantized == ["gpt2.transformer.h.0.attn.c_attn", "gpt2.transformer.h.1.attn.c_attn"]
    assert len(conv1d_names(student)) == 6 and len(result.stages) == 1


def test_learned_points_cover_the_conv1d_layers():
    teacher, student = NextToken(), NextToken()
    x = next(iter(data()))[0]
    with torch.no_grad():
        float_out = student(x)
    settings = TrainSettings(epochs=1, lr=1e-9, progress=False)
    student, _, points = differentiable_quantization(
        teacher, student, data(), bits=2, group_size=None, settings=settings, points_lr=1e-9
    )
    assert not conv1d_names(student)
    learned = [n for n, m in student.named_modules() if isinstance(m, DiffQuantMixin)]
    assert "gpt2.transformer.h.0.attn.c_attn" in learned and len(learned) == 9
    assert set(points) == set(learned)
    # the converted layers compute the same function: with 4 points per tensor the outputs move,
    # but stay correlated with the float model's (a transposed weight would scramble them)
    with torch.no_grad():
        out = student(x)
    corr = torch.corrcoef(torch.stack([out.flatten(), float_out.flatten()]))[0, 1]
    assert torch.isfinite(out).all() and corr > 0.5
