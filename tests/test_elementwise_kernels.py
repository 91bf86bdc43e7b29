"""The native element-wise steps (ossgpt.kernels.native.rms_norm, rotary, rotary_table, visible_keys, top_k_softmax,
write_kv; csrc/cpu_elementwise.cpp) against the model's formulas in float64 (the cache's writes: against its torch
index), and the model paths that take them.

Error bounds, with u = 2^-24 (float32's unit roundoff); nothing here is fitted to the kernels' results:

  * RMSNorm of a row of D values: the sum of squares, in any order, is within gamma_D = D u / (1 - D u) of its
    value (relative: every term is positive); the mean, + eps, the square root (which halves a relative error),
    the reciprocal, x * inv and weight * (.) add at most 6 roundings more. So each output is within
    (gamma_D / 2 + 7 u) |exact| of the float64 formula.
  * Rotary: each output is a * b - c * d (or + ), two products and a sum of float32 values, with or without a
    fused multiply-add: within 2 u (|a b| + |c d|) + u^2 terms of the exact value.
  * Rotary tables: the angle is the float32 product position * inv_freq in both paths; its cosine and sine within
    1 ulp (glibc's and Sleef's documented maximum errors), <= 2 u of the value, then times the scaling (u more):
    within 4 u |exact| of the float64 cosine of that angle, times the scaling.
  * Router top-k softmax: each exp within 1 ulp (2 u relative), the sum of k positive terms adds k - 1 roundings,
    the quotient one: within (5 + k) u |exact| of the float64 softmax over the same k logits. The indices are the
    float64 top k where no two logits tie (the test's logits are distinct).
  * The visibility mask is integer comparisons: equal to the torch ops' mask. The cache's writes copy values:
    equal to the torch index's.
"""

import pytest
import torch

from ossgpt import GPTOSSConfig
from ossgpt.kernels import native as native_module
from ossgpt.kernels.native import (
    INSTRUCTION_SETS,
    cpu_flags,
    native,
    rms_norm,
    rotary,
    rotary_table,
    top_k_softmax,
    visible_keys,
)
from ossgpt.model.attention import allowed_keys, allowed_keys_reference
from ossgpt.model.cache import LayerKVCache
from ossgpt.model.moe import Router
from ossgpt.model.norms import RMSNorm, rms_norm_reference
from ossgpt.model.rope import RotaryEmbedding, apply_rotary, rotary_reference

needs_native = pytest.mark.skipif(native() is None, reason="the native CPU kernels could not be built here")
U = 2.0**-24


def rms_norm_exact(x, weight, eps):
    x = x.double()
    return weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_bound(exact, D):
    gamma = D * U / (1 - D * U)
    return (gamma / 2 + 7 * U) * exact.abs()


def rotary_exact_and_bound(x, cos, sin):
    """The float64 rotation of x [B, H, T, D] by float32 cos/sin, and the bound on a float32 computation of it."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos.double(), sin.double()
    exact = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    magnitude = torch.cat(((x1 * c).abs() + (x2 * s).abs(), (x2 * c).abs() + (x1 * s).abs()), dim=-1)
    return exact, (2 * U + U * U) * magnitude


@needs_native
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 2880), (7, 33), (2, 1)])
def test_rms_norm_within_the_bound(shape):
    g = torch.Generator().manual_seed(sum(shape))
    D = shape[-1]
    x = torch.randn(shape, generator=g) * 10 ** torch.empty(*shape[:-1], 1).uniform_(-3, 3, generator=g)  # row scales
    weight = torch.randn(D, generator=g)
    with torch.no_grad():
        out = rms_norm(x, weight, 1e-5)
    exact = rms_norm_exact(x, weight, 1e-5)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert ((out.double() - exact).abs() <= rms_norm_bound(exact, D)).all()


@needs_native
def test_rms_norm_eps_counts_for_tiny_rows():
    """Rows far below sqrt(eps): eps sets the scale, so a kernel that dropped or misplaced it would be far off."""
    x = torch.full((2, 64), 1e-4)
    x[1] = -3e-3
    weight = torch.linspace(0.5, 2, 64)
    with torch.no_grad():
        out = rms_norm(x, weight, 1e-5)
    exact = rms_norm_exact(x, weight, 1e-5)
    assert ((out.double() - exact).abs() <= rms_norm_bound(exact, 64)).all()


@needs_native
def test_rms_norm_module_takes_it_without_gradients_only():
    """RMSNorm: the native call without gradients, torch's fused kernel with them; both within the bound."""
    torch.manual_seed(0)
    norm = RMSNorm(96)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 3, 96)
    exact = rms_norm_exact(x, norm.weight.detach(), norm.eps)
    with torch.no_grad():
        fast = norm(x)
    assert torch.equal(fast, rms_norm(x, norm.weight.detach(), norm.eps))
    trained = norm(x)  # gradients wanted: torch's kernel
    assert trained.requires_grad and rms_norm(x, norm.weight, norm.eps) is None
    for out in (fast, trained.detach(), rms_norm_reference(x, norm.weight.detach(), norm.eps)):
        assert ((out.double() - exact).abs() <= rms_norm_bound(exact, 96)).all()


