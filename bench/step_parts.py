"""Parts of a training step (and six of decoding), each against the simpler form it replaced, in one process.

  swiglu     the clamped SwiGLU's forward and backward on [8192, 1024] (the tiny step's gate/up rows): gate/up
             split by unflatten + unbind (ossgpt) vs by the stride-2 slices [..., ::2], [..., 1::2]
  experts    the gate/up projection of 4 experts, [8192, 256] x [4, 256, 1024] + bias, forward and backward:
             one addmm per expert slice (ossgpt's choice on CPU) vs torch's grouped_mm
  muon       Newton-Schulz over the tiny preset's 40 Muon matrices (ossgpt's baddbmm form) vs the same
             iteration written as separate products, scales and sums
  rmsnorm    1,000 RMSNorm calls on one decoded token's [1, 1, 512] (where its per-call cost shows), forward only:
             ossgpt's RMSNorm (without gradients on the CPU: one native call, csrc/cpu_elementwise.cpp) vs the
             formula step by step
  rmsnorm-fused  the same calls: ossgpt's RMSNorm vs torch's fused F.rms_norm on the float32 upcast (what it ran
             before the native call)
  rotary     1,000 rotary embeddings of one decoded token's queries at the mini preset's heads ([1, 8, 1, 64], the
             heads of a projection's output): apply_rotary (one native call) vs its torch ops (chunk, products, cat)
  mask       1,000 visibility masks of one decoded token over 80 cached keys: allowed_keys (one native call) vs its
             torch ops (comparisons and ands)
  argmax     1,000 greedy picks from one decoded token's logits over the mini preset's 100,352-token vocabulary:
             ossgpt.inference.sampling.greedy (numpy's argmax on the CPU) vs torch.argmax
  decode-attention  1,000 decoding steps' attention (one query per row over a KV cache, with sinks) at the mini
             preset's heads (8 query heads, 2 key/value heads, 80 cached keys), 100 at gpt-oss-20b's (64 and 8,
             640 keys) and 10 over 16,384 keys: sdpa_attention (one native call, csrc/cpu_attention.cpp) vs the path
             it took before, the additive mask, torch's CPU flash kernel and the sink's rescaling
  expert-loop  the same projection at 32 experts ([4096, 512] x [32, 512, 1536], the MoE row of bench/run.py):
             the per-expert addmm loop as ossgpt's autograd Function (products written into preallocated
             outputs and gradients) vs the same loop left to autograd (split, addmm, cat)

    python bench/step_parts.py             # docs/recipe.md, round 3, quotes its table
    python bench/step_parts.py --quick     # smoke run on small shapes
    python bench/step_parts.py --only decode-attention   # the rows whose name contains that
Rounds alternate which side goes first; each row reports medians in milliseconds and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ossgpt.inference.sampling import greedy
from ossgpt.kernels.attention import _attention_with_sinks_lse, sdpa_attention
from ossgpt.kernels.experts import grouped_linear, grouped_mm_available
from ossgpt.model.attention import allowed_keys, allowed_keys_reference
from ossgpt.model.moe import clamped_swiglu
from ossgpt.model.norms import RMSNorm, rms_norm_reference
from ossgpt.model.rope import apply_rotary, rotary_reference
from ossgpt.training.muon import NS_COEFFICIENTS, orthogonalize

ALPHA, LIMIT = 1.702, 7.0


def sliced_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """The reference: the same function with gate and up taken as stride-2 slices."""
    gate, up = gate_up[..., ::2].clamp(max=LIMIT), gate_up[..., 1::2].clamp(min=-LIMIT, max=LIMIT)
    return (up + 1) * (gate * torch.sigmoid(gate * ALPHA))


def unfused_orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The reference: Newton-Schulz as separate products, scales and sums (same math as `orthogonalize`)."""
    transpose = matrix.size(-2) > matrix.size(-1)
    x = matrix.mT if transpose else matrix
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transpose else x


def autograd_loop(x, weight, bias, counts):
    """The reference: one addmm per expert slice, joined by autograd (split, addmm, cat)."""
    splits = counts.tolist()
    outs = [torch.addmm(b, xe, w) for xe, w, b in zip(x.split(splits), weight.unbind(0), bias.unbind(0))]
    return torch.cat(outs)


