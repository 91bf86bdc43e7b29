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

import functools

import pytest
import torch

from ossgpt.errors import UserError
from ossgpt.inference.generate import generate
from ossgpt.inference.loading import load_model
from ossgpt.inference.memory import MemoryPlan, check_memory
from ossgpt.kernels import native as native_module
from ossgpt.kernels.int8 import int8_dynamic_linear, quantize_int8
from ossgpt.kernels.mxfp4 import dequantize, mxfp4_linear
from ossgpt.kernels.native import FUSED_EXPERTS_TOKENS, INSTRUCTION_SETS, cpu_flags, native, pick_instruction_set
from ossgpt.quant.int8 import Int8Experts, Int8Linear, StoredEmbedding
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
    fp4 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
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
def test_linear_kernels_take_leading_dimensions_as_rows():
    """x [B, T, K] goes through the kernels as it is (no reshape around the call): each row's result is the one it
    gets in a [rows, K] matrix, bit for bit, and the output keeps x's leading dimensions."""
    g = torch.Generator().manual_seed(11)
    blocks, scales = random_mxfp4(40, 64, g)
    q, s = quantize_int8(torch.randn(40, 64, generator=g), block=32)
    bias = torch.randn(40, generator=g)
    x = torch.randn(2, 3, 64, generator=g)
    for product in (lambda x: mxfp4_linear(x, blocks, scales, bias), lambda x: int8_dynamic_linear(x, q, s, bias)):
        out = product(x)
        assert out.shape == (2, 3, 40)
        assert torch.equal(out.view(6, 40), product(x.view(6, 64)))


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 9, 40)])  # scales' shape [..., G]
def test_mxfp4_dequantize_is_the_format_exactly(dtype, shape, monkeypatch):
    """The native dequantization (into a new tensor and into `out`) against the format's definition in float64: bit
    for bit, for every byte and every exponent from 0x00 (2^-127) to 0xFE (2^127; 6 * 2^127 overflows to inf, as
    float64's value does when rounded). Exponent 0xFF (inf, and NaN for code 0) as the pure-PyTorch lookup gives it."""
    g = torch.Generator().manual_seed(len(shape))
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 255, shape, dtype=torch.uint8, generator=g)
    scales.view(-1)[: min(255, scales.numel())] = torch.arange(min(255, scales.numel()), dtype=torch.uint8)
    blocks.view(-1)[: min(256, blocks.numel())] = torch.arange(min(256, blocks.numel()), dtype=torch.uint8)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    expected = dequantize64(blocks, scales).to(dtype)
    out = torch.empty(expected.shape, dtype=dtype)
    assert dequantize(blocks, scales, dtype, out=out) is out
    assert torch.equal(out.view(bits), expected.view(bits))
    assert torch.equal(dequantize(blocks, scales, dtype).view(bits), expected.view(bits))

    scales.view(-1)[::2] = 0xFF
    got = dequantize(blocks, scales, dtype)
    monkeypatch.setattr("ossgpt.kernels.mxfp4.native", lambda: None)
    torch.testing.assert_close(got, dequantize(blocks, scales, dtype), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="contiguous"):
        dequantize(blocks, scales, dtype, out=torch.empty(expected.shape, dtype=torch.float16))


@needs_native
def test_int8_row_scales_are_read_as_bfloat16_or_float32():
    """quantize_int8's bfloat16 row scales go into the kernels as they are stored (no conversion per call): the same
    outputs, bit for bit, as their float32 values (the conversion is exact), in the linear and the fused experts;
    another dtype or count is a one-line error."""
    g = torch.Generator().manual_seed(5)
    q, s = quantize_int8(torch.randn(45, 320, generator=g))
    assert s.dtype == torch.bfloat16
    for n in (1, 5, 8):
        x = torch.randn(n, 320, generator=g)
        assert torch.equal(kernels.int8_linear(x, q, s, None), kernels.int8_linear(x, q, s.float(), None))
    experts, _ = random_experts("int8", 64, 96, seed=5)
    x, indices, mix = torch.randn(6, 64, generator=g), torch.randint(0, 5, (6, 2)), torch.rand(6, 2, generator=g)
    weights = [experts.gate_up_qweight, experts.gate_up_scales, experts.gate_up_proj_bias, experts.down_qweight,
               experts.down_scales, experts.down_proj_bias]  # fmt: skip
    as_float = [w.float() if w.dtype == torch.bfloat16 else w for w in weights]
    assert experts.gate_up_scales.dtype == torch.bfloat16
    args = (experts.alpha, experts.limit)
    assert torch.equal(kernels.int8_experts(x, indices, mix, *weights, *args),
                       kernels.int8_experts(x, indices, mix, *as_float, *args))  # fmt: skip
    with pytest.raises(RuntimeError, match="row scales .O. must be contiguous float32 or bfloat16, 45 values"):
        kernels.int8_linear(x[:, :1].expand(-1, 320).contiguous(), q, s.half(), None)
    with pytest.raises(RuntimeError, match="45 values"):
        kernels.int8_linear(x[:, :1].expand(-1, 320).contiguous(), q, s[:44], None)


