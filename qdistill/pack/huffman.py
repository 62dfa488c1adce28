"""Huffman coding of quantization codes (exact, canonical, length-limited by fallback).

Polino, Pascanu & Alistarh (2018), Sec. 5, report compression with Huffman-coded weights:
quantized weights are far from uniformly distributed over their levels, so an entropy code
stores them in fewer bits than the fixed ``bits`` per weight. The code here is the canonical
Huffman code (Schwartz & Kallick 1964): only the code length of every symbol is stored, and
both sides rebuild the same codes from the lengths.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np
import torch

from qdistill.errors import FileFormatError

MAX_CODE_LENGTH = 16  # decode table of 2**16 entries; longer codes fall back to fixed length


def code_lengths(counts: Sequence[int]) -> list[int]:
    """Huffman code length of every symbol (0 for symbols that never occur)."""
    symbols = [(c, s) for s, c in enumerate(counts) if c > 0]
    lengths = [0] * len(counts)
    if len(symbols) == 1:
        lengths[symbols[0][1]] = 1
        return lengths
    heap: list[tuple[int, int, list[int]]] = [(c, s, [s]) for c, s in symbols]
    heapq.heapify(heap)
    tie = len(counts)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def canonical_codes(lengths: Sequence[int]) -> dict[int, tuple[int, int]]:
    """``{symbol: (code, length)}`` of the canonical code with these lengths."""
    order = sorted((n, s) for s, n in enumerate(lengths) if n > 0)
    codes: dict[int, tuple[int, int]] = {}
    code, prev = 0, order[0][0] if order else 0
    for n, s in order:
        code <<= n - prev
        codes[s] = (code, n)
        code += 1
        prev = n
    return codes


def encoded_bits(codes: torch.Tensor, num_symbols: int) -> int:
    """Size in bits of the Huffman-coded ``codes`` (without the length table)."""
    counts = np.bincount(codes.reshape(-1).numpy(), minlength=num_symbols)
    lengths = code_lengths(counts.tolist())
    return int(sum(int(c) * n for c, n in zip(counts, lengths, strict=True)))


def encode(codes: torch.Tensor, num_symbols: int) -> tuple[torch.Tensor, list[int]]:
    """Huffman-encode unsigned codes: (bit stream as uint8, MSB first; code lengths)."""
    flat = codes.reshape(-1).numpy().astype(np.int64)
    counts = np.bincount(flat, minlength=num_symbols)
    lengths = code_lengths(counts.tolist())
    if max(lengths) > MAX_CODE_LENGTH:
        raise ValueError("code too long for the table decoder")
    table = canonical_codes(lengths)
    code_of = np.zeros(num_symbols, dtype=np.int64)
    len_of = np.zeros(num_symbols, dtype=np.int64)
    for s, (c, n) in table.items():
        code_of[s], len_of[s] = c, n
    lens = len_of[flat]
    total = int(lens.sum())
    bits = np.zeros(total, dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    for k in range(int(lens.max()) if lens.size else 0):  # write bit k of every code at once
        has = lens > k
        shift = lens[has] - 1 - k
        bits[starts[has] + k] = (code_of[flat[has]] >> shift) & 1
    return torch.from_numpy(np.packbits(bits)), lengths


def decode(stream: torch.Tensor, lengths: Sequence[int], numel: int) -> torch.Tensor:
    """Inverse of :func:`encode`: ``numel`` codes as uint8.

    The lengths come from a file: they are checked (at most :data:`MAX_CODE_LENGTH` bits, so
    the lookup table stays at 2**16 entries; Kraft sum at most 1, so no two codes overlap) and
    ``numel`` must fit the stream (every code takes at least one bit) before anything is
    allocated from them.
    """
    if not all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_CODE_LENGTH
        for n in lengths
    ):
        raise FileFormatError(f"Huffman code lengths must be integers 0..{MAX_CODE_LENGTH}")
    if sum(1 << (MAX_CODE_LENGTH - n) for n in lengths if n > 0) > 1 << MAX_CODE_LENGTH:
        raise FileFormatError("the Huffman code lengths break the Kraft inequality; corrupt")
    if numel < 0 or numel > 8 * stream.numel():
        raise FileFormatError(f"{numel} Huffman codes cannot fit in {stream.numel()} bytes")
    table = canonical_codes(lengths)
    if not table:
        raise FileFormatError("a Huffman table with no symbols; the file is corrupt")
    max_len = max(n for _, n in table.values())
    lookup_sym = np.full(1 << max_len, -1, dtype=np.int64)
    lookup_len = np.zeros(1 << max_len, dtype=np.int64)
    for s, (c, n) in table.items():
        lo = c << (max_len - n)
        lookup_sym[lo : lo + (1 << (max_len - n))] = s
        lookup_len[lo : lo + (1 << (max_len - n))] = n
    bits = np.unpackbits(stream.numpy())
    padded = np.concatenate([bits, np.zeros(max_len, dtype=np.uint8)]).astype(np.int64)
    # value of the max_len-bit window starting at every bit position
    weights = 1 << np.arange(max_len - 1, -1, -1, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(padded, max_len)[: len(bits)] @ weights
    out = np.empty(numel, dtype=np.uint8)
    pos = 0
    syms, lens = lookup_sym[windows], lookup_len[windows]
    for i in range(numel):
        if pos >= len(bits) or syms[pos] < 0:
            raise FileFormatError("the Huffman stream is truncated or corrupt")
        out[i] = syms[pos]
        pos += lens[pos]
    return torch.from_numpy(out)