def flash_with_sinks(q, k, v, sinks, visible, scale):
    """What sdpa_attention ran for a decoding step on the CPU before its native call: the flash path."""
    bias = torch.zeros(visible.shape, dtype=q.dtype).masked_fill(~visible, float("-inf"))
    return _attention_with_sinks_lse(q, k, v, sinks, bias, scale)[0]


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def workloads(quick: bool) -> dict:
    """name -> (ossgpt's call, the reference call)."""
    rows, hidden, width, experts = (512, 32, 64, 4) if quick else (8192, 256, 1024, 4)
    gate_up = torch.randn(rows, width, requires_grad=True)
    grad_out = torch.randn(rows, width // 2)

    def swiglu(fn):
        return lambda: fn(gate_up).backward(grad_out)

    x = torch.randn(rows, hidden, requires_grad=True)
    weight = torch.randn(experts, hidden, width, requires_grad=True)
    bias = torch.randn(experts, width, requires_grad=True)
    counts = torch.bincount(torch.randint(0, experts, (rows,), generator=torch.Generator().manual_seed(0)))
    grad_y = torch.randn(rows, width)

    def projection(use_grouped_mm):
        return lambda: grouped_linear(x, weight, bias, counts, use_grouped_mm=use_grouped_mm).backward(grad_y)

    # The tiny preset's Muon matrices per layer: gate_up [4, 256, 1024], down [4, 512, 256], q and o [256, 256],
    # k and v [128, 256]; 4 layers.
    shapes = [(4, 256, 1024), (4, 512, 256), (256, 256), (128, 256), (128, 256), (256, 256)]
    if quick:
        shapes = [(2, 16, 64), (16, 16)]
    matrices = [torch.randn(shape) for shape in shapes * (1 if quick else 4)]

    def muon(fn):
        return lambda: [fn(m) for m in matrices]

    m_rows, m_hidden, m_width, m_experts = (256, 32, 64, 8) if quick else (4096, 512, 1536, 32)
    mx = torch.randn(m_rows, m_hidden, requires_grad=True)
    mw = torch.randn(m_experts, m_hidden, m_width, requires_grad=True)
    mb = torch.randn(m_experts, m_width, requires_grad=True)
    m_counts = torch.bincount(torch.randint(0, m_experts, (m_rows,), generator=torch.Generator().manual_seed(1)),
                              minlength=m_experts)  # fmt: skip
    m_grad = torch.randn(m_rows, m_width)

    def expert_loop(fn):
        return lambda: fn(mx, mw, mb, m_counts).backward(m_grad)

    norm = RMSNorm(512)
    token = torch.randn(1, 1, 512)

    def rmsnorm(fn):
        def run():
            with torch.no_grad():
                for _ in range(100 if quick else 1000):
                    fn(token)

        return run

    def per_token(fn, *args):  # 1,000 calls (100 quick) on one decoded token's tensors, without gradients
        def run():
            with torch.no_grad():
                for _ in range(100 if quick else 1000):
                    fn(*args)

        return run

    query = torch.randn(1, 1, 8, 64).transpose(1, 2)  # [B, H, T, D], as the attention hands it over
    angles = torch.rand(1, 32) * 80
    cos, sin = angles.cos(), angles.sin()
    step, cached = torch.tensor([[79]]), torch.arange(80)[None]

    logits = torch.randn(1, 512 if quick else 100_352)

    def picks(fn):
        return lambda: [fn(logits) for _ in range(100 if quick else 1000)]

    def decode_attention(fn, heads, kv_heads, keys, calls):
        g = torch.Generator().manual_seed(2)
        q = torch.randn(1, heads, 1, 64, generator=g)
        k, v = torch.randn(1, kv_heads, keys, 64, generator=g), torch.randn(1, kv_heads, keys, 64, generator=g)
        sinks = torch.randn(heads, generator=g)
        positions = torch.arange(keys)[None]
        visible = allowed_keys(positions[:, -1:], positions, None)

        def run():
            with torch.no_grad():
                for _ in range(calls // 10 if quick else calls):
                    fn(q, k, v, sinks, visible, 0.125)

        return run

    work = {
        "decode-attention (mini)": (
            decode_attention(sdpa_attention, 8, 2, 80, 1000),
            decode_attention(flash_with_sinks, 8, 2, 80, 1000),
        ),
        "decode-attention (gpt-oss-20b, 640 keys)": (
            decode_attention(sdpa_attention, 64, 8, 640, 100),
            decode_attention(flash_with_sinks, 64, 8, 640, 100),
        ),
        "decode-attention (gpt-oss-20b, 16,384 keys)": (
            decode_attention(sdpa_attention, 64, 8, 16_384, 10),
            decode_attention(flash_with_sinks, 64, 8, 16_384, 10),
        ),
        "argmax": (picks(greedy), picks(lambda t: t.argmax(dim=-1))),
        "swiglu": (swiglu(lambda t: clamped_swiglu(t, ALPHA, LIMIT)), swiglu(sliced_swiglu)),
        "rmsnorm": (rmsnorm(norm), rmsnorm(lambda t: rms_norm_reference(t, norm.weight, norm.eps))),
        "rmsnorm-fused": (rmsnorm(norm), rmsnorm(lambda t: F.rms_norm(t.float(), (512,), norm.weight.float(), 1e-5))),
        "rotary": (per_token(apply_rotary, query, cos, sin), per_token(rotary_reference, query, cos, sin)),
        "mask": (per_token(allowed_keys, step, cached, 128), per_token(allowed_keys_reference, step, cached, 128)),
        "muon": (muon(orthogonalize), muon(unfused_orthogonalize)),
        "expert-loop": (expert_loop(lambda *a: grouped_linear(*a, use_grouped_mm=False)), expert_loop(autograd_loop)),
    }
    if grouped_mm_available(x.device, x.dtype):
        work["experts"] = (projection(False), projection(True))
    return work


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds: checks the script works")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds (default 9, quick 2)")
    parser.add_argument("--only", default="", help="the rows whose name contains this (e.g. decode-attention)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 9)
    work = {name: pair for name, pair in workloads(args.quick).items() if args.only in name}
    if not work:
        raise SystemExit(f"no row's name contains {args.only!r}")
    samples = {name: ([], []) for name in work}
    for pair in work.values():  # warm-up
        pair[0](), pair[1]()
    for r in range(rounds):
        for name, (ours, reference) in work.items():
            order = ((0, ours), (1, reference)) if r % 2 == 0 else ((1, reference), (0, ours))
            for side, fn in order:
                samples[name][side].append(timed_ms(fn))
    print(f"{torch.get_num_threads()} threads, {rounds} rounds, median ms")
    print("| part | ossgpt | reference | reference / ossgpt |")
    print("| --- | ---: | ---: | ---: |")
    for name, (ours, reference) in samples.items():
        a, b = statistics.median(ours), statistics.median(reference)
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
