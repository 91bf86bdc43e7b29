"""What glibc does with freed host memory: keep it for reuse, so that a CPU training step does not page its big
tensors in every time, or give it back at once, so that a run's memory is what it holds live.

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

`return_freed_memory()` does the opposite, for a run whose memory, not its page faults, is what limits it
(`ossgpt sft`'s default: LoRA on a large frozen base). Under glibc's moving threshold, the blocks below it come from
the heap, and a freed block goes back to the system only from the heap's top. A backward pass frees activations and
temporaries while it allocates gradients that stay: the gradients pin the heap's top, and the freed space below
them stays resident, unused, by an amount that differs from run to run (up to 1.6 GB more peak memory for a LoRA
step over two of gpt-oss-20b's layers, `python bench/gpt_oss_20b.py --lora --layers 2`). Fixing the threshold at
1 MiB gives every block from there up a mapping of its own, unmapped as soon as it is freed, so the process holds
what is live and little more. The price is paging such blocks in at each allocation (BENCHMARKS.md has what it
costs that step).
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_THRESHOLD = 1 << 30
_OWN_MAPPING = 1 << 20  # return_freed_memory: blocks from this size up are mapped (and unmapped) each on its own


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS. Returns whether it could."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False


def return_freed_memory() -> bool:
    """Ask glibc to map every block of 1 MiB or more on its own and to unmap it when freed. Returns whether it
    could."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _OWN_MAPPING))
    except (OSError, AttributeError):  # not glibc
        return False
