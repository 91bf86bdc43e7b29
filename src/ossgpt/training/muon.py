"""Muon: momentum whose update is orthogonalised, for the transformer's weight matrices; AdamW for the rest.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) keeps an SGD momentum buffer M per
matrix and steps along the nearest semi-orthogonal matrix to it, the polar factor U V^T of M = U S V^T: every
direction the gradient touches moves at the same rate, instead of the few largest ones dominating. Adam's update
is close to the sign of the gradient, elementwise; Muon's is its matrix analogue. On small transformers it reaches
a given loss in noticeably fewer steps than AdamW (docs/recipe.md measures it here).

    M <- beta M + (1 - beta) G                         momentum
    N  = beta M + (1 - beta) G                          Nesterov look-ahead (or N = M without it)
    O  = orthogonalize(N)                               ~ U V^T, by five Newton-Schulz iterations (no SVD)
    W <- W (1 - lr wd) - lr * 0.2 sqrt(max(rows, cols)) * O

The factor 0.2 sqrt(max(rows, cols)) gives O (whose entries have RMS 1/sqrt(max(rows, cols))) the update RMS
of a typical AdamW step, 0.2 (Liu et al. 2025, "Muon is scalable for LLM training"), so `--learning-rate` and
`--weight-decay` mean the same for both optimizers and the schedule drives every group alike.

Cost: three matmuls per iteration per matrix, ~40 GFLOP a step for the tiny preset (`python bench/step_parts.py`,
"muon", times it). Under FSDP2 each process gathers the whole matrix to orthogonalise it.

Which parameters: the attention projections and the expert matrices, 2-D per matrix (an expert stack
[E, in, out] is E matrices, orthogonalised one by one in a batch). The token embedding (a lookup table, also
the tied LM head), the router, biases, norms and sinks are not hidden-layer matrices and keep AdamW.
"""

from __future__ import annotations

import math

import torch

# Quintic Newton-Schulz coefficients (Jordan): chosen for the steepest slope at 0, so that small singular values
# grow fast; the result has singular values in about [0.7, 1.2] rather than exactly 1, which trains as well.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """[..., rows, cols] -> [..., rows, cols]: about U V^T of each matrix's SVD U S V^T (Newton-Schulz).

    Each iteration maps every singular value s to a s + b s^3 + c s^5 and leaves the singular vectors alone;
    after dividing by the Frobenius norm (so that s <= 1) five of them push every s towards 1.
    """
    transpose = matrix.size(-2) > matrix.size(-1)  # iterate on the wide orientation: the Gram matrix is smaller
    wide = matrix.mT if transpose else matrix
    x = wide.reshape(-1, *wide.shape[-2:])  # baddbmm wants one batch dimension: [batch, rows, cols]
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT  # [batch, rows, rows]
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b gram + c gram^2, one kernel
        x = torch.baddbmm(x, poly, x, beta=a)  # a x + poly x
    x = x.view(wide.shape)
    return x.mT if transpose else x


def uses_muon(name: str, param: torch.Tensor) -> bool:
    """Whether a parameter is a hidden-layer weight matrix (Muon) rather than an embedding, router, bias, norm or
    sink (AdamW). Names are those of `GPTOSS.named_parameters()`, under any wrapper's prefix."""
    if param.ndim < 2:
        return False
    attention = ".self_attn." in name and name.endswith("_proj.weight")  # q, k, v, o
    experts = ".experts." in name and name.endswith("_proj")  # gate_up_proj, down_proj (not their biases)
    return attention or experts


class Muon(torch.optim.Optimizer):
    """Muon for groups with `muon=True`, AdamW for the others (decoupled weight decay in both).

    Every group takes `lr` and `weight_decay`; AdamW groups `betas` and `eps`, Muon groups `momentum`, `nesterov`
    and `ns_steps`. State per parameter: Muon `momentum_buffer`; AdamW `step`, `exp_avg`, `exp_avg_sq`.
    Works on plain tensors and on FSDP2's sharded DTensors (each matrix is gathered to orthogonalise it).
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):  # fmt: skip
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, muon=False)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if group["muon"]:
                    self._muon_update(param, group)
                else:
                    self._adamw_update(param, group)
        return loss

    def _muon_update(self, param: torch.Tensor, group: dict) -> None:
        grad, state = param.grad, self.state[param]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"]
        buffer.lerp_(grad, 1 - group["momentum"])
        update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
        orthogonal = _orthogonalize_full(update, group["ns_steps"])
        rows, cols = param.shape[-2:]
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(orthogonal, alpha=-group["lr"] * 0.2 * math.sqrt(max(rows, cols)))

    def _adamw_update(self, param: torch.Tensor, group: dict) -> None:
        grad, state = param.grad, self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1**step))


def _orthogonalize_full(update: torch.Tensor, steps: int) -> torch.Tensor:
    """`orthogonalize` of the whole matrix, also when `update` is one process's shard of it (an FSDP2 DTensor):
    gathered, orthogonalised on every process alike, then cut back to this process's shard (no communication)."""
    if not hasattr(update, "full_tensor"):
        return orthogonalize(update, steps)
    from torch.distributed.tensor import DTensor, Replicate  # only sharded runs get here

    full = orthogonalize(update.full_tensor(), steps)
    replicated = DTensor.from_local(full, update.device_mesh, [Replicate()] * update.device_mesh.ndim, run_check=False)
    return replicated.redistribute(update.device_mesh, update.placements)
