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
  * `sorted`: sort the N*k assignments by expert so each expert's tokens are one contiguous slice, run each
    expert's matmul on its slice (`grouped_linear`), and add the weighted results back with one index_add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterStats:
    """What a MoE layer reports besides its output (per layer)."""

    load_balancing_loss: torch.Tensor  # scalar
    z_loss: torch.Tensor  # scalar
    expert_counts: torch.Tensor  # [E] assignments per expert in this forward (no grad)


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gate_up [..., 2I] with gate/up interleaved -> [..., I]."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
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

    def expert_mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens: x [n, H] -> [n, H]."""
        h = clamped_swiglu(x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e], self.alpha, self.limit)
        return h @ self.down_proj[e] + self.down_proj_bias[e]

    def forward_loop(self, x, indices, weights):
        """Reference: x [N, H], indices/weights [N, k] -> [N, H]."""
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(indices == e)
            if token.numel():
                y = self.expert_mlp(e, x[token]) * weights[token, slot, None]
                out.index_add_(0, token, y.to(x.dtype))
        return out

    def forward_sorted(self, x, indices, weights):
        """Dispatch by sorting assignments by expert: x [N, H], indices/weights [N, k] -> [N, H]."""
        N, k = indices.shape
        flat_expert = indices.reshape(-1)  # [N*k]
        order = torch.argsort(flat_expert, stable=True)
        token = order // k  # which token each sorted assignment came from
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        xs = x[token]  # [N*k, H], grouped by expert
        h = grouped_linear(xs, self.gate_up_proj, self.gate_up_proj_bias, counts)
        y = grouped_linear(clamped_swiglu(h, self.alpha, self.limit), self.down_proj, self.down_proj_bias, counts)
        y = y * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def forward(self, x, indices, weights):
        if self.implementation == "loop":
            return self.forward_loop(x, indices, weights)
        return self.forward_sorted(x, indices, weights)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x [M, in] grouped by expert (counts [E], summing to M) times that expert's weight [E, in, out] + bias."""
    splits = counts.tolist()
    outs = [
        torch.addmm(bias[e], xe, weight[e]) if n else xe.new_zeros(0, weight.shape[-1])
        for e, (xe, n) in enumerate(zip(x.split(splits), splits))
    ]
    return torch.cat(outs)


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
        stats = RouterStats(
            load_balancing_loss=load_balancing_loss(logits, indices),
            z_loss=router_z_loss(logits),
            expert_counts=torch.bincount(indices.reshape(-1), minlength=self.experts.num_experts).detach(),
        )
        return y.reshape(B, T, H), stats
