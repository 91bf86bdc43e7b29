"""Token files: a prepared data folder's train.bin and val.bin hold token ids as raw uint32, one after another.

write_tokens(path, [ids, ids, ...])   concatenate arrays of ids into a token file
read_tokens(path)                     its ids [N] uint32, memory-mapped read-only (nothing is loaded up front)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ossgpt.errors import UserError

TOKEN_DTYPE = np.uint32  # o200k_harmony's ids do not fit in uint16


def write_tokens(path: Path, parts: Sequence[np.ndarray]) -> None:
    """Concatenate token arrays into a token file."""
    with open(path, "wb") as f:
        for part in parts:
            f.write(np.ascontiguousarray(part, dtype=TOKEN_DTYPE).tobytes())


def read_tokens(path: str | Path) -> np.ndarray:
    """The ids of a token file [N], memory-mapped; UserError if it is missing or not a whole number of ids."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; re-run `ossgpt prepare`")
    size = path.stat().st_size
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise UserError(f"{path} is not a file of uint32 tokens ({size} bytes); re-run `ossgpt prepare`")
    if size == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
