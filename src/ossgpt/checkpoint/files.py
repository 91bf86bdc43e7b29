"""Reading and writing checkpoint directories safely.

Reading: a directory holds `model.safetensors`, or shards `model-00001-of-0000N.safetensors` listed in
`model.safetensors.index.json`. Tensors are read one at a time from memory-mapped files, so loading needs
little more memory than the model itself. safetensors holds only raw tensors and JSON metadata: opening a
checkpoint from anywhere cannot run code (unlike a pickle).

Writing: everything goes to a temporary sibling directory that is renamed into place at the end, so a crash
or kill mid-save leaves either the old checkpoint or the new one, never a half-written directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

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


@contextmanager
def atomic_directory(final: Path, overwrite: bool = True):
    """Yield a temporary directory; on success, replace `final` with it in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            if not overwrite:
                raise UserError(f"{final} already exists")
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
