"""MXFP4, the 4-bit microscaling format gpt-oss's expert weights are published in (OCP Microscaling spec).

Values come in blocks of 32 that share one power-of-two scale. Each value is an FP4 E2M1 code (sign, 2 exponent
bits, 1 mantissa bit), so only 16 values exist:

    code   0    1    2    3    4    5    6    7      8 .. 15
    value  0   0.5   1   1.5   2    3    4    6      the same, negated (the high bit of the nibble is the sign)

Storage, for a tensor of rows of length K (K a multiple of 32, G = K / 32 blocks per row):
    blocks [..., G, 16] uint8   two codes per byte, the LOW nibble first: byte j of block g holds the values at
                                32 g + 2 j (low nibble) and 32 g + 2 j + 1 (high nibble)
    scales [..., G]     uint8   the block's scale as a biased exponent: the values are multiplied by 2^(s - 127)
That is 4 + 8/32 = 4.25 bits per weight.

Checkpoints store an expert projection with its rows = output channels ([E, out, in], the reference's x @ W^T),
while ossgpt's `Experts` hold [E, in, out] (x @ W): `dequantize_experts` transposes.

`mxfp4_linear(x, blocks, scales, bias)` multiplies by packed rows without materialising them: on CPU the native
kernel of ossgpt.kernels.native (x quantized to int8 per block of 32 values, integer dot products with the FP4
codes, one scale multiply per block), elsewhere (or without a compiler) the reference: dequantize, then F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ossgpt.kernels.native import native

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK_SIZE = 32  # values per shared scale
SCALE_BIAS = 127
INDEX_BYTES = 1 << 16  # bytes `dequantize` turns into lookup indices at a time on CPU


def check_packed(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """Raise ValueError unless blocks [..., G, 16] and scales [..., G] are a consistent uint8 MXFP4 pair."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
            f"expected blocks [..., G, {BLOCK_SIZE // 2}] with scales [..., G]"
        )


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """blocks [..., G, 16], scales [..., G] (uint8) -> values [..., G * 32] in `dtype`.

    out: a contiguous tensor [..., G * 32] of `dtype` to write the values into, and return, instead of a new one.

    Exact in float32 and bfloat16 (an FP4 value has 2 significant bits) for every scale those dtypes can represent
    (scale 255, NaN in the OCP format, gives NaN or inf). On CPU, float32 and bfloat16 values come from the native
    kernel (ossgpt.kernels.native), written straight into `out`; otherwise each byte is looked up once in a table of
    its two values, INDEX_BYTES bytes at a time on CPU (a lookup wants int32 indices: converted all at once, they
    would be a temporary half the size of the result), and the scales are multiplied in place. Either way there is no
    temporary the size of the weight (but the float32 values, for another dtype), which matters where experts are
    dequantized again at every training step (ossgpt.lora.packed).
    """
    check_packed(blocks, scales)
    shape = (*scales.shape[:-1], scales.shape[-1] * BLOCK_SIZE)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=blocks.device)
    elif out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor {list(shape)}, got {out.dtype} {list(out.shape)}")
    module = native() if blocks.is_cpu and dtype in (torch.float32, torch.bfloat16) else None
    if module is not None:
        module.mxfp4_dequantize(blocks.contiguous(), scales.contiguous(), out)
        return out
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    byte = torch.arange(256)
    pairs = torch.stack([lut[byte & 0x0F], lut[byte >> 4]], dim=-1).to(blocks.device)  # [256, 2]: low nibble first
    powers = torch.tensor([2.0 ** (e - SCALE_BIAS) for e in range(256)], dtype=torch.float32, device=blocks.device)
    wide = out if dtype == torch.float32 else torch.empty(shape, dtype=torch.float32, device=blocks.device)
    values = wide.view(*scales.shape, BLOCK_SIZE)  # [..., G, 32]
    flat_bytes, flat_pairs = blocks.reshape(-1), values.view(-1, 2)
    step = INDEX_BYTES if blocks.device.type == "cpu" else max(1, flat_bytes.numel())  # an accelerator: one launch
    for start in range(0, flat_bytes.numel(), step):
        part = slice(start, start + step)
        torch.index_select(pairs, 0, flat_bytes[part].int(), out=flat_pairs[part])
    values *= powers[scales.int()][..., None]
    return out if wide is out else out.copy_(wide)


def quantize_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., K] (K a multiple of 32) -> blocks [..., K/32, 16], scales [..., K/32] (uint8): `dequantize`'s
    inverse, each value rounded to the nearest one the format holds.

    A block's scale is the smallest power of two 2^e with max|v| <= 7 * 2^e; each v / 2^e is then rounded to the
    nearest FP4 value, a tie to the even code (mantissa bit 0), as IEEE rounding breaks ties. Values up to 7 * 2^e
    round to 6 * 2^e (the largest FP4 value) no farther than any value rounds (half the largest gap, 1 * 2^e), so
    the block gets the finest scale that costs nothing; and a value a little above 6 * 2^e, such as a weight of
    the grid plus a small update, keeps its block's scale rather than doubling it. Lossless on values that
    `dequantize` can produce.
    """
    if values.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"MXFP4 rows must have a multiple of {BLOCK_SIZE} values, got {values.shape[-1]}")
    groups = values.float().contiguous().unflatten(-1, (-1, BLOCK_SIZE))  # [..., G, 32]
    amax = groups.abs().amax(-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 7.0)), -SCALE_BIAS).clamp(-SCALE_BIAS, SCALE_BIAS)
    e = e + (amax > 7.0 * torch.exp2(e)).float()  # in case log2 rounded down across a power of two
    scaled = groups / torch.exp2(e)[..., None]  # |scaled| <= 7
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=values.device)  # between FP4 values
    magnitude = torch.bucketize(scaled.abs(), midpoints)  # code 0..7; a tie goes to the lower code
    tie = scaled.abs() == midpoints[magnitude.clamp(max=len(midpoints) - 1)]
    codes = magnitude + (tie & (magnitude % 2 == 1)).long() + 8 * torch.signbit(scaled).long()
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # low nibble first
    return blocks, (e + SCALE_BIAS).to(torch.uint8)


def dequantize_experts(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """A checkpoint's packed expert projection -> ossgpt's dense layout.

    blocks [E, out, in / 32, 16], scales [E, out, in / 32] -> weight [E, in, out] in `dtype` on `device`.
    One expert at a time, so the temporaries stay small next to the result (a gpt-oss-120b layer's gate_up
    projection is 2.1G values).
    """
    check_packed(blocks, scales)
    E, out_features, groups = scales.shape
    weight = torch.empty(E, groups * BLOCK_SIZE, out_features, dtype=dtype, device=device)
    for e in range(E):
        weight[e] = dequantize(blocks[e].to(weight.device), scales[e].to(weight.device), dtype).T
    return weight


def mxfp4_linear(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] times the MXFP4 rows blocks [O, K/32, 16], scales [O, K/32] (plus bias [O]) -> [..., O] in x's
    dtype: F.linear with the dequantized weight.

    On CPU with the native kernels, x is rounded to int8 per block of 32 values (step max|block| / 127) first:
    each output is off from the exact product by at most half a step per value, times the weights' magnitudes
    (tests/test_native_kernels.py checks that bound). Otherwise, the exact reference."""
    module = native() if x.is_cpu else None
    if module is None or x.requires_grad:
        return F.linear(x, dequantize(blocks, scales, x.dtype), bias)
    return module.mxfp4_linear(x, blocks, scales, bias)  # (the kernel takes x and bias in any float dtype)
