"""Model configuration: one dataclass, named presets, validation.

`GPTOSSConfig` holds every architectural number of a GPT-OSS model. Field names follow Hugging Face's
`GptOssConfig` where one exists (so HF `config.json` files map over with few renames); RoPE/YaRN settings
are flat fields rather than a nested dict so that each one is a plain CLI flag.

Presets (`GPTOSSConfig.from_preset(name)`):
  tiny          a CPU-trainable model for demos and tests (vocabulary follows the prepared data)
  mini          the seed README's 73.4M-parameter model
  gpt-oss-20b   OpenAI's published 20.9B shape
  gpt-oss-120b  OpenAI's published 116.8B shape
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

LAYER_TYPES = ("sliding_attention", "full_attention")
ROPE_TYPES = ("default", "yarn")


def alternating_layer_types(num_layers: int) -> list[str]:
    """GPT-OSS's pattern: sliding-window attention on even layers (0, 2, ...), full attention on odd ones."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


@dataclass
class GPTOSSConfig:
    # --- vocabulary and tokenizer ---------------------------------------------------------------------
    vocab_size: int = 100_352  # embedding rows; >= tokenizer's size, padded to a multiple of 128
    tokenizer: str = "cl100k_base"  # tokenizer spec, see ossgpt.tokenizer.load_tokenizer
    eos_token_id: int | None = 100_257  # <|endoftext|> in cl100k_base; generation stops on it
    pad_token_id: int | None = None

    # --- transformer shape ------------------------------------------------------------------------------
    hidden_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 64
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    # --- attention --------------------------------------------------------------------------------------
    attention_bias: bool = True
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)  # per layer; empty = alternating sliding/full
    attn_implementation: str = "sdpa"  # "sdpa" (fast) or "eager" (einsum reference)

    # --- rotary position embedding (RoPE) with optional YaRN ---------------------------------------------
    rope_theta: float = 1_000_000.0
    rope_type: str = "yarn"  # "default" = plain RoPE, "yarn" = NTK-by-parts + attention scaling
    rope_factor: float = 32.0  # YaRN context-extension factor
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = False  # round the YaRN correction range to whole dims (HF's default: true)

    # --- mixture of experts --------------------------------------------------------------------------
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    intermediate_size: int = 768  # per expert
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    moe_implementation: str = "sorted"  # "sorted" (dispatch by expert) or "loop" (per-expert reference)
    # Training-time router regularisers. gpt-oss's published config has aux coef 0.9, which is known to
    # swamp the LM loss when training from scratch; small defaults here.
    router_aux_loss_coef: float = 0.01  # load-balancing (importance x load) loss
    router_z_loss_coef: float = 0.001  # ST-MoE router z-loss
    router_jitter_noise: float = 0.0  # multiplicative uniform noise on router input, training only

    # --- initialisation and training switches -------------------------------------------------------------
    initializer_range: float = 0.02
    gradient_checkpointing: bool = False
    # Rows of LM-head logits the chunked cross-entropy forms at a time (ossgpt.model.loss); 0 = the reference
    # (all [B*T, vocab] logits at once, then F.cross_entropy). Used when forward() gets labels and
    # return_logits=False.
    loss_chunk_size: int = 512

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = alternating_layer_types(self.num_hidden_layers)
        else:
            self.layer_types = list(self.layer_types)
        self.validate()

    # ---------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the offending field for any impossible configuration."""
        positive_ints = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "sliding_window", "num_local_experts",
            "num_experts_per_tok", "intermediate_size", "rope_original_max_position_embeddings",
        )  # fmt: skip
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta", "rope_factor", "swiglu_alpha", "swiglu_limit",
                     "initializer_range"):  # fmt: skip
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if type(self.loss_chunk_size) is not int or self.loss_chunk_size < 0:  # (a bool is not accepted)
            raise ValueError(f"loss_chunk_size must be a non-negative integer, got {self.loss_chunk_size!r}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.router_jitter_noise >= 1:
            raise ValueError(f"router_jitter_noise must be < 1, got {self.router_jitter_noise}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_local_experts "
                f"({self.num_local_experts})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        for kind in self.layer_types:
            if kind not in LAYER_TYPES:
                raise ValueError(f"layer_types entries must be one of {LAYER_TYPES}, got {kind!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        if self.moe_implementation not in ("sorted", "loop"):
            raise ValueError(f"moe_implementation must be 'sorted' or 'loop', got {self.moe_implementation!r}")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"eos_token_id ({self.eos_token_id}) must be a valid id below vocab_size ({self.vocab_size})"
            )

    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTOSSConfig:
        """A named preset, with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        values = {**PRESETS[name], **overrides}
        return cls(**values)

    def replace(self, **changes) -> GPTOSSConfig:
        """A copy with some fields changed (validated again). Changing the depth re-derives layer_types."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = []
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTOSSConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


PRESETS: dict[str, dict] = {
    # Small enough to learn English in minutes on 2 CPU cores. The 100k-row cl100k LM head would dominate
    # the cost of such a model, so `tiny` uses a compact vocabulary: the 8,192 most frequent cl100k tokens of
    # the training corpus plus byte fallback (lossless; see ossgpt.tokenizer). `ossgpt prepare` builds it
    # and training sets vocab_size/eos_token_id from the prepared data.
    "tiny": dict(
        tokenizer="cl100k_base:8192",
        vocab_size=8_512,  # 8,192 tokens + 256 bytes + <|endoftext|>, padded to a multiple of 64 (as training does)
        eos_token_id=256,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=512,
        max_position_embeddings=1024,
        sliding_window=128,
        rope_theta=10_000.0,
        rope_type="default",
        rope_factor=1.0,
        rope_original_max_position_embeddings=1024,
    ),
    # The seed README's model. Its vocabulary is cl100k_base's 100,256 BPE ranks, but the special tokens go up
    # to id 100,276 (<|endoftext|> is 100,257), so the embedding is padded to 100,352 = 784 * 128.
    # Parameters: 73,452,080. The seed reported 73,369,088; the 82,992 difference is the 96 padding rows
    # (96 * 512 = 49,152) plus 33,840 per-layer terms the seed's count left out (its MLP experts had no biases:
    # 4 layers * 4 experts * (1536 + 512) = 32,768 of them).
    "mini": dict(
        tokenizer="cl100k_base",
        vocab_size=100_352,
        eos_token_id=100_257,
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=768,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        rope_type="yarn",
        rope_factor=32.0,
        rope_original_max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    # OpenAI's published shapes (openai/gpt-oss-20b, openai/gpt-oss-120b config.json).
    "gpt-oss-20b": dict(
        tokenizer="o200k_harmony",
        vocab_size=201_088,
        eos_token_id=200_002,  # <|return|>
        pad_token_id=199_999,
        hidden_size=2880,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        intermediate_size=2880,
        max_position_embeddings=131_072,
        rope_theta=150_000.0,
        rope_type="yarn",
        rope_factor=32.0,
        rope_original_max_position_embeddings=4096,
        rope_beta_fast=32.0,
        rope_beta_slow=1.0,
        rope_truncate=False,
        tie_word_embeddings=False,
        sliding_window=128,
    ),
}
PRESETS["gpt-oss-120b"] = {**PRESETS["gpt-oss-20b"], "num_hidden_layers": 36, "num_local_experts": 128}


# Seed compatibility: the seed README named fields differently. These names read and write the real fields.
SEED_ALIASES = {
    "num_layers": "num_hidden_layers",
    "num_experts": "num_local_experts",
    "num_experts_per_token": "num_experts_per_tok",
    "max_seq_len": "max_position_embeddings",
    "max_position": "max_position_embeddings",
    "expert_intermediate_size": "intermediate_size",
}


def _alias_property(target: str) -> property:
    return property(lambda self: getattr(self, target), lambda self, value: setattr(self, target, value))


for _alias, _target in SEED_ALIASES.items():
    setattr(GPTOSSConfig, _alias, _alias_property(_target))


def GPTOSSConfigMini(**overrides) -> GPTOSSConfig:  # noqa: N802 - the seed's public name
    """The seed's config class: the `mini` preset (seed attribute names such as `num_layers` work too)."""
    return GPTOSSConfig.from_preset("mini", **{SEED_ALIASES.get(k, k): v for k, v in overrides.items()})
