"""LoRA (ossgpt.lora) against independent references, in float64 on tiny models:

adapted forward            vs  the merged dense model (W + (alpha / r) B A folded in), dense and packed bases
adapter gradients          vs  finite differences (gradcheck), and vs autograd through the dense formula W + dW
packed_linear's backward   vs  autograd through the dequantized weight; and what it saves (no dense weight)
frozen base, both expert kernels, save/load and the errors of a wrong base, quantize_mxfp4 and requantize_error
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ossgpt import GPTOSSConfig, RuntimeOptions
from ossgpt.kernels.mxfp4 import FP4_VALUES, dequantize, dequantize_experts, quantize_mxfp4
from ossgpt.lora import (
    LORA_TARGETS,
    LoRAConfig,
    adapter_state_dict,
    add_lora,
    load_adapters,
    lora_parameters,
    merge_lora,
    requantize_error,
    save_adapters,
)
from ossgpt.lora import packed as packed_module
from ossgpt.lora.experts import LoRAExperts
from ossgpt.lora.linear import LoRALinear, LoRARouter
from ossgpt.lora.packed import packed_linear
from ossgpt.lora.transform import adapter_shapes, base_sites, lora_config
from ossgpt.model.model import GPTOSS
from ossgpt.model.moe import Experts
from ossgpt.quant.int8 import quantize_for_decoding
from ossgpt.quant.mxfp4 import MXFP4Experts, use_mxfp4_experts

ALL = LoRAConfig(rank=4, alpha=8.0, targets=LORA_TARGETS)
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))  # longer than the window of 6


def tiny_config(**overrides) -> GPTOSSConfig:
    values = dict(vocab_size=97, eos_token_id=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                  intermediate_size=64, sliding_window=6, max_position_embeddings=64)  # fmt: skip
    return GPTOSSConfig(**{**values, **overrides})


def pack_experts(model: GPTOSS) -> None:
    """Round the dense experts to MXFP4 in place (so that dense and packed hold the same weights)."""
    with torch.no_grad():
        for layer in model.layers:
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(layer.mlp.experts, name)
                weight.copy_(dequantize_experts(*quantize_mxfp4(weight.transpose(1, 2)), weight.dtype))


def packed_twin(dense: GPTOSS) -> GPTOSS:
    """A copy of `dense` (experts already MXFP4 values, see pack_experts) with MXFP4Experts holding them packed."""
    packed = copy.deepcopy(dense)
    use_mxfp4_experts(packed)
    for layer, dense_layer in zip(packed.layers, dense.layers):
        experts, source = layer.mlp.experts, dense_layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            blocks, scales = quantize_mxfp4(getattr(source, name).detach().transpose(1, 2))  # rows = outputs
            setattr(experts, f"{name}_blocks", blocks)
            setattr(experts, f"{name}_scales", scales)
            setattr(experts, f"{name}_bias", nn.Parameter(getattr(source, f"{name}_bias").detach().clone()))
    return packed


def base_models(seed: int = 0, **overrides) -> tuple[GPTOSS, GPTOSS]:
    """(dense, packed) float64 models computing the same function; biases and sinks nonzero."""
    torch.manual_seed(seed)
    dense = GPTOSS(tiny_config(**overrides)).double()
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.normal_(0, 0.1)
    pack_experts(dense)
    return dense, packed_twin(dense)


def randomize_b(model: nn.Module, seed: int = 3, std: float = 0.2) -> None:
    """Nonzero B everywhere (at creation B is zero and the adapters do nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if name.endswith("lora_B"):
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64))


def adapted(base: GPTOSS, config: LoRAConfig = ALL, experts: str = "sorted") -> GPTOSS:
    model = add_lora(copy.deepcopy(base), config)
    model.options = RuntimeOptions(attention="eager", experts=experts)
    randomize_b(model)
    return model


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    for _, p in lora_parameters(model):
        p.grad = None
    model(IDS, labels=IDS).loss.backward()
    return {name: p.grad for name, p in lora_parameters(model)}