@needs_native
def test_mxfp4_linear_no_rows_and_bad_shapes():
    blocks, scales = random_mxfp4(8, 64, torch.Generator().manual_seed(0))
    assert mxfp4_linear(torch.empty(0, 64), blocks, scales).shape == (0, 8)
    assert mxfp4_linear(torch.randn(2, 3, 64), blocks, scales).shape == (2, 3, 8)
    with pytest.raises(RuntimeError, match="columns"):
        kernels.mxfp4_linear(torch.randn(2, 32), blocks, scales, None)
    with pytest.raises(RuntimeError, match="contiguous uint8"):
        kernels.mxfp4_linear(torch.randn(2, 64), blocks.transpose(0, 1), scales, None)


def int8_weight64(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """int8 rows [O, K] times their scales ([O] per row, or [O, K / 32] per block of 32), in float64."""
    if s.dim() == 1:
        return q.double() * s.double()[:, None]
    return (q.double().view(q.shape[0], -1, 32) * s.double()[..., None]).flatten(1)


@needs_native
@pytest.mark.parametrize("block", [None, 32], ids=["row scales", "block scales"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8, 11, 17])
def test_int8_linear_within_the_activation_rounding_bound(n, block):
    """(Row scales on AVX-512: 16 weight rows per register, activation rows 8, 4, 2 or 1 at a time; O = 45 leaves a
    group of 13 rows.)"""
    g = torch.Generator().manual_seed(n)
    O, K = 45, 320  # noqa: E741
    q, s = quantize_int8(torch.randn(O, K, generator=g), block=block)
    x = torch.randn(n, K, generator=g)
    bias = torch.randn(O, generator=g)
    w = int8_weight64(q, s)
    got = int8_dynamic_linear(x, q, s, bias)
    exact = x.double() @ w.T + bias.double()
    assert ((got.double() - exact).abs() <= rounding_bound(x, w) + 2**-24 * exact.abs()).all()


@needs_native
def test_int8_block_scales_extreme_and_zero_blocks():
    """Blocks of one row 2^-60 to 2^60 apart and all-zero blocks: each block keeps its own step (a scale per row
    would round the small blocks to zero), within the same bound; rows batched equal rows alone, bit for bit."""
    g = torch.Generator().manual_seed(5)
    O, K = 21, 640  # noqa: E741
    magnitudes = torch.exp2(torch.randint(-60, 61, (O, K // 32, 1), generator=g).float())
    weight = (torch.randn(O, K // 32, 32, generator=g) * magnitudes).flatten(1)
    weight[3, 64:96] = 0
    q, s = quantize_int8(weight, block=32)
    assert q[3, 64:96].eq(0).all() and q.abs().amax(1).eq(127).all()
    w = int8_weight64(q, s)
    steps = s.double().repeat_interleave(32, dim=1)
    largest = weight.double().abs().view(O, -1, 32).amax(-1).repeat_interleave(32, dim=1)
    assert ((w - weight.double()).abs() <= steps / 2 * (1 + 1e-6)).all()
    assert (steps[largest > 0] <= largest[largest > 0] / 127 * (1 + 2**-8)).all()  # each block its own step
    x = torch.randn(5, K, generator=g)
    got = int8_dynamic_linear(x, q, s)
    exact = x.double() @ w.T
    assert ((got.double() - exact).abs() <= rounding_bound(x, w) + 2**-24 * exact.abs()).all()
    for t in range(5):
        assert torch.equal(int8_dynamic_linear(x[t : t + 1], q, s), got[t : t + 1])


def random_product(kind: str, O: int, K: int, generator):  # noqa: E741
    """A random MXFP4 or int8 (row scales, W8A8) product with a bias: x [n, K] -> [n, O]."""
    bias = torch.randn(O, generator=generator)
    if kind == "mxfp4":
        blocks, scales = random_mxfp4(O, K, generator, exponents=(100, 140))
        return functools.partial(mxfp4_linear, blocks=blocks, scales=scales, bias=bias)
    q, s = quantize_int8(torch.randn(O, K, generator=generator))
    return functools.partial(int8_dynamic_linear, weight=q, scales=s, bias=bias)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("K", [64, 96, 2880])
@pytest.mark.parametrize("kind", ["int8 row scales", "mxfp4"])
def test_batch_rows_equal_rows_alone(kind, K, threads):
    """Every row of a batch is bit-identical to the same row computed alone, whatever the batch size: each block's
    integer sum is exact however the rows are grouped (AVX-512, int8 with row scales and MXFP4's `mxfp4_linear`:
    transposed weights for 2 rows or more, a lane tree for one), then scaled and added in the same order. Row
    counts that leave partial groups of 16 weight rows (and, at K = 2880 on 2 threads, each thread's share starting
    inside one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(K + threads)
        for O in (1, 15, 16, 37):  # noqa: E741
            product = random_product(kind, O, K, g)
            x = torch.randn(19, K, generator=g) * torch.exp2(torch.randint(-8, 9, (19, 1), generator=g).float())
            alone = torch.cat([product(x[t : t + 1]) for t in range(19)])
            for n in (2, 3, 4, 5, 8, 9, 12, 19):
                assert torch.equal(product(x[:n]), alone[:n]), (O, n)
    finally:
        torch.set_num_threads(previous)


def test_int8_linear_takes_block_scales_where_the_native_kernel_runs(monkeypatch):
    """W8A8 on the CPU with the kernels built, when asked (the attention projections): a scale per block of 32;
    weight-only, not asked (the LM head), or without the kernels: per row. `.weight` is what either holds."""
    linear = torch.nn.Linear(64, 24)
    assert Int8Linear(linear, scale_blocks=True).scales.shape == (24,)  # weight-only
    assert Int8Linear(linear, dynamic=True).scales.shape == (24,)
    if kernels is not None:
        blocks = Int8Linear(linear, dynamic=True, scale_blocks=True)
        assert blocks.scales.shape == (24, 2) and blocks.scales.dtype == torch.bfloat16
        assert torch.equal(blocks.weight, int8_weight64(blocks.qweight, blocks.scales).float())
    monkeypatch.setattr("ossgpt.quant.int8.block_scales_available", lambda device, width: False)
    assert Int8Linear(linear, dynamic=True, scale_blocks=True).scales.shape == (24,)


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
        qb, sb = quantize_int8(torch.randn(23, 2880, generator=g), block=32)
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
            w = int8_weight64(qb, sb)  # a scale per block of 32
            exact = x.double() @ w.T
            got = module.int8_linear(x, qb, sb, None).double()
            assert ((got - exact).abs() <= rounding_bound(x, w) + 2**-24 * exact.abs()).all()
        # The linear products' rows (a weight row per lane with AVX2 too): a batch's rows equal the rows alone.
        x = torch.randn(7, 2880, generator=g)
        for product in (lambda x: module.mxfp4_linear(x, blocks, scales, None),
                        lambda x: module.int8_linear(x, q, s, None)):  # fmt: skip
            batch = product(x)
            assert all(torch.equal(product(x[t : t + 1]), batch[t : t + 1]) for t in range(7))
        for kind in ("mxfp4", "int8"):  # the fused experts too (what decoding runs)
            experts, dense = random_experts(kind, 64, 96, seed=3)
            x, indices, mix = (
                torch.randn(5, 64, generator=g),
                torch.tensor([[0, 1, 2], [4, 3, 0]] * 2 + [[1, 2, 4]]),
                torch.rand(5, 3, generator=g),
            )
            with torch.no_grad():
                fused = experts(x, indices, mix)
            expected, bound = experts_reference(experts, dense, x, indices, mix)
            assert ((fused.double() - expected).abs() <= bound).all()
    finally:
        native_module.native.cache_clear()


def random_experts(kind: str, hidden: int, width: int, seed: int):
    """5 experts, MXFP4 (random codes and exponents) or int8 W8A8 (quantized from random float weights), with
    random biases; and their float64 weights: gate_up [5, 2I, H], down [5, H, I]."""
    from ossgpt import GPTOSSConfig
    from ossgpt.model.moe import Experts

    config = GPTOSSConfig(vocab_size=64, eos_token_id=0, hidden_size=hidden, intermediate_size=width,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          num_local_experts=5, num_experts_per_tok=3)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    if kind == "mxfp4":
        experts = MXFP4Experts(config)
        # Exponents 121..124: weights of about +-0.1, for activations of about +-1 like a trained layer's.
        gate_up = random_mxfp4(5 * 2 * width, hidden, g, (121, 125))
        down = random_mxfp4(5 * hidden, width, g, (121, 125))
        experts.gate_up_proj_blocks = gate_up[0].view(5, 2 * width, hidden // 32, 16)
        experts.gate_up_proj_scales = gate_up[1].view(5, 2 * width, hidden // 32)
        experts.down_proj_blocks = down[0].view(5, hidden, width // 32, 16)
        experts.down_proj_scales = down[1].view(5, hidden, width // 32)
        weights = (dequantize64(experts.gate_up_proj_blocks, experts.gate_up_proj_scales),
                   dequantize64(experts.down_proj_blocks, experts.down_proj_scales))  # fmt: skip
    else:
        dense = Experts(config)
        with torch.no_grad():
            dense.gate_up_proj.normal_(0, 0.15, generator=g), dense.down_proj.normal_(0, 0.15, generator=g)
        experts = Int8Experts(dense, config, dynamic=True)
        stored = ((experts.gate_up_qweight, experts.gate_up_scales), (experts.down_qweight, experts.down_scales))
        weights = tuple(q.double() * s.double()[..., None] for q, s in stored)
    experts.gate_up_proj_bias = torch.nn.Parameter(torch.randn(5, 2 * width, generator=g), requires_grad=False)
    experts.down_proj_bias = torch.nn.Parameter(torch.randn(5, hidden, generator=g), requires_grad=False)
    return experts, weights


def kernel_rounding(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows v [n, K] rounded as the kernels round activations (csrc/cpu_q8.cpp, `quantize_row`, in float32: step
    d = max|block| / 127, codes round(v * 127 / max|block|), ties to even) -> (codes times steps [n, K], the
    unrounded codes v * 127 / max|block| [n, K]), in float64."""
    blocks = v.float().reshape(v.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    scaled = (blocks * inverse).clamp(-127, 127)
    return (scaled.round().double() * (amax / 127).double()).flatten(1), scaled.double().flatten(1)


def experts_reference(experts, dense, x, indices, mix):
    """What the fused kernel computes, in float64 from the dequantized weights `dense` (gate_up [E, 2I, H], down
    [E, H, I]) -> (expected [N, H], bound [N, H]): each token rounded as the kernel rounds it (`kernel_rounding`),
    gate_up, the clamped SwiGLU, the activations rounded the same way, down, mixed. The kernel differs from this by
    float32 arithmetic only:
      1. gate_up's float32 sums: eg <= (G + 8) 2^-24 sum|terms| + 2 2^-24 |g| (as `rounding_bound`);
      2. through the SwiGLU: dh <= (|gate| + eg) eg_up + (|up| + eg_up + 1)(1 + alpha (|gate| + eg) / 4) eg_gate
         (its derivatives' bounds) + 16 ulps of (|up| + 1) |gate| for its float32 evaluation;
      3. the activations' rounding sees h + dh: a code may move by one where h's unrounded code is within its
         own error of a half-integer, and every step by at most max dh / 127 (plus its own rounding);
      4. down's float32 sums as in 1, and the mix's (k terms)."""
    alpha, limit = experts.alpha, experts.limit
    gate_up_w, down_w = dense
    N, k = indices.shape
    expected = torch.zeros(N, x.shape[1], dtype=torch.float64)
    bound = torch.zeros_like(expected)
    ulp = 2.0**-24
    for t, s in ((t, s) for t in range(N) for s in range(k)):
        e, w = int(indices[t, s]), float(mix[t, s])
        xq, _ = kernel_rounding(x[t : t + 1])
        g = xq @ gate_up_w[e].T + experts.gate_up_proj_bias[e].double()
        eg = (x.shape[1] // 32 + 8) * ulp * (xq.abs() @ gate_up_w[e].abs().T) + 2 * ulp * g.abs()
        gate, up, e_gate, e_up = g[:, ::2].clamp(max=limit), g[:, 1::2].clamp(-limit, limit), eg[:, ::2], eg[:, 1::2]
        h = (up + 1) * gate * torch.sigmoid(alpha * gate)
        dh = (gate.abs() + e_gate) * e_up + (up.abs() + e_up + 1) * (1 + alpha * (gate.abs() + e_gate) / 4) * e_gate
        dh += 16 * ulp * (up.abs() + 1) * gate.abs()
        hq, scaled = kernel_rounding(h)
        G = h.shape[1] // 32
        amax = h.abs().view(1, G, 32).amax(-1).repeat_interleave(32, 1)
        d_amax = dh.view(1, G, 32).amax(-1).repeat_interleave(32, 1)
        step = (amax + d_amax) / 127 * (1 + ulp)
        # How far the kernel's unrounded code may be from `scaled`: its own h's error, and its step's.
        d_scaled = dh * 127 / (amax - d_amax).clamp(min=1e-300) + scaled.abs() * (d_amax / amax + 2 * ulp) + 127 * ulp
        near_half = ((scaled - scaled.floor() - 0.5).abs() <= d_scaled).double()
        d_value = near_half * step + scaled.round().abs() * (d_amax / 127 + ulp * amax / 127)
        out = hq @ down_w[e].T + experts.down_proj_bias[e].double()
        e_out = d_value @ down_w[e].abs().T
        e_out += (G + 8) * ulp * ((hq.abs() + d_value) @ down_w[e].abs().T) + 2 * ulp * out.abs()
        expected[t] += w * out[0]
        bound[t] += abs(w) * (e_out[0] + k * ulp * out[0].abs())
    return expected, bound


@needs_native
@pytest.mark.parametrize("kind", ["mxfp4", "int8"])
@pytest.mark.parametrize("hidden, width", [(64, 96), (96, 64)])  # even and odd block counts on either side
@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_fused_experts_within_the_derived_bound(kind, hidden, width, n):
    """Tokens through their experts in one native call (`fused_experts`, what the modules run for a few tokens)
    against the float64 reference of the same roundings, within its derived bound; expert 3 gets no token."""
    experts, dense = random_experts(kind, hidden, width, seed=hidden + n)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, hidden, generator=g)
    indices = torch.stack([torch.tensor([0, 1, 2, 4])[torch.randperm(4, generator=g)[:3]] for _ in range(n)])
    mix = torch.rand(n, 3, generator=g).softmax(-1)
    with torch.no_grad():
        fused = experts(x, indices, mix)
    exact, bound = experts_reference(experts, dense, x, indices, mix)
    assert fused.shape == (n, hidden) and fused.dtype == torch.float32
    assert ((fused.double() - exact).abs() <= bound).all()
    # Not vacuous: float32's error, plus one code's step where a rounding may tip; the activations' int8 rounding
    # itself (what the reference reproduces) would be a bound as large as the result here.
    assert bound.max() < 1e-2 * exact.abs().max()


@needs_native
@pytest.mark.parametrize("kind", ["mxfp4", "int8"])
def test_fused_experts_of_a_batch_equal_one_token_at_a_time_and_the_loop(kind):
    """Each row of a batched call is bit-identical to that token's call alone (sorting the pairs by expert and
    tiling the tokens change no sum), and close to the per-expert loop of native products: they differ only where
    an activation's float rounding (std::exp against torch's sigmoid) tips its int8 rounding, one step of one value.
    Past FUSED_EXPERTS_TOKENS tokens the module takes the loop itself."""
    experts, _ = random_experts(kind, 64, 96, seed=7)
    g = torch.Generator().manual_seed(1)
    n = FUSED_EXPERTS_TOKENS + 1
    x = torch.randn(n, 64, generator=g) * 4
    indices = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(n)])
    mix = torch.rand(n, 3, generator=g).softmax(-1)
    with torch.no_grad():
        batched = experts(x[:9], indices[:9], mix[:9])
        for t in range(9):
            assert torch.equal(batched[t : t + 1], experts(x[t : t + 1], indices[t : t + 1], mix[t : t + 1]))
        looped = experts.loop(x[:9], indices[:9], mix[:9])
        assert ((batched - looped).abs().max() / looped.abs().max()) < 1e-3
        assert torch.equal(experts(x, indices, mix), experts.loop(x, indices, mix))  # too many tokens: the loop


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
    assert isinstance(layer.mlp.experts, MXFP4Experts) and isinstance(layer.self_attn.qkv_proj, Int8Linear)
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
    per_weight = 1 + 2 / 32 if kernels is not None else 1  # int8, and a bfloat16 scale per 32 (with the kernels)
    small = plan.steady - packed - per_weight * attention - V * H - 2 * V * H  # int8 matrices and head, bf16 table
    assert 0 < small < 0.01 * plan.steady  # norms, biases, router, sinks, the sliding layers' windows
    assert plan.kv_per_token == 2 * (L // 2) * c.num_key_value_heads * c.head_dim * 4  # half the layers: full


def test_too_little_memory_is_one_line_naming_the_figure(monkeypatch, published):
    monkeypatch.setattr("ossgpt.inference.memory.available_memory", lambda: 10**6)
    with pytest.raises(UserError, match=r"needs about \d+\.\d GB of memory .* has 0\.0 GB available"):
        load_model(published)
    monkeypatch.setattr("ossgpt.inference.memory.available_memory", lambda: None)
    check_memory(MemoryPlan(steady=10**12, kv_per_token=1000), 100, "x")  # no figure known: no error
