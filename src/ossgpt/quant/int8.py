"""Faster decoding through int8: a copy of the model whose matmul weights are stored as int8.

Decoding one token reads every weight it uses once and does two FLOPs per weight: it is bound by memory
bandwidth, not arithmetic. For the `mini` preset that is ~255 MB of float32 per token, 80% of it the
100k x 512 LM head. Stored as int8 with one float scale per output channel (symmetric, round to nearest), the
same matrices are 4x smaller, and `torch._weight_int8pack_mm` multiplies bfloat16 activations by them without
materialising the float weights ("weight-only" int8).

`quantize_for_decoding(model)` returns such a copy (the original is untouched): the LM head (untied from the
embedding, which stays float32: a lookup reads one row per token), the attention projections and the experts
become int8; norms, router, sinks and biases stay as they were. The copy is for inference: generate with it as
with the original (`ossgpt.inference.generate` needs no change). Its logits differ from float32's by the
rounding of the weights (relative error ~1e-2), so greedy decoding can pick a different token where two are
nearly tied. The float32 model is the reference the tests compare against.

`quantize_for_decoding(model, dynamic_lm_head=True)` also quantizes the LM head's *input* to int8 at run time,
one scale per row (symmetric, absmax / 127; "dynamic" W8A8), and multiplies with `torch._int_mm`: int8 x int8
products summed exactly in int32, then scaled by (row scale x channel scale). For `mini`'s LM head on 2 CPU
cores that is 1.5x faster than the weight-only path at one row and 2.1x at eight, with the weight read from
memory as in decoding (`python bench/int8_rows.py --cold`, the two `ossgpt` columns). It adds the activation's
rounding (at most half a step of 1/127 of the row's largest value per element) to the logits' error. Only the
LM head does it: there one quantization of a 512-wide row per token is nothing next to its 51M weights, while
for the small attention and expert matrices the extra ops cost about what they save
(`python bench/int8_rows.py --vocab 1536 --hidden 512`: 0.041 vs 0.045 ms at one row).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ossgpt.model.moe import Experts, clamped_swiglu


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (int8 [out, in], scales [out] bfloat16) with weight ~= int8 * scales[:, None].

    The scales are rounded to bfloat16 (the kernel's dtype) before quantizing, so int8 * scale is exactly what
    the kernel multiplies by."""
    scales = (weight.detach().abs().amax(dim=1).float().clamp(min=1e-12) / 127).to(torch.bfloat16)
    return (weight.detach().float() / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8), scales


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] times int8 weight [out, in] (per-row bfloat16 scales [out]) -> [..., out] in x's dtype.

    The kernel takes bfloat16 activations (its float32 variant is ~10x slower on CPU); without it, or when `in`
    is not a multiple of 16, the reference: dequantize, then an ordinary matmul. (torch 2.13's CPU kernel gives
    wrong sums or crashes for other widths, e.g. 8, 12 or 24: `tests/test_fast_paths.py` checks a range of them.)"""
    flat = x.reshape(-1, x.shape[-1])
    if x.shape[-1] % 16 == 0 and int8_mm_available(x.device):
        out = torch._weight_int8pack_mm(flat.to(torch.bfloat16), weight, scales)
    else:
        out = F.linear(flat, weight.to(flat.dtype) * scales.to(flat.dtype)[:, None])
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, in] float -> (int8 [rows, in], scales [rows, 1] float32) with x ~= int8 * scales (symmetric,
    absmax / 127 per row; an all-zero row gets scale 1e-12 / 127 and zeros)."""
    scales = x.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 127
    return (x.float() / scales).round_().clamp_(-127, 127).to(torch.int8), scales


def int8_dynamic_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] float, quantized per row at run time, times int8 weight [out, in] (bfloat16 scales [out])
    -> [..., out] in x's dtype: (x_int8 @ weight^T) summed exactly in int32, times row scale x channel scale.

    `torch._int_mm` where it works on this device; elsewhere the same integer products in float32 (exact while
    in x 127^2 < 2^24, i.e. in <= 1040; float32-rounded sums beyond)."""
    flat = x.reshape(-1, x.shape[-1])
    x_q, x_scales = quantize_rows(flat)
    if int_mm_available(x.device):
        acc = torch._int_mm(x_q, weight.t())  # [rows, out] int32
    else:
        acc = x_q.float() @ weight.float().t()
    out = acc.float().mul_(scales).mul_(x_scales)  # [rows, out] float32; in place: one pass fewer than acc * s
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def int_mm_available(device: torch.device) -> bool:
    """Whether `torch._int_mm` takes one-row products on this device type and sums them exactly (probed once).

    CUDA's kernel wants more than 16 rows, so there decoding takes the float32 path instead."""
    return _kernel_works("_int_mm", device.type)


def int8_mm_available(device: torch.device) -> bool:
    """Whether `torch._weight_int8pack_mm` exists and is right on this device type (probed once, then cached)."""
    return _kernel_works("_weight_int8pack_mm", device.type)


