"""Keeping freed host memory for reuse, so that a CPU training step does not page its big tensors in every time.

glibc serves every allocation above its mmap threshold (which it raises to at most 32 MB) with a fresh mmap and
unmaps it again on free. A CPU training step of a large-vocabulary model allocates and frees several
[vocab, hidden] tensors every step (for `mini`, the LM head's and the embedding's gradients: 205 MB each), so
each step faults them in again, one 4 KiB page at a time (`python bench/run.py` measures a `mini` step with and
without; BENCHMARKS.md has the figures).

`keep_freed_memory()` raises glibc's mmap and trim thresholds to 1 GiB: big blocks then come from the heap and
stay there when freed, ready for the next step (mostly: a block that no longer fits where it was freed, because
smaller ones took part of the space, still gets fresh pages). Peak memory is about the same; the process just
does not shrink back between steps. `ossgpt train` calls it on CPU unless `--no-keep-freed-memory`; elsewhere
(not glibc) it does nothing, and the run's log says so.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS. Returns whether it could."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