# --------------------------------------------------------------------------------------------------- the config
def test_config_validates_and_round_trips():
    config = LoRAConfig(rank=16, alpha=32, targets=["router", "q_proj"])
    assert config.targets == ("q_proj", "router") and config.alpha == 32.0 and config.scale == 2.0
    assert LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert LoRAConfig().targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
    for bad, message in [
        (dict(rank=0), "rank must be a positive integer, got 0"),
        (dict(rank=True), "rank must be a positive integer"),
        (dict(alpha=-1.0), "alpha must be a positive number"),
        (dict(alpha=float("nan")), "alpha must be a positive number"),
        (dict(targets=()), "targets must be a non-empty list"),
        (dict(targets="q_proj"), "targets must be a non-empty list"),
        (dict(targets=("q_proj", "lm_head")), "unknown LoRA target 'lm_head'; choose from q_proj"),
        (dict(targets=("q_proj", "q_proj")), "list a name twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            LoRAConfig(**bad)
    with pytest.raises(ValueError, match="unknown LoRA config key.*dropout"):
        LoRAConfig.from_dict({"rank": 4, "dropout": 0.1})


# ----------------------------------------------------------------------------------------------- the transform
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_adapted_model_starts_as_its_base_with_only_adapters_trainable(packed):
    base = base_models()[packed]
    model = add_lora(copy.deepcopy(base), ALL)
    model.options = base.options = RuntimeOptions(experts="loop")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)  # B = 0: exactly the base's function
    base_state, state = base.state_dict(), model.state_dict()
    adapters = adapter_state_dict(model)
    assert set(state) == set(base_state) | set(adapters)  # the base's names unchanged, adapters beside them
    assert {"layers.0.self_attn.q_proj.lora_A", "layers.1.mlp.router.lora_B", "layers.0.mlp.experts.down_proj_lora_A"} \
        <= set(adapters)  # fmt: skip
    assert {n: tuple(t.shape) for n, t in adapters.items()} == adapter_shapes(base_sites(model), ALL.rank)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [name for name, _ in lora_parameters(model)] and len(trainable) == 2 * 7 * 2
    assert lora_config(model) == ALL
    # the same seed draws the same A's; B's start at zero
    again = add_lora(copy.deepcopy(base), ALL, seed=0)
    other = add_lora(copy.deepcopy(base), ALL, seed=1)
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in adapters.items())
    name = "layers.0.self_attn.q_proj.lora_A"
    assert not torch.equal(adapters[name], other.state_dict()[name])
    assert not any(t.any() for n, t in adapters.items() if n.endswith("lora_B"))


def test_a_is_drawn_like_peft():
    """PEFT draws A with kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))."""
    model = add_lora(base_models()[0], LoRAConfig(rank=64, targets=("q_proj", "down_proj")))
    for a in (model.layers[0].self_attn.q_proj.lora_A, model.layers[0].mlp.experts.down_proj_lora_A):
        bound = 64**-0.5  # both have 64 inputs
        assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound and abs(a.mean()) < 0.1 * bound


@pytest.mark.parametrize("experts", ["sorted", "loop"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_adapted_forward_equals_the_merged_dense_model(packed, experts):
    model = adapted(base_models()[packed], experts=experts)
    with torch.no_grad():
        expected = model(IDS).logits if not packed or experts == "loop" else None
    got_with_grad = model(IDS).logits.detach()  # a packed base, under grad, takes packed_linear with either kernel
    merged = merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, LoRARouter, LoRAExperts, MXFP4Experts)) for m in merged.modules())
    assert all(type(layer.mlp.experts) is Experts for layer in merged.layers)
    assert set(merged.state_dict()) == set(base_models()[0].state_dict())  # a plain GPTOSS again
    with torch.no_grad():
        reference = merged(IDS).logits
    torch.testing.assert_close(got_with_grad, reference, rtol=1e-12, atol=1e-12)
    if expected is not None:
        torch.testing.assert_close(expected, reference, rtol=1e-12, atol=1e-12)


