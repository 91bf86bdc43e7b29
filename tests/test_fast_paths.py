"""Every kernel of ossgpt.kernels against the plain computation of ossgpt.model it replaces: values and gradients.

  chunked linear cross-entropy      vs  F.linear + F.cross_entropy (and the model's two loss paths)
  CPU flash attention + LSE sinks   vs  eager einsum attention
  grouped_mm expert matmuls         vs  a loop over the experts' slices; sorted MoE vs the per-expert loop
  int8 weight-only decoding         vs  float matmuls with the same (dequantized) weights
  int8 dynamic (W8A8) LM head       vs  float64 products of the same integers, times the same scales
  input-major float32 weights       vs  the row-major model (logits; cached decoding vs its full forward)
and the benchmark script's smoke mode. Speed itself is measured by bench/run.py, never here.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM, RuntimeOptions
from ossgpt.inference.generate import generate
from ossgpt.inference.loading import hold_input_major
from ossgpt.kernels import attention as attention_kernels
from ossgpt.kernels import experts as expert_kernels
from ossgpt.kernels.attention import sdpa_attention
from ossgpt.kernels.experts import grouped_linear, grouped_mm_available
from ossgpt.kernels.int8 import int8_dynamic_linear, int8_mm_available, int_mm_available, quantize_int8, quantize_rows
from ossgpt.kernels.loss import linear_cross_entropy
from ossgpt.model import GPTOSS
from ossgpt.model.attention import allowed_keys, eager_attention
from ossgpt.model.cache import KVCache
from ossgpt.model.moe import Experts, MoE, load_balancing_loss, router_z_loss
from ossgpt.quant.int8 import Int8Attention, Int8Experts, Int8Linear, quantize_for_decoding

CHUNKED = RuntimeOptions(loss_chunk_size=7)  # chunks smaller than the test batches


def small_config(**overrides):
    values = dict(vocab_size=97, eos_token_id=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                  intermediate_size=24, sliding_window=6, max_position_embeddings=128)  # fmt: skip
    return GPTOSSConfig(**{**values, **overrides})


def plain_linear_cross_entropy(x, weight, labels):
    """The textbook loss the chunked kernel replaces: all the logits, then F.cross_entropy."""
    return F.cross_entropy(F.linear(x, weight).float(), labels, ignore_index=-100)


def grads_of(fn, *tensors):
    """Value of fn(*tensors) and the gradients of (value * a fixed random weight).sum() w.r.t. the tensors."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in tensors]


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_cross_entropy_matches_reference(chunk):
    torch.manual_seed(0)
    N, H, V = 23, 16, 50
    x, w = torch.randn(N, H), torch.randn(V, H) * 0.3
    labels = torch.randint(0, V, (N,))
    labels[[0, 4, 5]] = -100
    ref, ref_grads = grads_of(lambda x, w: plain_linear_cross_entropy(x, w, labels), x, w)
    out, grads = grads_of(lambda x, w: linear_cross_entropy(x, w, labels, chunk_size=chunk), x, w)
    assert_close(out, ref)
    for a, b in zip(grads, ref_grads):  # includes an incoming gradient != 1 (the fixed random weight)
        assert_close(a, b)


@pytest.mark.parametrize("frozen", ["weight", "input"])
def test_chunked_cross_entropy_forms_only_the_gradients_asked_for(frozen):
    """A frozen LM head (LoRA) gets no [V, H] gradient formed or kept; the other gradient is unchanged."""
    torch.manual_seed(0)
    x, w = torch.randn(9, 8), torch.randn(13, 8)
    labels = torch.randint(0, 13, (9,))
    (x if frozen == "input" else w).requires_grad_(False)
    trained = w if frozen == "input" else x
    trained.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = linear_cross_entropy(x, w, labels, chunk_size=4)
    assert all(t.shape != (x if frozen == "input" else w).shape for t in saved if t is not None)
    (grad,) = torch.autograd.grad(loss * 0.5, trained)
    reference = trained.detach().clone().requires_grad_(True)
    args = (x, reference) if frozen == "input" else (reference, w)
    (expected,) = torch.autograd.grad(plain_linear_cross_entropy(*args, labels) * 0.5, reference)
    assert_close(grad, expected)


