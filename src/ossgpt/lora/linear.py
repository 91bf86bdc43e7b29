"""Low-rank adapters on linear maps: the attention projections (`LoRALinear`) and the router (`LoRARouter`).

    y = x W^T + b + (alpha / r) (x A^T) B^T        W [out, in], b [out] frozen; A [r, in], B [out, r] trained

A starts random and B at zero, so an adapted layer computes exactly its base's function until B moves. The
update B A is never formed during training: x A^T is [.., r] with r small, so the adapter costs two thin
products. Each module holds its base's own weight and bias under their own names (`weight`, `bias`), so the
model's state dict keeps the base's names, with `lora_A` and `lora_B` beside them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ossgpt.model.moe import Router


def random_a(
    shape: tuple[int, ...], fan_in: int, generator: torch.Generator, dtype: torch.dtype, device
) -> torch.Tensor:
    """A's initial values: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), what PEFT's kaiming_uniform_(a=sqrt(5)) draws for
    a [r, fan_in] matrix; drawn on the CPU in float32 (the same values on every device), then moved."""
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator).to(dtype).to(device)


def low_rank(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """x [..., in], A [r, in], B [out, r] -> scale * (x A^T) B^T [..., out]."""
    return scale * F.linear(F.linear(x, lora_a), lora_b)


class LoRALinear(nn.Module):
    """An nn.Linear with a low-rank update: x [..., in] -> [..., out]. `merged()` folds it back into an nn.Linear."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator, dtype=None):
        """dtype: the adapters' (default: the base weight's)."""
        super().__init__()
        out_features, in_features = base.weight.shape
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)  # may be None, as in nn.Linear
        self.lora_rank, self.lora_alpha, self.lora_scale = rank, alpha, alpha / rank
        dtype, device = dtype or base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(random_a((rank, in_features), in_features, generator, dtype, device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + low_rank(x, self.lora_A, self.lora_B, self.lora_scale)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain nn.Linear computing the same function: W += (alpha / r) B A, in place on the base's weight."""
        self.weight.add_((self.lora_B @ self.lora_A).to(self.weight.dtype), alpha=self.lora_scale)
        out_features, in_features = self.weight.shape
        linear = nn.Linear(in_features, out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, rank={self.lora_rank}, alpha={self.lora_alpha}"


class LoRARouter(Router):
    """The router of ossgpt.model.moe with a low-rank update on its logits: x [N, H] -> logits [N, E], mixing
    weights [N, k], expert indices [N, k]. The adapter moves which experts a token picks, not only how it mixes
    them, so it is off by default (LoRAConfig.targets)."""

    def __init__(self, base: Router, config, rank: int, alpha: float, generator: torch.Generator, dtype=None):
        with torch.device("meta"):
            super().__init__(config)
        self.weight, self.bias = base.weight, base.bias  # [E, H], [E]
        num_experts, hidden = base.weight.shape
        self.lora_rank, self.lora_alpha, self.lora_scale = rank, alpha, alpha / rank
        dtype, device = dtype or base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(random_a((rank, hidden), hidden, generator, dtype, device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rank, dtype=dtype, device=device))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> [N, E]: the base's logits plus the low-rank update."""
        return super().logits(x) + low_rank(x, self.lora_A, self.lora_B, self.lora_scale)

    @torch.no_grad()
    def merged(self, config) -> Router:
        """The plain Router computing the same function: W += (alpha / r) B A, in place on the base's weight."""
        self.weight.add_((self.lora_B @ self.lora_A).to(self.weight.dtype), alpha=self.lora_scale)
        with torch.device("meta"):
            router = Router(config)
        router.weight, router.bias = self.weight, self.bias
        return router

    def extra_repr(self) -> str:
        return f"rank={self.lora_rank}, alpha={self.lora_alpha}"
