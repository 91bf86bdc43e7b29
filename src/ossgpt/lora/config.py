"""LoRAConfig: which projections get low-rank adapters, of what rank, at what scale. Saved beside the adapters
(`adapter_config.json`, ossgpt.lora.files)."""

from __future__ import annotations

import math
from dataclasses import dataclass

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # each an nn.Linear of ossgpt.model.attention
EXPERT_TARGETS = ("gate_up_proj", "down_proj")  # the two projections of every expert (ossgpt.model.moe.Experts)
LORA_TARGETS = (*ATTENTION_TARGETS, *EXPERT_TARGETS, "router")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8  # r: the inner width of every adapter
    alpha: float = 16.0  # the update is scaled by alpha / r, so that changing r does not change the step size
    targets: tuple[str, ...] = ATTENTION_TARGETS + EXPERT_TARGETS  # the router is left out by default

    def __post_init__(self):
        if type(self.rank) is not int or self.rank < 1:  # (a bool is not accepted)
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if type(self.alpha) not in (int, float) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)) or not self.targets:
            names = ", ".join(LORA_TARGETS)
            raise ValueError(f"LoRA targets must be a non-empty list of names ({names}), got {self.targets!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets list a name twice: {list(self.targets)}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in self.targets))  # one order

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, values: dict) -> LoRAConfig:
        if not isinstance(values, dict):
            raise ValueError(f"a LoRA config must be a JSON object with rank, alpha and targets, got {values!r}")
        unknown = sorted(set(values) - {"rank", "alpha", "targets"})
        if unknown:
            raise ValueError(f"unknown LoRA config key(s) {', '.join(unknown)}; expected rank, alpha and targets")
        return cls(**values)
