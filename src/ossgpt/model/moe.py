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

Experts run in one of two ways, the same function (`RuntimeOptions.experts`):
  * "loop", written out below: each expert that received tokens gathers them, runs its MLP, and adds its
    outputs back, weighted by the routing weights; the plain reference;
  * "sorted" (the default), `ossgpt.kernels.experts.sorted_experts`: the same sums through one grouped product per
    projection over the tokens sorted by expert.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from ossgpt.kernels import native
from ossgpt.kernels.experts import grouped_linear, sorted_experts


class RouterStats:
    """What a MoE layer reports besides its output (per layer). The expert counts and the two losses are computed
    on first access, so that decoding, which never reads them, does not pay for them."""

    def __init__(self, router_logits: torch.Tensor, expert_indices: torch.Tensor, num_experts: int):
        self.router_logits = router_logits  # [N, E]
        self.expert_indices = expert_indices  # [N, k]
        self.num_experts = num_experts

    @cached_property
    def expert_counts(self) -> torch.Tensor:  # [E], tokens routed to each expert (no grad)
        return torch.bincount(self.expert_indices.reshape(-1), minlength=self.num_experts)

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
    # two are then added (`python bench/step_parts.py`, "swiglu").
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
        logits = self.logits(x)
        routed = native.top_k_softmax(logits, self.top_k)  # one native call in float32 on the CPU without gradients
        if routed is not None:
            return logits, *routed
        top_logits, indices = torch.topk(logits, self.top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)
        return logits, weights, indices

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> router logits [N, E]."""
        return F.linear(x, self.weight, self.bias)


class Experts(nn.Module):
    """E expert MLPs stored as stacked tensors (HF GptOss layout: x @ W, gate/up interleaved):
    gate_up_proj [E, H, 2I] + gate_up_proj_bias [E, 2I], down_proj [E, I, H] + down_proj_bias [E, H]."""

    def __init__(self, config, kernel: str = "sorted"):
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size  # noqa: E741
        self.num_experts = E
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.kernel = kernel  # "sorted" or "loop"; the model sets it from its RuntimeOptions
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], indices/weights [N, k] (each token's experts and mixing weights) -> [N, H]."""
        if self.kernel == "sorted":
            return sorted_experts(x, indices, weights, self.num_experts, self.grouped, self.activation)
        return self.loop(x, indices, weights)

    def grouped(self, projection: str, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The projection ("gate_up_proj" or "down_proj") of rows grouped by expert, xs [M, in] (counts [E] rows
        each) -> [M, out], in one grouped product (what `sorted_experts` calls)."""
        return grouped_linear(xs, getattr(self, projection), getattr(self, f"{projection}_bias"), counts)

    def loop(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The reference: x [N, H], indices/weights [N, k] -> [N, H], one expert at a time, over the experts that
        received tokens only. Under autograd each `weight[e]` has a full-size [E, ...] gradient, which makes this
        slow with many experts: fine for the reference; the sorted kernel is what trains. (Experts that store
        their weights in another form, ossgpt.quant's, reuse this loop by redefining `expert`.)"""
        if x.shape[0] == 1:  # one token (decoding one sequence): its k experts in turn, nothing to gather
            return sum(self.expert(e, x) * w for e, w in zip(indices[0].tolist(), weights[0, :, None])).to(x.dtype)
        out = torch.zeros_like(x)
        for e in indices.unique().tolist():
            token, slot = torch.where(indices == e)  # the tokens that chose e, and where e is in their top k
            out.index_add_(0, token, (self.expert(e, x[token]) * weights[token, slot, None]).to(x.dtype))
        return out

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's MLP: x [n, H] -> [n, H]."""
        h = self.activation(x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e])
        return h @ self.down_proj[e] + self.down_proj_bias[e]

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[..., 2I] -> [..., I]"""
        return clamped_swiglu(gate_up, self.alpha, self.limit)


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
