"""The native element-wise steps (ossgpt.kernels.native.rms_norm, rotary, visible_keys; csrc/cpu_elementwise.cpp)
against the model's formulas in float64, and the model paths that take them.

Error bounds, with u = 2^-24 (float32's unit roundoff); nothing here is fitted to the kernels' results:

  * RMSNorm of a row of D values: the sum of squares, in any order, is within gamma_D = D u / (1 - D u) of its
    value (relative: every term is positive); the mean, + eps, the square root (which halves a relative error),
    the reciprocal, x * inv and weight * (.) add at most 6 roundings more. So each output is within
    (gamma_D / 2 + 7 u) |exact| of the float64 formula.
  * Rotary: each output is a * b - c * d (or + ), two products and a sum of float32 values, with or without a
    fused multiply-add: within 2 u (|a b| + |c d|) + u^2 terms of the exact value.
  * The visibility mask is integer comparisons: equal to the torch ops' mask.
"""

import pytest
import torch

from ossgpt.kernels import native as native_module
from ossgpt.kernels.native import INSTRUCTION_SETS, cpu_flags, native, rms_norm, rotary, visible_keys
from ossgpt.model.attention import allowed_keys, allowed_keys_reference
from ossgpt.model.norms import RMSNorm, rms_norm_reference
from ossgpt.model.rope import apply_rotary, rotary_reference

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
        with torch.no_grad():
            exact, bound = rotary_exact_and_bound(x, cos, sin)
            assert ((apply_rotary(x, cos, sin).double() - exact).abs() <= bound).all()
            assert torch.equal(allowed_keys(positions, positions, 2), allowed_keys_reference(positions, positions, 2))
    finally:
        native_module.native.cache_clear()
