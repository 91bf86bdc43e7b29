"""Expert MLPs that keep their weights packed in MXFP4 and dequantize them on the fly.

gpt-oss's experts hold ~90% of its parameters. Kept as MXFP4 (4.25 bits per weight, see ossgpt.kernels.mxfp4) instead
of bfloat16, gpt-oss-20b's experts take ~11 GiB less memory. Each forward runs only the experts that received
tokens, one at a time (`Experts.loop`), in one of two ways (`RuntimeOptions.experts`):
  * "sorted" (the default): `mxfp4_linear` reads the packed weights directly (on CPU, the native kernel of
    ossgpt.kernels.native: activations rounded to int8 per block of 32, integer dot products); a few tokens
    (decoding, batched or not) run through their experts in one fused native call (`fused_experts`);
  * "loop": the reference: the expert's weights dequantized for this call, then ordinary float products.

`use_mxfp4_experts(model)` swaps every layer's `Experts` for an empty `MXFP4Experts`, which
`from_pretrained(..., keep_mxfp4=True)` then fills from the checkpoint. The module's buffers carry the published
Hugging Face names (`gate_up_proj_blocks`, ...), so such a model's state dict is the published MXFP4 layout.
"""

from __future__ import annotations

import torch

from ossgpt.kernels.mxfp4 import BLOCK_SIZE, dequantize, mxfp4_linear, quantize_mxfp4
from ossgpt.kernels.native import fused_experts
from ossgpt.model.moe import Experts


class MXFP4Experts(Experts):
    """Same function as `Experts`; weights as MXFP4 buffers, biases as parameters.

    gate_up_proj_blocks [E, 2I, H/32, 16], gate_up_proj_scales [E, 2I, H/32]  (rows = output channels, gate/up
    interleaved as in `Experts`); down_proj_blocks [E, H, I/32, 16], down_proj_scales [E, H, I/32].
    Built empty, on the meta device: loading assigns the real tensors.
    """

    def __init__(self, config):
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size  # noqa: E741
        if H % BLOCK_SIZE or I % BLOCK_SIZE:
            raise ValueError(f"MXFP4 experts need hidden_size ({H}) and intermediate_size ({I}) divisible by 32")
        with torch.device("meta"):
            super().__init__(config)
        del self.gate_up_proj, self.down_proj  # never materialised: the packed buffers replace them
        packed = dict(dtype=torch.uint8, device="meta")
        self.register_buffer("gate_up_proj_blocks", torch.empty(E, 2 * I, H // BLOCK_SIZE, BLOCK_SIZE // 2, **packed))
        self.register_buffer("gate_up_proj_scales", torch.empty(E, 2 * I, H // BLOCK_SIZE, **packed))
        self.register_buffer("down_proj_blocks", torch.empty(E, H, I // BLOCK_SIZE, BLOCK_SIZE // 2, **packed))
        self.register_buffer("down_proj_scales", torch.empty(E, H, I // BLOCK_SIZE, **packed))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], indices/weights [N, k] -> [N, H]: the loop of `Experts.loop`, over the experts that received
        tokens only; a few tokens (decoding) in one fused native call where there is one ("sorted")."""
        if self.kernel == "sorted":
            fused = fused_experts("mxfp4_experts", x, indices, weights,
                                  (self.gate_up_proj_blocks, self.gate_up_proj_scales, self.gate_up_proj_bias),
                                  (self.down_proj_blocks, self.down_proj_scales, self.down_proj_bias),
                                  self.alpha, self.limit)  # fmt: skip
            if fused is not None:
                return fused
        return self.loop(x, indices, weights)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's MLP on its tokens, x [n, H] -> [n, H]: packed products ("sorted"), or its weights
        dequantized to x's dtype ("loop")."""
        if self.kernel == "loop":
            gate_up = dequantize(self.gate_up_proj_blocks[e], self.gate_up_proj_scales[e], x.dtype).T  # [H, 2I]
            down = dequantize(self.down_proj_blocks[e], self.down_proj_scales[e], x.dtype).T  # [I, H]
            h = self.activation(x @ gate_up + self.gate_up_proj_bias[e])
            return h @ down + self.down_proj_bias[e]
        h = self.activation(mxfp4_linear(x, self.gate_up_proj_blocks[e], self.gate_up_proj_scales[e],
                                         self.gate_up_proj_bias[e]))  # fmt: skip
        return mxfp4_linear(h, self.down_proj_blocks[e], self.down_proj_scales[e], self.down_proj_bias[e])


def use_mxfp4_experts(model) -> None:
    """Replace every layer's `Experts` by an empty `MXFP4Experts` (to be filled by loading a checkpoint)."""
    for layer in model.layers:
        layer.mlp.experts = MXFP4Experts(model.config)
    model.options = model.options  # the new modules take the model's kernels


@torch.no_grad()
def pack_experts(experts: Experts, config) -> MXFP4Experts:
    """Dense `Experts` rounded to MXFP4 (kernels.mxfp4.quantize_mxfp4), one expert at a time: `MXFP4Experts`
    holding the packed weights, with the same biases and kernel."""
    packed = MXFP4Experts(config)
    for projection in ("gate_up_proj", "down_proj"):
        rows = getattr(experts, projection).transpose(1, 2)  # [E, out, in]: MXFP4 packs output channels' rows
        blocks, scales = zip(*(quantize_mxfp4(rows[e]) for e in range(rows.shape[0])))
        setattr(packed, f"{projection}_blocks", torch.stack(blocks))
        setattr(packed, f"{projection}_scales", torch.stack(scales))
        setattr(packed, f"{projection}_bias", getattr(experts, f"{projection}_bias"))
    packed.kernel = experts.kernel
    return packed


def has_mxfp4_experts(model) -> bool:
    return any(isinstance(layer.mlp.experts, MXFP4Experts) for layer in model.layers)
