"""Tiny random configurations of the transformer architectures the tests use (BERT, Llama)."""

from typing import Any


def bert_config(transformers: Any, hidden: int = 32, **overrides: Any) -> Any:
    """Two BERT layers of width ``hidden``, four heads."""
    spec = dict(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden
    )
    return transformers.BertConfig(**{**spec, **overrides})


def llama_config(transformers: Any, **overrides: Any) -> Any:
    """Two Llama layers of width 32, four query heads sharing two key/value heads."""
    spec = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    return transformers.LlamaConfig(**{**spec, **overrides})
