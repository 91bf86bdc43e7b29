"""Translate between Hugging Face's GptOssConfig (`config.json`) and ossgpt's GPTOSSConfig.

HF stores RoPE settings two ways: transformers 5 writes `rope_parameters` (with `rope_theta` inside), and
transformers 4 wrote `rope_theta` plus `rope_scaling`. A missing `truncate` means true (HF's default).

HF configs do not name the tokenizer; ossgpt writes its spec as `ossgpt_tokenizer` (transformers keeps unknown
keys, and writes them back), so that a model on another vocabulary than gpt-oss's (a compact one, whose token table
is the tokenizer.json beside it) loads with its own. Without it, the tokenizer is gpt-oss's, o200k_harmony.
"""

from __future__ import annotations

from ossgpt.config import GPTOSSConfig
from ossgpt.errors import UserError

# ossgpt field <- HF field, for the fields that map one to one.
DIRECT_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "num_local_experts": "num_local_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "sliding_window": "sliding_window",
    "tie_word_embeddings": "tie_word_embeddings",
    "attention_bias": "attention_bias",
    "swiglu_limit": "swiglu_limit",
    "swiglu_alpha": "swiglu_alpha",
    "initializer_range": "initializer_range",
    "layer_types": "layer_types",
}
TOKENIZER_KEY = "ossgpt_tokenizer"
# Older HF configs spell a few fields differently.
HF_SYNONYMS = {"num_local_experts": ("num_experts",), "num_experts_per_tok": ("experts_per_token",)}


def _first_id(value):
    return value[0] if isinstance(value, list) and value else value


def config_from_hf(hf: dict, **overrides) -> GPTOSSConfig:
    """A GPTOSSConfig from the dict of an HF gpt_oss `config.json`."""
    values = {}
    for ours, theirs in DIRECT_FIELDS.items():
        for name in (theirs, *HF_SYNONYMS.get(ours, ())):
            if hf.get(name) is not None:
                values[ours] = hf[name]
                break
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_local_experts")
    missing = [name for name in required if name not in values]
    if missing:
        raise UserError(f"HF config.json lacks {', '.join(missing)}; is this a gpt-oss checkpoint?")
    values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    values.setdefault("num_key_value_heads", values["num_attention_heads"])

    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 150000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    values["rope_theta"] = float(theta)
    if rope_type == "yarn":
        values.update(
            rope_type="yarn",
            rope_factor=float(rope["factor"]),
            rope_original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings") or values.get("max_position_embeddings", 4096)
            ),
            rope_beta_fast=float(rope.get("beta_fast") or 32.0),
            rope_beta_slow=float(rope.get("beta_slow") or 1.0),
            rope_truncate=bool(rope.get("truncate", True)),
        )
    elif rope_type == "default":
        values.update(rope_type="default", rope_factor=1.0)
    else:
        raise UserError(f"unsupported RoPE type {rope_type!r} in config.json (ossgpt supports default and yarn)")

    eos = _first_id(hf.get("eos_token_id"))
    values["eos_token_id"] = eos if eos is not None and eos < values["vocab_size"] else None
    values["pad_token_id"] = _first_id(hf.get("pad_token_id"))
    values["tokenizer"] = hf.get(TOKENIZER_KEY, "o200k_harmony")
    if not isinstance(values["tokenizer"], str):
        raise UserError(f"config.json: {TOKENIZER_KEY} must be a tokenizer spec (e.g. o200k_harmony), not "
                        f"{values['tokenizer']!r}")  # fmt: skip
    # router_aux_loss_coef is deliberately not imported: the published 0.9 swamps the LM loss in training.
    values.update(overrides)
    try:
        return GPTOSSConfig(**values)
    except ValueError as err:
        raise UserError(f"config.json describes an impossible model: {err}") from err


def config_to_hf(config: GPTOSSConfig) -> dict:
    """The HF `config.json` dict (transformers 5 layout, readable by transformers 4.55+ too)."""
    hf = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss"}
    for ours, theirs in DIRECT_FIELDS.items():
        hf[theirs] = getattr(config, ours)
    rope = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type == "yarn":
        rope.update(
            factor=config.rope_factor,
            beta_fast=config.rope_beta_fast,
            beta_slow=config.rope_beta_slow,
            truncate=config.rope_truncate,
            original_max_position_embeddings=config.rope_original_max_position_embeddings,
        )
    hf["rope_parameters"] = rope
    hf["rope_scaling"] = rope if config.rope_type == "yarn" else None  # what transformers 4 reads
    hf["rope_theta"] = config.rope_theta
    hf["eos_token_id"] = config.eos_token_id
    hf["pad_token_id"] = config.pad_token_id
    hf["hidden_act"] = "silu"
    hf["attention_dropout"] = 0.0
    hf["router_aux_loss_coef"] = config.router_aux_loss_coef
    hf["output_router_logits"] = False
    hf[TOKENIZER_KEY] = config.tokenizer
    return hf
