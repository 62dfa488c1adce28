"""The C attention kernel ``qd_attention`` (qdistill.pack.attention, issue #15) against torch's
``scaled_dot_product_attention`` (the independent reference): odd sequence lengths and head
widths, grouped-query heads, the strided q/k/v transformers passes, additive / bool /
broadcast masks, causal masking with fewer queries than keys, NaN, fully masked rows, a failed
allocation, the fallbacks, and whole transformers models (BERT, Llama) with padding.

Every dispatch level this CPU runs is checked (1 portable C, 2 AVX2, 0 the best: AVX-512).
Tolerance: fp32 sums in another order and a polynomial exp (relative error ~1e-7) against
torch's, on O(1) values: atol 2e-5, rtol 1e-4 for the kernel; 1e-4 for whole models.
"""

import copy
import ctypes

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import call_under_memory_limit
from torch import nn

from qdistill.pack import attention as att
from qdistill.pack import kernels

_LIB = kernels.library()
needs_attention = pytest.mark.skipif(
    not kernels.has_entry(att.ENTRY), reason="C kernels (with qd_attention) not built"
)
pytestmark = needs_attention
LEVELS = [1] + ([2] if _LIB is not None and _LIB.qd_has_avx2() else []) + [0]
TOL = dict(atol=2e-5, rtol=1e-4)


def hf_layout(b: int, s: int, h: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``(b, h, s, d)`` as transformers makes it: a Linear's ``(b, s, h * d)`` output viewed as
    ``(b, s, h, d)`` and transposed (strides h*d*s, d, h*d, 1)."""
    return torch.randn(b, s, h * d, generator=gen).view(b, s, h, d).transpose(1, 2)


def reference(q, k, v, mask=None, is_causal=False):
    """torch's sdpa, output as ``(b, s, h, d)`` like the kernel's."""
    gqa = k.shape[1] != q.shape[1]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa
    )
    return out.transpose(1, 2)


def qkv(b, h, hkv, sq, sk, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return hf_layout(b, sq, h, d, gen), hf_layout(b, sk, hkv, d, gen), hf_layout(b, sk, hkv, d, gen)


@pytest.mark.parametrize("level", LEVELS)
def test_odd_shapes_and_gqa_match_sdpa(level):
    """S in (1, 2, 3, 7, 33, 40, 129) x D in (32, 64, 24) x kv heads (12, 4, 1) for 12 query
    heads, HF's strided layout, no mask: the kernel equals sdpa (with enable_gqa)."""
    for s in (1, 2, 3, 7, 33, 40, 129):
        for d in (32, 64, 24):
            for hkv in (12, 4, 1):
                q, k, v = qkv(1, 12, hkv, s, s, d, seed=s * d + hkv)
                out = att.attention(q, k, v, level=level)
                assert out.shape == (1, s, 12, d) and out.is_contiguous()
                torch.testing.assert_close(out, reference(q, k, v), **TOL)


@pytest.mark.parametrize("level", LEVELS)
def test_layouts_widths_and_scale(level):
    """Contiguous (b, h, s, d) tensors, keys sliced out of a longer cache (row stride 2), head
    widths that are not multiples of 8 / 16 (1, 5, 20, 100, 130), Sq != Sk, an explicit scale."""
    gen = torch.Generator().manual_seed(1)
    for d in (1, 5, 20, 100, 130):
        q = torch.randn(2, 3, 5, d, generator=gen)
        kk = torch.randn(2, 3, 34, d, generator=gen)
        k, v = kk[:, :, ::2], torch.randn(2, 3, 17, d, generator=gen)
        out = att.attention(q, k, v, scale=0.3, level=level)
        ref = F.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2)
        torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("level", LEVELS)
def test_padding_masks_of_two_sentences(level):
    """A batch of two sentences of 40 and 23 tokens: HF's bool mask (b, 1, 1, Sk) and its
    additive forms (0 / -inf and 0 / finfo.min, as HF's eager masks) broadcast over heads and
    queries, and a per-head float mask; every form matches sdpa given the same mask."""
    q, k, v = qkv(2, 12, 12, 40, 40, 32, seed=2)
    lengths = torch.tensor([40, 23])
    keep = (torch.arange(40)[None, :] < lengths[:, None])[:, None, None, :]  # (2, 1, 1, 40)
    neg_inf = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    neg_min = torch.zeros(2, 1, 40, 40).masked_fill(~keep, torch.finfo(torch.float32).min)
    per_head = torch.randn(2, 12, 40, 40, generator=torch.Generator().manual_seed(3))
    for mask in (keep, neg_inf, neg_min, per_head, keep.expand(2, 1, 40, 40)):
        out = att.attention(q, k, v, mask, level=level)
        torch.testing.assert_close(out, reference(q, k, v, mask), **TOL)
    # the padded keys do not count: the short sentence alone gives the same rows
    short = att.attention(q[1:, :, :23], k[1:, :, :23], v[1:, :, :23], level=level)
    torch.testing.assert_close(att.attention(q, k, v, keep, level=level)[1:, :23], short, **TOL)


