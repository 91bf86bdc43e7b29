"""Key/value cache for incremental decoding, preallocated once per generation.

Each layer keeps keys and values in fixed buffers [B, H_kv, capacity, D] and the absolute position held in
each slot, [B, capacity] (-1 = empty). Nothing is reallocated per token:
  * full-attention layers: capacity = the longest sequence to be generated; position p lives in slot p;
  * sliding-window layers: capacity = the window; slot p % window, a ring buffer, because a query at p
    never looks further back than p - window + 1. A single new token overwrites the one slot its query can
    no longer see and attends over the buffer as it is (no copy per token).
Attention masks are built from the stored positions, so the same mask code serves training (no cache),
prefill and decoding, and left-padded rows (position -1) are simply never attended to.

Rows normally advance together: every step writes the same columns of every row (`seen` is one int). For continuous
batching (ossgpt.inference.engine) each row holds its own sequence, at its own length: `seen` is then a [B] tensor,
one column per row, and a step writes one token per row at that row's column. `narrow` gives a view of some rows
(and the first columns), a cache that writes into this one, so a step can run on the rows that are in use.
"""

from __future__ import annotations

import copy

import torch

from ossgpt.kernels import native


class LayerKVCache:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, ring: bool, device, dtype):
        self.keys = torch.zeros(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.capacity = capacity
        self.ring = ring

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, start: int | torch.Tensor):
        """Store this step's k, v [B, H_kv, T, D], the tokens of columns start..start+T-1 at positions [B, T].

        Returns the keys, values [B, H_kv, S, D] and key positions [B, S] that this step's queries attend over.
        Slots are indexed by column, not position, so left-padded rows (position -1) share one layout.
        start: one int for every row, or a [B] tensor of each row's column when T is 1 (rows of different lengths).
        """
        T = k.shape[2]
        per_row = isinstance(start, torch.Tensor)
        if per_row and T != 1:
            raise ValueError(f"per-row start columns take one token per row, got {T}")
        if per_row or (self.ring and T == 1):
            # One token per row. In a ring buffer (decoding) it overwrites the oldest slot, which its query could no
            # longer see (it is `capacity` = window positions back), so the buffer itself then holds exactly what it
            # attends over. At per-row columns each row's token, as in the ring, overwrites nothing its query could
            # still see; the rows attend over the whole buffer: slots beyond a row's sequence hold position -1 and
            # are masked.
            self.write(k, v, positions, start)
            return self.keys, self.values, self.positions
        if self.ring:
            # Attend over the window kept so far plus all new keys (a prefill may be longer than the window),
            # then keep only the newest `capacity` columns.
            keys = torch.cat([self.keys, k], dim=2)
            values = torch.cat([self.values, v], dim=2)
            key_positions = torch.cat([self.positions, positions], dim=1)
            keep = min(T, self.capacity)
            self.write(k[:, :, T - keep :], v[:, :, T - keep :], positions[:, T - keep :], start + T - keep)
            return keys, values, key_positions
        if start + T > self.capacity:
            raise ValueError(f"KV cache full: {start + T} tokens exceed its capacity of {self.capacity}")
        self.write(k, v, positions, start)
        end = start + T
        return self.keys[:, :, :end], self.values[:, :, :end], self.positions[:, :end]

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, start: int | torch.Tensor) -> None:
        """k, v [B, H_kv, T, D] and positions [B, T] into columns start..start+T-1 (start: an int, or a [B] tensor of
        each row's first column), modulo the capacity in a ring buffer. On the CPU one native call
        (ossgpt.kernels.native.write_kv); elsewhere the same through an index."""
        if native.write_kv(self.keys, self.values, self.positions, k, v, positions, start, self.ring):
            return
        B, T = positions.shape
        columns = (start.view(B, 1) if isinstance(start, torch.Tensor) else start) + torch.arange(T, device=k.device)
        slots = (columns % self.capacity if self.ring else columns).expand(B, T)
        rows = torch.arange(B, device=k.device)[:, None]
        self.keys[rows, :, slots] = k.transpose(1, 2)  # [B, T, H_kv, D] at the [B, T] (row, slot) pairs
        self.values[rows, :, slots] = v.transpose(1, 2)
        self.positions[rows, slots] = positions

    def narrow(self, first: int, rows: int, columns: int) -> LayerKVCache:
        """Rows first..first+rows-1 and, of a plain buffer, the first `columns` columns (a ring buffer keeps all its
        slots: any of them may be in use), as a cache whose writes land in this one."""
        view = copy.copy(self)
        view.capacity = self.capacity if self.ring else min(columns, self.capacity)
        view.keys = self.keys[first : first + rows, :, : view.capacity]
        view.values = self.values[first : first + rows, :, : view.capacity]
        view.positions = self.positions[first : first + rows, : view.capacity]
        return view


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
        self.seen = 0  # columns stored so far (or a [B] tensor, one per row); the model advances it after each forward

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]

    def narrow(self, first: int, rows: int, columns: int | None = None) -> KVCache:
        """A view of rows first..first+rows-1 and their first `columns` columns (default: all): a cache of `rows`
        rows whose writes land in this one. Its `seen` starts as this one's; set it for the view's rows."""
        view = copy.copy(self)
        view.max_length = self.max_length if columns is None else min(columns, self.max_length)
        view.layers = [layer.narrow(first, rows, view.max_length) for layer in self.layers]
        return view
