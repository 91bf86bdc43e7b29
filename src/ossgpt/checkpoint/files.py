"""Reading and writing checkpoint directories safely.

Reading: a directory holds `model.safetensors`, or shards `model-00001-of-0000N.safetensors` listed in
`model.safetensors.index.json`. Tensors are read one at a time from memory-mapped files, so loading needs
little more memory than the model itself. safetensors holds only raw tensors and JSON metadata: opening a
checkpoint from anywhere cannot run code (unlike a pickle).

Writing goes through `ossgpt.atomic.atomic_directory`: a crash or kill mid-save leaves either the old
checkpoint or the new one, never a half-written directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ossgpt.atomic import atomic_directory  # noqa: F401  (re-exported: checkpoint writers use it)
from ossgpt.errors import UserError


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt") from None


def safetensors_files(directory: Path, stem: str = "model") -> list[Path]:
    """The weight files of a checkpoint directory, in order."""
    index = directory / f"{stem}.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [directory / name for name in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise UserError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        if not files:
            raise UserError(f"{index} has an empty weight_map")
        return files
    single = directory / f"{stem}.safetensors"
    if single.exists():
        return [single]
    shards = sorted(directory.glob(f"{stem}-*.safetensors"))
    if shards:
        return shards
    raise UserError(f"no {stem}.safetensors (or shards with an index) in {directory}")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """Yield (name, file, tensor) for every tensor, reading lazily."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, path, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise UserError(f"{path} is not a readable safetensors file ({err}); the checkpoint is corrupt") from None