def test_packed_inference_kernel_gets_the_update_too(monkeypatch):
    """Without gradients, packed experts under "sorted" use the base's own products (mxfp4_linear: native int8 on
    CPU); the update is added there as well. mxfp4_linear is replaced by its exact reference here."""
    import ossgpt.lora.experts as lora_experts

    calls = []

    def reference(x, blocks, scales, bias):
        calls.append(1)
        return F.linear(x, dequantize(blocks, scales, x.dtype), bias)

    monkeypatch.setattr(lora_experts, "mxfp4_linear", reference)
    model = adapted(base_models()[1], experts="sorted")
    with torch.no_grad():
        got = model(IDS).logits
        model.options = RuntimeOptions(attention="eager", experts="loop")
        expected = model(IDS).logits
    assert calls and torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_both_expert_kernels_give_the_same_outputs_and_gradients():
    base = base_models()[0]
    sorted_model, loop_model = adapted(base, experts="sorted"), adapted(base, experts="loop")
    torch.testing.assert_close(sorted_model(IDS).logits, loop_model(IDS).logits, rtol=1e-12, atol=1e-12)
    loop_grads = adapter_grads(loop_model)
    for name, grad in adapter_grads(sorted_model).items():
        torch.testing.assert_close(grad, loop_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def dense_formula_grads(base: GPTOSS, model: GPTOSS) -> dict[str, torch.Tensor]:
    """The adapters' gradients the independent way: the dense base with W + (alpha / r) B A (experts: A_e B_e)
    substituted for each adapted weight, differentiated by autograd w.r.t. A and B."""
    adapters = {name: t.detach().clone().requires_grad_() for name, t in adapter_state_dict(model).items()}
    scale = ALL.scale
    weights = {}
    for site, shape in base_sites(model, ALL.targets).items():
        if len(shape) == 2:  # a linear map: weight [out, in] + B [out, r] @ A [r, in]
            name = f"{site}.weight"
            delta = adapters[f"{site}.lora_B"] @ adapters[f"{site}.lora_A"]
        else:  # experts: W [E, in, out] + A [E, in, r] @ B [E, r, out]
            name = site
            delta = adapters[f"{site}_lora_A"] @ adapters[f"{site}_lora_B"]
        weights[name] = base.state_dict()[name] + scale * delta
    functional_call(base, weights, (IDS,), {"labels": IDS}).loss.backward()
    return {name: t.grad for name, t in adapters.items()}


@pytest.mark.parametrize("experts", ["sorted", "loop"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_adapter_gradients_equal_autograd_through_the_dense_formula(packed, experts):
    dense, packed_base = base_models()
    model = adapted(packed_base if packed else dense, experts=experts)
    dense.options = RuntimeOptions(attention="eager", experts="loop")
    expected = dense_formula_grads(dense, model)
    for name, grad in adapter_grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    model = adapted(base_models()[1], experts="loop")
    expected = adapter_grads(model)
    model.options = RuntimeOptions(attention="eager", experts="loop", gradient_checkpointing=True)
    for name, grad in adapter_grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-12, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------ finite differences
def test_linear_and_router_adapter_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    linear = LoRALinear(nn.Linear(6, 5).double(), rank=3, alpha=6.0, generator=g)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    a, b = (torch.randn(t.shape, dtype=torch.float64, requires_grad=True) for t in (linear.lora_A, linear.lora_B))
    adapted_linear = lambda x, a, b: functional_call(linear, {"lora_A": a, "lora_B": b}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(adapted_linear, (x, a, b))

    router = LoRARouter(base_models()[0].layers[0].mlp.router, tiny_config(), 3, 6.0, g)
    x = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    a, b = (torch.randn(t.shape, dtype=torch.float64, requires_grad=True) for t in (router.lora_A, router.lora_B))

    def logits_and_mixing(x, a, b):
        logits, weights, _ = functional_call(router, {"lora_A": a, "lora_B": b}, (x,))
        return logits, weights

    assert torch.autograd.gradcheck(logits_and_mixing, (x, a, b), fast_mode=True)


@pytest.mark.parametrize("experts", ["sorted", "loop"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_expert_adapter_gradients_match_finite_differences(packed, experts):
    base = base_models(hidden_size=32, intermediate_size=32, num_local_experts=3)[packed].layers[0].mlp.experts
    config = tiny_config(hidden_size=32, intermediate_size=32, num_local_experts=3)
    module = LoRAExperts(base, config, 2, 4.0, ("gate_up_proj", "down_proj"), torch.Generator().manual_seed(0))
    module.kernel = experts
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 32, dtype=torch.float64, generator=g).requires_grad_()
    indices = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]])
    weights = torch.rand(5, 2, dtype=torch.float64, generator=g).softmax(-1)
    names = [name for name, _ in module.named_parameters() if "lora" in name]
    adapters = [(0.3 * torch.randn(getattr(module, n).shape, dtype=torch.float64, generator=g)).requires_grad_()
                for n in names]  # fmt: skip

    def forward(x, *tensors):
        return functional_call(module, dict(zip(names, tensors)), (x, indices, weights))

    assert torch.autograd.gradcheck(forward, (x, *adapters), fast_mode=True)


# -------------------------------------------------------------------------------------------- packed_linear
def packed_weight(out_features=48, in_features=64, seed=0):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return quantize_mxfp4(w)


def test_packed_linear_backward_equals_autograd_through_the_dequantized_weight():
    blocks, scales = packed_weight()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, dtype=torch.float64, generator=g)
    grad_out = torch.randn(3, 5, 48, dtype=torch.float64, generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = packed_linear(x1, blocks, scales)
    y2 = F.linear(x2, dequantize(blocks, scales, torch.float64))
    (y1 * grad_out).sum().backward()
    (y2 * grad_out).sum().backward()
    torch.testing.assert_close(y1, y2, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x: packed_linear(x, blocks, scales), (x.requires_grad_(),), fast_mode=True)


def test_packed_products_of_one_shape_share_one_buffer_and_stay_right():
    """Every product dequantizes into the one buffer kept for its weight's shape (and dtype): a second weight's
    forward pass overwrites the first's dense weight, and the first's backward pass, which dequantizes again, is
    still right."""
    (blocks_a, scales_a), (blocks_b, scales_b) = packed_weight(seed=0), packed_weight(seed=1)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = packed_linear(xa, blocks_a, scales_a), packed_linear(xb, blocks_b, scales_b)
    (ya.sum() + 2 * yb.sum()).backward()
    wa, wb = dequantize(blocks_a, scales_a), dequantize(blocks_b, scales_b)
    torch.testing.assert_close(ya, x @ wa.T)
    torch.testing.assert_close(yb, x @ wb.T)
    torch.testing.assert_close(xa.grad, torch.ones(5, 48) @ wa)
    torch.testing.assert_close(xb.grad, 2 * torch.ones(5, 48) @ wb)
    assert (tuple(scales_a.shape), torch.float32, x.device) in packed_module._BUFFERS


def test_packed_linear_under_autocast_computes_as_autocast_would():
    blocks, scales = packed_weight()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = packed_linear(x1, blocks, scales)
        y2 = F.linear(x2, dequantize(blocks, scales))
    assert y1.dtype == y2.dtype == torch.bfloat16 and torch.equal(y1, y2)
    y1.float().square().sum().backward()
    y2.float().square().sum().backward()
    assert x1.grad.dtype == torch.float32 and torch.equal(x1.grad, x2.grad)


def saved_floats(fn, parameters=()) -> list[int]:
    """numel of every floating-point tensor autograd saves for backward while fn() runs, other than `parameters`
    (and views of them)."""
    sizes, skip = [], {p.untyped_storage().data_ptr() for p in parameters}

    def pack(t):
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in skip:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_packed_experts_save_no_dense_weight_for_backward():
    """The memory claim: training through packed experts keeps no dense expert weight alive for the backward pass.
    The counter is shown to see one: MXFP4Experts' own "loop" path, differentiated, saves the dequantized weights."""
    dense, packed = base_models()
    config = dense.config
    weight_numel = config.hidden_size * config.intermediate_size  # the smaller projection, down [I, H]
    x = torch.randn(3, config.hidden_size, dtype=torch.float64, requires_grad=True)  # 3 tokens: activations < weights
    indices, weights = torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.full((3, 2), 0.5, dtype=torch.float64)

    plain = packed.layers[0].mlp.experts
    plain.kernel = "loop"
    assert max(saved_floats(lambda: plain(x, indices, weights))) >= weight_numel  # the dense weights, saved

    model = add_lora(packed, LoRAConfig())
    randomize_b(model)
    experts = model.layers[0].mlp.experts
    for kernel in ("sorted", "loop"):
        experts.kernel = kernel
        sizes = saved_floats(lambda: experts(x, indices, weights).sum().backward(), experts.parameters())
        assert sizes and max(sizes) < weight_numel, sizes  # activations only: the adapters are left out


# ------------------------------------------------------------------------------------------------ frozen base
def test_base_gets_no_gradient_and_stays_bit_identical_through_optimizer_steps():
    model = adapted(base_models()[1], experts="loop")
    before = {name: t.clone() for name, t in model.state_dict().items() if "lora" not in name}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all of them: must skip the base
    adapters_before = {name: t.clone() for name, t in adapter_state_dict(model).items()}
    for _ in range(3):
        optimizer.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        assert all(p.grad is None for name, p in model.named_parameters() if "lora" not in name)
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[name], t) for name, t in before.items())
    assert all(not torch.equal(after[name], t) for name, t in adapters_before.items())


