"""The native CPU kernels (ossgpt.kernels.native, csrc/cpu_q8.cpp) against float64 products of the dequantized
weights, and the decoding path they serve (packed MXFP4 experts, int8 W8A8 elsewhere) against the float32 model.

The kernels round the activations to int8 per block of 32 values (step d = max|block| / 127, each value off by at
most d / 2), then sum integer products exactly. So each output y[t, o] may differ from the exact product by at most

    sum over blocks b of  (d[t, b] / 2) * sum_j |w[o, 32 b + j]|          (the activations' rounding)
  + (G + 8) * 2^-24 * sum over b of |block term b|                        (float32 sums of G block terms)
  + (G + 8) * 2^-149                                                      (float32 underflow, for tiny scales)

which `rounding_bound` computes; nothing in it is fitted to the kernel's results. The reference weights come from
ossgpt.kernels.mxfp4.dequantize (checked against transformers in test_mxfp4) or, where float32 overflows, from the
format's definition in float64 (`dequantize64`).
"""

import pytest
import torch

from ossgpt.errors import UserError
from ossgpt.inference.generate import generate
from ossgpt.inference.loading import load_model
from ossgpt.inference.memory import MemoryPlan, check_memory
from ossgpt.kernels import native as native_module
from ossgpt.kernels.int8 import int8_dynamic_linear, quantize_int8
from ossgpt.kernels.mxfp4 import dequantize, mxfp4_linear, mxfp4_token_experts
from ossgpt.kernels.native import INSTRUCTION_SETS, cpu_flags, native, pick_instruction_set
from ossgpt.quant.int8 import Int8Linear, StoredEmbedding
from ossgpt.quant.mxfp4 import MXFP4Experts
from test_mxfp4 import published_config, reference_model, write_published_mxfp4

kernels = native()
needs_native = pytest.mark.skipif(kernels is None, reason="the native CPU kernels could not be built here")


def rounding_bound(x: torch.Tensor, w: torch.Tensor, row_scales: torch.Tensor | None = None) -> torch.Tensor:
    """The bound of the module doc for x [n, K] times float64 weights w [O, K] -> [n, O]."""
    n, K = x.shape
    G = K // 32
    xb = x.double().view(n, G, 32)
    d = xb.abs().amax(-1) / 127  # [n, G]
    w_abs = w.abs().view(-1, G, 32).sum(-1)  # [O, G]
    rounding = (d / 2 * (1 + 2**-20)) @ w_abs.T  # [n, O]
    terms = (xb.abs() + d[..., None] / 2).reshape(n, K) @ w.abs().T  # >= sum_b |block term b|
    return rounding + (G + 8) * (2**-24 * terms + 2**-149)


