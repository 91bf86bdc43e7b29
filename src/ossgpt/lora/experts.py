"""Low-rank adapters on the experts: one pair per expert and projection, so that every expert can adapt.

Shapes: E experts, H hidden, I expert width, r rank; a projection maps `in` channels to `out` (gate_up: H -> 2I,
down: I -> H). Adapters take the layout of `Experts`' weights, x @ W with W [E, in, out]:

    y_e = x W_e + b_e + (alpha / r) (x A_e) B_e        A [E, in, r] random, B [E, r, out] zeros

so that W_e + (alpha / r) A_e B_e is expert e's adapted weight (`merged`). During training that [E, in, out]
update is never formed: each expert's routed tokens go through the thin products x A_e ([n, r]) and then B_e.

The base experts are dense (`Experts`) or packed in MXFP4 (ossgpt.quant.mxfp4's `MXFP4Experts`); `LoRAExperts`
holds the base's own tensors under their own names (gate_up_proj or gate_up_proj_blocks/_scales, ..., biases), so
the state dict keeps the base's names, with `gate_up_proj_lora_A`, `gate_up_proj_lora_B`, ... beside them. It
computes the same function both ways the base can run (`RuntimeOptions.experts`):
  * "sorted": tokens sorted by expert as in ossgpt.kernels.experts, each update as two grouped products over all
    the experts' rows at once; the base's products grouped the same way (dense), or one routed expert's slice at
    a time (packed);
  * "loop": `Experts.loop`, the reference, one expert at a time, the update beside each expert's products.
A packed expert's weight goes through `packed_linear` (ossgpt.lora.packed: dequantized in the forward pass and
again in the backward pass, never kept) whenever gradients are on, and under "loop"; otherwise through the base's
own product, `mxfp4_linear` (native on CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from ossgpt.kernels.experts import grouped_linear
from ossgpt.kernels.mxfp4 import BLOCK_SIZE, dequantize_experts, mxfp4_linear
from ossgpt.lora.config import EXPERT_TARGETS
from ossgpt.lora.linear import random_a
from ossgpt.lora.packed import packed_linear
from ossgpt.model.moe import Experts


def expert_weight_shape(experts: nn.Module, projection: str) -> tuple[int, int, int] | None:
    """(E, in, out) of a projection ("gate_up_proj" or "down_proj") of dense or MXFP4-packed experts (adapted or
    not); None for experts stored any other way (e.g. int8, for decoding)."""
    weight = getattr(experts, projection, None)
    if isinstance(weight, nn.Parameter):
        return tuple(weight.shape)
    blocks = getattr(experts, f"{projection}_blocks", None)
    if blocks is None:
        return None
    E, out_features, groups, _ = blocks.shape  # rows = output channels
    return E, groups * BLOCK_SIZE, out_features


class LoRAExperts(Experts):
    """Experts (dense or packed) with adapters on `projections`: x [N, H], indices/weights [N, k] -> [N, H]."""

    def __init__(self, base: Experts, config, rank: int, alpha: float, projections: tuple[str, ...],
                 generator: torch.Generator, dtype: torch.dtype | None = None):  # fmt: skip
        with torch.device("meta"):
            super().__init__(config, base.kernel)
        del self.gate_up_proj, self.down_proj  # the base's weights replace them, dense or packed
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in base.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        self.packed = hasattr(self, "gate_up_proj_blocks")
        self.lora_rank, self.lora_alpha, self.lora_scale = rank, alpha, alpha / rank
        self.projections = tuple(projections)
        like = self.gate_up_proj_bias  # adapters live on the base's device, in its dtype unless `dtype` says
        dtype = dtype or like.dtype
        for projection in self.projections:
            E, fan_in, fan_out = expert_weight_shape(self, projection)
            lora_a = random_a((E, fan_in, rank), fan_in, generator, dtype, like.device)
            lora_b = torch.zeros(E, rank, fan_out, dtype=dtype, device=like.device)
            self.register_parameter(f"{projection}_lora_A", nn.Parameter(lora_a))
            self.register_parameter(f"{projection}_lora_B", nn.Parameter(lora_b))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's adapted MLP: x [n, H] -> [n, H] (the loop of `Experts.loop` calls it)."""
        return self.project("down_proj", e, self.activation(self.project("gate_up_proj", e, x)))

    def project(self, projection: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's `projection` of its tokens x [n, in] -> [n, out]: the base's product plus the update."""
        y = self.base_product(projection, e, x)
        if projection in self.projections:
            lora_a, lora_b = getattr(self, f"{projection}_lora_A")[e], getattr(self, f"{projection}_lora_B")[e]
            y = y + self.lora_scale * ((x @ lora_a) @ lora_b)
        return y

    def base_product(self, projection: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """The base's projection by expert e, bias included: x [n, in] -> [n, out]."""
        bias = getattr(self, f"{projection}_bias")[e]
        if not self.packed:
            return x @ getattr(self, projection)[e] + bias
        blocks, scales = getattr(self, f"{projection}_blocks")[e], getattr(self, f"{projection}_scales")[e]
        if self.kernel == "sorted" and not torch.is_grad_enabled():
            return mxfp4_linear(x, blocks, scales, bias)
        return packed_linear(x, blocks, scales) + bias

    def grouped(self, projection: str, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`projection` of rows grouped by expert, xs [M, in] (counts [E]) -> [M, out]: the base's in one grouped
        product (dense) or one routed expert at a time (packed); the update's in two grouped products."""
        if self.packed:
            slices = xs.split(counts.tolist())
            y = torch.cat([self.base_product(projection, e, rows) for e, rows in enumerate(slices) if len(rows)])
        else:
            y = super().grouped(projection, xs, counts)
        if projection in self.projections:
            lora_a, lora_b = getattr(self, f"{projection}_lora_A"), getattr(self, f"{projection}_lora_B")
            no_bias = lora_a.new_zeros(self.num_experts, self.lora_rank)  # grouped_linear always adds one
            xa = grouped_linear(xs, lora_a, no_bias, counts)  # [M, r]
            no_bias = lora_b.new_zeros(self.num_experts, lora_b.shape[-1])
            y = y + self.lora_scale * grouped_linear(xa, lora_b, no_bias, counts)
        return y

    @torch.no_grad()
    def merged(self, config) -> Experts:
        """Plain dense `Experts` computing the same function: W_e += (alpha / r) A_e B_e for every expert, in place
        on a dense base's weights; a packed base is dequantized (to the biases' dtype) first."""
        like = self.gate_up_proj_bias
        with torch.device("meta"):
            experts = Experts(config, self.kernel)
        for projection in EXPERT_TARGETS:
            if self.packed:
                blocks, scales = getattr(self, f"{projection}_blocks"), getattr(self, f"{projection}_scales")
                weight = nn.Parameter(dequantize_experts(blocks, scales, like.dtype, like.device), requires_grad=False)
            else:
                weight = getattr(self, projection)
            if projection in self.projections:
                lora_a, lora_b = getattr(self, f"{projection}_lora_A"), getattr(self, f"{projection}_lora_B")
                for e in range(self.num_experts):  # one expert at a time: no [E, in, out] temporary
                    weight[e].add_((lora_a[e] @ lora_b[e]).to(weight.dtype), alpha=self.lora_scale)
            setattr(experts, projection, weight)
            setattr(experts, f"{projection}_bias", getattr(self, f"{projection}_bias"))
        return experts

    def extra_repr(self) -> str:
        return f"{'packed' if self.packed else 'dense'}, projections={self.projections}, rank={self.lora_rank}, " \
               f"alpha={self.lora_alpha}"  # fmt: skip
