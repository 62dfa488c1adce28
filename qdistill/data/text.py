"""Token batches for transformer students: ``(batch, labels)`` for tasks, ``batch`` for text.

A batch is the dict a Hugging Face model takes (``input_ids``, ``attention_mask``), so the
same loaders feed any encoder or causal model; qdistill's training loop passes it on whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from qdistill.errors import DataError


class TokenBatches(Dataset):
    """Token ids and attention masks ``[N, T]``, with optional labels ``[N]``."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        if input_ids.dim() != 2:
            raise DataError(f"input_ids must be [N, T], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise DataError("attention_mask and input_ids differ in shape")
        if labels is not None and len(labels) != len(input_ids):
            raise DataError(f"{len(labels)} labels for {len(input_ids)} sequences")
        self.input_ids = input_ids.long()
        self.attention_mask = attention_mask.long()
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> Any:
        batch = {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}
        return batch if self.labels is None else (batch, self.labels[i])


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> TokenBatches:
    """Tokenize ``texts`` with a transformers tokenizer, truncated and padded to ``max_length``."""
    if not texts:
        raise DataError("no texts to tokenize")
    if getattr(tokenizer, "pad_token", None) is None:  # causal tokenizers often have none
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(
        list(texts),
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return TokenBatches(enc["input_ids"], enc["attention_mask"])


def classification_loader(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int = 64,
    batch_size: int = 32,
    shuffle: bool = False,
) -> DataLoader:
    """``(batch, labels)`` batches of a text classification split."""
    data = tokenize(tokenizer, texts, max_length)
    data = TokenBatches(data.input_ids, data.attention_mask, torch.tensor(list(labels)))
    return _loader(data, batch_size, shuffle)


def text_loader(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 64,
    batch_size: int = 32,
) -> DataLoader:
    """Shuffled ``batch`` dicts of general text, for masked-LM or next-token training."""
    return _loader(tokenize(tokenizer, texts, max_length), batch_size, True)


def _loader(data: TokenBatches, batch_size: int, shuffle: bool) -> DataLoader:
    # shuffled from torch's global RNG, which qdistill's training loops seed per epoch (so a
    # resumed run draws the same batches as an uninterrupted one)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


__all__ = ["TokenBatches", "classification_loader", "text_loader", "tokenize"]