@needs_native
@pytest.mark.parametrize("per_row", [False, True], ids=["shared positions", "per-row positions"])
@pytest.mark.parametrize("B,H,T,D", [(1, 8, 1, 64), (2, 3, 5, 6), (3, 64, 2, 64)])
def test_rotary_within_the_bound(B, H, T, D, per_row):
    """x as the attention hands it over: the heads of a projection's output, [B, T, H, D] transposed (strided)."""
    g = torch.Generator().manual_seed(B * 100 + T)
    x = (torch.randn(B, T, H, D, generator=g) * 30).transpose(1, 2)
    angles = torch.rand((B, T, D // 2) if per_row else (T, D // 2), generator=g) * 1000
    cos, sin = angles.cos(), angles.sin()
    with torch.no_grad():
        out = rotary(x, cos, sin)
        plain = rotary_reference(x, cos, sin)  # the torch ops
    exact, bound = rotary_exact_and_bound(x, cos, sin)
    assert out.shape == (B, H, T, D) and out.is_contiguous()
    assert ((out.double() - exact).abs() <= bound).all()
    assert ((plain.double() - exact).abs() <= bound).all()


@needs_native
def test_rotary_dispatch():
    x = torch.randn(1, 2, 3, 8)
    cos, sin = torch.rand(3, 4), torch.rand(3, 4)
    with torch.no_grad():
        assert torch.equal(apply_rotary(x, cos, sin), rotary(x, cos, sin))
        assert rotary(x.bfloat16(), cos, sin) is None
        assert rotary(x, torch.rand(2, 3, 4), torch.rand(2, 3, 4)) is None  # per-row angles for 2 rows of 1
    assert rotary(x.requires_grad_(), cos, sin) is None


@needs_native
@pytest.mark.parametrize("positions", [torch.arange(7), torch.tensor([[0, 5, 4095], [131071, 17, 0]])])
def test_rotary_table_within_the_bound(positions):
    """gpt-oss's YaRN frequencies, positions up to its 131,072-token context: the native table (what
    RotaryEmbedding gives in float32) and the torch ops (what it gives in float64: computed in float32, widened)."""
    config = GPTOSSConfig(head_dim=64, rope_theta=150000.0, rope_type="yarn", rope_factor=32.0)
    module = RotaryEmbedding(config)
    assert module.attention_scaling > 1
    cos, sin = rotary_table(positions, module.inv_freq, module.attention_scaling)
    assert cos.shape == (*positions.shape, 32) and cos.dtype == sin.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(module(positions, torch.float32), (cos, sin)))
    angles = (positions[..., None].float() * module.inv_freq).double()  # the float32 angle, as both paths round it
    exact = angles.cos() * module.attention_scaling, angles.sin() * module.attention_scaling
    for table in ((cos, sin), module(positions, torch.float64)):  # native; torch's (native declines float64 tables)
        for got, value in zip(table, exact):
            assert ((got.double() - value).abs() <= 4 * U * value.abs()).all()
    assert rotary_table(positions.float(), module.inv_freq, 1.0) is None


@needs_native
@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_softmax_within_the_bound(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(33, 32, generator=g) * 4
    weights, indices = top_k_softmax(logits, k)
    top, expected = logits.double().topk(k, dim=-1)
    assert torch.equal(indices, expected)
    exact = top.softmax(dim=-1)
    assert ((weights.double() - exact).abs() <= (5 + k) * U * exact).all()
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert top_k_softmax(ties, 2)[1].tolist() == [[1, 2]]  # of equal logits, the lower expert first


@needs_native
def test_router_takes_it_without_gradients_only():
    router = Router(GPTOSSConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=3))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(5, 16)
    with torch.no_grad():
        logits, weights, indices = router(x)
        native_weights, native_indices = top_k_softmax(logits, 3)
    assert torch.equal(weights, native_weights) and torch.equal(indices, native_indices)
    logits, weights, indices = router(x)  # gradients wanted: torch's topk and softmax
    assert weights.requires_grad and top_k_softmax(logits, 3) is None
    top, expected = logits.detach().topk(3, dim=-1)
    assert torch.equal(indices, expected)
    assert torch.equal(weights.detach(), top.softmax(-1))


@needs_native
@pytest.mark.parametrize("window", [None, 1, 3, 1000])
def test_visible_keys_equal_the_torch_ops(window):
    """Causal masks of a prompt (an expanded arange, as the model makes), of left-padded rows, and of a decoding
    step over a cache's columns (a strided view, empty slots -1)."""
    arange = torch.arange(6).expand(3, 6)
    padded = torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, 0, 1, 2, 3], [-1, -1, -1, -1, -1, 0]])
    cache = torch.full((3, 10), -1, dtype=torch.long)
    cache[:, :6] = padded
    step = padded[:, -1:] + 1
    cache[:, 6:7] = step
    for query, keys in ((arange, arange), (padded, padded), (step, cache[:, :8]), (step, cache)):
        got = visible_keys(query, keys, window)
        assert got.shape == (3, 1, query.shape[1], keys.shape[1])
        assert torch.equal(got, allowed_keys_reference(query, keys, window))
        assert torch.equal(allowed_keys(query, keys, window), got)


