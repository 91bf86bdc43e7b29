"""OpenAI's original gpt-oss checkpoint layout: the `original/` folder of the published repositories.

    original/config.json        the reference implementation's ModelConfig field names (num_experts, ...)
    original/*.safetensors      its module names:

    embedding.weight                      -> embed_tokens.weight
    block.N.attn.norm.scale               -> layers.N.input_layernorm.weight
    block.N.attn.qkv.weight / .bias       -> layers.N.self_attn.{q,k,v}_proj.weight / .bias  (rows q | k | v)
    block.N.attn.sinks                    -> layers.N.self_attn.sinks
    block.N.attn.out.weight / .bias       -> layers.N.self_attn.o_proj.weight / .bias
    block.N.mlp.norm.scale                -> layers.N.post_attention_layernorm.weight
    block.N.mlp.gate.weight / .bias       -> layers.N.mlp.router.weight / .bias
    block.N.mlp.mlp1_weight.blocks/.scales-> layers.N.mlp.experts.gate_up_proj_blocks/_scales  (MXFP4)
    block.N.mlp.mlp1_bias                 -> layers.N.mlp.experts.gate_up_proj_bias
    block.N.mlp.mlp2_weight.blocks/.scales-> layers.N.mlp.experts.down_proj_blocks/_scales     (MXFP4)
    block.N.mlp.mlp2_bias                 -> layers.N.mlp.experts.down_proj_bias
    norm.scale                            -> norm.weight
    unembedding.weight                    -> lm_head.weight

The packed experts have the same layout as Hugging Face's published MXFP4 tensors (rows = output channels, gate/up
rows interleaved), so both go through the same dequantization. The reference model uses sliding-window attention on
even layers, YaRN with beta_fast = rope_ntk_beta and beta_slow = rope_ntk_alpha (no rounding of the correction
range), and untied embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ossgpt.config import GPTOSSConfig, alternating_layer_types
from ossgpt.errors import UserError

# The reference's ModelConfig fields that fix the tensor shapes (the others have its defaults below).
SHAPE_FIELDS = ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads")  # fmt: skip
ORIGINAL_DIR = "original"  # the folder of a published repository that holds this layout
REFERENCE_DEFAULTS = dict(swiglu_limit=7.0, sliding_window=128, initial_context_length=4096, rope_theta=150000.0,
                          rope_scaling_factor=32.0, rope_ntk_alpha=1.0, rope_ntk_beta=32.0)  # fmt: skip
# gpt-oss's o200k_harmony ids: generation ends at <|return|>; <|endoftext|> pads.
RETURN_TOKEN_ID, PAD_TOKEN_ID = 200_002, 199_999

RENAMES = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
TOP_LEVEL = {"embedding.weight": "embed_tokens.weight", "norm.scale": "norm.weight",
             "unembedding.weight": "lm_head.weight"}  # fmt: skip
BLOCK_NAME = re.compile(r"block\.(\d+)\.(.+)")


def is_original_config(raw: dict) -> bool:
    """Whether a config.json dict is the reference implementation's (it has no model_type or format field)."""
    return "model_type" not in raw and "format" not in raw and {"num_experts", "experts_per_token"} <= set(raw)


def config_from_original(raw: dict, **overrides) -> GPTOSSConfig:
    """A GPTOSSConfig from the dict of an `original/config.json`."""
    missing = [name for name in SHAPE_FIELDS if name not in raw]
    if missing:
        raise UserError(f"original config.json lacks {', '.join(missing)}; is this a gpt-oss checkpoint?")
    raw = {**REFERENCE_DEFAULTS, **raw}
    factor = float(raw["rope_scaling_factor"])
    vocab_size = raw["vocab_size"]
    values = dict(
        vocab_size=vocab_size,
        hidden_size=raw["hidden_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_key_value_heads"],
        head_dim=raw["head_dim"],
        num_local_experts=raw["num_experts"],
        num_experts_per_tok=raw["experts_per_token"],
        intermediate_size=raw["intermediate_size"],
        swiglu_limit=float(raw["swiglu_limit"]),
        sliding_window=raw["sliding_window"],
        layer_types=alternating_layer_types(raw["num_hidden_layers"]),
        max_position_embeddings=int(raw["initial_context_length"] * max(factor, 1.0)),
        rope_theta=float(raw["rope_theta"]),
        rope_type="yarn" if factor > 1 else "default",  # the reference applies YaRN only for factors above 1
        rope_factor=factor if factor > 1 else 1.0,
        rope_original_max_position_embeddings=raw["initial_context_length"],
        rope_beta_fast=float(raw["rope_ntk_beta"]),
        rope_beta_slow=float(raw["rope_ntk_alpha"]),
        rope_truncate=False,
        tie_word_embeddings=False,
        attention_bias=True,
        tokenizer="o200k_harmony",
        eos_token_id=RETURN_TOKEN_ID if RETURN_TOKEN_ID < vocab_size else None,
        pad_token_id=PAD_TOKEN_ID if PAD_TOKEN_ID < vocab_size else None,
    )
    values.update(overrides)
    try:
        return GPTOSSConfig(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"original config.json describes an impossible model: {err}") from err


def original_files(directory: Path) -> list[Path]:
    """The weight files of an `original/` folder (the reference reads every *.safetensors file in it)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"no .safetensors files in {directory}")
    return files


def rename_original(
    tensors: Iterator[tuple[str, Path, torch.Tensor]], config: GPTOSSConfig
) -> Iterator[tuple[str, Path, str, torch.Tensor]]:
    """(name, file, tensor) in the original layout -> (ossgpt name, file, original name, tensor).

    The fused qkv projection becomes three tensors. Unknown names pass through unchanged (the loader then
    reports them as unexpected).
    """
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    for name, path, tensor in tensors:
        match = BLOCK_NAME.fullmatch(name)
        if name in TOP_LEVEL:
            yield TOP_LEVEL[name], path, name, tensor
        elif match and match[2] in ("attn.qkv.weight", "attn.qkv.bias"):
            if tensor.shape[0] != q_rows + 2 * kv_rows:
                raise UserError(
                    f"{path.name}: tensor {name!r} has {tensor.shape[0]} rows, config.json implies "
                    f"{q_rows} + 2 * {kv_rows} (q | k | v)"
                )
            kind = name.rsplit(".", 1)[1]
            for proj, part in zip("qkv", tensor.split([q_rows, kv_rows, kv_rows])):
                yield f"layers.{match[1]}.self_attn.{proj}_proj.{kind}", path, name, part
        elif match and match[2] in RENAMES:
            yield f"layers.{match[1]}.{RENAMES[match[2]]}", path, name, tensor
        else:
            yield name, path, name, tensor
