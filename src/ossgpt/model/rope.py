"""Rotary position embedding (RoPE), with YaRN context extension.

RoPE rotates each (i, i + D/2) pair of query/key channels by angle `position * inv_freq[i]`, so that the
dot product q·k depends only on the distance between positions. GPT-OSS rotates the two *halves* of the head
(not interleaved pairs).

YaRN ("NTK-by-parts", Peng et al. 2023) stretches a model's context by `factor`:
  * high-frequency channels (many full turns within the original context) are left alone: they encode
    local order, which does not change with longer context;
  * low-frequency channels (less than one turn) are interpolated: inv_freq / factor, so positions beyond the
    original context map into the angle range seen in training;
  * channels in between blend the two with a linear ramp between the dims where a channel makes
    `beta_fast` and `beta_slow` turns over the original context;
  * the logits are sharpened by `mscale = 0.1 * ln(factor) + 1` (applied to cos and sin, so q·k gets it
    squared, as in the reference implementations) to keep attention entropy in check at long range.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ossgpt.kernels import native


def yarn_correction_dim(num_rotations: float, dim: int, base: float, original_max_position: int) -> float:
    """The (fractional) channel-pair index whose wavelength fits `num_rotations` turns in the original context."""
    return dim * math.log(original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(
    head_dim: int,
    theta: float,
    rope_type: str = "default",
    factor: float = 1.0,
    original_max_position: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the attention scaling applied to cos/sin."""
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    if rope_type == "default":
        return inv_freq_extrapolation, 1.0

    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    low = yarn_correction_dim(beta_fast, head_dim, theta, original_max_position)
    high = yarn_correction_dim(beta_slow, head_dim, theta, original_max_position)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1 for fast channels (kept), 0 for slow ones (interpolated)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight
    mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, mscale


class RotaryEmbedding(nn.Module):
    """Maps positions to the (cos, sin) tables that `apply_rotary` uses."""

    def __init__(self, config):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(
            config.head_dim,
            config.rope_theta,
            config.rope_type,
            config.rope_factor,
            config.rope_original_max_position_embeddings,
            config.rope_beta_fast,
            config.rope_beta_slow,
            config.rope_truncate,
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] or [B, T] integer -> cos, sin: [..., T, head_dim // 2] in `dtype`. In float32 on the CPU
        one native call (ossgpt.kernels.native.rotary_table); otherwise the torch ops below."""
        if dtype == torch.float32 and (table := native.rotary_table(positions, self.inv_freq, self.attention_scaling)):
            return table
        angles = positions[..., None].float() * self.inv_freq.float()
        return (angles.cos() * self.attention_scaling).to(dtype), (angles.sin() * self.attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, sin: [T, D/2] or [B, T, D/2] -> x rotated, same shape. Float32 on the CPU without
    gradients: one native call (ossgpt.kernels.native.rotary); otherwise `rotary_reference`."""
    out = native.rotary(x, cos, sin)
    return out if out is not None else rotary_reference(x, cos, sin)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` written out in torch ops (the native call's reference; what autograd differentiates)."""
    if cos.dim() == 3:  # per-row positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
