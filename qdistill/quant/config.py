"""QuantConfig: which format each layer gets, chosen by module-name rules.

Modelled on torchao's "one verb plus a config object": ``quantize_(model, QuantConfig(...))``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields
from typing import Any

from qdistill.errors import ConfigError
from qdistill.formats import Format, format_from_dict

UNSUPPORTED_POLICIES = ("warn", "error", "ignore")
_NO_RULE = object()


def _as_format(value: Any, where: str) -> Format | None:
    """Accept a format object, ``None``, or a dict such as ``{"kind": "int", "bits": 4}``."""
    if value is None or isinstance(value, Format):
        return value
    if isinstance(value, dict):
        return format_from_dict(value)
    raise ConfigError(
        f"{where}: expected a format (e.g. qd.IntFormat(4)), a dict like "
        f"{{'kind': 'int', 'bits': 4}}, or None, got {value!r}"
    )


@dataclass(frozen=True)
class LayerRule:
    """A rule's formats for one group of layers: weights and (optionally) inputs."""

    weights: Format | None
    activations: Format | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": None if self.weights is None else self.weights.to_dict(),
            "activations": None if self.activations is None else self.activations.to_dict(),
        }


def _as_rule(value: Any, where: str) -> Format | LayerRule | None:
    """A rule value: a weight format, None, or weights + activations (object or dict)."""
    if isinstance(value, LayerRule):
        return value
    if isinstance(value, dict) and "kind" not in value:
        unknown = sorted(set(value) - {"weights", "activations"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; use 'weights' and 'activations'")
        return LayerRule(
            _as_format(value.get("weights"), f"{where}.weights"),
            _as_format(value.get("activations"), f"{where}.activations"),
        )
    return _as_format(value, where)


@dataclass
class QuantConfig:
    """What to quantize and how.

    Args:
        weights: default weight format for every Linear / Conv2d layer (``None``: keep FP).
        activations: format for the inputs of quantized layers (``None``: keep FP).
        rules: ``{glob pattern on module name: format, None or LayerRule}``; the first pattern
            (in order) that matches a layer's name decides its weight format (``None`` keeps it
            in full precision); a :class:`LayerRule` (in YAML ``{weights: ..., activations:
            ...}``) also sets that layer's input format. ``"classifier"`` matches that module
            only, ``"features.*"`` all below it.
        keep_first: keep the first quantizable layer in full precision (common practice; Polino
            et al. 2018, Sec. 5, leave the first and last layers unquantized in some runs).
        keep_last: keep the last quantizable layer in full precision.
        unsupported: what to do with layers that hold weights but that qdistill cannot quantize
            (e.g. Conv1d, Conv3d): ``"warn"`` (list them, keep FP), ``"error"``, ``"ignore"``.
        lsq: learn the step sizes (LSQ, Esser et al. 2020) of symmetric integer formats.
        fold_bn: fold each BatchNorm2d into the Conv2d before it and quantize the folded weight
            (Krishnamoorthi 2018, Sec. 3.2); BatchNorm statistics keep updating in training.
        embeddings: weight format for every ``nn.Embedding`` (``None``: keep them FP, the
            default, as BitNet and most PTQ recipes do). Weight-only: a lookup has no input to
            quantize. One scale per row (``IntFormat(8, axis=0)``) or per group along a row
            keeps the packed lookup cheap; rules apply to embeddings by name as to other
            layers. A transformer's vocabulary table is often most of its file.
    """

    weights: Format | None = None
    activations: Format | None = None
    rules: dict[str, Format | LayerRule | None] = field(default_factory=dict)
    keep_first: bool = False
    keep_last: bool = False
    unsupported: str = "warn"
    lsq: bool = False
    fold_bn: bool = False
    embeddings: Format | None = None

    def __post_init__(self) -> None:
        self.weights = _as_format(self.weights, "QuantConfig.weights")
        self.embeddings = _as_format(self.embeddings, "QuantConfig.embeddings")
        self.activations = _as_format(self.activations, "QuantConfig.activations")
        if not isinstance(self.rules, dict):
            raise ConfigError(
                f"QuantConfig.rules must be a dict of pattern -> format, got {self.rules!r}"
            )
        self.rules = {str(k): _as_rule(v, f"rule {k!r}") for k, v in self.rules.items()}
        if self.unsupported not in UNSUPPORTED_POLICIES:
            raise ConfigError(
                f"QuantConfig.unsupported={self.unsupported!r}; use one of {UNSUPPORTED_POLICIES}"
            )

    def rule_for(self, name: str) -> Any:
        """The format the first matching rule gives ``name``, or a sentinel if none matches."""
        for pattern, fmt in self.rules.items():
            if fnmatch.fnmatchcase(name, pattern):
                return fmt
        return _NO_RULE

    def unmatched_rules(self, names: list[str]) -> list[str]:
        """Rule patterns that match none of ``names`` (almost always a typo)."""
        return [p for p in self.rules if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> QuantConfig:
        """Build from a plain dict (YAML), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(
                f"unknown quantization config key(s) {unknown}; valid keys: {sorted(known)}"
            )
        return cls(**spec)

    def to_dict(self) -> dict[str, Any]:
        def enc(f: Format | None) -> dict[str, Any] | None:
            return None if f is None else f.to_dict()

        return {
            "weights": enc(self.weights),
            "activations": enc(self.activations),
            "rules": {
                k: v.to_dict() if isinstance(v, LayerRule) else enc(v)
                for k, v in self.rules.items()
            },
            "keep_first": self.keep_first,
            "keep_last": self.keep_last,
            "unsupported": self.unsupported,
            "lsq": self.lsq,
            "fold_bn": self.fold_bn,
            "embeddings": enc(self.embeddings),
        }


NO_RULE = _NO_RULE