@pytest.mark.parametrize("level", LEVELS)
def test_causal(level):
    """causal=True: Sq == Sk equals sdpa's is_causal; Sq < Sk (queries are the last Sq
    positions, a KV cache) equals sdpa with the bottom-right lower-triangular bool mask; with
    a padding mask on top; and GQA."""
    for sq, sk, hkv in ((40, 40, 12), (7, 33, 4), (1, 9, 1), (3, 129, 12)):
        q, k, v = qkv(2, 12, hkv, sq, sk, 32, seed=sq + sk)
        tri = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
        out = att.attention(q, k, v, causal=True, level=level)
        torch.testing.assert_close(out, reference(q, k, v, tri), **TOL)
        if sq == sk:
            torch.testing.assert_close(out, reference(q, k, v, is_causal=True), **TOL)
        pad = torch.ones(2, 1, 1, sk, dtype=torch.bool)
        pad[1, ..., : sk // 3] = False  # left padding of the second sequence
        out = att.attention(q, k, v, pad, causal=True, level=level)
        torch.testing.assert_close(out, reference(q, k, v, pad & tri), **TOL)


@pytest.mark.parametrize("level", LEVELS)
def test_fully_masked_rows_give_zero_like_torch(level):
    """A query whose every key is masked (bool False, -inf, or causal with Sq > Sk) gives 0,
    which is what torch 2.13's sdpa gives; the other rows are unaffected."""
    q, k, v = qkv(1, 4, 4, 6, 6, 32, seed=4)
    keep = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    keep[..., 2, :] = False
    for mask in (keep, torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))):
        out = att.attention(q, k, v, mask, level=level)
        ref = reference(q, k, v, mask)
        assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
        torch.testing.assert_close(out, ref, **TOL)
    out = att.attention(q, k[:, :, :4], v[:, :, :4], causal=True, level=level)  # 6 q, 4 keys
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))  # queries 0, 1 see no key
    tri = torch.ones(6, 4, dtype=torch.bool).tril(diagonal=-2)
    torch.testing.assert_close(out, reference(q, k[:, :, :4], v[:, :, :4], tri), **TOL)


@pytest.mark.parametrize("level", LEVELS)
def test_nan_propagates(level):
    """NaN in a query gives that query's rows NaN (all heads of its kv group it touches); NaN in
    a key or a value reaches every query that attends it; NaN in the mask its row. Never a
    finite value where torch has NaN, and the rest equals torch."""
    for where in ("q", "k", "v", "mask"):
        q, k, v = qkv(1, 4, 2, 7, 33, 32, seed=5)
        q, k, v = q.clone(), k.clone(), v.clone()
        mask = torch.zeros(1, 4, 7, 33)
        {"q": q, "k": k, "v": v, "mask": mask}[where][0, 1, 3, 2] = float("nan")
        out = att.attention(q, k, v, mask, level=level)
        ref = reference(q, k, v, mask)
        assert out.isnan().any()
        assert torch.equal(out.isnan(), ref.isnan()), where
        torch.testing.assert_close(out.nan_to_num(7.0), ref.nan_to_num(7.0), **TOL)


def test_bad_shapes_raise_and_c_refuses():
    """Heads that kv heads do not divide, a mask that does not broadcast: torch's error (no
    kernel call); the C entry itself refuses such arguments with -2 instead of reading out of
    bounds."""
    q, k, v = qkv(1, 12, 5, 3, 3, 8)
    with pytest.raises(RuntimeError):
        att.attention(q, k, v)
    q4, k4, v4 = qkv(1, 4, 4, 3, 3, 8)
    with pytest.raises(RuntimeError):  # a mask that does not broadcast: torch's error
        att.attention(q4, k4, v4, torch.zeros(1, 1, 1, 7))
    strides = (ctypes.c_int64 * 13)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], 0, 0, 0, 0)
    out = torch.empty(1, 3, 12, 8)
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), None, 0, out.data_ptr(), 1, 12, 5, 3, 3, 8)
    assert _LIB.qd_attention(*args, strides, 0, 1.0, 0) == -2
    assert _LIB.qd_attention(*args[:6], 1, 12, 12, 3, 3, 8, strides, 0, 1.0, 0) == 0
    bad_kind = (*args[:4], 3, *args[5:6], 1, 12, 12, 3, 3, 8)
    assert _LIB.qd_attention(*bad_kind, strides, 0, 1.0, 0) == -2


