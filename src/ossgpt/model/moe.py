"""Sparse mixture of experts: a router picks `top_k` of `E` expert MLPs for every token.

Shapes: N tokens (batch * time flattened), H hidden, E experts, k experts per token, I expert width.

Routing (GPT-OSS, "token choice"): router logits = x @ W_r^T + b_r  [N, E]; keep the k largest; the mixing
weights are a softmax over those k logits only (not over all E). Every token is processed by exactly k experts:
no capacity limit, no dropped tokens.

Expert MLP (GPT-OSS's clamped SwiGLU): one fused projection gives gate and up channels *interleaved*
(even columns gate, odd columns up);
    gate = min(gate, limit);  up = clamp(up, -limit, limit)
    h = (up + 1) * gate * sigmoid(alpha * gate)
    y = h @ W_down + b_down
The clamp keeps activations bounded (helps low-precision training and inference); `up + 1` makes the gate an
identity-plus-residual rather than a pure product.

Training regularisers (returned, weighted by config coefficients, as the model's `aux_loss`):
  * load balancing (Switch Transformer): E * sum_e f_e * P_e, where f_e is the share of the N*k assignments that
    went to expert e and P_e the mean router probability of e over all E. It equals 1 when routing is
    uniform and grows as load concentrates (up to E).
  * router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, keeps router logits small and stable.
  * jitter: multiplicative noise U(1-eps, 1+eps) on the router input during training (Switch Transformer).

Two dispatch implementations of the same function, chosen by `config.moe_implementation`:
  * `loop`: for each expert, gather its tokens, run the MLP, scatter back (the obviously correct reference);
  * `sorted`: sort the N*k assignments by expert so each expert's tokens are one contiguous slice, multiply
    every slice by its expert's weights in one grouped matmul (`grouped_linear`: torch's grouped_mm kernel on
    an accelerator where this torch/dtype has one; on CPU, and elsewhere, one addmm per slice, with its backward
    written out), and add the weighted results back with one index_add.

Under autograd, the stacked [E, ...] parameters are indexed per expert through `unbind`, not `weight[e]`: the
backward of `weight[e]` materialises a zero [E, ...] gradient per expert (E^2 traffic; with 32 experts this
alone made a layer ~10x slower), whereas the backward of unbind stacks the E slices once. (The addmm loop of
`grouped_linear` does its own backward and writes each expert's gradient into its slice directly.)
"""

from __future__ import annotations

import itertools
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn


class RouterStats:
    """What a MoE layer reports besides its output (per layer). The two losses are computed on first access, so
    that decoding, which never reads them, does not pay for them."""

    def __init__(self, router_logits: torch.Tensor, expert_indices: torch.Tensor, num_experts: int):
        self.router_logits = router_logits  # [N, E]
        self.expert_indices = expert_indices  # [N, k]
        self.expert_counts = torch.bincount(expert_indices.reshape(-1), minlength=num_experts)  # [E], no grad

    @cached_property
    def load_balancing_loss(self) -> torch.Tensor:  # scalar
        return load_balancing_loss(self.router_logits, self.expert_indices)

    @cached_property
    def z_loss(self) -> torch.Tensor:  # scalar
        return router_z_loss(self.router_logits)


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gate_up [..., 2I] with gate/up interleaved -> [..., I]."""
    # unbind rather than the slices [..., ::2] and [..., 1::2]: the backward of unbind writes the interleaved
    # gradient in one pass (a stack), where each slice's backward zero-fills a full [..., 2I] tensor and the
    # two are then added: 80 -> 63 ms for the forward and backward of [8192, 1024] on 2 CPU cores (bench/step_parts.py).
    gate, up = gate_up.unflatten(-1, (-1, 2)).unbind(-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def load_balancing_loss(router_logits: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
    """router_logits [N, E], expert_indices [N, k] -> scalar E * sum_e f_e * P_e (1.0 when perfectly uniform)."""
    num_experts = router_logits.shape[-1]
    probs = router_logits.float().softmax(dim=-1)  # [N, E]
    counts = torch.zeros(num_experts, device=probs.device).index_add_(
        0, expert_indices.reshape(-1), torch.ones(expert_indices.numel(), device=probs.device)
    )
    fraction = counts / expert_indices.numel()  # f_e: share of assignments (no gradient: it comes from top-k)
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """router_logits [N, E] -> scalar mean_n logsumexp_e(logits)^2."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


class Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.jitter = config.router_jitter_noise
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_local_experts))

    def forward(self, x: torch.Tensor):
        """x [N, H] -> logits [N, E], mixing weights [N, k], expert indices [N, k]."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(x, self.weight, self.bias)
        top_logits, indices = torch.topk(logits, self.top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)
        return logits, weights, indices


class Experts(nn.Module):
    """E expert MLPs stored as stacked tensors (HF GptOss layout: x @ W, gate/up interleaved)."""

    def __init__(self, config):
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size  # noqa: E741
        self.num_experts = E
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.implementation = config.moe_implementation
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H))

    def forward_loop(self, x, indices, weights):
        """Reference: x [N, H], indices/weights [N, k] -> [N, H]."""
        out = torch.zeros_like(x)
        per_expert = (self.gate_up_proj, self.gate_up_proj_bias, self.down_proj, self.down_proj_bias)
        for e, (gate_up, gate_up_bias, down, down_bias) in enumerate(zip(*(p.unbind(0) for p in per_expert))):
            token, slot = torch.where(indices == e)
            if token.numel():
                h = clamped_swiglu(x[token] @ gate_up + gate_up_bias, self.alpha, self.limit)
                y = (h @ down + down_bias) * weights[token, slot, None]
                out.index_add_(0, token, y.to(x.dtype))
        return out

    def forward_sorted(self, x, indices, weights):
        """Dispatch by sorting assignments by expert: x [N, H], indices/weights [N, k] -> [N, H]."""
        N, k = indices.shape
        flat_expert = indices.reshape(-1)  # [N*k]
        order = torch.argsort(flat_expert, stable=True)
        token = order // k  # which token each sorted assignment came from
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        # index_select rather than x[token]: its backward is an index_add, several times faster on CPU than the
        # accumulating index_put that advanced indexing's backward uses.
        xs = x.index_select(0, token)  # [N*k, H], grouped by expert
        h = grouped_linear(xs, self.gate_up_proj, self.gate_up_proj_bias, counts)
        y = grouped_linear(clamped_swiglu(h, self.alpha, self.limit), self.down_proj, self.down_proj_bias, counts)
        y = y * weights.reshape(-1).index_select(0, order)[:, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def forward(self, x, indices, weights):
        if self.implementation == "loop":
            return self.forward_loop(x, indices, weights)
        return self.forward_sorted(x, indices, weights)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool | None = None
) -> torch.Tensor:
    """Rows of x [M, in] grouped by expert (counts [E], summing to M) times that expert's weight [E, in, out] + bias.

    use_grouped_mm: None = torch's grouped_mm kernel on accelerators where it works (see `grouped_mm_available`),
    else a loop over the experts' slices; True/False force one (tests compare the two).
    """
    dtype = _matmul_dtype(x, weight)
    xd, wd = x.to(dtype), weight.to(dtype)  # grouped_mm has no autocast rule: cast by hand (no-ops without autocast)
    if use_grouped_mm is None:
        # On CPU the loop is faster (addmm adds the bias in the product; 57 vs 62 ms forward and backward for the
        # tiny preset's gate_up at 8,192 rows, bench/step_parts.py), and its host sync costs nothing there.
        use_grouped_mm = x.device.type != "cpu" and grouped_mm_available(x.device, dtype) and _aligned(xd, wd)
    if use_grouped_mm:
        offsets = counts.cumsum(0, dtype=torch.int32)  # end row of each group
        with torch.autocast(x.device.type, enabled=False):
            out = _GROUPED_MM(xd, wd, offs=offsets)
        # One bias row per expert, repeated over its rows; output_size avoids a device->host sync.
        return out + bias.to(out.dtype).repeat_interleave(counts, dim=0, output_size=x.shape[0])
    return _GroupedLinearLoop.apply(xd, wd, bias.to(dtype), counts.tolist())


class _GroupedLinearLoop(torch.autograd.Function):
    """One addmm per expert slice: x [M, in] (rows grouped by expert), weight [E, in, out], bias [E, out], splits
    (rows per expert, a list) -> [M, out], all in one dtype.

    Written out as a Function so that every product lands straight in its rows of one preallocated tensor: the
    output forward; the input, weight and bias gradients backward. Left to autograd, the same loop (split, addmm,
    cat) also copies the outputs together (cat), the input gradient's slices (split's backward) and the experts'
    weight gradients (unbind's backward, a stack). `python bench/step_parts.py` times the two ("expert-loop");
    tests/test_fast_paths.py checks them against each other.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, splits):
        out = x.new_empty(x.shape[0], weight.shape[-1])
        for e, rows in enumerate(_slices(splits)):
            if rows.stop > rows.start:
                torch.addmm(bias[e], x[rows], weight[e], out=out[rows])
        ctx.save_for_backward(x, weight)
        ctx.splits = splits
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = grad_out.new_empty(weight.shape[0], weight.shape[-1]) if need_b else None
        for e, rows in enumerate(_slices(ctx.splits)):
            if rows.stop == rows.start:  # an expert without rows: zero gradients
                for grad in (grad_w, grad_b):
                    if grad is not None:
                        grad[e].zero_()
                continue
            g = grad_out[rows]
            if need_x:
                torch.mm(g, weight[e].t(), out=grad_x[rows])
            if need_w:
                torch.mm(x[rows].t(), g, out=grad_w[e])
            if need_b:
                torch.sum(g, dim=0, out=grad_b[e])
        return grad_x, grad_w, grad_b, None


