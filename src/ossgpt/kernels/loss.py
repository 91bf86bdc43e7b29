"""Next-token cross-entropy through the LM head without materialising all the logits: the fast twin of the plain
loss in `ossgpt.model.model` (`F.cross_entropy` of the LM head's logits).

Shapes: N rows (tokens with a target), H hidden, V vocabulary, C rows per chunk.

The plain loss is the textbook pair `F.linear` then `F.cross_entropy`: it holds the full [N, V] float32 logits,
their log-softmax and, in the backward pass, their gradient. For the `mini` preset (N = 1024, V = 100,352) each of
those is 411 MB, and the passes over them are memory bound.

`linear_cross_entropy` computes the same mean loss C rows at a time. For each chunk it forms the logits
[C, V] in one reusable buffer, takes loss_i = logsumexp_i - logit_i[label_i], and, when gradients are
needed, turns the buffer in place into the gradient of the *mean* loss with respect to the logits,
    dlogits = (softmax - onehot(label)) / n_valid            (zero rows for ignored targets)
and immediately applies the LM head's two backward matmuls,
    dx_chunk = dlogits @ W              dW += dlogits^T @ x_chunk.
The backward pass then only scales the stored dx, dW by the incoming gradient (a scalar). That is the same
three matmuls as the unfused path, with no recomputation, and the [N, V] logits never exist: peak extra memory
is one [C, V] float32 buffer plus dW [V, H], which the weight's gradient needs anyway.

The buffer can live in a caller-owned `workspace` dict and be reused from one call to the next: on CPU a fresh
buffer of that size would be paged in again on every training step.

Rows trained beside a frozen LM head (`rows=(ids, delta)`, ossgpt.lora.tokens): the head is weight with delta
[n, H] added to its rows ids, never formed as such (a [V, H] copy). Each chunk's logits get x_chunk delta^T added
at those n columns, and the gradients the matching terms:
    dx_chunk += dlogits[:, ids] @ delta         ddelta += dlogits[:, ids]^T @ x_chunk
an [N, n] product more, where forming weight + delta would cost a pass over [V, H] and, for delta's gradient,
the whole of dW.

A weight held in another dtype than the products' (LoRA's frozen bfloat16 LM head under float32 compute,
training.sft.hold_frozen_base) is converted a slice of its rows at a time (WIDEN_BYTES of them), for each of the
two products that read it, never whole: a pass more over the weight per product instead of a [V, H] copy, which
for gpt-oss-20b would be 2.3 GB of float32.

Selected by `RuntimeOptions(loss_chunk_size=C)` (C > 0; 512 by default) when the model is asked for the loss
without the logits, as training does; tests/test_fast_paths.py checks it against the plain loss.

Under autocast the matmuls run in the autocast dtype (as F.linear would); the softmax is always float32.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
CPU_BLOCK_BYTES = 2 << 20  # float32 logits per softmax block on CPU: 8 rows of a 100k vocabulary, 61 of 8.5k
WIDEN_BYTES = 32 << 20  # a weight in another dtype than the products' is converted this many bytes of rows at a time


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 512,
    ignore_index: int = IGNORE_INDEX,
    workspace: dict | None = None,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x [N, H], weight [V, H], labels [N] -> the mean cross-entropy over the rows whose label is not ignore_index,
    F.cross_entropy(F.linear(x, weight).float(), labels), chunk_size rows of logits at a time.

    workspace: a dict this function may keep its scratch buffers in between calls (not thread-safe: one
    workspace per concurrently running model).
    rows: (ids [n], delta [n, H]): the head is weight with delta added to its rows ids (sorted, unique), as if
    weight.index_add(0, ids, delta) were passed, without forming it; delta gets a gradient (see the module doc).
    """
    ids, delta = rows if rows is not None else (None, None)
    # Autograd runs Function.forward with grad mode off, so which gradients are wanted is decided here. A frozen
    # weight (a LoRA base's LM head) needs none: its [V, H] gradient is neither formed nor held.
    grad = torch.is_grad_enabled()
    need = (grad and x.requires_grad, grad and weight.requires_grad, grad and delta is not None and delta.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(x, weight, delta, ids, labels, chunk_size, ignore_index, need, workspace)


def _scratch(workspace: dict | None, name: str, shape: tuple, dtype: torch.dtype, device: torch.device):
    """An uninitialised tensor of `shape`, reusing workspace[name] when it is large enough and alike."""
    numel = math.prod(shape)
    held = workspace.get(name) if workspace is not None else None
    if held is None or held.numel() < numel or held.dtype != dtype or held.device != device:
        held = torch.empty(numel, dtype=dtype, device=device)
        if workspace is not None:
            workspace[name] = held
    return held[:numel].view(shape)


def _softmax_rows_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None, block: int):
    """Per-row loss of float32 logits [c, V] with targets [c, 1] -> [c].

    If `scale` [c, 1] is given, `logits` is overwritten with (softmax - onehot(label)) * scale, the gradient.
    Works `block` rows at a time: each pass (max, exp, sum, scale) then finds its rows still in the L2 cache,
    instead of streaming the whole [c, V] buffer through memory five times.
    """
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for r in range(0, logits.shape[0], block):
        z, y = logits[r : r + block], labels[r : r + block]
        target = z.gather(1, y)
        top = z.amax(dim=1, keepdim=True)
        total = z.sub_(top).exp_().sum(dim=1, keepdim=True)  # z now holds exp(logit - max)
        losses[r : r + block] = (top + total.log() - target).squeeze(1)
        if scale is not None:
            s = scale[r : r + block]
            z.mul_(s / total).scatter_add_(1, y, -s)
    return losses


