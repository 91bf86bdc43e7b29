"""Grouped expert products: the fast twin of the per-expert loop in `ossgpt.model.moe.Experts`.

Shapes: N tokens, H hidden, E experts, k experts per token, I expert width.

`sorted_experts` computes what the loop does (every token through its k experts, outputs mixed by the routing
weights) without a Python loop over tokens: sort the N * k assignments by expert so that each expert's tokens are
one contiguous slice, multiply every slice by its expert's weights in one grouped product per projection
(`grouped_linear`), and add the weighted results back with one index_add.

`grouped_linear` is torch's grouped_mm kernel on an accelerator where this torch and dtype have one; on CPU (and
elsewhere) one addmm per expert slice, with its backward written out (`_GroupedLinearLoop`) so that products land
straight in their rows. `python bench/step_parts.py` times these choices; tests/test_fast_paths.py checks them
against each other and against the loop.

Selected by `RuntimeOptions(experts="sorted")` (the default).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F


def sorted_experts(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    project: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor],
    activation: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """x [N, H], indices/weights [N, k] -> [N, H]: sum over each token's k experts of weight * expert(x).

    project(name, rows, counts): the projection `name` ("gate_up_proj", then "down_proj") of rows [M, in] grouped
    by expert (counts [E] rows each) -> [M, out], e.g. `grouped_linear` with the experts' stacked weights;
    activation [..., 2I] -> [..., I] between the two.
    """
    N, k = indices.shape
    flat_expert = indices.reshape(-1)  # [N*k]
    order = torch.argsort(flat_expert, stable=True)
    token = order // k  # which token each sorted assignment came from
    counts = torch.bincount(flat_expert, minlength=num_experts)
    # index_select rather than x[token]: its backward is an index_add, several times faster on CPU than the
    # accumulating index_put that advanced indexing's backward uses.
    xs = x.index_select(0, token)  # [N*k, H], grouped by expert
    h = project("gate_up_proj", xs, counts)
    y = project("down_proj", activation(h), counts)
    y = y * weights.reshape(-1).index_select(0, order)[:, None]
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool | None = None
) -> torch.Tensor:
    """Rows of x [M, in] grouped by expert (counts [E], summing to M) times that expert's weight [E, in, out] + bias.

    use_grouped_mm: None = torch's grouped_mm kernel on accelerators where it works (see `grouped_mm_available`),
    else a loop over the experts' slices; True/False force one (tests compare the two).
    """
    dtype = _matmul_dtype(x, weight)
    xd, wd = x.to(dtype), weight.to(dtype)  # grouped_mm has no autocast rule: cast by hand (no-ops without autocast)
    if use_grouped_mm is None:
        # On CPU the loop is faster (addmm adds the bias in the product; `python bench/step_parts.py`,
        # "experts"), and its host sync costs nothing there.
        use_grouped_mm = x.device.type != "cpu" and grouped_mm_available(x.device, dtype) and _aligned(xd, wd)
    if use_grouped_mm:
        offsets = counts.cumsum(0, dtype=torch.int32)  # end row of each group
        with torch.autocast(x.device.type, enabled=False):
            out = _GROUPED_MM(xd, wd, offs=offsets)
        # One bias row per expert, repeated over its rows; output_size avoids a device->host sync.
        return out + bias.to(out.dtype).repeat_interleave(counts, dim=0, output_size=x.shape[0])
    return _GroupedLinearLoop.apply(xd, wd, bias.to(dtype), counts.tolist())


class _GroupedLinearLoop(torch.autograd.Function):
    """One addmm per expert slice: x [M, in] (rows grouped by expert), weight [E, in, out], bias [E, out], splits
    (rows per expert, a list) -> [M, out], all in one dtype.

    Written out as a Function so that every product lands straight in its rows of one preallocated tensor: the
    output forward; the input, weight and bias gradients backward. Left to autograd, the same loop (split, addmm,
    cat) also copies the outputs together (cat), the input gradient's slices (split's backward) and the experts'
    weight gradients (unbind's backward, a stack). `python bench/step_parts.py` times the two ("expert-loop");
    tests/test_fast_paths.py checks them against each other.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, splits):
        out = x.new_empty(x.shape[0], weight.shape[-1])
        for e, rows in enumerate(_slices(splits)):
            if rows.stop > rows.start:
                torch.addmm(bias[e], x[rows], weight[e], out=out[rows])
        ctx.save_for_backward(x, weight)
        ctx.splits = splits
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = grad_out.new_empty(weight.shape[0], weight.shape[-1]) if need_b else None
        for e, rows in enumerate(_slices(ctx.splits)):
            if rows.stop == rows.start:  # an expert without rows: zero gradients
                for grad in (grad_w, grad_b):
                    if grad is not None:
                        grad[e].zero_()
                continue
            g = grad_out[rows]
            if need_x:
                torch.mm(g, weight[e].t(), out=grad_x[rows])
            if need_w:
                torch.mm(x[rows].t(), g, out=grad_w[e])
            if need_b:
                torch.sum(g, dim=0, out=grad_b[e])
        return grad_x, grad_w, grad_b, None


