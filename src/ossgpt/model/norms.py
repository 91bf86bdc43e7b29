"""RMSNorm: scale each vector to unit root-mean-square, then by a learned per-channel gain.

GPT-OSS computes the statistics in float32 whatever the activation dtype (bf16 squares lose too much
precision), and applies the gain *before* casting back, which is what HF's GptOssRMSNorm does too.
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., hidden] -> [..., hidden], same dtype as x."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)