def test_chunked_cross_entropy_without_grad_and_all_ignored():
    x, w = torch.randn(6, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (6,))
    with torch.no_grad():
        assert_close(linear_cross_entropy(x, w, labels, 4), plain_linear_cross_entropy(x, w, labels))
    ignored = torch.full((6,), -100)
    assert linear_cross_entropy(x, w, ignored, 4).isnan()  # 0/0, as F.cross_entropy
    assert plain_linear_cross_entropy(x, w, ignored).isnan()


def test_chunked_cross_entropy_under_bf16_autocast():
    torch.manual_seed(0)
    x, w = torch.randn(20, 32), torch.randn(40, 32) * 0.2
    labels = torch.randint(0, 40, (20,))
    results = []
    for fn in (plain_linear_cross_entropy, lambda *a: linear_cross_entropy(*a, chunk_size=8)):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(xg, wg, labels)
        loss.backward()
        assert loss.dtype == torch.float32 and xg.grad.dtype == wg.grad.dtype == torch.float32
        results.append((loss.detach(), xg.grad, wg.grad))
    for a, b in zip(*results):
        assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_chunked_cross_entropy_widens_a_narrower_weight_a_slice_at_a_time(monkeypatch):
    """A frozen bfloat16 head under float32 products (LoRA's, training.sft.hold_frozen_base): the loss and input
    gradient of its float32 copy, that copy never formed whole (slices of 3 rows here), nor a [V, H] gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):  # the float32 shape of every tensor any op makes
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend(t.shape for t in torch.utils._pytree.tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.dtype == torch.float32)  # fmt: skip
            return out

    monkeypatch.setattr("ossgpt.kernels.loss.WIDEN_BYTES", 3 * 16 * 4)  # 3 float32 rows of 16
    torch.manual_seed(0)
    x, w = torch.randn(23, 16), (torch.randn(50, 16) * 0.3).bfloat16()
    labels = torch.randint(0, 50, (23,))
    labels[[0, 4]] = -100
    ref, (ref_grad,) = grads_of(lambda x: plain_linear_cross_entropy(x, w.float(), labels), x)
    made = []
    with Shapes():
        out, (grad,) = grads_of(lambda x: linear_cross_entropy(x, w, labels, chunk_size=5), x)
    assert_close(out, ref)
    assert_close(grad, ref_grad)
    assert (3, 16) in made and w.shape not in made


@pytest.mark.parametrize("tied", [True, False])
def test_model_chunked_loss_equals_logits_loss(tied):
    """forward(labels, return_logits=False) (chunked) == forward(labels) (full logits), values and gradients."""
    config = small_config(tie_word_embeddings=tied)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    results = []
    for return_logits in (True, False):
        torch.manual_seed(0)
        model = GPTOSSForCausalLM(config, CHUNKED)
        out = model(ids, labels=labels, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        out.loss.backward()
        results.append((out.lm_loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6)


def test_loss_chunk_size_zero_uses_the_plain_loss(monkeypatch):
    model = GPTOSSForCausalLM(small_config(), RuntimeOptions(loss_chunk_size=0))
    ids = torch.randint(0, 97, (2, 9))
    with monkeypatch.context() as patched:
        patched.setattr("ossgpt.model.model.linear_cross_entropy", lambda *a, **k: pytest.fail("chunked loss ran"))
        out = model(ids, labels=ids, return_logits=False)
    assert out.logits is None
    assert_close(out.lm_loss, model(ids, labels=ids).lm_loss)
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="loss_chunk_size"):
            RuntimeOptions(loss_chunk_size=bad)


# ---------------------------------------------------------------------------------------------- attention
ATTENTION_CASES = {
    # name: (B, H, K, T, S, window, left padding per row)
    "gqa-causal": (2, 4, 2, 9, 9, None, (0, 0)),
    "mha-window": (2, 4, 4, 12, 12, 3, (0, 0)),
    "gqa4-left-padded": (2, 8, 2, 10, 10, 4, (0, 3)),  # padded query rows see no key: output 0, as eager
    "decode-step": (3, 4, 2, 1, 17, None, (0, 2, 5)),  # one query against a cache
    "prefill-after-cache": (1, 2, 1, 4, 13, 6, (0,)),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_sdpa_attention_matches_eager(case):
    B, H, K, T, S, window, pads = ATTENTION_CASES[case]
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(B, H, T, 8, generator=g),
        torch.randn(B, K, S, 8, generator=g),
        torch.randn(B, K, S, 8, generator=g),
    )
    sinks = torch.randn(H, generator=g)
    key_positions = torch.stack([torch.cat([torch.full((p,), -1), torch.arange(S - p)]) for p in pads])
    query_positions = key_positions[:, S - T :]
    visible = allowed_keys(query_positions, key_positions, window)
    ref, ref_grads = grads_of(lambda *a: eager_attention(*a, visible, 0.35), q, k, v, sinks)
    out, grads = grads_of(lambda *a: sdpa_attention(*a, visible, 0.35), q, k, v, sinks)
    assert_close(out, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sdpa_attention_with_rows_not_contiguous():
    """q, k, v whose last dimension is strided (every other value of a wider tensor): torch's private CPU flash kernel
    reads rows as if contiguous, so sdpa_attention copies them; values and gradients as the reference's."""
    g = torch.Generator().manual_seed(5)
    wide = [torch.randn(2, H, 6, 16, generator=g) for H in (4, 2, 2)]  # q, k, v: every other value of these
    sinks = torch.randn(4, generator=g)
    positions = torch.arange(6).expand(2, 6)
    visible = allowed_keys(positions, positions, None)

    def strided(attention):
        return lambda q, k, v, sinks: attention(q[..., ::2], k[..., ::2], v[..., ::2], sinks, visible, 0.35)

    ref, ref_grads = grads_of(strided(eager_attention), *wide, sinks)
    out, grads = grads_of(strided(sdpa_attention), *wide, sinks)
    assert_close(out, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sdpa_attention_without_kernel_gqa(monkeypatch):
    """Older CPU flash kernels need one key/value head per query head: the repeated-heads path is right too."""
    monkeypatch.setattr(attention_kernels, "_cpu_flash_takes_gqa", lambda: False)
    test_sdpa_attention_matches_eager("gqa4-left-padded")


def test_sdpa_attention_under_bf16_autocast():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    positions = torch.arange(6)[None]
    visible = allowed_keys(positions, positions, None)
    sinks = torch.randn(4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(q, k, v, sinks, visible, 0.35)
    out.float().sum().backward()
    assert_close(out.float(), eager_attention(q, k, v, sinks, visible, 0.35).detach(), rtol=3e-2, atol=3e-2)
    assert sinks.grad is not None and sinks.grad.isfinite().all()


# ---------------------------------------------------------------------------------------------- MoE
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0], [2, 2, 2, 2]])
def test_grouped_mm_equals_loop(counts):
    if not grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("this torch has no grouped_mm on CPU")
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor(counts)
    x, w, b = (
        torch.randn(int(counts.sum()), 16, generator=g),
        torch.randn(4, 16, 8, generator=g),
        torch.randn(4, 8, generator=g),
    )
    ref, ref_grads = grads_of(lambda *a: grouped_linear(*a, counts, use_grouped_mm=False), x, w, b)
    out, grads = grads_of(lambda *a: grouped_linear(*a, counts, use_grouped_mm=True), x, w, b)
    assert_close(out, ref)
    for a, b_ in zip(grads, ref_grads):
        assert_close(a, b_)


