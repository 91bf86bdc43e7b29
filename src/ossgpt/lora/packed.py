"""Training through a frozen MXFP4 weight: `packed_linear`, a product whose backward dequantizes the weight again.

    packed_linear(x [..., in], blocks [out, in/32, 16], scales [out, in/32]) -> x W^T [..., out]

W is the weight the packed rows hold (ossgpt.kernels.mxfp4). Left to autograd, `F.linear(x, dequantize(...))`
keeps the dequantized W alive until the backward pass needs it for the input's gradient: one dense copy of every
expert that ran, per layer, for the whole step, which is what packing was meant to avoid. This Function saves only
the packed tensors (4.25 bits per weight; views of the model's own buffers, so no new memory at all) and
dequantizes once more in the backward pass, for grad_x = grad_y W. There is no gradient for W: the base is
frozen (ossgpt.lora), only the adapters beside it train.

The native CPU kernels that `mxfp4_linear` uses for inference have no backward; this is the product to train with.

The dense weight lives only for the product that needs it, so every product dequantizes into one buffer kept for
the weight's shape and the matmul dtype (`_dense`): allocated afresh, each would be paged in anew, three times per
expert and step (66 MB for a gate_up projection of gpt-oss-20b in float32). Not thread-safe: one training thread
per process, as the chunked loss's workspace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ossgpt.kernels.mxfp4 import BLOCK_SIZE, dequantize

_BUFFERS: dict[tuple, torch.Tensor] = {}  # (scales' shape, dtype, device) -> the buffer `_dense` dequantizes into


def packed_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] times the MXFP4 rows blocks [out, in/32, 16], scales [out, in/32] -> [..., out], in the matmul
    dtype (the autocast dtype under autocast, else x's); differentiable with respect to x only."""
    return _PackedLinear.apply(x, blocks, scales)


def _dense(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight [out, in] that blocks and scales hold, in dtype, dequantized into the buffer kept for its shape:
    valid until the next call."""
    key = (tuple(scales.shape), dtype, blocks.device)
    if key not in _BUFFERS:
        shape = (*scales.shape[:-1], scales.shape[-1] * BLOCK_SIZE)
        _BUFFERS[key] = torch.empty(shape, dtype=dtype, device=blocks.device)
    return dequantize(blocks, scales, dtype, out=_BUFFERS[key])


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, scales):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.save_for_backward(blocks, scales)  # the packed tensors only: never the dense weight
        ctx.dtype, ctx.input_dtype = dtype, x.dtype
        with torch.autocast(device, enabled=False):  # the dtype is chosen above, the same way in both passes
            return F.linear(x.to(dtype), _dense(blocks, scales, dtype))

    @staticmethod
    def backward(ctx, grad_out):
        blocks, scales = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_x = grad_out.to(ctx.dtype) @ _dense(blocks, scales, ctx.dtype)  # [..., out] @ [out, in]
        return grad_x.to(ctx.input_dtype), None, None
