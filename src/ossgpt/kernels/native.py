"""The native CPU kernels (csrc/*.cpp): compiled once for this machine, then loaded from a cache.

    native()   the compiled module, or None where it cannot be built (no C++ compiler, no ninja, not Linux/x86):
               callers then take their pure-PyTorch path, and a one-line notice says so once.
    fused_experts(kernel, x, indices, weights, gate_up, down, alpha, limit)
               a few tokens through their experts in one call of the module's `kernel` (MXFP4 or int8 experts),
               or None where the caller should take its loop.
    decode_attention(q, k, v, sinks, visible, scale)
               attention with sinks for one query per row (a decoding step), or None where the caller should take
               the fused kernel.
    rms_norm(x, weight, eps), rotary(x, cos, sin), rotary_table(positions, inv_freq, scaling),
    visible_keys(query_positions, key_positions, window), top_k_softmax(logits, k),
    write_kv(keys, values, key_positions, k, v, positions, start, ring)
               the element-wise steps around the products (ossgpt.model's RMSNorm, apply_rotary, RotaryEmbedding,
               allowed_keys, Router, LayerKVCache.write) in one call each, or None (False) where the caller should
               take its torch ops.

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
# cpu_elementwise.cpp: RMSNorm, the rotary embedding and its tables, the visibility mask, the KV cache's writes and the
# router's top-k softmax.
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
    width = gate_up[-1].shape[-1] // 2  # I: the bias is [E, 2I] in either format
    if not x.is_cpu or x.requires_grad or x.shape[0] > FUSED_EXPERTS_TOKENS or x.shape[-1] % 32 or width % 32:
        return None
    module = native()
    return None if module is None else getattr(module, kernel)(x, indices, weights, *gate_up, *down, alpha, limit)


# The native calls below decide themselves whether they apply, and return None where not: not float32 on the CPU,
# or gradients wanted (training keeps the torch ops, whose backward autograd knows). Those checks, in C++, cost a
# fraction of what they would here, at every call of a decoding step. Only whether the tensors are on the CPU is
# checked here first: a model on another device never has the kernels built.


def decode_attention(q, k, v, sinks, visible, scale: float):
    """Attention with sinks for one query per row, as a decoding step asks, in one native call; None where the
    caller should take its fused kernel (not float32 on the CPU, gradients wanted, more than one query per row, or
    the kernels not built).

    q [B, H, 1, D], k/v [B, K, S, D] (K dividing H; views of a cache's rows and columns are fine), sinks [H],
    visible bool [B|1, 1, 1, S] -> [B, H, 1, D] float32, as `ossgpt.model.attention.eager_attention`."""
    module = native() if q.is_cpu and q.shape[2] == 1 else None
    return None if module is None else module.decode_attention(q, k, v, sinks, visible, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x [..., D] float32 (contiguous), weight [D] float32 -> weight * x / sqrt(mean(x^2) + eps), x's shape
    (ossgpt.model.norms.rms_norm_reference); None where the caller should take torch's kernel."""
    module = native() if x.is_cpu else None
    return None if module is None else module.rms_norm(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [B, H, T, D] float32 (any strides but the innermost), cos/sin [T, D/2] or [B, T, D/2] -> x rotated, as
    ossgpt.model.rope.apply_rotary (contiguous); None where the caller should take its torch ops."""
    module = native() if x.is_cpu else None
    return None if module is None else module.rotary(x, cos, sin)


def visible_keys(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None):
    """query_positions [B, T], key_positions [B, S] int64 -> bool [B, 1, T, S], as
    ossgpt.model.attention.allowed_keys; None where the caller should take its torch ops."""
    module = native() if query_positions.is_cpu else None
    return None if module is None else module.visible_keys(query_positions, key_positions, window)


def rotary_table(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
    """positions [...] int64, inv_freq [D/2] float32 -> (cos, sin) [..., D/2] float32, as
    ossgpt.model.rope.RotaryEmbedding computes them; None where the caller should take its torch ops."""
    module = native() if positions.is_cpu else None
    return None if module is None else module.rotary_table(positions, inv_freq, scaling)


def top_k_softmax(logits: torch.Tensor, k: int):
    """logits [N, E] float32 -> (weights [N, k], indices [N, k]): each row's k largest logits softmaxed, and their
    columns, as ossgpt.model.moe.Router computes them; None where the caller should take its torch ops."""
    module = native() if logits.is_cpu else None
    return None if module is None else module.top_k_softmax(logits, k)


def write_kv(keys, values, key_positions, k, v, positions, start, ring: bool) -> bool:
    """k, v [B, K, T, D] and positions [B, T] written into a KV cache's keys, values [B, K, C, D] and key_positions
    [B, C] at columns start + t (start: an int, or a [B] tensor of each row's first column), modulo C if `ring`, as
    ossgpt.model.cache.LayerKVCache.write; False, with nothing written, where the caller should take its torch ops."""
    module = native() if keys.is_cpu else None
    if module is None:
        return False
    per_row = isinstance(start, torch.Tensor)
    return module.write_kv(keys, values, key_positions, k, v, positions, 0 if per_row else start,
                           start if per_row else None, ring)  # fmt: skip


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
