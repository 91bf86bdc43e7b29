"""Turning next-token logits into a token: greedy, or sampling with temperature, top-k, top-p and min-p, optionally
after a repetition penalty.

The steps, in Hugging Face's order (so settings mean the same as in `transformers.generate`):
    repetition penalty   a logit of a token already in the sequence is divided by the penalty if positive,
                         multiplied by it if negative (CTRL, Keskar et al. 2019): > 1 discourages repeats
    temperature          logits / T
    top-k                keep the k largest logits
    top-p (nucleus)      keep the most likely tokens that together hold probability p
    min-p                keep tokens whose probability is at least min_p times the most likely token's
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def check_sampling_args(
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
) -> None:
    """Raise ValueError, naming the argument, for a setting outside its range."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V], seen bool [B, V] (tokens already in each row) -> penalised logits [B, V]."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None, min_p: float | None = None
) -> torch.Tensor:
    """logits [B, V] -> logits with everything outside the top-k / nucleus (top-p) / min-p set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token if the tokens ranked above it already hold top_p of the mass (the top one always stays).
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p:  # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); the top token always stays
        threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return logits


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] int64: each row's first largest value's index (NaN counts as largest), torch.argmax's.
    On the CPU numpy's argmax, whose loop is vectorized where torch's CPU argmax is not: it costs a fraction of
    a decoded token's time over a 100k-token vocabulary (`python bench/step_parts.py`, "argmax")."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64) and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def next_token(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy unless do_sample (temperature 0 is greedy too)."""
    if not do_sample or temperature == 0:
        return greedy(logits)
    logits = filter_logits(logits.float() / temperature, top_k, top_p, min_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@dataclass
class Sampler:
    """All sampling settings in one validated object: `sampler(logits, seen)` -> token ids [B].

    The keywords are Hugging Face's `generate` ones. Random draws come from `generator`, or from a new generator
    seeded with `seed` (made on the logits' device at the first call): a seed makes a sample repeatable.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    generator: torch.Generator | None = None
    seed: int | None = None

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)
        if self.seed is not None and self.generator is not None:
            raise ValueError("pass either a generator or a seed, not both")

    @property
    def tracks_history(self) -> bool:
        """Whether __call__ needs `seen`, the tokens already in each sequence."""
        return self.repetition_penalty not in (None, 1.0)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V]; seen bool [B, V], needed for a repetition penalty -> token ids [B]."""
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(logits.device).manual_seed(self.seed)
        if self.tracks_history:
            logits = apply_repetition_penalty(logits.float(), seen, self.repetition_penalty)
        return next_token(logits, self.do_sample, self.temperature, self.top_k, self.top_p, self.generator, self.min_p)
