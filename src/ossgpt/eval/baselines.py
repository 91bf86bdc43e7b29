"""Reference points for a model's bits per byte, computed on the same text.

gzip -9, bzip2 -9, xz -9   general-purpose compressors: compressed bytes * 8 / raw bytes. A model that does not
                           beat them knows less about the text than a dictionary coder does.
unigram                    every token coded by its frequency in the training tokens, context ignored:
                           -sum log2 p(token) / bytes with add-one (Laplace) smoothing over the V-token vocabulary,
                               p(t) = (count(t) + 1) / (N + V),
                           the bits a model gets from token frequencies alone.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

import numpy as np

from ossgpt.data.tokens import read_tokens
from ossgpt.errors import UserError

COMPRESSORS = {
    "gzip": lambda data: gzip.compress(data, compresslevel=9),
    "bzip2": lambda data: bz2.compress(data, compresslevel=9),
    "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, preset=9),
}
COUNT_CHUNK = 1 << 24  # tokens counted at a time, so counting a large train.bin needs little memory


def compression_bits_per_byte(data: bytes) -> dict[str, float]:
    """{compressor: bits per byte} of `data` under each of COMPRESSORS at its strongest level."""
    return {name: len(compress(data)) * 8 / len(data) for name, compress in COMPRESSORS.items()}


def train_token_counts(path: str | Path, vocab_size: int) -> np.ndarray:
    """[vocab_size] int64 occurrences of each id in a token file (a prepared train.bin, ossgpt.data.tokens)."""
    tokens = read_tokens(path)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), COUNT_CHUNK):
        chunk = tokens[start : start + COUNT_CHUNK]
        if chunk.max() >= vocab_size:
            raise UserError(
                f"{path} holds token id {chunk.max()}, outside the model's {vocab_size}-token vocabulary; "
                f"it was prepared with another tokenizer"
            )
        counts += np.bincount(chunk, minlength=vocab_size)
    return counts


def unigram_bits_per_byte(tokens: np.ndarray, n_bytes: int, train_counts: np.ndarray) -> float:
    """Bits per byte of coding `tokens` (ids, [n]) with add-one smoothed unigram probabilities from train_counts [V]."""
    counts = np.asarray(train_counts, dtype=np.float64)
    log2_p = np.log2(counts + 1) - np.log2(counts.sum() + len(counts))
    return float(-log2_p[np.asarray(tokens)].sum() / n_bytes)
