"""The native attention of a decoding step (ossgpt.kernels.native.decode_attention, csrc/cpu_attention.cpp) against
the einsum reference in float64, and the decoding paths that take it.

The kernel computes in float32. With u = 2^-24, each output may differ from the exact attention by at most

    max|v| * (expm1(2 delta) + (2 (S + 1) + 111) u) + S 2^-126 max|v|

where delta bounds the error of any one score: a float32 dot product of D terms, then two roundings (the scale,
itself rounded to float32, and the product),
    delta = scale * (gamma_D + 2 u) * sum_d |q_d k_d|,    gamma_D = D u / (1 - D u).
Why: scores off by at most delta (the sink's logit is exact) change each normalised weight e^s / (e^sink + sum e^s)
by a factor within e^(+-2 delta), so the weighted mean of the values moves by at most expm1(2 delta) max|v|. The
exponential itself (range reduction and a degree-7 polynomial: ~20 roundings) adds 20 u relative, its argument
s - m (|s - m| <= 87 where it is not clamped) rounds by up to 87 u relative, the sums of S + 1 weights and of S
weighted values gamma_(S+1) each, the final scaling 4 u. Scores more than 87 below the maximum are taken as e^-87:
at most 2^-126 each. Nothing here is fitted to the kernel's results.
"""

import math

import pytest
import torch

from ossgpt.kernels import native as native_module
from ossgpt.kernels.attention import sdpa_attention
from ossgpt.kernels.native import INSTRUCTION_SETS, cpu_flags, decode_attention, native
from ossgpt.model.attention import allowed_keys, eager_attention
from ossgpt.model.cache import KVCache

needs_native = pytest.mark.skipif(native() is None, reason="the native CPU kernels could not be built here")
U = 2.0**-24


def attention_bound(q, k, v, visible, scale: float) -> torch.Tensor:
    """The module doc's bound for q [B, H, 1, D], k/v [B, K, S, D], visible [B|1, 1, 1, S] -> [B, H, 1, 1]."""
    B, H, _, D = q.shape
    S, G = k.shape[2], H // k.shape[1]
    gamma = D * U / (1 - D * U)
    kk = k.double().abs().repeat_interleave(G, dim=1)  # [B, H, S, D]
    terms = q.double().abs() @ kk.transpose(-1, -2)  # [B, H, 1, S]: sum_d |q_d k_d| per key
    delta = scale * (gamma + 2 * U) * terms.masked_fill(~visible, 0).amax(-1, keepdim=True)
    v_max = v.double().abs().amax(dim=(2, 3)).repeat_interleave(G, dim=1)[:, :, None, None]  # [B, H, 1, 1]
    return v_max * (torch.expm1(2 * delta) + (2 * (S + 1) + 111) * U + S * 2.0**-126)


def case_inputs(B, H, K, S, D, window, pads, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g) * q_scale
    k, v = torch.randn(B, K, S, D, generator=g), torch.randn(B, K, S, D, generator=g)
    sinks = torch.randn(H, generator=g)
    key_positions = torch.stack([torch.cat([torch.full((p,), -1), torch.arange(S - p)]) for p in pads])
    visible = allowed_keys(key_positions[:, -1:], key_positions, window)  # the newest column's query
    return q, k, v, sinks, visible


CASES = {
    # name: (B, H, K, S, D, window, left padding per row)
    "gpt-oss-heads": (2, 8, 1, 37, 64, None, (0, 5)),  # head_dim 64 (the compiled-in size); 37 = 4 * 8 + 5 keys
    "gqa-window": (3, 4, 2, 20, 64, 6, (0, 2, 19)),  # a row whose only key is its own
    "one-key": (1, 2, 2, 1, 64, None, (0,)),
    "odd-head-dim": (2, 6, 3, 13, 24, None, (0, 4)),  # any other head size: the run-time path
    "head-dim-32": (1, 4, 1, 9, 32, 4, (0,)),
    "fully-padded-row": (2, 4, 2, 8, 64, None, (0, 8)),  # no visible key: zeros, as the reference gives
}


@needs_native
@pytest.mark.parametrize("case", list(CASES))
def test_decode_attention_within_the_derived_bound(case):
    B, H, K, S, D, window, pads = CASES[case]
    q, k, v, sinks, visible = case_inputs(B, H, K, S, D, window, pads)
    scale = D**-0.5
    with torch.no_grad():
        out = decode_attention(q, k, v, sinks, visible, scale)
    exact = eager_attention(q.double(), k.double(), v.double(), sinks.double(), visible, scale)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert ((out.double() - exact).abs() <= attention_bound(q, k, v, visible, scale)).all()
    if case == "fully-padded-row":
        assert torch.equal(out[1], torch.zeros_like(out[1]))


@needs_native
def test_decode_attention_scores_far_apart():
    """Scores hundreds apart: most weights are below e^-87, where the kernel's exponential stops (the bound allows
    it), and the largest one takes almost everything."""
    q, k, v, sinks, visible = case_inputs(2, 4, 2, 50, 64, None, (0, 3), seed=1, q_scale=60.0)
    with torch.no_grad():
        out = decode_attention(q, k, v, sinks, visible, 0.125)
    exact = eager_attention(q.double(), k.double(), v.double(), sinks.double(), visible, 0.125)
    assert ((out.double() - exact).abs() <= attention_bound(q, k, v, visible, 0.125)).all()


