"""Numerical parity with Hugging Face transformers' GptOssForCausalLM, the reference implementation.

For each random small config: build HF's model with random weights, `save_pretrained` it, load the directory
with ossgpt's `from_pretrained`, and compare logits (eager attention, float32) and greedy generations.
"""

import json

import pytest
import torch

from ossgpt import GPTOSSForCausalLM

transformers = pytest.importorskip("transformers", reason="transformers (the parity oracle) is not installed")

# Each case: (HF config overrides, sequence length). Together they cover sliding and full layers, GQA ratios
# 1-8, 2-8 experts with top-1..4, YaRN factors 1-32 (truncated or not), plain RoPE, tied and untied
# embeddings, and sequences longer than the sliding window.
CASES = {
    "gqa2-e4k2-yarn32": (dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                              rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                                   beta_slow=1.0, truncate=False, original_max_position_embeddings=64)),
                         40),
    "mha-e2k1-yarn1-tied": (dict(num_attention_heads=4, num_key_value_heads=4, num_local_experts=2,
                                 num_experts_per_tok=1, tie_word_embeddings=True,
                                 rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=1.0,
                                                      original_max_position_embeddings=256)),
                            33),
    "gqa8-e8k4-yarn4-truncate": (dict(num_attention_heads=8, num_key_value_heads=1, num_local_experts=8,
                                      num_experts_per_tok=4,
                                      rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                                           beta_fast=16.0, beta_slow=2.0, truncate=True,
                                                           original_max_position_embeddings=32)),
                                 50),
    "gqa4-e3k3-default-rope-allfull": (dict(num_attention_heads=8, num_key_value_heads=2, num_local_experts=3,
                                            num_experts_per_tok=3, layer_types=["full_attention"] * 3,
                                            num_hidden_layers=3, rope_parameters=dict(rope_type="default",
                                                                                      rope_theta=10000.0)),
                                       24),
    "sliding-only-window5": (dict(num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                  num_experts_per_tok=2, sliding_window=5, num_hidden_layers=2,
                                  layer_types=["sliding_attention"] * 2,
                                  rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0,
                                                       original_max_position_embeddings=128)),
                             30),
}  # fmt: skip

BASE = dict(vocab_size=211, hidden_size=48, intermediate_size=40, head_dim=16, num_hidden_layers=4,
            sliding_window=8, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip


def build_hf(overrides, seed=0):
    torch.manual_seed(seed)
    config = transformers.GptOssConfig(**{**BASE, **overrides})
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-initialises biases; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "sinks" in name:
                p.normal_(0, 0.5 if "sinks" in name else 0.02)
    return model


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(params=list(CASES), scope="module")
def pair(request, tmp_path_factory):
    overrides, seq_len = CASES[request.param]
    hf = build_hf(overrides)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    ours = GPTOSSForCausalLM.from_pretrained(directory)
    return hf, ours, seq_len


def test_logits_match(pair):
    hf, ours, seq_len = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        for impl in ("eager", "sdpa"):
            for moe in ("loop", "sorted"):
                set_implementations(ours, impl, moe)
                assert relative_error(ours(ids).logits, expected) < 1e-4, (impl, moe)


def test_loss_matches(pair):
    hf, ours, seq_len = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        assert torch.allclose(ours(ids, labels=labels).lm_loss, hf(ids, labels=labels).loss, rtol=1e-5)


def test_greedy_generation_matches(pair):
    hf, ours, seq_len = pair
    prompt = torch.randint(0, BASE["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(3))
    new = seq_len  # long enough to run past the sliding window from the cache
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                           pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert torch.equal(ours.generate(prompt, max_new_tokens=new), expected)


def set_implementations(model, attn, moe):
    for layer in model.layers:
        layer.self_attn.implementation = attn
        layer.mlp.experts.implementation = moe


def test_transformers4_config_layout(tmp_path):
    """transformers 4 wrote rope_theta + rope_scaling; a missing `truncate` there means true."""
    overrides, seq_len = CASES["gqa2-e4k2-yarn32"]
    hf = build_hf(overrides)
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    rope.pop("truncate")
    raw["rope_scaling"] = rope
    raw["num_experts"] = raw.pop("num_local_experts")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = GPTOSSForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_truncate is True and ours.config.num_local_experts == 4

    hf.config.rope_parameters["truncate"] = True  # what transformers does with such a file
    hf_truncated = transformers.GptOssForCausalLM(hf.config).eval()
    hf_truncated.load_state_dict(hf.state_dict())
    ids = torch.randint(0, BASE["vocab_size"], (1, seq_len))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, hf_truncated(ids).logits) < 1e-4


def test_sharded_checkpoint(tmp_path):
    hf = build_hf(CASES["gqa2-e4k2-yarn32"][0])
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = GPTOSSForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (1, 20))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, hf(ids).logits) < 1e-4
