"""Model parts against independent references: closed forms, float64 naive loops, hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from ossgpt import GPTOSSConfig, GPTOSSForCausalLM, RuntimeOptions
from ossgpt.kernels.attention import sdpa_attention
from ossgpt.model.attention import allowed_keys, eager_attention
from ossgpt.model.moe import MoE, clamped_swiglu, load_balancing_loss, router_z_loss
from ossgpt.model.norms import RMSNorm, rms_norm_reference
from ossgpt.model.rope import rope_inv_freq


def small_config(**overrides):
    values = dict(vocab_size=97, eos_token_id=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                  intermediate_size=24, sliding_window=6, max_position_embeddings=128, rope_type="yarn",
                  rope_factor=4.0, rope_original_max_position_embeddings=32)  # fmt: skip
    return GPTOSSConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_formula_and_float64(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 5, 48) * 4).to(dtype).requires_grad_()
    y = norm(x)
    reference = rms_norm_reference(x, norm.weight, 1e-5)  # the formula, step by step in float32
    assert y.dtype == dtype
    torch.testing.assert_close(y, reference, rtol=1e-6, atol=1e-6)
    x64 = x.detach().double()
    exact = norm.weight.double() * x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.double(), exact.to(dtype).double(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-5 if dtype == torch.float32 else 1e-2)  # fmt: skip
    grad = torch.randn_like(y)
    (g_fast,) = torch.autograd.grad(y, x, grad)
    (g_reference,) = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(g_fast, g_reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- RoPE / YaRN
@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_frequencies_closed_form(truncate):
    dim, base, factor, original, beta_fast, beta_slow = 64, 150000.0, 32.0, 4096, 32.0, 1.0
    inv_freq, mscale = rope_inv_freq(dim, base, "yarn", factor, original, beta_fast, beta_slow, truncate)

    # Closed form (YaRN paper, NTK-by-parts): the channel pair whose wavelength fits r turns in the original
    # context is d(r) = dim * ln(L / (2 pi r)) / (2 ln base); ramp linearly between d(beta_fast) and d(beta_slow).
    def d(r):
        return dim * math.log(original / (2 * math.pi * r)) / (2 * math.log(base))

    low, high = d(beta_fast), d(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    expected = []
    for i in range(dim // 2):
        theta_i = base ** (-2 * i / dim)
        keep = 1 - min(max((i - low) / (high - low), 0.0), 1.0)  # 1: original frequency, 0: divided by factor
        expected.append(theta_i * keep + theta_i / factor * (1 - keep))
    assert torch.allclose(inv_freq.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    assert mscale == pytest.approx(0.1 * math.log(32) + 1)
    # The fastest channels are untouched, the slowest fully interpolated.
    assert inv_freq[0] == pytest.approx(1.0)
    assert inv_freq[-1].item() == pytest.approx(base ** (-(dim - 2) / dim) / factor, rel=1e-6)


def test_plain_rope_frequencies():
    inv_freq, mscale = rope_inv_freq(8, 10000.0, "default")
    assert torch.allclose(inv_freq.double(), torch.tensor([10000.0 ** (-i / 8) for i in (0, 2, 4, 6)]).double())
    assert mscale == 1.0


# ---------------------------------------------------------------------------------------------- attention
def naive_attention(q, k, v, sinks, visible, scale):
    """Float64 loops: per (b, h, t) a softmax over visible keys plus the sink logit."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = [s for s in range(k.shape[2]) if visible[b, 0, t, s]]
                logits = torch.stack([q[b, h, t].double() @ k[b, h // G, s].double() * scale for s in keys]
                                     + [sinks[h].double()])  # fmt: skip
                probs = logits.softmax(0)[:-1]
                out[b, h, t] = sum((p * v[b, h // G, s].double() for p, s in zip(probs, keys)), torch.zeros(D))
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("impl", [eager_attention, sdpa_attention])
def test_attention_matches_naive_loop(impl, window):
    torch.manual_seed(0)
    B, H, K, T, D = 2, 4, 2, 7, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, T, D), torch.randn(B, K, T, D)
    sinks = torch.randn(H)
    positions = torch.arange(T).expand(B, T)
    visible = allowed_keys(positions, positions, window)
    out = impl(q, k, v, sinks, visible, D**-0.5)
    assert torch.allclose(out.double(), naive_attention(q, k, v, sinks, visible, D**-0.5), atol=1e-5)


@pytest.mark.parametrize("impl", [eager_attention, sdpa_attention])
def test_sinks_at_minus_infinity_reduce_to_plain_softmax(impl):
    torch.manual_seed(0)
    B, H, T, D = 1, 2, 6, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    positions = torch.arange(T).expand(B, T)
    out = impl(q, k, v, torch.full((H,), float("-inf")), allowed_keys(positions, positions, None), D**-0.5)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)


def test_sdpa_and_eager_gradients_agree():
    torch.manual_seed(0)
    grads = []
    for impl in (eager_attention, sdpa_attention):
        torch.manual_seed(1)
        q, k, v = (torch.randn(2, 4, 5, 8, requires_grad=True) for _ in range(3))
        k2, v2 = k[:, :2], v[:, :2]
        sinks = torch.randn(4, requires_grad=True)
        positions = torch.arange(5).expand(2, 5)
        impl(q, k2, v2, sinks, allowed_keys(positions, positions, 3), 0.3).pow(2).sum().backward()
        grads.append([q.grad, k.grad, v.grad, sinks.grad])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------------------------- MoE
def naive_moe(moe, x):
    """Per token: router softmax over its top-k logits, sum of k expert MLPs written out with plain ops."""
    experts, router = moe.experts, moe.router
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = x[n] @ router.weight.T + router.bias
        top, idx = logits.topk(router.top_k)
        for weight, e in zip(top.softmax(0), idx.tolist()):
            gate_up = x[n] @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
            gate, up = gate_up[0::2].clamp(max=experts.limit), gate_up[1::2].clamp(-experts.limit, experts.limit)
            hidden = (up + 1) * gate * torch.sigmoid(experts.alpha * gate)
            out[n] += weight * (hidden @ experts.down_proj[e] + experts.down_proj_bias[e])
    return out


@pytest.mark.parametrize("impl", ["loop", "sorted"])
@pytest.mark.parametrize("experts,top_k", [(2, 1), (4, 2), (8, 4), (3, 3)])
def test_moe_matches_per_token_loop(impl, experts, top_k):
    torch.manual_seed(0)
    config = small_config(num_local_experts=experts, num_experts_per_tok=top_k)
    moe = MoE(config).double()
    moe.experts.kernel = impl
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 9, config.hidden_size, dtype=torch.float64)
    y, stats = moe(x)
    assert torch.allclose(y.reshape(-1, config.hidden_size), naive_moe(moe, x.reshape(-1, config.hidden_size)))
    assert stats.expert_counts.sum() == 18 * top_k


def test_the_expert_loops_one_token_path_equals_its_gathered_path():
    """Decoding one token takes the loop's shortcut (its k experts in turn, nothing gathered): the same sums."""
    torch.manual_seed(0)
    config = small_config(num_local_experts=5, num_experts_per_tok=3)
    moe = MoE(config).double()
    moe.experts.kernel = "loop"
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(7, config.hidden_size, dtype=torch.float64)
    _, weights, indices = moe.router(x)
    together = moe.experts(x, indices, weights)
    alone = torch.cat([moe.experts(x[i : i + 1], indices[i : i + 1], weights[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(alone, together, rtol=1e-12, atol=1e-12)
    assert torch.allclose(together, naive_moe(moe, x))


def test_sorted_and_loop_moe_gradients_agree():
    config = small_config(num_local_experts=8, num_experts_per_tok=2)
    grads = {}
    for impl in ("loop", "sorted"):
        torch.manual_seed(0)
        moe = MoE(config)
        moe.experts.kernel = impl
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(0, 0.2)
        x = torch.randn(3, 5, config.hidden_size, requires_grad=True)
        y, stats = moe(x)
        (y.pow(2).sum() + stats.load_balancing_loss + stats.z_loss).backward()
        grads[impl] = [x.grad] + [p.grad for p in moe.parameters()]
    for a, b in zip(grads["loop"], grads["sorted"]):
        assert torch.allclose(a, b, atol=1e-5)


def test_clamped_swiglu_values():
    gate_up = torch.tensor([[10.0, 10.0, -1.0, 0.5]])  # (gate, up) pairs: (10, 10) and (-1, 0.5)
    out = clamped_swiglu(gate_up, alpha=1.702, limit=7.0)
    sig = lambda z: 1 / (1 + math.exp(-z))
    assert out[0, 0].item() == pytest.approx((7 + 1) * 7 * sig(1.702 * 7), rel=1e-6)  # both clamped to 7
    assert out[0, 1].item() == pytest.approx((0.5 + 1) * -1 * sig(-1.702), rel=1e-6)


def test_clamped_swiglu_gradient_matches_finite_differences():
    # float64; entries inside the clamp range and beyond it on both sides, none near the kinks at +-limit
    inside = torch.rand(4, 8, dtype=torch.float64) * 12 - 6
    outside = (torch.rand(4, 8, dtype=torch.float64) + 8) * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(4)
    gate_up = torch.cat([inside, outside]).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: clamped_swiglu(t, alpha=1.702, limit=7.0), (gate_up,))


def test_aux_losses_hand_computed():
    # 4 tokens, 2 experts, top-1. Logits give softmax probabilities p = sigmoid(logit0 - logit1).
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.5, 0.0]])
    indices = logits.topk(1).indices  # experts 0, 0, 1, 0
    p0 = [1 / (1 + math.exp(-d)) for d in (2.0, 1.0, -3.0, 0.5)]
    P = [sum(p0) / 4, sum(1 - p for p in p0) / 4]
    f = [3 / 4, 1 / 4]
    assert load_balancing_loss(logits, indices).item() == pytest.approx(2 * (f[0] * P[0] + f[1] * P[1]), rel=1e-6)
    lse = [math.log(math.exp(a) + math.exp(b)) for a, b in logits.tolist()]
    assert router_z_loss(logits).item() == pytest.approx(sum(v * v for v in lse) / 4, rel=1e-6)
    # Perfectly uniform routing scores exactly 1.
    uniform = torch.zeros(6, 3)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [0], [1], [2]])).item() == pytest.approx(1.0)