def _slices(splits: list[int]) -> list[slice]:
    """Row ranges of consecutive groups: [2, 0, 3] -> [0:2, 2:2, 2:5]."""
    ends = list(itertools.accumulate(splits))
    return [slice(end - n, end) for end, n in zip(ends, splits)]


# torch >= 2.10 calls it F.grouped_mm; 2.8/2.9 have the private torch._grouped_mm (CUDA only before 2.9).
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_mm works on this device type and dtype (probed once, then cached).

    Support varies with the torch version, the device (CPU kernel from torch 2.9; CUDA needs sm80+) and dtype
    (some CUDA builds take bfloat16 only), so tiny calls are tried instead of encoding a version table: the
    forward product and the 2D x 2D one its backward uses for the weight gradient. The probe runs without
    autograd, so that nothing it does is recorded (it may first run inside a checkpointed block).
    """
    key = (device.type, dtype)
    if key not in _GROUPED_MM_WORKS:
        works = _GROUPED_MM is not None
        if works:
            try:
                with torch.no_grad():
                    # Fixed inputs (not torch.randn): probing must not move the caller's random stream.
                    x = torch.linspace(-1, 1, 128, device=device).view(8, 16).to(dtype)
                    w = torch.linspace(-1, 1, 256, device=device).view(2, 16, 8).to(dtype)
                    offsets = torch.tensor([3, 8], device=device, dtype=torch.int32)
                    y = _GROUPED_MM(x, w, offs=offsets)  # [8, 8]: rows 0-2 times w[0], rows 3-7 times w[1]
                    grad_w = _GROUPED_MM(x.t(), y, offs=offsets)  # [2, 16, 8], as autograd's backward calls it
                    expected_y = torch.cat([x[:3] @ w[0], x[3:] @ w[1]])
                    expected_grad_w = torch.stack([x[:3].t() @ y[:3], x[3:].t() @ y[3:]])
                    works = all(
                        torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)
                        for got, want in ((y, expected_y), (grad_w, expected_grad_w))
                    )
            except (RuntimeError, NotImplementedError, TypeError):
                works = False
        _GROUPED_MM_WORKS[key] = works
    return _GROUPED_MM_WORKS[key]


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x and weight runs in: the autocast dtype under autocast, else the promoted one."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def _aligned(*tensors: torch.Tensor) -> bool:
    """grouped_mm's kernels want 16-byte aligned data (memory-mapped checkpoints may not be) and row strides in
    multiples of 16 bytes (e.g. no bfloat16 width of 20); anything else takes the loop."""
    return all(
        t.data_ptr() % 16 == 0 and all(stride * t.element_size() % 16 == 0 for stride in t.stride() if stride != 1)
        for t in tensors
    )