def test_adapted_state_dict_loads_into_another_adapted_model():
    """What a trainer's checkpoint does: model.state_dict() of an adapted model, loaded into a fresh adaptation."""
    model = adapted(base_models()[0])
    fresh = add_lora(base_models()[0], ALL, seed=5)
    fresh.load_state_dict(model.state_dict())
    fresh.options = model.options
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)


def test_errors_on_models_that_cannot_take_adapters():
    model = add_lora(base_models()[0], ALL)
    with pytest.raises(ValueError, match="already has LoRA adapters; merge_lora"):
        add_lora(model, ALL)
    with pytest.raises(ValueError, match=r"layers.0.self_attn has no q_proj, an nn.Linear: adapt the float model"):
        add_lora(quantize_for_decoding(base_models()[0].float()), ALL)
    with pytest.raises(ValueError, match=r"layers.0.mlp.experts is a Int8Experts"):
        add_lora(quantize_for_decoding(base_models()[0].float()), LoRAConfig(targets=("down_proj",)))
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        lora_config(base_models()[0])


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_onto_dense_and_packed_bases(tmp_path):
    dense, packed = base_models()
    model = adapted(packed, config=LoRAConfig(rank=4, targets=("v_proj", "down_proj", "router")), experts="loop")
    save_adapters(model, tmp_path / "adapters")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]  # written atomically: no temporaries left
    described = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert described["lora"] == {"rank": 4, "alpha": 16.0, "targets": ["v_proj", "down_proj", "router"]}
    assert described["sites"]["layers.1.mlp.experts.down_proj"] == [4, 64, 64]
    assert described["sites"]["layers.0.self_attn.v_proj"] == [32, 64]

    for base in (copy.deepcopy(packed), copy.deepcopy(dense)):  # trained on packed, loads onto either
        loaded = load_adapters(base, tmp_path / "adapters")
        loaded.options = model.options
        assert all(torch.equal(t, adapter_state_dict(model)[n]) for n, t in adapter_state_dict(loaded).items())
        assert not any(p.requires_grad for n, p in loaded.named_parameters() if "lora" not in n)
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-12, atol=1e-12)


