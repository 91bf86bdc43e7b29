"""int8 matrix products: weights stored as int8 with one scale per output channel, or one per block of 32 values
along it, multiplied without materialising the float weights. The plain twin of each is `F.linear` of the
dequantized weight.

    quantize_int8(weight, block=None)         float [out, in] -> int8 [out, in], bfloat16 scales [out] (or
                                              [out, in / block])
    dequantize_int8(qweight, scales)          the float32 weight they hold
    int8_linear(x, qweight, scales)           weight-only: bfloat16 activations x int8 weights, row scales
                                              (`torch._weight_int8pack_mm`)
    int8_dynamic_linear(x, qweight, scales, bias)
                                              W8A8: x quantized at run time too, int8 x int8 summed exactly in
                                              int32, then scaled: on CPU by the native kernel (x per block of
                                              32 values, ossgpt.kernels.native; row or block scales), else
                                              `torch._int_mm` (x per row; row scales)
    native_scales(scales)                     scales as the native kernels read them (bfloat16 or float32, as stored)

Each torch kernel is probed once on a tiny product with a known answer before it is trusted (their support and
their correctness vary with the torch version, the device and the shapes); without it, the same products run
through the plain path. ossgpt.quant.int8 builds decoding models from these; `python bench/int8_rows.py` times
them against each other and the float kernels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ossgpt.kernels.native import native


def quantize_int8(
    weight: torch.Tensor, block: int | None = None, rows_at_once: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (int8 [out, in], bfloat16 scales) with weight ~= int8 * scale: one scale per row,
    scales [out], or with `block`, one per block of that many values along a row, scales [out, in / block] (the
    native kernel's 32: llama.cpp's Q8_0). A scale is the largest |value| it covers over 127.

    The scales are rounded to bfloat16 (the kernels' dtype) before quantizing, so int8 * scale is exactly what
    the kernel multiplies by. `rows_at_once` rows are converted at a time, so that the float temporaries stay
    small next to a big matrix (gpt-oss's LM head is 579M weights)."""
    out_features, in_features = weight.shape
    if block is not None and in_features % block:
        raise ValueError(f"blocks of {block} must divide the {in_features} input features")
    groups = in_features // block if block else 1
    qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(out_features, groups, dtype=torch.bfloat16, device=weight.device)
    for start in range(0, out_features, rows_at_once):
        rows = weight.detach()[start : start + rows_at_once].to(torch.float32, copy=True)
        rows = rows.view(-1, groups, in_features // groups)
        # (An all-zero block or row gets a tiny step, and zeros: 2^-100 / 127, still a normal bfloat16 number.)
        step = (rows.abs().amax(dim=2).clamp(min=2.0**-100) / 127).to(torch.bfloat16)  # [rows, groups]
        qweight[start : start + rows_at_once] = rows.div_(step.float()[..., None]).round_().clamp_(-127, 127).flatten(1)
        scales[start : start + rows_at_once] = step
    return qweight, scales if block else scales.view(out_features)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] and scales [out] or [out, in / block] (quantize_int8) -> float32 [out, in]."""
    out_features, in_features = qweight.shape
    groups = scales.shape[1] if scales.dim() == 2 else 1
    return (qweight.float().view(out_features, groups, -1) * scales.float().view(out_features, groups, 1)).flatten(1)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] times int8 weight [out, in] (per-row bfloat16 scales [out]) -> [..., out] in x's dtype.

    The kernel takes bfloat16 activations (its float32 variant is far slower on CPU); without it, or when `in`
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


def int8_dynamic_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias=None) -> torch.Tensor:
    """x [..., in] float, quantized at run time, times int8 weight [out, in] (bfloat16 scales [out], or [out, in /
    32] per block of 32), plus bias [out] if given -> [..., out] in x's dtype: x_int8 times weight summed exactly in
    int32, times x's step x the weight's scale.

    On CPU, where the native kernels are built and `in` is a multiple of 32: x is quantized per block of 32
    values (a step per block: finer than per row, and what lets one kernel read the int8 rows at memory speed), and
    the bias added in the same call. Else x is quantized per row: `torch._int_mm` where it works on this device;
    elsewhere the same integer products in float32 (exact while in x 127^2 < 2^24, i.e. in <= 1040; float32-rounded
    sums beyond). Weights with block scales (`block_scales_available`) are for the native kernel; elsewhere
    they are dequantized for an ordinary product."""
    module = native() if x.is_cpu and x.shape[-1] % 32 == 0 else None
    if module is not None:  # x's leading dimensions, its dtype and the bias's go to the kernel as they are
        return module.int8_linear(x, weight, native_scales(scales), bias)
    if scales.dim() == 2:
        return F.linear(x, dequantize_int8(weight, scales).to(x.dtype), bias)
    flat = x.reshape(-1, x.shape[-1])
    out = _int8_dynamic_rows(flat, weight, scales).to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def native_scales(scales: torch.Tensor) -> torch.Tensor:
    """Scales as the native kernels take them: bfloat16 (quantize_int8's dtype) or float32 as they are, read in
    place (no conversion per call); any other dtype converted to float32."""
    return scales if scales.dtype in (torch.bfloat16, torch.float32) else scales.float()


def block_scales_available(device: torch.device, in_features: int) -> bool:
    """Whether int8 weights on `device` with `in_features` inputs can take a scale per block of 32: where the native
    kernel multiplies them (the CPU, a multiple of 32, the kernels built)."""
    return device.type == "cpu" and in_features % 32 == 0 and native() is not None


def _int8_dynamic_rows(flat: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """flat [rows, in] quantized per row, times int8 weight [out, in] with row scales [out] -> [rows, out] float32."""
    x_q, x_scales = quantize_rows(flat)
    if int_mm_available(flat.device):
        acc = torch._int_mm(x_q, weight.t())  # [rows, out] int32
    else:
        acc = x_q.float() @ weight.float().t()
    return acc.float().mul_(scales).mul_(x_scales)  # in place: one pass fewer than acc * s


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
