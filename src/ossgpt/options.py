"""How a model runs, apart from what it computes.

`GPTOSSConfig` (ossgpt.config) is the architecture: every number that changes the function the model computes,
saved beside each checkpoint. `RuntimeOptions` is how that function is evaluated: which kernel computes attention
and the experts, whether the loss is formed chunk by chunk, whether activations are recomputed in the backward
pass. Every option gives the same outputs up to float rounding (tests/test_fast_paths.py checks each fast path
against the plain one in ossgpt.model), so options are never saved with a checkpoint, and a run may resume or a
checkpoint load with other options.

    model = GPTOSS(config, RuntimeOptions(attention="eager", experts="loop", loss_chunk_size=0))  # plain references
    model.options = RuntimeOptions(gradient_checkpointing=True)  # change them on a built model

The native CPU kernels (ossgpt.kernels.native: RMSNorm, rotary and masks without gradients, the packed products;
with "sdpa", a decoding step's attention) are taken wherever they apply; `OSSGPT_NATIVE=0` turns them off, leaving
torch's ops alone.

The dtype of the weights is not an option here: it belongs to the tensors (`from_pretrained(dtype=...)`,
`model.to(dtype)`), and training's compute dtype to its autocast (`ossgpt train --dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_KERNELS = ("sdpa", "eager")
EXPERT_KERNELS = ("sorted", "loop")


@dataclass(frozen=True)
class RuntimeOptions:
    # "sdpa": a fused kernel that never holds the [B, H, T, S] scores (ossgpt.kernels.attention);
    # "eager": the einsum reference of ossgpt.model.attention.
    attention: str = "sdpa"
    # "sorted": tokens sorted by expert, one grouped product per projection (ossgpt.kernels.experts);
    # "loop": the per-expert reference loop of ossgpt.model.moe. Experts kept packed in MXFP4 (ossgpt.quant.mxfp4)
    # always loop over experts; "sorted" multiplies by the packed weights directly, "loop" dequantizes them.
    experts: str = "sorted"
    # Rows of LM-head logits the chunked cross-entropy forms at a time when only the loss is wanted
    # (ossgpt.kernels.loss); 0 = the plain loss over all [B * T, vocab] logits at once.
    loss_chunk_size: int = 512
    # Recompute each block's activations in the backward pass instead of storing them (less memory, ~1/3 more
    # compute); training only.
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}")
        if self.experts not in EXPERT_KERNELS:
            raise ValueError(f"experts must be one of {', '.join(EXPERT_KERNELS)}, got {self.experts!r}")
        if type(self.loss_chunk_size) is not int or self.loss_chunk_size < 0:  # (a bool is not accepted)
            raise ValueError(f"loss_chunk_size must be a non-negative integer, got {self.loss_chunk_size!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")
