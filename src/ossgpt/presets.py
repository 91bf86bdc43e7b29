"""Presets: one table per preset, holding a model, its tokenizer and its training recipe together.

    model   GPTOSSConfig fields: the shape, and the tokenizer with its vocabulary size and end token
    train   TrainConfig fields that differ from its defaults (which suit `mini` and larger models on GPUs)

so that the command line's defaults are the recipe: `ossgpt prepare TEXT --out D` tokenizes with the default
preset's tokenizer, and `ossgpt train --data D` trains the default preset's model with its recipe.

    tiny          a CPU-trainable model for demos and tests: minutes on two cores
    mini          the prototype's 73.4M-parameter model (see `GPTOSSConfigMini` in ossgpt.config)
    gpt-oss-20b   OpenAI's published 20.9B shape
    gpt-oss-120b  OpenAI's published 116.8B shape

`GPTOSSConfig.from_preset(name)` builds a preset's model config, `TrainConfig.for_preset(name, ...)` its run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PRESET = "tiny"  # of `ossgpt prepare` and `ossgpt train`


@dataclass(frozen=True)
class Preset:
    summary: str
    model: dict  # GPTOSSConfig fields
    train: dict = field(default_factory=dict)  # TrainConfig fields that differ from its defaults


# fmt: off
# Each model table lists, a line each: the vocabulary; the transformer's shape; the experts; the context and
# attention window; the rotary embedding.
_GPT_OSS_20B = dict(
    tokenizer="o200k_harmony", vocab_size=201_088, eos_token_id=200_002, pad_token_id=199_999,  # eos: <|return|>
    hidden_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
    tie_word_embeddings=False,
    num_local_experts=32, num_experts_per_tok=4, intermediate_size=2880,
    max_position_embeddings=131_072, sliding_window=128,
    rope_theta=150_000.0, rope_type="yarn", rope_factor=32.0, rope_original_max_position_embeddings=4096,
    rope_beta_fast=32.0, rope_beta_slow=1.0, rope_truncate=False,
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        summary="9.3M parameters, compact 8,192-token cl100k vocabulary: minutes on 2 CPU cores",
        # The 100k-row cl100k LM head would dominate the cost of a model this small, so `tiny` uses a compact
        # vocabulary: the 8,192 most frequent cl100k tokens of the training text plus byte fallback (lossless; see
        # ossgpt.tokenizer.CompactTokenizer). Its ids: 0-255 bytes, 256 <|endoftext|>, then the kept tokens, then
        # Harmony's 7 chat tokens, so at most 257 + 8,192 + 7 = 8,456 ids, padded to 8,512 rows (a multiple of 64).
        model=dict(
            tokenizer="cl100k_base:8192", vocab_size=8_512, eos_token_id=256,
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_local_experts=4, num_experts_per_tok=2, intermediate_size=512,
            max_position_embeddings=1024, sliding_window=128,
            rope_theta=10_000.0, rope_type="default", rope_factor=1.0, rope_original_max_position_embeddings=1024,
        ),
        # Chosen by the runs in docs/recipe.md: 400 steps of 16 x 256 tokens, Muon for the hidden matrices. With
        # --max-minutes the run and its learning-rate decay end with the budget if that comes first.
        train=dict(
            max_steps=400, batch_size=16, seq_len=256,
            optimizer="muon", learning_rate=6e-3, warmup_steps=20,
            weight_decay=0.3,  # more than the 0.1 default: an 8-minute run sees its data ~1.7 times
            eval_every=100, eval_batches=8, save_every=100,
        ),
    ),
    # The prototype's model. Its vocabulary is cl100k_base's 100,256 BPE ranks, but the special tokens go up to id
    # 100,276 (<|endoftext|> is 100,257), so the embedding is padded to 100,352 = 784 * 128.
    # Parameters: 73,452,080. The prototype reported 73,369,088; the 82,992 difference is the 96 padding rows
    # (96 * 512 = 49,152) plus 33,840 per-layer terms its count left out (its MLP experts had no biases:
    # 4 layers * 4 experts * (1536 + 512) = 32,768 of them).
    "mini": Preset(
        summary="73.4M parameters, cl100k_base vocabulary: the prototype's model, for a GPU",
        model=dict(
            tokenizer="cl100k_base", vocab_size=100_352, eos_token_id=100_257,
            hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
            tie_word_embeddings=True,
            num_local_experts=4, num_experts_per_tok=2, intermediate_size=768,
            max_position_embeddings=2048,
            rope_theta=1_000_000.0, rope_type="yarn", rope_factor=32.0, rope_original_max_position_embeddings=4096,
        ),
    ),
    # OpenAI's published shapes (openai/gpt-oss-20b, openai/gpt-oss-120b config.json).
    "gpt-oss-20b": Preset(summary="OpenAI's gpt-oss-20b shape (20.9B parameters, 3.6B active)", model=_GPT_OSS_20B),
    "gpt-oss-120b": Preset(
        summary="OpenAI's gpt-oss-120b shape (116.8B parameters, 5.1B active)",
        model={**_GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128},
    ),
}
# fmt: on


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError naming the choices for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
