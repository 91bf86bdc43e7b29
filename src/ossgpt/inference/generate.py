"""Autoregressive generation: one prefill pass over the prompt, then one token at a time from a KV cache."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ossgpt.inference.sampling import check_sampling_args, next_token
from ossgpt.model.cache import KVCache


@torch.no_grad()
def stream(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool = False,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], until max_new_tokens or every row has produced an EOS.

    input_ids [B, T], left-padded where attention_mask [B, T] has zeros. Rows that have finished keep
    yielding their EOS id so the batch stays rectangular.
    """
    check_sampling_args(temperature, top_k, top_p)
    B, T = input_ids.shape
    if T + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{model.config.max_position_embeddings} tokens"
        )
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=input_ids.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, -1)
    cache = KVCache(model.config, B, T + max_new_tokens, device=input_ids.device, dtype=model.embed_tokens.weight.dtype)

    logits = model(input_ids, positions=positions, cache=cache, logits_to_keep=1).logits[:, -1]
    next_position = positions.max(dim=-1, keepdim=True).values + 1  # [B, 1]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = next_token(logits, do_sample, temperature, top_k, top_p, generator)
        if eos.numel():
            token = torch.where(finished, eos[0], token)
            finished |= torch.isin(token, eos)
        yield token
        if finished.all() or step == max_new_tokens - 1:
            return
        logits = model(token[:, None], positions=next_position, cache=cache).logits[:, -1]
        next_position = next_position + 1


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool = False,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The seed's API: input_ids [B, T] -> [B, T + generated] (prompt included).

    max_length counts the prompt (as in the seed and HF); max_new_tokens does not; give one of them
    (default: 20 new tokens). Greedy unless do_sample=True.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if max_new_tokens is None:
        max_new_tokens = 20 if max_length is None else max_length - input_ids.shape[1]
    if max_new_tokens <= 0:
        return input_ids
    was_training = model.training
    model.eval()
    try:
        tokens = list(
            stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id,
                   attention_mask, generator)  # fmt: skip
        )
    finally:
        model.train(was_training)
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
