"""RMSNorm: scale each vector to unit root-mean-square, then by a learned per-channel gain.

    y = weight * x / sqrt(mean(x^2) + eps)

GPT-OSS computes the statistics in float32 whatever the activation dtype (bf16 squares lose too much
precision), and applies the gain *before* casting back, which is what HF's GptOssRMSNorm does too.
`rms_norm_reference` writes the formula out; `RMSNorm` runs the same computation through torch's fused
`F.rms_norm` on the float32 upcast: one kernel instead of six, the same float32 result (tests/test_model_units.py
compares the two), and fewer per-call costs where they show, decoding one token at a time (`python
bench/step_parts.py`, "rmsnorm"). Where no gradient is wanted of float32 on the CPU, one native call does the same
(ossgpt.kernels.native.rms_norm): cheaper still per call.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ossgpt.kernels import native


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden], weight [hidden] -> [..., hidden] in x's dtype, step by step in float32."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x32).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., hidden] -> [..., hidden], same dtype as x."""
        out = native.rms_norm(x, self.weight, self.eps)  # None: not float32 on the CPU without gradients
        if out is not None:
            return out
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
