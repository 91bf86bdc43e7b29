"""The optimizer (AdamW, or Muon for the hidden matrices), with weight decay on matrices only, and the schedule.

Weight decay pulls weights towards zero. That is a useful prior for the matrices (projections, experts,
router, embeddings), but not for parameters that set a scale or an offset: RMSNorm gains (decaying them shrinks
every activation), biases, and the attention sinks. Those are the 1-D parameters plus the experts' stacked
biases, which are [E, out] matrices by shape but biases by role, hence the name test.

The schedule: linear warm-up to the peak over `warmup_steps`, then a cosine from the peak down to `min_lr`
at `max_steps`. A run with a wall-clock budget (`--max-minutes`) usually stops long before `max_steps` on a
slow machine, and a cosine cut off half-way leaves the learning rate high, which costs a lot of loss; so the
decay follows whichever is further along, the steps or the budget (`time_progress`). Without a budget the
schedule is a pure function of the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ossgpt.training.muon import Muon, uses_muon


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether a parameter gets weight decay: matrices and stacked expert matrices, not norms, biases, sinks."""
    return param.ndim >= 2 and not name.endswith("bias")


def param_groups(model: nn.Module, weight_decay: float, muon: bool = False) -> list[dict]:
    """AdamW's two groups: decayed matrices, and the rest with weight_decay 0 (each parameter once, even if tied).
    With `muon`, first a Muon group of the hidden matrices (`uses_muon`), decayed, which the other two then lack."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = []
    if muon:
        groups.append({"params": [p for name, p in named if uses_muon(name, p)], "weight_decay": weight_decay,
                       "muon": True})  # fmt: skip
        named = [(name, p) for name, p in named if not uses_muon(name, p)]
    return groups + [
        {"params": [p for name, p in named if decays(name, p)], "weight_decay": weight_decay},
        {"params": [p for name, p in named if not decays(name, p)], "weight_decay": 0.0},
    ]


OPTIMIZERS = ("adamw", "muon")


def build_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    name: str = "adamw",
    ns_steps: int = 5,
) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters (the fused kernel on GPUs, torch's default implementation elsewhere), or
    Muon for the attention and expert matrices with AdamW for the rest (`name="muon"`, `ns_steps` Newton-Schulz
    iterations per update, see training.muon)."""
    if name == "muon":
        return Muon(param_groups(model, weight_decay, muon=True), lr=learning_rate, betas=betas, ns_steps=ns_steps)
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=learning_rate, betas=betas, fused=on_cuda or None)


def lr_at(
    step: int, learning_rate: float, min_lr: float, warmup_steps: int, max_steps: int, time_progress: float = 0.0
) -> float:
    """Learning rate of optimizer step `step` (0-based).

    step < warmup_steps:  learning_rate * (step + 1) / warmup_steps   (the first step already moves)
    afterwards:           min_lr + (learning_rate - min_lr) * (1 + cos(pi * progress)) / 2,
                          progress = max((step - warmup_steps) / (max_steps - warmup_steps), time_progress),
                          clamped to [0, 1]
    time_progress: the share of the time budget left after the warm-up that is spent (0: no budget).
    """
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = min(1.0, max(time_progress, (step - warmup_steps) / max(1, max_steps - warmup_steps)))
    return min_lr + (learning_rate - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
