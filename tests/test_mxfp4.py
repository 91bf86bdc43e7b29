"""MXFP4 experts: the format against transformers' own dequantizer, and the published HF MXFP4 layout end to end.

The checkpoints here are written by this file's own packer (from the format description, checked against HF's
dequantization), in gpt-oss-20b's exact published layout shrunk in width and depth: same config.json keys,
tensor names, dtypes (bf16, uint8 blocks/scales) and sharding with an index.
"""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ossgpt import GPTOSSForCausalLM
from ossgpt.checkpoint.hf_config import config_from_hf
from ossgpt.errors import UserError
from ossgpt.options import RuntimeOptions
from ossgpt.quant.mxfp4 import MXFP4Experts

transformers = pytest.importorskip("transformers", reason="transformers (the reference dequantizer) is not installed")
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

# The FP4 E2M1 code table of the OCP MX spec: code -> value; bit 3 is the sign.
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


# ------------------------------------------------------------------------------------------------ test-side packer
def pack_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows w [..., K] to MXFP4 -> blocks [..., K/32, 16], scales [..., K/32] (uint8).

    Per block of 32: the smallest power-of-two scale 2^e with max|x| / 2^e <= 6 (the largest FP4 value), then each
    value rounded to the nearest FP4 value. Two codes per byte, low nibble first; the scale stored as e + 127.
    Lossless for values that are FP4 values times a power of two shared by their block.
    """
    groups = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = groups.abs().amax(-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-127, 127)
    scaled = groups / torch.exp2(e)[..., None]
    codes = (scaled[..., None] - FP4).abs().argmin(-1)  # [..., G, 32] nearest code (ties: the smaller code)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (e + 127).to(torch.uint8)


def representable(shape, generator) -> torch.Tensor:
    """Random values [..., K] exactly representable in MXFP4: FP4 values times a random power of two per block."""
    codes = torch.randint(0, 16, shape, generator=generator)
    exponents = torch.randint(-9, -4, (*shape[:-1], shape[-1] // 32, 1), generator=generator)
    return (FP4[codes].reshape(*shape[:-1], -1, 32) * torch.exp2(exponents.float())).reshape(shape)


def hf_dequantize_rows(blocks, scales) -> torch.Tensor:
    """HF's dequantization, back in the stored row layout: [E, out, G, 16] -> [E, out, G*32]."""
    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)


# --------------------------------------------------------------------------------------------------- the format
def test_hand_worked_bytes():
    """Byte 0x21 holds code 1 (0.5) in its low nibble, then code 2 (1.0); 0x9F holds code 15 (-6) then 9 (-0.5)."""
    from ossgpt.kernels.mxfp4 import dequantize

    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0], blocks[0, 1] = 0x21, 0x9F
    values = dequantize(blocks, torch.tensor([128], dtype=torch.uint8))  # scale 2^(128 - 127) = 2
    assert values[:4].tolist() == [1.0, 2.0, -12.0, -1.0] and not values[4:].any()
    assert dequantize(blocks, torch.tensor([127 - 3], dtype=torch.uint8))[:2].tolist() == [0.0625, 0.125]


@settings(max_examples=30, deadline=None)
@given(experts=st.integers(1, 3), rows=st.integers(1, 5), groups=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_dequantize_matches_transformers(experts, rows, groups, seed):
    from ossgpt.kernels.mxfp4 import dequantize, dequantize_experts

    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (experts, rows, groups), dtype=torch.uint8, generator=g)
    reference = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    assert torch.equal(dequantize_experts(blocks, scales), reference)
    assert torch.equal(dequantize(blocks, scales), reference.transpose(1, 2))
    assert torch.equal(dequantize_experts(blocks, scales, torch.bfloat16), reference.bfloat16())  # exact in bf16


def test_packer_is_lossless_on_representable_values_and_rounds_to_nearest_otherwise():
    g = torch.Generator().manual_seed(0)
    w = representable((3, 8, 96), g)
    assert torch.equal(hf_dequantize_rows(*pack_mxfp4(w)), w)

    w = torch.randn(3, 8, 96, generator=g)
    blocks, scales = pack_mxfp4(w)
    error = (hf_dequantize_rows(blocks, scales) - w).abs()
    half_largest_gap = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)  # (6 - 4) / 2 = 1 * scale
    assert (error <= half_largest_gap).all() and error.max() > 0