def test_loading_onto_another_base_names_the_first_difference(tmp_path):
    save_adapters(adapted(base_models()[0]), tmp_path / "adapters")
    directory = tmp_path / "adapters"
    cases = [
        (
            tiny_config(hidden_size=32, intermediate_size=32),
            r"q_proj has shape \[64, 64\]; this model's has \[64, 32\]",
        ),
        (tiny_config(num_hidden_layers=1), "adapt layers.1.self_attn.q_proj, which this model does not have"),
        (tiny_config(num_hidden_layers=3), "this model has layers.2.self_attn.q_proj, which the adapters do not"),
        (tiny_config(num_local_experts=8), r"whose layers.0.mlp.router has shape \[4, 64\]"),
    ]
    for config, message in cases:
        base = GPTOSS(config).double()
        with pytest.raises(ValueError, match=message):
            load_adapters(base, directory)
        assert not lora_parameters(base)  # refused before anything changed

    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapters(adapted(base_models()[0]), directory)
    with pytest.raises(ValueError, match="not an adapter folder"):
        load_adapters(base_models()[0], tmp_path)


def test_loading_adapters_whose_files_disagree(tmp_path):
    directory = tmp_path / "adapters"
    save_adapters(adapted(base_models()[0], config=LoRAConfig(targets=("q_proj",))), directory)
    config_file = directory / "adapter_config.json"
    described = json.loads(config_file.read_text())

    # other targets: the config says the router is adapted too (sites and tensors are q_proj only)
    config_file.write_text(json.dumps({**described, "lora": {**described["lora"], "targets": ["q_proj", "router"]}}))
    with pytest.raises(ValueError, match="this model has layers.0.mlp.router, which the adapters do not adapt"):
        load_adapters(base_models()[0], directory)
    sites = {**described["sites"], "layers.0.mlp.router": [4, 64], "layers.1.mlp.router": [4, 64]}
    config_file.write_text(json.dumps({"lora": {**described["lora"], "targets": ["q_proj", "router"]}, "sites": sites}))
    with pytest.raises(ValueError, match="adapter.safetensors: missing tensor 'layers.0.mlp.router.lora_A'"):
        load_adapters(base_models()[0], directory)
    # another rank than the tensors have
    config_file.write_text(json.dumps({**described, "lora": {**described["lora"], "rank": 2}}))
    with pytest.raises(ValueError, match=r"tensor 'layers.0.self_attn.q_proj.lora_A' has shape \[8, 64\], its config"):
        load_adapters(base_models()[0], directory)
    config_file.write_text(json.dumps({"lora": {"rank": 0}, "sites": {}}))
    with pytest.raises(ValueError, match="adapter_config.json: not an adapter config: LoRA rank must be"):
        load_adapters(base_models()[0], directory)
    config_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match='not an adapter config: expected a JSON object with "lora" and "sites"'):
        load_adapters(base_models()[0], directory)


