"""Fused attention with sinks: the fast twin of `ossgpt.model.attention.eager_attention`.

Same contract: q [B, H, T, D], k/v [B, K, S, D], sinks [H], visible bool [B|1, 1, T, S] -> [B, H, T, D], through a
fused kernel that never holds the [B, H, T, S] scores, grouped-query attention without copying K/V.

  * On CPU, a decoding step (one query per row, no gradients, float32): one native call
    (`ossgpt.kernels.native.decode_attention`, csrc/cpu_attention.cpp), where the flash kernel and the ops around it
    would cost more in per-call overhead than in arithmetic.
  * On CPU otherwise: PyTorch's flash kernel on plain attention (no sink), then the sink applied as a per-row
    rescaling from the log-sum-exp the kernel returns: out = out_plain * sigmoid(lse - sink)
    (`_CPUFlashAttentionWithSinks`, whose backward reuses the kernel's own).
  * Elsewhere: F.scaled_dot_product_attention with the sink folded in as one more key column (key and value zero,
    its logit supplied through the additive mask).

Selected by `RuntimeOptions(attention="sdpa")` (the default); tests/test_fast_paths.py checks it against the
einsum reference, values and gradients, and tests/test_decode_attention.py the decoding step's native call.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ossgpt.kernels.native import decode_attention


def sdpa_attention(q, k, v, sinks, visible, scale):
    """Same contract as `eager_attention`, through a fused attention kernel (no [B, H, T, S] scores in memory).

    On CPU: a decoding step in one native call (`decode_attention`); otherwise PyTorch's flash kernel without any
    sink column, the sink applied afterwards from the log-sum-exp the kernel returns (`_CPUFlashAttentionWithSinks`).
    Elsewhere: the public SDPA call with the sink folded in as one more key column (key and value zero, logit
    `sinks[h]` supplied through the additive mask).
    """
    B, H, T, D = q.shape
    if q.device.type == "cpu":
        autocast = torch.is_autocast_enabled("cpu")
        out = None if autocast else decode_attention(q, k, v, sinks, visible, scale)  # None: not a decoding step
        if out is not None:
            return out
        # The private kernel has no autocast rule (F.scaled_dot_product_attention has): pick the dtype by hand.
        dtype = torch.get_autocast_dtype("cpu") if autocast else q.dtype
        # The private kernel reads each row as contiguous whatever its stride (torch 2.13 gives wrong results for
        # rows that are not; the public SDPA copies them first): copy such rows here too.
        q, k, v = (t.to(dtype) if t.stride(-1) == 1 else t.to(dtype).contiguous() for t in (q, k, v))
        if k.shape[1] != H and not _cpu_flash_takes_gqa():  # older kernels: one key/value head per query head
            k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // k.shape[1], dim=1)
        bias = torch.zeros(visible.shape, dtype=dtype, device=q.device).masked_fill(~visible, float("-inf"))
        if torch.is_grad_enabled():
            return _CPUFlashAttentionWithSinks.apply(q, k, v, sinks, bias, scale)
        return _attention_with_sinks_lse(q, k, v, sinks, bias, scale)[0]  # no gradients: skip the autograd wrapper
    bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
    zero = k.new_zeros(B, k.shape[1], 1, D)
    k = torch.cat([k, zero], dim=2)  # the sink "key": its logit comes entirely from the mask below
    v = torch.cat([v, zero], dim=2)  # ... and its value is zero, so it only soaks up probability
    rows = bias.shape[0]  # B, or 1 when every row has the same positions
    sink_column = sinks.to(q.dtype).view(1, H, 1, 1).expand(rows, H, T, 1)
    bias = torch.cat([bias.expand(rows, H, T, -1), sink_column], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True)


@functools.cache
def _cpu_flash_takes_gqa() -> bool:
    """Whether this torch's CPU flash kernel accepts fewer key/value heads than query heads (probed once)."""
    q = torch.linspace(-1, 1, 4 * 3 * 8).view(1, 4, 3, 8)
    kv = torch.linspace(1, -1, 2 * 3 * 8).view(1, 2, 3, 8)
    try:
        with torch.no_grad():
            out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv)
            expected, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, kv.repeat_interleave(2, dim=1), kv.repeat_interleave(2, dim=1)
            )
    except RuntimeError:
        return False
    return bool(torch.allclose(out, expected, atol=1e-5))


def _attention_with_sinks_lse(q, k, v, sinks, bias, scale):
    """CPU flash attention, then the sink as a per-row rescaling (see below) -> out, o, lse, w."""
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    w = torch.sigmoid(lse - sinks.float().view(1, -1, 1))  # [B, H, T] float32
    return o * w.to(o.dtype)[..., None], o, lse, w


class _CPUFlashAttentionWithSinks(torch.autograd.Function):
    """Sinks as a correction of plain attention: q [B, H, T, D], k/v [B, K, S, D], sinks [H], bias [B|1, 1, T, S].

    With o = softmax(scores) v and lse = logsumexp(scores) per row, adding the sink logit to the softmax only
    rescales the row: out = o * w, with w = exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink).

    Backward. Let dO be the incoming gradient. Through o: the kernel's own backward with grad dO * w. Through lse
    (d lse / d score_j = p_j): an extra p_j * g with g = w (1 - w) (dO . o). The flash backward computes
        d score_j = p_j (dP_j - delta),  delta = (grad_out . out_arg)
    from whatever `out` it is given; handing it out_arg = out = o * w instead of o gives
        delta = w^2 (dO . o) = w (dO . o) - g,
    exactly the lse term. Finally d sink = -sum over rows of g. Fully masked rows (left padding) come out of the
    kernel as zeros, as the sink-only softmax of the reference gives.
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, bias, scale):
        out, o, lse, w = _attention_with_sinks_lse(q, k, v, sinks, bias, scale)
        ctx.save_for_backward(q, k, v, bias, o, out, lse, w)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, o, out, lse, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        g = w * (1 - w) * (grad_out * o).sum(dim=-1, dtype=torch.float32)  # d loss / d lse, [B, H, T]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out * w.to(grad_out.dtype)[..., None], q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=ctx.scale
        )
        return dq, dk, dv, -g.sum(dim=(0, 2)), None, None