def test_failed_allocation_raises_memory_error(tmp_path):
    """The kernel's per-thread scratch (K transposed, score rows: ~(D + 4) * Sk floats) cannot
    be allocated under an address-space limit: MemoryError, not a crash or garbage."""
    setup = """
        from qdistill.pack.attention import attention
        q = torch.randn(1, 1, 1, 4)
        k = torch.randn(1, 1, 1 << 22, 4)
        v = torch.randn(1, 1, 1 << 22, 4)
        x = q
        packed = lambda x: attention(x, k, v)
    """
    out = call_under_memory_limit(tmp_path, setup, headroom_mb=48)
    assert "MemoryError" in out and "qd_attention" in out


def test_fallbacks_to_torch(monkeypatch):
    """torch's sdpa runs (and the kernel does not) for: kernels disabled, inputs that need a
    gradient (the gradients are sdpa's), float64, a last dimension that is not contiguous."""
    calls = []
    real = att.torch_attention
    monkeypatch.setattr(att, "torch_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v = qkv(1, 4, 4, 5, 5, 16, seed=6)
    att.attention(q, k, v)
    assert calls == []  # the kernel ran
    qg = q.detach().clone().requires_grad_()
    out = att.attention(qg, k, v)
    out.sum().backward()
    qr = q.detach().clone().requires_grad_()
    reference(qr, k, v).sum().backward()
    torch.testing.assert_close(qg.grad, qr.grad)
    out64 = att.attention(q.double(), k.double(), v.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, reference(q.double(), k.double(), v.double()))
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim strided
    torch.testing.assert_close(att.attention(qt, k, v), reference(q, k, v), **TOL)
    assert len(calls) == 3
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    torch.testing.assert_close(att.attention(q, k, v), reference(q, k, v))
    assert len(calls) == 4
    assert att.use_fast_attention(nn.Linear(2, 2)) is False


# ---- transformers models ----


def _counting(monkeypatch) -> list:
    """Counts the calls that reach the C kernel (``_run``) from the HF function."""
    calls: list = []
    real = att._run
    monkeypatch.setattr(att, "_run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_bert_same_outputs_with_padding(monkeypatch):
    """A tiny random BERT (4 heads of 16) inside a wrapper module: use_fast_attention switches
    it, every layer's attention runs the kernel, and the hidden states of a padded batch of
    two equal sdpa's (atol 1e-4)."""
    transformers = pytest.importorskip("transformers")
    from tiny_transformers import bert_config

    torch.manual_seed(0)
    cfg = bert_config(transformers, hidden=64, attn_implementation="sdpa")
    bert = transformers.BertModel(cfg).eval()
    wrapper = nn.Sequential()
    wrapper.add_module("bert", bert)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 23:] = 0
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        fast_model = copy.deepcopy(bert)
        assert att.use_fast_attention(fast_model)
        assert fast_model.config._attn_implementation == att.NAME
        calls = _counting(monkeypatch)
        out = fast_model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert len(calls) == cfg.num_hidden_layers
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert att.use_fast_attention(wrapper)  # found inside a plain module
    assert att.use_fast_attention(nn.Sequential(nn.Linear(2, 2))) is False


def test_llama_same_logits_with_padding_and_cache(monkeypatch):
    """A tiny random Llama (4 query heads, 2 kv heads): left-padded batch (causal + padding
    mask, fully masked rows at the padding), an unpadded batch (no mask: the causal flag),
    and one decoding step from the cache (one query, no mask) give sdpa's logits."""
    transformers = pytest.importorskip("transformers")
    from tiny_transformers import llama_config

    torch.manual_seed(0)
    cfg = llama_config(transformers, vocab_size=97, attn_implementation="sdpa")
    ref_model = transformers.LlamaForCausalLM(cfg).eval()
    fast = copy.deepcopy(ref_model)
    assert att.use_fast_attention(fast)
    calls = _counting(monkeypatch)
    ids = torch.randint(0, 97, (2, 11))
    pad = torch.ones(2, 11, dtype=torch.long)
    pad[0, :4] = 0
    with torch.no_grad():
        for mask in (pad, None):
            a = ref_model(input_ids=ids, attention_mask=mask, use_cache=True)
            b = fast(input_ids=ids, attention_mask=mask, use_cache=True)
            torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
        nxt = ids[:, -1:]
        a2 = ref_model(input_ids=nxt, cache=a.past_key_values, use_cache=True)
        b2 = fast(input_ids=nxt, cache=b.past_key_values, use_cache=True)
        torch.testing.assert_close(b2.logits, a2.logits, atol=1e-4, rtol=1e-4)
    assert len(calls) == 3 * cfg.num_hidden_layers