@functools.cache
def _kernel_works(kernel: str, device_type: str) -> bool:
    """Whether torch.<kernel> exists and gets its probe (`_PROBES`) right on this device type."""
    if not hasattr(torch, kernel):
        return False
    try:
        return _PROBES[kernel](torch.device(device_type))
    except (RuntimeError, NotImplementedError):
        return False


def _probe_int_mm(device: torch.device) -> bool:
    a = torch.arange(-63, 65, device=device, dtype=torch.int8).view(1, 128)
    b = torch.arange(-127, 129, device=device).remainder(255).sub(127).to(torch.int8).view(128, 2)
    return bool(torch.equal(torch._int_mm(a, b).long(), (a.double() @ b.double()).long()))


def _probe_int8pack_mm(device: torch.device) -> bool:
    x = torch.linspace(-1, 1, 64, device=device).view(2, 32).to(torch.bfloat16)
    w = torch.arange(-64, 64, device=device, dtype=torch.int8).view(4, 32)
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0], device=device, dtype=torch.bfloat16)
    expected = x.float() @ (w.float() * scales.float()[:, None]).T
    return bool(torch.allclose(torch._weight_int8pack_mm(x, w, scales).float(), expected, rtol=2e-2, atol=2e-2))


_PROBES = {"_int_mm": _probe_int_mm, "_weight_int8pack_mm": _probe_int8pack_mm}


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight [out, in] and bfloat16 scales [out]; the bias (if any) stays float.

    dynamic: also quantize the input to int8 per row at run time (`int8_dynamic_linear`); else weight-only."""

    def __init__(self, linear: nn.Linear, dynamic: bool = False):
        super().__init__()
        qweight, scales = quantize_int8(linear.weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.dynamic = dynamic

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight (for code that reads `.weight`, e.g. the chunked loss)."""
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (int8_dynamic_linear if self.dynamic else int8_linear)(x, self.qweight, self.scales)
        return out if self.bias is None else out + self.bias


class Int8Experts(Experts):
    """`Experts` with int8 weights: gate_up [E, 2I, H] and down [E, H, I] (output channels first), bf16 scales."""

    def __init__(self, experts: Experts, config):
        with torch.device("meta"):
            super().__init__(config)
        del self.gate_up_proj, self.down_proj  # replaced by the int8 buffers
        gate_up = [quantize_int8(w.T) for w in experts.gate_up_proj.unbind(0)]
        down = [quantize_int8(w.T) for w in experts.down_proj.unbind(0)]
        self.register_buffer("gate_up_qweight", torch.stack([q for q, _ in gate_up]))
        self.register_buffer("gate_up_scales", torch.stack([s for _, s in gate_up]))
        self.register_buffer("down_qweight", torch.stack([q for q, _ in down]))
        self.register_buffer("down_scales", torch.stack([s for _, s in down]))
        self.gate_up_proj_bias = nn.Parameter(experts.gate_up_proj_bias.detach().clone(), requires_grad=False)
        self.down_proj_bias = nn.Parameter(experts.down_proj_bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], indices/weights [N, k] -> [N, H]: the loop of `Experts.forward_loop` over the experts that
        received tokens (when decoding, k of them)."""
        if x.shape[0] == 1:  # one token (batch-1 decoding): its k experts in turn, no grouping needed
            return sum(self.expert(e, x) * w for e, w in zip(indices[0].tolist(), weights[0, :, None]))
        out = torch.zeros_like(x)
        for e in indices.unique().tolist():
            token, slot = torch.where(indices == e)
            out.index_add_(0, token, (self.expert(e, x[token]) * weights[token, slot, None]).to(x.dtype))
        return out

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's MLP on its tokens: x [n, H] -> [n, H]."""
        h = int8_linear(x, self.gate_up_qweight[e], self.gate_up_scales[e]) + self.gate_up_proj_bias[e]
        h = clamped_swiglu(h, self.alpha, self.limit)
        return int8_linear(h, self.down_qweight[e], self.down_scales[e]) + self.down_proj_bias[e]


@torch.no_grad()
def quantize_for_decoding(model: nn.Module, dynamic_lm_head: bool = False) -> nn.Module:
    """A copy of `model` (in eval mode) with int8 LM head, attention projections and experts; see the module doc.

    dynamic_lm_head: the LM head quantizes its input too (W8A8, `int8_dynamic_linear`)."""
    quantized = copy.deepcopy(model).eval()
    quantized.loss_workspace = {}  # training scratch, not needed for decoding
    for p in quantized.parameters():
        p.requires_grad_(False)
    # A new module: the embedding keeps its float weight.
    quantized.lm_head = Int8Linear(quantized.lm_head, dynamic=dynamic_lm_head)
    for layer in quantized.layers:
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attention, name, Int8Linear(getattr(attention, name)))
        layer.mlp.experts = Int8Experts(layer.mlp.experts, quantized.config)
    return quantized
