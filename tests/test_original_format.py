"""OpenAI's original checkpoint layout (`original/`): written here by an independent writer, read by from_pretrained.

Two oracles: our dense model whose weights the writer converted (exact, when every weight is representable in the
stored dtypes), and a transcription of the reference implementation's forward pass (gpt_oss/torch/model.py) that
runs straight on the original tensors, so the name mapping, the q | k | v split, the expert orientation, the
sliding-window layers and the YaRN settings are checked against the reference's own conventions.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ossgpt import GPTOSSForCausalLM, RuntimeOptions
from ossgpt.checkpoint.pretrained import detect_format
from ossgpt.errors import UserError
from ossgpt.quant.mxfp4 import MXFP4Experts
from test_mxfp4 import hf_dequantize_rows, pack_mxfp4, published_config, reference_model, write_published_mxfp4

IDS = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(1))  # longer than the window of 8


def original_config(model: GPTOSSForCausalLM) -> dict:
    """The reference's ModelConfig fields for our model (which uses the reference's conventions)."""
    c = model.config
    return dict(num_hidden_layers=c.num_hidden_layers, num_experts=c.num_local_experts,
                experts_per_token=c.num_experts_per_tok, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                intermediate_size=c.intermediate_size, swiglu_limit=c.swiglu_limit, head_dim=c.head_dim,
                num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                sliding_window=c.sliding_window, initial_context_length=c.rope_original_max_position_embeddings,
                rope_theta=c.rope_theta, rope_scaling_factor=c.rope_factor, rope_ntk_alpha=c.rope_beta_slow,
                rope_ntk_beta=c.rope_beta_fast)  # fmt: skip


def original_tensors(model: GPTOSSForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under the reference's names and dtypes: norms float32, experts MXFP4, everything else bf16."""
    s = {name: p.detach() for name, p in model.state_dict().items()}
    out = {"embedding.weight": s["embed_tokens.weight"].bfloat16(), "norm.scale": s["norm.weight"].float(),
           "unembedding.weight": s["lm_head.weight"].bfloat16()}  # fmt: skip
    for n in range(model.config.num_hidden_layers):
        ours, ref = f"layers.{n}.", f"block.{n}."
        for kind in ("weight", "bias"):
            qkv = [s[f"{ours}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{ref}attn.qkv.{kind}"] = torch.cat(qkv).bfloat16()
            out[f"{ref}attn.out.{kind}"] = s[f"{ours}self_attn.o_proj.{kind}"].bfloat16()
            out[f"{ref}mlp.gate.{kind}"] = s[f"{ours}mlp.router.{kind}"].bfloat16()
        out[f"{ref}attn.norm.scale"] = s[f"{ours}input_layernorm.weight"].float()
        out[f"{ref}attn.sinks"] = s[f"{ours}self_attn.sinks"].bfloat16()
        out[f"{ref}mlp.norm.scale"] = s[f"{ours}post_attention_layernorm.weight"].float()
        for mlp, proj in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            blocks, scales = pack_mxfp4(s[f"{ours}mlp.experts.{proj}"].transpose(1, 2))  # [E, out, in] rows
            out[f"{ref}mlp.{mlp}_weight.blocks"], out[f"{ref}mlp.{mlp}_weight.scales"] = blocks, scales
            out[f"{ref}mlp.{mlp}_bias"] = s[f"{ours}mlp.experts.{proj}_bias"].bfloat16()
    return out


def write_original(model: GPTOSSForCausalLM, root) -> dict[str, torch.Tensor]:
    """root/original/{config.json, model.safetensors}, as in the published repositories."""
    tensors = original_tensors(model)
    (root / "original").mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(root / "original" / "model.safetensors"))
    (root / "original" / "config.json").write_text(json.dumps(original_config(model), indent=2))
    return tensors


