"""Grouped-query self-attention with learned sinks and optional sliding window, as in GPT-OSS.

Shapes: B batch, T queries, S keys, H query heads, K = H_kv key/value heads, G = H // K queries per
key/value head, D head_dim.

Attention sinks: each head has one learned logit `sink[h]` that joins the softmax as if it were one more key
whose value is zero. Probability mass can flow there, so a head can "attend to nothing" instead of being
forced to spread weight over real tokens; after the softmax the sink column is dropped.

`eager_attention` below computes it plainly: einsum scores, the mask, the sink column, a softmax. Its fast twin,
`ossgpt.kernels.attention.sdpa_attention`, computes the same through a fused kernel without ever holding the
[B, H, T, S] scores; `RuntimeOptions.attention` picks one ("sdpa" by default).
"""

from __future__ import annotations

import torch
from torch import nn

from ossgpt.kernels import native
from ossgpt.kernels.attention import sdpa_attention
from ossgpt.model.rope import apply_rotary


def allowed_keys(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) visibility.

    query_positions [B, T], key_positions [B, S] (-1 = empty or padding) -> bool [B, 1, T, S].
    A key is visible if it is not in the future and, with a window, fewer than `window` positions back.
    On the CPU one native call computes it (ossgpt.kernels.native.visible_keys); elsewhere `allowed_keys_reference`.
    """
    visible = native.visible_keys(query_positions, key_positions, window)
    return visible if visible is not None else allowed_keys_reference(query_positions, key_positions, window)


def allowed_keys_reference(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None):
    """`allowed_keys` written out in torch ops (the native call's reference)."""
    q = query_positions[:, None, :, None]
    k = key_positions[:, None, None, :]
    visible = (k <= q) & (k >= 0)
    if window is not None:
        visible &= k > q - window
    return visible


def eager_attention(q, k, v, sinks, visible, scale):
    """q [B, H, T, D], k/v [B, K, S, D], sinks [H], visible bool [B, 1, T, S] -> [B, H, T, D]."""
    B, H, T, D = q.shape
    K = k.shape[1]
    q = q.view(B, K, H // K, T, D)  # query head h = kv_head * G + g, as HF's repeat_kv lays them out
    scores = torch.einsum("bkgtd,bksd->bkgts", q, k) * scale
    scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
    sink = sinks.view(1, K, H // K, 1, 1).expand(B, K, H // K, T, 1).to(scores.dtype)
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)  # the sink is finite, so no row is all -inf
    probs = logits.softmax(dim=-1)[..., :-1]  # drop the sink column
    out = torch.einsum("bkgts,bksd->bkgtd", probs.to(v.dtype), v)
    return out.reshape(B, H, T, D)


ATTENTION_KERNELS = {"eager": eager_attention, "sdpa": sdpa_attention}  # RuntimeOptions.attention -> function


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int, kernel: str = "sdpa"):
        super().__init__()
        self.kernel = kernel  # a key of ATTENTION_KERNELS; the model sets it from its RuntimeOptions
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))

    def forward(self, x, cos, sin, positions, cache=None, cache_start: int | torch.Tensor = 0):
        """x [B, T, hidden]; cos/sin from RotaryEmbedding; positions [B, T] (-1 = padding) -> [B, T, hidden].

        With a LayerKVCache, this step's tokens are the cache columns cache_start..cache_start+T-1 (cache_start:
        an int, or a [B] tensor of per-row columns for one token per row).
        """
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        key_positions = positions
        if cache is not None:
            k, v, key_positions = cache.update(k, v, positions, cache_start)
        visible = allowed_keys(positions, key_positions, self.window)
        out = ATTENTION_KERNELS[self.kernel](q, k, v, self.sinks, visible, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def project(self, x):
        """x [B, T, hidden] -> the queries [B, T, H * D], keys and values [B, T, K * D]. (A decoding copy may run the
        three as one product: ossgpt.quant.int8.Int8Attention.)"""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)