# --------------------------------------------------------------------------------------- MXFP4 again, and its cost
def nearest_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """The reference rounding, by brute force: per block of 32 the scale 2^e, e the smallest with max|w| <= 7 * 2^e
    (found by counting); each value to the nearest of the FP4 values times 2^e, a tie to the even code."""
    out = []
    for block in w.double().reshape(-1, 32).tolist():
        amax, e = max(abs(v) for v in block), -40
        while amax > 7 * 2.0**e:
            e += 1
        grid = [value * 2.0**e for value in FP4_VALUES[:8]]
        for v in block:
            distance = [abs(abs(v) - q) for q in grid]
            code = min((i for i in range(8) if distance[i] == min(distance)), key=lambda i: i % 2)
            out.append(math.copysign(grid[code], v))
    return torch.tensor(out, dtype=torch.float64).reshape(w.shape)


def test_quantize_mxfp4_rounds_to_nearest_ties_to_even_and_is_lossless_on_its_values():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 96, generator=g) * torch.exp2(torch.randint(-8, 8, (3, 5, 1), generator=g).float())
    w[0, 0, :32] = 0  # an all-zero block
    w[0, 1, :8] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # every tie, at scale 1
    w[0, 1, 8:32] = torch.tensor([-0.75, 5.0, -5.0]).repeat(8)
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 5, 3, 16) and scales.shape == (3, 5, 3) and blocks.dtype == scales.dtype == torch.uint8
    rounded = dequantize(blocks, scales)
    assert torch.equal(rounded.double(), nearest_mxfp4(w))
    assert rounded[0, 1, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert torch.equal(dequantize(*quantize_mxfp4(rounded)), rounded)  # lossless on its own values
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.ones(2, 40))