def _weight_rows(weight: torch.Tensor, dtype: torch.dtype, workspace: dict | None):
    """(rows, weight[rows] in dtype) over all the rows of weight [V, H]: the weight itself, at once, when it is in
    dtype already; else WIDEN_BYTES of rows at a time, converted into one reused buffer."""
    V, H = weight.shape
    if weight.dtype == dtype:
        yield slice(0, V), weight
        return
    step = max(1, WIDEN_BYTES // (H * dtype.itemsize))
    buffer = _scratch(workspace, "weight_rows", (min(step, V), H), dtype, weight.device)
    for start in range(0, V, step):
        rows = slice(start, min(start + step, V))
        yield rows, buffer[: rows.stop - start].copy_(weight[rows])


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, delta, ids, labels, chunk_size, ignore_index, need, workspace):
        """need: (whether x wants a gradient, whether weight does, whether delta does); delta, ids: None or the
        trained rows."""
        need_grad_x, need_grad_w, need_grad_delta = need
        need_grad = need_grad_x or need_grad_w or need_grad_delta
        N, H = x.shape
        V = weight.shape[0]
        device, device_type = x.device, x.device.type
        # Autograd runs Function.forward with autocast still on; cast explicitly instead, so that it is visible
        # which dtype each product uses: the autocast dtype if autocast is on (as F.linear would), else x's.
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = torch.promote_types(x.dtype, weight.dtype)
        # On CPU the per-row softmax passes run a few rows at a time so they stay in cache (at least 8 rows: fewer
        # makes the per-op overhead dominate; ~2 MB of them for a small vocabulary); a GPU wants them whole.
        block = max(8, CPU_BLOCK_BYTES // (4 * V)) if device_type == "cpu" else chunk_size
        with torch.autocast(device_type, enabled=False):
            xc = x.to(dtype)
            dc = delta.to(dtype) if delta is not None else None
            valid = labels != ignore_index
            n_valid = valid.sum()
            safe_labels = labels.masked_fill(~valid, 0)[:, None]  # [N, 1]; ignored rows get any valid index
            # d(mean loss)/d(loss_i): 1 / n_valid on valid rows, 0 on ignored ones. (No valid row at all gives a
            # 0/0 = nan loss, as F.cross_entropy does.)
            row_scale = (valid.float() / n_valid.clamp(min=1))[:, None] if need_grad else None

            C = min(chunk_size, N)
            buffer = _scratch(workspace, "logits", (C, V), torch.float32, device)  # logits, then their gradient
            low = _scratch(workspace, "low", (C, V), dtype, device) if dtype != torch.float32 else None
            losses = torch.empty(N, dtype=torch.float32, device=device)
            grad_x = torch.empty(N, H, dtype=x.dtype, device=device) if need_grad_x else None
            grad_w = None  # float32; the first chunk's product creates it (no zero-fill pass over [V, H])
            if need_grad_delta:  # accumulated over the chunks in float32 at least
                grad_delta = torch.zeros(delta.shape, dtype=torch.promote_types(dtype, torch.float32), device=device)
            for start in range(0, N, C):
                rows = slice(start, min(start + C, N))
                c = rows.stop - start
                logits = buffer[:c]
                product = logits if low is None else low[:c]
                for vocab, w in _weight_rows(weight, dtype, workspace):
                    torch.mm(xc[rows], w.t(), out=product[:, vocab])
                if low is not None:
                    logits.copy_(product)
                if dc is not None:  # the trained rows' part of their logits
                    logits.index_add_(1, ids, torch.mm(xc[rows], dc.t()).float())
                scale = row_scale[rows] if need_grad else None
                losses[rows] = _softmax_rows_(logits, safe_labels[rows], scale, block)
                if not need_grad:
                    continue
                grad = logits if low is None else low[:c].copy_(logits)  # dlogits [c, V]
                grad_rows = grad[:, ids] if dc is not None else None  # dlogits of the trained rows [c, n]
                if need_grad_x:
                    grad_chunk = torch.zeros(c, H, dtype=dtype, device=device)
                    for vocab, w in _weight_rows(weight, dtype, workspace):
                        grad_chunk.addmm_(grad[:, vocab], w)
                    if dc is not None:
                        grad_chunk.addmm_(grad_rows, dc)
                    grad_x[rows] = grad_chunk.to(x.dtype)
                if need_grad_delta:
                    grad_delta.add_(torch.mm(grad_rows.t(), xc[rows]))
                if not need_grad_w:
                    continue
                if grad_w is None:
                    grad_w = torch.mm(grad.t(), xc[rows]).float()
                elif grad.dtype == torch.float32:
                    grad_w.addmm_(grad.t(), xc[rows])
                else:  # a low-precision product accumulated in float32
                    grad_w.add_(torch.mm(grad.t(), xc[rows]))
        loss = (losses * valid).sum() / n_valid
        if need_grad:
            ctx.save_for_backward(
                grad_x, grad_w.to(weight.dtype) if need_grad_w else None,
                grad_delta.to(delta.dtype) if need_grad_delta else None,
            )  # fmt: skip
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.saved_tensors  # dx, dW, ddelta (None where not wanted)
        if grad_loss.item() != 1.0:  # loss.backward() gives exactly 1: skip a pass over dW [V, H]
            grads = [g * grad_loss if g is not None else None for g in grads]
        grad_x, grad_w, grad_delta = grads
        return grad_x, grad_w, grad_delta, None, None, None, None, None, None
