"""save_pretrained / from_pretrained round trips and every way a checkpoint directory can be wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.errors import UserError


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = GPTOSSConfig(vocab_size=64, eos_token_id=0, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                          intermediate_size=12, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    return GPTOSSForCausalLM(config).eval()


@pytest.mark.parametrize("fmt", ["ossgpt", "hf"])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip(model, tmp_path, fmt, tied):
    model = GPTOSSForCausalLM(model.config.replace(tie_word_embeddings=tied)).eval()
    model.save_pretrained(tmp_path / "ckpt", format=fmt)
    loaded = GPTOSSForCausalLM.from_pretrained(tmp_path / "ckpt")
    if fmt == "ossgpt":
        assert loaded.config == model.config
    else:  # HF configs carry the architecture and the tokenizer spec, not ossgpt's training-only coefficients
        hf_fields = (
            "tokenizer",
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "layer_types",
            "sliding_window",
            "rope_type",
            "rope_theta",
            "num_local_experts",
            "num_experts_per_tok",
            "tie_word_embeddings",
            "eos_token_id",
        )
        assert {f: getattr(loaded.config, f) for f in hf_fields} == {f: getattr(model.config, f) for f in hf_fields}
    ids = torch.randint(0, 64, (2, 20))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    assert not list(tmp_path.glob(".*tmp*")), "temporary directory left behind"


def test_dtype_argument(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = GPTOSSForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    loaded(torch.randint(0, 64, (1, 5)))


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        GPTOSSForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)


def test_foreign_model_type(model, tmp_path):
    model.save_pretrained(tmp_path, format="hf")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(UserError, match="llama"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)


def test_corrupt_json_and_weights(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated download
    with pytest.raises(UserError, match="model.safetensors"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)


def test_missing_extra_and_misshapen_tensors(model, tmp_path):
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    save_file({k: v for k, v in state.items() if k != "layers.1.self_attn.sinks"}, path)
    with pytest.raises(UserError, match="missing tensor.*layers.1.self_attn.sinks"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)
    save_file({**state, "layers.9.extra": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="unexpected tensor 'layers.9.extra'"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)
    save_file({**state, "norm.weight": torch.zeros(17)}, path)
    with pytest.raises(UserError, match=r"'norm.weight' has shape \(17,\)"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)


def test_impossible_hf_config(model, tmp_path):
    model.save_pretrained(tmp_path, format="hf")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(UserError, match="num_attention_heads"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)


def test_overwrite_is_atomic(model, tmp_path, monkeypatch):
    """A save that fails midway leaves the previous checkpoint intact and no temporary files."""
    model.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    import ossgpt.checkpoint.pretrained as pretrained

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pretrained, "save_file", failing_save)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
