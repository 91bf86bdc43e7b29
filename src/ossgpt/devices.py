"""Devices and dtypes by name, as the command line and the configs give them.

resolve_device("auto")        CUDA when available, else the CPU; also "cpu", "cuda", "cuda:1"
resolve_device("cuda", 3)     GPU 3: a torchrun process's GPU is its local rank
DTYPES["bfloat16"]            torch.bfloat16; resolve_dtype("auto", device) picks one for the device
native_bfloat16()             whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), not emulated
"""

from __future__ import annotations

import torch

from ossgpt.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto", index: int | None = None) -> torch.device:
    """The torch device `name` names: "auto" (or None) is CUDA when available, else the CPU; then "cpu", "cuda" or
    "cuda:N". index: the GPU of a "cuda" that names none. UserError for a device this machine does not have."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"device {name} requested but CUDA is not available here; use --device cpu")
    gpu = device.index if device.index is not None else (index or 0)
    if gpu >= torch.cuda.device_count():
        raise UserError(f"GPU {gpu} requested but only {torch.cuda.device_count()} are visible")
    return torch.device("cuda", gpu)


def native_bfloat16() -> bool:
    """Whether torch's CPU kernels multiply bfloat16 natively here: AVX512-BF16 or AMX, and torch not held below
    AVX-512 (ATEN_CPU_CAPABILITY). Elsewhere bfloat16 matmuls are emulated, several times slower than float32 ones;
    with AVX512-BF16 they run faster than float32 (BENCHMARKS.md)."""
    supported = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return supported and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def resolve_dtype(name: str | None, device: torch.device, autocast: bool = False) -> str:
    """A key of DTYPES: `name`, or for "auto" (or None) bfloat16 on a CUDA GPU that supports it, else float32.

    autocast: the dtype is training's compute dtype under autocast (the weights stay float32), for which "auto" is
    bfloat16 on a CPU with native bfloat16 matmuls too. Weights held for inference stay float32 there: the native
    decoding kernels take float32 activations."""
    if name is not None and name != "auto":
        if name not in DTYPES:
            raise UserError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if autocast and device.type == "cpu" and native_bfloat16() else "float32"
