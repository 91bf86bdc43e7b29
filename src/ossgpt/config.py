"""The architecture of a GPT-OSS model: one dataclass, validated.

`GPTOSSConfig` holds every number that defines the function a model computes, and only those: it is saved beside
each checkpoint (`config.json`). How the model runs (kernels, loss chunking, activation recomputation) is a
separate `RuntimeOptions` object (ossgpt.options), never saved. Field names follow Hugging Face's `GptOssConfig`
where one exists (so HF `config.json` files map over with few renames); RoPE/YaRN settings are flat fields rather
than a nested dict so that each one is a plain `--model-override KEY=VALUE`.

Named shapes, with their tokenizers and training recipes, are presets (ossgpt.presets):
`GPTOSSConfig.from_preset("tiny" | "mini" | "gpt-oss-20b" | "gpt-oss-120b", **overrides)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ossgpt.presets import get_preset

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
    # Training-time router regularisers. gpt-oss's published config has aux coef 0.9, which is known to
    # swamp the LM loss when training from scratch; small defaults here.
    router_aux_loss_coef: float = 0.01  # load-balancing (importance x load) loss
    router_z_loss_coef: float = 0.001  # ST-MoE router z-loss
    router_jitter_noise: float = 0.0  # multiplicative uniform noise on router input, training only

    # --- initialisation ------------------------------------------------------------------------------------
    initializer_range: float = 0.02

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
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"eos_token_id ({self.eos_token_id}) must be a valid id below vocab_size ({self.vocab_size})"
            )

    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTOSSConfig:
        """A named preset's model (ossgpt.presets), with any field overridden by keyword."""
        return cls(**{**get_preset(name).model, **overrides})

    def replace(self, **changes) -> GPTOSSConfig:
        """A copy with some fields changed (validated again). Changing the depth re-derives layer_types."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = []
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTOSSConfig:
        """The config of a saved dict; ValueError for a field it does not know."""
        values = {k: v for k, v in values.items() if k not in FORMER_RUNTIME_FIELDS}
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)


# Runtime switches that checkpoints written by ossgpt 0.1 carry in their config.json; they are RuntimeOptions now
# (ossgpt.options), so loading such a checkpoint skips them.
FORMER_RUNTIME_FIELDS = ("attn_implementation", "moe_implementation", "gradient_checkpointing", "loss_chunk_size")


# --- the prototype's names --------------------------------------------------------------------------------
# ossgpt grew out of a prototype: one model file, `main.py`, `prep_corpus.py` and a README snippet
# (`GPTOSSConfigMini()`, `GPTOSSForCausalLM(num_layers=..., num_experts=...)`). Its scripts and names keep working:
# these aliases read and write the real fields.
PROTOTYPE_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_experts": "num_local_experts",
    "num_experts_per_token": "num_experts_per_tok",
    "max_seq_len": "max_position_embeddings",
    "max_position": "max_position_embeddings",
    "expert_intermediate_size": "intermediate_size",
}


def _alias_property(target: str) -> property:
    return property(lambda self: getattr(self, target), lambda self, value: setattr(self, target, value))


for _alias, _target in PROTOTYPE_NAMES.items():
    setattr(GPTOSSConfig, _alias, _alias_property(_target))


def GPTOSSConfigMini(**overrides) -> GPTOSSConfig:  # noqa: N802 - the prototype's public name
    """The prototype's config class: the `mini` preset, with any field overridden by its own or its prototype name.

    The prototype passed vocab_size=100256 (cl100k's BPE ranks only), which cannot hold <|endoftext|> (100,257):
    such a vocabulary is padded to the next multiple of 128 that can.
    """
    config = GPTOSSConfig.from_preset("mini")
    values = {PROTOTYPE_NAMES.get(k, k): v for k, v in overrides.items()}
    if "eos_token_id" not in values and values.get("vocab_size", config.vocab_size) <= config.eos_token_id:
        values["vocab_size"] = round_up(config.eos_token_id + 1, 128)
    return config.replace(**values)