def test_requantize_error_is_the_rounding_relative_to_the_update():
    dense, packed = base_models()
    config = LoRAConfig(targets=("gate_up_proj", "down_proj"))
    model = adapted(packed, config=config)
    randomize_b(model, std=1e-4)  # a small update on a packed base: rounding to MXFP4 mostly undoes it
    errors = requantize_error(model)
    assert set(errors) == {f"layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert all(error == pytest.approx(1.0, abs=1e-3) for error in errors.values()), errors

    randomize_b(model, std=0.2)
    errors = requantize_error(model)
    merged = merge_lora(copy.deepcopy(model))  # the same numbers, the long way round
    for name, error in errors.items():
        layer, projection = int(name.split(".")[1]), name.rsplit(".", 1)[1]
        weight = getattr(merged.layers[layer].mlp.experts, projection).transpose(1, 2).float()
        base = getattr(dense.layers[layer].mlp.experts, projection).transpose(1, 2).float()
        expected = (dequantize(*quantize_mxfp4(weight)) - weight).norm() / (weight - base).norm()
        assert error == pytest.approx(expected.item(), rel=1e-4)
        assert 0 < error < 0.9
    assert requantize_error(base_models()[0]) == {}


def test_float32_adapters_on_a_bfloat16_packed_base_under_autocast(tmp_path):
    """The recipe for a big model: base in bfloat16 with packed experts, adapters in float32, autocast compute.
    Gradients agree in direction with the float64 ones; saving and loading keep the adapters' dtype."""
    reference = adapted(base_models()[1])
    expected = torch.cat([g.flatten() for g in adapter_grads(reference).values()])
    model = add_lora(base_models()[1].to(torch.bfloat16), ALL, dtype=torch.float32)
    model.options = reference.options
    randomize_b(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(IDS, labels=IDS).loss
    loss.backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for _, p in lora_parameters(model))
    assert (
        model.layers[0].self_attn.q_proj.weight.dtype
        == model.layers[0].mlp.experts.down_proj_bias.dtype
        == torch.bfloat16
    )
    got = torch.cat([p.grad.flatten() for _, p in lora_parameters(model)]).double()
    assert F.cosine_similarity(got, expected, dim=0) > 0.99

    save_adapters(model, tmp_path / "adapters")
    loaded = load_adapters(base_models()[1].to(torch.bfloat16), tmp_path / "adapters")
    assert all(p.dtype == torch.float32 for _, p in lora_parameters(loaded))
    merged = merge_lora(loaded)
    assert (
        merged.layers[0].mlp.experts.gate_up_proj.dtype
        == merged.layers[0].self_attn.q_proj.weight.dtype
        == torch.bfloat16
    )
