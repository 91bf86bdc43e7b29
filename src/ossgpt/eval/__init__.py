"""Evaluation: loss, perplexity and bits per byte of a model on text, reference baselines, plots.

    from ossgpt.eval import evaluate_text
    result = evaluate_text(model, tokenizer, text)
    result.loss, result.perplexity, result.bits_per_byte, result.expert_load

Plots live in `ossgpt.eval.plots` (imported on demand: matplotlib is slow to import).
"""

from ossgpt.eval.baselines import compression_bits_per_byte, train_token_counts, unigram_bits_per_byte
from ossgpt.eval.metrics import (
    EvalResult,
    ExpertLoad,
    TokenizedText,
    evaluate_text,
    evaluate_tokens,
    tokenize_documents,
)

__all__ = [
    "EvalResult",
    "ExpertLoad",
    "TokenizedText",
    "compression_bits_per_byte",
    "evaluate_text",
    "evaluate_tokens",
    "tokenize_documents",
    "train_token_counts",
    "unigram_bits_per_byte",
]