def cache_steps(ring: bool, dtype: torch.dtype, rows: slice | None):
    """A prompt of 5 columns, then 4 one-token steps at shared columns, then 3 at per-row columns, through a
    LayerKVCache of capacity 4 (a ring buffer) or 12 (a plain one), or through a view of some of its rows; ->
    everything each update returned, and the buffers at the end."""
    g = torch.Generator().manual_seed(7)
    cache = LayerKVCache(3, 2, 8, capacity=4 if ring else 12, ring=ring, device="cpu", dtype=dtype)
    view = cache if rows is None else cache.narrow(rows.start, rows.stop - rows.start, 12)
    B = view.keys.shape[0]
    returned = []

    def step(T, start, positions):
        # k, v as the attention hands them over: the heads of a projection's output, [B, T, K, D] transposed
        k, v = (torch.randn(B, T, 2, 8, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
        returned.extend(view.update(k, v, positions, start))

    step(5, 0, torch.tensor([[0, 1, 2, 3, 4], [-1, -1, 0, 1, 2], [-1, 0, 1, 2, 3]])[:B])
    for column in range(5, 9):
        step(1, column, torch.tensor([[column], [column - 2], [column - 1]])[:B])
    for offset in range(3):
        starts = torch.tensor([9, 8, 9])[:B] + offset
        step(1, starts, (starts - torch.tensor([0, 2, 1])[:B])[:, None])
    return returned + [cache.keys, cache.values, cache.positions]


@needs_native
@pytest.mark.parametrize("rows", [None, slice(1, 3)], ids=["whole cache", "a view of two rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ring", [False, True], ids=["plain", "ring"])
def test_kv_cache_writes_equal_the_torch_index(ring, dtype, rows, monkeypatch):
    """LayerKVCache.update through the native write and through its torch index: the same values in the same slots,
    the same tensors returned, for prompts (longer than a ring), shared and per-row columns, on views of rows."""
    with torch.no_grad():
        native_steps = cache_steps(ring, dtype, rows)
        monkeypatch.setattr(native_module, "write_kv", lambda *args: False)
        torch_steps = cache_steps(ring, dtype, rows)
    assert len(native_steps) == len(torch_steps)
    for got, expected in zip(native_steps, torch_steps):
        assert torch.equal(got, expected)


@needs_native
def test_kv_cache_write_declines_and_refuses():
    cache = LayerKVCache(1, 1, 4, capacity=3, ring=False, device="cpu", dtype=torch.float32)
    k = torch.ones(1, 1, 2, 4)
    positions = torch.tensor([[0, 1]])
    assert not native_module.write_kv(cache.keys, cache.values, cache.positions, k.double(), k.double(), positions, 0,
                                      False)  # fmt: skip
    assert not native_module.write_kv(cache.keys, cache.values, cache.positions, k.requires_grad_(), k, positions, 0,
                                      False)  # fmt: skip
    with pytest.raises(RuntimeError, match="KV cache full: 4 tokens exceed its capacity of 3"):
        native_module.write_kv(cache.keys, cache.values, cache.positions, k.detach(), k.detach(), positions,
                               torch.tensor([2]), False)  # fmt: skip


LESSER = [name for name in list(INSTRUCTION_SETS)[1:] if set(INSTRUCTION_SETS[name][0]) <= cpu_flags()]


@needs_native
@pytest.mark.parametrize("isa", LESSER[-2:])  # AVX2 and plain C++ (the builds test_native_kernels.py makes too)
def test_lesser_instruction_sets_within_the_bounds(isa, monkeypatch):
    monkeypatch.setenv("OSSGPT_NATIVE", isa)
    native_module.native.cache_clear()
    try:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(3, 2880, generator=g)
        weight = torch.randn(2880, generator=g)
        with torch.no_grad():
            out = rms_norm(x, weight, 1e-5)
        exact = rms_norm_exact(x, weight, 1e-5)
        assert ((out.double() - exact).abs() <= rms_norm_bound(exact, 2880)).all()
        x = torch.randn(2, 5, 8, 64, generator=g).transpose(1, 2)
        angles = torch.rand(5, 32, generator=g) * 100
        with torch.no_grad():
            out = rotary(x, angles.cos(), angles.sin())
        exact, bound = rotary_exact_and_bound(x, angles.cos(), angles.sin())
        assert ((out.double() - exact).abs() <= bound).all()
        positions = torch.tensor([[-1, 0, 1, 2, 3]])
        assert torch.equal(visible_keys(positions, positions, 2), allowed_keys_reference(positions, positions, 2))
    finally:
        native_module.native.cache_clear()


def test_tensors_on_another_device_never_build_the_kernels(monkeypatch):
    """A model on another device (a GPU; here the meta device, which is not the CPU either) takes its torch ops without
    the native module ever being asked for (so never built)."""

    def no_build():
        raise AssertionError("native() asked for tensors that are not on the CPU")

    monkeypatch.setattr(native_module, "native", no_build)
    meta = dict(device="meta")
    x, positions = torch.empty(1, 2, 1, 8, **meta), torch.zeros(1, 1, dtype=torch.long, **meta)
    assert rms_norm(x, torch.empty(8, **meta), 1e-5) is None
    assert rotary(x, torch.empty(1, 4, **meta), torch.empty(1, 4, **meta)) is None
    assert visible_keys(positions, positions, None) is None
    assert rotary_table(positions, torch.empty(4, **meta), 1.0) is None
    assert top_k_softmax(torch.empty(3, 4, **meta), 2) is None
    assert native_module.decode_attention(x, x, x, torch.empty(2, **meta), positions.bool()[:, None, None], 1.0) is None
    assert not native_module.write_kv(x, x, positions, x, x, positions, 0, False)
    assert native_module.fused_experts("int8_experts", torch.empty(1, 32, **meta), None, None, (torch.empty(1, 64),),
                                       (), 1.0, 1.0) is None  # fmt: skip


def test_without_the_native_kernels_the_torch_ops(monkeypatch):
    """OSSGPT_NATIVE=0: every wrapper says None and the model's functions compute with torch ops alone."""
    monkeypatch.setenv("OSSGPT_NATIVE", "0")
    native_module.native.cache_clear()
    try:
        x = torch.randn(1, 2, 3, 8)
        cos, sin = torch.rand(3, 4), torch.rand(3, 4)
        positions = torch.arange(3)[None]
        assert rms_norm(x, torch.ones(8), 1e-5) is None
        assert rotary(x, cos, sin) is None
        assert visible_keys(positions, positions, None) is None
        assert rotary_table(positions, torch.rand(4), 1.0) is None and top_k_softmax(torch.rand(3, 4), 2) is None
        cache = LayerKVCache(1, 2, 8, capacity=4, ring=False, device="cpu", dtype=torch.float32)
        assert not native_module.write_kv(cache.keys, cache.values, cache.positions, x, x, positions, 0, False)
        with torch.no_grad():
            keys, _, key_positions = cache.update(x, x, positions, 0)  # through the torch index
            assert torch.equal(keys, x) and torch.equal(key_positions, positions)
            exact, bound = rotary_exact_and_bound(x, cos, sin)
            assert ((apply_rotary(x, cos, sin).double() - exact).abs() <= bound).all()
            assert torch.equal(allowed_keys(positions, positions, 2), allowed_keys_reference(positions, positions, 2))
    finally:
        native_module.native.cache_clear()
