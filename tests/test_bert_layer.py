"""FastBertLayer (qdistill.pack.bert_layer): the same outputs as transformers' BertLayer, the fast
path taken only where transformers' forward computes the same, and the swap made by accelerate."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tiny_transformers import bert_config  # noqa: E402
from transformers.models.bert import modeling_bert  # noqa: E402

from qdistill.pack import bert_layer, fastops  # noqa: E402


def tiny_bert(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(bert_config(transformers, hidden=64, attn_implementation=attn))


def padded_batch() -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 11), generator=gen)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def slow_calls(monkeypatch) -> list:
    """Counts the calls of transformers' own BertLayer.forward (the fallback)."""
    calls: list = []
    real = modeling_bert.BertLayer.forward
    monkeypatch.setattr(
        modeling_bert.BertLayer,
        "forward",
        lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw),
    )
    return calls


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fast_path_is_bit_identical_with_padding(attn, slow_calls):
    """Eval, a padded batch of two: the same last hidden state bit for bit, without a single
    call of transformers' BertLayer.forward."""
    plain = tiny_bert(attn).eval()
    fast = copy.deepcopy(plain)
    assert bert_layer.swap(fast) == 2
    with torch.no_grad():
        ref = plain(**padded_batch()).last_hidden_state
        n = len(slow_calls)
        out = fast(**padded_batch()).last_hidden_state
    assert len(slow_calls) == n  # no fallback
    assert torch.equal(out, ref)


def test_falls_back_where_transformers_computes_more(slow_calls):
    """output_attentions (eager), training mode (dropout) and a user hook on a skipped module
    take transformers' forward, with its results (attentions, hook calls)."""
    plain = tiny_bert("eager").eval()
    fast = copy.deepcopy(plain)
    bert_layer.swap(fast)
    with torch.no_grad():
        ref = plain(**padded_batch(), output_attentions=True)
        slow_calls.clear()
        out = fast(**padded_batch(), output_attentions=True)
        assert len(slow_calls) == 2 and len(out.attentions) == 2
        for a, b in zip(out.attentions, ref.attentions, strict=True):
            assert torch.equal(a, b)
        seen: list = []
        fast.encoder.layer[0].attention.output.register_forward_hook(lambda *a: seen.append(1))
        slow_calls.clear()
        fast(**padded_batch())
        assert len(slow_calls) == 1 and seen == [1]  # layer 0 falls back, layer 1 does not
    fast.train()
    slow_calls.clear()
    fast(**padded_batch())
    assert len(slow_calls) == 2


def test_gradients_flow_and_match():
    """The fast path is plain torch: in eval mode with autograd on, gradients equal
    transformers' (a student trained after loading is not cut off)."""
    plain = tiny_bert().eval()
    fast = copy.deepcopy(plain)
    bert_layer.swap(fast)
    plain(**padded_batch()).last_hidden_state.square().sum().backward()
    fast(**padded_batch()).last_hidden_state.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_swap_keeps_the_model_and_round_trips():
    """Same printing and state dict; deepcopy and pickle keep the fast class; unswap restores
    BertLayer; accelerate reports the layers it swapped (and restore undoes it)."""
    plain = tiny_bert().eval()
    fast = copy.deepcopy(plain)
    bert_layer.swap(fast)
    assert repr(fast) == repr(plain)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    again = pickle.loads(pickle.dumps(fast))
    assert type(again.encoder.layer[1]) is bert_layer.FastBertLayer
    with torch.no_grad():
        assert torch.equal(again(**padded_batch())[0], plain(**padded_batch())[0])
    bert_layer.unswap(fast)
    assert type(fast.encoder.layer[0]) is modeling_bert.BertLayer
    model = tiny_bert().eval()
    counts = fastops.accelerate(model)
    assert counts["bert_layers"] == 2
    fastops.restore(model)
    assert {type(m) for m in model.encoder.layer} == {modeling_bert.BertLayer}
    assert model.config._attn_implementation == "sdpa"