# ------------------------------------------------------------------------------------- the published HF layout
def published_config(**changes) -> dict:
    """openai/gpt-oss-20b's config.json, shrunk: width, depth, experts, heads, vocabulary, window."""
    config = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 2,
        "experts_per_token": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_types": ["sliding_attention", "full_attention"],
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "num_local_experts": 4,
        "output_router_logits": False,
        "pad_token_id": 1,
        "quantization_config": {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 8,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": 512,
    }
    return {**config, **changes}


def reference_model(config: dict, lossless: bool = True, seed: int = 0) -> GPTOSSForCausalLM:
    """Our dense float32 model with random bf16-representable weights (the published dtype). lossless: experts
    representable in MXFP4 too, so that writing the published layout loses nothing."""
    g = torch.Generator().manual_seed(seed)
    model = GPTOSSForCausalLM(config_from_hf(config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")):
                rows = p.transpose(1, 2)  # stored as [E, out, in]
                values = representable(rows.shape, g) if lossless else 0.05 * torch.randn(rows.shape, generator=g)
                p.copy_(values.transpose(1, 2))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_((0.5 if "sinks" in name else 0.05) * torch.randn(p.shape, generator=g))
            p.copy_(p.bfloat16().float())
    return model


def write_published_mxfp4(model: GPTOSSForCausalLM, directory, config: dict) -> None:
    """The published HF MXFP4 layout: bf16 tensors, packed experts, zero-based shards with an index."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in model.state_dict().items():
        hf_name = name if name.startswith("lm_head") else "model." + name
        if name.endswith(("gate_up_proj", "down_proj")):
            blocks, scales = pack_mxfp4(p.transpose(1, 2))  # rows = output channels
            tensors[hf_name + "_blocks"], tensors[hf_name + "_scales"] = blocks, scales
        else:
            tensors[hf_name] = p.detach().bfloat16()
    names = list(tensors)
    shards = {"model-00000-of-00001.safetensors": names[: len(names) // 2],
              "model-00001-of-00001.safetensors": names[len(names) // 2 :]}  # fmt: skip
    for filename, members in shards.items():
        save_file({n: tensors[n].contiguous() for n in members}, str(directory / filename), metadata={"format": "pt"})
    weight_map = {n: f for f, members in shards.items() for n in members}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(reference model, directory in the published MXFP4 layout holding exactly its weights)."""
    config = published_config()
    model = reference_model(config)
    directory = tmp_path_factory.mktemp("gpt-oss-mini")
    write_published_mxfp4(model, directory, config)
    return model, directory


IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))  # longer than the window of 8


def test_published_layout_loads_exactly(published):
    reference, directory = published
    loaded = GPTOSSForCausalLM.from_pretrained(directory)
    assert loaded.config.rope_type == "yarn" and loaded.config.rope_truncate is False
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, reference(IDS).logits)


def test_bf16_loading(published):
    reference, directory = published
    loaded = GPTOSSForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.layers[1].mlp.experts.down_proj, reference.layers[1].mlp.experts.down_proj.bfloat16())