def naive_grouped_linear(x, w, b, counts):
    """Each expert's rows times its weight, plus its bias, joined by autograd (split, linear, cat)."""
    return torch.cat([xe @ we + be for xe, we, be in zip(x.split(counts.tolist()), w.unbind(0), b.unbind(0))])


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0], [2, 2, 2, 2]])
def test_loop_grouped_linear_equals_naive_loop(counts):
    """The loop's hand-written backward (products into preallocated gradients) against autograd's, in float64."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 16, generator=g, dtype=torch.float64)
    w = torch.randn(4, 16, 8, generator=g, dtype=torch.float64)
    b = torch.randn(4, 8, generator=g, dtype=torch.float64)
    ref, ref_grads = grads_of(lambda *a: naive_grouped_linear(*a, counts), x, w, b)
    out, grads = grads_of(lambda *a: grouped_linear(*a, counts, use_grouped_mm=False), x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b_ in zip(grads, ref_grads):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)
    x.requires_grad_(True)  # only the input needs a gradient: the weight's and bias's are not formed
    (grad_x,) = torch.autograd.grad(grouped_linear(x, w, b, counts, use_grouped_mm=False).sum(), x)
    (expected,) = torch.autograd.grad(naive_grouped_linear(x, w, b, counts).sum(), x)
    torch.testing.assert_close(grad_x, expected, rtol=1e-12, atol=1e-12)


def test_loop_grouped_linear_under_autocast():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 3])
    x, w, b = torch.randn(8, 16, generator=g), torch.randn(3, 16, 8, generator=g), torch.randn(3, 8, generator=g)
    ref, ref_grads = grads_of(lambda *a: naive_grouped_linear(*a, counts), x, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = grads_of(lambda *a: grouped_linear(*a, counts, use_grouped_mm=False), x, w, b)
    assert out.dtype == torch.bfloat16 and all(gr.dtype == torch.float32 for gr in grads)
    assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    for a, b_ in zip(grads, ref_grads):
        assert_close(a, b_, rtol=3e-2, atol=5e-2)


def test_grouped_mm_probe_leaves_the_random_stream_alone():
    expert_kernels._GROUPED_MM_WORKS.clear()
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    grouped_mm_available(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.rand(3), expected)


def test_grouped_mm_probe_inside_a_checkpointed_block():
    """The first MoE call probes grouped_mm; inside gradient checkpointing that must not record anything."""
    expert_kernels._GROUPED_MM_WORKS.clear()
    model = GPTOSSForCausalLM(small_config(), RuntimeOptions(gradient_checkpointing=True)).train()
    ids = torch.randint(0, 97, (2, 8))
    model(ids, labels=ids, return_logits=False).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("experts,top_k", [(32, 4), (5, 2)])
def test_sorted_moe_equals_loop_many_experts(experts, top_k):
    config = small_config(num_local_experts=experts, num_experts_per_tok=top_k)
    results = {}
    for impl in ("loop", "sorted"):
        torch.manual_seed(0)
        moe = MoE(config)
        moe.experts.kernel = impl
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(0, 0.2)
        x = torch.randn(4, 13, config.hidden_size, requires_grad=True)
        y, stats = moe(x)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
        results[impl] = [y.detach(), x.grad] + [p.grad for p in moe.parameters()]
    for a, b in zip(results["loop"], results["sorted"]):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_router_stats_are_lazy_and_right():
    moe = MoE(small_config())
    x = torch.randn(2, 5, 32)
    _, stats = moe(x)
    assert "load_balancing_loss" not in vars(stats) and "z_loss" not in vars(stats)  # nothing computed yet
    logits, _, indices = moe.router(x.reshape(10, 32))
    assert_close(stats.load_balancing_loss, load_balancing_loss(logits, indices))
    assert_close(stats.z_loss, router_z_loss(logits))
    assert stats.expert_counts.sum() == 10 * 2


# ---------------------------------------------------------------------------------------------- int8 decoding
def dequantized(q, scales):
    """int8 rows times their scales: one per row [out], or one per block of 32 [out, in / 32]."""
    if scales.dim() == 2:
        return (q.float().view(q.shape[0], -1, 32) * scales.float()[..., None]).flatten(1)
    return q.float() * scales.float()[:, None]


def test_int8_quantization_roundtrip():
    w = torch.randn(24, 40)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((dequantized(q, scales) - w).abs() <= scales.float()[:, None] * 0.5 + 1e-6).all()


def test_int8_linear_matches_float_matmul_of_same_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    quantized = Int8Linear(linear)
    x = torch.randn(2, 3, 64)
    expected = F.linear(x, dequantized(quantized.qweight, quantized.scales), linear.bias)
    rtol = 2e-2 if int8_mm_available(x.device) else 1e-5  # the kernel takes bfloat16 activations
    assert_close(quantized(x), expected, rtol=rtol, atol=rtol)


def test_quantize_rows_roundtrip_and_zero_rows():
    x = torch.randn(5, 40) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 2.0])[:, None]
    q, scales = quantize_rows(x)
    assert q.dtype == torch.int8 and scales.shape == (5, 1)
    assert (q.abs().amax(dim=1) == torch.tensor([127, 127, 127, 0, 127], dtype=torch.int8)).all()
    assert ((q.float() * scales - x).abs() <= scales * 0.5 * (1 + 1e-6)).all()
    assert not q[3].any() and torch.isfinite(scales).all()


@pytest.mark.parametrize("kernel", [True, False], ids=["int_mm", "float fallback"])
def test_int8_dynamic_linear_is_exact_integer_product(kernel, monkeypatch):
    """W8A8: int8 x int8 summed exactly, then row scale x channel scale: against float64 of the same integers."""
    if kernel and not int_mm_available(torch.device("cpu")):
        pytest.skip("torch._int_mm is not available here")
    monkeypatch.setattr("ossgpt.kernels.int8.native", lambda: None)  # per row (the native kernel: per block)
    if not kernel:
        monkeypatch.setattr("ossgpt.kernels.int8.int_mm_available", lambda device: False)
    torch.manual_seed(0)
    w_q, w_scales = quantize_int8(torch.randn(48, 64))
    for rows in (1, 3, 8):
        x = torch.randn(2, rows, 64)
        x_q, x_scales = quantize_rows(x.reshape(-1, 64))
        expected = (x_q.double() @ w_q.double().T) * x_scales.double() * w_scales.double()
        got = int8_dynamic_linear(x, w_q, w_scales)
        assert got.shape == (2, rows, 48) and got.dtype == torch.float32
        assert_close(got.reshape(-1, 48).double(), expected, rtol=1e-6, atol=1e-6)
        # ... and within the activations' rounding of the float product: |error| <= x_scale / 2 * sum_k |w_k|.
        w = dequantized(w_q, w_scales)
        bound = 0.5 * x_scales * w.abs().sum(dim=1) * (1 + 1e-5) + 1e-6
        assert ((got.reshape(-1, 48) - x.reshape(-1, 64) @ w.T).abs() <= bound).all()


@pytest.mark.parametrize("width", [8, 12, 16, 24, 40, 48])
def test_int8_linear_any_input_width(width):
    """Widths the int8 kernel mishandles (not multiples of 16) take the dequantized path, with the same result."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, 20)
    quantized = Int8Linear(linear)
    for rows in (1, 5):
        x = torch.randn(rows, width)
        expected = F.linear(x, dequantized(quantized.qweight, quantized.scales), linear.bias)
        assert_close(quantized(x), expected, rtol=2e-2, atol=2e-2)


