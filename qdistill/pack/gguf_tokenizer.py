"""A Hugging Face byte-level BPE tokenizer as GGUF ``tokenizer.ggml.*`` metadata.

llama.cpp's ``gpt2`` tokenizer model reads the vocabulary (token strings in id order, in the
byte-level alphabet), a type per token (normal, control = special, user-defined = added), the
merges (``"a b"`` by rank) and the pre-tokenizer's name, which selects its split regexes in
``llama-vocab.cpp``. The name is read from the tokenizer's own pre-tokenizer here:

* ``ByteLevel`` (with its GPT-2 regex) -> ``"gpt-2"``;
* ``Sequence[Digits(individual_digits=True), ByteLevel]`` -> ``"smollm"`` (digits split one by
  one, then GPT-2's regex: SmolLM / SmolLM2).

Anything else (SentencePiece / Unigram / WordPiece models, other pre-tokenizers) is refused with
the fix: pass ``tokenizer_pre=`` naming llama.cpp's pre-tokenizer if you know it, or export
without a tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qdistill.errors import QDistillError

# gguf.TokenType values (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    """What a GGUF file stores of a tokenizer."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]
    add_bos: bool
    chat_template: str | None


def _pre_name(pre: dict[str, Any] | None) -> str | None:
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        kinds = [(p.get("type"), p) for p in pre.get("pretokenizers", [])]
        if (
            len(kinds) == 2
            and kinds[0][0] == "Digits"
            and kinds[0][1].get("individual_digits")
            and kinds[1][0] == "ByteLevel"
            and kinds[1][1].get("use_regex", True)
        ):
            return "smollm"
    return None


def convert_tokenizer(tokenizer: Any, vocab_size: int, pre: str | None = None) -> GGUFVocab:
    """The GGUF vocabulary of a transformers fast tokenizer (byte-level BPE only).

    ``vocab_size`` is the model's embedding rows: ids the tokenizer lacks are written as unused
    ``[PAD<id>]`` tokens (as llama.cpp's converter does); a tokenizer with more ids than the
    model has rows is refused.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise QDistillError(
            f"cannot convert tokenizer {type(tokenizer).__name__} to GGUF: it is not a fast "
            "(tokenizers) tokenizer; load it with use_fast=True, or export without a tokenizer"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise QDistillError(
            f"cannot convert a {model.get('type')} tokenizer to GGUF; qdistill converts "
            "byte-level BPE (GPT-2 style) tokenizers; export without a tokenizer"
        )
    pre = pre or _pre_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise QDistillError(
            f"cannot name llama.cpp's pre-tokenizer for {spec.get('pre_tokenizer')}; pass "
            "tokenizer_pre= (e.g. 'gpt-2', 'smollm', 'llama-bpe'), or export without a tokenizer"
        )
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    by_id = {i: s for s, i in vocab.items()}
    if by_id and max(by_id) >= vocab_size:
        raise QDistillError(
            f"the tokenizer has token id {max(by_id)} but the model's vocabulary has "
            f"{vocab_size} rows; pass the model's own tokenizer"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {}
    for key in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        if isinstance(tid, int):
            special[key] = tid
    template = getattr(tokenizer, "chat_template", None)
    return GGUFVocab(
        tokens=tokens,
        types=types,
        merges=merges,
        pre=pre,
        special=special,
        add_bos=bool(getattr(tokenizer, "add_bos_token", False)),
        chat_template=template if isinstance(template, str) else None,
    )


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add the ``tokenizer.ggml.*`` keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, tid in vocab.special.items():
        adders[key](tid)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
