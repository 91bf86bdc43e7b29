"""How much memory a model needs for decoding, worked out from its config before anything is loaded.

    plan = MemoryPlan.of(config, dtype, keep_mxfp4, quantization, embedding_dtype)
    plan.steady        bytes of the weights as they end up in memory: MXFP4 experts packed, int8 matrices at a
                       byte per weight and their bfloat16 scales, the embedding table in `embedding_dtype`,
                       everything else in `dtype`
    plan.kv_per_token  the KV cache's bytes per token of context (keys and values of the full-attention layers;
                       the sliding-window layers' fixed windows are counted in `steady`)
    check_memory(plan, context, what)  UserError naming the figure when this machine has less memory available

Loading holds no more than that at any time: float weights are read from memory-mapped files and converted one
tensor at a time, and a matrix becomes int8 a few thousand rows at a time (ossgpt.kernels.int8.quantize_int8).
Packed experts are memory-mapped from the checkpoint: they count once resident (the first tokens touch them),
which is also what the kernel's page cache counts as available. The figures are estimates (activations, the
allocator and Python add a few hundred MB): BENCHMARKS.md sets them beside measured peak RSS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ossgpt.errors import UserError
from ossgpt.kernels.int8 import block_scales_available
from ossgpt.model.model import GPTOSS
from ossgpt.quant.int8 import ATTENTION_PROJECTIONS, BLOCK
from ossgpt.quant.mxfp4 import use_mxfp4_experts

GB = 1e9
# What a decoding process holds besides weights and cache: activations, logits rows, the allocator, Python.
OVERHEAD = int(0.8 * GB)


@dataclass(frozen=True)
class MemoryPlan:
    steady: int
    kv_per_token: int

    @classmethod
    def of(
        cls,
        config,
        dtype: torch.dtype,
        keep_mxfp4: bool,
        quantization: str | None,
        embedding_dtype: torch.dtype | None = None,
    ) -> MemoryPlan:
        """The plan for a model of `config` loaded as ossgpt.inference.loading.load_model does with these options
        (embedding_dtype: the table's, when it differs from `dtype`)."""
        with torch.device("meta"):
            model = GPTOSS(config)
            if keep_mxfp4:
                use_mxfp4_experts(model)
        size = {dtype: dtype.itemsize for dtype in (dtype, embedding_dtype or dtype)}
        quantizing = quantization not in (None, "none")
        steady = 0
        for name, tensor in (dict(model.named_parameters()) | dict(model.named_buffers())).items():
            if not tensor.is_floating_point():  # packed MXFP4 blocks and scales
                steady += tensor.numel()
            elif name == "embed_tokens.weight":
                steady += tensor.numel() * size[embedding_dtype or dtype]
            elif quantizing and _int8_target(name):  # a byte per weight, and bfloat16 scales
                steady += tensor.numel() + 2 * _int8_scales(name, tensor.shape, quantization)
            else:
                steady += tensor.numel() * size[dtype]
        if config.tie_word_embeddings and quantizing:  # the LM head becomes an int8 copy of the embedding
            shape = (config.vocab_size, config.hidden_size)
            steady += shape[0] * shape[1] + 2 * _int8_scales("lm_head.weight", shape, quantization)
        # Keys and values per layer and token; sliding-window layers keep only their window (ossgpt.model.cache).
        per_layer = 2 * config.num_key_value_heads * config.head_dim * size[dtype]
        sliding = config.layer_types.count("sliding_attention")
        return cls(steady=steady + sliding * per_layer * config.sliding_window,
                   kv_per_token=(config.num_hidden_layers - sliding) * per_layer)  # fmt: skip

    def needed(self, context: int) -> int:
        """Bytes to decode `context` tokens: weights (and the windows' caches), the cache and the overhead."""
        return self.steady + self.kv_per_token * context + OVERHEAD


def _int8_target(name: str) -> bool:
    """Whether ossgpt.quant.int8 stores this float tensor in int8 (LM head, attention projections, dense experts)."""
    return name == "lm_head.weight" or name.endswith(("_proj.weight", "experts.gate_up_proj", "experts.down_proj"))


def _int8_scales(name: str, shape: tuple, quantization: str) -> int:
    """How many scales ossgpt.quant.int8 gives this int8 tensor: one per block of 32 values for a W8A8 attention
    projection where the native kernel multiplies it, else one per output channel."""
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out]: per expert and channel
        return shape[0] * shape[2]
    out_features, in_features = shape
    attention = name.endswith(tuple(f"{projection}.weight" for projection in ATTENTION_PROJECTIONS))
    blocks = attention and quantization == "int8-dynamic" and block_scales_available(torch.device("cpu"), in_features)
    return out_features * (in_features // BLOCK if blocks else 1)


def available_memory() -> int | None:
    """Bytes the kernel reports as available to a new process (MemAvailable; None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(plan: MemoryPlan, context: int, what: str, advice: str = "") -> None:
    """UserError if decoding `context` tokens needs more memory than this machine has available."""
    available = available_memory()
    needed = plan.needed(context)
    if available is not None and needed > available:
        raise UserError(
            f"{what} needs about {needed / GB:.1f} GB of memory to decode {context} tokens (weights "
            f"{plan.steady / GB:.1f} GB), and this machine has {available / GB:.1f} GB "
            f"available{advice}"
        )