def test_int8_experts_match_float_loop_of_same_weights():
    torch.manual_seed(0)
    config = small_config(hidden_size=64, intermediate_size=32)
    experts = Experts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    quantized = Int8Experts(experts, config)
    reference = Experts(config, kernel="loop")
    with torch.no_grad():
        gate_up = zip(quantized.gate_up_qweight, quantized.gate_up_scales)
        reference.gate_up_proj.copy_(torch.stack([dequantized(q, s).T for q, s in gate_up]))
        down = zip(quantized.down_qweight, quantized.down_scales)
        reference.down_proj.copy_(torch.stack([dequantized(q, s).T for q, s in down]))
        reference.gate_up_proj_bias.copy_(experts.gate_up_proj_bias)
        reference.down_proj_bias.copy_(experts.down_proj_bias)
        x = torch.randn(7, 64)
        top, indices = torch.randn(7, 4).topk(2)
        assert_close(
            quantized(x, indices, top.softmax(-1)), reference(x, indices, top.softmax(-1)), rtol=3e-2, atol=3e-2
        )


def test_quantized_model_decodes_close_to_float():
    # Every expert used by every token: no routing decision that rounding could flip.
    config = small_config(num_local_experts=2, num_experts_per_tok=2, hidden_size=64, intermediate_size=64,
                          head_dim=16, vocab_size=128)  # fmt: skip
    torch.manual_seed(0)
    model = GPTOSSForCausalLM(config).eval()
    quantized = quantize_for_decoding(model)
    assert model.lm_head.weight.dtype == torch.float32  # the original is untouched
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected, got = model(ids).logits, quantized(ids).logits
    assert ((got - expected).abs().max() / expected.abs().max()) < 5e-2
    out = quantized.generate(ids[:1, :5], max_new_tokens=6)
    assert out.shape == (1, 11)


