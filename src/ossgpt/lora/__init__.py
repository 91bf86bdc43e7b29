"""LoRA: low-rank adapters, fine-tuning a frozen model through a few small matrices (Hu et al., 2021).

A weight W of shape [out, in] is not trained; beside it sit A [r, in] and B [out, r] with r small (8, say), and
the layer computes

    y = x W^T + b + (alpha / r) (x A^T) B^T

A starts random, B at zero, so training starts from the base model's exact function; the update B A has rank r at
most, and costs r (in + out) numbers instead of in * out. alpha / r scales it so that the step size does not change
with r. Afterwards the update can be folded in, W' = W + (alpha / r) B A, and the model is a plain one again.

Applied from outside the model, like ossgpt.quant: `add_lora` replaces the targeted modules of a GPTOSS by
adapted twins that hold the base's own tensors under the base's own names.

    config.py      LoRAConfig, LORA_TARGETS: what is adapted, rank, alpha
    linear.py      LoRALinear (attention projections), LoRARouter
    experts.py     LoRAExperts: one adapter per expert on gate_up and on down, dense or MXFP4-packed base
    packed.py      packed_linear: a product through a frozen MXFP4 weight that keeps no dense copy for backward
    tokens.py      TokenEmbedding, TokenHead: chosen tokens' embedding (and LM head) rows, trained beside them
    transform.py   add_lora, lora_parameters, adapter_state_dict, merge_lora
    requantize.py  requantize_error: packing merged experts back into MXFP4, and what that rounding costs
    files.py       save_adapters, load_adapters

    model = add_lora(model, LoRAConfig(rank=16, alpha=32))        # the base frozen; adapters on every layer
    # (LoRAConfig(..., tokens=(200005, 200008)): those tokens' embedding and LM head rows train too)
    optimizer = torch.optim.AdamW([p for _, p in lora_parameters(model)])
    ...
    save_adapters(model, "run/adapters")                        # or merge_lora(model), then save it whole

With the experts kept packed (`from_pretrained(..., keep_mxfp4=True)`), gpt-oss-20b's experts take ~11 GiB less,
and `packed_linear` keeps it that way during training: a layer's experts are dequantized while it runs and again
while its backward runs, never all at once.
"""

from ossgpt.lora.config import LORA_TARGETS, LoRAConfig
from ossgpt.lora.files import load_adapters, save_adapters
from ossgpt.lora.requantize import requantize_error
from ossgpt.lora.transform import adapter_state_dict, add_lora, lora_parameters, merge_lora

__all__ = [
    "LORA_TARGETS", "LoRAConfig", "adapter_state_dict", "add_lora", "load_adapters", "lora_parameters",
    "merge_lora", "requantize_error", "save_adapters",
]  # fmt: skip