def _slices(splits: list[int]) -> list[slice]:
    """Row ranges of consecutive groups: [2, 0, 3] -> [0:2, 2:2, 2:5]."""
    ends = list(itertools.accumulate(splits))
    return [slice(end - n, end) for end, n in zip(ends, splits)]


# torch >= 2.10 calls it F.grouped_mm; 2.8/2.9 have the private torch._grouped_mm (CUDA only before 2.9).
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_mm works on this device type and dtype (probed once, then cached).

    Support varies with the torch version, the device (CPU kernel from torch 2.9; CUDA needs sm80+) and dtype
    (some CUDA builds take bfloat16 only), so tiny calls are tried instead of encoding a version table: the
    forward product and the 2D x 2D one its backward uses for the weight gradient. The probe runs without
    autograd, so that nothing it does is recorded (it may first run inside a checkpointed block).
    """
    key = (device.type, dtype)
    if key not in _GROUPED_MM_WORKS:
        works = _GROUPED_MM is not None
        if works:
            try:
                with torch.no_grad():
                    # Fixed inputs (not torch.randn): probing must not move the caller's random stream.
                    x = torch.linspace(-1, 1, 128, device=device).view(8, 16).to(dtype)
                    w = torch.linspace(-1, 1, 256, device=device).view(2, 16, 8).to(dtype)
                    offsets = torch.tensor([3, 8], device=device, dtype=torch.int32)
                    y = _GROUPED_MM(x, w, offs=offsets)  # [8, 8]: rows 0-2 times w[0], rows 3-7 times w[1]
                    grad_w = _GROUPED_MM(x.t(), y, offs=offsets)  # [2, 16, 8], as autograd's backward calls it
                    expected_y = torch.cat([x[:3] @ w[0], x[3:] @ w[1]])
                    expected_grad_w = torch.stack([x[:3].t() @ y[:3], x[3:].t() @ y[3:]])
                    works = all(
                        torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)
                        for got, want in ((y, expected_y), (grad_w, expected_grad_w))
                    )
            except (RuntimeError, NotImplementedError, TypeError):
                works = False
        _GROUPED_MM_WORKS[key] = works
    return _GROUPED_MM_WORKS[key]


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x and weight runs in: the autocast dtype under autocast, else the promoted one."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def _aligned(*tensors: torch.Tensor) -> bool:
    """grouped_mm's kernels want 16-byte aligned data (memory-mapped checkpoints may not be) and row strides in
    multiples of 16 bytes (e.g. no bfloat16 width of 20); anything else takes the loop."""
    return all(
        t.data_ptr() % 16 == 0 and all(stride * t.element_size() % 16 == 0 for stride in t.stride() if stride != 1)
        for t in tensors
    )


class MoE(nn.Module):
    """Router + experts: x [B, T, H] -> (y [B, T, H], RouterStats)."""

    def __init__(self, config):
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor):
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        logits, weights, indices = self.router(flat)
        y = self.experts(flat, indices, weights)
        return y.reshape(B, T, H), RouterStats(logits, indices, self.experts.num_experts)
