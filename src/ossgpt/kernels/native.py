"""The native CPU kernels (csrc/*.cpp): compiled once for this machine, then loaded from a cache.

    native()   the compiled module, or None where it cannot be built (no C++ compiler, no ninja, not Linux/x86):
               callers then take their pure-PyTorch path, and a one-line notice says so once.
    fused_experts(kernel, x, indices, weights, gate_up, down, alpha, limit)
               a few tokens through their experts in one call of the module's `kernel` (MXFP4 or int8 experts),
               or None where the caller should take its loop.
    decode_attention(q, k, v, sinks, visible, scale)
               attention with sinks for one query per row (a decoding step), or None where the caller should take
               the fused kernel.
    rms_norm(x, weight, eps), rotary(x, cos, sin), visible_keys(query_positions, key_positions, window)
               the element-wise steps around the products (ossgpt.model's RMSNorm, apply_rotary, allowed_keys) in
               one call each, or None where the caller should take its torch ops.

The instruction set is picked at run time from the CPU's flags: the module is built for the best of
`INSTRUCTION_SETS` this CPU has, under a name of its own, so a cache shared by machines with different CPUs
holds one build per kind. torch.utils.cpp_extension compiles it on first use (a minute or so) into
`TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions) and rebuilds it when the source changes.

OSSGPT_NATIVE=0 turns the native kernels off; OSSGPT_NATIVE=avx2 (or another name below) asks for a lesser
instruction set than the CPU has, e.g. to measure what an AVX2-only machine gets.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path

import torch

# cpu_q8.cpp: products of int8 or MXFP4 weights (and the module's bindings); cpu_attention.cpp: decoding attention;
# cpu_elementwise.cpp: RMSNorm, the rotary embedding and the visibility mask.
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("cpu_q8.cpp", "cpu_attention.cpp", "cpu_elementwise.cpp")]
# Tokens at most per fused experts call (`fused_experts`): decoding, batched or not. There a layer's loop over its
# experts costs more in per-op overhead than in products; a prompt's products amortize that overhead, while the fused
# call's scratch ([tokens * k, 2I] float32) would grow with its length.
FUSED_EXPERTS_TOKENS = 64

# name -> (CPU flags it needs (as /proc/cpuinfo spells them), compiler flags), best first.
INSTRUCTION_SETS = {
    "avx512vnni": (("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
                   ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")),
    "avxvnni": (("avx2", "fma", "f16c", "avx_vnni"), ("-mavx2", "-mfma", "-mf16c", "-mavxvnni")),
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
    "generic": ((), ()),
}  # fmt: skip


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def instruction_sets(flags: set[str], requested: str | None = None) -> list[str]:
    """The entries of INSTRUCTION_SETS whose flags are all in `flags`, best first (none better than `requested`)."""
    names = list(INSTRUCTION_SETS)
    start = names.index(requested) if requested in names else 0
    return [name for name in names[start:] if set(INSTRUCTION_SETS[name][0]) <= flags]


def pick_instruction_set(flags: set[str], requested: str | None = None) -> str:
    """The best entry of INSTRUCTION_SETS whose flags are all in `flags` (no better than `requested`)."""
    return instruction_sets(flags, requested)[0]


@functools.cache
def native():
    """The compiled kernels module for this CPU, or None (with a one-line notice on stderr) if unavailable.

    The best instruction set the CPU has is tried first; if its build fails (an older compiler without those
    flags, say), the next ones in turn."""
    setting = os.environ.get("OSSGPT_NATIVE", "").strip().lower()
    if setting in ("0", "off", "no", "false"):
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        _notice(f"native CPU kernels are built for Linux x86-64 only, not {platform.system()} {platform.machine()}")
        return None
    reason = ""
    for name in instruction_sets(cpu_flags(), setting or None):
        try:
            return _build(name)
        except Exception as err:  # noqa: BLE001 (a compiler, ninja or linker failure: the message says which)
            reason = reason or (str(err).strip().splitlines() or [type(err).__name__])[0]
    _notice(f"could not build the native CPU kernels ({reason[:200]})")
    return None


def fused_experts(kernel: str, x, indices, weights, gate_up: tuple, down: tuple, alpha: float, limit: float):
    """The MoE output of a few tokens in one native call, or None (not on the CPU, not built, gradients wanted, more
    than FUSED_EXPERTS_TOKENS tokens, or widths not multiples of 32): the caller then takes its loop.

    kernel: "mxfp4_experts" or "int8_experts". x [N, H]; indices, weights [N, k]: each token's experts and mixing
    weights; gate_up, down: (weight tensors..., bias) of all E experts in the kernel's format (csrc/cpu_q8.cpp)
    -> [N, H] in x's dtype: sum over k of weight * down(clamped_swiglu(gate_up(x))), the same products as one
    call per expert and projection (the tokens rounded to int8 per block of 32)."""
    module = native() if x.device.type == "cpu" and not x.requires_grad else None
    (*gate_up_weights, gate_up_bias), (*down_weights, down_bias) = gate_up, down
    width = gate_up_bias.shape[-1] // 2  # I: the bias is [E, 2I] in either format
    if module is None or x.shape[0] > FUSED_EXPERTS_TOKENS or x.shape[-1] % 32 or width % 32:
        return None
    out = getattr(module, kernel)(x.float().contiguous(), indices.long().contiguous(), weights.float().contiguous(),
                                  *gate_up_weights, gate_up_bias.float().contiguous(), *down_weights,
                                  down_bias.float().contiguous(), alpha, limit)  # fmt: skip
    return out.to(x.dtype)


def decode_attention(q, k, v, sinks, visible, scale: float):
    """Attention with sinks for one query per row, as a decoding step asks, in one native call; None where the
    caller should take its fused kernel (not float32 on the CPU, gradients wanted, more than one query per row, or
    the kernels not built).

    q [B, H, 1, D], k/v [B, K, S, D] (K dividing H; views of a cache's rows and columns are fine), sinks [H],
    visible bool [B|1, 1, 1, S] -> [B, H, 1, D] float32, as `ossgpt.model.attention.eager_attention`."""
    if q.device.type != "cpu" or q.shape[2] != 1 or torch.is_grad_enabled() or q.requires_grad:
        return None
    if any(t.dtype != torch.float32 or t.stride(-1) != 1 for t in (q, k, v)):
        return None
    module = native()
    if module is None:
        return None
    return module.decode_attention(q, k, v, sinks.float().contiguous(), visible.contiguous(), scale)


# The element-wise steps. Each runs where the model's torch ops would compute in float32 on the CPU without
# gradients: decoding, prompts, evaluation. Training keeps the torch ops, whose backward autograd knows.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x [..., D] float32, weight [D] float32 -> weight * x / sqrt(mean(x^2) + eps), x's shape
    (ossgpt.model.norms.rms_norm_reference); None where the caller should take torch's kernel."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or not x.is_contiguous():
        return None
    if _gradients_wanted(x, weight) or (module := native()) is None:
        return None
    return module.rms_norm(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [B, H, T, D] float32 (any strides but the innermost), cos/sin [T, D/2] or [B, T, D/2] -> x rotated, as
    ossgpt.model.rope.apply_rotary (contiguous); None where the caller should take its torch ops."""
    if x.device.type != "cpu" or x.dim() != 4 or x.stride(-1) != 1 or cos.dim() not in (2, 3):
        return None
    if any(t.dtype != torch.float32 for t in (x, cos, sin)) or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    if cos.dim() == 3 and cos.shape[0] != x.shape[0]:
        return None
    if _gradients_wanted(x, cos, sin) or (module := native()) is None:
        return None
    return module.rotary(x, cos, sin)


def visible_keys(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None):
    """query_positions [B, T], key_positions [B, S] int64 -> bool [B, 1, T, S], as
    ossgpt.model.attention.allowed_keys; None where the caller should take its torch ops."""
    if query_positions.device.type != "cpu" or query_positions.dim() != 2 or key_positions.dim() != 2:
        return None
    if query_positions.dtype != torch.int64 or key_positions.dtype != torch.int64:
        return None
    if query_positions.shape[0] != key_positions.shape[0] or (module := native()) is None:
        return None
    return module.visible_keys(query_positions, key_positions, window)


def _gradients_wanted(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _build(name: str):
    """Compile (or load from the cache) the kernels for instruction set `name`."""
    from torch.utils.cpp_extension import _get_build_directory, load

    module_name = f"ossgpt_cpu_q8_{name}"
    if sys.stderr.isatty() and not (Path(_get_build_directory(module_name, False)) / f"{module_name}.so").exists():
        print(f"ossgpt: building the native CPU kernels for {name} (once per machine, about a minute)",
              file=sys.stderr)  # fmt: skip
    return load(
        name=module_name,
        sources=[str(source) for source in SOURCES],
        extra_cflags=["-O3", "-fopenmp", *INSTRUCTION_SETS[name][1]],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _notice(reason: str) -> None:
    print(f"ossgpt: {reason}; using the slower pure-PyTorch kernels", file=sys.stderr)