def dequantize64(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 rows in float64, from the format's definition (code table times 2^(e - 127))."""
    fp4 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long().flatten(-2)  # low nibble first
    return (fp4[codes] * torch.exp2(scales.double() - 127)[..., None]).flatten(-2)


def random_mxfp4(rows: int, K: int, generator, exponents=(118, 124)) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.randint(0, 256, (rows, K // 32, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(*exponents, (rows, K // 32), dtype=torch.uint8, generator=generator)
    return blocks, scales


# --------------------------------------------------------------------------------------------- the kernels
@needs_native
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 9, 17])
@pytest.mark.parametrize("K", [32, 96, 2880])
def test_mxfp4_linear_within_the_activation_rounding_bound(n, K):
    g = torch.Generator().manual_seed(n * 1000 + K)
    O = 37  # noqa: E741 (odd: rows split unevenly over the threads)
    blocks, scales = random_mxfp4(O, K, g)
    x = torch.randn(n, K, generator=g) * torch.exp2(torch.randint(-3, 4, (n, K // 32), generator=g)).repeat_interleave(
        32, 1
    )
    bias = torch.randn(O, generator=g)
    w = dequantize(blocks, scales).double()
    got = mxfp4_linear(x, blocks, scales, bias)
    exact = x.double() @ w.T + bias.double()
    assert got.shape == (n, O) and got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= rounding_bound(x, w) + 2**-24 * exact.abs()).all()


@needs_native
def test_mxfp4_linear_extreme_scales_and_zero_blocks():
    """Block exponents 0x00 (2^-127) and 0xFE (2^127) in the same rows as ordinary ones, activations spanning
    2^-100 .. 2^20, all-zero activation blocks, and zero rows: still within the bound (float64 reference)."""
    g = torch.Generator().manual_seed(5)
    O, K, n = 9, 256, 3  # noqa: E741
    blocks, scales = random_mxfp4(O, K, g)
    scales[0] = 0x00
    scales[1] = 0xFE
    scales[2, ::2], scales[2, 1::2] = 0x00, 0xFE
    blocks[3] = 0  # codes 0: all weights +0
    x = torch.randn(n, K, generator=g) * 2.0**-100
    x[1] *= 2.0**120
    x[2, 64:128] = 0  # an all-zero activation block
    w = dequantize64(blocks, scales)  # 2^128 and more overflow float32: float64 keeps the reference finite
    got = mxfp4_linear(x, blocks, scales)
    exact = x.double() @ w.T
    finite = exact.abs() < 1e37  # rows whose true result float32 can hold
    assert finite.sum() >= 20
    assert ((got.double() - exact).abs() <= rounding_bound(x, w) + 2**-24 * exact.abs())[finite].all()
    assert torch.equal(got[:, 3], torch.zeros(n))


@needs_native
def test_mxfp4_linear_no_rows_and_bad_shapes():
    blocks, scales = random_mxfp4(8, 64, torch.Generator().manual_seed(0))
    assert mxfp4_linear(torch.empty(0, 64), blocks, scales).shape == (0, 8)
    assert mxfp4_linear(torch.randn(2, 3, 64), blocks, scales).shape == (2, 3, 8)
    with pytest.raises(RuntimeError, match="columns"):
        kernels.mxfp4_linear(torch.randn(2, 32), blocks, scales, None)
    with pytest.raises(RuntimeError, match="contiguous uint8"):
        kernels.mxfp4_linear(torch.randn(2, 64), blocks.transpose(0, 1), scales, None)


@needs_native
@pytest.mark.parametrize("n", [1, 4, 6])
def test_int8_linear_within_the_activation_rounding_bound(n):
    g = torch.Generator().manual_seed(n)
    O, K = 45, 320  # noqa: E741
    q, s = quantize_int8(torch.randn(O, K, generator=g))
    x = torch.randn(n, K, generator=g)
    w = q.double() * s.double()[:, None]
    got = int8_dynamic_linear(x, q, s)
    exact = x.double() @ w.T
    assert ((got.double() - exact).abs() <= rounding_bound(x, w) + 2**-24 * exact.abs()).all()


LESSER = [name for name in list(INSTRUCTION_SETS)[1:] if set(INSTRUCTION_SETS[name][0]) <= cpu_flags()]


@needs_native
@pytest.mark.parametrize("isa", LESSER[-2:])  # AVX2 and plain C++: what machines without AVX-512 VNNI build
def test_every_instruction_set_this_cpu_can_run_is_within_the_bound(isa, monkeypatch):
    """The kernels built for a lesser instruction set than the CPU's best (a minute's compile each, then cached):
    the AVX2 and plain C++ paths are checked here even on an AVX-512 machine."""
    monkeypatch.setenv("OSSGPT_NATIVE", isa)
    native_module.native.cache_clear()
    try:
        module = native()
        assert module is not None and module.instruction_set() == isa.replace("avx512vnni", "avx512-vnni")
        g = torch.Generator().manual_seed(3)
        blocks, scales = random_mxfp4(19, 2880, g)
        q, s = quantize_int8(torch.randn(23, 2880, generator=g))
        for n in (1, 5):
            x = torch.randn(n, 2880, generator=g)
            w = dequantize(blocks, scales).double()
            exact = x.double() @ w.T
            got = module.mxfp4_linear(x, blocks, scales, None).double()
            assert ((got - exact).abs() <= rounding_bound(x, w) + 2**-24 * exact.abs()).all()
            w = q.double() * s.double()[:, None]
            exact = x.double() @ w.T
            got = module.int8_linear(x, q, s.float(), None).double()
            assert ((got - exact).abs() <= rounding_bound(x, w) + 2**-24 * exact.abs()).all()
    finally:
        native_module.native.cache_clear()


@needs_native
@pytest.mark.parametrize("hidden, width", [(64, 96), (96, 64)])  # even and odd block counts on either side
def test_fused_token_experts_equal_the_per_expert_products(hidden, width):
    """One token through its k experts in one native call against the same products one expert at a time
    (`Experts.loop` over `mxfp4_linear`), and against float64 with the dequantized weights."""
    from ossgpt import GPTOSSConfig
    from ossgpt.model.moe import clamped_swiglu

    config = GPTOSSConfig(vocab_size=64, eos_token_id=0, hidden_size=hidden, intermediate_size=width,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          num_local_experts=5, num_experts_per_tok=3)  # fmt: skip
    g = torch.Generator().manual_seed(hidden)
    experts = MXFP4Experts(config)
    experts.gate_up_proj_blocks, experts.gate_up_proj_scales = random_mxfp4(5 * 2 * width, hidden, g)
    experts.down_proj_blocks, experts.down_proj_scales = random_mxfp4(5 * hidden, width, g)
    experts.gate_up_proj_blocks = experts.gate_up_proj_blocks.view(5, 2 * width, hidden // 32, 16)
    experts.gate_up_proj_scales = experts.gate_up_proj_scales.view(5, 2 * width, hidden // 32)
    experts.down_proj_blocks = experts.down_proj_blocks.view(5, hidden, width // 32, 16)
    experts.down_proj_scales = experts.down_proj_scales.view(5, hidden, width // 32)
    experts.gate_up_proj_bias = torch.nn.Parameter(torch.randn(5, 2 * width, generator=g))
    experts.down_proj_bias = torch.nn.Parameter(torch.randn(5, hidden, generator=g))
    x = torch.randn(1, hidden, generator=g) * 4
    indices = torch.tensor([[4, 0, 2]])
    weights = torch.tensor([[0.5, 0.3, 0.2]])
    with torch.no_grad():
        fused = experts(x, indices, weights)  # one token: the fused call
        direct = mxfp4_token_experts(x, indices, weights, (experts.gate_up_proj_blocks, experts.gate_up_proj_scales,
                                     experts.gate_up_proj_bias), (experts.down_proj_blocks, experts.down_proj_scales,
                                     experts.down_proj_bias), experts.alpha, experts.limit)  # fmt: skip
        assert direct is not None and torch.equal(direct, fused)
        looped = experts.loop(x, indices, weights)  # one mxfp4_linear per projection and expert
        exact = torch.zeros(1, hidden, dtype=torch.float64)
        for e, w in zip(indices[0].tolist(), weights[0].tolist()):
            gate_up = dequantize64(experts.gate_up_proj_blocks[e], experts.gate_up_proj_scales[e])
            down = dequantize64(experts.down_proj_blocks[e], experts.down_proj_scales[e])
            h = clamped_swiglu(x.double() @ gate_up.T + experts.gate_up_proj_bias[e].double(), 1.702, 7.0)
            exact += w * (h @ down.T + experts.down_proj_bias[e].double())
    scale = exact.abs().max()
    # The two native paths differ only where an activation's float rounding (exp vs torch's sigmoid) tips its
    # int8 rounding, one step of one value; both are within int8 rounding of the float64 result.
    assert ((fused - looped).abs().max() / scale) < 1e-3
    assert ((fused.double() - exact).abs().max() / scale) < 2e-2


def test_quantize_int8_in_row_chunks_is_the_same():
    w = torch.randn(37, 64)
    q, s = quantize_int8(w)
    q2, s2 = quantize_int8(w, rows_at_once=5)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    assert torch.equal(w, w.clone())  # the input is not modified
    assert ((q.float() * s.float()[:, None] - w).abs() <= s.float()[:, None] / 2 * (1 + 1e-6)).all()


# ------------------------------------------------------------------------------------------- build and fallback
def test_instruction_set_is_the_best_the_cpu_has():
    assert pick_instruction_set({"avx2", "fma", "f16c"}) == "avx2"
    assert pick_instruction_set({"avx2", "fma", "f16c", "avx_vnni"}) == "avxvnni"
    everything = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    assert pick_instruction_set(everything) == "avx512vnni"
    assert pick_instruction_set(everything, requested="avx2") == "avx2"
    assert pick_instruction_set({"sse4_2"}) == "generic"


def test_without_a_compiler_the_pure_pytorch_path_with_one_notice(monkeypatch, capsys):
    import torch.utils.cpp_extension

    def fail(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fail)
    monkeypatch.delenv("OSSGPT_NATIVE", raising=False)
    native_module.native.cache_clear()
    try:
        assert native() is None and native() is None
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "could not build the native CPU kernels (Ninja is required" in err
        blocks, scales = random_mxfp4(4, 64, torch.Generator().manual_seed(0))
        x = torch.randn(2, 64)
        assert torch.allclose(mxfp4_linear(x, blocks, scales), x @ dequantize(blocks, scales).T, atol=1e-5)
        monkeypatch.setenv("OSSGPT_NATIVE", "0")
        native_module.native.cache_clear()
        assert native() is None and capsys.readouterr().err == ""  # turned off on purpose: no notice
    finally:
        native_module.native.cache_clear()


def test_a_failed_build_falls_back_to_the_next_instruction_set(monkeypatch, capsys):
    """An older compiler may lack the best set's flags: the next one the CPU has is built instead, quietly."""
    tried = []

    def build(name):
        tried.append(name)
        if name == "avx512vnni":
            raise RuntimeError("cc1plus: error: unrecognized command-line option '-mavx512vnni'")
        return name

    everything = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    monkeypatch.setattr(native_module, "_build", build)
    monkeypatch.setattr(native_module, "cpu_flags", lambda: everything)
    monkeypatch.delenv("OSSGPT_NATIVE", raising=False)
    native_module.native.cache_clear()
    try:
        assert native() == "avx2" and tried == ["avx512vnni", "avx2"] and capsys.readouterr().err == ""
    finally:
        native_module.native.cache_clear()


# ------------------------------------------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A shrunk gpt-oss-20b in the published HF MXFP4 layout (not exactly representable weights)."""
    config = published_config(vocab_size=512, hidden_size=128, intermediate_size=96, head_dim=32)
    model = reference_model(config, lossless=False)
    directory = tmp_path_factory.mktemp("gpt-oss-shrunk")
    write_published_mxfp4(model, directory, config)
    return directory


IDS = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(2))  # longer than the window of 8


def test_decoding_path_is_chosen_on_cpu_and_close_to_float32(published):
    fast = load_model(published)  # the defaults: packed experts, int8 W8A8 elsewhere, float32 compute
    layer = fast.layers[0]
    assert isinstance(layer.mlp.experts, MXFP4Experts) and isinstance(layer.self_attn.q_proj, Int8Linear)
    assert isinstance(fast.lm_head, Int8Linear) and fast.lm_head.dynamic
    assert isinstance(fast.embed_tokens, StoredEmbedding) and fast.embed_tokens.weight.dtype == torch.bfloat16
    assert fast.dtype == torch.float32 and layer.mlp.router.weight.dtype == torch.float32
    reference = load_model(published, keep_mxfp4=False, quantization="none")  # dense float32
    assert isinstance(reference.lm_head, torch.nn.Linear) and not isinstance(
        reference.layers[0].mlp.experts, MXFP4Experts
    )
    with torch.no_grad():
        got, expected = fast(IDS).logits, reference(IDS).logits
    # int8 weights (relative step 1/254 of a row's largest value) and int8 activations per block, through two
    # layers: logits within a few percent of the float32 model's range, and the same top token almost everywhere.
    assert ((got - expected).abs().max() / expected.abs().max()) < 5e-2
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_cached_greedy_decoding_equals_the_fast_paths_own_full_forward(published):
    fast = load_model(published)
    with torch.no_grad():
        out = generate(fast, IDS[:, :10], max_new_tokens=8)
        full = fast(out[:, :-1]).logits
    assert torch.equal(out[0, 10:], full[0, 9:].argmax(-1))


def test_packed_experts_reference_and_native_agree(published):
    """The same packed model, experts run by the native kernel ("sorted") and by dequantizing ("loop")."""
    from ossgpt.options import RuntimeOptions

    model = load_model(published, quantization="none")
    assert isinstance(model.layers[0].mlp.experts, MXFP4Experts)
    with torch.no_grad():
        fast = model(IDS).logits
        model.options = RuntimeOptions(experts="loop")
        exact = model(IDS).logits
    assert ((fast - exact).abs().max() / exact.abs().max()) < 2e-2


# ------------------------------------------------------------------------------------------------------- memory
def test_memory_plan_of_gpt_oss_20b_in_closed_form():
    from ossgpt import GPTOSSConfig

    c = GPTOSSConfig.from_preset("gpt-oss-20b")
    H, I, E, L, V = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_hidden_layers, c.vocab_size  # noqa: E741
    packed = L * E * (2 * I * H + H * I) * 17 // 32  # 4 bits per weight + a scale byte per 32
    attention = L * H * c.head_dim * 2 * (c.num_attention_heads + c.num_key_value_heads)  # q and o, k and v
    plan = MemoryPlan.of(c, torch.float32, keep_mxfp4=True, quantization="int8-dynamic", embedding_dtype=torch.bfloat16)
    small = plan.steady - packed - attention - V * H - 2 * V * H  # int8 head and matrices, bf16 embedding
    assert 0 < small < 0.01 * plan.steady  # norms, biases, router, sinks, the sliding layers' windows
    assert plan.kv_per_token == 2 * (L // 2) * c.num_key_value_heads * c.head_dim * 4  # half the layers: full


def test_too_little_memory_is_one_line_naming_the_figure(monkeypatch, published):
    monkeypatch.setattr("ossgpt.inference.memory.available_memory", lambda: 10**6)
    with pytest.raises(UserError, match=r"needs about \d+\.\d GB of memory .* has 0\.0 GB available"):
        load_model(published)
    monkeypatch.setattr("ossgpt.inference.memory.available_memory", lambda: None)
    check_memory(MemoryPlan(steady=10**12, kv_per_token=1000), 100, "x")  # no figure known: no error