def reference_forward(tensors: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """gpt_oss/torch/model.py's Transformer.forward (one sequence, float32): ids [T] -> logits [T, vocab]."""
    w = lambda name: tensors[name].float()  # noqa: E731
    T, hd = len(ids), config["head_dim"]
    nh, nkv, k = config["num_attention_heads"], config["num_key_value_heads"], config["experts_per_token"]

    base, factor, icl = config["rope_theta"], config["rope_scaling_factor"], config["initial_context_length"]
    freq = base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    concentration = 0.1 * math.log(factor) + 1.0
    d_half = hd / 2
    low = d_half * math.log(icl / (config["rope_ntk_beta"] * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(icl / (config["rope_ntk_alpha"] * 2 * math.pi)) / math.log(base)
    mask = 1 - ((torch.arange(d_half) - low) / (high - low)).clamp(0, 1)
    inv_freq = 1.0 / (factor * freq) * (1 - mask) + 1.0 / freq * mask
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = (angles.cos() * concentration)[:, None], (angles.sin() * concentration)[:, None]

    def rotate(x):  # [T, heads, hd]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def rms_norm(x, scale):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * scale

    def swiglu(x, alpha=1.702, limit=config["swiglu_limit"]):
        x_glu, x_linear = x[..., ::2].clamp(max=limit), x[..., 1::2].clamp(-limit, limit)
        return x_glu * torch.sigmoid(alpha * x_glu) * (x_linear + 1)

    x = w("embedding.weight")[ids]
    for n in range(config["num_hidden_layers"]):
        p = f"block.{n}."
        qkv = F.linear(rms_norm(x, w(p + "attn.norm.scale")), w(p + "attn.qkv.weight"), w(p + "attn.qkv.bias"))
        q = rotate(qkv[:, : nh * hd].reshape(T, nh, hd)).view(T, nkv, nh // nkv, hd)
        key = rotate(qkv[:, nh * hd : (nh + nkv) * hd].reshape(T, nkv, hd))
        value = qkv[:, (nh + nkv) * hd :].reshape(T, nkv, hd)
        causal = torch.triu(torch.full((T, T), -math.inf), diagonal=1)
        if n % 2 == 0:  # sliding window on even layers
            causal += torch.tril(torch.full((T, T), -math.inf), diagonal=-config["sliding_window"])
        scores = torch.einsum("qhmd,khd->hmqk", q, key) / math.sqrt(hd) + causal
        sinks = w(p + "attn.sinks").reshape(nkv, nh // nkv, 1, 1).expand(-1, -1, T, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
        attn = torch.einsum("hmqk,khd->qhmd", probs, value).reshape(T, -1)
        x = x + F.linear(attn, w(p + "attn.out.weight"), w(p + "attn.out.bias"))

        t = rms_norm(x, w(p + "mlp.norm.scale"))
        top = torch.topk(F.linear(t, w(p + "mlp.gate.weight"), w(p + "mlp.gate.bias")), k=k, dim=-1, sorted=True)
        mlp1 = hf_dequantize_rows(tensors[p + "mlp.mlp1_weight.blocks"], tensors[p + "mlp.mlp1_weight.scales"])
        mlp2 = hf_dequantize_rows(tensors[p + "mlp.mlp2_weight.blocks"], tensors[p + "mlp.mlp2_weight.scales"])
        h = swiglu(torch.einsum("beck,bk->bec", mlp1[top.indices], t) + w(p + "mlp.mlp1_bias")[top.indices])
        h = torch.einsum("beck,bek->bec", mlp2[top.indices], h) + w(p + "mlp.mlp2_bias")[top.indices]
        x = x + torch.einsum("bec,be->bc", h, torch.softmax(top.values, dim=1))
    return F.linear(rms_norm(x, w("norm.scale")), w("unembedding.weight"))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(dense reference model, checkpoint root holding only original/, the original tensors)."""
    model = reference_model(published_config())
    root = tmp_path_factory.mktemp("gpt-oss-original")
    return model, root, write_original(model, root)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_loads_exactly_from_the_root_or_from_original(original):
    model, root, _ = original
    with torch.no_grad():
        expected = model(IDS[None]).logits
        for directory in (root, root / "original"):
            loaded = GPTOSSForCausalLM.from_pretrained(directory)
            for name, tensor in model.state_dict().items():
                assert torch.equal(loaded.state_dict()[name], tensor), name
            assert torch.equal(loaded(IDS[None]).logits, expected)


def test_the_cli_loader_takes_a_root_holding_only_original(original):
    """`ossgpt generate --checkpoint ROOT` on a download of original/ only: the CPU path (packed experts, int8)
    and the same greedy tokens as the HF layout of the same weights."""
    from ossgpt.inference.generate import generate
    from ossgpt.inference.loading import load_model

    model, root, _ = original
    packed = load_model(root)
    assert isinstance(packed.layers[0].mlp.experts, MXFP4Experts)
    hf = root.parent / (root.name + "-hf")
    write_published_mxfp4(model, hf, published_config())
    with torch.no_grad():
        assert torch.equal(generate(packed, IDS[None, :6], max_new_tokens=5),
                           generate(load_model(hf), IDS[None, :6], max_new_tokens=5))  # fmt: skip


def test_config_follows_the_reference(original):
    model, root, _ = original
    c = GPTOSSForCausalLM.from_pretrained(root).config
    assert c.layer_types == ["sliding_attention", "full_attention"]  # the reference: sliding on even layers
    assert (c.rope_type, c.rope_factor, c.rope_beta_fast, c.rope_beta_slow, c.rope_truncate) == (
        "yarn",
        32.0,
        32.0,
        1.0,
        False,
    )
    assert c.rope_original_max_position_embeddings == 4096 and c.max_position_embeddings == 4096 * 32
    assert c.tie_word_embeddings is False and c.tokenizer == "o200k_harmony"


def test_matches_the_reference_implementation(original):
    _, root, tensors = original
    config = json.loads((root / "original" / "config.json").read_text())
    expected = reference_forward(tensors, config, IDS)
    with torch.no_grad():
        for implementation in ("eager", "sdpa"):
            loaded = GPTOSSForCausalLM.from_pretrained(root, options=RuntimeOptions(attention=implementation))
            assert relative_error(loaded(IDS[None]).logits[0], expected) < 1e-5


def test_lossy_experts_match_the_reference_and_stay_near_the_unquantized_model(tmp_path):
    """Random experts are rounded by the writer: the loaded model still runs the reference's function on the stored
    tensors, and its logits stay within 2 * sqrt(2) * (relative expert rounding error) of the unquantized model
    (see test_mxfp4.test_lossy_quantization_error_is_bounded for the bound)."""
    model = reference_model(published_config(), lossless=False)
    tensors = write_original(model, tmp_path)
    loaded = GPTOSSForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        got, unquantized = loaded(IDS[None]).logits[0], model(IDS[None]).logits[0]
    assert relative_error(got, reference_forward(tensors, original_config(model), IDS)) < 1e-5
    weight_error = max(
        ((a.mlp.experts.down_proj - b.mlp.experts.down_proj).norm() / b.mlp.experts.down_proj.norm()).item()
        for a, b in zip(loaded.layers, model.layers)
    )
    logit_error = ((got - unquantized).norm() / (unquantized - unquantized.mean(-1, keepdim=True)).norm()).item()
    assert 0 < logit_error < 2 * math.sqrt(2) * weight_error


def test_keep_mxfp4_and_bf16(original):
    model, root, _ = original
    packed = GPTOSSForCausalLM.from_pretrained(root, keep_mxfp4=True, dtype=torch.bfloat16)
    assert isinstance(packed.layers[1].mlp.experts, MXFP4Experts)
    assert packed.layers[1].mlp.experts.down_proj_blocks.dtype == torch.uint8
    assert packed.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert relative_error(packed(IDS[None]).logits.float(), model(IDS[None]).logits) < 0.05  # bf16 activations


def test_published_repository_prefers_the_hf_layout(original, tmp_path):
    """openai/gpt-oss-20b holds both layouts: the HF one at the root wins; original/ alone is read too."""
    model, root, _ = original
    write_published_mxfp4(model, tmp_path, published_config())
    write_original(model, tmp_path)
    assert detect_format(tmp_path).format == "hf" and detect_format(tmp_path).mxfp4
    assert detect_format(root).format == "original" and detect_format(root).directory == root / "original"


def test_error_paths(original, tmp_path):
    _, root, tensors = original
    config = (root / "original" / "config.json").read_text()
    folder = tmp_path / "original"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    path = folder / "model.safetensors"

    save_file({n: t for n, t in tensors.items() if n != "block.1.attn.sinks"}, str(path))
    with pytest.raises(UserError, match="missing tensor.*layers.1.self_attn.sinks"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)

    save_file({**tensors, "block.0.attn.qkv.weight": tensors["block.0.attn.qkv.weight"][:-16].contiguous()}, str(path))
    with pytest.raises(UserError, match=r"model.safetensors: tensor 'block.0.attn.qkv.weight' has 80 rows"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)

    save_file({**tensors, "block.0.mlp.gate.weight": torch.zeros(5, 64)}, str(path))
    with pytest.raises(UserError, match=r"tensor 'block.0.mlp.gate.weight' has shape \(5, 64\)"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)

    save_file({**tensors, "block.0.attn.rotary.freqs": torch.zeros(1)}, str(path))
    with pytest.raises(UserError, match="unexpected tensor 'block.0.attn.rotary.freqs'"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)

    save_file({n: t for n, t in tensors.items() if n != "block.1.mlp.mlp2_weight.scales"}, str(path))
    with pytest.raises(UserError, match="'block.1.mlp.mlp2_weight.blocks' has no matching scales"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)

    data = (root / "original" / "model.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(UserError, match="model.safetensors is not a readable safetensors file"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)

    (folder / "config.json").write_text(json.dumps({**json.loads(config), "num_experts": 3, "experts_per_token": 4}))
    with pytest.raises(UserError, match="impossible model.*num_experts_per_tok"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)
    (folder / "config.json").write_text(json.dumps({"num_experts": 4, "experts_per_token": 2}))
    with pytest.raises(UserError, match="lacks num_hidden_layers"):
        GPTOSSForCausalLM.from_pretrained(tmp_path)
    assert load_file(root / "original" / "model.safetensors").keys() == tensors.keys()
