"""LoRAConfig: which projections get low-rank adapters, of what rank, at what scale, and which tokens' embedding rows
train beside them (ossgpt.lora.tokens). Saved beside the adapters (`adapter_config.json`, ossgpt.lora.files)."""

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
    tokens: tuple[int, ...] = ()  # token ids whose embedding rows (and LM head rows) train too; sorted

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
        if isinstance(self.tokens, str) or not isinstance(self.tokens, (tuple, list)):
            raise ValueError(f"LoRA tokens must be a list of token ids, got {self.tokens!r}")
        bad = [t for t in self.tokens if type(t) is not int or t < 0]  # (a bool is not accepted)
        if bad:
            raise ValueError(f"LoRA tokens must be non-negative integer token ids, got {bad[0]!r}")
        if len(set(self.tokens)) != len(self.tokens):
            twice = next(t for t in self.tokens if self.tokens.count(t) > 1)
            raise ValueError(f"LoRA tokens list token {twice} twice")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "tokens", tuple(sorted(self.tokens)))
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in self.targets))  # one order

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        # Tokens only when there are some: adapters without them read as before, by older versions too.
        tokens = {"tokens": list(self.tokens)} if self.tokens else {}
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), **tokens}

    @classmethod
    def from_dict(cls, values: dict) -> LoRAConfig:
        """The config to_dict wrote; one written before `tokens` existed (no such key) trains no rows."""
        if not isinstance(values, dict):
            raise ValueError(f"a LoRA config must be a JSON object with rank, alpha and targets, got {values!r}")
        unknown = sorted(set(values) - {"rank", "alpha", "targets", "tokens"})
        if unknown:
            expected = "rank, alpha, targets and tokens"
            raise ValueError(f"unknown LoRA config key(s) {', '.join(unknown)}; expected {expected}")
        return cls(**values)