def test_keep_mxfp4_stays_packed_and_dequantizes_only_routed_experts(published, monkeypatch):
    """The reference way to run packed experts (experts="loop"): each routed expert dequantized per call.
    (The native products that "sorted" runs are checked in tests/test_native_kernels.py.)"""
    reference, directory = published
    packed = GPTOSSForCausalLM.from_pretrained(directory, keep_mxfp4=True, options=RuntimeOptions(experts="loop"))
    experts = packed.layers[0].mlp.experts
    assert isinstance(experts, MXFP4Experts) and not hasattr(experts, "gate_up_proj")
    c = packed.config
    weights = c.num_local_experts * 3 * c.hidden_size * c.intermediate_size
    packed_bytes = sum(b.numel() for name, b in experts.named_buffers() if name.endswith(("_blocks", "_scales")))
    assert packed_bytes * 8 / weights == 4.25  # bits per expert weight
    with torch.no_grad():
        assert torch.allclose(packed(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)

    import ossgpt.quant.mxfp4 as quant_experts

    calls = []
    real = quant_experts.dequantize
    monkeypatch.setattr(quant_experts, "dequantize", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        packed(IDS[:1, :1])  # one token: k = 2 of the 4 experts, in each of the 2 layers, 2 projections each
    assert len(calls) == c.num_experts_per_tok * c.num_hidden_layers * 2


def test_transformers_loads_the_published_layout(published):
    """HF's own loader (dequantizing on CPU) reads the test checkpoint to the same weights and logits."""
    reference, directory = published
    hf = transformers.GptOssForCausalLM.from_pretrained(
        directory, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    hf_state = hf.state_dict()
    for name, tensor in reference.state_dict().items():
        hf_name = name if name.startswith("lm_head") else "model." + name
        assert torch.equal(hf_state[hf_name].float(), tensor), name
    with torch.no_grad():
        expected = hf(IDS).logits
        assert ((reference(IDS).logits - expected).abs().max() / expected.abs().max()) < 1e-4


def test_packed_model_saves_the_published_layout(published, tmp_path):
    _, directory = published
    packed = GPTOSSForCausalLM.from_pretrained(directory, keep_mxfp4=True, dtype=torch.bfloat16)
    packed.save_pretrained(tmp_path / "again", format="hf")
    original = {**load_file(directory / "model-00000-of-00001.safetensors"),
                **load_file(directory / "model-00001-of-00001.safetensors")}  # fmt: skip
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == original.keys()
    assert all(torch.equal(again[n], original[n]) for n in original)
    assert (
        json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    )
    with pytest.raises(ValueError, match="format='hf'"):
        packed.save_pretrained(tmp_path / "ours", format="ossgpt")


def test_lossy_quantization_error_is_bounded(tmp_path):
    """Experts that are not FP4 values get rounded. Bound: each expert projection carries a relative error delta,
    the two of an expert add in quadrature (independent rounding), and the two layers' expert outputs add: the
    logits move by at most ~2 * sqrt(2) * delta relative to their spread."""
    config = published_config()
    reference = reference_model(config, lossless=False)
    write_published_mxfp4(reference, tmp_path, config)
    loaded = GPTOSSForCausalLM.from_pretrained(tmp_path)
    weight_error = max(
        ((q - w).norm() / w.norm()).item()
        for layer_q, layer_w in zip(loaded.layers, reference.layers)
        for q, w in ((layer_q.mlp.experts.gate_up_proj, layer_w.mlp.experts.gate_up_proj),
                     (layer_q.mlp.experts.down_proj, layer_w.mlp.experts.down_proj))
    )  # fmt: skip
    with torch.no_grad():
        expected, got = reference(IDS).logits, loaded(IDS).logits
    logit_error = ((got - expected).norm() / (expected - expected.mean(-1, keepdim=True)).norm()).item()
    assert 0 < weight_error < 0.2  # FP4 with one mantissa bit: ~10% relative rounding error
    assert 0 < logit_error < 2 * math.sqrt(2) * weight_error


# ------------------------------------------------------------------------------------------------- error paths
def test_truncated_and_mismatched_packed_tensors(published, tmp_path):
    _, directory = published
    config = json.loads((directory / "config.json").read_text())
    tensors = {**load_file(directory / "model-00000-of-00001.safetensors"),
               **load_file(directory / "model-00001-of-00001.safetensors")}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))

    name = "model.layers.1.mlp.experts.down_proj_scales"
    save_file({n: t for n, t in tensors.items() if n != name}, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        UserError, match=r"model.safetensors: MXFP4 tensor 'model.layers.1.mlp.experts.down_proj_blocks"
    ):
        GPTOSSForCausalLM.from_pretrained(tmp_path)

    save_file({**tensors, name: tensors[name][:, :, :1].contiguous()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"'model.layers.1.mlp.experts.down_proj_blocks' and '.*down_proj_scales'"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)

    blocks = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    wider = torch.cat([tensors[blocks]] * 2, dim=2)
    scales = torch.cat([tensors[blocks.replace("blocks", "scales")]] * 2, dim=2)
    save_file(
        {**tensors, blocks: wider, blocks.replace("blocks", "scales"): scales}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(UserError, match=rf"tensor '{blocks}' has shape"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)

    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(UserError, match="'gptq' is not supported"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)


def test_keep_mxfp4_needs_packed_experts(tmp_path):
    reference_model(published_config()).save_pretrained(tmp_path, format="hf")
    with pytest.raises(UserError, match="keep_mxfp4=True needs a checkpoint with MXFP4 experts"):
        GPTOSSForCausalLM.from_pretrained(tmp_path, keep_mxfp4=True)
    with pytest.raises(ValueError, match="divisible by 32"):
        MXFP4Experts(config_from_hf(published_config(intermediate_size=40)))
