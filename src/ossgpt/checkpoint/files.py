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


def iter_tensors(files: list[Path], read_packed: bool = False) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """Yield (name, file, tensor) for every tensor, reading lazily: each tensor is a view of the memory-mapped
    file, read from disk when first touched.

    read_packed: uint8 tensors (MXFP4 blocks and scales) are read into the process's own memory instead. Decoding
    streams every packed expert it routes to, at every token, and anonymous memory streams faster than mapped
    file pages (bench/gpt_oss_20b.py); once loading ends, the file's pages are the kernel's cache, not this
    process's memory."""
    for path in files:
        try:
            header_end, header = _header(path) if read_packed else (0, {})
            with safe_open(str(path), framework="pt") as f, open(path, "rb") as raw:
                for name in f.keys():
                    entry = header.get(name)
                    if entry is not None and entry["dtype"] == "U8":
                        tensor = torch.empty(entry["shape"], dtype=torch.uint8)
                        raw.seek(header_end + entry["data_offsets"][0])
                        if raw.readinto(tensor.numpy().reshape(-1)) != tensor.numel():
                            raise OSError(f"tensor {name!r} is cut short")
                        yield name, path, tensor
                    else:
                        yield name, path, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as err:
            raise UserError(f"{path} is not a readable safetensors file ({err}); the checkpoint is corrupt") from None


def _header(path: Path) -> tuple[int, dict]:
    """(offset where the data starts, the JSON header: name -> dtype, shape, data_offsets) of a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))
