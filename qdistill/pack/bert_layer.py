"""A BERT encoder layer's inference forward without transformers' per-module Python (issue #15:
"transformers that actually run faster").

Once a packed MiniLM's Linears, attention and GELU are C calls, a 40-token forward at batch 1
spends a large share in the Python *between* them: each ``BertLayer`` goes through six nested
modules (``BertAttention``, ``BertSelfAttention``, ``BertSelfOutput``, ``BertIntermediate``,
``BertOutput``, and three ``Dropout``), three ``deprecate_kwarg`` wrappers, and
``apply_chunking_to_forward``, which calls ``inspect.signature`` on every call: about as much
time as the arithmetic of the packed student's layer. :class:`FastBertLayer` is ``BertLayer``
with one forward that calls the same Linears (packed or not, through their own modules), the
model's configured attention function and torch's LayerNorm / add directly, in the order and
with the operations of transformers' code, so the outputs are the same (bit for bit with the
same attention function): the idea of optimum's BetterTransformer, without changing a kernel.

It takes that path only where transformers' forward would compute exactly this: eval mode (no
dropout), an encoder layer (no decoder, cross-attention or cache), no feed-forward chunking,
no ``output_attentions`` or other extra keyword, no hooks on the modules it skips other than
transformers' own output-capturing ones (inactive without ``output_*`` flags), no tracing or
``torch.compile``; otherwise ``BertLayer.forward`` runs. :func:`swap` changes the class of
every plain ``BertLayer`` in place (``qd.load`` / ``qd.freeze`` through
:func:`qdistill.pack.fastops.accelerate`); :func:`unswap` undoes it. Printing, parameters and
state dict are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertLayer, eager_attention_forward

_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _hf_capture_hook(hook: Any) -> bool:
    """transformers' own output-capturing hook (records only when ``output_*`` is asked)."""
    return "output_capturing_hook" in getattr(hook, "__qualname__", "")


def _foreign_hooks(mods: tuple[nn.Module, ...]) -> bool:
    """Hooks a direct call of the skipped modules' code would miss."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    for m in mods:
        if m._forward_pre_hooks:
            return True
        if m._forward_hooks and not all(map(_hf_capture_hook, m._forward_hooks.values())):
            return True
    return False


class FastBertLayer(BertLayer):
    """``BertLayer`` with a one-function inference forward (see the module docstring)."""

    def _get_name(self) -> str:
        return "BertLayer"

    def _skipped(self) -> tuple[nn.Module, ...]:
        """The modules whose ``__call__`` the fast path does not go through."""
        att, out, inter = self.attention, self.output, self.intermediate
        sa, so = att.self, att.output
        return (att, sa, so, inter, out, sa.dropout, so.dropout, so.LayerNorm, out.dropout,
                out.LayerNorm)  # fmt: skip

    def _eligible(self, encoder_hidden_states: Any, cache: Any, kwargs: dict) -> bool:
        return not (
            self.training
            or self.is_decoder
            or encoder_hidden_states is not None
            or cache is not None
            or self.chunk_size_feed_forward
            or any(v is not None and v is not False for v in kwargs.values())
            or torch.jit.is_tracing()
            or _is_compiling()
            or _foreign_hooks(self._skipped())
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self._eligible(encoder_hidden_states, cache, kwargs):
            return super().forward(
                hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                cache=cache, **kwargs,
            )  # fmt: skip
        sa, so = self.attention.self, self.attention.output
        shape = (*hidden_states.shape[:-1], -1, sa.attention_head_size)
        q = sa.query(hidden_states).view(shape).transpose(1, 2)
        k = sa.key(hidden_states).view(shape).transpose(1, 2)
        v = sa.value(hidden_states).view(shape).transpose(1, 2)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(
            sa.config._attn_implementation, eager_attention_forward
        )
        ctx, _ = fn(sa, q, k, v, attention_mask, dropout=0.0, scaling=sa.scaling)
        ctx = ctx.reshape(*hidden_states.shape[:-1], -1).contiguous()
        ln = so.LayerNorm
        a = F.layer_norm(so.dense(ctx) + hidden_states, ln.normalized_shape, ln.weight, ln.bias,
                         ln.eps)  # fmt: skip
        inter, out = self.intermediate, self.output
        i = inter.intermediate_act_fn(inter.dense(a))
        ln = out.LayerNorm
        return F.layer_norm(out.dense(i) + a, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def swap(model: nn.Module) -> int:
    """Make every plain ``BertLayer`` of ``model`` a :class:`FastBertLayer`, in place; how many."""
    n = 0
    for m in model.modules():
        if type(m) is BertLayer:
            m.__class__ = FastBertLayer
            n += 1
    return n


def unswap(model: nn.Module) -> nn.Module:
    """Undo :func:`swap`."""
    for m in model.modules():
        if type(m) is FastBertLayer:
            m.__class__ = BertLayer
    return model