@pytest.mark.parametrize("dynamic", [False, True], ids=["weight-only", "W8A8"])
def test_quantized_model_cached_decoding_matches_its_full_forward(dynamic):
    # The int8 copy decoded token by token from its KV cache gives the logits of its own full forward pass, and
    # with its inputs quantized too (W8A8) stays as close to float32 as the weight-only copy.
    config = small_config(num_local_experts=2, num_experts_per_tok=2, hidden_size=64, intermediate_size=64,
                          head_dim=16, vocab_size=128)  # fmt: skip
    torch.manual_seed(0)
    model = GPTOSSForCausalLM(config).eval()
    quantized = quantize_for_decoding(model, dynamic=dynamic)
    assert isinstance(quantized.lm_head, Int8Linear) and quantized.lm_head.dynamic == dynamic
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = quantized(ids).logits
        assert ((full - model(ids).logits).abs().max() / model(ids).logits.abs().max()) < 5e-2
        out = quantized.generate(ids, max_new_tokens=5)
        assert torch.equal(out[:, 12:], quantized(out[:, :-1]).logits[:, 11:].argmax(-1))


@pytest.mark.parametrize("dynamic", [False, True], ids=["weight-only", "W8A8"])
def test_stacked_qkv_projection_equals_three_int8_products(dynamic):
    """Int8Attention (q, k and v as one stacked product) gives, bit for bit, what the same attention with three
    Int8Linear projections gives: prompts of two rows, and cached one-token steps."""
    config = small_config(hidden_size=64, head_dim=16)
    torch.manual_seed(0)
    model = GPTOSSForCausalLM(config).eval()
    stacked = quantize_for_decoding(model, dynamic=dynamic)
    attention = stacked.layers[1].self_attn
    assert isinstance(attention, Int8Attention) and not hasattr(attention, "q_proj")
    three = copy.deepcopy(model.layers[1].self_attn)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(three, name, Int8Linear(getattr(three, name), dynamic=dynamic, scale_blocks=True))
    x = torch.randn(2, 7, 64)
    positions = torch.arange(7).expand(2, 7)
    cos, sin = model.rotary_emb(positions, x.dtype)
    with torch.no_grad():
        assert torch.equal(attention(x, cos, sin, positions), three(x, cos, sin, positions))
        caches = KVCache(config, 2, 9), KVCache(config, 2, 9)
        outs = [a(x, cos, sin, positions, cache[1], 0) for a, cache in zip((attention, three), caches)]
        step = torch.full((2, 1), 7)
        cos, sin = model.rotary_emb(step, x.dtype)
        outs += [a(x[:, :1], cos, sin, step, cache[1], 7) for a, cache in zip((attention, three), caches)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3])


# ---------------------------------------------------------------------------------------------- bench smoke run
@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_input_major_weights_are_the_same_model(tied):
    """inference.loading.hold_input_major: every float32 linear weight keeps its shape, values and parameter (a tied
    head stays tied), stored transposed; the logits are the row-major model's up to float32 summation order, and
    cached greedy decoding of a batch with 4 to 15 rows (where the layout matters) equals its own full forward."""
    torch.manual_seed(0)
    model = GPTOSS(small_config(tie_word_embeddings=tied)).eval()
    reference = copy.deepcopy(model)
    before = {name: p for name, p in model.named_parameters()}
    hold_input_major(model)
    for name, param in model.named_parameters():
        assert param is before[name] and torch.equal(param, reference.get_parameter(name))
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    ids = torch.randint(0, 97, (5, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    out = generate(model, ids, max_new_tokens=6, temperature=0)
    with torch.no_grad():
        full = model(out[:, :-1]).logits[:, ids.shape[1] - 1 :].argmax(-1)
    assert torch.equal(out[:, ids.shape[1] :], full)


def test_bench_quick_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "bench" / "run.py"), "--quick", "--json", str(tmp_path / "b.json")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| training step" in result.stdout and (tmp_path / "b.json").exists()