def test_aux_loss_weighting_in_model():
    config = small_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    model = GPTOSSForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 10))
    out = model(ids, labels=ids)
    per_layer = [0.5 * s.load_balancing_loss + 0.25 * s.z_loss for s in out.router_stats]
    assert torch.allclose(out.aux_loss, torch.stack(per_layer).mean())
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)


def test_router_jitter_only_in_training():
    config = small_config(router_jitter_noise=0.5)
    model = GPTOSSForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (1, 12))
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decoding_equals_full_forward(attn):
    """Logits of every decode step from the cache equal a full forward over the whole sequence, past the window."""
    torch.manual_seed(0)
    model = GPTOSSForCausalLM(small_config(), RuntimeOptions(attention=attn)).eval()
    ids = torch.randint(0, 97, (2, 30))
    from ossgpt.model.cache import KVCache

    with torch.no_grad():
        full = model(ids).logits
        for prefill in (1, 4, 11):  # shorter and longer than the window of 6
            cache = KVCache(model.config, 2, 30)
            steps = [model(ids[:, :prefill], cache=cache).logits]
            steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(prefill, 30)]
            assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5), prefill


def test_left_padded_batch_equals_single_rows():
    torch.manual_seed(0)
    model = GPTOSSForCausalLM(small_config()).eval()
    prompts = [torch.randint(1, 97, (n,)) for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    for row, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=12)
        assert torch.equal(batched[row, width:], single[0, len(p) :])


