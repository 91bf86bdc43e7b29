"""What packing adapted experts back into MXFP4 would cost: `requantize_error`.

A merged expert weight W + dW is dense; to ship it packed again, as gpt-oss is published, it is rounded to MXFP4
(`ossgpt.kernels.mxfp4.quantize_mxfp4`). FP4 has one mantissa bit: a value moves by up to a quarter of its
block's scale. A fine-tuning update is usually far smaller than that, and when the base was MXFP4 itself, W sits
exactly on the grid and Q(W + dW) mostly rounds back to W: the update is lost. `requantize_error` measures it,
per site, before merging:

    ||Q(W + dW) - (W + dW)|| / ||dW||      ~0: the update survives packing; ~1 or more: it drowns in the rounding

(keep such a model dense, e.g. bfloat16, or keep the adapters beside the packed base).
"""

from __future__ import annotations

import torch
from torch import nn

from ossgpt.kernels.mxfp4 import dequantize, quantize_mxfp4
from ossgpt.lora.experts import LoRAExperts


@torch.no_grad()
def requantize_error(model: nn.Module) -> dict[str, float]:
    """{expert site ("layers.0.mlp.experts.gate_up_proj"): ||Q(W + dW) - (W + dW)|| / ||dW||} for every adapted
    expert projection of `model`, in float32, one expert at a time; inf when dW is zero but the rounding is not."""
    errors = {}
    for i, layer in enumerate(model.layers):
        experts = layer.mlp.experts
        if not isinstance(experts, LoRAExperts):
            continue
        for projection in experts.projections:
            rounding_sq = update_sq = 0.0
            for e in range(experts.num_experts):
                weight, update = _merged_expert(experts, projection, e)  # [out, in]: the rows MXFP4 packs
                rounding_sq += (dequantize(*quantize_mxfp4(weight)) - weight).square().sum().item()
                update_sq += update.square().sum().item()
            errors[f"layers.{i}.mlp.experts.{projection}"] = _ratio(rounding_sq**0.5, update_sq**0.5)
    return errors


def _merged_expert(experts: LoRAExperts, projection: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's merged weight W + dW and its update dW, [out, in] (rows = output channels), in float32."""
    lora_a, lora_b = getattr(experts, f"{projection}_lora_A")[e], getattr(experts, f"{projection}_lora_B")[e]
    update = (experts.lora_scale * lora_a.float() @ lora_b.float()).T  # [in, out] -> [out, in]
    if experts.packed:
        base = dequantize(getattr(experts, f"{projection}_blocks")[e], getattr(experts, f"{projection}_scales")[e])
    else:
        base = getattr(experts, projection)[e].float().T
    return base + update, update


def _ratio(error: float, update: float) -> float:
    if update > 0:
        return error / update
    return 0.0 if error == 0 else float("inf")
