"""Config presets, validation, the split from runtime options, and the prototype's names."""

import pytest
import torch

from ossgpt import GPTOSSConfig, GPTOSSConfigMini, GPTOSSForCausalLM, RuntimeOptions
from ossgpt.config import FORMER_RUNTIME_FIELDS
from ossgpt.presets import PRESETS
from ossgpt.tokenizer import HARMONY_CHAT_TOKENS, ByteTokenizer
from ossgpt.training import TrainConfig


def count_parameters(config):
    with torch.device("meta"):
        return GPTOSSForCausalLM(config).num_parameters()


def test_mini_matches_the_prototype_shape():
    config = GPTOSSConfigMini()
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        4,
        512,
        8,
        4,
    )
    assert (config.num_experts, config.num_experts_per_token, config.intermediate_size) == (4, 2, 768)
    assert config.vocab_size == 100_352 and config.vocab_size % 128 == 0 and config.eos_token_id == 100_257
    assert config.max_position_embeddings == 2048 and config.rope_type == "yarn" and config.tie_word_embeddings
    # 73,452,080 = the prototype's 73,369,088 + 96 padding rows * 512 + 32,768 expert biases + 1,072 (see presets.py).
    assert count_parameters(config) == 73_452_080


@pytest.mark.parametrize("name,billions", [("gpt-oss-20b", 20.9), ("gpt-oss-120b", 116.8)])
def test_published_shapes(name, billions):
    config = GPTOSSConfig.from_preset(name)
    assert config.layer_types[:4] == ["sliding_attention", "full_attention"] * 2
    assert config.sliding_window == 128 and config.vocab_size == 201_088 and not config.tie_word_embeddings
    assert (config.rope_factor, config.rope_beta_fast, config.rope_beta_slow, config.rope_truncate) == (
        32,
        32,
        1,
        False,
    )
    assert round(count_parameters(config) / 1e9, 1) == billions


def test_tiny_is_small():
    assert count_parameters(GPTOSSConfig.from_preset("tiny")) < 10_000_000


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(intermediate_size=-3), "intermediate_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(head_dim=7), "head_dim"),
        (dict(layer_types=["full_attention"]), "layer_types"),
        (dict(layer_types=["global"] * 4), "layer_types"),
        (dict(rope_type="ntk"), "rope_type"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
        (dict(vocab_size=100_000), "eos_token_id"),
    ],
)
def test_impossible_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        GPTOSSConfig.from_preset("mini", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        GPTOSSConfig.from_preset("huge")


def test_prototype_keyword_constructor():
    model = GPTOSSForCausalLM(vocab_size=1000, hidden_size=64, num_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=96, num_experts=4, num_experts_per_token=2,
                              eos_token_id=999)  # fmt: skip
    assert len(model.layers) == 2 and model.config.num_experts == 4 and model.config.layer_types == [
        "sliding_attention", "full_attention"]  # fmt: skip
    # The prototype's vocab_size=100256 cannot hold <|endoftext|> (100257): padded to the next multiple of 128.
    with torch.device("meta"):
        assert GPTOSSForCausalLM(vocab_size=100_256, num_layers=1).config.vocab_size == 100_352


def test_dict_round_trip_and_unknown_fields():
    config = GPTOSSConfig.from_preset("gpt-oss-20b")
    assert GPTOSSConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus"):
        GPTOSSConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_former_runtime_fields_are_options_now():
    """A config.json written before the split (runtime switches inside) still loads; the switches are options."""
    config = GPTOSSConfig.from_preset("tiny")
    assert not set(FORMER_RUNTIME_FIELDS) & set(config.to_dict())
    old = {**config.to_dict(), "attn_implementation": "eager", "moe_implementation": "loop",
           "gradient_checkpointing": True, "loss_chunk_size": 0}  # fmt: skip
    assert GPTOSSConfig.from_dict(old) == config
    for bad in (dict(attention="flash"), dict(experts="grouped"), dict(gradient_checkpointing="yes")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RuntimeOptions(**bad)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_one_valid_table(name):
    """Model, tokenizer and training recipe together: a valid model config, a valid run of the recipe."""
    preset = PRESETS[name]
    config = GPTOSSConfig.from_preset(name)
    assert config.tokenizer == preset.model["tokenizer"]
    run = TrainConfig.for_preset(name, data="d", out="o")
    assert all(getattr(run, key) == value for key, value in preset.train.items())


def test_tiny_vocabulary_holds_its_compact_tokenizer():
    """tiny's vocabulary needs no fitting to the data: a compact cl100k_base:8192 tokenizer has bytes, then
    <|endoftext|>, then at most 8,192 kept tokens, then Harmony's 7 chat tokens."""
    config = GPTOSSConfig.from_preset("tiny")
    base, size = config.tokenizer.split(":")
    assert (base, int(size)) == ("cl100k_base", 8192)
    assert ByteTokenizer().vocab_size + 8192 + len(HARMONY_CHAT_TOKENS) <= config.vocab_size
    assert config.vocab_size % 64 == 0
    assert config.eos_token_id == ByteTokenizer().eot_token_id
