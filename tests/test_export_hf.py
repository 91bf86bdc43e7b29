"""Export: ossgpt -> Hugging Face files -> transformers, HF -> ossgpt, sharding, and the `ossgpt convert` command."""

import json

import pytest
import torch

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM
from ossgpt.cli import main
from test_mxfp4 import published_config, reference_model, write_published_mxfp4
from test_original_format import write_original

transformers = pytest.importorskip("transformers", reason="transformers (the export oracle) is not installed")

IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))


def random_model(tied: bool = False, seed: int = 0) -> GPTOSSForCausalLM:
    torch.manual_seed(seed)
    config = GPTOSSConfig(vocab_size=512, eos_token_id=2, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                          intermediate_size=32, max_position_embeddings=256, sliding_window=8,
                          tie_word_embeddings=tied)  # fmt: skip
    model = GPTOSSForCausalLM(config).eval()
    with torch.no_grad():  # zero-initialised biases and sinks would hide mapping mistakes
        for name, p in model.named_parameters():
            if name.endswith("bias") or "sinks" in name:
                p.normal_(0, 0.5 if "sinks" in name else 0.02)
    return model


def load_hf(directory, **kwargs):
    return transformers.GptOssForCausalLM.from_pretrained(directory, **kwargs).eval()


def assert_same_weights(ours: GPTOSSForCausalLM, hf) -> None:
    hf_state = hf.state_dict()
    for name, tensor in ours.state_dict().items():
        hf_name = name if name.startswith("lm_head") else "model." + name
        assert torch.equal(hf_state[hf_name], tensor), name


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_our_export(tmp_path, tied):
    ours = random_model(tied)
    ours.save_pretrained(tmp_path, format="hf")
    hf = load_hf(tmp_path, attn_implementation="eager")
    assert_same_weights(ours, hf)
    with torch.no_grad():
        assert relative_error(ours(IDS).logits, hf(IDS).logits) < 1e-5
    prompt = IDS[:1, :5]
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=15, do_sample=False,
                           pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert torch.equal(ours.generate(prompt, max_new_tokens=15), expected)


def test_hf_save_loads_into_ours_identically(tmp_path):
    hf = transformers.GptOssForCausalLM(
        transformers.GptOssConfig(**{k: v for k, v in published_config().items() if k != "quantization_config"})
    ).eval()
    hf.save_pretrained(tmp_path)
    ours = GPTOSSForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(ours, hf)
    with torch.no_grad():
        assert relative_error(ours(IDS).logits, hf(IDS).logits) < 1e-5


def test_sharded_export(tmp_path):
    ours = random_model()
    ours.save_pretrained(tmp_path, format="hf", max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    for loaded in (GPTOSSForCausalLM.from_pretrained(tmp_path), load_hf(tmp_path)):
        with torch.no_grad():
            assert torch.allclose(loaded(IDS).logits, ours(IDS).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_shard_size"):
        ours.save_pretrained(tmp_path / "bad", max_shard_size="lots")


def test_bf16_export(tmp_path):
    ours = random_model().to(torch.bfloat16)
    ours.save_pretrained(tmp_path, format="hf")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    hf = load_hf(tmp_path)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert_same_weights(ours, hf)


# ---------------------------------------------------------------------------------------------- ossgpt convert
@pytest.mark.parametrize("layout", ["mxfp4", "original"])
def test_convert_published_layouts_to_hf(tmp_path, layout, capsys):
    reference = reference_model(published_config())
    source = tmp_path / "source"
    if layout == "mxfp4":
        write_published_mxfp4(reference, source, published_config())
    else:
        write_original(reference, source)
    assert main(["convert", "--from", str(source), "--to", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "converted" in capsys.readouterr().out
    hf = load_hf(tmp_path / "hf")
    assert_same_weights(reference, hf)  # dequantized exactly
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())

    argv = ["convert", "--from", str(tmp_path / "hf"), "--to", str(tmp_path / "ours"), "--format", "ossgpt",
            "--dtype", "bfloat16", "--max-shard-size", "100KB"]  # fmt: skip
    assert main(argv) == 0
    ours = GPTOSSForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    assert torch.equal(ours.layers[0].mlp.experts.gate_up_proj, reference.layers[0].mlp.experts.gate_up_proj.bfloat16())


def test_convert_errors_are_one_line(tmp_path, capsys):
    target = tmp_path / "out"
    assert main(["convert", "--from", str(tmp_path / "missing"), "--to", str(target), "--format", "hf"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: checkpoint {tmp_path / 'missing'} does not exist; pass a model directory or a training run directory"
    )
    random_model().save_pretrained(tmp_path / "ckpt")
    target.mkdir()
    assert main(["convert", "--from", str(tmp_path / "ckpt"), "--to", str(target), "--format", "hf"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    argv = ["convert", "--from", str(tmp_path / "ckpt"), "--to", str(target), "--format", "hf", "--force",
            "--max-shard-size", "0"]  # fmt: skip
    assert main(argv) == 2
    assert "max_shard_size must be a positive" in capsys.readouterr().err
    assert main(argv[:-2]) == 0