@needs_native
def test_decode_attention_over_a_cache_view_and_alone_equals_in_a_batch():
    """Over views of a cache's rows and columns (strided, as the serving engine narrows its cache), the same as over
    contiguous copies; and each row of a batch bit-identical to that row decoded alone."""
    B, H, K, S, D = 4, 8, 2, 30, 64
    q, k, v, sinks, visible = case_inputs(B, H, K, S, D, None, (0, 1, 7, 2), seed=2)
    cache_k, cache_v = torch.randn(B + 2, K, S + 9, D), torch.randn(B + 2, K, S + 9, D)
    cache_k[1 : B + 1, :, :S], cache_v[1 : B + 1, :, :S] = k, v
    view_k, view_v = cache_k[1 : B + 1, :, :S], cache_v[1 : B + 1, :, :S]
    assert not view_k.is_contiguous()
    with torch.no_grad():
        batch = decode_attention(q, view_k, view_v, sinks, visible, 0.125)
        assert torch.equal(batch, decode_attention(q, k, v, sinks, visible, 0.125))
        for row in range(B):
            alone = decode_attention(q[row : row + 1], k[row : row + 1], v[row : row + 1], sinks,
                                     visible[row : row + 1], 0.125)  # fmt: skip
            assert torch.equal(alone, batch[row : row + 1])


@needs_native
def test_sdpa_attention_takes_it_for_a_decoding_step_only():
    """sdpa_attention: one query per row, no gradients, float32 on the CPU -> the native kernel; anything else ->
    None from decode_attention, and the flash path."""
    q, k, v, sinks, visible = case_inputs(2, 4, 2, 11, 64, None, (0, 3), seed=4)
    with torch.no_grad():
        native_out = decode_attention(q, k, v, sinks, visible, 0.125)
        assert torch.equal(sdpa_attention(q, k, v, sinks, visible, 0.125), native_out)
        assert decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), sinks, visible, 0.125) is None
        spread_k, spread_v = (torch.stack([t, t], dim=-1).flatten(-2)[..., ::2] for t in (k, v))  # rows not contiguous
        assert torch.equal(spread_k, k) and spread_k.stride(-1) == 2
        assert decode_attention(q, spread_k, spread_v, sinks, visible, 0.125) is None
        flash = sdpa_attention(q, spread_k, spread_v, sinks, visible, 0.125)
        torch.testing.assert_close(flash, native_out, rtol=1e-5, atol=1e-5)
        two = torch.cat([q, q], dim=2)
        assert decode_attention(two, k, v, sinks, visible.expand(2, 1, 2, 11), 0.125) is None
    assert decode_attention(q.requires_grad_(), k, v, sinks, visible, 0.125) is None  # gradients wanted


@needs_native
def test_cached_decoding_through_it_equals_the_full_forward():
    """A tiny model decoding token by token (the native kernel at each step, sliding and full layers, left padding)
    gives the logits of its own full forward over the same tokens (the flash kernel), up to float32 rounding."""
    from ossgpt import GPTOSSConfig, GPTOSSForCausalLM

    torch.manual_seed(0)
    config = GPTOSSConfig.from_preset("tiny", vocab_size=300, eos_token_id=0, sliding_window=5, head_dim=64)
    model = GPTOSSForCausalLM(config).eval()
    ids = torch.randint(1, 300, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, -1)
    with torch.no_grad():
        full = model(ids, positions=positions).logits
        cache = KVCache(config, 2, 12)
        steps = []
        for t in range(12):
            out = model(ids[:, t : t + 1], positions=positions[:, t : t + 1], cache=cache).logits
            steps.append(out)
    stepped = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], rtol=1e-4, atol=1e-4)


LESSER = [name for name in list(INSTRUCTION_SETS)[1:] if set(INSTRUCTION_SETS[name][0]) <= cpu_flags()]


@needs_native
@pytest.mark.parametrize("isa", LESSER[-2:])  # AVX2 and plain C++
def test_lesser_instruction_sets_within_the_bound(isa, monkeypatch):
    monkeypatch.setenv("OSSGPT_NATIVE", isa)
    native_module.native.cache_clear()
    try:
        module = native()
        for case in ("gpt-oss-heads", "odd-head-dim"):
            B, H, K, S, D, window, pads = CASES[case]
            q, k, v, sinks, visible = case_inputs(B, H, K, S, D, window, pads)
            out = module.decode_attention(q, k, v, sinks, visible, D**-0.5)
            exact = eager_attention(q.double(), k.double(), v.double(), sinks.double(), visible, D**-0.5)
            assert ((out.double() - exact).abs() <= attention_bound(q, k, v, visible, D**-0.5)).all()
    finally:
        native_module.native.cache_clear()


def test_bound_is_tight_enough_to_catch_a_missing_sink():
    """The bound is not vacuous: leaving the sink out of the softmax (a plausible bug) exceeds it."""
    B, H, K, S, D, window, pads = CASES["gpt-oss-heads"]
    q, k, v, sinks, visible = case_inputs(B, H, K, S, D, window, pads)
    exact = eager_attention(q.double(), k.double(), v.double(), sinks.double(), visible, 0.125)
    no_sink = torch.full_like(sinks, -math.inf).double()  # e^sink = 0: the sink takes no weight
    no_sink = eager_attention(q.double(), k.double(), v.double(), no_sink, visible, 0.125)
    assert ((no_sink - exact).abs() > attention_bound(q, k, v, visible, 0.125)).any()