def test_generate_greedy_equals_full_forward_decoding_and_stops_at_eos():
    torch.manual_seed(0)
    model = GPTOSSForCausalLM(small_config()).eval()
    prompt = torch.randint(0, 97, (1, 5))
    out = model.generate(prompt, max_length=25)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    eos = int(out[0, 8])
    first = 5 + out[0, 5:].tolist().index(eos)  # the first time the model emits that token
    stopped = model.generate(prompt, max_length=25, eos_token_id=eos)
    assert torch.equal(stopped[0], out[0, : first + 1])


def test_sampling_is_seedable_and_validated():
    model = GPTOSSForCausalLM(small_config()).eval()
    prompt = torch.randint(0, 97, (2, 4))
    a = model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9,
                       generator=torch.Generator().manual_seed(5))  # fmt: skip
    b = model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9,
                       generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert torch.equal(a, b)
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0)):
        with pytest.raises(ValueError):
            model.generate(prompt, max_new_tokens=3, do_sample=True, **bad)
    with pytest.raises(ValueError, match="context"):
        model.generate(prompt, max_new_tokens=500)


def test_top_p_keeps_the_nucleus():
    from ossgpt.inference.sampling import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_p=0.7).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, so the second token is needed; 0.8 >= 0.7 stops
    assert filter_logits(logits, top_k=1).isfinite()[0].tolist() == [True, False, False, False]


# ---------------------------------------------------------------------------------------------- training switches
def test_gradient_checkpointing_same_loss_and_gradients():
    config = small_config()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPTOSSForCausalLM(config, RuntimeOptions(gradient_checkpointing=checkpointing)).train()
        ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_tied_embeddings_share_storage():
    model = GPTOSSForCausalLM(small_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = GPTOSSForCausalLM(small_config(tie_word_embeddings=False))
    assert untied.num_parameters() == model.num_parameters() + 97 * 32
