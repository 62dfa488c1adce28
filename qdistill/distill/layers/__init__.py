"""Intermediate-layer distillation: layer mapping by name patterns, forward-hook capture, and
the hint (FitNets), attention-map (TinyBERT / MiniLM) and relation (MiniLMv2) losses."""

from qdistill.distill.layers.adapter import Adapter, feature_width
from qdistill.distill.layers.attention_map import attention_kl, attention_mse
from qdistill.distill.layers.hint import hidden_cosine, hidden_mse
from qdistill.distill.layers.hooks import FeatureCapture, match_modules, resolve_pairs
from qdistill.distill.layers.intermediate import Intermediate, WithLayers
from qdistill.distill.layers.relation import relation_loss

__all__ = [
    "Adapter",
    "FeatureCapture",
    "Intermediate",
    "WithLayers",
    "attention_kl",
    "attention_mse",
    "feature_width",
    "hidden_cosine",
    "hidden_mse",
    "match_modules",
    "relation_loss",
    "resolve_pairs",
]
