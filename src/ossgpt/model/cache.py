"""Key/value cache for incremental decoding, preallocated once per generation.

Each layer keeps keys and values in fixed buffers [B, H_kv, capacity, D] and the absolute position held in
each slot, [B, capacity] (-1 = empty). Nothing is reallocated per token:
  * full-attention layers: capacity = the longest sequence to be generated; position p lives in slot p;
  * sliding-window layers: capacity = the window; slot p % window, a ring buffer, because a query at p
    never looks further back than p - window + 1. A single new token overwrites the one slot its query can
    no longer see and attends over the buffer as it is (no copy per token).
Attention masks are built from the stored positions, so the same mask code serves training (no cache),
prefill and decoding, and left-padded rows (position -1) are simply never attended to.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, ring: bool, device, dtype):
        self.keys = torch.zeros(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.capacity = capacity
        self.ring = ring

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, start: int):
        """Store this step's k, v [B, H_kv, T, D], the tokens of columns start..start+T-1 at positions [B, T].

        Returns the keys, values [B, H_kv, S, D] and key positions [B, S] that this step's queries attend over.
        Slots are indexed by column, not position, so left-padded rows (position -1) share one layout.
        """
        T = k.shape[2]
        if self.ring and T == 1:
            # One new token (decoding): it overwrites the oldest slot, which its query could no longer see (it is
            # `capacity` = window positions back), so the buffer itself then holds exactly what it attends over.
            slot = start % self.capacity
            self.keys[:, :, slot : slot + 1] = k
            self.values[:, :, slot : slot + 1] = v
            self.positions[:, slot : slot + 1] = positions
            return self.keys, self.values, self.positions
        if self.ring:
            # Attend over the window kept so far plus all new keys (a prefill may be longer than the window),
            # then keep only the newest `capacity` columns.
            keys = torch.cat([self.keys, k], dim=2)
            values = torch.cat([self.values, v], dim=2)
            key_positions = torch.cat([self.positions, positions], dim=1)
            keep = min(T, self.capacity)
            slots = torch.arange(start + T - keep, start + T, device=k.device) % self.capacity
            self.keys[:, :, slots] = k[:, :, T - keep :]
            self.values[:, :, slots] = v[:, :, T - keep :]
            self.positions[:, slots] = positions[:, T - keep :]
            return keys, values, key_positions
        if start + T > self.capacity:
            raise ValueError(f"KV cache full: {start + T} tokens exceed its capacity of {self.capacity}")
        self.keys[:, :, start : start + T] = k
        self.values[:, :, start : start + T] = v
        self.positions[:, start : start + T] = positions
        end = start + T
        return self.keys[:, :, :end], self.values[:, :, :end], self.positions[:, :end]


class KVCache:
    """One LayerKVCache per layer, sized for `max_length` columns (tokens, padding included) per row."""

    def __init__(self, config, batch: int, max_length: int, device=None, dtype=torch.float32):
        window = config.sliding_window
        self.layers = [
            LayerKVCache(
                batch,
                config.num_key_value_heads,
                config.head_dim,
                capacity=min(window, max_length) if kind == "sliding_attention" else max_length,
                ring=kind == "sliding_attention" and window < max_length,
                device=device,
                dtype=dtype,
            )
            for kind in config.layer_types
        ]
        self.max_length = max_length
        self.seen = 0  # columns stored so far; the model advances it after each forward

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]
