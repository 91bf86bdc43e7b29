"""Devices and dtypes by name, as the command line and the configs give them.

resolve_device("auto")        CUDA when available, else the CPU; also "cpu", "cuda", "cuda:1"
resolve_device("cuda", 3)     GPU 3: a torchrun process's GPU is its local rank
DTYPES["bfloat16"]            torch.bfloat16; resolve_dtype("auto", device) picks one for the device
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


def resolve_dtype(name: str | None, device: torch.device) -> str:
    """A key of DTYPES: `name`, or for "auto" (or None) bfloat16 on a CUDA GPU that supports it, else float32."""
    if name is not None and name != "auto":
        if name not in DTYPES:
            raise UserError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
        return name
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
